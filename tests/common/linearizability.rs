//! Records what concurrent HTTP clients did to `/items/{id}` on one or more server
//! processes, and checks that the history is one a set of atomic registers could have
//! produced: each item a compare-and-set register holding `(ETag, body)`.
//!
//! The check is the Wing–Gong–Lowe search of `todc-utils` ([`WGLChecker`]), run per item
//! (linearizability is local, so the items are checked one by one), plus two checks of
//! its own: no two successful writes replaced the same tag, and no read's `ETag` belongs
//! to a write of another body.
//!
//! An operation whose outcome the client cannot know (no answer, a `5xx`, the client
//! gave up mid-request or mid-upload) is *indeterminate*: it may have taken effect at
//! any moment after it was sent, or never. Its response is placed at the end of the
//! history, so the checker may linearize it anywhere after its call, including after
//! everything else (no effect). Tags that no known operation produced (a lease that was
//! taken over gets a fresh tag, so a version whose write was cut short is never trusted)
//! are explained only by indeterminate writes: each such tag is either the tag of an
//! indeterminate write whose body a read saw with it, or an invalidation that keeps the
//! body (from that write's call on: it applied, then its version was replaced; or from
//! the item's first indeterminate write). The first explanation is tried first, the
//! second where it fails. A history without indeterminate operations admits neither.
#![allow(dead_code)]

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{header, Method, Request, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use serde_json::{json, Value};
use todc_utils::{
    linearizability::history::{Action, History},
    Specification, WGLChecker,
};

/// A tag or a body, interned to a number so states are small and cheap to hash.
type TagId = u32;
type BodyId = u64;
/// A body that is not one any client wrote (torn, merged wrongly, corrupt).
const FOREIGN_BODY: BodyId = u64::MAX;

/// What a write required of the item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cond {
    /// `If-None-Match: *`: the item must not exist.
    Absent,
    /// `If-Match: <tag>`.
    Tag(TagId),
}

impl Cond {
    fn holds(self, state: &State) -> bool {
        match (self, state) {
            (Cond::Absent, None) => true,
            (Cond::Tag(tag), Some((current, _, _))) => tag == *current,
            _ => false,
        }
    }
}

/// How a write ended, as far as the client knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// `2xx`: it applied, and made `tag` current (`None` for a delete).
    Applied(Option<TagId>),
    /// `412`: the condition did not hold; `current` is the tag the answer named.
    Refused(Option<TagId>),
    /// `409`: another write held the item; nothing changed.
    Busy,
    /// `404`: the item does not exist (what a row-version server answers a `PATCH`,
    /// `DELETE` or `PUT` with `If-Match` on a missing item); nothing changed.
    Missing,
    /// No answer, a `5xx`, or the client gave up: it may or may not have applied. When a
    /// read later saw the write's body, `tag` is the tag it was seen with.
    Unknown(Option<TagId>),
}

/// One operation on one item.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `GET` answered `200` with this tag and body, or `404` (`None`).
    Read(Option<(TagId, BodyId)>),
    /// `GET` answered `200` with this body and no `ETag`: the layer vouches for no tag
    /// while a write to the item may be in flight.
    ReadBody(BodyId),
    /// `GET` with `If-None-Match: <tag>` answered `304`.
    NotModified(TagId),
    /// `PUT` / `PATCH` of a body (a patch that sets every field), or `DELETE` (`None`).
    Write {
        cond: Cond,
        body: Option<BodyId>,
        outcome: Outcome,
    },
    /// A fresh tag over the same body, that some indeterminate write left to be taken
    /// over (see the module docs).
    Invalidate(TagId),
}

/// The register: the item's tag and body, or `None` when it does not exist; with the tag
/// the write of that body replaced.
///
/// A read may carry that replaced tag: the layer serves the last committed version
/// while a write is in flight, so a read can see the new body under the tag it replaces
/// (its `ETag` older than its body, which only makes the client's next `If-Match` fail).
/// Never the other way round: an `ETag` newer than its body would let a stale body pass
/// an `If-Match`.
///
/// A version can also stand for no body ([`NO_BODY`]): a `DELETE` whose outcome the
/// layer never learnt leaves a fresh version whether or not the item went, so the item
/// may be gone under a tag. It reads as missing (`404`), refuses a create
/// (`If-None-Match: *`: the layer knows a version) and passes an `If-Match` on its tag.
type State = Option<(TagId, BodyId, Option<TagId>)>;

/// The body of a version over a missing item (see [`State`]); no client's body (those
/// are `client << 32 | seq`), nor [`FOREIGN_BODY`].
const NO_BODY: BodyId = BodyId::MAX - 1;

/// Whether the item is missing: no version, or a version over no body.
fn missing(state: &State) -> bool {
    matches!(state, None | Some((_, NO_BODY, _)))
}

/// Whether `tag` describes `state`'s body: its own tag, or the one its write replaced.
fn describes(tag: TagId, state: &State) -> bool {
    matches!(state, Some((t, _, replaced)) if *t == tag || *replaced == Some(tag))
}

/// An item as a compare-and-set register of `(tag, body)`.
struct ItemSpec;

/// A tag no response named: what an indeterminate write that no read saw made current.
fn unseen_tag(body: BodyId) -> TagId {
    u32::MAX - (body as u32 & 0x7fff_ffff)
}

impl Specification for ItemSpec {
    type State = State;
    type Operation = Op;

    fn init() -> State {
        None
    }

