//! Core benchmarks: RFC 9110 evaluation, the in-memory store, and the per-request
//! overhead of the whole layer around a trivial service (layer vs bare, side by side).
//!
//! Run (short enough for a shared 2-core machine):
//!
//! ```text
//! cargo bench --manifest-path benches/Cargo.toml --bench layer -- --warm-up-time 1 --measurement-time 3 --noplot
//! ```
//!
//! Layer benchmarks drive the service with `ready().call()` in a loop inside one
//! `iter_custom` sample, so the bare and the layered variant do exactly the same work
//! apart from the layer: the same request construction, the same handler, the same
//! response drop. Their difference is the layer's overhead per request.

use std::{
    convert::Infallible,
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use tokio::runtime::{Builder, Runtime};
use tower::{service_fn, Layer, Service, ServiceExt};
use tower_precondition::{
    etag::parse_tag_list,
    evaluate::{evaluate, Preconditions},
    store::{CasOutcome, Entry, Version},
    AtomicVersionStore, EntityTag, MemoryStore, PreconditionLayer,
};

const KEY: &str = "/items/42";

fn current_thread() -> Runtime {
    // The layer needs the time driver (store timeouts, handler deadline).
    Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(name.clone(), HeaderValue::from_str(value).expect("valid"));
    }
    map
}

fn version(tag: &str) -> Version {
    Version::new(EntityTag::strong(tag).expect("etagc"), SystemTime::now()).expect("strong")
}

// ---------------------------------------------------------------------------------
// Evaluation: header parsing + RFC 9110 section 13.2.2 decision.
// ---------------------------------------------------------------------------------

fn bench_evaluate(c: &mut Criterion) {
    let current = version("v7-2c1d9e");
    let cases = [
        (
            "if_match_single",
            Method::PUT,
            headers(&[(header::IF_MATCH, "\"v7-2c1d9e\"")]),
        ),
        (
            "if_none_match_3_weak",
            Method::GET,
            headers(&[(
                header::IF_NONE_MATCH,
                "W/\"v5-aa01\", W/\"v6-bb02\", \"v7-2c1d9e\"",
            )]),
        ),
        (
            "dates_ims_ius",
            Method::GET,
            headers(&[
                (header::IF_MODIFIED_SINCE, "Sun, 06 Nov 1994 08:49:37 GMT"),
                (header::IF_UNMODIFIED_SINCE, "Sun, 06 Nov 2094 08:49:37 GMT"),
            ]),
        ),
        ("no_preconditions", Method::GET, HeaderMap::new()),
    ];

    let mut group = c.benchmark_group("evaluate");
    for (name, method, map) in &cases {
        group.bench_with_input(BenchmarkId::new("from_headers", name), map, |b, map| {
            b.iter(|| Preconditions::from_headers(black_box(map)))
        });
        let pre = Preconditions::from_headers(map).expect("valid headers");
        group.bench_with_input(BenchmarkId::new("evaluate", name), &pre, |b, pre| {
            b.iter(|| evaluate(black_box(method), black_box(pre), Some(black_box(&current))))
        });
        group.bench_with_input(
            BenchmarkId::new("parse_and_evaluate", name),
            map,
            |b, map| {
                b.iter(|| {
                    let pre = Preconditions::from_headers(black_box(map)).expect("valid headers");
                    evaluate(black_box(method), &pre, Some(black_box(&current)))
                })
            },
        );
    }

    // The parser at its bound: MAX_LIST_TAGS (64) tags, mixed strong and weak.
    let list = (0..64u32)
        .map(|i| {
            if i.is_multiple_of(2) {
                format!("\"tag-{i:04}-0123456789\"")
            } else {
                format!("W/\"tag-{i:04}-0123456789\"")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    let map = headers(&[(header::IF_NONE_MATCH, &list)]);
    group.throughput(Throughput::Bytes(list.len() as u64));
    group.bench_function("parse_tag_list/64_tags", |b| {
        b.iter(|| parse_tag_list(black_box(&map), &header::IF_NONE_MATCH))
    });
    group.finish();
}

// ---------------------------------------------------------------------------------
// MemoryStore through the trait (as the layer calls it: async_trait boxed futures).
// ---------------------------------------------------------------------------------

fn bench_memory_store(c: &mut Criterion) {
    let rt = current_thread();
    let store = Arc::new(MemoryStore::new());
    let a = Entry::committed(version("aaaaaaaaaaaaaaaaaaaaaa"));
    let b_entry = Entry::committed(version("bbbbbbbbbbbbbbbbbbbbbb"));
    let stranger = Entry::committed(version("cccccccccccccccccccccc"));
    // Fill the store a little so lookups are not in an empty map.
    rt.block_on(async {
        for i in 0..1_000 {
            let key = format!("/items/{i}");
            let applied = store
                .compare_and_set(&key, None, Some(&a))
                .await
                .expect("memory store");
            assert_eq!(applied, CasOutcome::Applied);
        }
    });

    let mut group = c.benchmark_group("memory_store");
    group.bench_function("load_hit", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(store.load(black_box(KEY)).await) })
    });
    group.bench_function("load_miss", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(store.load(black_box("/absent")).await) })
    });
    group.bench_function("cas_applied", |b| {
        // Each iteration swaps A -> B or B -> A, so every compare-and-set applies.
        b.to_async(&rt).iter_custom(|iters| {
            let (store, a, b_entry) = (store.clone(), a.clone(), b_entry.clone());
            async move {
                let start = Instant::now();
                for i in 0..iters {
                    let (from, to) = if i.is_multiple_of(2) {
                        (&a, &b_entry)
                    } else {
                        (&b_entry, &a)
                    };
                    let outcome = store.compare_and_set(KEY, Some(from), Some(to)).await;
                    debug_assert_eq!(outcome.as_ref().ok(), Some(&CasOutcome::Applied));
                    black_box(outcome).ok();
                }
                let elapsed = start.elapsed();
                if !iters.is_multiple_of(2) {
                    // Untimed: put A back for the next sample.
                    let reset = store.compare_and_set(KEY, Some(&b_entry), Some(&a)).await;
                    assert_eq!(reset.ok(), Some(CasOutcome::Applied));
                }
                elapsed
            }
        })
    });
    group.bench_function("cas_mismatch", |b| {
        // The stored entry is A; expecting a stranger always mismatches (and clones A).
        b.to_async(&rt).iter(|| async {
            black_box(
                store
                    .compare_and_set(KEY, Some(&stranger), Some(&b_entry))
                    .await,
            )
        })
    });
    // Make sure the key holds A, whatever ran last.
    rt.block_on(async {
        let current = store.load(KEY).await.expect("memory store");
        assert_eq!(current.as_ref(), Some(&a));
    });
    group.finish();

    bench_memory_contended(c, &a, &b_entry);
}

