//! The lost update, and how `tower-precondition` prevents it.
//!
//! ```text
//! cargo run --example demo
//! ```
//!
//! A shop's admin API serves `/products/{id}` from an in-memory table. Two admins,
//! Alice and Bob, open the same product; Alice lowers the price, Bob restocks it.
//! Each sends back the whole product with `PUT`.
//!
//! 1. **Without the layer** both `PUT`s succeed and Alice's price change is silently
//!    overwritten by Bob's stale copy.
//! 2. **With [`PreconditionLayer`]** both send `If-Match: <the ETag they read>`. Bob's
//!    write is refused with `412 Precondition Failed` and the current `ETag`; he
//!    re-reads, re-applies his change and succeeds. Nothing is lost.
//! 3. **50 concurrent `PUT`s** with the same `If-Match`: exactly one wins, every other
//!    one gets `412` (the version moved on) or `409` (the winner was still writing).
//!
//! Everything runs in one process, driving the axum `Router` with
//! `tower::ServiceExt::oneshot`, exactly as a server would. The process exits 0 only
//! if every outcome is the expected one.

use std::{
    collections::{BTreeMap, HashMap},
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    body::Body,
    extract::{Path, State},
    http::{header, HeaderMap, Method, Request, StatusCode},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tower::ServiceExt;
use tower_precondition::{MemoryStore, PreconditionLayer};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Product {
    name: String,
    price_cents: u32,
    stock: u32,
}

/// The shop's product table (a database in a real application).
type Db = Arc<Mutex<HashMap<u32, Product>>>;

async fn get_product(Path(id): Path<u32>, State(db): State<Db>) -> Response {
    let product = db.lock().map(|db| db.get(&id).cloned());
    match product {
        Ok(Some(product)) => Json(product).into_response(),
        Ok(None) => StatusCode::NOT_FOUND.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn put_product(
    Path(id): Path<u32>,
    State(db): State<Db>,
    Json(product): Json<Product>,
) -> Response {
    // A real write takes a moment (a database round trip); this is what lets
    // concurrent requests overlap.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let Ok(mut db) = db.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let created = db.insert(id, product.clone()).is_none();
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(product)).into_response()
}

/// The shop's API, without any concurrency control.
fn shop(db: Db) -> Router {
    Router::new()
        .route("/products/{id}", get(get_product).put(put_product))
        .with_state(db)
}

fn seeded_db() -> Db {
    let lamp = Product {
        name: "Desk lamp".into(),
        price_cents: 4900,
        stock: 3,
    };
    Arc::new(Mutex::new(HashMap::from([(42, lamp)])))
}

/// What a client saw of one exchange.
struct Reply {
    status: StatusCode,
    etag: Option<String>,
    body: Vec<u8>,
}

impl Reply {
    fn product(&self) -> Result<Product, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("response is not a product: {e}"))
    }
}

fn request(
    method: Method,
    uri: &str,
    if_match: Option<&str>,
    body: Option<&Product>,
) -> Request<Body> {
    let mut builder = Request::builder().method(method).uri(uri);
    if let Some(tag) = if_match {
        builder = builder.header(header::IF_MATCH, tag);
    }
    let body = match body {
        Some(product) => {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
            Body::from(serde_json::to_vec(product).unwrap_or_default())
        }
        None => Body::empty(),
    };
    builder.body(body).expect("a valid request")
}

/// Sends one request through `app` and returns what came back, without printing.
async fn send(app: &Router, request: Request<Body>) -> Result<Reply, String> {
    let response = app
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| format!("the service failed: {e}"))?;
    let status = response.status();
    let etag = header_str(response.headers(), header::ETAG);
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("could not read the body: {e}"))?
        .to_bytes()
        .to_vec();
    Ok(Reply { status, etag, body })
}

