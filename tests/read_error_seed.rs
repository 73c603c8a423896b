//! Found by `fuzz/fuzz_targets/layer.rs`: a read that seeds a version must undo the
//! seed when its handler does not answer `2xx`, and a handler *error* is no `2xx`
//! either. The seed used to stay behind, so the resource kept a version nobody was
//! given, and the next write no longer saw itself as a create.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use tower::{service_fn, Layer, ServiceExt};
use tower_precondition::{AtomicVersionStore, MemoryStore, PreconditionLayer, Reservation};

#[derive(Debug)]
struct HandlerError;

#[tokio::test]
async fn a_read_whose_handler_fails_leaves_no_seed() {
    let store = Arc::new(MemoryStore::new());
    let creates = Arc::new(Mutex::new(Vec::new()));
    let seen = creates.clone();
    let service = PreconditionLayer::from_arc(store.clone()).layer(service_fn(
        move |request: Request<Full<Bytes>>| {
            let seen = seen.clone();
            async move {
                if request.method() == Method::GET {
                    return Err(HandlerError);
                }
                let reservation = request.extensions().get::<Reservation>().cloned();
                seen.lock()
                    .unwrap()
                    .push(reservation.expect("a reserved write").is_create());
                let mut response = Response::new(Full::new(Bytes::new()));
                *response.status_mut() = StatusCode::NO_CONTENT;
                Ok::<_, HandlerError>(response)
            }
        },
    ));

    let get = Request::get("/items/1").body(Full::default()).unwrap();
    assert!(service.clone().oneshot(get).await.is_err());
    assert_eq!(
        store.load("/items/1").await.unwrap(),
        None,
        "the failed read's seed stayed behind"
    );

    // The write that follows creates the resource, as after a 404 read.
    let put = Request::put("/items/1").body(Full::default()).unwrap();
    let response = service.clone().oneshot(put).await.unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(*creates.lock().unwrap(), [true]);
}

#[tokio::test]
async fn a_read_whose_handler_fails_keeps_a_known_version() {
    let store = Arc::new(MemoryStore::new());
    let service = PreconditionLayer::from_arc(store.clone()).layer(service_fn(
        |request: Request<Full<Bytes>>| async move {
            if request.method() == Method::GET {
                return Err(HandlerError);
            }
            Ok::<_, HandlerError>(Response::new(Full::new(Bytes::new())))
        },
    ));
    let put = Request::put("/items/1").body(Full::default()).unwrap();
    assert_eq!(
        service.clone().oneshot(put).await.unwrap().status(),
        StatusCode::OK
    );
    let committed = store.load("/items/1").await.unwrap();
    assert!(committed.is_some());

    let get = Request::get("/items/1").body(Full::default()).unwrap();
    assert!(service.clone().oneshot(get).await.is_err());
    assert_eq!(store.load("/items/1").await.unwrap(), committed);
}
