//! One request at a time through an axum `Router` (`tower::ServiceExt::oneshot`), and
//! what came back. Shared by the in-process layer tests.
#![allow(dead_code)] // each test file uses a different subset

use axum::{
    body::{to_bytes, Body},
    http::{header, HeaderMap, Method, StatusCode},
    Router,
};
use bytes::Bytes;
use tower::ServiceExt;

/// What came back from one request.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn etag(&self) -> Option<&str> {
        self.header(header::ETAG.as_str())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    /// The problem document, checked for the RFC 9457 members and our `code`.
    pub fn problem(&self) -> serde_json::Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/problem+json"),
            "status {}",
            self.status
        );
        let doc: serde_json::Value = serde_json::from_slice(&self.body).expect("problem json");
        assert_eq!(doc["status"], self.status.as_u16(), "{doc}");
        for member in ["title", "detail", "code", "type"] {
            assert!(doc[member].is_string(), "member {member} in {doc}");
        }
        doc
    }

    /// The problem document's `code`.
    pub fn code(&self) -> String {
        self.problem()["code"].as_str().expect("code").to_owned()
    }
}

/// Sends `method uri` with `headers` and no body.
pub async fn send(app: &Router, method: Method, uri: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = axum::http::Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app
        .clone()
        .oneshot(request.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: to_bytes(body, usize::MAX).await.unwrap(),
    }
}

/// The `ETag` of a `200` read of `uri`.
pub async fn get_etag(app: &Router, uri: &str) -> String {
    let r = send(app, Method::GET, uri, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    r.etag().expect("GET has an ETag").to_owned()
}