/// Sends one request through `app` and prints the exchange the way it would look on
/// the wire (request line, the headers that matter here, a short body).
async fn exchange(app: &Router, who: &str, request: Request<Body>) -> Result<Reply, String> {
    let mut line = format!("{who:>5} → {} {}", request.method(), request.uri());
    if let Some(tag) = header_str(request.headers(), header::IF_MATCH) {
        line.push_str(&format!("   If-Match: {tag}"));
    }
    println!("{line}");
    let (parts, body) = request.into_parts();
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("could not read the request body: {e}"))?
        .to_bytes();
    if !bytes.is_empty() {
        println!("          {}", String::from_utf8_lossy(&bytes));
    }
    let reply = send(app, Request::from_parts(parts, Body::from(bytes))).await?;

    let mut line = format!("{who:>5} ← {}", reply.status);
    if let Some(tag) = &reply.etag {
        line.push_str(&format!("   ETag: {tag}"));
    }
    println!("{line}");
    if let Some(summary) = summarize(&reply.body) {
        println!("          {summary}");
    }
    Ok(reply)
}

/// A product body as it is; a problem+json document as its title.
fn summarize(body: &[u8]) -> Option<String> {
    if body.is_empty() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some(match json.get("title") {
        Some(title) => format!("problem+json: {title}"),
        None => json.to_string(),
    })
}

fn header_str(headers: &HeaderMap, name: header::HeaderName) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn heading(text: &str) {
    println!(
        "\n=== {text} {}",
        "=".repeat(74usize.saturating_sub(text.len()))
    );
}

/// Fails the demo with `message` unless `ok`.
fn expect(ok: bool, message: impl Into<String>) -> Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(message.into())
    }
}

const URI: &str = "/products/42";

/// An admin's HTTP client for product 42, printing every exchange.
struct Admin<'a> {
    name: &'static str,
    app: &'a Router,
}

impl Admin<'_> {
    async fn get(&self) -> Result<Reply, String> {
        exchange(self.app, self.name, request(Method::GET, URI, None, None)).await
    }

    async fn put(&self, if_match: Option<&str>, product: &Product) -> Result<Reply, String> {
        let request = request(Method::PUT, URI, if_match, Some(product));
        exchange(self.app, self.name, request).await
    }
}

/// The product as stored now (read without printing).
async fn stored(app: &Router) -> Result<Product, String> {
    send(app, request(Method::GET, URI, None, None))
        .await?
        .product()
}

/// Act 1: the bug. No preconditions, so Bob's stale copy overwrites Alice's change.
async fn without_the_layer() -> Result<(), String> {
    heading("1. Without the layer: a lost update");
    let app = shop(seeded_db());
    let (alice, bob) = (
        Admin {
            name: "alice",
            app: &app,
        },
        Admin {
            name: "bob",
            app: &app,
        },
    );

    let alice_copy = alice.get().await?.product()?;
    let bob_copy = bob.get().await?.product()?;
    let a = alice
        .put(
            None,
            &Product {
                price_cents: 3900,
                ..alice_copy
            },
        )
        .await?;
    let b = bob
        .put(
            None,
            &Product {
                stock: 10,
                ..bob_copy
            },
        )
        .await?;

    let now = stored(&app).await?;
    println!(
        "\nBoth writes answered {} / {}; the price is back to {} cents: Alice's change is lost.",
        a.status.as_u16(),
        b.status.as_u16(),
        now.price_cents
    );
    expect(
        a.status == StatusCode::OK && b.status == StatusCode::OK && now.price_cents == 4900,
        "without the layer, both writes should pass and the first should be lost",
    )
}

