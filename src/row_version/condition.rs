//! [`RowPrecondition`]: the request's preconditions, handed to the handler to put into
//! its own write; [`SqlCondition`], their bind values; [`NotApplied`], the handler's
//! report that the database refused the write.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use http::{Method, StatusCode};

use super::version::{counter_named_by, RowVersion};
use crate::{
    etag::TagList,
    evaluate::{evaluate, Decision, Preconditions},
};

/// The last second an HTTP-date can name (9999-12-31T23:59:59Z); Postgres'
/// `to_timestamp` accepts it.
const MAX_HTTP_DATE_SECS: i64 = 253_402_300_799;

/// The preconditions of one request, as the handler needs them to make its write
/// conditional. [`RowVersionLayer`](super::RowVersionLayer) parses and admits them
/// (`400`, `428`) and puts this value in the request's extensions; in axum it is an
/// extractor.
///
/// Three ways to use it, by how the handler writes:
///
/// * **One statement** (the fastest): bind [`sql`](Self::sql) into an
///   `UPDATE ... WHERE id = $1 AND <condition>` (or an upsert when
///   [`may_create`](Self::may_create)); zero rows means the database refused it, and
///   [`not_applied`](Self::not_applied) with the row's current version says what to
///   answer.
/// * **Locked row** (read before write): in the handler's own transaction,
///   `SELECT ... FOR UPDATE`, then [`check`](Self::check) against the locked row's
///   version, then the write.
/// * Anything else that can compare versions: [`preconditions`](Self::preconditions)
///   holds the parsed fields.
///
/// ```
/// use http::{Method, Request};
/// use tower::{service_fn, ServiceExt};
/// use tower_precondition::row_version::{RowPrecondition, RowVersion, RowVersionLayer};
/// use tower_layer::Layer;
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// let current = RowVersion::from_columns(7, None);
/// let handler = service_fn(move |request: Request<String>| {
///     let current = current.clone();
///     async move {
///         let condition = request.extensions().get::<RowPrecondition>().unwrap();
///         // As if the row had been locked with SELECT ... FOR UPDATE:
///         let response = match condition.check(Some(&current)) {
///             Err(refused) => refused.into_http_response(),
///             Ok(()) => {
///                 let mut response = http::Response::new(String::from("saved"));
///                 RowVersion::from_columns(8, None).attach(&mut response);
///                 response
///             }
///         };
///         Ok::<_, std::convert::Infallible>(response)
///     }
/// });
/// let service = RowVersionLayer::new().layer(handler);
/// let stale = Request::put("/items/1").header("if-match", "\"6\"").body(String::new()).unwrap();
/// let response = service.clone().oneshot(stale).await.unwrap();
/// assert_eq!(response.status(), 412);
/// assert_eq!(response.headers()["etag"], "\"7\"");
/// let fresh = Request::put("/items/1").header("if-match", "\"7\"").body(String::new()).unwrap();
/// let response = service.oneshot(fresh).await.unwrap();
/// assert_eq!(response.status(), 200);
/// assert_eq!(response.headers()["etag"], "\"8\"");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct RowPrecondition {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    method: Method,
    pre: Preconditions,
    /// Set when the handler asks how to condition its write; the layer warns about a
    /// conditional write that succeeded without asking.
    consulted: AtomicBool,
}

impl RowPrecondition {
    pub(crate) fn new(method: Method, pre: Preconditions) -> Self {
        Self {
            inner: Arc::new(Inner {
                method,
                pre,
                consulted: AtomicBool::new(false),
            }),
        }
    }

    /// The request's method.
    pub fn method(&self) -> &Method {
        &self.inner.method
    }

    /// The parsed precondition fields.
    pub fn preconditions(&self) -> &Preconditions {
        &self.inner.pre
    }

    /// Whether the request carries no precondition that guards a write (`If-Match`,
    /// `If-None-Match` or a valid `If-Unmodified-Since`).
    pub fn is_unconditional(&self) -> bool {
        !self.inner.pre.guards_write()
    }

    /// Whether a missing row may be created: false under `If-Match` (any form) and
    /// `If-Unmodified-Since`, which need a current version. Choose the upsert when true,
    /// the plain `UPDATE` when false.
    pub fn may_create(&self) -> bool {
        evaluate(&self.inner.method, &self.inner.pre, None) == Decision::Proceed
    }

