//! The responses the layer writes itself: `304`, and problem+json (RFC 9457) documents
//! for `400`, `408`, `409`, `412`, `413`, `428` and `503`.
//!
//! Every problem document has the RFC 9457 members `type`, `title`, `status` and
//! `detail`, plus `code`, a stable snake-case name for programs to match on.
//! A `412` also carries the current `ETag` and `Last-Modified` as headers (and the tag in
//! the `current_etag` member) so the client can re-sync without another request.

use std::{
    cell::RefCell,
    fmt::Write as _,
    io::Write as _,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{
    header::{self, HeaderValue},
    HeaderMap, Response, StatusCode,
};

use crate::{
    body::ResponseBody,
    etag::{EntityTag, TagList},
    evaluate::Preconditions,
    store::Version,
};

const PROBLEM_JSON: HeaderValue = HeaderValue::from_static("application/problem+json");

/// Sets `ETag` and `Last-Modified` for `version` on a response with `headers`.
///
/// The one place a version's tag becomes a representation's: a body sent with a
/// `Content-Encoding` (a `CompressionLayer` inside this layer) gets the version's tag
/// with that coding's suffix ([`EntityTag::for_content_encoding`]), so the gzip and
/// identity bodies of one version never share a strong tag; conditions name the
/// version in either form ([`TagList::strong_match`]).
pub(crate) fn set_validators(headers: &mut HeaderMap, version: &Version) {
    set_validators_with(headers, version, etag_value);
}

/// [`set_validators`] for a version a write just committed: its tag is new, so it is
/// rendered without the per-thread cache of a tag that comes back.
pub(crate) fn set_new_validators(headers: &mut HeaderMap, version: &Version) {
    set_validators_with(headers, version, EntityTag::to_header_value);
}

fn set_validators_with(
    headers: &mut HeaderMap,
    version: &Version,
    render: fn(&EntityTag) -> HeaderValue,
) {
    match version
        .etag()
        .for_content_encoding(headers.get_all(header::CONTENT_ENCODING))
    {
        Some(tag) => {
            headers.insert(header::ETAG, render(&tag));
        }
        None => {
            // A coding we cannot name: no tag is better than one shared with another body.
            tracing::debug!("response coding has no representation tag; ETag left out");
            headers.remove(header::ETAG);
        }
    }
    if let Some(date) = last_modified_value(version) {
        headers.insert(header::LAST_MODIFIED, date);
    }
}

/// Sets the validators of a `304` for `version` (whose headers may still describe the
/// body it replaces), and drops that body's `Content-Encoding`.
///
/// The `ETag` names the representation the client said it has (the first tag of its
/// `If-None-Match` that names `version`), since a cache picks the stored response to
/// reuse by it (RFC 9111 section 4.3.4). When that is an encoded variant the
/// representations vary by `Accept-Encoding`, and the `304` says so (RFC 9110 section
/// 15.4.5), even when the layer answers without the handler (which would have said it).
pub(crate) fn set_not_modified_validators(
    headers: &mut HeaderMap,
    version: &Version,
    pre: &Preconditions,
) {
    let named = pre
        .if_none_match
        .as_ref()
        .and_then(|list| list.weak_matching(version.etag()))
        .map(EntityTag::to_strong);
    match named {
        Some(tag) => {
            if !tag.weak_eq(version.etag()) {
                ensure_vary(headers, header::ACCEPT_ENCODING);
            }
            headers.insert(header::ETAG, etag_value(&tag));
            if let Some(date) = last_modified_value(version) {
                headers.insert(header::LAST_MODIFIED, date);
            }
        }
        // `If-Modified-Since` (or `*`): the tag of the body this 304 stands for.
        None => set_validators(headers, version),
    }
    // A cache applies a 304's headers to the response it stored, which may be identity.
    remove_fields(headers, [header::CONTENT_ENCODING]);
}

/// Adds `name` to `Vary` unless it (or `*`) is already listed.
fn ensure_vary(headers: &mut HeaderMap, name: header::HeaderName) {
    let listed = headers.get_all(header::VARY).iter().any(|value| {
        value.to_str().is_ok_and(|value| {
            value
                .split(',')
                .map(str::trim)
                .any(|field| field == "*" || field.eq_ignore_ascii_case(name.as_str()))
        })
    });
    if !listed {
        headers.append(header::VARY, HeaderValue::from(name));
    }
}

/// `tag` as an `ETag` value, shared while the same tag comes back to this thread.
///
/// A hot resource is answered with the same tag many times in a row (every `200` and
/// `304` until it changes), and a shared `HeaderValue` is cloned by a reference count,
/// where rendering costs an allocation. A value is kept only once its tag comes back a
/// second time: keeping one costs an allocation too (its bytes become shared), which a
/// write's new tag, answered once, should not pay.
fn etag_value(tag: &EntityTag) -> HeaderValue {
    thread_local! {
        static LAST: RefCell<Option<(EntityTag, Option<HeaderValue>)>> =
            const { RefCell::new(None) };
    }
    let cached = LAST.try_with(|last| {
        let mut last = last.borrow_mut();
        match &mut *last {
            Some((seen, Some(value))) if seen == tag => value.clone(),
            Some((seen, kept @ None)) if seen == tag => kept.insert(tag.to_header_value()).clone(),
            _ => {
                *last = Some((tag.clone(), None));
                tag.to_header_value()
            }
        }
    });
    // No thread-local (the thread is exiting): render without the cache.
    cached.unwrap_or_else(|_| tag.to_header_value())
}

/// The `Last-Modified` value of `version`, rendered once per second per thread.
///
/// Responses in a row mostly name the same second (a hot resource, or versions
/// committed just now), and a cached `HeaderValue` is cloned by a reference count,
/// where rendering costs a formatting pass and an allocation.
fn last_modified_value(version: &Version) -> Option<HeaderValue> {
    thread_local! {
        static LAST: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    let secs = version.last_modified_secs();
    let cached = LAST.try_with(|last| {
        let mut last = last.borrow_mut();
        if let Some((cached_secs, value)) = &*last {
            if *cached_secs == secs {
                return Some(value.clone());
            }
        }
        let value = render_http_date(version.last_modified())?;
        *last = Some((secs, value.clone()));
        Some(value)
    });
    // No thread-local (the thread is exiting): render without the cache.
    cached.unwrap_or_else(|_| render_http_date(version.last_modified()))
}

/// `time` as an IMF-fixdate header value, rendered in place: always 29 bytes.
fn render_http_date(time: SystemTime) -> Option<HeaderValue> {
    let mut buf = [0u8; 29];
    let mut out = &mut buf[..];
    write!(out, "{}", httpdate::HttpDate::from(time)).ok()?;
    if !out.is_empty() {
        return None;
    }
    // An owner-backed `Bytes`: one allocation, and clones only count references.
    HeaderValue::from_maybe_shared(Bytes::from_owner(buf)).ok()
}

/// Removes validators a response must not carry when the layer cannot vouch for them.
pub(crate) fn remove_validators(headers: &mut HeaderMap) {
    remove_fields(headers, [header::ETAG, header::LAST_MODIFIED]);
}

/// Removes the fields `names` from `headers`. A response has few fields and these are
/// mostly absent: a look along its field names finds the ones present, so an absent
/// one costs no hashed lookup (as `HeaderMap::remove` does for each name).
fn remove_fields<const N: usize>(headers: &mut HeaderMap, names: [header::HeaderName; N]) {
    /// Past this many field names, the hashed lookups are the cheaper way.
    const SCAN_UP_TO: usize = 16;
    if headers.is_empty() {
        return;
    }
    let scan = headers.keys_len() <= SCAN_UP_TO;
    for name in names {
        if !scan || headers.keys().any(|present| *present == name) {
            headers.remove(name);
        }
    }
}

/// `304 Not Modified` with the validators of `version`, answered by the layer itself.
pub(crate) fn not_modified<B>(version: &Version, pre: &Preconditions) -> Response<ResponseBody<B>> {
    let mut response = Response::new(ResponseBody::not_modified());
    *response.status_mut() = StatusCode::NOT_MODIFIED;
    set_not_modified_validators(response.headers_mut(), version, pre);
    response
}

/// Turns a handler's 2xx into a `304`, keeping the headers a 304 must repeat
/// (RFC 9110 section 15.4.5) and dropping the content.
pub(crate) fn into_not_modified<B>(
    response: Response<B>,
    version: &Version,
    pre: &Preconditions,
) -> Response<ResponseBody<B>> {
    let (mut parts, _body) = response.into_parts();
    parts.status = StatusCode::NOT_MODIFIED;
    remove_fields(
        &mut parts.headers,
        [
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
            header::CONTENT_TYPE,
        ],
    );
    set_not_modified_validators(&mut parts.headers, version, pre);
    Response::from_parts(parts, ResponseBody::not_modified())
}

/// An answer given before the handler runs: the layer's own problem, or the
/// application's refusal from its access check.
pub(crate) enum Early {
    Problem(Problem),
    Refused(Response<Bytes>),
}

impl Early {
    pub(crate) fn into_response<B>(self) -> Response<ResponseBody<B>> {
        match self {
            Early::Problem(problem) => problem.into_response(),
            Early::Refused(mut response) => {
                // The application's own refusal: it never carries our validators.
                remove_validators(response.headers_mut());
                response.map(ResponseBody::full)
            }
        }
    }
}

impl From<Problem> for Early {
    fn from(problem: Problem) -> Self {
        Early::Problem(problem)
    }
}

/// A problem the layer reports.
pub(crate) struct Problem {
    status: StatusCode,
    code: &'static str,
    title: &'static str,
    detail: String,
    current: Option<Version>,
    retry_after: Option<Duration>,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, title: &'static str, detail: String) -> Self {
        Self {
            status,
            code,
            title,
            detail,
            current: None,
            retry_after: None,
        }
    }

    /// `400`: a malformed precondition header.
    pub(crate) fn bad_request(detail: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed_precondition",
            "Malformed precondition header",
            detail,
        )
    }

    /// `413`: the request body is over the limit (or its `Content-Length` says so).
    pub(crate) fn body_too_large(limit: usize) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "request_body_too_large",
            "Request body too large",
            format!(
                "The request body is larger than the {limit} bytes this server accepts \
                 for a write, so the write was not attempted."
            ),
        )
    }

    /// `408`: the request body was not in hand within the read timeout.
    pub(crate) fn body_timed_out(after: Duration) -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_body_timeout",
            "Request body timed out",
            format!(
                "The request body did not arrive within {} ms, so the write was not \
                 attempted and nothing changed. Resend the request.",
                after.as_millis()
            ),
        )
    }

    /// `400`: the request body failed, or ended short of (or past) its
    /// `Content-Length`.
    pub(crate) fn body_incomplete(detail: String) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "request_body_incomplete",
            "Incomplete request body",
            detail,
        )
    }

    /// `400`: the `Content-Length` does not parse, or several values disagree.
    pub(crate) fn invalid_content_length() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_content_length",
            "Invalid Content-Length",
            "The Content-Length header is not one non-negative number, so the request \
             body cannot be delimited. The write was not attempted."
                .into(),
        )
    }

    /// `503` (transactional mode): as many write transactions as allowed are open,
    /// and none finished within the wait; nothing was attempted.
    #[cfg(feature = "postgres")]
    pub(crate) fn too_many_writes(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_writes_in_flight",
                "Too many writes in flight",
                "The server is running as many write transactions as it allows, so this \
                 write was not attempted. Retry after the delay in Retry-After."
                    .into(),
            )
        }
    }

    /// The status of the response.
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// The version a `412` carries (for the model check's assertions).
    #[cfg(all(test, tower_precondition_loom))]
    pub(crate) fn current(&self) -> Option<&Version> {
        self.current.as_ref()
    }

    /// The stable `code` member.
    pub(crate) fn code(&self) -> &'static str {
        self.code
    }

    /// `409`: another write on the same resource is in flight.
    pub(crate) fn write_in_flight(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::CONFLICT,
                "conditional_request_conflict",
                "Conflicting write in flight",
                "Another write to this resource is in progress. Retry after the delay in \
                 Retry-After, re-reading the resource if your precondition fails."
                    .into(),
            )
        }
    }

    /// `412`: a precondition evaluated to false against `current`. Each cause has its
    /// own `code` and detail. With `with_validators` off, the current `ETag` and
    /// `Last-Modified` are left out (for resources whose versions are not for anyone
    /// who asks).
    pub(crate) fn precondition_failed(
        current: Option<Version>,
        pre: &Preconditions,
        with_validators: bool,
    ) -> Self {
        let (code, detail) = failed_precondition(current.as_ref(), pre);
        let detail = if with_validators && current.is_some() {
            format!("{detail} The current ETag is in the ETag header.")
        } else {
            detail.to_owned()
        };
        Self {
            current: current.filter(|_| with_validators),
            ..Self::new(
                StatusCode::PRECONDITION_FAILED,
                code,
                "Precondition failed",
                detail,
            )
        }
    }

    /// `503`: the write ran, but its lease was taken over before it settled (the
    /// handler outlived its lease), so the layer cannot vouch that it was the only one.
    pub(crate) fn lease_lost(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "lease_lost",
                "Write outcome uncertain",
                "The write took longer than its lease, and another request took the \
                 resource over before it finished. It may or may not have been applied, \
                 and the resource has a new version: fetch it before retrying."
                    .into(),
            )
        }
    }

    /// `428`: the policy requires a precondition on this method.
    ///
    /// The way out depends on the method: only `PUT` can create a resource with
    /// `If-None-Match: *`; a `DELETE`, `PATCH` or `POST` can only name the version it
    /// acts on. Under the strict policy the body also names what is not accepted, since
    /// a client that sent one of those did send a precondition.
    pub(crate) fn precondition_required(method: &http::Method, strict: bool) -> Self {
        let resend = if method == http::Method::PUT {
            "`If-Match: <its ETag>` to replace it, or `If-None-Match: *` to create a \
             resource that must not exist yet"
        } else {
            "`If-Match: <its ETag>`"
        };
        let not_accepted = if strict {
            " `If-Match: *`, `If-None-Match` with entity tags and `If-Unmodified-Since` \
             alone are not accepted: they do not name the version being replaced."
        } else {
            ""
        };
        Self::new(
            StatusCode::PRECONDITION_REQUIRED,
            "precondition_required",
            "Precondition required",
            format!(
                "{method} requests to this resource must be conditional. GET the resource, \
                 then resend this request with {resend}.{not_accepted}"
            ),
        )
    }

    /// `503`: the version store failed or timed out.
    pub(crate) fn store_unavailable(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "version_store_unavailable",
                "Version store unavailable",
                "The version store could not be reached, so the write was not attempted. \
                 Retry after the delay in Retry-After."
                    .into(),
            )
        }
    }

    /// `503`: the handler did not finish within its deadline.
    pub(crate) fn handler_timeout(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "write_timed_out",
                "Write timed out",
                "The write did not finish in time and may or may not have been applied. \
                 The resource has a new version: fetch it before retrying."
                    .into(),
            )
        }
    }

    /// `503` (transactional mode): the write's transaction was rolled back (the handler
    /// missed its deadline, or the commit was refused); nothing changed.
    #[cfg(feature = "postgres")]
    pub(crate) fn rolled_back(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "write_rolled_back",
                "Write rolled back",
                "The write could not be completed and was rolled back: neither the resource \
                 nor its version changed. Retry after the delay in Retry-After."
                    .into(),
            )
        }
    }

    /// `503` (transactional mode): the connection was lost while committing, so the
    /// write may or may not have been applied (the data and the version together).
    #[cfg(feature = "postgres")]
    pub(crate) fn commit_unknown(retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "commit_outcome_unknown",
                "Commit outcome unknown",
                "The connection to the database was lost while committing: the write was \
                 either applied in full (with a new version) or not at all. Fetch the \
                 resource before retrying."
                    .into(),
            )
        }
    }

    /// The problem as an HTTP response.
    pub(crate) fn into_response<B>(self) -> Response<ResponseBody<B>> {
        let mut json = String::with_capacity(256);
        json.push_str("{\"type\":\"");
        json.push_str(type_uri(self.status));
        json.push_str("\",\"title\":");
        push_json_string(&mut json, self.title);
        let _ = write!(
            json,
            ",\"status\":{},\"code\":\"{}\",\"detail\":",
            self.status.as_u16(),
            self.code
        );
        push_json_string(&mut json, &self.detail);
        if let Some(version) = &self.current {
            json.push_str(",\"current_etag\":");
            push_json_string(&mut json, &version.etag().to_string());
        }
        json.push('}');

        let mut response = Response::new(ResponseBody::full(Bytes::from(json)));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, PROBLEM_JSON);
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(version) = &self.current {
            set_validators(headers, version);
        }
        if let Some(delay) = self.retry_after {
            let secs = delay
                .as_secs()
                .saturating_add(u64::from(delay.subsec_nanos() > 0));
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// Which precondition failed, as a stable code and a detail for the client. Follows
/// the evaluation order of RFC 9110 section 13.2.2, as `evaluate` does.
fn failed_precondition(
    current: Option<&Version>,
    pre: &Preconditions,
) -> (&'static str, &'static str) {
    if let Some(if_match) = &pre.if_match {
        if !current.is_some_and(|v| if_match.strong_match(v.etag())) {
            return match if_match {
                TagList::Any => (
                    "resource_missing",
                    "If-Match: * requires the resource to exist, and it has no current version.",
                ),
                TagList::Tags(tags) if tags.iter().all(EntityTag::is_weak) => (
                    "weak_etag_in_if_match",
                    "If-Match compares entity tags strongly, so a weak tag (W/\"...\") never \
                     matches. Send the strong ETag of the representation you last read.",
                ),
                TagList::Tags(_) if current.is_none() => (
                    "no_current_version",
                    "The resource has no current version matching your If-Match. Fetch it \
                     again before resending your change.",
                ),
                TagList::Tags(_) => (
                    "etag_mismatch",
                    "The resource has changed since you last read it. Fetch it again and \
                     resend your change with the new ETag in If-Match.",
                ),
            };
        }
    } else if pre.if_unmodified_since.is_some() {
        return (
            "modified_since",
            "The resource was modified after the date in If-Unmodified-Since (or its \
             modification date is not known). Fetch it again and resend your change with \
             its ETag in If-Match.",
        );
    }
    match &pre.if_none_match {
        Some(TagList::Any) => (
            "resource_exists",
            "If-None-Match: * asks to create the resource only if it does not exist, and it \
             exists. Fetch it and update it with If-Match instead.",
        ),
        _ => (
            "etag_matches",
            "The resource's current ETag is one listed in If-None-Match.",
        ),
    }
}

fn type_uri(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "https://www.rfc-editor.org/rfc/rfc9110#status.400",
        408 => "https://www.rfc-editor.org/rfc/rfc9110#status.408",
        409 => "https://www.rfc-editor.org/rfc/rfc9110#status.409",
        412 => "https://www.rfc-editor.org/rfc/rfc9110#status.412",
        413 => "https://www.rfc-editor.org/rfc/rfc9110#status.413",
        428 => "https://www.rfc-editor.org/rfc/rfc6585#section-3",
        503 => "https://www.rfc-editor.org/rfc/rfc9110#status.503",
        _ => "about:blank",
    }
}

