//! Finding 7.1, aliased keys: over real HTTP (an axum server on a local port, a hyper
//! client), every spelling of one resource's URL must share one version.
//!
//! The app's handlers use what axum gives them (`Path` percent-decodes), so `/items/1`,
//! `/items/%31` are one item; `/files/{*path}` resolves dot segments like a file server,
//! so `/files/./1` and `/files/a/../1` are the file `/files/1`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{MatchedPath, OriginalUri, Path, State},
    http::{header, HeaderName, Method, StatusCode},
    routing::get,
    Router,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::TokioExecutor,
};
use tower_precondition::{key, store::AtomicVersionStore, MemoryStore, PreconditionLayer};

// ---------------------------------------------------------------------------------
// The app and the client
// ---------------------------------------------------------------------------------

type Data = Arc<Mutex<HashMap<String, String>>>;

async fn read_item(State(data): State<Data>, Path(id): Path<String>) -> Result<String, StatusCode> {
    let data = data.lock().map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    data.get(&id).cloned().ok_or(StatusCode::NOT_FOUND)
}

async fn write_item(State(data): State<Data>, Path(id): Path<String>, body: String) -> StatusCode {
    let Ok(mut data) = data.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR;
    };
    match data.insert(id, body) {
        Some(_) => StatusCode::NO_CONTENT,
        None => StatusCode::CREATED,
    }
}

/// What a file server does with `..` and `.`: resolve them (a `..` above the root stays
/// at the root).
fn resolve(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for segment in path.split('/') {
        match segment {
            "." | "" => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    out.join("/")
}

async fn read_file(
    State(data): State<Data>,
    Path(path): Path<String>,
) -> Result<String, StatusCode> {
    read_item(State(data), Path(resolve(&path))).await
}

async fn write_file(
    State(data): State<Data>,
    Path(path): Path<String>,
    body: String,
) -> StatusCode {
    write_item(State(data), Path(resolve(&path)), body).await
}

fn items() -> Router {
    Router::new()
        .route("/items/{id}", get(read_item).put(write_item))
        .route("/files/{*path}", get(read_file).put(write_file))
        .with_state(Data::default())
}

/// Serves `app` on a free local port; the server task ends with the test's runtime.
async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            addr,
        }
    }

    /// Sends `method path` as written (no client-side normalization: `http::Uri` keeps
    /// `%31`, `.` and `..`).
    async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(HeaderName, &str)],
        body: &str,
    ) -> (StatusCode, Option<String>) {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let response = self.client.request(request).await.expect("exchange");
        let status = response.status();
        let etag = response
            .headers()
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let _ = response.into_body().collect().await.expect("body");
        (status, etag)
    }

    async fn get(&self, path: &str) -> (StatusCode, Option<String>) {
        self.send(Method::GET, path, &[], "").await
    }

    async fn put_if_match(&self, path: &str, etag: &str, body: &str) -> StatusCode {
        self.send(Method::PUT, path, &[(header::IF_MATCH, etag)], body)
            .await
            .0
    }

    /// Creates `path` (unconditionally) and returns its ETag as read back.
    async fn create(&self, path: &str, body: &str) -> String {
        let (status, _) = self.send(Method::PUT, path, &[], body).await;
        assert!(status.is_success(), "create {path}: {status}");
        let (status, etag) = self.get(path).await;
        assert_eq!(status, StatusCode::OK, "read {path}");
        etag.expect("a read of a versioned resource has an ETag")
    }
}

async fn default_app() -> Http {
    Http::new(serve(items().layer(PreconditionLayer::new(MemoryStore::new()))).await)
}

/// Reads every alias, then writes with each alias's own ETag: one writer only wins.
async fn aliases_share_one_version(http: &Http, canonical: &str, aliases: &[&str]) {
    let first = http.create(canonical, "v1").await;
    for alias in aliases {
        let (status, etag) = http.get(alias).await;
        assert_eq!(status, StatusCode::OK, "GET {alias}");
        assert_eq!(
            etag.as_deref(),
            Some(&*first),
            "GET {alias}: the ETag of {canonical}"
        );
    }
    // A write through one spelling invalidates the ETag every other spelling handed out.
    let (writer, rest) = aliases.split_first().expect("aliases");
    assert!(
        http.put_if_match(writer, &first, "v2").await.is_success(),
        "PUT {writer} with the current ETag"
    );
    for alias in rest.iter().chain([&canonical]) {
        assert_eq!(
            http.put_if_match(alias, &first, "lost").await,
            StatusCode::PRECONDITION_FAILED,
            "PUT {alias} with the ETag the write through {writer} replaced"
        );
    }
}

// ---------------------------------------------------------------------------------
// The default key
// ---------------------------------------------------------------------------------

#[tokio::test]
async fn alias_percent_encoded_digit_shares_one_version() {
    let http = default_app().await;
    aliases_share_one_version(&http, "/items/1", &["/items/%31"]).await;
}

