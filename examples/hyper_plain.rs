//! The layer on a plain hyper 1 server, no framework: a `tower::ServiceBuilder` around a
//! `service_fn`, served through hyper-util's `TowerToHyperService`.
//!
//! **By default it only runs a self-check against itself and exits; set `SERVE=1` to
//! keep it serving.**
//!
//! ```text
//! cargo run --example hyper_plain            # runs a short self-check against itself, exits 0
//! SERVE=1 cargo run --example hyper_plain    # serves on $ADDR (default 127.0.0.1:3000)
//! ```
//!
//! The service is a tiny text document store under `/docs/{name}`: `GET` (200 / 404),
//! `PUT` (201 created / 204 replaced) and `DELETE` (204 / 404). The layer adds `ETag`
//! and `Last-Modified`, answers `304`, and refuses stale writes with `412`.
//!
//! ```text
//! curl -i -X PUT localhost:3000/docs/readme -d 'hello'
//! curl -i localhost:3000/docs/readme
//! curl -i -X PUT localhost:3000/docs/readme -H 'If-Match: "<etag>"' -d 'hello, world'
//! ```

use std::{
    collections::HashMap,
    convert::Infallible,
    env,
    error::Error,
    net::SocketAddr,
    process::ExitCode,
    sync::{Arc, Mutex, PoisonError},
};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tower::ServiceBuilder;
use tower_precondition::{MemoryStore, PreconditionLayer};

/// The documents, by name.
type Docs = Arc<Mutex<HashMap<String, Bytes>>>;

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

/// The whole application: no routing library, just a match.
async fn handle(
    docs: Docs,
    request: Request<BoxBody<Bytes, hyper::Error>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let Some(name) = request
        .uri()
        .path()
        .strip_prefix("/docs/")
        .map(str::to_owned)
    else {
        return Ok(text(StatusCode::NOT_FOUND, "not found\n"));
    };
    let method = request.method().clone();
    let response = match method {
        Method::GET | Method::HEAD => {
            let doc = docs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(&name)
                .cloned();
            match doc {
                Some(doc) => {
                    let mut response = Response::new(Full::new(doc));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                    response
                }
                None => text(StatusCode::NOT_FOUND, "no such document\n"),
            }
        }
        Method::PUT => {
            let body = match request.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "could not read the body\n")),
            };
            let mut docs = docs.lock().unwrap_or_else(PoisonError::into_inner);
            // (A write the layer let through also carries a `Reservation` in
            // `request.extensions()`: the key, and the version it replaces.)
            if docs.insert(name, body).is_some() {
                text(StatusCode::NO_CONTENT, "")
            } else {
                text(StatusCode::CREATED, "")
            }
        }
        Method::DELETE => match docs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&name)
        {
            Some(_) => text(StatusCode::NO_CONTENT, ""),
            None => text(StatusCode::NOT_FOUND, "no such document\n"),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
    };
    Ok(response)
}

/// Accepts connections forever, each served by hyper with the layered tower service.
async fn serve(listener: TcpListener) {
    let docs = Docs::default();
    let service = ServiceBuilder::new()
        // The layer buffers a write's body before it reserves the resource, and hands
        // the handler a body of the same type: hyper's `Incoming` cannot be rebuilt
        // from bytes, so map it to a boxed body first.
        .map_request(|request: Request<Incoming>| request.map(|body| body.boxed()))
        .layer(PreconditionLayer::new(MemoryStore::new()))
        .service_fn(move |request| handle(docs.clone(), request));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                eprintln!("accept failed: {error}");
                continue;
            }
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {error}");
            }
        });
    }
}