/// Appends `value` as a JSON string literal (RFC 8259 escaping).
fn push_json_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_fields_go_with_every_line_whatever_the_map_holds() {
        let names = [header::CONTENT_LENGTH, header::ETAG];
        for others in [0, 3, 16, 40] {
            let mut headers = HeaderMap::new();
            for i in 0..others {
                headers.insert(
                    header::HeaderName::try_from(format!("x-field-{i}")).unwrap(),
                    HeaderValue::from_static("1"),
                );
            }
            remove_fields(&mut headers, names.clone());
            assert_eq!(headers.len(), others, "nothing else goes ({others} others)");
            headers.append(header::ETAG, HeaderValue::from_static("\"a\""));
            headers.append(header::ETAG, HeaderValue::from_static("\"b\""));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            remove_fields(&mut headers, names.clone());
            assert!(!headers.contains_key(header::ETAG), "{others} others");
            assert!(!headers.contains_key(header::CONTENT_LENGTH));
            assert!(headers.contains_key(header::CONTENT_TYPE));
            assert_eq!(headers.len(), others + 1);
        }
    }

    #[test]
    fn json_escaping() {
        let mut s = String::new();
        push_json_string(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }

    #[test]
    fn last_modified_matches_httpdate_across_seconds() {
        let tag = crate::EntityTag::strong("v").expect("etagc");
        // The same second twice (a cache hit), another second, then the first again,
        // and a date past what an HTTP-date can name (saturated, no panic).
        for secs in [784_111_777, 784_111_777, 784_111_778, 784_111_777, u64::MAX] {
            let version = Version::from_parts(tag.clone(), secs, false).expect("strong");
            let mut headers = HeaderMap::new();
            set_validators(&mut headers, &version);
            let expected = httpdate::fmt_http_date(version.last_modified());
            assert_eq!(headers[header::LAST_MODIFIED], expected.as_str());
        }
        let first = Version::from_parts(tag, 784_111_777, false).expect("strong");
        assert_eq!(
            last_modified_value(&first).expect("renders"),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }

    #[test]
    fn retry_after_saturates() {
        // Duration::MAX has a fractional second: rounding it up must not overflow.
        let response: Response<ResponseBody<()>> =
            Problem::write_in_flight(Duration::MAX).into_response();
        assert_eq!(
            response.headers()[header::RETRY_AFTER],
            u64::MAX.to_string().as_str()
        );
    }

    #[test]
    fn body_problems_have_their_own_codes() {
        for (problem, status, code) in [
            (Problem::body_too_large(10), 413, "request_body_too_large"),
            (
                Problem::body_timed_out(Duration::MAX),
                408,
                "request_body_timeout",
            ),
            (
                Problem::body_incomplete("cut".into()),
                400,
                "request_body_incomplete",
            ),
            (
                Problem::invalid_content_length(),
                400,
                "invalid_content_length",
            ),
        ] {
            assert_eq!(problem.code(), code);
            let response: Response<ResponseBody<()>> = problem.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
        }
    }

    #[test]
    fn retry_after_rounds_up() {
        let response: Response<ResponseBody<()>> =
            Problem::write_in_flight(Duration::from_millis(1500)).into_response();
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}
