//! HTTP conditional requests (RFC 9110 section 13) for [Tower](https://docs.rs/tower)
//! services, with the precondition check and the write made **one atomic
//! compare-and-set**, so that no update is ever lost.
//!
//! # The bug this prevents
//!
//! Two clients GET `/items/1` and both receive `ETag: "a"`. Both PUT with
//! `If-Match: "a"`. A server that compares the tag and then writes, in two steps, lets
//! both pass: one update silently overwrites the other. [`PreconditionLayer`] evaluates
//! the preconditions and reserves the resource in one compare-and-set in an
//! [`AtomicVersionStore`], runs the handler, then commits the new version: of N
//! concurrent writes carrying the same `If-Match`, at most one succeeds; the others get
//! `412 Precondition Failed` (with the current `ETag`) or `409 Conflict` while the
//! winner is still in flight.
//!
//! # Example
//!
//! ```
//! use axum::{body::Body, http::{header, Request, StatusCode}, routing::get, Router};
//! use tower::ServiceExt;
//! use tower_precondition::{MemoryStore, PreconditionLayer};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let app = Router::new()
//!     .route("/items/{id}", get(|| async { "v1" }).put(|| async { StatusCode::NO_CONTENT }))
//!     .layer(PreconditionLayer::new(MemoryStore::new()));
//!
//! // A read gets an ETag.
//! let read = app.clone().oneshot(Request::get("/items/1").body(Body::empty()).unwrap()).await.unwrap();
//! let etag = read.headers()[header::ETAG].clone();
//!
//! // Two writes with that ETag: the first wins...
//! let put = || Request::put("/items/1").header(header::IF_MATCH, etag.clone()).body(Body::empty()).unwrap();
//! let first = app.clone().oneshot(put()).await.unwrap();
//! assert_eq!(first.status(), StatusCode::NO_CONTENT);
//!
//! // ...and the second, based on the same stale version, is refused.
//! let second = app.clone().oneshot(put()).await.unwrap();
//! assert_eq!(second.status(), StatusCode::PRECONDITION_FAILED);
//! assert_eq!(second.headers()[header::ETAG], first.headers()[header::ETAG]);
//! # }
//! ```
//!
//! # Three ways to guard a write
//!
//! Choose by where the data lives; all three share the RFC side (parsing, evaluation
//! order, `304` / `400` / `412` / `428` and their problem bodies).
//!
//! | mode | who performs the compare-and-set | for | round trips per write |
//! | --- | --- | --- | --- |
//! | [row version](row_version) ([`RowVersionLayer`](row_version::RowVersionLayer)) | the application's own write statement (`UPDATE ... WHERE id = $1 AND version = ANY($2)`), built with the crate's SQL fragments | data in Postgres (sqlx or tokio-postgres), MariaDB or SQLite (sqlx) whose rows can carry a version | one statement |
//! | [transactional] (`PgTransactionalLayer`, feature `postgres`) | the layer, inside the transaction it hands the handler | data in the same Postgres, handlers that stay unconditional | one transaction |
//! | store ([`PreconditionLayer`]) | an [`AtomicVersionStore`] (memory, Redis, Postgres, yours), around the handler | data anywhere | reserve, settle (a load first when the layer has not seen the entry, or a guess fails) |
//!
//! The rest of this page is about the store mode; the [`row_version`] module shows the
//! fastest one.
//!
//! # How a write works: reserve, run, settle
//!
//! 0. **Decide access, read the body.** An [`authorize`](PreconditionLayer::authorize)
//!    check, if set, runs first (RFC 9110 section 13.2.1); the body is then read in full
//!    ([`RequestBodyConfig`]), so a stalled or cut-off upload holds and changes nothing.
//! 1. **Reserve.** The preconditions are evaluated against the resource's current entry
//!    and, in the same compare-and-set, a lease (a random token and an expiry on the
//!    *store's* clock) is put on it. A write that finds a live lease gets `409`; a
//!    failed precondition gets `412`. The compare-and-set expects the entry this
//!    layer last saw for the key (a bounded cache; [`PreconditionLayer::entry_cache`]),
//!    which saves loading it first: a right guess is confirmed by the compare-and-set
//!    applying, a wrong one answers with the real entry, and a guess that would refuse
//!    the write is checked by a load before any `412` or `409`.
//! 2. **Run** the handler, which finds a [`Reservation`] in the request extensions.
//! 3. **Settle** with one compare-and-set that must still find our lease: a `2xx`
//!    commits a new version (the handler's strong `ETag` if it set one), a `4xx`
//!    releases the lease and keeps the old version, and anything else — a `5xx`, an
//!    error, a missed deadline, a client that disconnected — is an unknown outcome: a
//!    resource that had a version gets a *fresh* one, so every old `ETag` fails from
//!    then on (one that had none is left with none). A write whose lease was taken
//!    over before it settled gets `503`, never a plain `2xx`. Validators go on `2xx`
//!    responses only.
//!
//! Reads run the handler first; its `2xx` gets `ETag` / `Last-Modified`, or becomes
//! the `304` when `If-None-Match` / `If-Modified-Since` match. No read removes a
//! version a write committed. A store that cannot be reached fails writes closed
//! (`503` with `Retry-After`); reads are then served without validators.
//!
//! The layer needs a Tokio runtime with the time driver (for its deadlines).
//!
//! # One resource, one key
//!
//! Writes are versioned per resource *key*. The default key is the canonical request
//! path ([`key::canonical_path`], RFC 3986 section 6.2.2), so `/items/1`, `/items/%31`
//! and `/items/./1` share one version; keys longer than [`key::MAX_KEY_LEN`] bytes are
//! stored as a fixed-size SHA-256 digest form ([`key::bounded_key`]). Under axum's
//! `Router::nest`, or when handlers decode reserved characters, key by what the
//! handler uses: see the [`key`] module.
//!
//! # Compression and content negotiation
//!
//! Put compression **inside** the precondition layer (closer to the handler), so the
//! layer sees each response's `Content-Encoding`:
//!
//! ```
//! use axum::{routing::get, Router};
//! use tower_http::compression::CompressionLayer;
//! use tower_precondition::{MemoryStore, PreconditionLayer};
//!
//! let app: Router = Router::new()
//!     .route("/items/{id}", get(|| async { "{}" }))
//!     .route_layer(CompressionLayer::new()) // inner: runs first on the response
//!     .route_layer(PreconditionLayer::new(MemoryStore::new())); // outer
//! ```
//!
//! The gzip body of a version is then tagged `"<version>-gzip"` and the identity body
//! `"<version>"`: two representations, two strong tags (RFC 9110 section 8.8.3). Both
//! name the same version in `If-Match` and `If-None-Match`, so a write after a gzip
//! read passes or fails exactly as after an identity read, and a `304` carries the
//! tag the client sent and `Vary: Accept-Encoding` (see [`etag`]). With compression
//! *outside*, the layer never sees the coding and both bodies get one strong tag.
//!
//! The layer versions a resource, not its representations: negotiation by anything
//! other than the content coding (`Accept-Language`, `Accept`) is not told apart, so
//! serve such variants at URIs of their own or let the handler set `ETag`s that
//! differ per variant and key them apart. With
//! [`short_circuit_reads`](PreconditionLayer::short_circuit_reads) on, a `304` for an
//! identity tag is answered without the handler and cannot repeat its `Vary`.
//!
//! # Policies
//!
//! [`PreconditionPolicy`] decides whether a write must be conditional:
//! [`Strict`](PreconditionPolicy::Strict) lets in only `If-Match: "<etag>"` and
//! `If-None-Match: *`, so no accepted write can overwrite a version its client has
//! not seen.
//!
//! # Status codes the layer writes
//!
//! | code | when |
//! | --- | --- |
//! | 304 | a read whose `If-None-Match` / `If-Modified-Since` matches (the handler's `2xx` headers, without its body) |
//! | 400 | a malformed `If-Match`, or `If-None-Match` on a write (a read ignores it); a buffered write body that failed or ended short of its `Content-Length` ([`request_body`]) |
//! | 408 | a buffered write body not in hand within the read timeout ([`request_body`]) |
//! | 409 | a write while another write on the same resource is in flight |
//! | 412 | a precondition evaluated false (with the current `ETag` and `Last-Modified`) |
//! | 413 | a buffered write body over the size limit ([`request_body`]) |
//! | 428 | the [`PreconditionPolicy`] requires a precondition and a write has none it accepts |
//! | 503 | the version store failed or timed out, a handler missed its deadline, or a write's lease was taken over before it settled |
//!
//! Every body the layer writes is `application/problem+json` (RFC 9457).
//!
//! # Feature flags
//!
//! | feature | what it adds |
//! | --- | --- |
//! | `memory` (default) | [`MemoryStore`] |
//! | `redis` | `store::RedisStore`, shared by many processes through Redis |
//! | `postgres` | `store::PostgresStore`, the transactional mode, and the row-version helpers for tokio-postgres (`row_version::tokio_postgres`) |
//! | `sqlite` | `store::SqliteStore`, versions in an SQLite file shared by the processes of one host |
//! | `sqlx-postgres` | the row-version helpers for sqlx 0.8 on Postgres (`row_version::sqlx`) |
//! | `sqlx-mysql` | the row-version mode on MariaDB / MySQL through sqlx 0.8 (`row_version::MySqlRowSql`) |
//! | `sqlx-sqlite` | the row-version mode on SQLite through sqlx 0.8 (`row_version::SqliteRowSql`) |
//! | `axum` (default) | axum's body as a request body the layer can buffer ([`BufferableBody`]), and axum extractors |
//! | `testing` | `store::testing`, the contract suite any store can run |

#![cfg_attr(docsrs, feature(doc_cfg))]
#![deny(missing_docs, unreachable_pub, unsafe_code)]
#![warn(rust_2018_idioms, missing_debug_implementations)]

mod access;
mod admission;
mod body;
mod clock;
mod entry_cache;
pub mod etag;
pub mod evaluate;
mod fresh;
mod future;
pub mod key;
mod layer;
mod protocol;
pub mod request_body;
mod response;
pub mod row_version;
mod service;
pub mod store;
mod sync;
#[cfg(feature = "postgres")]
pub mod transactional;

pub use crate::{
    admission::PreconditionPolicy,
    body::ResponseBody,
    etag::EntityTag,
    future::ResponseFuture,
    layer::PreconditionLayer,
    protocol::Reservation,
    request_body::{BufferableBody, RequestBodyConfig},
    service::PreconditionService,
    store::{AtomicVersionStore, Entry, StoreError, Version},
};

#[cfg(feature = "memory")]
pub use crate::store::MemoryStore;

#[cfg(feature = "postgres")]
pub use crate::transactional::{PgTransaction, PgTransactionalLayer};

// The README's Rust snippets are compiled and run as doctests, so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
