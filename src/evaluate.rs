//! Pure RFC 9110 section 13.2.2 evaluation: `(method, preconditions, current version) -> decision`.
//!
//! No I/O and no clock: the same inputs always give the same [`Decision`], which is
//! what lets it be tested exhaustively.
//!
//! The order is the RFC's:
//!
//! 1. `If-Match` present: false gives `412`. Strong comparison; `*` is true iff a
//!    current version exists.
//! 2. else `If-Unmodified-Since` (a valid date): false gives `412`.
//! 3. `If-None-Match` present: false gives `304` for GET/HEAD, `412` otherwise. Weak
//!    comparison; `*` is false iff a current version exists.
//! 4. else, GET/HEAD only, `If-Modified-Since` (a valid date): false gives `304`.
//!
//! # Where we are stricter than the RFC, and why
//!
//! * A version committed in the same second as its predecessor is
//!   [ambiguous](crate::store::Version::last_modified_ambiguous): its date names two
//!   versions. `If-Unmodified-Since` naming that second fails (a spurious `412` beats a
//!   lost update) and `If-Modified-Since` naming it is treated as modified (a `200`
//!   beats a stale `304`).
//! * With no known version, an `If-Unmodified-Since` on a write fails instead of being
//!   ignored: the store may have forgotten a version (a Redis restart without
//!   persistence), and the date can then not be checked. Reads ignore it as the RFC says.
//!
//! # Malformed fields
//!
//! A malformed `If-Match` is refused (`400`), and so is a malformed `If-None-Match` on
//! a write. On a read a malformed `If-None-Match` is ignored, as Go's `net/http` and
//! Django do: the read is served as if it were absent
//! ([`Preconditions::from_request`]). Dates that do not parse are always ignored.
//!
//! # Where the layer cannot know, and defers to the handler
//!
//! * `If-None-Match: *` on a write against a [seeded](Version::is_seeded) version (one a
//!   read gave, not a write) proceeds: a `200` read proves a representation was served,
//!   not that the resource exists. The handler's own conditional insert decides
//!   ([`Reservation::is_create`](crate::Reservation::is_create) is then true).

use http::{
    header::{self, HeaderMap, HeaderName},
    Method,
};

use crate::{
    etag::{parse_tag_list, InvalidTagList, TagList},
    store::{unix_secs, Version},
};

/// The precondition fields of one request, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Preconditions {
    /// `If-Match`.
    pub if_match: Option<TagList>,
    /// `If-None-Match`.
    pub if_none_match: Option<TagList>,
    /// `If-Unmodified-Since`, whole seconds since the epoch; `None` when absent or invalid.
    pub if_unmodified_since: Option<u64>,
    /// `If-Modified-Since`, whole seconds since the epoch; `None` when absent or invalid.
    pub if_modified_since: Option<u64>,
}

impl Preconditions {
    /// Parses the four precondition fields.
    ///
    /// A malformed `If-Match` / `If-None-Match` is an error (the layer answers `400`,
    /// except for an `If-None-Match` on a read: see [`from_request`](Self::from_request)).
    /// A date that is not a valid HTTP-date (IMF-fixdate, RFC 850 or asctime), or that is
    /// sent on more than one field line, is ignored, as RFC 9110 sections 13.1.3 and
    /// 13.1.4 require.
    ///
    /// ```
    /// use http::{HeaderMap, header};
    /// use tower_precondition::evaluate::Preconditions;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert(header::IF_MATCH, "\"v1\"".parse().unwrap());
    /// headers.insert(header::IF_UNMODIFIED_SINCE, "not a date".parse().unwrap());
    /// let pre = Preconditions::from_headers(&headers).unwrap();
    /// assert!(pre.if_match.is_some());
    /// assert_eq!(pre.if_unmodified_since, None);
    /// ```
    pub fn from_headers(headers: &HeaderMap) -> Result<Self, InvalidTagList> {
        let present = PresentFields::of(headers);
        // An absent field parses as `None` without an error: skipping it changes nothing.
        Ok(Self {
            if_match: if present.if_match {
                parse_tag_list(headers, &header::IF_MATCH)?
            } else {
                None
            },
            if_none_match: if present.if_none_match {
                parse_tag_list(headers, &header::IF_NONE_MATCH)?
            } else {
                None
            },
            if_unmodified_since: if present.if_unmodified_since {
                parse_date(headers, &header::IF_UNMODIFIED_SINCE)
            } else {
                None
            },
            if_modified_since: if present.if_modified_since {
                parse_date(headers, &header::IF_MODIFIED_SINCE)
            } else {
                None
            },
        })
    }