    /// Whether an existing row may be written: false under `If-None-Match: *`
    /// (create only).
    pub fn may_replace(&self) -> bool {
        !matches!(self.inner.pre.if_none_match, Some(TagList::Any))
    }

    /// The bind values of the one-statement condition
    /// ([`PgRowSql::condition`](super::PgRowSql::condition)).
    pub fn sql(&self) -> SqlCondition {
        self.consult();
        let pre = &self.inner.pre;
        let if_match = match &pre.if_match {
            Some(TagList::Tags(tags)) => Some(
                tags.iter()
                    .filter_map(|tag| counter_named_by(tag, false))
                    .collect(),
            ),
            // `*`: the row must exist, which an UPDATE that found it shows.
            Some(TagList::Any) | None => None,
        };
        let if_none_match = match &pre.if_none_match {
            Some(TagList::Tags(tags)) => Some(
                tags.iter()
                    .filter_map(|tag| counter_named_by(tag, true))
                    .collect(),
            ),
            Some(TagList::Any) | None => None,
        };
        // RFC 9110 section 13.2.2: `If-Unmodified-Since` counts only without `If-Match`.
        let unmodified_since = match pre.if_match {
            Some(_) => None,
            None => pre.if_unmodified_since.map(|secs| {
                i64::try_from(secs).map_or(MAX_HTTP_DATE_SECS, |s| s.min(MAX_HTTP_DATE_SECS))
            }),
        };
        SqlCondition {
            if_match,
            if_none_match,
            unmodified_since,
            may_replace: self.may_replace(),
        }
    }

    /// Evaluates the preconditions against the version of the row the handler has
    /// locked (`SELECT ... FOR UPDATE` in its own transaction), with exactly the
    /// rules of RFC 9110 section 13.2.2. `current` is `None` when there is no row.
    ///
    /// On `Err`, return the [`NotApplied`] (and roll back): the layer answers `412`
    /// with the current validators.
    pub fn check(&self, current: Option<&RowVersion>) -> Result<(), NotApplied> {
        self.consult();
        match evaluate(
            &self.inner.method,
            &self.inner.pre,
            current.map(RowVersion::as_version),
        ) {
            Decision::PreconditionFailed => Err(NotApplied {
                current: current.cloned(),
            }),
            Decision::Proceed | Decision::NotModified => Ok(()),
        }
    }

    /// What a conditional write that changed no row means, given the row's version
    /// read afterwards (`None` when there is no row):
    ///
    /// * `Some(NotApplied)`: a precondition failed; return it, and the layer answers
    ///   `412` with `current`'s validators.
    /// * `None`: the row is missing and the preconditions allow the method on a
    ///   missing resource (none, `If-None-Match`): answer as the handler would without
    ///   preconditions (`404` for `PATCH` and `DELETE`).
    ///
    /// A row that exists is always `412`, even when it would pass now: it was written
    /// by someone else between the refused statement and the read.
    pub fn not_applied(&self, current: Option<RowVersion>) -> Option<NotApplied> {
        self.consult();
        match current {
            Some(current) => Some(NotApplied {
                current: Some(current),
            }),
            None if self.may_create() => None,
            None => Some(NotApplied { current: None }),
        }
    }

    /// [`not_applied`](Self::not_applied) for an upsert, a statement that inserts the
    /// row when it is missing: one that changed no row found the row when it ran,
    /// whatever a read afterwards finds (a `DELETE` may have removed it since). So it is
    /// always a precondition that failed: `412`, with `current`'s validators when the
    /// row is still there. (Answering `404` would tell the client a create it just saw
    /// refused would now pass, for a moment that already lies in the past.)
    #[must_use]
    pub fn upsert_not_applied(&self, current: Option<RowVersion>) -> NotApplied {
        self.consult();
        NotApplied { current }
    }

    fn consult(&self) {
        self.inner.consulted.store(true, Ordering::Relaxed);
    }

    pub(crate) fn was_consulted(&self) -> bool {
        self.inner.consulted.load(Ordering::Relaxed)
    }
}

/// The bind values of a one-statement conditional write, in the order
/// [`PgRowSql::condition`](super::PgRowSql::condition) numbers them.
///
/// Tags that cannot name a `bigint` version (another server's, a weak one in
/// `If-Match`) are dropped: they match no row. An `If-Match` with only such tags is
/// then an empty list, which no row passes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqlCondition {
    pub(super) if_match: Option<Vec<i64>>,
    pub(super) if_none_match: Option<Vec<i64>>,
    pub(super) unmodified_since: Option<i64>,
    pub(super) may_replace: bool,
}

