//! The whole store-mode layer: `PreconditionLayer` over a `MemoryStore` around a
//! handler whose answer the input decides, driven by up to 8 requests in a row.
//!
//! Before and after each request the store is read directly, and the layer's answer is
//! checked against the crate's own `evaluate` on the stored version and the settle
//! rules of the crate docs (2xx commits, 4xx keeps the version, anything else gives a
//! fresh one; reads seed a version and undo the seed when the handler is not 2xx).

#![no_main]

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, OnceLock},
    task::{Context, Poll},
    time::{Duration, UNIX_EPOCH},
};

use arbitrary::Arbitrary;
use bytes::Bytes;
use http::{
    header::{self, HeaderName},
    HeaderMap, HeaderValue, Method, Request, Response, StatusCode,
};
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tower::{Layer, Service, ServiceExt};
use tower_precondition::{
    evaluate::{evaluate, is_read, Decision, Preconditions},
    key::canonical_path,
    store::Entry,
    AtomicVersionStore, EntityTag, MemoryStore, PreconditionLayer, PreconditionPolicy, Reservation,
    Version,
};

/// Paths and the key each must be versioned under: the second and fourth are other
/// spellings of the first and third (RFC 3986 section 6.2.2), so they share a version.
const PATHS: [(&str, &str); 5] = [
    ("/items/1", "/items/1"),
    ("/items/%31", "/items/1"),
    ("/items/2", "/items/2"),
    ("/items/./2", "/items/2"),
    ("/other", "/other"),
];

const METHODS: [Method; 6] = [
    Method::GET,
    Method::HEAD,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::POST,
];

/// Marks a response the handler wrote (the layer keeps it on a 304 it makes of a 2xx).
const FROM_HANDLER: HeaderName = HeaderName::from_static("x-from-handler");

#[derive(Arbitrary, Debug)]
struct Settings {
    short_circuit_reads: bool,
    policy: u8,
    post_is_write: bool,
    validators_on_412: bool,
    /// An entry cache for the layer (off by default for the memory store): it must
    /// change round trips only, never an answer.
    entry_cache: Option<u8>,
    /// A store of a few entries, so that seeds evict other keys.
    small_store: bool,
}

/// An `If-Match` / `If-None-Match` field line.
#[derive(Arbitrary, Debug)]
enum TagField {
    Raw(Vec<u8>),
    Star,
    /// The stored version's tag (or a tag nothing has when there is none).
    Current {
        weak: bool,
        gzip: bool,
    },
    /// A tag an earlier response carried (stale, or still current).
    Seen {
        index: u8,
        weak: bool,
    },
    /// The current tag after another one.
    CurrentInList {
        weak: bool,
    },
}

/// An `If-Modified-Since` / `If-Unmodified-Since` field line.
#[derive(Arbitrary, Debug)]
enum DateField {
    Raw(Vec<u8>),
    /// An IMF-fixdate this many seconds from the stored version's date.
    Near(i8),
}

/// The handler's `ETag`.
#[derive(Arbitrary, Debug)]
enum HandlerTag {
    Raw(Vec<u8>),
    Strong(u16),
    Weak(u16),
    /// The stored version's own tag.
    Current,
}

#[derive(Arbitrary, Debug)]
struct Outcome {
    status: u16,
    etag: Option<HandlerTag>,
    last_modified: bool,
    /// 0: none, 1: gzip, 2: br, 3: a coding the layer cannot name.
    content_encoding: u8,
    body: Vec<u8>,
    error: bool,
}

#[derive(Arbitrary, Debug)]
struct Req {
    method: u8,
    path: u8,
    if_match: Vec<TagField>,
    if_none_match: Vec<TagField>,
    if_modified_since: Vec<DateField>,
    if_unmodified_since: Vec<DateField>,
    if_range: Option<Vec<u8>>,
    range: Option<Vec<u8>>,
    body: Vec<u8>,
    outcome: Outcome,
}

#[derive(Arbitrary, Debug)]
struct Input {
    settings: Settings,
    requests: Vec<Req>,
}