    /// Parses the four precondition fields of a request with `method`, as the layers do.
    ///
    /// Like [`from_headers`](Self::from_headers), except that on a read (`GET`, `HEAD`)
    /// a malformed `If-None-Match` is ignored: the request is served as if it had none
    /// (so `If-Modified-Since` then applies). A read changes nothing, and its worst
    /// outcome is then a full `200` where a `304` might have done, which is what Go's
    /// `net/http` and Django do; a `400` would break a page over a cache's bad header.
    /// A write keeps the `400`: a condition it cannot read must not be guessed.
    ///
    /// ```
    /// use http::{HeaderMap, Method, header};
    /// use tower_precondition::evaluate::Preconditions;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert(header::IF_NONE_MATCH, "not a tag".parse().unwrap());
    /// let read = Preconditions::from_request(&Method::GET, &headers).unwrap();
    /// assert_eq!(read.if_none_match, None);
    /// assert!(Preconditions::from_request(&Method::PUT, &headers).is_err());
    /// ```
    pub fn from_request(method: &Method, headers: &HeaderMap) -> Result<Self, InvalidTagList> {
        match Self::from_headers(headers) {
            Err(error) if is_read(method) && error.header() == header::IF_NONE_MATCH => {
                Ok(Self {
                    // `If-Match` parsed without error (it is parsed first).
                    if_match: parse_tag_list(headers, &header::IF_MATCH)?,
                    if_none_match: None,
                    if_unmodified_since: parse_date(headers, &header::IF_UNMODIFIED_SINCE),
                    if_modified_since: parse_date(headers, &header::IF_MODIFIED_SINCE),
                })
            }
            parsed => parsed,
        }
    }

    /// Whether any precondition that guards a write is present
    /// (`If-Match`, `If-None-Match` or a valid `If-Unmodified-Since`).
    pub fn guards_write(&self) -> bool {
        self.if_match.is_some()
            || self.if_none_match.is_some()
            || self.if_unmodified_since.is_some()
    }

    /// Whether a precondition that names the version a write replaces is present:
    /// `If-Match` with entity tags, or `If-None-Match: *` (the resource must not
    /// exist). The test of [`PreconditionPolicy::Strict`](crate::PreconditionPolicy::Strict).
    ///
    /// ```
    /// use http::{HeaderMap, header};
    /// use tower_precondition::evaluate::Preconditions;
    ///
    /// let mut headers = HeaderMap::new();
    /// headers.insert(header::IF_NONE_MATCH, "\"x\"".parse().unwrap());
    /// let pre = Preconditions::from_headers(&headers).unwrap();
    /// assert!(pre.guards_write() && !pre.guards_write_strictly());
    /// ```
    pub fn guards_write_strictly(&self) -> bool {
        matches!(self.if_match, Some(TagList::Tags(_)))
            || matches!(self.if_none_match, Some(TagList::Any))
    }

    /// Whether no precondition at all is present.
    pub fn is_empty(&self) -> bool {
        !self.guards_write() && self.if_modified_since.is_none()
    }
}

/// Which of the four precondition fields a request may have: those it has, or all
/// four when it has too many fields to look through.
#[derive(Default)]
struct PresentFields {
    if_match: bool,
    if_none_match: bool,
    if_unmodified_since: bool,
    if_modified_since: bool,
}

impl PresentFields {
    /// Up to this many field names, one pass over them costs fewer instructions than
    /// hashing each of the four names for a lookup (about 110 instructions a lookup,
    /// 10 a name: measured, the break-even is near 25 names with an `If-Match`).
    const SCAN_LIMIT: usize = 24;

    const ALL: Self = Self {
        if_match: true,
        if_none_match: true,
        if_unmodified_since: true,
        if_modified_since: true,
    };

    fn of(headers: &HeaderMap) -> Self {
        if headers.keys_len() > Self::SCAN_LIMIT {
            return Self::ALL;
        }
        let mut present = Self::default();
        // Each name once, however many lines it has; a name is a key iff it has a line.
        for name in headers.keys() {
            if name == header::IF_MATCH {
                present.if_match = true;
            } else if name == header::IF_NONE_MATCH {
                present.if_none_match = true;
            } else if name == header::IF_UNMODIFIED_SINCE {
                present.if_unmodified_since = true;
            } else if name == header::IF_MODIFIED_SINCE {
                present.if_modified_since = true;
            }
        }
        present
    }
}

/// Parses an HTTP-date field with exactly one field line; anything else is ignored.
fn parse_date(headers: &HeaderMap, name: &HeaderName) -> Option<u64> {
    let mut values = headers.get_all(name).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let text = value.to_str().ok()?;
    httpdate::parse_http_date(text.trim()).ok().map(unix_secs)
}

/// Formats a time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
///
/// Test-only: responses render `Last-Modified` in place (`response::set_validators`).
#[cfg(test)]
pub(crate) fn http_date(time: std::time::SystemTime) -> String {
    httpdate::fmt_http_date(time)
}

