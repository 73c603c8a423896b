//! Memory of `MemoryStore` with a million versioned keys, and its bound at the default
//! capacity.
//!
//! A counting global allocator tracks live and peak heap bytes (the sizes asked for, so
//! the allocator's own per-chunk overhead shows only in the RSS column). Each scenario
//! runs in a child process of its own, so that its peak RSS (`VmHWM`) is its alone.
//!
//! ```text
//! cargo bench --manifest-path benches/Cargo.toml --bench memory_keys
//! MEMORY_KEYS=100000 cargo bench --manifest-path benches/Cargo.toml --bench memory_keys
//! ```
//!
//! `MEMORY_KEYS` (default 1 000 000) is the number of distinct keys written; the
//! overflow and long-key scenarios write twice as many, to fill every shard.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    process::Command,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, Layer, ServiceExt};
use tower_precondition::{
    key::{bounded_key, MAX_KEY_LEN},
    store::{AtomicVersionStore, CasOutcome, Entry, Version},
    EntityTag, MemoryStore, PreconditionLayer,
};

struct Counting;

static LIVE: AtomicU64 = AtomicU64::new(0);
static PEAK: AtomicU64 = AtomicU64::new(0);

fn grow(bytes: usize) {
    let live = LIVE.fetch_add(bytes as u64, Ordering::Relaxed) + bytes as u64;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn shrink(bytes: usize) {
    LIVE.fetch_sub(bytes as u64, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's layout.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            grow(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        shrink(layout.size());
        // SAFETY: `ptr` came from `System` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded unchanged.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            grow(new_size);
            shrink(layout.size());
        }
        new
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const MIB: f64 = 1024.0 * 1024.0;

/// A field of `/proc/self/status` in bytes (Linux; 0 elsewhere).
fn proc_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// A distinct 22-character tag for `i`, of the layer's alphabet and length: the store
/// keeps each in an `Arc<str>` of its own, as it keeps the layer's fresh tags.
fn tag_for(i: u64) -> EntityTag {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut value = u128::from(i).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    let mut text = [0u8; 22];
    for byte in &mut text {
        *byte = ALPHABET[(value & 63) as usize];
        value >>= 6;
    }
    EntityTag::strong(std::str::from_utf8(&text).expect("ASCII")).expect("etagc")
}

/// The layer's key for item `i`: `/items/000123`.
fn short_key(i: u64) -> String {
    format!("/items/{i:06}")
}

/// The longest key the layer stores as it is ([`MAX_KEY_LEN`] bytes): a longer one is
/// stored as a 136-byte digest form, so this is the worst case per entry.
fn long_key(i: u64) -> String {
    let index = format!("{i:08}");
    let pad = MAX_KEY_LEN - "/items/".len() - index.len();
    format!("/items/{}{index}", "x".repeat(pad))
}

/// What one scenario measured.
struct Measured {
    written: u64,
    capacity: usize,
    len: usize,
    live: u64,
    peak: u64,
    rss_growth: u64,
    hwm: u64,
    secs: f64,
}

/// Writes `count` keys into `store` by a compare-and-set from absent to a committed
/// entry with a fresh-like strong tag, as the layer's create does.
async fn fill(store: &MemoryStore, count: u64, key: fn(u64) -> String) {
    let now = SystemTime::now();
    for i in 0..count {
        let entry = Entry::committed(Version::new(tag_for(i), now).expect("strong"));
        let outcome = store
            .compare_and_set(&key(i), None, Some(&entry))
            .await
            .expect("no live lease, so never full");
        assert_eq!(outcome, CasOutcome::Applied);
    }
}

async fn run_store(store: MemoryStore, count: u64, key: fn(u64) -> String) -> (usize, usize) {
    fill(&store, count, key).await;
    let len = store.len();
    let capacity = store.capacity();
    assert!(
        len <= capacity,
        "{len} entries over the capacity {capacity}"
    );
    // Leaked on purpose: the figures are taken while the store is alive, and freeing
    // a million entries only costs time at exit.
    std::mem::forget(store);
    (len, capacity)
}

async fn handler(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::default());
    *response.status_mut() = StatusCode::CREATED;
    Ok(response)
}

/// The layer's create: `PUT` with `If-None-Match: *`, a handler that answers `201`.
async fn run_layer(count: u64, store_capacity: usize, cache: Option<usize>) -> (usize, usize) {
    let store = Arc::new(MemoryStore::with_capacity(store_capacity));
    let mut layer = PreconditionLayer::from_arc(store.clone());
    if let Some(cache) = cache {
        layer = layer.entry_cache(cache);
    }
    let service = layer.layer(service_fn(handler));
    for i in 0..count {
        let request = Request::put(short_key(i))
            .header(header::IF_NONE_MATCH, HeaderValue::from_static("*"))
            .body(Full::default())
            .expect("request");
        let response = service.clone().oneshot(request).await.expect("infallible");
        assert_eq!(response.status(), StatusCode::CREATED);
    }
    let len = store.len();
    let capacity = store.capacity();
    assert!(len <= capacity);
    std::mem::forget(service);
    std::mem::forget(store);
    (len, capacity)
}

/// Runs scenario `name` in this process.
fn measure(name: &str, keys: u64) -> Measured {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    // A store with room for every key: the bound is per shard and keys do not spread
    // evenly, so a capacity of exactly `keys` would evict a few.
    let roomy = usize::try_from(keys).expect("usize").saturating_mul(2);
    let written = match name {
        "overflow" | "long" => 2 * keys,
        _ => keys,
    };
    let rss_before = proc_status_bytes("VmRSS");
    let live_before = LIVE.load(Ordering::Relaxed);
    PEAK.store(live_before, Ordering::Relaxed);
    let start = Instant::now();
    let (len, capacity) = rt.block_on(async {
        match name {
            "roomy" => run_store(MemoryStore::with_capacity(roomy), written, short_key).await,
            "default" | "overflow" => run_store(MemoryStore::new(), written, short_key).await,
            "long" => run_store(MemoryStore::new(), written, long_key).await,
            "layer" => run_layer(written, roomy, None).await,
            "layer+cache" => run_layer(written, roomy, Some(16_384)).await,
            other => panic!("unknown scenario {other}"),
        }
    });
    let secs = start.elapsed().as_secs_f64();
    Measured {
        written,
        capacity,
        len,
        live: LIVE.load(Ordering::Relaxed) - live_before,
        peak: PEAK.load(Ordering::Relaxed) - live_before,
        rss_growth: proc_status_bytes("VmRSS").saturating_sub(rss_before),
        hwm: proc_status_bytes("VmHWM"),
        secs,
    }
}

const SCENARIOS: [(&str, &str); 6] = [
    ("roomy", "short keys, capacity 2 x keys"),
    ("default", "short keys, default capacity"),
    ("overflow", "2 x keys short keys, default capacity"),
    ("long", "2 x keys 256-byte keys, default capacity"),
    ("layer", "PUT If-None-Match: * via the layer"),
    ("layer+cache", "the same, entry_cache(16_384)"),
];

fn main() {
    assert_eq!(bounded_key(long_key(0)), long_key(0), "stored as it is");
    let keys: u64 = std::env::var("MEMORY_KEYS")
        .ok()
        .map_or(1_000_000, |v| v.parse().expect("MEMORY_KEYS: a number"));

    if let Ok(name) = std::env::var("MEMORY_KEYS_SCENARIO") {
        let m = measure(&name, keys);
        // One line for the parent: the fields of `Measured`, space-separated.
        println!(
            "{} {} {} {} {} {} {} {}",
            m.written, m.capacity, m.len, m.live, m.peak, m.rss_growth, m.hwm, m.secs
        );
        return;
    }

    println!(
        "MemoryStore::DEFAULT_CAPACITY = {}; size_of (Box<str>, Entry) = {} bytes; \
         Entry = {} bytes; keys = {keys}",
        MemoryStore::DEFAULT_CAPACITY,
        std::mem::size_of::<(Box<str>, Entry)>(),
        std::mem::size_of::<Entry>(),
    );
    println!(
        "{:<12} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9} {:>10} {:>10} {:>7}",
        "scenario",
        "written",
        "capacity",
        "len",
        "live MiB",
        "peak MiB",
        "B/entry",
        "RSS+ MiB",
        "HWM MiB",
        "secs"
    );
    let exe = std::env::current_exe().expect("own path");
    for (name, what) in SCENARIOS {
        let output = Command::new(&exe)
            .env("MEMORY_KEYS_SCENARIO", name)
            .env("MEMORY_KEYS", keys.to_string())
            .output()
            .expect("run scenario");
        assert!(
            output.status.success(),
            "scenario {name} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let line = String::from_utf8(output.stdout).expect("UTF-8");
        let f: Vec<f64> = line
            .split_whitespace()
            .map(|v| v.parse().expect("number"))
            .collect();
        let [written, capacity, len, live, peak, rss, hwm, secs] = f[..] else {
            panic!("scenario {name}: bad output {line:?}");
        };
        println!(
            "{name:<12} {written:>9} {capacity:>9} {len:>9} {:>10.1} {:>10.1} {:>9.1} {:>10.1} {:>10.1} {secs:>7.2}   {what}",
            live / MIB,
            peak / MIB,
            live / len,
            rss / MIB,
            hwm / MIB,
        );
    }
}