#[derive(Debug)]
struct HandlerError;

/// What the handler does next, and what it saw.
#[derive(Default)]
struct Script {
    outcome: Option<Planned>,
    calls: u32,
    reservation: Option<Reservation>,
}

#[derive(Clone)]
struct Planned {
    status: StatusCode,
    etag: Option<HeaderValue>,
    last_modified: bool,
    content_encoding: Option<HeaderValue>,
    body: Bytes,
    error: bool,
}

/// The application: answers what the script says, records that it ran.
#[derive(Clone)]
struct Handler(Arc<Mutex<Script>>);

impl Service<Request<Full<Bytes>>> for Handler {
    type Response = Response<Full<Bytes>>;
    type Error = HandlerError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, HandlerError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Full<Bytes>>) -> Self::Future {
        let mut script = self.0.lock().unwrap();
        script.calls += 1;
        script.reservation = request.extensions().get::<Reservation>().cloned();
        let plan = script.outcome.clone().expect("an outcome is planned");
        drop(script);
        Box::pin(async move {
            if plan.error {
                return Err(HandlerError);
            }
            let mut response = Response::new(Full::new(plan.body));
            *response.status_mut() = plan.status;
            let headers = response.headers_mut();
            headers.insert(FROM_HANDLER, HeaderValue::from_static("1"));
            if let Some(tag) = plan.etag {
                headers.insert(header::ETAG, tag);
            }
            if plan.last_modified {
                headers.insert(
                    header::LAST_MODIFIED,
                    HeaderValue::from_static("Sun, 06 Nov 1994 08:49:37 GMT"),
                );
            }
            if let Some(coding) = plan.content_encoding {
                headers.insert(header::CONTENT_ENCODING, coding);
            }
            Ok(response)
        })
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    // The layer needs the time driver (deadlines); one runtime for every input.
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    })
}

fn load(store: &MemoryStore, key: &str) -> Option<Entry> {
    store
        .load_now(key)
        .expect("the memory store answers at once")
        .expect("the memory store does not fail")
}

fn current_tag(entry: &Option<Entry>) -> Option<&EntityTag> {
    entry.as_ref().and_then(Entry::version).map(Version::etag)
}

fn tag_value(tag: &EntityTag, weak: bool, gzip: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if weak {
        out.extend_from_slice(b"W/");
    }
    out.push(b'"');
    out.extend_from_slice(tag.opaque().as_bytes());
    if gzip {
        out.extend_from_slice(b"-gzip");
    }
    out.push(b'"');
    out
}

fn tag_line(field: &TagField, current: Option<&EntityTag>, seen: &[EntityTag]) -> Vec<u8> {
    let absent = EntityTag::strong("absent").unwrap();
    let current = current.unwrap_or(&absent);
    match field {
        TagField::Raw(bytes) => bytes.clone(),
        TagField::Star => b"*".to_vec(),
        TagField::Current { weak, gzip } => tag_value(current, *weak, *gzip),
        TagField::Seen { index, weak } => {
            let tag = seen
                .get(usize::from(*index) % seen.len().max(1))
                .unwrap_or(&absent);
            tag_value(tag, *weak, false)
        }
        TagField::CurrentInList { weak } => {
            let mut out = b"\"other\", ".to_vec();
            out.extend_from_slice(&tag_value(current, *weak, false));
            out
        }
    }
}

fn date_line(field: &DateField, base: u64) -> Vec<u8> {
    match field {
        DateField::Raw(bytes) => bytes.clone(),
        DateField::Near(delta) => {
            let secs = base.saturating_add_signed(i64::from(*delta));
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(secs)).into_bytes()
        }
    }
}

fn append(headers: &mut HeaderMap, name: HeaderName, lines: impl Iterator<Item = Vec<u8>>) {
    for line in lines.take(3) {
        // Bytes a field value cannot hold never reach a server.
        if let Ok(value) = HeaderValue::from_bytes(&line) {
            headers.append(name.clone(), value);
        }
    }
}