/// The result of evaluating the preconditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Every precondition holds (or none applies): perform the method.
    Proceed,
    /// A read whose representation the client already has: answer `304`.
    NotModified,
    /// A precondition failed: answer `412`.
    PreconditionFailed,
}

/// Whether `method` is a read for the purposes of `If-None-Match` / `If-Modified-Since`.
pub fn is_read(method: &Method) -> bool {
    method == Method::GET || method == Method::HEAD
}

/// Evaluates `pre` for a request with `method` on a resource whose current version is
/// `current` (`None` when the resource has no known version).
///
/// ```
/// use http::Method;
/// use tower_precondition::{evaluate::{evaluate, Decision, Preconditions}, etag::TagList};
/// use tower_precondition::{store::Version, EntityTag};
///
/// let current = Version::new("\"v2\"".parse().unwrap(), std::time::SystemTime::now()).unwrap();
/// let stale = Preconditions {
///     if_match: Some(TagList::Tags(EntityTag::strong("v1").unwrap().into())),
///     ..Default::default()
/// };
/// assert_eq!(evaluate(&Method::PUT, &stale, Some(&current)), Decision::PreconditionFailed);
/// ```
pub fn evaluate(method: &Method, pre: &Preconditions, current: Option<&Version>) -> Decision {
    let read = is_read(method);

    // Step 1 and 2.
    if let Some(if_match) = &pre.if_match {
        let holds = current.is_some_and(|v| if_match.strong_match(v.etag()));
        if !holds {
            return Decision::PreconditionFailed;
        }
    } else if let Some(since) = pre.if_unmodified_since {
        let holds = match current {
            Some(v) => unmodified_since(v, since),
            // Nothing to compare with: the RFC ignores the field; a write fails closed.
            None => read,
        };
        if !holds {
            return Decision::PreconditionFailed;
        }
    }

    // Step 3 and 4.
    if let Some(if_none_match) = &pre.if_none_match {
        // A read-seeded version shows that a representation was served, not that the
        // resource exists (a fallback page answers 200 too): `If-None-Match: *` on a
        // write is then left to the handler's own conditional insert, or a seed could
        // turn every later create of that resource into a 412.
        let existence_unknown = !read
            && matches!(if_none_match, TagList::Any)
            && current.is_some_and(Version::is_seeded);
        let matched =
            !existence_unknown && current.is_some_and(|v| if_none_match.weak_match(v.etag()));
        if matched {
            return if read {
                Decision::NotModified
            } else {
                Decision::PreconditionFailed
            };
        }
    } else if let (true, Some(since), Some(v)) = (read, pre.if_modified_since, current) {
        if unmodified_since(v, since) {
            return Decision::NotModified;
        }
    }

    Decision::Proceed
}

