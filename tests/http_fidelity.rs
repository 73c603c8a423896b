//! Issue "HTTP fidelity": what a 304 says about its length (item 2), one strong ETag
//! per negotiated representation under compression (item 3), a malformed
//! `If-None-Match` on a read (item 4), and a `428` that fits its method (item 5).

#[path = "common/oneshot.rs"]
mod oneshot;

use axum::{
    http::{header, Method, StatusCode},
    response::IntoResponse,
    routing::get,
    Router,
};
use oneshot::send;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower_http::compression::CompressionLayer;
use tower_precondition::{MemoryStore, PreconditionLayer, PreconditionPolicy};

/// 25 bytes of text: the HEAD 200 must say so, a 304 must say nothing.
const BODY: &str = "twenty-five bytes of text";

/// A JSON document long enough for `CompressionLayer` to compress (32 bytes or more).
const JSON: &str =
    r#"{"name":"lamp","stock":3,"colour":"green","notes":"a long enough body to be worth gzip"}"#;

fn text_app(layer: PreconditionLayer) -> Router {
    Router::new()
        .route("/items/{id}", get(|| async { BODY }))
        .route_layer(layer)
}

/// Sends one raw HTTP/1.1 request and returns the status line and the header block.
async fn raw(addr: std::net::SocketAddr, request: &str) -> (String, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let head = reply
        .split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, head)
}

fn request(method: &str, etag: Option<&str>) -> String {
    let condition = etag.map_or(String::new(), |tag| format!("If-None-Match: {tag}\r\n"));
    format!("{method} /items/1 HTTP/1.1\r\nHost: test\r\n{condition}Connection: close\r\n\r\n")
}

fn etag_of(head: &str) -> String {
    head.lines()
        .find_map(|line| line.strip_prefix("etag: ").or(line.strip_prefix("ETag: ")))
        .expect("an ETag")
        .to_owned()
}

#[tokio::test]
async fn not_modified_has_no_content_length_over_a_socket() {
    // Handler-ran 304s (the default) and the layer's own (short-circuited reads).
    for short_circuit in [false, true] {
        let layer = PreconditionLayer::new(MemoryStore::new()).short_circuit_reads(short_circuit);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, text_app(layer)).await });

        let (status, head) = raw(addr, &request("HEAD", None)).await;
        assert!(status.contains(" 200 "), "{status}");
        assert!(
            head.to_ascii_lowercase().contains("\r\ncontent-length: 25"),
            "HEAD 200: {head}"
        );
        let etag = etag_of(&head);
        for method in ["GET", "HEAD"] {
            let (status, head) = raw(addr, &request(method, Some(&etag))).await;
            assert!(status.contains(" 304 "), "{method}: {status}");
            assert!(
                !head.to_ascii_lowercase().contains("content-length"),
                "{method} 304 (short circuit {short_circuit}) advertises a length: {head}"
            );
        }
        server.abort();
    }
}

/// The documented arrangement: compression inside the precondition layer.
fn compressed_app(layer: PreconditionLayer) -> Router {
    let item = || async { ([(header::CONTENT_TYPE, "application/json")], JSON).into_response() };
    Router::new()
        .route("/items/{id}", get(item).put(item))
        .route_layer(CompressionLayer::new())
        .route_layer(layer)
}

#[tokio::test]
async fn gzip_and_identity_representations_get_different_strong_etags() {
    let app = compressed_app(PreconditionLayer::new(MemoryStore::new()));
    let gzip = send(
        &app,
        Method::GET,
        "/items/1",
        &[("accept-encoding", "gzip")],
    )
    .await;
    let identity = send(&app, Method::GET, "/items/1", &[]).await;
    assert_eq!(gzip.status, StatusCode::OK);
    assert_eq!(identity.status, StatusCode::OK);
    assert_eq!(gzip.header("content-encoding"), Some("gzip"));
    assert_eq!(identity.header("content-encoding"), None);
    let (g, i) = (gzip.etag().expect("etag"), identity.etag().expect("etag"));
    assert!(!g.starts_with("W/") && !i.starts_with("W/"), "{g} {i}");
    assert_ne!(g, i, "one strong ETag for two representations");
}

