//! Your own version store: implement [`AtomicVersionStore`] for your backend, prove it
//! with the contract suite, then put it behind the layer.
//!
//! ```text
//! cargo run --example custom_store --features testing
//! ```
//!
//! The backend here stands for a key-value database that stores **strings** (most
//! do): each [`Entry`] is encoded to one canonical line of text, and the store keeps
//! lines in a `BTreeMap` behind a `tokio::sync::RwLock`. Replace the map with your
//! database's conditional write (`UPDATE ... WHERE value = $expected`, a
//! `WATCH`/`MULTI`, a compare-and-swap API) and keep the rest.
//!
//! The contract, in three rules (see `tower_precondition::store`):
//!
//! 1. **Exact, whole-entry compare.** `compare_and_set(key, expected, new)` applies only
//!    if the stored entry is exactly `expected` (version *and* lease: tag, date,
//!    ambiguity flag, token, expiry) or absent when `expected` is `None`, atomically
//!    with respect to every other call on the key. `new == None` removes the entry.
//! 2. **A mismatch returns what was found**, so the layer never needs a second read.
//! 3. **A replay is `Applied`.** If the stored entry already equals `new`, answer
//!    `Applied`: your client library may have re-sent a command that had already run.
//!
//! Errors (backend down, garbage data) are [`StoreError`]s; the layer then answers
//! writes `503` and never lets them through.

use std::{collections::BTreeMap, process::ExitCode, sync::Arc};

use axum::{
    body::Body,
    http::{header, Request, StatusCode},
    routing::get,
    Router,
};
use tokio::sync::RwLock;
use tower::ServiceExt;
use tower_precondition::{
    store::{
        testing::run_contract_suite, AtomicVersionStore, CasOutcome, Entry, Lease, LeaseToken,
        StoreError, Version,
    },
    EntityTag, PreconditionLayer,
};

/// The user's backend: string values by key.
struct StringKvStore {
    rows: RwLock<BTreeMap<String, String>>,
    started: std::time::Instant,
}

impl Default for StringKvStore {
    fn default() -> Self {
        Self {
            rows: RwLock::default(),
            started: std::time::Instant::now(),
        }
    }
}

/// Encodes an entry as one line: `<token> <expiry> <secs> <ambiguous> <seeded> "<tag>"`, with `-`
/// for an absent lease or version.
///
/// The encoding is canonical (one entry, one string), so comparing the stored string
/// with the encoded `expected` is the exact whole-entry comparison the contract asks
/// for. The tag comes last because it is the only field that may contain any
/// printable character (never a space or a double quote, though).
fn encode(entry: &Entry) -> String {
    let lease = match entry.lease() {
        Some(lease) => format!("{} {}", lease.token(), lease.expires_at_millis()),
        None => "- -".to_owned(),
    };
    let version = match entry.version() {
        Some(v) => format!(
            "{} {} {} \"{}\"",
            v.last_modified_secs(),
            u8::from(v.last_modified_ambiguous()),
            u8::from(v.is_seeded()),
            v.etag().opaque()
        ),
        None => "- - - -".to_owned(),
    };
    format!("{lease} {version}")
}

/// The inverse of [`encode`]. Anything else is a [`StoreError::corrupt`]: the layer
/// must never act on an entry it cannot read exactly.
fn decode(line: &str) -> Result<Entry, StoreError> {
    let corrupt = || StoreError::corrupt(format!("not an encoded entry: {line:?}"));
    let mut fields = line.splitn(6, ' ');
    let mut next = || fields.next().ok_or_else(corrupt);
    let (token, expiry, secs, ambiguous, seeded, tag) =
        (next()?, next()?, next()?, next()?, next()?, next()?);
    let flag = |field: &str| match field {
        "0" => Ok(false),
        "1" => Ok(true),
        _ => Err(corrupt()),
    };

    let lease = match (token, expiry) {
        ("-", "-") => None,
        (token, expiry) => Some(Lease::from_parts(
            LeaseToken::parse_hex(token).ok_or_else(corrupt)?,
            expiry.parse().map_err(|_| corrupt())?,
        )),
    };
    let version = match (secs, ambiguous, seeded, tag) {
        ("-", "-", "-", "-") => None,
        (secs, ambiguous, seeded, tag) => {
            let opaque = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .ok_or_else(corrupt)?;
            let etag = EntityTag::strong(opaque).map_err(|_| corrupt())?;
            Some(
                Version::from_parts(etag, secs.parse().map_err(|_| corrupt())?, flag(ambiguous)?)
                    .ok_or_else(corrupt)?
                    .with_seeded(flag(seeded)?),
            )
        }
    };
    Entry::from_parts(version, lease).ok_or_else(corrupt)
}