/// Whether `version` was last modified no later than `since` (whole seconds), counting
/// an ambiguous date as modified within its second.
fn unmodified_since(version: &Version, since: u64) -> bool {
    let modified = version.last_modified_secs();
    modified < since || (modified == since && !version.last_modified_ambiguous())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::etag::EntityTag;
    use http::HeaderValue;

    const T: u64 = 784_111_777; // Sun, 06 Nov 1994 08:49:37 GMT

    fn version(tag: &str, secs: u64) -> Version {
        Version::from_parts(EntityTag::strong(tag).unwrap(), secs, false).unwrap()
    }

    fn headers(pairs: &[(HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(name.clone(), HeaderValue::from_str(value).unwrap());
        }
        h
    }

    #[test]
    fn all_three_date_forms_parse() {
        for date in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            let pre = Preconditions::from_headers(&headers(&[(header::IF_MODIFIED_SINCE, date)]))
                .unwrap();
            assert_eq!(pre.if_modified_since, Some(T), "{date}");
        }
    }

    #[test]
    fn invalid_or_repeated_dates_are_ignored() {
        for bad in ["yesterday", "Sun, 06 Nov 1994 08:49:37", "0", ""] {
            let pre = Preconditions::from_headers(&headers(&[(header::IF_UNMODIFIED_SINCE, bad)]))
                .unwrap();
            assert_eq!(pre.if_unmodified_since, None, "{bad}");
        }
        let two = headers(&[
            (header::IF_MODIFIED_SINCE, "Sun, 06 Nov 1994 08:49:37 GMT"),
            (header::IF_MODIFIED_SINCE, "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        assert_eq!(
            Preconditions::from_headers(&two).unwrap().if_modified_since,
            None
        );
    }

    #[test]
    fn ambiguous_second_fails_unmodified_since() {
        let v = Version::from_parts(EntityTag::strong("b").unwrap(), T, true).unwrap();
        let pre = Preconditions {
            if_unmodified_since: Some(T),
            ..Default::default()
        };
        assert_eq!(
            evaluate(&Method::PUT, &pre, Some(&v)),
            Decision::PreconditionFailed
        );
        let ims = Preconditions {
            if_modified_since: Some(T),
            ..Default::default()
        };
        assert_eq!(evaluate(&Method::GET, &ims, Some(&v)), Decision::Proceed);
        // One second later the date is unambiguous again.
        let later = Preconditions {
            if_unmodified_since: Some(T + 1),
            ..Default::default()
        };
        assert_eq!(evaluate(&Method::PUT, &later, Some(&v)), Decision::Proceed);
    }

    #[test]
    fn unmodified_since_without_version() {
        let pre = Preconditions {
            if_unmodified_since: Some(T),
            ..Default::default()
        };
        assert_eq!(
            evaluate(&Method::PUT, &pre, None),
            Decision::PreconditionFailed
        );
        assert_eq!(evaluate(&Method::GET, &pre, None), Decision::Proceed);
    }

    #[test]
    fn if_match_beats_unmodified_since() {
        let v = version("a", T);
        let pre = Preconditions {
            if_match: Some(TagList::Tags(EntityTag::strong("a").unwrap().into())),
            if_unmodified_since: Some(T - 100),
            ..Default::default()
        };
        assert_eq!(evaluate(&Method::PUT, &pre, Some(&v)), Decision::Proceed);
    }

    /// `from_headers` as it was: a lookup of each of the four fields.
    fn from_headers_by_lookup(headers: &HeaderMap) -> Result<Preconditions, InvalidTagList> {
        Ok(Preconditions {
            if_match: parse_tag_list(headers, &header::IF_MATCH)?,
            if_none_match: parse_tag_list(headers, &header::IF_NONE_MATCH)?,
            if_unmodified_since: parse_date(headers, &header::IF_UNMODIFIED_SINCE),
            if_modified_since: parse_date(headers, &header::IF_MODIFIED_SINCE),
        })
    }

    const DATE: &str = "Sun, 06 Nov 1994 08:49:37 GMT";

    #[test]
    fn scanned_fields_read_as_looked_up() {
        let filler = |n: usize| -> Vec<(HeaderName, &str)> {
            (0..n)
                .map(|i| (HeaderName::try_from(format!("x-filler-{i}")).unwrap(), "1"))
                .collect()
        };
        for extra in [
            0,
            1,
            9,
            PresentFields::SCAN_LIMIT - 1,
            PresentFields::SCAN_LIMIT,
            40,
        ] {
            for fields in [
                vec![],
                vec![(header::IF_MATCH, "\"a\"")],
                vec![(header::IF_MATCH, "\"a\""), (header::IF_MATCH, "W/\"b\"")],
                vec![(header::IF_MATCH, "bad"), (header::IF_NONE_MATCH, "bad")],
                vec![
                    (header::IF_NONE_MATCH, "*"),
                    (header::IF_MODIFIED_SINCE, DATE),
                ],
                vec![(header::IF_UNMODIFIED_SINCE, DATE)],
                vec![
                    (header::IF_UNMODIFIED_SINCE, DATE),
                    (header::IF_UNMODIFIED_SINCE, DATE),
                ],
                vec![(header::IF_MODIFIED_SINCE, "yesterday")],
            ] {
                let mut pairs = filler(extra);
                pairs.extend(fields);
                let map = headers(&pairs);
                assert_eq!(
                    Preconditions::from_headers(&map),
                    from_headers_by_lookup(&map),
                    "{map:?}"
                );
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn scanned_fields_read_as_looked_up_any(
            fields in proptest::collection::vec((0..12_usize, 0..6_usize), 0..48)
        ) {
            let names = [
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                header::IF_UNMODIFIED_SINCE,
                header::IF_MODIFIED_SINCE,
                header::IF_RANGE,
                header::HOST,
                HeaderName::from_static("x-a"),
                HeaderName::from_static("x-b"),
            ];
            let values = ["\"a\"", "W/\"b\", \"c\"", "*", "bad", DATE, ""];
            let mut map = HeaderMap::new();
            for (i, (name, value)) in fields.into_iter().enumerate() {
                // Distinct filler names too, to cross the scan limit.
                let name = match name {
                    7.. => HeaderName::try_from(format!("x-{i}")).unwrap(),
                    name => names[name].clone(),
                };
                map.append(name, HeaderValue::from_static(values[value]));
            }
            proptest::prop_assert_eq!(
                Preconditions::from_headers(&map),
                from_headers_by_lookup(&map)
            );
        }
    }

    #[test]
    fn guards_write() {
        assert!(!Preconditions::default().guards_write());
        let ims = Preconditions {
            if_modified_since: Some(T),
            ..Default::default()
        };
        assert!(!ims.guards_write() && !ims.is_empty());
    }
}