fn plan(outcome: &Outcome, current: Option<&EntityTag>) -> Planned {
    let status = StatusCode::from_u16(100 + outcome.status % 500).expect("100..=599");
    let etag = outcome.etag.as_ref().and_then(|tag| match tag {
        HandlerTag::Raw(bytes) => HeaderValue::from_bytes(bytes).ok(),
        HandlerTag::Strong(n) => Some(
            EntityTag::strong(format!("h{n}"))
                .unwrap()
                .to_header_value(),
        ),
        HandlerTag::Weak(n) => Some(EntityTag::weak(format!("h{n}")).unwrap().to_header_value()),
        HandlerTag::Current => current.map(EntityTag::to_header_value),
    });
    let content_encoding = match outcome.content_encoding % 4 {
        0 => None,
        1 => Some(HeaderValue::from_static("gzip")),
        2 => Some(HeaderValue::from_static("br")),
        _ => Some(HeaderValue::from_static("x-unknown")),
    };
    Planned {
        status,
        etag,
        last_modified: outcome.last_modified,
        content_encoding,
        body: Bytes::copy_from_slice(&outcome.body),
        error: outcome.error,
    }
}

/// The handler's own strong tag as the layer reads it: exactly one valid strong tag.
fn handler_strong_tag(plan: &Planned) -> Option<EntityTag> {
    plan.etag
        .as_ref()
        .and_then(|v| EntityTag::parse_bytes(v.as_bytes()).ok())
        .filter(|t| !t.is_weak())
}

/// The tag a 2xx carrying `plan`'s coding gets for `version`.
fn representation_tag(version: &Version, plan: &Planned) -> Option<EntityTag> {
    version
        .etag()
        .for_content_encoding(plan.content_encoding.iter())
}

fn has_lease(entry: &Option<Entry>) -> bool {
    entry
        .as_ref()
        .and_then(Entry::lease)
        .is_some_and(|l| !l.is_released())
}

fn is_problem(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v == "application/problem+json")
}