#[tokio::test]
async fn revalidation_with_either_encoding_tag_is_304_with_vary() {
    for short_circuit in [false, true] {
        let app = compressed_app(
            PreconditionLayer::new(MemoryStore::new()).short_circuit_reads(short_circuit),
        );
        let gzip = send(
            &app,
            Method::GET,
            "/items/1",
            &[("accept-encoding", "gzip")],
        )
        .await;
        let identity = send(&app, Method::GET, "/items/1", &[]).await;
        let cases = [
            (gzip.etag().unwrap().to_owned(), "gzip"),
            (identity.etag().unwrap().to_owned(), "identity"),
        ];
        for (tag, accept) in &cases {
            // The layer's own 304 cannot know the Vary of a plain-tag representation.
            if short_circuit && *accept == "identity" {
                continue;
            }
            let r = send(
                &app,
                Method::GET,
                "/items/1",
                &[("accept-encoding", accept), ("if-none-match", tag)],
            )
            .await;
            assert_eq!(r.status, StatusCode::NOT_MODIFIED, "{accept} {tag}");
            assert_eq!(
                r.etag(),
                Some(tag.as_str()),
                "the 304 names the client's variant"
            );
            let vary = r.header("vary").unwrap_or_default().to_ascii_lowercase();
            assert!(vary.contains("accept-encoding"), "{accept}: vary {vary:?}");
            assert_eq!(r.header("content-encoding"), None, "a 304 has no content");
        }
        // A cache holding both variants lists both; the 304 picks one it holds.
        let both = format!("{}, {}", cases[0].0, cases[1].0);
        let r = send(
            &app,
            Method::GET,
            "/items/1",
            &[("accept-encoding", "gzip"), ("if-none-match", &both)],
        )
        .await;
        assert_eq!(r.status, StatusCode::NOT_MODIFIED);
        assert!(both.contains(r.etag().unwrap()));
    }
}

#[tokio::test]
async fn if_match_with_the_gzip_tag_names_the_version() {
    let app = compressed_app(PreconditionLayer::new(MemoryStore::new()));
    let gzip = send(
        &app,
        Method::GET,
        "/items/1",
        &[("accept-encoding", "gzip")],
    )
    .await;
    let old = gzip.etag().unwrap().to_owned();
    let put = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(put.status, StatusCode::OK, "{:?}", put.body);
    let again = send(&app, Method::PUT, "/items/1", &[("if-match", &old)]).await;
    assert_eq!(again.status, StatusCode::PRECONDITION_FAILED);
    // The identity form of the old version fails too, and the new one passes.
    let new = put.etag().unwrap().to_owned();
    let plain = send(&app, Method::PUT, "/items/1", &[("if-match", &new)]).await;
    assert_eq!(plain.status, StatusCode::OK);
    // A weak form never passes If-Match.
    let weak = format!("W/{}", plain.etag().unwrap());
    let r = send(&app, Method::PUT, "/items/1", &[("if-match", &weak)]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
}

#[tokio::test]
async fn malformed_if_none_match_on_a_read_is_ignored() {
    let app = text_app(PreconditionLayer::new(MemoryStore::new()));
    for method in [Method::GET, Method::HEAD] {
        for bad in [r#"""""#, ",", "nope", r#"*, "a""#] {
            let r = send(&app, method.clone(), "/items/1", &[("if-none-match", bad)]).await;
            assert_eq!(r.status, StatusCode::OK, "{method} If-None-Match: {bad}");
            assert!(
                r.etag().is_some(),
                "served as if absent, validators and all"
            );
        }
    }
    // A write still gets the clear client error.
    let app = Router::new()
        .route("/items/{id}", get(|| async { BODY }).put(|| async { BODY }))
        .route_layer(PreconditionLayer::new(MemoryStore::new()));
    let r = send(&app, Method::PUT, "/items/1", &[("if-none-match", "nope")]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "malformed_precondition");
}

#[tokio::test]
async fn precondition_required_detail_fits_the_method() {
    for policy in [PreconditionPolicy::Required, PreconditionPolicy::Strict] {
        let app = Router::new()
            .route(
                "/items/{id}",
                get(|| async { BODY })
                    .put(|| async { BODY })
                    .patch(|| async { BODY })
                    .post(|| async { BODY })
                    .delete(|| async { StatusCode::NO_CONTENT }),
            )
            .route_layer(
                PreconditionLayer::new(MemoryStore::new())
                    .write_methods([Method::PUT, Method::PATCH, Method::POST, Method::DELETE])
                    .precondition_policy(policy),
            );
        for (method, create) in [
            (Method::DELETE, false),
            (Method::PUT, true),
            (Method::PATCH, false),
            (Method::POST, false),
        ] {
            let r = send(&app, method.clone(), "/items/1", &[]).await;
            assert_eq!(r.status, StatusCode::PRECONDITION_REQUIRED);
            let doc = r.problem();
            let detail = doc["detail"].as_str().unwrap();
            assert!(
                detail.contains("If-Match: <its ETag>"),
                "{method}: {detail}"
            );
            assert_eq!(
                detail.contains("If-None-Match: *` to create"),
                create,
                "{method} {policy:?}: {detail}"
            );
            if policy == PreconditionPolicy::Strict {
                assert!(!detail.contains("these two"), "{method}: {detail}");
                assert!(detail.contains("If-Unmodified-Since"), "{method}: {detail}");
            }
        }
    }
}