impl SqlCondition {
    /// The versions `If-Match` names (`NULL`: no `If-Match`, or `*`).
    pub fn if_match(&self) -> Option<&[i64]> {
        self.if_match.as_deref()
    }

    /// The versions `If-None-Match` names (`NULL`: no `If-None-Match`, or `*`).
    pub fn if_none_match(&self) -> Option<&[i64]> {
        self.if_none_match.as_deref()
    }

    /// `If-Unmodified-Since` as seconds since the epoch (`NULL`: absent, invalid, or
    /// overridden by `If-Match`).
    pub fn unmodified_since(&self) -> Option<i64> {
        self.unmodified_since
    }

    /// Whether an existing row may be written (`false` under `If-None-Match: *`).
    pub fn may_replace(&self) -> bool {
        self.may_replace
    }

    /// This condition's form: which statement text of a
    /// [`PgSpecializedStatement`](super::PgSpecializedStatement) it takes.
    pub(super) fn form(&self) -> ConditionForm {
        if !self.may_replace || matches!(self.if_match.as_deref(), Some([])) {
            return ConditionForm::Never;
        }
        ConditionForm::Compare {
            if_match: ListForm::of(self.if_match.as_deref()),
            if_none_match: ListForm::of(self.if_none_match.as_deref()),
            unmodified_since: self.unmodified_since.is_some(),
        }
    }

    /// The values the specialized text of this condition's form compares, in the
    /// order it numbers them: `If-Match`, `If-None-Match`, `If-Unmodified-Since`.
    #[cfg(any(feature = "postgres", feature = "sqlx-postgres", test))]
    pub(super) fn specialized_values(&self) -> impl Iterator<Item = SpecializedValue<'_>> {
        let (lists, since) = match self.form() {
            ConditionForm::Never => ([None, None], None),
            ConditionForm::Compare { .. } => (
                [self.if_match.as_ref(), self.if_none_match.as_ref()],
                self.unmodified_since.as_ref(),
            ),
        };
        lists
            .into_iter()
            .filter_map(|list| {
                let list = list?;
                match list.as_slice() {
                    [] => None,
                    [one] => Some(SpecializedValue::One(one)),
                    _ => Some(SpecializedValue::Many(list)),
                }
            })
            .chain(since.map(SpecializedValue::Seconds))
    }
}

/// One value a specialized condition text takes (see [`SqlCondition::form`]).
#[cfg(any(feature = "postgres", feature = "sqlx-postgres", test))]
#[derive(Clone, Copy, Debug)]
pub(super) enum SpecializedValue<'a> {
    /// One version, bound as `int8`.
    One(&'a i64),
    /// Several, bound as `int8[]`.
    Many(&'a Vec<i64>),
    /// `If-Unmodified-Since`, seconds since the epoch, bound as `int8`.
    Seconds(&'a i64),
}

/// How many versions one list of a [`SqlCondition`] names, as its specialized text
/// ([`PgRowSql::specialized`](super::PgRowSql::specialized)) compares them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ListForm {
    /// No list (or one that names nothing this server issued, in `If-None-Match`).
    Absent,
    /// One version: compared as a scalar.
    One,
    /// Several: compared with `ANY` / `ALL` over an array.
    Many,
}

impl ListForm {
    const ALL: [Self; 3] = [Self::Absent, Self::One, Self::Many];

    fn of(list: Option<&[i64]>) -> Self {
        match list {
            None | Some([]) => Self::Absent,
            Some([_]) => Self::One,
            Some(_) => Self::Many,
        }
    }
}

/// The form of a [`SqlCondition`]: which of its values are there, and how many
/// versions each list names. Each form has its own statement text, which compares
/// only what is there (a generic text that tests every value for `NULL` costs the
/// database about a tenth of a simple write).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ConditionForm {
    /// Nothing can pass: `If-None-Match: *` on an existing row, or an `If-Match`
    /// whose tags name no version of this server's.
    Never,
    /// The values the condition compares.
    Compare {
        if_match: ListForm,
        if_none_match: ListForm,
        unmodified_since: bool,
    },
}

impl ConditionForm {
    /// How many forms there are (the length of [`index`](Self::index)'s range).
    pub(super) const COUNT: usize = 1 + 3 * 3 * 2;