#[async_trait::async_trait]
impl AtomicVersionStore for StringKvStore {
    async fn load(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let rows = self.rows.read().await;
        rows.get(key).map(|line| decode(line)).transpose()
    }

    async fn compare_and_set(
        &self,
        key: &str,
        expected: Option<&Entry>,
        new: Option<&Entry>,
    ) -> Result<CasOutcome, StoreError> {
        // One write lock around compare and set: that is what makes it atomic. (In a
        // database this is one conditional statement, not a read followed by a write.)
        let mut rows = self.rows.write().await;
        let stored = rows.get(key);
        let matches = match (stored, expected) {
            (None, None) => true,
            (Some(line), Some(expected)) => *line == encode(expected),
            _ => false,
        };
        if matches {
            match new {
                Some(entry) => {
                    rows.insert(key.to_owned(), encode(entry));
                }
                None => {
                    rows.remove(key);
                }
            }
            return Ok(CasOutcome::Applied);
        }
        // Rule 2 and 3: tell the caller what is there, unless it is already `new`
        // (a replay of a write that went through), which counts as applied.
        let current = stored.map(|line| decode(line)).transpose()?;
        Ok(CasOutcome::mismatch_or_replay(current, new))
    }

    async fn clock_millis(&self) -> Result<u64, StoreError> {
        // Leases are judged by this clock. One process: its monotonic clock will do
        // (a store shared by processes answers with the server's clock instead).
        Ok(1 + u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1))
    }
}

async fn run() -> Result<(), String> {
    let store = Arc::new(StringKvStore::default());

    // 1. The contract suite: the same checks the crate's own backends pass. It panics
    //    with the rule that broke; in your crate, call it from a `#[tokio::test]`.
    println!("running the store contract suite against StringKvStore...");
    run_contract_suite(store.clone(), "custom-store-example").await;
    println!("contract suite passed");

    // 2. The store behind the layer, serving an API.
    let app = Router::new()
        .route(
            "/notes/{id}",
            get(|| async { "a note" }).put(|| async { StatusCode::NO_CONTENT }),
        )
        .layer(PreconditionLayer::from_arc(store.clone()));
    let send = |request: Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(request).await.map_err(|e| e.to_string()) }
    };
    let request = |if_match: &str| {
        Request::put("/notes/1")
            .header(header::IF_MATCH, if_match)
            .body(Body::empty())
            .map_err(|e| e.to_string())
    };

    let read = send(
        Request::get("/notes/1")
            .body(Body::empty())
            .map_err(|e| e.to_string())?,
    )
    .await?;
    let etag = read
        .headers()
        .get(header::ETAG)
        .cloned()
        .ok_or("a read gets an ETag")?;
    let etag = etag.to_str().map_err(|e| e.to_string())?.to_owned();
    println!("GET /notes/1 → {}   ETag: {etag}", read.status());

    let first = send(request(&etag)?).await?;
    println!("PUT /notes/1 If-Match: {etag} → {}", first.status());
    let second = send(request(&etag)?).await?;
    println!("PUT /notes/1 If-Match: {etag} → {}", second.status());
    if first.status() != StatusCode::NO_CONTENT
        || second.status() != StatusCode::PRECONDITION_FAILED
    {
        return Err("expected 204 then 412".into());
    }

    let stored = store
        .rows
        .read()
        .await
        .get("/notes/1")
        .cloned()
        .unwrap_or_default();
    println!("stored in the backend: /notes/1 = {stored}");
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("custom_store failed: {message}");
            ExitCode::FAILURE
        }
    }
}