    fn apply(op: &Op, state: &State) -> (bool, State) {
        match *op {
            Op::Read(None) => (missing(state), *state),
            Op::Read(Some((tag, body))) => (
                matches!(state, Some((_, b, _)) if *b == body) && describes(tag, state),
                *state,
            ),
            Op::ReadBody(body) => (matches!(state, Some((_, b, _)) if *b == body), *state),
            Op::NotModified(tag) => (!missing(state) && describes(tag, state), *state),
            Op::Write {
                cond,
                body,
                outcome,
            } => {
                let replaced = state.map(|(t, _, _)| t);
                let next = |tag: Option<TagId>| {
                    body.map(|body| (tag.unwrap_or_else(|| unseen_tag(body)), body, replaced))
                };
                match outcome {
                    Outcome::Applied(tag) => (cond.holds(state), next(tag)),
                    Outcome::Refused(current) => {
                        let names_current = match current {
                            None => true,
                            Some(tag) => describes(tag, state),
                        };
                        (!cond.holds(state) && names_current, *state)
                    }
                    Outcome::Busy => (true, *state),
                    Outcome::Missing => (missing(state), *state),
                    // Valid anywhere: where the condition holds it may have applied; where
                    // it did not apply the checker linearizes it last, with no effect.
                    Outcome::Unknown(tag) => {
                        if cond.holds(state) {
                            (true, next(tag))
                        } else {
                            (true, *state)
                        }
                    }
                }
            }
            Op::Invalidate(tag) => match state {
                Some((old, body, _)) => (true, Some((tag, *body, Some(*old)))),
                // After a delete of unknown outcome: a version over no body.
                None => (true, Some((tag, NO_BODY, None))),
            },
        }
    }
}

/// One recorded operation: who did it, to which item, and what came back.
#[derive(Clone, Debug)]
struct Recorded {
    client: usize,
    item: usize,
    op: Op,
    /// What was sent and answered, for the report of a failed check.
    text: String,
    called: Duration,
    returned: Option<Duration>,
}

#[derive(Default, Clone)]
struct Log {
    ops: Vec<Recorded>,
    /// Calls and returns, in the order they happened (`true` = a return).
    events: Vec<(usize, bool)>,
    tags: HashMap<String, TagId>,
    tag_names: Vec<String>,
}

/// The history of one run, shared by its clients.
#[derive(Clone)]
pub struct Recorder {
    log: Arc<Mutex<Log>>,
    start: Instant,
}

