//! Finding 8.6, `require_precondition` is too easy to satisfy: under
//! `PreconditionPolicy::Strict` a write is let in only with `If-Match: <tags>` or
//! `If-None-Match: *`, through both layers (axum routers, request by request).

#[cfg(all(feature = "postgres", feature = "axum"))]
mod postgres_support;

use axum::{
    body::{to_bytes, Body},
    http::{header, Request, Response, StatusCode},
    routing::get,
    Router,
};
use tower::ServiceExt;
use tower_precondition::{MemoryStore, PreconditionLayer, PreconditionPolicy};

fn write(method: &str, path: &str, headers: &[(&str, &str)]) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(path);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Body::from("body")).expect("request")
}

async fn send(app: &Router, request: Request<Body>) -> Response<Body> {
    app.clone().oneshot(request).await.expect("infallible")
}

fn etag(response: &Response<Body>) -> String {
    response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .expect("an ETag")
        .to_owned()
}

async fn problem(response: Response<Body>) -> serde_json::Value {
    assert_eq!(
        response.headers()[header::CONTENT_TYPE],
        "application/problem+json"
    );
    let bytes = to_bytes(response.into_body(), 1 << 16).await.expect("body");
    serde_json::from_slice(&bytes).expect("json")
}

fn app(layer: PreconditionLayer) -> Router {
    Router::new()
        .route(
            "/items/{id}",
            get(|| async { "item" })
                .put(|| async { StatusCode::NO_CONTENT })
                .patch(|| async { StatusCode::NO_CONTENT })
                .delete(|| async { StatusCode::NO_CONTENT }),
        )
        .layer(layer)
}

fn strict() -> Router {
    app(PreconditionLayer::new(MemoryStore::new()).precondition_policy(PreconditionPolicy::Strict))
}

/// A date far in the future: `If-Unmodified-Since` holds for any version.
const FUTURE: &str = "Fri, 01 Jan 2100 00:00:00 GMT";

/// The preconditions the strict policy refuses, each of which can pass without the
/// client knowing the current version.
const WEAK_GUARDS: &[(&str, &str)] = &[
    ("if-none-match", "\"x\""),
    ("if-unmodified-since", FUTURE),
    ("if-match", "*"),
];

async fn refused_by_428(app: &Router, request: Request<Body>, what: &str) {
    let response = send(app, request).await;
    assert_eq!(
        response.status(),
        StatusCode::PRECONDITION_REQUIRED,
        "{what} must be refused"
    );
    let doc = problem(response).await;
    assert_eq!(doc["code"], "precondition_required");
    let detail = doc["detail"].as_str().expect("detail");
    assert!(detail.contains("If-Match: <its ETag>"), "{detail}");
    // Only a PUT is told about `If-None-Match: *` (http_fidelity checks each method).
    assert!(detail.contains("are not accepted"), "{detail}");
}

/// Creates `/items/1` (with `If-None-Match: *`) and returns its ETag.
async fn created(app: &Router) -> String {
    let response = send(app, write("PUT", "/items/1", &[("if-none-match", "*")])).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    etag(&response)
}