    /// Every form, in [`index`](Self::index) order.
    pub(super) fn all() -> impl Iterator<Item = Self> {
        std::iter::once(Self::Never).chain(ListForm::ALL.into_iter().flat_map(|if_match| {
            ListForm::ALL.into_iter().flat_map(move |if_none_match| {
                [false, true]
                    .into_iter()
                    .map(move |unmodified_since| Self::Compare {
                        if_match,
                        if_none_match,
                        unmodified_since,
                    })
            })
        }))
    }

    /// A dense index, `0..COUNT`.
    pub(super) fn index(self) -> usize {
        match self {
            Self::Never => 0,
            Self::Compare {
                if_match,
                if_none_match,
                unmodified_since,
            } => {
                1 + (if_match as usize) * 6
                    + (if_none_match as usize) * 2
                    + usize::from(unmodified_since)
            }
        }
    }
}

/// The handler's report that its conditional write changed nothing because a
/// precondition failed: return it (in axum it is a response; elsewhere
/// [`into_http_response`](Self::into_http_response)), and
/// [`RowVersionLayer`](super::RowVersionLayer) answers `412 Precondition Failed` with
/// a problem document and the current `ETag` / `Last-Modified`.
///
/// Built by [`RowPrecondition::check`] or [`RowPrecondition::not_applied`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotApplied {
    current: Option<RowVersion>,
}

impl NotApplied {
    /// The row's current version, if it has one.
    pub fn current(&self) -> Option<&RowVersion> {
        self.current.as_ref()
    }

    /// A bare `412` that carries this report for the layer to complete.
    pub fn into_http_response<B: Default>(self) -> http::Response<B> {
        let mut response = http::Response::new(B::default());
        *response.status_mut() = StatusCode::PRECONDITION_FAILED;
        response.extensions_mut().insert(self);
        response
    }

    pub(crate) fn into_current(self) -> Option<RowVersion> {
        self.current
    }
}

#[cfg(feature = "axum")]
mod axum_impls {
    use axum_core::{
        body::Body,
        extract::FromRequestParts,
        response::{IntoResponse, Response},
    };
    use http::{header, request::Parts, StatusCode};

    use super::{NotApplied, RowPrecondition};

    impl IntoResponse for NotApplied {
        fn into_response(self) -> Response {
            self.into_http_response::<Body>()
        }
    }

    /// The rejection when a handler asks for a [`RowPrecondition`] on a request that
    /// has none: the route is not behind
    /// [`RowVersionLayer`](crate::row_version::RowVersionLayer), or the method is not
    /// one it versions. A server bug, so `500`, and nothing is written.
    #[derive(Debug, Clone, Copy)]
    pub struct MissingRowPrecondition;

    impl IntoResponse for MissingRowPrecondition {
        fn into_response(self) -> Response {
            let body = "{\"type\":\"about:blank\",\"title\":\"Missing precondition\",\
                        \"status\":500,\"code\":\"missing_row_precondition\",\"detail\":\
                        \"This handler needs the RowPrecondition of RowVersionLayer, \
                        which this request does not have.\"}";
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                [(header::CONTENT_TYPE, "application/problem+json")],
                body,
            )
                .into_response()
        }
    }

    impl<S> FromRequestParts<S> for RowPrecondition {
        type Rejection = MissingRowPrecondition;

        fn from_request_parts(
            parts: &mut Parts,
            _state: &S,
        ) -> impl std::future::Future<Output = Result<Self, Self::Rejection>> + Send {
            let found = parts.extensions.get::<RowPrecondition>().cloned();
            if found.is_none() {
                tracing::error!("handler asked for a RowPrecondition, but the request has none");
            }
            std::future::ready(found.ok_or(MissingRowPrecondition))
        }
    }
}