#[tokio::test]
async fn alias_two_writers_each_with_own_etag_only_one_wins() {
    let http = default_app().await;
    http.create("/items/7", "v1").await;
    let (_, a) = http.get("/items/7").await;
    let (_, b) = http.get("/items/%37").await;
    let (a, b) = (a.expect("etag"), b.expect("etag"));
    let first = http.put_if_match("/items/7", &a, "from A").await;
    let second = http.put_if_match("/items/%37", &b, "from B").await;
    assert!(first.is_success(), "the first writer wins: {first}");
    assert_eq!(
        second,
        StatusCode::PRECONDITION_FAILED,
        "the second writer, whose ETag was for the same item, must lose"
    );
}

#[tokio::test]
async fn alias_dot_segments_share_one_version() {
    let http = default_app().await;
    aliases_share_one_version(
        &http,
        "/files/1",
        &[
            "/files/./1",
            "/files/a/../1",
            "/files/%2e/1",
            "/files/a/%2E%2E/1",
        ],
    )
    .await;
}

#[tokio::test]
async fn alias_tilde_and_percent_7e_share_one_version() {
    let http = default_app().await;
    aliases_share_one_version(&http, "/items/~x", &["/items/%7ex", "/items/%7Ex"]).await;
}

#[tokio::test]
async fn alias_lowercase_hex_of_reserved_shares_one_version() {
    // `%2f` and `%2F` both decode to `/` in the handler's `Path`.
    let http = default_app().await;
    aliases_share_one_version(&http, "/items/a%2Fb", &["/items/a%2fb"]).await;
}

#[tokio::test]
async fn alias_empty_segment_and_trailing_slash_stay_distinct() {
    // Documented: not merged (axum routes them differently; here they are 404s).
    let store = Arc::new(MemoryStore::new());
    let layer = PreconditionLayer::from_arc(store.clone());
    let http = Http::new(serve(items().layer(layer)).await);
    http.create("/items/1", "v1").await;
    assert_eq!(http.get("/items/1/").await.0, StatusCode::NOT_FOUND);
    assert!(store.load("/items/1/").await.expect("load").is_none());
    assert!(store.load("/items/1").await.expect("load").is_some());
}

// ---------------------------------------------------------------------------------
// The documented key functions
// ---------------------------------------------------------------------------------

/// The `key` module's `Router::nest` example.
fn original_uri_key(parts: &http::request::Parts) -> Option<String> {
    let path = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(parts.uri.path(), |original| original.0.path());
    Some(key::canonical_path(path).into_owned())
}

#[tokio::test]
async fn alias_nested_routers_keyed_by_original_uri_stay_apart() {
    // One store shared by two nested copies of the same router: with the stripped path
    // as key, `/a/items/1` and `/b/items/1` would be one resource.
    let store: Arc<dyn AtomicVersionStore> = Arc::new(MemoryStore::new());
    let layer = PreconditionLayer::from_arc(store).key_fn(original_uri_key);
    let app = Router::new()
        .nest("/a", items().layer(layer.clone()))
        .nest("/b", items().layer(layer));
    let http = Http::new(serve(app).await);

    let a = http.create("/a/items/1", "a1").await;
    let b = http.create("/b/items/1", "b1").await;
    assert!(http.put_if_match("/a/items/1", &a, "a2").await.is_success());
    assert!(
        http.put_if_match("/b/items/1", &b, "b2").await.is_success(),
        "a write under /a must not invalidate /b's ETag"
    );
    // Aliases within one nested router still share a version.
    aliases_share_one_version(&http, "/a/items/2", &["/a/items/%32"]).await;
}

#[tokio::test]
async fn alias_nested_routers_default_key_is_the_stripped_path() {
    // What the docs warn about: without the `OriginalUri` key, nested routers share keys.
    let store: Arc<dyn AtomicVersionStore> = Arc::new(MemoryStore::new());
    let layer = PreconditionLayer::from_arc(store);
    let app = Router::new()
        .nest("/a", items().layer(layer.clone()))
        .nest("/b", items().layer(layer));
    let http = Http::new(serve(app).await);
    let a = http.create("/a/items/1", "a1").await;
    // A write of another item, under /b...
    let (status, _) = http.send(Method::PUT, "/b/items/1", &[], "b1").await;
    assert!(status.is_success());
    // ...changed the version /a's ETag was checked against.
    assert_eq!(
        http.put_if_match("/a/items/1", &a, "a2").await,
        StatusCode::PRECONDITION_FAILED,
        "the shared key saw /b's write"
    );
}

#[tokio::test]
async fn alias_route_key_merges_decoded_parameters() {
    // `a+b` and `a%2Bb` are the same `Path` value, though RFC 3986 keeps `%2B` apart.
    let layer = PreconditionLayer::new(MemoryStore::new()).key_fn(|parts| {
        let path = parts
            .extensions
            .get::<OriginalUri>()
            .map_or(parts.uri.path(), |original| original.0.path());
        Some(match parts.extensions.get::<MatchedPath>() {
            Some(route) => key::route_key(route.as_str(), path),
            None => key::canonical_path(path).into_owned(),
        })
    });
    let app = Router::new()
        .route("/items/{id}", get(read_item).put(write_item))
        .with_state(Data::default())
        .route_layer(layer);
    let http = Http::new(serve(Router::new().nest("/api", app)).await);
    aliases_share_one_version(
        &http,
        "/api/items/a+b",
        &["/api/items/a%2Bb", "/api/items/a%2bb"],
    )
    .await;
}