/// TASKS tokio tasks on a 2-worker runtime, each doing one load + compare-and-set
/// round per iteration: on one hot key (one shard mutex) vs one key per task.
fn bench_memory_contended(c: &mut Criterion, a: &Entry, b_entry: &Entry) {
    const TASKS: u64 = 4;
    let rt = Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("memory_store_contended");
    group.throughput(Throughput::Elements(TASKS));
    for spread in [false, true] {
        let name = if spread { "spread_keys" } else { "same_key" };
        let store = Arc::new(MemoryStore::new());
        let keys: Arc<Vec<String>> = Arc::new(
            (0..TASKS)
                .map(|i| {
                    if spread {
                        format!("/items/{i}")
                    } else {
                        KEY.to_owned()
                    }
                })
                .collect(),
        );
        group.bench_function(BenchmarkId::new("4_tasks_load_cas", name), |bencher| {
            bencher.to_async(&rt).iter_custom(|iters| {
                let (store, keys) = (store.clone(), keys.clone());
                let (a, b_entry) = (a.clone(), b_entry.clone());
                async move {
                    let start = Instant::now();
                    let handles: Vec<_> = (0..TASKS as usize)
                        .map(|task| {
                            let (store, keys) = (store.clone(), keys.clone());
                            let (a, b_entry) = (a.clone(), b_entry.clone());
                            tokio::spawn(async move {
                                let key = &keys[task];
                                for _ in 0..iters {
                                    let current = store.load(key).await.expect("memory store");
                                    let next = if current.as_ref() == Some(&a) {
                                        &b_entry
                                    } else {
                                        &a
                                    };
                                    let outcome = store
                                        .compare_and_set(key, current.as_ref(), Some(next))
                                        .await;
                                    black_box(outcome).ok();
                                }
                            })
                        })
                        .collect();
                    for handle in handles {
                        handle.await.expect("task");
                    }
                    start.elapsed()
                }
            })
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------------
// The whole layer vs the bare service.
// ---------------------------------------------------------------------------------

async fn handler(_request: Request<Full<Bytes>>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::new(Full::new(Bytes::from_static(
        b"{\"id\":42,\"name\":\"widget\"}",
    ))))
}

fn get() -> Request<Full<Bytes>> {
    Request::get(KEY).body(Full::default()).expect("request")
}

fn get_if_none_match(etag: &HeaderValue) -> Request<Full<Bytes>> {
    Request::get(KEY)
        .header(header::IF_NONE_MATCH, etag.clone())
        .body(Full::default())
        .expect("request")
}

fn put_if_match(etag: &HeaderValue) -> Request<Full<Bytes>> {
    Request::put(KEY)
        .header(header::IF_MATCH, etag.clone())
        .body(Full::default())
        .expect("request")
}

/// How one layer scenario is driven.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    /// The status the layered service must answer (the bare one always answers 200).
    expect: StatusCode,
    request: fn(&HeaderValue) -> Request<Full<Bytes>>,
    /// Whether the next request names the `ETag` of the previous response (PUT).
    follow_etag: bool,
}

/// Runs `iters` requests built by `case.request` through `service`, checking each
/// status, and returns the elapsed time.
async fn drive<S, B>(
    mut service: S,
    iters: u64,
    mut etag: HeaderValue,
    expect: StatusCode,
    case: Case,
) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
{
    let start = Instant::now();
    for _ in 0..iters {
        let ready = service.ready().await.expect("infallible");
        let response = ready.call((case.request)(&etag)).await.expect("infallible");
        assert_eq!(response.status(), expect);
        if case.follow_etag {
            if let Some(next) = response.headers().get(header::ETAG) {
                // The next If-Match names the version this write committed.
                etag = next.clone();
            }
        }
        black_box(response);
    }
    start.elapsed()
}

fn bench_layer(c: &mut Criterion) {
    let rt = current_thread();
    let bare = service_fn(handler);
    let layered = PreconditionLayer::new(MemoryStore::new()).layer(service_fn(handler));

    // Seed the key (excluded from the measurement), then check each scenario once.
    let seeded = rt.block_on(async {
        let first = layered.clone().oneshot(get()).await.expect("infallible");
        assert_eq!(first.status(), StatusCode::OK);
        let etag = first.headers()[header::ETAG].clone();
        let again = layered.clone().oneshot(get()).await.expect("infallible");
        assert_eq!(
            again.headers()[header::ETAG],
            etag,
            "GET must not change the version"
        );
        let cached = layered
            .clone()
            .oneshot(get_if_none_match(&etag))
            .await
            .expect("infallible");
        assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
        etag
    });

    let mut group = c.benchmark_group("layer");
    let cases = [
        Case {
            name: "get_200",
            expect: StatusCode::OK,
            request: |_| get(),
            follow_etag: false,
        },
        Case {
            name: "get_304",
            expect: StatusCode::NOT_MODIFIED,
            request: get_if_none_match,
            follow_etag: false,
        },
        Case {
            name: "put_if_match",
            expect: StatusCode::OK,
            request: put_if_match,
            follow_etag: true,
        },
    ];
    for case in cases {
        group.bench_function(BenchmarkId::new("bare", case.name), |b| {
            let etag = seeded.clone();
            // The bare service answers every request 200 (it has no 304).
            b.to_async(&rt)
                .iter_custom(|iters| drive(bare, iters, etag.clone(), StatusCode::OK, case))
        });
        group.bench_function(BenchmarkId::new("layer", case.name), |b| {
            // PUT: each sample starts from the version the store holds now.
            let etag = rt.block_on(async {
                let response = layered.clone().oneshot(get()).await.expect("infallible");
                response.headers()[header::ETAG].clone()
            });
            b.to_async(&rt)
                .iter_custom(|iters| drive(layered.clone(), iters, etag.clone(), case.expect, case))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(100)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_evaluate, bench_memory_store, bench_layer
}
criterion_main!(benches);
