//! Heap allocations per request, layer vs bare, and the size of the response future.
//!
//! Unlike timings, these counts are exact and do not depend on machine noise, so they
//! show what a change to the hot path costs or saves. A counting global allocator wraps
//! the system one; each scenario runs a few requests to warm up, then counts over many.
//!
//! ```text
//! cargo bench --manifest-path benches/Cargo.toml --bench allocs
//! ```

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_precondition::{
    store::{AtomicVersionStore, Entry, Version},
    EntityTag, MemoryStore, PreconditionLayer,
};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: forwarded unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const KEY: &str = "/items/42";
const WARM_UP: u64 = 100;
const COUNTED: u64 = 10_000;

const BODY: &[u8] = b"{\"id\":42,\"name\":\"widget\"}";

/// A handler that sets no header: the layer's `ETag` is then the first header of the
/// response, and `http` allocates the header map for it (2 allocations).
async fn handler(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(BODY))))
}

/// A JSON handler as axum's `Json` writes one: a `Content-Type`, so the response's
/// header map exists before the layer adds its validators.
async fn json_handler(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

type MakeRequest = fn(HeaderValue) -> Request<Full<Bytes>>;

fn get(_: HeaderValue) -> Request<Full<Bytes>> {
    Request::get(KEY).body(Full::default()).expect("request")
}

fn get_if_none_match(etag: HeaderValue) -> Request<Full<Bytes>> {
    Request::get(KEY)
        .header(header::IF_NONE_MATCH, etag)
        .body(Full::default())
        .expect("request")
}

fn put_if_match(etag: HeaderValue) -> Request<Full<Bytes>> {
    Request::put(KEY)
        .header(header::IF_MATCH, etag)
        .body(Full::default())
        .expect("request")
}

/// Allocations and bytes per request over `COUNTED` requests (after `WARM_UP`).
async fn per_request<S, B>(
    mut service: S,
    mut etag: HeaderValue,
    expect: StatusCode,
    request: MakeRequest,
    follow_etag: bool,
) -> (f64, f64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    let mut counted = (0, 0);
    for round in 0..WARM_UP + COUNTED {
        if round == WARM_UP {
            counted = (
                ALLOCS.load(Ordering::Relaxed),
                BYTES.load(Ordering::Relaxed),
            );
        }
        let ready = service.ready().await.expect("infallible");
        // The client's own work must not count as the layer's: a followed tag is moved
        // into the next request, not cloned (cloning a `HeaderValue` the layer built
        // allocates once per value), and a fixed one is cloned from a shared value.
        let sent = if follow_etag {
            std::mem::replace(&mut etag, HeaderValue::from_static(""))
        } else {
            etag.clone()
        };
        let mut response = ready.call(request(sent)).await.expect("infallible");
        assert_eq!(response.status(), expect);
        if follow_etag {
            etag = response
                .headers_mut()
                .remove(header::ETAG)
                .expect("an ETag");
        }
        black_box(response);
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - counted.0;
    let bytes = BYTES.load(Ordering::Relaxed) - counted.1;
    (
        allocs as f64 / COUNTED as f64,
        bytes as f64 / COUNTED as f64,
    )
}

async fn store_ops() {
    let store = MemoryStore::new();
    let tag = |t: &str| EntityTag::strong(t).expect("etagc");
    let now = std::time::SystemTime::now();
    let a = Entry::committed(Version::new(tag("aaaaaaaaaaaaaaaaaaaaaa"), now).expect("strong"));
    let b = Entry::committed(Version::new(tag("bbbbbbbbbbbbbbbbbbbbbb"), now).expect("strong"));
    store
        .compare_and_set(KEY, None, Some(&a))
        .await
        .expect("memory store");
    let count = |f: u64| f as f64 / COUNTED as f64;

    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..COUNTED {
        black_box(store.load(KEY).await.expect("memory store"));
    }
    let load = count(ALLOCS.load(Ordering::Relaxed) - before);

    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..COUNTED {
        black_box(store.load("/absent").await.expect("memory store"));
    }
    let load_miss = count(ALLOCS.load(Ordering::Relaxed) - before);

    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..COUNTED {
        black_box(store.compare_and_set(KEY, Some(&b), Some(&b)).await).expect("memory store");
    }
    let mismatch = count(ALLOCS.load(Ordering::Relaxed) - before);

    let before = ALLOCS.load(Ordering::Relaxed);
    for i in 0..COUNTED {
        let (from, to) = if i.is_multiple_of(2) {
            (&a, &b)
        } else {
            (&b, &a)
        };
        black_box(store.compare_and_set(KEY, Some(from), Some(to)).await).expect("memory store");
    }
    let cas = count(ALLOCS.load(Ordering::Relaxed) - before);
    println!("memory_store/load_hit      {load:>6.2} allocs/op");
    println!("memory_store/load_miss     {load_miss:>6.2} allocs/op");
    println!("memory_store/cas_applied   {cas:>6.2} allocs/op");
    println!("memory_store/cas_mismatch  {mismatch:>6.2} allocs/op");
}

/// The three scenarios, bare and through the layer, with the handler `bare`.
async fn run_cases<S>(handler_name: &str, bare: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let layered = PreconditionLayer::new(MemoryStore::new()).layer(bare.clone());
    let seed = layered
        .clone()
        .oneshot(get(HeaderValue::from_static("")))
        .await
        .expect("infallible");
    let etag = seed.headers()[header::ETAG].clone();

    let future_size = {
        let mut service = layered.clone();
        let future = service.call(get(etag.clone()));
        let size = std::mem::size_of_val(&future);
        drop(future);
        size
    };
    println!("\nhandler: {handler_name}; layer ResponseFuture size: {future_size} bytes");

    let cases: [(&str, StatusCode, MakeRequest, bool); 3] = [
        ("get_200", StatusCode::OK, get, false),
        (
            "get_304",
            StatusCode::NOT_MODIFIED,
            get_if_none_match,
            false,
        ),
        ("put_if_match", StatusCode::OK, put_if_match, true),
    ];
    println!(
        "{:<14} {:>12} {:>12} {:>12} {:>14}",
        "scenario", "bare allocs", "layer allocs", "added", "extra bytes"
    );
    // ALLOCS_SCENARIO=<name> runs one scenario alone (for a heap profiler).
    let only = std::env::var("ALLOCS_SCENARIO").ok();
    for (name, expect, request, follow) in cases {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        let (bare_allocs, bare_bytes) =
            per_request(bare.clone(), etag.clone(), StatusCode::OK, request, false).await;
        let (layer_allocs, layer_bytes) =
            per_request(layered.clone(), etag.clone(), expect, request, follow).await;
        println!(
            "{name:<14} {bare_allocs:>12.2} {layer_allocs:>12.2} {:>12.2} {:>14.0}",
            layer_allocs - bare_allocs,
            layer_bytes - bare_bytes
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not support.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        store_ops().await;
        run_cases("no headers", service_fn(handler)).await;
        run_cases("JSON (Content-Type)", service_fn(json_handler)).await;
    });
}