/// Counts of one run, for the test's report line.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub ops: usize,
    pub reads: usize,
    pub applied: usize,
    pub refused: usize,
    pub busy: usize,
    pub unknown: usize,
    pub invalidations: usize,
    /// Reads whose tag was older than their body (checked for the body alone).
    pub stale_tags: usize,
    /// Indeterminate writes of a body no read ever saw, left out of the search.
    pub unobserved: usize,
    pub items: usize,
    pub check_time: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} operations on {} items ({} reads, {} writes applied, {} refused (412, or 404 for a missing item), \
             {} busy 409, {} indeterminate ({} of them never seen), {} tags taken over, {} reads under an older tag), linearizable (checked in {:.1?})",
            self.ops,
            self.items,
            self.reads,
            self.applied,
            self.refused,
            self.busy,
            self.unknown,
            self.unobserved,
            self.invalidations,
            self.stale_tags,
            self.check_time
        )
    }
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            log: Arc::default(),
            start: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Interns a tag's text (the whole `ETag` value, quotes and all).
    fn tag(&self, text: &str) -> TagId {
        let mut log = self.lock();
        let next = log.tag_names.len() as TagId;
        if let Some(id) = log.tags.get(text) {
            return *id;
        }
        log.tags.insert(text.to_owned(), next);
        log.tag_names.push(text.to_owned());
        next
    }

    /// Marks the call of an operation; returns its index.
    fn call(&self, client: usize, item: usize, op: Op, text: String) -> usize {
        let called = self.start.elapsed();
        let mut log = self.lock();
        let index = log.ops.len();
        log.ops.push(Recorded {
            client,
            item,
            op,
            text,
            called,
            returned: None,
        });
        log.events.push((index, false));
        index
    }

    /// Marks the return of operation `index`, with what it turned out to be.
    fn returned(&self, index: usize, op: Op, answer: &str) {
        let returned = self.start.elapsed();
        let mut log = self.lock();
        let recorded = &mut log.ops[index];
        recorded.op = op;
        recorded.returned = Some(returned);
        let _ = write!(recorded.text, " -> {answer}");
        log.events.push((index, true));
    }

    /// Marks operation `index` as indeterminate (it never returns).
    fn lost(&self, index: usize, op: Op, why: &str) {
        let mut log = self.lock();
        let recorded = &mut log.ops[index];
        recorded.op = op;
        let _ = write!(recorded.text, " -> indeterminate ({why})");
    }

    /// Drops operation `index` from the history: a read with no answer, or a request
    /// that never reached a server (`why`), has no effect.
    fn forget(&self, index: usize, why: &str) {
        let mut log = self.lock();
        log.events.retain(|(i, _)| *i != index);
        let _ = write!(log.ops[index].text, " -> dropped ({why})");
        log.ops[index].op = Op::Read(None);
        log.ops[index].item = usize::MAX;
    }

    /// Checks the history; panics with the failing item's history (also written to
    /// `report`) if it is not linearizable or breaks one of the two extra checks.
    pub fn check(&self, report: &std::path::Path) -> Summary {
        match self.verify() {
            Ok(summary) => summary,
            Err(text) => {
                let _ = std::fs::write(report, &text);
                panic!("{text}\n(written to {})", report.display());
            }
        }
    }

    /// [`check`](Self::check), returning the failing item's history as the error.
    pub fn verify(&self) -> Result<Summary, String> {
        // First each unknown tag seen with an indeterminate write's body as that
        // write's own (the small search); failing that, as an invalidation after it
        // (see `explain_unknown_tags`). Either explanation is one the servers can give.
        // Only the failure that is reported is worth explaining (a search per prefix).
        self.verify_explained(Explain::AsOwnTag, false)
            .or_else(|_| self.verify_explained(Explain::AsInvalidation, false))
            .or_else(|_| self.verify_explained(Explain::AsOwnTag, true))
    }

    /// The check with one way of explaining unknown tags; `describe`: on a failure,
    /// find the failing prefix and write the report (else an empty error).
    fn verify_explained(&self, explain: Explain, describe: bool) -> Result<Summary, String> {
        let started = Instant::now();
        let mut log = self.lock().clone();
        let mut summary = Summary::default();

        // Tags that an applied write made current, and the body each carried.
        let mut produced: HashMap<TagId, Vec<usize>> = HashMap::new();
        for (i, r) in log.ops.iter().enumerate() {
            if let Op::Write {
                body: Some(_),
                outcome: Outcome::Applied(Some(tag)),
                ..
            } = r.op
            {
                produced.entry(tag).or_default().push(i);
            }
        }
        explain_unknown_tags(&mut log, &produced, &mut summary, explain)?;
        summary.unobserved = drop_unobserved_writes(&mut log);

        // Extra check 1: no two applied writes replaced the same tag (where no tag was
        // made current twice, which a row version restarting after a delete could do).
        let mut replaced: HashMap<TagId, usize> = HashMap::new();
        for (i, r) in log.ops.iter().enumerate() {
            if let Op::Write {
                cond: Cond::Tag(tag),
                outcome: Outcome::Applied(_),
                ..
            } = r.op
            {
                if produced.get(&tag).is_some_and(|w| w.len() > 1) {
                    continue;
                }
                if let Some(first) = replaced.insert(tag, i) {
                    return Err(fail(
                        &log,
                        r.item,
                        &format!(
                            "two writes replaced the same tag: {} and {}",
                            log.ops[first].text, r.text
                        ),
                    ));
                }
            }
        }
        // Extra check 2: no read's ETag is newer than its body. The tag is the one the
        // write of that body made current, or the one that write replaced; or an older
        // one still: a store-mode read loads the version before its handler reads the
        // body, so writes (a delete and a create, say) that end in between leave the new
        // body under an older tag, which only makes the client's next `If-Match` fail.
        // Such a read is checked for its body alone. A tag whose every write began after
        // the body's write ended is newer than the body, and fails the check.
        let replaced_by_body: HashSet<(BodyId, TagId)> = log
            .ops
            .iter()
            .filter_map(|r| match r.op {
                Op::Write {
                    cond: Cond::Tag(tag),
                    body: Some(body),
                    outcome: Outcome::Applied(_) | Outcome::Unknown(_),
                } => Some((body, tag)),
                _ => None,
            })
            .collect();
        let writer_of_body: HashMap<BodyId, usize> = log
            .ops
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match r.op {
                Op::Write {
                    body: Some(body),
                    outcome: Outcome::Applied(_) | Outcome::Unknown(_),
                    ..
                } => Some((body, i)),
                _ => None,
            })
            .collect();
        for i in 0..log.ops.len() {
            let r = &log.ops[i];
            let Op::Read(Some((tag, body))) = r.op else {
                continue;
            };
            let Some(writes) = produced.get(&tag) else {
                continue;
            };
            let own = writes.iter().any(|w| match log.ops[*w].op {
                Op::Write { body: b, .. } => b == Some(body),
                _ => false,
            });
            if own || replaced_by_body.contains(&(body, tag)) {
                continue;
            }
            // A body no write produced has no writer: the search below fails it.
            let body_done = writer_of_body.get(&body).and_then(|w| log.ops[*w].returned);
            let newer =
                body_done.is_some_and(|done| writes.iter().all(|w| log.ops[*w].called > done));
            if newer {
                return Err(fail(
                    &log,
                    r.item,
                    &format!("a read's ETag is newer than its body: {}", r.text),
                ));
            }
            log.ops[i].op = Op::ReadBody(body);
            summary.stale_tags += 1;
        }

        // Linearizability, item by item.
        let items: HashSet<usize> = log
            .ops
            .iter()
            .map(|r| r.item)
            .filter(|i| *i != usize::MAX)
            .collect();
        summary.items = items.len();
        for item in items {
            let events: Vec<(usize, bool)> = log
                .events
                .iter()
                .copied()
                .filter(|(index, _)| log.ops[*index].item == item)
                .collect();
            if let Ok(path) = std::env::var("LIN_TRACE") {
                // For long runs by hand: the item being searched, should it not finish.
                let _ = std::fs::write(&path, fail(&log, item, "(being searched)"));
            }
            if !linearizable(&log, &events) {
                if !describe {
                    return Err(String::new());
                }
                // The shortest prefix that fails names the operation that broke it. A
                // prefix that fails stays failing as events are added, so: bisect.
                let (mut passes, mut fails) = (0, events.len());
                while fails - passes > 1 {
                    let mid = passes + (fails - passes) / 2;
                    if linearizable(&log, &events[..mid]) {
                        passes = mid;
                    } else {
                        fails = mid;
                    }
                }
                let r = &log.ops[events[fails - 1].0];
                let culprit = format!(
                    " (the first prefix that fails ends at client {}: {})",
                    r.client, r.text
                );
                return Err(fail(
                    &log,
                    item,
                    &format!("the history is not linearizable{culprit}"),
                ));
            }
        }

        for r in &log.ops {
            if r.item == usize::MAX {
                continue;
            }
            summary.ops += 1;
            match r.op {
                Op::Read(_) | Op::ReadBody(_) | Op::NotModified(_) => summary.reads += 1,
                Op::Write { outcome, .. } => match outcome {
                    Outcome::Applied(_) => summary.applied += 1,
                    Outcome::Refused(_) | Outcome::Missing => summary.refused += 1,
                    Outcome::Busy => summary.busy += 1,
                    Outcome::Unknown(_) => summary.unknown += 1,
                },
                Op::Invalidate(_) => {}
            }
        }
        summary.check_time = started.elapsed();
        Ok(summary)
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Leaves out of the search every indeterminate write of a body no read saw, and no
/// response named its tag. Had one applied, the item would hold a body nobody read
/// under a tag nobody knew: no later read, create or `If-Match` write could have
/// succeeded on it, so the history is linearizable with it placed last (no effect)
/// whenever it is linearizable at all. Leaving it out can only make the check
/// stricter; it keeps the search from trying each such write at every point. Items
/// with a takeover keep them all (the tag a takeover made may be such a write's).
/// Returns how many were left out.
fn drop_unobserved_writes(log: &mut Log) -> usize {
    let seen: HashSet<BodyId> = log
        .ops
        .iter()
        .filter_map(|r| match r.op {
            Op::Read(Some((_, body))) | Op::ReadBody(body) => Some(body),
            _ => None,
        })
        .collect();
    // An item with a takeover keeps all its writes: the takeover's tag may sit on one.
    let taken_over: HashSet<usize> = log
        .ops
        .iter()
        .filter(|r| matches!(r.op, Op::Invalidate(_)))
        .map(|r| r.item)
        .collect();
    let dropped: HashSet<usize> = log
        .ops
        .iter()
        .enumerate()
        .filter(|(_, r)| {
            !taken_over.contains(&r.item)
                && matches!(r.op, Op::Write { body: Some(body), outcome: Outcome::Unknown(None), .. }
                    if !seen.contains(&body))
        })
        .map(|(i, _)| i)
        .collect();
    log.events.retain(|(i, _)| !dropped.contains(i));
    dropped.len()
}