/// Act 2: the same two admins, now with `If-Match`. Bob is refused and re-syncs.
async fn with_the_layer() -> Result<(), String> {
    heading("2. With PreconditionLayer: If-Match, 412, re-sync");
    let app = shop(seeded_db()).layer(PreconditionLayer::new(MemoryStore::new()));
    let (alice, bob) = (
        Admin {
            name: "alice",
            app: &app,
        },
        Admin {
            name: "bob",
            app: &app,
        },
    );

    let alice_read = alice.get().await?;
    let bob_read = bob.get().await?;
    let tag = alice_read
        .etag
        .clone()
        .ok_or("a read should carry an ETag")?;
    expect(
        bob_read.etag.as_ref() == Some(&tag),
        "both admins read the same version",
    )?;

    let alice_edit = Product {
        price_cents: 3900,
        ..alice_read.product()?
    };
    let a = alice.put(Some(&tag), &alice_edit).await?;
    expect(
        a.status == StatusCode::OK,
        format!("Alice's write should pass, got {}", a.status),
    )?;

    let bob_edit = Product {
        stock: 10,
        ..bob_read.product()?
    };
    let b = bob.put(Some(&tag), &bob_edit).await?;
    expect(
        b.status == StatusCode::PRECONDITION_FAILED,
        format!("Bob's stale write should get 412, got {}", b.status),
    )?;
    expect(
        b.etag == a.etag,
        "the 412 should carry the current ETag (Alice's version)",
    )?;

    println!("\n  Bob re-reads, re-applies his change to the current product, and retries:\n");
    let reread = bob.get().await?;
    let current = reread.etag.clone().ok_or("a read should carry an ETag")?;
    let b2 = bob
        .put(
            Some(&current),
            &Product {
                stock: 10,
                ..reread.product()?
            },
        )
        .await?;
    expect(
        b2.status == StatusCode::OK,
        format!("Bob's retry should pass, got {}", b2.status),
    )?;

    let now = stored(&app).await?;
    println!(
        "\nThe product now has Alice's price ({} cents) and Bob's stock ({}): nothing was lost.",
        now.price_cents, now.stock
    );
    expect(
        now.price_cents == 3900 && now.stock == 10,
        format!("both changes should be kept, found {now:?}"),
    )
}

/// Act 3: a burst of writers that all read the same version.
async fn fifty_concurrent_writes() -> Result<(), String> {
    const WRITERS: u32 = 50;
    heading("3. 50 concurrent PUTs with the same If-Match");
    let app = shop(seeded_db()).layer(PreconditionLayer::new(MemoryStore::new()));

    let read = Admin {
        name: "all",
        app: &app,
    }
    .get()
    .await?;
    let tag = read.etag.clone().ok_or("a read should carry an ETag")?;
    let base = read.product()?;
    println!("  {WRITERS} writers → PUT {URI}   If-Match: {tag}   (each sets its own stock)");

    let writers: Vec<_> = (0..WRITERS)
        .map(|i| {
            let app = app.clone();
            let edit = Product {
                stock: 100 + i,
                ..base.clone()
            };
            let request = request(Method::PUT, URI, Some(&tag), Some(&edit));
            tokio::spawn(async move {
                // They arrive over ~50 ms: the early ones find the winner still
                // writing (409), the late ones find the version moved on (412).
                tokio::time::sleep(Duration::from_millis(u64::from(i))).await;
                send(&app, request).await.map(|reply| (i, reply))
            })
        })
        .collect();

    let mut tally: BTreeMap<StatusCode, u32> = BTreeMap::new();
    let mut winners = Vec::new();
    for writer in writers {
        let (i, reply) = writer
            .await
            .map_err(|e| format!("a writer panicked: {e}"))??;
        *tally.entry(reply.status).or_default() += 1;
        if reply.status.is_success() {
            winners.push((i, reply.etag));
        }
    }
    println!("  tally:");
    for (status, count) in &tally {
        println!("    {count:>3} × {status}");
    }
    let refused = tally
        .iter()
        .filter(|(s, _)| [StatusCode::CONFLICT, StatusCode::PRECONDITION_FAILED].contains(s))
        .map(|(_, n)| n)
        .sum::<u32>();
    expect(
        winners.len() == 1,
        format!("exactly one write may succeed, {} did", winners.len()),
    )?;
    expect(
        refused == WRITERS - 1,
        "every other write should get 409 or 412",
    )?;

    let (i, winner_tag) = winners.remove(0);
    let now = send(&app, request(Method::GET, URI, None, None)).await?;
    let stock = now.product()?.stock;
    println!("  The stored product is writer {i}'s (stock {stock}), with the winner's ETag.");
    expect(
        stock == 100 + i,
        "the stored product should be the winner's",
    )?;
    expect(
        now.etag == winner_tag,
        "the current ETag should be the winner's",
    )
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = async {
        without_the_layer().await?;
        with_the_layer().await?;
        fifty_concurrent_writes().await
    }
    .await;
    match outcome {
        Ok(()) => {
            println!("\nAll outcomes as expected.");
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("\nUNEXPECTED: {message}");
            ExitCode::FAILURE
        }
    }
}
