//! [`RowVersion`]: the version a row carries, as the database returned it.

use std::time::SystemTime;

use crate::{etag::EntityTag, store::Version};

/// The marker of an ambiguous modification time: the last microsecond of its second.
///
/// A write that lands in the same second as its predecessor cannot be told apart from
/// it by an HTTP date, so [`PgRowSql::assignments`](super::PgRowSql::assignments)
/// stores it at `<second>.999999`, and the predicate refuses an `If-Unmodified-Since`
/// naming that second. A first write that happens to land on that microsecond is taken
/// for ambiguous too: a spurious `412`, never a lost update.
pub(crate) const AMBIGUOUS_MICROS: i64 = 999_999;

/// The version of one row: a strong entity tag, and the row's modification time when
/// the table keeps one.
///
/// The handler builds it from the columns its statement returned (the same statement
/// that returned the body, so the tag always names that body) and hands it to the
/// layer with the response: in axum, as a response part (`(version, Json(item))`);
/// elsewhere with [`attach`](Self::attach). The layer then sets `ETag` and
/// `Last-Modified` and answers `304` when the read's `If-None-Match` /
/// `If-Modified-Since` match.
///
/// ```
/// use tower_precondition::row_version::RowVersion;
///
/// // `version` 42, modified at 2026-12-02T04:22:55.264513Z.
/// let version = RowVersion::from_columns(42, Some(1_796_185_375_264_513));
/// assert_eq!(version.etag().to_string(), "\"42\"");
/// assert_eq!(version.counter(), Some(42));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RowVersion {
    version: Version,
    has_date: bool,
    counter: Option<i64>,
}

impl RowVersion {
    /// The version of a row whose version column holds `version` (a `bigint` that
    /// never repeats for a key) and whose modification column holds `modified_micros`
    /// (microseconds since the Unix epoch, as
    /// [`PgRowSql::returning`](super::PgRowSql::returning) selects it), or `None` when
    /// the table keeps no modification time.
    ///
    /// The entity tag is the decimal number, quoted: `"42"`.
    pub fn from_columns(version: i64, modified_micros: Option<i64>) -> Self {
        let tag = EntityTag::strong_from_valid(&version.to_string());
        let mut row = Self::with_tag(tag, modified_micros);
        row.counter = Some(version);
        row
    }

    /// The version of a row whose version is not a `bigint` (a `uuid`, a hash of the
    /// content): `tag` must be strong and must never repeat for the resource, across
    /// deletes too. Such a version can be checked with
    /// [`RowPrecondition::check`](super::RowPrecondition::check) (the pessimistic path);
    /// the one-statement SQL helpers compare `bigint` versions only.
    ///
    /// Returns `None` if `tag` is weak.
    pub fn from_tag(tag: EntityTag, modified_micros: Option<i64>) -> Option<Self> {
        (!tag.is_weak()).then(|| Self::with_tag(tag, modified_micros))
    }

    fn with_tag(tag: EntityTag, modified_micros: Option<i64>) -> Self {
        let (secs, ambiguous, has_date) = match modified_micros {
            Some(micros) => {
                let secs = micros.div_euclid(1_000_000);
                let ambiguous = micros.rem_euclid(1_000_000) == AMBIGUOUS_MICROS;
                // Before 1970 there is no HTTP date to compare with: treated as unknown.
                match u64::try_from(secs) {
                    Ok(secs) => (secs, ambiguous, true),
                    Err(_) => (u64::MAX, true, false),
                }
            }
            // No date: `If-Unmodified-Since` fails on writes, `If-Modified-Since` never
            // gives a `304` (an unknown date counts as modified just now).
            None => (u64::MAX, true, false),
        };
        let version = Version::from_parts(tag, secs, ambiguous)
            .expect("row version tags are strong (checked by the constructors)");
        Self {
            version,
            has_date,
            counter: None,
        }
    }

    /// The strong entity tag of this version.
    pub fn etag(&self) -> &EntityTag {
        self.version.etag()
    }

    /// The `bigint` version this was built from with
    /// [`from_columns`](Self::from_columns).
    pub fn counter(&self) -> Option<i64> {
        self.counter
    }