/// Whether the calls and returns `events` (of one item) are linearizable; an operation
/// with no return among them returns at the end.
fn linearizable(log: &Log, events: &[(usize, bool)]) -> bool {
    let mut actions = Vec::new();
    let mut returned = HashSet::new();
    for (index, is_return) in events {
        let op = log.ops[*index].op;
        if *is_return {
            returned.insert(*index);
            actions.push((*index, Action::Response(op)));
        } else {
            actions.push((*index, Action::Call(op)));
        }
    }
    for (index, is_return) in events {
        if !is_return && !returned.contains(index) {
            actions.push((*index, Action::Response(log.ops[*index].op)));
        }
    }
    // Each operation is its own "process" (its index): todc pairs a call with the next
    // response of the same process, and a client's operations never overlap anyway.
    let actions = compact_processes(actions);
    if actions.is_empty() {
        return true;
    }
    WGLChecker::<ItemSpec>::is_linearizable(History::from_actions(actions))
}

/// todc sizes its tables by the largest process id: renumber the operations 0..n.
fn compact_processes(actions: Vec<(usize, Action<Op>)>) -> Vec<(usize, Action<Op>)> {
    let mut ids = HashMap::new();
    actions
        .into_iter()
        .map(|(p, a)| {
            let next = ids.len();
            (*ids.entry(p).or_insert(next), a)
        })
        .collect()
}

/// How a tag first seen with the body of an indeterminate write is explained.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Explain {
    /// As that write's own tag.
    AsOwnTag,
    /// As an invalidation that may come any time after that write's call: the write
    /// applied and its version was then replaced, maybe after another invalidation (a
    /// takeover while the write's handler ran, then the fresh version of the write's
    /// own settle). Looser, and a larger search: tried when the first fails.
    AsInvalidation,
}