#[cfg(feature = "axum")]
pub use self::axum_impls::MissingRowPrecondition;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etag::EntityTag;

    fn tags(list: &[&str]) -> TagList {
        TagList::Tags(
            list.iter()
                .map(|t| t.parse::<EntityTag>().unwrap())
                .collect(),
        )
    }

    fn condition(method: Method, pre: Preconditions) -> RowPrecondition {
        RowPrecondition::new(method, pre)
    }

    #[test]
    fn sql_values_for_every_form() {
        let if_match = condition(
            Method::PUT,
            Preconditions {
                if_match: Some(tags(&["\"3\"", "\"4-gzip\"", "W/\"5\"", "\"x\""])),
                if_unmodified_since: Some(100),
                ..Default::default()
            },
        );
        let sql = if_match.sql();
        assert_eq!(sql.if_match(), Some(&[3, 4][..]));
        // If-Match wins over If-Unmodified-Since.
        assert_eq!(sql.unmodified_since(), None);
        assert!(sql.may_replace() && !if_match.may_create());

        let any = condition(
            Method::PUT,
            Preconditions {
                if_match: Some(TagList::Any),
                ..Default::default()
            },
        );
        assert_eq!(any.sql().if_match(), None);
        assert!(!any.may_create());

        let create = condition(
            Method::PUT,
            Preconditions {
                if_none_match: Some(TagList::Any),
                ..Default::default()
            },
        );
        assert!(!create.sql().may_replace() && create.may_create());

        let none_match = condition(
            Method::PUT,
            Preconditions {
                if_none_match: Some(tags(&["W/\"9\""])),
                ..Default::default()
            },
        );
        assert_eq!(none_match.sql().if_none_match(), Some(&[9][..]));
        assert!(none_match.may_create() && none_match.may_replace());

        let since = condition(
            Method::PUT,
            Preconditions {
                if_unmodified_since: Some(u64::MAX),
                ..Default::default()
            },
        );
        assert_eq!(since.sql().unmodified_since(), Some(MAX_HTTP_DATE_SECS));
        assert!(!since.may_create());

        let plain = condition(Method::PUT, Preconditions::default());
        assert!(plain.is_unconditional() && plain.may_create() && !plain.was_consulted());
        let sql = plain.sql();
        assert!(plain.was_consulted());
        assert_eq!(
            (sql.if_match(), sql.if_none_match(), sql.unmodified_since()),
            (None, None, None)
        );
    }

    #[test]
    fn not_applied_follows_the_rfc_on_a_missing_row() {
        let if_match = condition(
            Method::DELETE,
            Preconditions {
                if_match: Some(tags(&["\"3\""])),
                ..Default::default()
            },
        );
        assert_eq!(
            if_match.not_applied(None),
            Some(NotApplied { current: None })
        );
        let plain = condition(Method::DELETE, Preconditions::default());
        assert_eq!(plain.not_applied(None), None);
        let current = RowVersion::from_columns(4, None);
        assert_eq!(
            plain.not_applied(Some(current.clone())).unwrap().current(),
            Some(&current)
        );
    }

    #[test]
    fn a_refused_upsert_is_a_412_even_when_the_row_is_gone() {
        let create = condition(
            Method::PUT,
            Preconditions {
                if_none_match: Some(TagList::Any),
                ..Default::default()
            },
        );
        // `not_applied` alone would call the missing row a missing resource.
        assert_eq!(create.not_applied(None), None);
        assert_eq!(
            create.upsert_not_applied(None),
            NotApplied { current: None }
        );
        let current = RowVersion::from_columns(2, None);
        assert_eq!(
            create.upsert_not_applied(Some(current.clone())).current(),
            Some(&current)
        );
    }

    #[test]
    fn check_uses_the_rfc_rules() {
        let v3 = RowVersion::from_columns(3, Some(1_000_000_000_264_513));
        let stale = condition(
            Method::PATCH,
            Preconditions {
                if_match: Some(tags(&["\"2\""])),
                ..Default::default()
            },
        );
        assert_eq!(stale.check(Some(&v3)).unwrap_err().current(), Some(&v3));
        let fresh = condition(
            Method::PATCH,
            Preconditions {
                if_match: Some(tags(&["\"3-br\""])),
                ..Default::default()
            },
        );
        assert!(fresh.check(Some(&v3)).is_ok());
        // The same second, unambiguous: passes; ambiguous: fails.
        let since = Preconditions {
            if_unmodified_since: Some(1_000_000_000),
            ..Default::default()
        };
        assert!(condition(Method::PUT, since.clone())
            .check(Some(&v3))
            .is_ok());
        let v4 = RowVersion::from_columns(4, Some(1_000_000_000_999_999));
        assert!(condition(Method::PUT, since.clone())
            .check(Some(&v4))
            .is_err());
        // No date kept: a write's If-Unmodified-Since fails closed.
        let undated = RowVersion::from_columns(5, None);
        assert!(condition(Method::PUT, since).check(Some(&undated)).is_err());
    }
}