#[tokio::test]
async fn policy_strict_refuses_if_none_match_with_a_tag() {
    let app = strict();
    let current = created(&app).await;
    refused_by_428(
        &app,
        write("PUT", "/items/1", &[WEAK_GUARDS[0]]),
        "If-None-Match: \"x\"",
    )
    .await;
    // The version is untouched: the current ETag still works.
    let ok = send(&app, write("PUT", "/items/1", &[("if-match", &current)])).await;
    assert_eq!(ok.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn policy_strict_refuses_if_unmodified_since_in_the_future() {
    let app = strict();
    created(&app).await;
    refused_by_428(
        &app,
        write("PUT", "/items/1", &[WEAK_GUARDS[1]]),
        "a future date",
    )
    .await;
}

#[tokio::test]
async fn policy_strict_refuses_if_match_star() {
    let app = strict();
    created(&app).await;
    refused_by_428(
        &app,
        write("DELETE", "/items/1", &[WEAK_GUARDS[2]]),
        "If-Match: *",
    )
    .await;
}

#[tokio::test]
async fn policy_strict_refuses_unconditional_and_says_what_is_accepted() {
    let app = strict();
    let response = send(&app, write("PATCH", "/items/1", &[])).await;
    assert_eq!(response.status(), StatusCode::PRECONDITION_REQUIRED);
    let detail = problem(response).await["detail"]
        .as_str()
        .expect("detail")
        .to_owned();
    assert!(detail.contains("are not accepted"), "{detail}");
    assert!(detail.contains("`If-Match: *`"), "{detail}");
    assert!(detail.contains("If-Unmodified-Since"), "{detail}");
}

#[tokio::test]
async fn policy_strict_accepts_if_match_tags_and_if_none_match_star() {
    let app = strict();
    let first = created(&app).await;
    // A list of tags counts, and a stale one is evaluated (412), not refused (428).
    let listed = format!("\"other\", {first}");
    let updated = send(&app, write("PUT", "/items/1", &[("if-match", &listed)])).await;
    assert_eq!(updated.status(), StatusCode::NO_CONTENT);
    let stale = send(&app, write("PUT", "/items/1", &[("if-match", &first)])).await;
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    // With a strong If-Match, a weak guard alongside does not matter.
    let both = send(
        &app,
        write(
            "PUT",
            "/items/1",
            &[
                ("if-match", &etag(&updated)),
                ("if-unmodified-since", FUTURE),
            ],
        ),
    )
    .await;
    assert_eq!(both.status(), StatusCode::NO_CONTENT);
    // If-None-Match: * on an existing resource is evaluated: 412.
    let exists = send(&app, write("PUT", "/items/1", &[("if-none-match", "*")])).await;
    assert_eq!(exists.status(), StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn policy_strict_leaves_reads_alone() {
    let app = strict();
    let read = send(
        &app,
        Request::get("/items/1").body(Body::empty()).expect("req"),
    )
    .await;
    assert_eq!(read.status(), StatusCode::OK);
}

#[tokio::test]
async fn policy_required_is_the_shorthand_and_stays_lenient() {
    // `require_precondition(true)` is `Required`: any guard counts (the documented
    // weakness that `Strict` closes)...
    let app = app(PreconditionLayer::new(MemoryStore::new()).require_precondition(true));
    created(&app).await;
    for guard in &WEAK_GUARDS[..2] {
        let response = send(&app, write("PUT", "/items/1", &[*guard])).await;
        assert_ne!(
            response.status(),
            StatusCode::PRECONDITION_REQUIRED,
            "{guard:?}"
        );
    }
    // ...but an invalid If-Unmodified-Since is ignored (RFC 9110 13.1.4), so absent.
    let invalid = send(
        &app,
        write("PUT", "/items/1", &[("if-unmodified-since", "yesterday")]),
    )
    .await;
    assert_eq!(invalid.status(), StatusCode::PRECONDITION_REQUIRED);
    // `require_precondition(false)` after a policy resets it to Optional.
    let reset = app_with_reset();
    let response = send(&reset, write("PUT", "/items/1", &[])).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
}

fn app_with_reset() -> Router {
    app(PreconditionLayer::new(MemoryStore::new())
        .precondition_policy(PreconditionPolicy::Strict)
        .require_precondition(false))
}

#[tokio::test]
async fn policy_strict_invalid_if_unmodified_since_is_absent() {
    let app = strict();
    created(&app).await;
    refused_by_428(
        &app,
        write("PUT", "/items/1", &[("if-unmodified-since", "not a date")]),
        "an invalid date",
    )
    .await;
}

#[cfg(all(feature = "postgres", feature = "axum"))]
mod transactional {
    use axum::{http::StatusCode, routing::get, Router};
    use tower_precondition::{PgTransaction, PgTransactionalLayer, PreconditionPolicy};

    use super::{etag, refused_by_428, send, write, WEAK_GUARDS};
    use crate::postgres_support::{shared_pool, store};

    #[tokio::test]
    #[cfg_attr(not(tp_postgres), ignore = "set DATABASE_URL to run")]
    async fn policy_strict_transactional_layer() {
        let Some(pool) = shared_pool(2).await else {
            return;
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let table = format!("tp_policy_{}_{nanos:x}", std::process::id());
        let store = store(&pool, &table).await;
        let app = Router::new()
            .route(
                "/items/{id}",
                get(|| async { "item" }).put(|_tx: PgTransaction| async { StatusCode::NO_CONTENT }),
            )
            .layer(
                PgTransactionalLayer::new(store.clone())
                    .precondition_policy(PreconditionPolicy::Strict),
            );

        let result = async {
            refused_by_428(&app, write("PUT", "/items/1", &[]), "unconditional").await;
            let created = send(&app, write("PUT", "/items/1", &[("if-none-match", "*")])).await;
            assert_eq!(created.status(), StatusCode::NO_CONTENT);
            for guard in WEAK_GUARDS {
                refused_by_428(&app, write("PUT", "/items/1", &[*guard]), guard.0).await;
            }
            let updated = send(
                &app,
                write("PUT", "/items/1", &[("if-match", &etag(&created))]),
            )
            .await;
            assert_eq!(updated.status(), StatusCode::NO_CONTENT);
        };
        result.await;
        if let Ok(client) = pool.get().await {
            let _ = client
                .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
                .await;
        }
    }
}