/// Gives each tag no applied write produced its explanation (see the module docs), or
/// fails the check when the item had no indeterminate write to explain it.
fn explain_unknown_tags(
    log: &mut Log,
    produced: &HashMap<TagId, Vec<usize>>,
    summary: &mut Summary,
    explain: Explain,
) -> Result<(), String> {
    // Every tag a response named, in the order they were first seen, with its item and
    // the body seen with it (if any).
    let mut seen: Vec<(TagId, usize, Option<BodyId>)> = Vec::new();
    let mut seen_set = HashSet::new();
    for (index, is_return) in log.events.clone() {
        if !is_return {
            continue;
        }
        let r = &log.ops[index];
        let (tag, body) = match r.op {
            Op::Read(Some((tag, body))) => (tag, Some(body)),
            Op::NotModified(tag) => (tag, None),
            Op::Write {
                outcome: Outcome::Refused(Some(tag)),
                ..
            } => (tag, None),
            _ => continue,
        };
        if !produced.contains_key(&tag) && seen_set.insert(tag) {
            seen.push((tag, r.item, body));
        }
    }
    let mut claimed = HashSet::new();
    for (tag, item, body) in seen {
        // The indeterminate write of that body, on that item, whose tag is still open.
        let owner = body.and_then(|body| {
            log.ops.iter().position(|r| {
                r.item == item
                    && matches!(r.op, Op::Write { body: Some(b), outcome: Outcome::Unknown(None), .. } if b == body)
            })
        });
        if explain == Explain::AsOwnTag {
            if let Some(owner) = owner.filter(|o| claimed.insert(*o)) {
                if let Op::Write { outcome, .. } = &mut log.ops[owner].op {
                    *outcome = Outcome::Unknown(Some(tag));
                }
                continue;
            }
        }
        // An invalidation: a fresh version that keeps the body, which only an
        // indeterminate write can leave behind (its lease was taken over, or its
        // outcome was never settled): from the call of the write whose body it was
        // seen with, or else from the item's first indeterminate write on.
        let owner_call = owner.and_then(|owner| {
            log.events
                .iter()
                .position(|(i, is_return)| !is_return && *i == owner)
        });
        let first_unknown = owner_call.or_else(|| {
            log.events.iter().position(|(i, is_return)| {
                !is_return
                    && log.ops[*i].item == item
                    && matches!(
                        log.ops[*i].op,
                        Op::Write {
                            outcome: Outcome::Unknown(_),
                            ..
                        }
                    )
            })
        });
        let Some(at) = first_unknown else {
            let name = log.tag_names[tag as usize].clone();
            return Err(fail(
                log,
                item,
                &format!("tag {name} was never made current by any write"),
            ));
        };
        let index = log.ops.len();
        log.ops.push(Recorded {
            client: usize::MAX,
            item,
            op: Op::Invalidate(tag),
            text: format!("(a takeover made {} current)", log.tag_names[tag as usize]),
            called: Duration::ZERO,
            returned: None,
        });
        log.events.insert(at, (index, false));
        summary.invalidations += 1;
    }
    Ok(())
}

/// The failure text: why, and the item's history in call order.
fn fail(log: &Log, item: usize, why: &str) -> String {
    let mut text = format!("item {item}: {why}\n\nits history, in call order:\n");
    for (index, is_return) in &log.events {
        let r = &log.ops[*index];
        if r.item != item || *is_return {
            continue;
        }
        let returned = r
            .returned
            .map_or_else(|| "never".to_owned(), |d| format!("{d:.3?}"));
        let _ = writeln!(
            text,
            "  [{:>9.3?} .. {returned:>9}] client {:>3}: {}",
            r.called, r.client, r.text
        );
    }
    text
}

// ---------------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------------

/// The servers' addresses; a fault task may replace one (a restarted process).
pub type Addrs = Arc<RwLock<Vec<SocketAddr>>>;

/// How a workload runs.
#[derive(Clone, Debug)]
pub struct Workload {
    pub clients: usize,
    pub items: usize,
    pub ops_per_client: usize,
    /// Of every 100 writes, how many the client abandons mid-request or mid-upload.
    pub abandon_percent: u64,
    /// Give up on an exchange after this long (then it is indeterminate).
    pub request_limit: Duration,
    pub seed: u64,
    /// Whether the server routes `PATCH` (when not, those writes are `PUT`s).
    pub patch: bool,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            clients: 6,
            items: 3,
            ops_per_client: 50,
            abandon_percent: 0,
            request_limit: Duration::from_secs(10),
            seed: 0x5eed,
            patch: true,
        }
    }
}

/// A small, seeded random number generator (splitmix64): runs can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

type ClientBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// What one exchange came back with.
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Bytes,
}

/// How a client sends a write's body.
#[derive(Clone, Copy, PartialEq)]
enum Upload {
    Whole,
    /// Gives up after this long, whatever has been sent.
    GiveUpAfter(Duration),
    /// Sends half the body, then fails the upload.
    HalfThenFail,
}

