//! The documented arrangement with compression: tower-http's `CompressionLayer`
//! *inside* the precondition layer, so that the gzip and identity bodies of a version
//! get different strong `ETag`s (`"<version>-gzip"` and `"<version>"`) that both name
//! the version in `If-Match` / `If-None-Match`.
//!
//! ```text
//! cargo run --example compression             # serves on $ADDR (default 127.0.0.1:3000)
//! curl -i --compressed localhost:3000/items/1  # ETag: "…-gzip", Vary: accept-encoding
//! curl -i localhost:3000/items/1               # ETag: "…"
//! curl -i -X PUT localhost:3000/items/1 -H 'If-Match: "…-gzip"' -d '{}'   # 200
//! ```

use std::{env, error::Error};

use axum::{
    http::header,
    response::{IntoResponse, Response},
    routing::get,
    Router,
};
use tower_http::compression::CompressionLayer;
use tower_precondition::{MemoryStore, PreconditionLayer};

/// A document long enough to be worth compressing (`CompressionLayer` skips bodies
/// under 32 bytes, and gzip makes very short ones larger).
const ITEM: &str = r#"{"name":"lamp","stock":3,"description":"A desk lamp with a long description, so that compressing it saves bytes: a desk lamp, a desk lamp, a desk lamp.","tags":["lamp","desk","light","office","home","reading","warm","white","adjustable","metal"],"dimensions":{"height_cm":45,"width_cm":15,"depth_cm":15,"weight_kg":1.2},"notes":"Repeated text compresses well; repeated text compresses well; repeated text compresses well."}"#;

async fn item() -> Response {
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            // Revalidate before reuse: the item can change at any time.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        ITEM,
    )
        .into_response()
}

fn app() -> Router {
    Router::new()
        .route("/items/{id}", get(item).put(item))
        // Inner: compresses the handler's response before the precondition layer
        // labels it, so the layer sees its `Content-Encoding`.
        .route_layer(CompressionLayer::new())
        .route_layer(PreconditionLayer::new(MemoryStore::new()))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let addr = env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app()).await?;
    Ok(())
}
