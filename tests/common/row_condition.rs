//! The `RowPrecondition` a handler behind `RowVersionLayer` is handed for a request,
//! made the way a handler gets it: the request goes through the layer.
#![allow(dead_code)] // each test file uses a different subset

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response};
use tower::{service_fn, ServiceExt};
use tower_layer::Layer;
use tower_precondition::row_version::{RowPrecondition, RowVersionLayer};

/// The `RowPrecondition` for `method` with `headers` (which must be admitted: the
/// layer's `400` / `428` would leave none).
pub async fn condition<V: AsRef<str>>(method: Method, headers: &[(&str, V)]) -> RowPrecondition {
    let seen = Arc::new(Mutex::new(None));
    let handler = {
        let seen = seen.clone();
        service_fn(move |request: Request<String>| {
            let seen = seen.clone();
            async move {
                *seen.lock().unwrap() = request.extensions().get::<RowPrecondition>().cloned();
                Ok::<_, std::convert::Infallible>(Response::new(String::new()))
            }
        })
    };
    let mut request = Request::builder().method(method).uri("/t/1");
    for (name, value) in headers {
        request = request.header(*name, value.as_ref());
    }
    let response = RowVersionLayer::new()
        .layer(handler)
        .oneshot(request.body(String::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the layer refused the request");
    let found = seen.lock().unwrap().take();
    found.expect("the layer handed a RowPrecondition on")
}