/// Runs the workload against `addrs` (`/items/{prefix}-{n}`), recording into `recorder`.
pub async fn run_clients(addrs: Addrs, prefix: &str, workload: &Workload, recorder: &Recorder) {
    let client: Client<HttpConnector, ClientBody> =
        Client::builder(TokioExecutor::new()).build_http();
    let tasks: Vec<_> = (0..workload.clients)
        .map(|id| {
            let (client, addrs, recorder) = (client.clone(), addrs.clone(), recorder.clone());
            let (workload, prefix) = (workload.clone(), prefix.to_owned());
            tokio::spawn(async move {
                let mut rng = Rng(workload.seed ^ (id as u64).wrapping_mul(0x1000_0001));
                // The tag this client last saw for each item (and the one before, to
                // send stale tags on purpose).
                let mut known: Vec<Option<String>> = vec![None; workload.items];
                let mut older: Vec<Option<String>> = vec![None; workload.items];
                for seq in 0..workload.ops_per_client {
                    let item = rng.below(workload.items as u64) as usize;
                    let path = format!("/items/{prefix}-{item}");
                    let addr = {
                        let addrs = addrs.read().unwrap_or_else(|e| e.into_inner());
                        addrs[rng.below(addrs.len() as u64) as usize]
                    };
                    let ctx = Ctx {
                        client: &client,
                        recorder: &recorder,
                        addr,
                        path: &path,
                        id,
                        item,
                        limit: workload.request_limit,
                    };
                    let roll = rng.below(100);
                    let body = ((id as u64) << 32) | seq as u64;
                    let send = if rng.below(100) < workload.abandon_percent {
                        if rng.below(2) == 0 {
                            Upload::GiveUpAfter(Duration::from_micros(rng.below(3_000)))
                        } else {
                            Upload::HalfThenFail
                        }
                    } else {
                        Upload::Whole
                    };
                    let learned = match (&known[item], roll) {
                        (_, 0..=29) => ctx.read(None).await,
                        (Some(tag), 30..=39) => ctx.read(Some(tag)).await,
                        (None, _) => {
                            ctx.write(Method::PUT, Cond2::Absent, Some(body), send)
                                .await
                        }
                        (Some(tag), 40..=69) => {
                            ctx.write(Method::PUT, Cond2::Tag(tag), Some(body), send)
                                .await
                        }
                        (Some(tag), 70..=84) => {
                            let method = if workload.patch {
                                Method::PATCH
                            } else {
                                Method::PUT
                            };
                            ctx.write(method, Cond2::Tag(tag), Some(body), send).await
                        }
                        (Some(tag), 85..=91) => {
                            ctx.write(Method::DELETE, Cond2::Tag(tag), None, send).await
                        }
                        (Some(tag), _) => {
                            let stale = older[item].clone().unwrap_or_else(|| tag.clone());
                            ctx.write(Method::PUT, Cond2::Tag(&stale), Some(body), send)
                                .await
                        }
                    };
                    if let Some(now) = learned {
                        if now != known[item] {
                            older[item] = known[item].take();
                            known[item] = now;
                        }
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a client panicked");
    }
}

/// One plain `GET` of every item, recorded: the last word on what each item holds.
pub async fn read_all(addrs: Addrs, prefix: &str, workload: &Workload, recorder: &Recorder) {
    let client: Client<HttpConnector, ClientBody> =
        Client::builder(TokioExecutor::new()).build_http();
    let addr = addrs.read().unwrap_or_else(|e| e.into_inner())[0];
    for item in 0..workload.items {
        let path = format!("/items/{prefix}-{item}");
        let ctx = Ctx {
            client: &client,
            recorder,
            addr,
            path: &path,
            id: usize::MAX - 1,
            item,
            limit: workload.request_limit,
        };
        ctx.read(None).await;
    }
}

enum Cond2<'a> {
    Absent,
    Tag(&'a str),
}

struct Ctx<'a> {
    client: &'a Client<HttpConnector, ClientBody>,
    recorder: &'a Recorder,
    addr: SocketAddr,
    path: &'a str,
    id: usize,
    item: usize,
    limit: Duration,
}

fn body_json(body: BodyId) -> String {
    json!({"client": body >> 32, "seq": body & 0xffff_ffff}).to_string()
}

fn body_id(bytes: &[u8]) -> BodyId {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(bytes) else {
        return FOREIGN_BODY;
    };
    // Exactly the two fields a client writes: anything else is not a body any client sent.
    if fields.len() != 2 {
        return FOREIGN_BODY;
    }
    match (fields["client"].as_u64(), fields["seq"].as_u64()) {
        (Some(c), Some(s)) if s <= 0xffff_ffff => (c << 32) | s,
        _ => FOREIGN_BODY,
    }
}

impl Ctx<'_> {
    /// `GET`, or `GET` with `If-None-Match`: returns what the client now knows of the tag
    /// (`Some(None)`: the item does not exist), or `None` when it learned nothing.
    async fn read(&self, if_none_match: Option<&str>) -> Option<Option<String>> {
        let mut request = Request::get(format!("http://{}{}", self.addr, self.path));
        if let Some(tag) = if_none_match {
            request = request.header(header::IF_NONE_MATCH, tag);
        }
        let text = match if_none_match {
            Some(tag) => format!("GET If-None-Match: {tag}"),
            None => "GET".to_owned(),
        };
        let request = request.body(empty()).expect("a valid request");
        let index = self.recorder.call(self.id, self.item, Op::Read(None), text);
        match self.exchange(request, Upload::Whole, Bytes::new()).await {
            Ok(answer) => {
                let etag = answer.etag.clone();
                let op = match answer.status {
                    StatusCode::OK => {
                        let body = body_id(&answer.body);
                        match &etag {
                            Some(tag) => Op::Read(Some((self.recorder.tag(tag), body))),
                            None => Op::ReadBody(body),
                        }
                    }
                    StatusCode::NOT_MODIFIED => {
                        let tag = etag.as_deref().or(if_none_match).expect("a tag");
                        Op::NotModified(self.recorder.tag(tag))
                    }
                    StatusCode::NOT_FOUND => Op::Read(None),
                    status if status.is_server_error() => {
                        self.recorder.forget(index, "a read with no answer");
                        return None;
                    }
                    status => panic!(
                        "GET {} answered {status}: {:?}",
                        self.path,
                        String::from_utf8_lossy(&answer.body)
                    ),
                };
                self.recorder.returned(index, op, &describe(&answer));
                match (answer.status, etag) {
                    (StatusCode::NOT_FOUND, _) => Some(None),
                    (_, Some(tag)) => Some(Some(tag)),
                    // A body without a tag tells the client nothing it can send.
                    (_, None) => None,
                }
            }
            Err(_) => {
                self.recorder.forget(index, "a read with no answer");
                None
            }
        }
    }

    /// A conditional write; returns what the client now knows of the tag.
    async fn write(
        &self,
        method: Method,
        cond: Cond2<'_>,
        body: Option<BodyId>,
        send: Upload,
    ) -> Option<Option<String>> {
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("http://{}{}", self.addr, self.path));
        let (cond, cond_text) = match cond {
            Cond2::Absent => {
                request = request.header(header::IF_NONE_MATCH, "*");
                (Cond::Absent, "If-None-Match: *".to_owned())
            }
            Cond2::Tag(tag) => {
                request = request.header(header::IF_MATCH, tag);
                (
                    Cond::Tag(self.recorder.tag(tag)),
                    format!("If-Match: {tag}"),
                )
            }
        };
        let payload = Bytes::from(body.map(body_json).unwrap_or_default());
        if body.is_some() {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .header(header::CONTENT_LENGTH, payload.len());
        }
        let mode = match send {
            Upload::Whole => "",
            Upload::GiveUpAfter(_) => " (the client gives up early)",
            Upload::HalfThenFail => " (the upload breaks off halfway)",
        };
        let text = format!(
            "{method} {cond_text} {}{mode}",
            body.map_or_else(String::new, body_json)
        );
        let unknown = Op::Write {
            cond,
            body,
            outcome: Outcome::Unknown(None),
        };
        let index = self.recorder.call(self.id, self.item, unknown, text);
        let request = request.body(empty()).expect("a valid request");
        match self.exchange(request, send, payload).await {
            Ok(answer) => {
                let tag = answer.etag.as_deref().map(|t| self.recorder.tag(t));
                let (outcome, learned) = match answer.status {
                    // A `2xx` write without an `ETag`: the handler's write happened, but the
                    // layer could not settle its version (the store did not answer), so
                    // the version is decided later, by a takeover. Its tag is unknown.
                    status if status.is_success() && body.is_some() && tag.is_none() => {
                        self.recorder.lost(
                            index,
                            unknown,
                            &format!("answered {status} without an ETag"),
                        );
                        return None;
                    }
                    status if status.is_success() => {
                        (Outcome::Applied(tag), Some(answer.etag.clone()))
                    }
                    StatusCode::PRECONDITION_FAILED => {
                        (Outcome::Refused(tag), Some(answer.etag.clone()))
                    }
                    StatusCode::CONFLICT => (Outcome::Busy, None),
                    StatusCode::NOT_FOUND if !matches!(cond, Cond::Absent) => {
                        (Outcome::Missing, Some(None))
                    }
                    status if status.is_server_error() => {
                        self.recorder
                            .lost(index, unknown, &format!("answered {status}"));
                        return None;
                    }
                    status => panic!(
                        "{method} {} answered {status}: {:?}",
                        self.path,
                        String::from_utf8_lossy(&answer.body)
                    ),
                };
                let op = Op::Write {
                    cond,
                    body,
                    outcome,
                };
                self.recorder.returned(index, op, &describe(&answer));
                learned
            }
            // No connection could be made: nothing was sent, so nothing changed. (Left
            // in, each would be one more write the search must try everywhere.)
            Err(why) if why.starts_with(NOT_SENT) => {
                self.recorder.forget(index, &why);
                None
            }
            Err(why) => {
                self.recorder.lost(index, unknown, &why);
                None
            }
        }
    }

    async fn exchange(
        &self,
        request: Request<ClientBody>,
        send: Upload,
        payload: Bytes,
    ) -> Result<Answer, String> {
        let (parts, _) = request.into_parts();
        let body: ClientBody = match send {
            Upload::HalfThenFail if payload.len() > 1 => {
                let half = payload.slice(..payload.len() / 2);
                let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
                    Ok(Frame::data(half)),
                    Err("the client broke off its upload".into()),
                ];
                StreamBody::new(futures_util::stream::iter(frames)).boxed()
            }
            _ => Full::new(payload).map_err(|never| match never {}).boxed(),
        };
        let request = Request::from_parts(parts, body);
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                if e.is_connect() {
                    format!("{NOT_SENT}{e}")
                } else {
                    e.to_string()
                }
            })?;
            let status = response.status();
            let etag = response
                .headers()
                .get(header::ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>(Answer { status, etag, body })
        };
        let limit = match send {
            Upload::GiveUpAfter(after) => after,
            _ => self.limit,
        };
        match tokio::time::timeout(limit, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("no answer within {limit:?}")),
        }
    }
}