fuzz_target!(|input: Input| {
    let settings = &input.settings;
    let policy = match settings.policy % 3 {
        0 => PreconditionPolicy::Optional,
        1 => PreconditionPolicy::Required,
        _ => PreconditionPolicy::Strict,
    };
    let store = Arc::new(if settings.small_store {
        MemoryStore::with_shards_and_capacity(1, 2)
    } else {
        MemoryStore::new()
    });
    let mut layer = PreconditionLayer::from_arc(store.clone())
        .short_circuit_reads(settings.short_circuit_reads)
        .precondition_policy(policy)
        .validators_on_412(settings.validators_on_412);
    if settings.post_is_write {
        layer = layer.write_methods([Method::PUT, Method::PATCH, Method::DELETE, Method::POST]);
    }
    if let Some(n) = settings.entry_cache {
        layer = layer.entry_cache(usize::from(n));
    }
    let script = Arc::new(Mutex::new(Script::default()));
    let service = layer.layer(Handler(script.clone()));
    let mut seen: Vec<EntityTag> = Vec::new();

    for (step, req) in input.requests.iter().take(8).enumerate() {
        let method = METHODS[usize::from(req.method) % METHODS.len()].clone();
        let (path, key) = PATHS[usize::from(req.path) % PATHS.len()];
        assert_eq!(canonical_path(path), key);
        let read = is_read(&method);
        let write = !read && (method != Method::POST || settings.post_is_write);

        let before = load(&store, key);
        assert!(
            !has_lease(&before),
            "a lease outlived its request: {before:?}"
        );
        let current = current_tag(&before).cloned();
        let base = before
            .as_ref()
            .and_then(Entry::version)
            .map_or(784_111_777, Version::last_modified_secs);

        let mut headers = HeaderMap::new();
        let tags = |fields: &[TagField]| {
            fields
                .iter()
                .map(|f| tag_line(f, current.as_ref(), &seen))
                .collect::<Vec<_>>()
        };
        let dates = |fields: &[DateField]| {
            fields
                .iter()
                .map(|f| date_line(f, base))
                .collect::<Vec<_>>()
        };
        append(
            &mut headers,
            header::IF_MATCH,
            tags(&req.if_match).into_iter(),
        );
        append(
            &mut headers,
            header::IF_NONE_MATCH,
            tags(&req.if_none_match).into_iter(),
        );
        append(
            &mut headers,
            header::IF_MODIFIED_SINCE,
            dates(&req.if_modified_since).into_iter(),
        );
        append(
            &mut headers,
            header::IF_UNMODIFIED_SINCE,
            dates(&req.if_unmodified_since).into_iter(),
        );
        // Range requests are the handler's business: the layer passes them on.
        append(&mut headers, header::IF_RANGE, req.if_range.iter().cloned());
        append(&mut headers, header::RANGE, req.range.iter().cloned());

        let planned = plan(&req.outcome, current.as_ref());
        {
            let mut s = script.lock().unwrap();
            s.outcome = Some(planned.clone());
            s.calls = 0;
            s.reservation = None;
        }
        let mut request = Request::new(Full::new(Bytes::copy_from_slice(&req.body)));
        *request.method_mut() = method.clone();
        *request.uri_mut() = path.parse().unwrap();
        *request.headers_mut() = headers.clone();

        let result = runtime().block_on(async {
            let response = service.clone().oneshot(request).await?;
            let (parts, body) = response.into_parts();
            let body = match body.collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(never) => match never {},
            };
            Ok::<_, HandlerError>((parts, body))
        });
        let (calls, reservation) = {
            let s = script.lock().unwrap();
            (s.calls, s.reservation.clone())
        };
        let after = load(&store, key);
        assert!(
            !has_lease(&after),
            "a lease outlived its request: {after:?}"
        );
        assert!(calls <= 1, "the handler ran {calls} times");
        let ran = calls == 1;
        let ctx = format!(
            "step {step}: {method} {path} {headers:?} before={before:?} after={after:?} ran={ran} \
             status={} etag={:?} error={}",
            planned.status, planned.etag, planned.error
        );

        let (parts, body) = match result {
            Ok(reply) => reply,
            Err(HandlerError) => {
                // Only the handler's error comes back as an error, and it settles as an
                // unknown outcome on a write: a fresh version, or still none.
                assert!(ran && planned.error, "{ctx}");
                if write {
                    match (current_tag(&before), current_tag(&after)) {
                        (Some(old), Some(new)) => assert!(!old.strong_eq(new), "{ctx}"),
                        (None, None) => {}
                        _ => panic!("an unknown outcome changed existence: {ctx}"),
                    }
                } else if read {
                    // Not a 2xx: a seed is undone, a version kept.
                    assert_eq!(before, after, "a failed read changed the store: {ctx}");
                }
                continue;
            }
        };
        let status = parts.status;
        let from_handler = parts.headers.contains_key(&FROM_HANDLER);
        let etags: Vec<_> = parts.headers.get_all(header::ETAG).iter().collect();
        let emitted = etags.first().map(|v| EntityTag::parse_bytes(v.as_bytes()));
        let ctx = format!("{ctx} -> {status} {:?}", parts.headers);

        if !read && !write {
            // Not ours: through untouched.
            assert!(ran && from_handler, "{ctx}");
            assert_eq!(status, planned.status, "{ctx}");
            assert_eq!(
                parts.headers.get(header::ETAG),
                planned.etag.as_ref(),
                "{ctx}"
            );
            assert_eq!(before, after, "a passthrough changed the store: {ctx}");
            assert_eq!(body, planned.body, "{ctx}");
            continue;
        }

        // Every ETag the layer lets out is one valid strong tag; every Last-Modified a date.
        assert!(etags.len() <= 1, "{ctx}");
        if let Some(parsed) = &emitted {
            let tag = parsed.as_ref().unwrap_or_else(|e| panic!("{e}: {ctx}"));
            assert!(!tag.is_weak(), "a weak ETag: {ctx}");
            seen.push(tag.clone());
        }
        if let Some(date) = parts.headers.get(header::LAST_MODIFIED) {
            let text = date.to_str().expect("an ASCII date");
            assert!(httpdate::parse_http_date(text).is_ok(), "{ctx}");
        }
        // Validators go on 2xx, 304 and 412 only.
        if !(status.is_success()
            || status == StatusCode::NOT_MODIFIED
            || status == StatusCode::PRECONDITION_FAILED)
        {
            assert!(emitted.is_none(), "validators on a {status}: {ctx}");
            assert!(!parts.headers.contains_key(header::LAST_MODIFIED), "{ctx}");
        }
        // A 304 the layer made (not the handler's own): reads only, and no content.
        if status == StatusCode::NOT_MODIFIED
            && !(ran && planned.status == StatusCode::NOT_MODIFIED)
        {
            assert!(read, "a write got 304: {ctx}");
            assert!(body.is_empty(), "a 304 with content: {ctx}");
            assert!(!parts.headers.contains_key(header::CONTENT_LENGTH), "{ctx}");
            assert!(
                !parts.headers.contains_key(header::CONTENT_ENCODING),
                "{ctx}"
            );
        }

        let pre = Preconditions::from_request(&method, &headers);
        let Ok(pre) = pre else {
            // A malformed If-Match (or If-None-Match on a write): 400 before anything.
            assert!(!ran, "{ctx}");
            assert_eq!(status, StatusCode::BAD_REQUEST, "{ctx}");
            assert!(is_problem(&parts.headers), "{ctx}");
            assert_eq!(before, after, "{ctx}");
            continue;
        };

        // An If-Match of exactly the stored strong tag, on a resource nothing changed
        // since, with no If-None-Match to fail: never 412.
        let names_current = match (&pre.if_match, &current) {
            (Some(tower_precondition::etag::TagList::Tags(tags)), Some(cur)) => {
                tags.len() == 1 && !tags[0].is_weak() && tags[0].strong_eq(cur)
            }
            _ => false,
        };
        let handler_moves_tag = read
            && handler_strong_tag(&planned)
                .is_some_and(|t| current.as_ref().is_none_or(|c| !t.strong_eq(c)));
        if names_current && pre.if_none_match.is_none() && !handler_moves_tag {
            // (The handler may answer 412 itself; the layer must not.)
            assert!(
                status != StatusCode::PRECONDITION_FAILED || from_handler,
                "If-Match the current tag: {ctx}"
            );
        }

        if write {
            let admitted = match policy {
                PreconditionPolicy::Optional => true,
                PreconditionPolicy::Required => pre.guards_write(),
                _ => pre.guards_write_strictly(),
            };
            if !admitted {
                assert!(!ran, "{ctx}");
                assert_eq!(status, StatusCode::PRECONDITION_REQUIRED, "{ctx}");
                assert!(is_problem(&parts.headers) && emitted.is_none(), "{ctx}");
                assert_eq!(before, after, "{ctx}");
                continue;
            }
            let decision = evaluate(&method, &pre, before.as_ref().and_then(Entry::version));
            assert_ne!(decision, Decision::NotModified, "{ctx}");
            if decision == Decision::PreconditionFailed {
                assert!(!ran, "the handler ran on a failed precondition: {ctx}");
                assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{ctx}");
                assert!(is_problem(&parts.headers), "{ctx}");
                assert_eq!(before, after, "a 412 changed the store: {ctx}");
                let expected = current
                    .as_ref()
                    .filter(|_| settings.validators_on_412)
                    .map(EntityTag::to_header_value);
                assert_eq!(parts.headers.get(header::ETAG), expected.as_ref(), "{ctx}");
                continue;
            }
            // Proceed: reserved, run, settled.
            assert!(ran && from_handler, "the handler did not run: {ctx}");
            assert_eq!(status, planned.status, "{ctx}");
            let reservation = reservation.expect("a write's handler sees its reservation");
            assert_eq!(reservation.key(), key, "{ctx}");
            assert_eq!(
                reservation.replacing(),
                before.as_ref().and_then(Entry::version),
                "{ctx}"
            );
            if before.is_none() {
                assert!(reservation.is_create(), "{ctx}");
            }
            if status.is_success() && method == Method::DELETE {
                assert_eq!(after, None, "a 2xx DELETE left an entry: {ctx}");
                assert!(emitted.is_none(), "{ctx}");
            } else if status.is_success() {
                let version = after
                    .as_ref()
                    .and_then(Entry::version)
                    .unwrap_or_else(|| panic!("a 2xx write committed nothing: {ctx}"));
                match handler_strong_tag(&planned) {
                    Some(tag) => assert!(version.etag().strong_eq(&tag), "{ctx}"),
                    None => {
                        if let Some(old) = &current {
                            assert!(
                                !version.etag().strong_eq(old),
                                "a commit kept the tag: {ctx}"
                            );
                        }
                    }
                }
                let expected = representation_tag(version, &planned);
                assert_eq!(emitted.map(Result::unwrap), expected, "{ctx}");
                assert!(parts.headers.contains_key(header::LAST_MODIFIED), "{ctx}");
            } else if status.is_client_error() {
                assert_eq!(
                    before.as_ref().and_then(Entry::version),
                    after.as_ref().and_then(Entry::version),
                    "a refused write changed the version: {ctx}"
                );
            } else {
                match (current_tag(&before), current_tag(&after)) {
                    (Some(old), Some(new)) => {
                        assert!(
                            !old.strong_eq(new),
                            "an unknown outcome kept the tag: {ctx}"
                        )
                    }
                    (None, None) => {}
                    _ => panic!("an unknown outcome changed existence: {ctx}"),
                }
            }
            assert_eq!(body, planned.body, "{ctx}");
            continue;
        }

        // A read.
        let known = before.as_ref().and_then(Entry::version);
        if !ran {
            let decision = evaluate(&method, &pre, known);
            assert!(
                settings.short_circuit_reads && known.is_some() && decision != Decision::Proceed,
                "a read's handler did not run: {ctx}"
            );
            assert_eq!(before, after, "{ctx}");
            let version = known.unwrap();
            match decision {
                Decision::NotModified => {
                    assert_eq!(status, StatusCode::NOT_MODIFIED, "{ctx}");
                    let tag = emitted.expect("the layer's own 304 has an ETag").unwrap();
                    assert!(tag.names_version(version.etag()), "{ctx}");
                }
                _ => {
                    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{ctx}");
                    assert!(is_problem(&parts.headers), "{ctx}");
                }
            }
            continue;
        }
        if !planned.status.is_success() {
            assert_eq!(status, planned.status, "{ctx}");
            assert!(from_handler, "{ctx}");
            assert_eq!(before, after, "a non-2xx read changed the store: {ctx}");
            continue;
        }
        let version = after
            .as_ref()
            .and_then(Entry::version)
            .unwrap_or_else(|| panic!("a 2xx read left no version: {ctx}"));
        match (known, handler_strong_tag(&planned)) {
            (_, Some(tag)) => assert!(version.etag().strong_eq(&tag), "{ctx}"),
            (Some(known), None) => assert_eq!(known, version, "{ctx}"),
            (None, None) => assert!(version.is_seeded(), "{ctx}"),
        }
        match evaluate(&method, &pre, Some(version)) {
            Decision::Proceed => {
                assert_eq!(status, planned.status, "{ctx}");
                let expected = representation_tag(version, &planned);
                assert_eq!(emitted.map(Result::unwrap), expected, "{ctx}");
                assert!(parts.headers.contains_key(header::LAST_MODIFIED), "{ctx}");
                assert_eq!(body, planned.body, "{ctx}");
            }
            Decision::NotModified => {
                assert_eq!(status, StatusCode::NOT_MODIFIED, "{ctx}");
                assert!(from_handler, "the handler's headers are kept: {ctx}");
                // No ETag when the handler's coding has no representation tag.
                if let Some(tag) = emitted {
                    assert!(tag.unwrap().names_version(version.etag()), "{ctx}");
                }
            }
            Decision::PreconditionFailed => {
                assert_eq!(status, StatusCode::PRECONDITION_FAILED, "{ctx}");
                assert!(is_problem(&parts.headers) && !from_handler, "{ctx}");
            }
        }
    }
});