/// What the self-check saw of one exchange.
struct Seen {
    status: StatusCode,
    etag: Option<String>,
    body: Bytes,
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

async fn call(
    client: &HttpClient,
    addr: SocketAddr,
    method: Method,
    path: &str,
    condition: Option<(header::HeaderName, &str)>,
    body: &'static str,
) -> Result<Seen, Box<dyn Error>> {
    let mut request = Request::builder()
        .method(method.clone())
        .uri(format!("http://{addr}{path}"));
    let mut shown = format!("→ {method} {path}");
    if let Some((name, value)) = &condition {
        request = request.header(name, *value);
        shown.push_str(&format!("   {name}: {value}"));
    }
    let response = client
        .request(request.body(Full::new(Bytes::from_static(body.as_bytes())))?)
        .await?;
    let status = response.status();
    let etag = response
        .headers()
        .get(header::ETAG)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    println!(
        "{shown}\n← {status}{}",
        etag.as_ref()
            .map(|t| format!("   ETag: {t}"))
            .unwrap_or_default()
    );
    Ok(Seen { status, etag, body })
}

fn check(ok: bool, what: &str) -> Result<(), Box<dyn Error>> {
    if ok {
        Ok(())
    } else {
        Err(format!("self-check failed: {what}").into())
    }
}

/// Starts the server on a free port and drives it through a short conversation.
async fn self_check() -> Result<(), Box<dyn Error>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(serve(listener));
    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let path = "/docs/readme";

    let created = call(&client, addr, Method::PUT, path, None, "hello").await?;
    check(created.status == StatusCode::CREATED, "PUT creates (201)")?;
    let v1 = created.etag.ok_or("a write gets an ETag")?;

    let read = call(&client, addr, Method::GET, path, None, "").await?;
    check(
        read.status == StatusCode::OK && read.body == "hello",
        "GET returns the document",
    )?;
    check(
        read.etag.as_deref() == Some(&*v1),
        "GET carries the ETag of the write",
    )?;

    let cached = call(
        &client,
        addr,
        Method::GET,
        path,
        Some((header::IF_NONE_MATCH, &v1)),
        "",
    )
    .await?;
    check(
        cached.status == StatusCode::NOT_MODIFIED,
        "a matching If-None-Match gets 304",
    )?;

    let replaced = call(
        &client,
        addr,
        Method::PUT,
        path,
        Some((header::IF_MATCH, &v1)),
        "hello, world",
    )
    .await?;
    check(
        replaced.status == StatusCode::NO_CONTENT,
        "PUT with the current If-Match replaces (204)",
    )?;
    let v2 = replaced.etag.ok_or("a write gets an ETag")?;
    check(v2 != v1, "a write gets a new ETag")?;

    let stale = call(
        &client,
        addr,
        Method::PUT,
        path,
        Some((header::IF_MATCH, &v1)),
        "lost?",
    )
    .await?;
    check(
        stale.status == StatusCode::PRECONDITION_FAILED,
        "a stale If-Match gets 412",
    )?;
    check(
        stale.etag.as_deref() == Some(&*v2),
        "the 412 carries the current ETag",
    )?;

    let deleted = call(
        &client,
        addr,
        Method::DELETE,
        path,
        Some((header::IF_MATCH, &v2)),
        "",
    )
    .await?;
    check(
        deleted.status == StatusCode::NO_CONTENT,
        "DELETE with the current If-Match (204)",
    )?;
    let gone = call(&client, addr, Method::GET, path, None, "").await?;
    check(
        gone.status == StatusCode::NOT_FOUND,
        "the document is gone (404)",
    )?;

    server.abort();
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    if env::var("SERVE").is_ok_and(|v| v == "1") {
        let addr = env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
        let listener = match TcpListener::bind(&addr).await {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("cannot listen on {addr}: {error}");
                return ExitCode::FAILURE;
            }
        };
        match listener.local_addr() {
            Ok(local) => println!("listening on http://{local}"),
            Err(_) => println!("listening on http://{addr}"),
        }
        tokio::select! {
            () = serve(listener) => {},
            _ = tokio::signal::ctrl_c() => println!("shutting down"),
        }
        return ExitCode::SUCCESS;
    }
    match self_check().await {
        Ok(()) => {
            println!("self-check passed");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("{error}");
            ExitCode::FAILURE
        }
    }
}