/// How an exchange's error starts when the request never left the client (no
/// connection could be made to the server).
const NOT_SENT: &str = "not sent: ";

fn empty() -> ClientBody {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed()
}

fn describe(answer: &Answer) -> String {
    match &answer.etag {
        Some(tag) => format!(
            "{} ETag {tag} {}",
            answer.status.as_u16(),
            String::from_utf8_lossy(&answer.body)
                .chars()
                .take(60)
                .collect::<String>()
        ),
        None => format!(
            "{} {}",
            answer.status.as_u16(),
            String::from_utf8_lossy(&answer.body)
                .chars()
                .take(60)
                .collect::<String>()
        ),
    }
}

// ---------------------------------------------------------------------------------------
// A proxy that stalls or cuts the network between a server and its store
// ---------------------------------------------------------------------------------------

/// A TCP proxy on a free loopback port in front of `target`: [`stall`](Self::stall)
/// stops forwarding (the connections stay open, the bytes wait), [`cut`](Self::cut)
/// drops every open connection.
pub struct Proxy {
    pub addr: SocketAddr,
    stalled: Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let stalled = Arc::new(AtomicBool::new(false));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let task = {
            let (stalled, cuts) = (stalled.clone(), cuts.clone());
            tokio::spawn(async move {
                while let Ok((inbound, _)) = listener.accept().await {
                    let (stalled, mut cut) = (stalled.clone(), cuts.subscribe());
                    tokio::spawn(async move {
                        let Ok(outbound) = tokio::net::TcpStream::connect(target).await else {
                            return;
                        };
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        let pipe = |mut from: tokio::net::tcp::OwnedReadHalf,
                                    mut to: tokio::net::tcp::OwnedWriteHalf,
                                    stalled: Arc<AtomicBool>| async move {
                            use tokio::io::{AsyncReadExt, AsyncWriteExt};
                            let mut buf = vec![0u8; 16 * 1024];
                            loop {
                                let n = match from.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                while stalled.load(Ordering::SeqCst) {
                                    tokio::time::sleep(Duration::from_millis(5)).await;
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                        tokio::select! {
                            _ = pipe(ri, wo, stalled.clone()) => {}
                            _ = pipe(ro, wi, stalled) => {}
                            _ = cut.changed() => {}
                        }
                    });
                }
            })
        };
        Self {
            addr,
            stalled,
            cuts,
            task,
        }
    }

    /// Holds every byte in both directions for `how_long`.
    pub async fn stall(&self, how_long: Duration) {
        use std::sync::atomic::Ordering;
        self.stalled.store(true, Ordering::SeqCst);
        tokio::time::sleep(how_long).await;
        self.stalled.store(false, Ordering::SeqCst);
    }

    /// Drops every open connection through the proxy (new ones are still accepted).
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The checker on histories written by hand: what it must accept and refuse.
#[cfg(test)]
mod checker_tests {
    use super::*;

    /// A history, one operation at a time, each returning before the next is called
    /// (or never returning: indeterminate).
    struct Script(Recorder);

    impl Script {
        fn new() -> Self {
            Self(Recorder::new())
        }

        fn tag(&self, name: &str) -> TagId {
            self.0.tag(name)
        }

        fn done(&self, op: Op) {
            let index = self.0.call(0, 0, op, format!("{op:?}"));
            self.0.returned(index, op, "");
        }

        fn indeterminate(&self, op: Op) {
            let index = self.0.call(0, 0, op, format!("{op:?}"));
            self.0.lost(index, op, "no answer");
        }
    }

    fn write(cond: Cond, body: Option<BodyId>, outcome: Outcome) -> Op {
        Op::Write {
            cond,
            body,
            outcome,
        }
    }

    /// A `DELETE` whose outcome the layer never learnt leaves a fresh version, whether
    /// or not the item went: the item reads `404`, a `412` names the fresh tag, and an
    /// `If-Match` on that tag creates it. (The register once had no version over a
    /// missing item, and refused this history of a correct server.)
    #[test]
    fn a_version_over_a_deleted_item_is_a_history_a_server_can_give() {
        let s = Script::new();
        let (t0, fresh, t2) = (s.tag("t0"), s.tag("fresh"), s.tag("t2"));
        s.done(write(Cond::Absent, Some(1), Outcome::Applied(Some(t0))));
        s.indeterminate(write(Cond::Tag(t0), None, Outcome::Unknown(None)));
        s.done(Op::Read(None));
        s.done(write(Cond::Tag(t0), Some(2), Outcome::Refused(Some(fresh))));
        s.done(write(Cond::Tag(fresh), Some(3), Outcome::Applied(Some(t2))));
        s.done(Op::Read(Some((t2, 3))));
        let summary = s.0.verify().expect("linearizable");
        assert_eq!(summary.invalidations, 1, "{summary}");
    }

    /// Without an indeterminate write, nothing can leave a fresh version: the same
    /// history with the `DELETE` answered `412` must fail.
    #[test]
    fn a_fresh_tag_no_indeterminate_write_explains_fails() {
        let s = Script::new();
        let (t0, fresh, t2) = (s.tag("t0"), s.tag("fresh"), s.tag("t2"));
        s.done(write(Cond::Absent, Some(1), Outcome::Applied(Some(t0))));
        s.done(Op::Read(None));
        s.done(write(Cond::Tag(t0), Some(2), Outcome::Refused(Some(fresh))));
        s.done(write(Cond::Tag(fresh), Some(3), Outcome::Applied(Some(t2))));
        let error = s.0.verify().expect_err("not linearizable");
        assert!(error.contains("never made current"), "{error}");
    }

    /// A write committed, then another process took its lease over (a fresh tag, seen
    /// only in a `412`), then the write's own settle gave a second fresh tag, seen with
    /// the write's body. Taking that second tag for the write's own would put the
    /// write after the takeover, where its `If-Match` fails; the check must find the
    /// explanation in which the write came first.
    #[test]
    fn a_takeover_between_a_write_and_its_settle_is_a_history_a_server_can_give() {
        let s = Script::new();
        let (t0, taken) = (s.tag("t0"), s.tag("taken"));
        let (settled, t9) = (s.tag("settled"), s.tag("t9"));
        s.done(write(Cond::Absent, Some(1), Outcome::Applied(Some(t0))));
        s.indeterminate(write(Cond::Tag(t0), Some(2), Outcome::Unknown(None)));
        s.done(write(Cond::Tag(t0), Some(3), Outcome::Refused(Some(taken))));
        s.done(Op::Read(Some((settled, 2))));
        s.done(write(
            Cond::Tag(taken),
            Some(4),
            Outcome::Refused(Some(settled)),
        ));
        s.done(write(
            Cond::Tag(settled),
            Some(5),
            Outcome::Applied(Some(t9)),
        ));
        s.done(Op::Read(Some((t9, 5))));
        s.0.verify().expect("linearizable");
    }
}