    /// The modification time, whole seconds, when the row keeps one.
    pub fn last_modified(&self) -> Option<SystemTime> {
        self.has_date.then(|| self.version.last_modified())
    }

    /// Whether another write landed within the same second before this one, so that its
    /// date names two versions (date preconditions naming it are then evaluated
    /// conservatively).
    pub fn last_modified_ambiguous(&self) -> bool {
        self.has_date && self.version.last_modified_ambiguous()
    }

    /// Puts this version on `response`, for the layer to read (outside axum, where it
    /// is a response part).
    pub fn attach<B>(self, response: &mut http::Response<B>) {
        response.extensions_mut().insert(self);
    }

    /// The version for evaluation, with "no date" as the conservative date.
    pub(crate) fn as_version(&self) -> &Version {
        &self.version
    }

    /// Whether `Last-Modified` may be sent.
    pub(crate) fn has_date(&self) -> bool {
        self.has_date
    }
}

/// The `bigint` version a client's tag names, if it names one: the decimal number,
/// alone or with the suffix of an encoded representation (`"42-gzip"`). A weak tag
/// names one only for the weak comparison (`If-None-Match`), where `weak` is true.
pub(crate) fn counter_named_by(tag: &EntityTag, weak: bool) -> Option<i64> {
    if tag.is_weak() && !weak {
        return None;
    }
    let opaque = tag.opaque();
    let digits_end = opaque
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(opaque.len(), |(i, _)| i);
    let number: i64 = opaque[..digits_end].parse().ok()?;
    // Only the canonical spelling (`"042"` is not `"42"`): the comparison is strong.
    let canonical = EntityTag::strong_from_valid(&number.to_string());
    tag.names_version(&canonical).then_some(number)
}

#[cfg(feature = "axum")]
mod response_part {
    use axum_core::response::{IntoResponseParts, ResponseParts};

    use super::RowVersion;

    impl IntoResponseParts for RowVersion {
        type Error = std::convert::Infallible;

        fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
            res.extensions_mut().insert(self);
            Ok(res)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn tag(s: &str) -> EntityTag {
        s.parse().unwrap()
    }

    #[test]
    fn counters_named_by_tags() {
        assert_eq!(counter_named_by(&tag("\"42\""), false), Some(42));
        assert_eq!(counter_named_by(&tag("\"42-gzip\""), false), Some(42));
        assert_eq!(counter_named_by(&tag("\"-7\""), false), Some(-7));
        assert_eq!(counter_named_by(&tag("\"042\""), false), None);
        assert_eq!(counter_named_by(&tag("\"42-bogus\""), false), None);
        assert_eq!(counter_named_by(&tag("\"42x\""), false), None);
        assert_eq!(counter_named_by(&tag("W/\"42\""), false), None);
        assert_eq!(counter_named_by(&tag("W/\"42\""), true), Some(42));
        assert_eq!(counter_named_by(&tag("\"\""), false), None);
        assert_eq!(counter_named_by(&tag("\"-\""), false), None);
        assert_eq!(
            counter_named_by(&tag("\"99999999999999999999\""), false),
            None
        );
    }

    #[test]
    fn dates_and_the_ambiguity_marker() {
        let plain = RowVersion::from_columns(1, Some(1_796_185_375_264_513));
        assert_eq!(plain.as_version().last_modified_secs(), 1_796_185_375);
        assert!(!plain.last_modified_ambiguous());
        let marked = RowVersion::from_columns(2, Some(1_796_185_375_999_999));
        assert!(marked.last_modified_ambiguous());
        assert_eq!(
            marked.last_modified(),
            Some(UNIX_EPOCH + Duration::from_secs(1_796_185_375))
        );
        let undated = RowVersion::from_columns(3, None);
        assert_eq!(undated.last_modified(), None);
        assert!(!undated.has_date());
        let ancient = RowVersion::from_columns(4, Some(-5));
        assert_eq!(ancient.last_modified(), None);
    }

    #[test]
    fn weak_tags_are_refused() {
        assert!(RowVersion::from_tag(tag("W/\"a\""), None).is_none());
        assert!(RowVersion::from_tag(tag("\"a\""), None).is_some());
    }
}
