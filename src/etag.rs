//! Entity tags (RFC 9110 section 8.8.3) and the `If-Match` / `If-None-Match` list parser.
//!
//! The parser is hand-written because it must be exact: the grammar is
//!
//! ```text
//! If-Match      = "*" / #entity-tag
//! entity-tag    = [ weak ] opaque-tag
//! weak          = %s"W/"
//! opaque-tag    = DQUOTE *etagc DQUOTE
//! etagc         = %x21 / %x23-7E / obs-text
//! ```
//!
//! `obs-text` bytes (`0x80..=0xFF`) are kept losslessly: each byte is mapped to the
//! Unicode scalar of the same number (the ISO-8859-1 reading HTTP has always used), so
//! an [`EntityTag`] is a plain `str` that round-trips to the exact bytes on the wire.
//!
//! # Encoded representations: one version, one strong tag per content coding
//!
//! A version of a resource can be sent as several representations: identity, and
//! compressed by a `CompressionLayer` inside the precondition layer. A strong tag must
//! differ between representations that differ in their bytes (RFC 9110 section
//! 8.8.3), so the layer labels a response with `Content-Encoding: gzip` with the
//! version's tag plus `-gzip` (`"abc"` becomes `"abc-gzip"`; several codings in order,
//! `"abc-gzip-br"`). Conditions compare *versions*: [`TagList::strong_match`] and
//! [`TagList::weak_match`] take `"abc-gzip"` as naming version `"abc"`, so a write's
//! `If-Match: "abc-gzip"` passes exactly when `If-Match: "abc"` would.
//!
//! Weak tags for encoded variants (what some servers send) were the alternative, and
//! were rejected: `If-Match` compares strongly, so a client that only ever read the
//! gzip representation could never make a conditional write.
//!
//! The suffix names a coding from a fixed list ([`CONTENT_CODINGS`]); a tag is read as
//! a variant only when the part after the version's tag is made of those. A
//! handler that sets its own tags should not end one with `-gzip` (or another coding)
//! while another of its tags is that prefix: both would name one version.
//!
//! The work is bounded: a field longer than [`MAX_LIST_BYTES`] or with more than
//! [`MAX_LIST_TAGS`] members is refused before anything is allocated for its members.

use std::{borrow::Cow, fmt, hash, ops::Deref, sync::Arc};

use http::header::{HeaderMap, HeaderName, HeaderValue};

/// The most bytes, over all field lines, an `If-Match` / `If-None-Match` may have.
pub const MAX_LIST_BYTES: usize = 8 * 1024;

/// The most entity tags an `If-Match` / `If-None-Match` list may hold.
pub const MAX_LIST_TAGS: usize = 64;

/// The content codings (RFC 9110 section 8.4.1) a representation tag may name, as
/// they appear in its suffix. `x-gzip` and `x-compress` are named as `gzip` and
/// `compress`, their equivalents (section 8.4.1).
pub const CONTENT_CODINGS: &[&str] = &["gzip", "deflate", "br", "zstd", "compress"];

/// The most codings a representation tag names; a response with more gets no tag.
const MAX_CODINGS: usize = 4;

/// An entity tag: an opaque validator, strong or weak.
///
/// ```
/// use tower_precondition::EntityTag;
///
/// let strong: EntityTag = "\"v1\"".parse().unwrap();
/// let weak: EntityTag = "W/\"v1\"".parse().unwrap();
/// assert!(!strong.is_weak() && weak.is_weak());
/// assert!(strong.weak_eq(&weak));
/// assert!(!strong.strong_eq(&weak));
/// assert_eq!(weak.to_string(), "W/\"v1\"");
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct EntityTag {
    weak: bool,
    /// The opaque part without quotes; every char is an `etagc` (obs-text mapped 1:1).
    opaque: Opaque,
}

/// The most bytes an opaque value held inline may have: a generated tag (22), any
/// counter, with the suffix of a content coding (`"42-gzip"`). More would make every
/// tag, and every list, entry and future holding one, larger than 32 bytes.
const INLINE_OPAQUE: usize = 22;

/// An opaque value. A tag is made, parsed and cloned on every conditional request and
/// cloned into stores, entries, reservations and responses: a short one (every tag the
/// crate generates) is held inline, so none of that allocates; a longer one is shared,
/// so a clone is a reference count. Compared, hashed and read as its `str`.
#[derive(Clone)]
enum Opaque {
    Inline { len: u8, bytes: [u8; INLINE_OPAQUE] },
    Shared(Arc<str>),
}

impl Opaque {
    /// The UTF-8 bytes, without the validation `deref` makes: what comparisons use.
    fn as_bytes(&self) -> &[u8] {
        match self {
            Opaque::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Opaque::Shared(text) => text.as_bytes(),
        }
    }

    fn new(text: &str) -> Self {
        Self::inline(text.as_bytes()).unwrap_or_else(|| Opaque::Shared(Arc::from(text)))
    }

    /// The value of ASCII `bytes` (their own UTF-8): inline without validating them
    /// again, what a parsed tag takes on every conditional request.
    fn from_ascii(bytes: &[u8]) -> Self {
        debug_assert!(bytes.is_ascii());
        Self::inline(bytes).unwrap_or_else(|| {
            // Long values allocate anyway; the check is what keeps `unsafe` out.
            Opaque::Shared(Arc::from(std::str::from_utf8(bytes).unwrap_or_default()))
        })
    }

    /// `bytes` held inline, if they fit; the caller vouches that they are UTF-8.
    fn inline(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > INLINE_OPAQUE {
            return None;
        }
        let mut inline = [0; INLINE_OPAQUE];
        inline[..bytes.len()].copy_from_slice(bytes);
        Some(Opaque::Inline {
            len: bytes.len() as u8,
            bytes: inline,
        })
    }
}

impl Deref for Opaque {
    type Target = str;

    fn deref(&self) -> &str {
        match self {
            // Always valid: the bytes were copied from a `str` whole (`new`). The
            // check costs a few nanoseconds on ASCII; `unsafe` is denied here.
            Opaque::Inline { len, bytes } => {
                std::str::from_utf8(&bytes[..usize::from(*len)]).unwrap_or_default()
            }
            Opaque::Shared(text) => text,
        }
    }
}

impl PartialEq for Opaque {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Opaque {}

impl hash::Hash for Opaque {
    fn hash<H: hash::Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

/// The error for a value that is not a valid entity tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidEntityTag {
    reason: &'static str,
}

impl InvalidEntityTag {
    fn new(reason: &'static str) -> Self {
        Self { reason }
    }

    /// What was wrong with the value, in a few words.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for InvalidEntityTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid entity tag: {}", self.reason)
    }
}

impl std::error::Error for InvalidEntityTag {}

fn is_etagc(byte: u8) -> bool {
    byte == 0x21 || (0x23..=0x7E).contains(&byte) || byte >= 0x80
}

/// Whether `byte` is an `etagc` other than obs-text: what nearly every tag is made of.
fn is_ascii_etagc(byte: u8) -> bool {
    byte == 0x21 || (0x23..=0x7E).contains(&byte)
}

/// How many leading bytes of `bytes` are ASCII `etagc`, read eight at a time: a
/// 22-byte generated tag and its closing quote take three reads, not 23 compares.
fn ascii_etagc_len(bytes: &[u8]) -> usize {
    let mut len = 0;
    while let Some(block) = bytes[len..].first_chunk::<8>() {
        match first_non_ascii_etagc(block) {
            Some(i) => return len + i,
            None => len += 8,
        }
    }
    if len == bytes.len() {
        return len;
    }
    match bytes.last_chunk::<8>() {
        // The last eight bytes, overlapping some already read (all `etagc`).
        Some(block) => {
            let start = bytes.len() - 8;
            first_non_ascii_etagc(block).map_or(bytes.len(), |i| start + i)
        }
        None => bytes
            .iter()
            .position(|&b| !is_ascii_etagc(b))
            .unwrap_or(bytes.len()),
    }
}

/// The index of the first byte of `block` that is not ASCII `etagc`, all eight tested
/// at once in a `u64`. Each test sets a byte's top bit and works on its low seven bits,
/// whose sums never carry into the next byte, so every byte's answer is exact.
fn first_non_ascii_etagc(block: &[u8; 8]) -> Option<usize> {
    const EACH: u64 = u64::from_le_bytes([1; 8]);
    let word = u64::from_le_bytes(*block);
    let low = word & (0x7F * EACH);
    let stops = (word // obs-text, 0x80..=0xFF
        | (low + EACH) // 0x7F
        | !(low + (0x80 - 0x21) * EACH) // below 0x21
        | !((low ^ (u64::from(b'"') * EACH)) + 0x7F * EACH)) // the quote, 0x22
        & (0x80 * EACH);
    (stops != 0).then(|| (stops.trailing_zeros() / 8) as usize)
}

/// The opaque value of wire bytes that are all `etagc`.
#[cfg(any(feature = "redis", test))]
fn opaque_from_bytes(bytes: &[u8]) -> Opaque {
    // The common case: ASCII bytes are their own UTF-8.
    if bytes.is_ascii() {
        return Opaque::from_ascii(bytes);
    }
    opaque_from_obs_text(bytes)
}

/// Lossless: obs-text bytes become U+0080..=U+00FF.
fn opaque_from_obs_text(bytes: &[u8]) -> Opaque {
    Opaque::new(&bytes.iter().map(|&b| char::from(b)).collect::<String>())
}

impl EntityTag {
    /// A strong tag with the given opaque value (without quotes).
    ///
    /// Fails if `opaque` holds a character that is not allowed in an entity tag
    /// (a double quote, a control character, a space, or a char above U+00FF).
    pub fn strong(opaque: impl AsRef<str>) -> Result<Self, InvalidEntityTag> {
        Self::with_weakness(false, opaque.as_ref())
    }

    /// A weak tag with the given opaque value (without quotes).
    pub fn weak(opaque: impl AsRef<str>) -> Result<Self, InvalidEntityTag> {
        Self::with_weakness(true, opaque.as_ref())
    }

    fn with_weakness(weak: bool, opaque: &str) -> Result<Self, InvalidEntityTag> {
        let valid = opaque
            .chars()
            .all(|c| u8::try_from(u32::from(c)).is_ok_and(is_etagc));
        if !valid {
            return Err(InvalidEntityTag::new(
                "opaque value holds a character outside etagc",
            ));
        }
        Ok(Self {
            weak,
            opaque: Opaque::new(opaque),
        })
    }

    /// A strong tag from an opaque value the caller built from `etagc` characters only,
    /// taken as is: no validation pass (a generated tag on every write).
    pub(crate) fn strong_from_valid(opaque: &str) -> Self {
        debug_assert!(opaque
            .chars()
            .all(|c| u8::try_from(u32::from(c)).is_ok_and(is_etagc)));
        Self {
            weak: false,
            opaque: Opaque::new(opaque),
        }
    }

    /// A strong tag of ASCII `etagc` bytes (what `fresh_etag` generates),
    /// held as they are, without validating them again.
    pub(crate) fn strong_from_ascii(bytes: &[u8]) -> Self {
        debug_assert!(bytes.iter().copied().all(is_ascii_etagc));
        Self {
            weak: false,
            opaque: Opaque::from_ascii(bytes),
        }
    }

    /// This tag made strong (the same opaque value), without copying it.
    pub(crate) fn to_strong(&self) -> Self {
        Self {
            weak: false,
            opaque: self.opaque.clone(),
        }
    }

    /// Parses one entity tag as it appears on the wire (`"x"` or `W/"x"`).
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self, InvalidEntityTag> {
        let mut cursor = Cursor::new(bytes);
        let tag = cursor.entity_tag()?;
        if !cursor.at_end() {
            return Err(InvalidEntityTag::new("trailing characters after the tag"));
        }
        Ok(tag)
    }

    /// Whether this tag is weak (`W/` prefix).
    pub fn is_weak(&self) -> bool {
        self.weak
    }

    /// The opaque value, without quotes and without the `W/` prefix.
    pub fn opaque(&self) -> &str {
        &self.opaque
    }

    /// Strong comparison (RFC 9110 section 8.8.3.2): both strong and the same opaque value.
    pub fn strong_eq(&self, other: &Self) -> bool {
        !self.weak && !other.weak && self.opaque == other.opaque
    }

    /// Weak comparison: the same opaque value, either or both may be weak.
    pub fn weak_eq(&self, other: &Self) -> bool {
        self.opaque == other.opaque
    }

    /// Whether this tag names the version whose tag is `version`: the same opaque
    /// value, or that value with the suffix of an encoded representation
    /// (`"abc-gzip"` names `"abc"`; see the module docs). Weakness is not compared.
    pub fn names_version(&self, version: &Self) -> bool {
        match self
            .opaque
            .as_bytes()
            .strip_prefix(version.opaque.as_bytes())
        {
            Some([]) => true,
            Some(rest) => rest.strip_prefix(b"-").is_some_and(|codings| {
                let mut count = 0;
                codings.split(|&b| b == b'-').all(|coding| {
                    count += 1;
                    count <= MAX_CODINGS && CONTENT_CODINGS.iter().any(|c| c.as_bytes() == coding)
                })
            }),
            None => false,
        }
    }

    /// The strong tag of the representation of version `self` sent with
    /// `content_encoding` (the response's `Content-Encoding` field lines): `self` for
    /// identity, `self` plus `-<coding>` for each coding otherwise. `None` when a
    /// coding is not one of [`CONTENT_CODINGS`] (or there are too many): such a body
    /// cannot be named apart from the others, so it gets no tag.
    pub fn for_content_encoding<'a>(
        &self,
        content_encoding: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Option<Self> {
        let mut suffix = String::new();
        let mut count = 0;
        for value in content_encoding {
            let value = value.to_str().ok()?;
            for coding in value.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let coding = coding.to_ascii_lowercase();
                let coding = match coding.as_str() {
                    "identity" => continue,
                    "x-gzip" => "gzip",
                    "x-compress" => "compress",
                    other => CONTENT_CODINGS.iter().copied().find(|&c| c == other)?,
                };
                count += 1;
                if count > MAX_CODINGS {
                    return None;
                }
                suffix.push('-');
                suffix.push_str(coding);
            }
        }
        if suffix.is_empty() {
            return Some(self.clone());
        }
        // The version's opaque value is etagc, and so is the ASCII suffix.
        let mut opaque = String::with_capacity(self.opaque.len() + suffix.len());
        opaque.push_str(&self.opaque);
        opaque.push_str(&suffix);
        Some(Self {
            weak: self.weak,
            opaque: Opaque::new(&opaque),
        })
    }

    /// The opaque value as the bytes it stands for on the wire (each char one byte, the
    /// ISO-8859-1 reading): borrowed for ASCII, which every tag the layer makes is.
    pub(crate) fn opaque_wire_bytes(&self) -> Cow<'_, [u8]> {
        let opaque = self.opaque.as_bytes();
        if opaque.is_ascii() {
            return Cow::Borrowed(opaque);
        }
        // Every char is <= U+00FF by construction, so this is the original byte.
        Cow::Owned(self.opaque.chars().map(|c| c as u8).collect())
    }

    /// A strong tag whose opaque value is `bytes` as on the wire: the inverse of
    /// [`opaque_wire_bytes`](Self::opaque_wire_bytes), for a store that keeps the bytes.
    #[cfg(any(feature = "redis", test))]
    pub(crate) fn strong_from_wire_bytes(bytes: &[u8]) -> Result<Self, InvalidEntityTag> {
        if !bytes.iter().copied().all(is_etagc) {
            return Err(InvalidEntityTag::new(
                "opaque value holds a character outside etagc",
            ));
        }
        Ok(Self {
            weak: false,
            opaque: opaque_from_bytes(bytes),
        })
    }

    /// The tag as a header value, exactly the bytes a client sent or will receive.
    pub fn to_header_value(&self) -> HeaderValue {
        let opaque = self.opaque_wire_bytes();
        // Exact capacity: the buffer then becomes the value's `Bytes` without a copy.
        let mut bytes = Vec::with_capacity(opaque.len() + if self.weak { 4 } else { 2 });
        if self.weak {
            bytes.extend_from_slice(b"W/");
        }
        bytes.push(b'"');
        bytes.extend_from_slice(&opaque);
        bytes.push(b'"');
        HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes))
            .expect("etagc bytes are valid header value bytes")
    }
}

impl std::str::FromStr for EntityTag {
    type Err = InvalidEntityTag;

    /// The inverse of `Display`: each char stands for one byte (the ISO-8859-1 reading
    /// that [`EntityTag::strong`] and `Display` use), so obs-text round-trips; reading
    /// `s` as UTF-8 bytes instead would turn `é` into two different bytes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s
            .chars()
            .map(|c| u8::try_from(u32::from(c)))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| InvalidEntityTag::new("opaque value holds a character outside etagc"))?;
        Self::parse_bytes(&bytes)
    }
}

impl fmt::Display for EntityTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.weak {
            f.write_str("W/")?;
        }
        write!(f, "\"{}\"", &*self.opaque)
    }
}

impl fmt::Debug for EntityTag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The value of an `If-Match` or `If-None-Match` field: `*` or a list of tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagList {
    /// `*`: any current representation.
    Any,
    /// One or more entity tags.
    Tags(Tags),
}

/// The entity tags of an `If-Match` / `If-None-Match` list, in the order sent.
///
/// Reads as a slice of [`EntityTag`]s. A list of one tag, what nearly every client
/// sends, is held without an allocation.
///
/// ```
/// use tower_precondition::{etag::Tags, EntityTag};
///
/// let one = Tags::from(EntityTag::strong("v1").unwrap());
/// let listed: Tags = vec![EntityTag::strong("v1").unwrap()].into();
/// assert_eq!(one, listed);
/// assert_eq!(one.len(), 1);
/// assert_eq!(one[0].opaque(), "v1");
/// ```
#[derive(Clone)]
pub struct Tags(TagsRepr);

#[derive(Clone)]
enum TagsRepr {
    One(EntityTag),
    Many(Vec<EntityTag>),
}

impl Tags {
    /// Appends `tag`; a second tag moves the list to the heap.
    fn push(&mut self, tag: EntityTag) {
        // `Vec::new` does not allocate: the placeholder costs nothing.
        self.0 = match std::mem::replace(&mut self.0, TagsRepr::Many(Vec::new())) {
            TagsRepr::One(first) => TagsRepr::Many(vec![first, tag]),
            TagsRepr::Many(mut tags) => {
                tags.push(tag);
                TagsRepr::Many(tags)
            }
        };
    }
}

impl Deref for Tags {
    type Target = [EntityTag];

    fn deref(&self) -> &[EntityTag] {
        match &self.0 {
            TagsRepr::One(tag) => std::slice::from_ref(tag),
            TagsRepr::Many(tags) => tags,
        }
    }
}

impl From<EntityTag> for Tags {
    fn from(tag: EntityTag) -> Self {
        Tags(TagsRepr::One(tag))
    }
}

impl From<Vec<EntityTag>> for Tags {
    fn from(tags: Vec<EntityTag>) -> Self {
        Tags(TagsRepr::Many(tags))
    }
}

impl FromIterator<EntityTag> for Tags {
    fn from_iter<I: IntoIterator<Item = EntityTag>>(iter: I) -> Self {
        let mut iter = iter.into_iter();
        match (iter.next(), iter.next()) {
            (Some(first), None) => first.into(),
            (first, second) => first
                .into_iter()
                .chain(second)
                .chain(iter)
                .collect::<Vec<_>>()
                .into(),
        }
    }
}

impl<'a> IntoIterator for &'a Tags {
    type Item = &'a EntityTag;
    type IntoIter = std::slice::Iter<'a, EntityTag>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl PartialEq for Tags {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Tags {}

impl fmt::Debug for Tags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl TagList {
    /// Whether any tag strongly matches version `current` (the `If-Match`
    /// comparison): both strong, and the tag [names](EntityTag::names_version) the
    /// version, in any of its encoded representations.
    pub fn strong_match(&self, current: &EntityTag) -> bool {
        match self {
            TagList::Any => true,
            TagList::Tags(tags) => tags
                .iter()
                .any(|t| !t.weak && !current.weak && t.names_version(current)),
        }
    }

    /// Whether any tag weakly matches version `current` (the `If-None-Match`
    /// comparison), in any of its encoded representations.
    pub fn weak_match(&self, current: &EntityTag) -> bool {
        match self {
            TagList::Any => true,
            TagList::Tags(_) => self.weak_matching(current).is_some(),
        }
    }

    /// The first listed tag that weakly matches version `current`: the representation
    /// a `304` tells the client (or cache) it may keep using. `None` for `*`.
    pub fn weak_matching(&self, current: &EntityTag) -> Option<&EntityTag> {
        match self {
            TagList::Any => None,
            TagList::Tags(tags) => tags.iter().find(|t| t.names_version(current)),
        }
    }
}

/// Why an `If-Match` / `If-None-Match` field could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidTagList {
    header: HeaderName,
    reason: &'static str,
}

impl InvalidTagList {
    /// The field that was malformed.
    pub fn header(&self) -> &HeaderName {
        &self.header
    }

    /// What was wrong, in a few words.
    pub fn reason(&self) -> &'static str {
        self.reason
    }
}

impl fmt::Display for InvalidTagList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed {} header: {}", self.header, self.reason)
    }
}

impl std::error::Error for InvalidTagList {}

/// Parses every field line of `name` in `headers` as one `If-Match` / `If-None-Match` list.
///
/// Returns `Ok(None)` when the field is absent. Field lines are joined as a comma list
/// (RFC 9110 section 5.3); empty list members are allowed (`#rule`), a list made only of
/// empty members is not. `*` must stand alone.
///
/// ```
/// use http::{HeaderMap, header::IF_MATCH};
/// use tower_precondition::etag::{parse_tag_list, TagList};
///
/// let mut headers = HeaderMap::new();
/// headers.append(IF_MATCH, r#""a", W/"b,c""#.parse().unwrap());
/// headers.append(IF_MATCH, r#""d""#.parse().unwrap());
/// let Some(TagList::Tags(tags)) = parse_tag_list(&headers, &IF_MATCH).unwrap() else { panic!() };
/// assert_eq!(tags.len(), 3);
/// assert_eq!(tags[1].opaque(), "b,c");
/// ```
pub fn parse_tag_list(
    headers: &HeaderMap,
    name: &HeaderName,
) -> Result<Option<TagList>, InvalidTagList> {
    let fail = |reason| InvalidTagList {
        header: name.clone(),
        reason,
    };
    // One lookup: the field's lines are walked twice, to bound them and to parse them.
    let lines = headers.get_all(name);
    let mut values = lines.iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let total: usize = lines.iter().map(|v| v.len()).sum();
    if total > MAX_LIST_BYTES {
        return Err(fail("field is too long"));
    }
    let mut any = false;
    let mut tags: Option<Tags> = None;
    let mut count = 0;
    for value in values {
        let mut cursor = Cursor::new(value.as_bytes());
        loop {
            cursor.skip_ows();
            if cursor.at_end() {
                break;
            }
            match cursor.peek() {
                Some(b',') => {
                    cursor.bump();
                    continue;
                }
                Some(b'*') => {
                    cursor.bump();
                    any = true;
                }
                _ => {
                    if count == MAX_LIST_TAGS {
                        return Err(fail("too many entity tags"));
                    }
                    count += 1;
                    let tag = cursor.entity_tag().map_err(|e| fail(e.reason))?;
                    match &mut tags {
                        Some(tags) => tags.push(tag),
                        None => tags = Some(tag.into()),
                    }
                }
            }
            cursor.skip_ows();
            match cursor.peek() {
                None => break,
                Some(b',') => cursor.bump(),
                Some(_) => return Err(fail("expected a comma between entity tags")),
            }
        }
    }
    match (any, tags) {
        (true, None) => Ok(Some(TagList::Any)),
        (true, Some(_)) => Err(fail("\"*\" cannot be combined with entity tags")),
        (false, Some(tags)) => Ok(Some(TagList::Tags(tags))),
        (false, None) => Err(fail("empty list")),
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { bytes, pos: 0 }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn bump(&mut self) {
        self.pos += 1;
    }

    fn at_end(&self) -> bool {
        self.pos >= self.bytes.len()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.bump();
        }
    }

    fn entity_tag(&mut self) -> Result<EntityTag, InvalidEntityTag> {
        let rest = &self.bytes[self.pos..];
        let (weak, rest) = match rest.strip_prefix(b"W/") {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let Some(quoted) = rest.strip_prefix(b"\"") else {
            return Err(InvalidEntityTag::new("expected an opening double quote"));
        };
        // One pass over the slice: the ASCII run, then (rarely) obs-text after it.
        let ascii_len = ascii_etagc_len(quoted);
        let (len, opaque) = if quoted.get(ascii_len) == Some(&b'"') {
            (ascii_len, Opaque::from_ascii(&quoted[..ascii_len]))
        } else {
            let len = ascii_len + closing_quote(&quoted[ascii_len..])?;
            (len, opaque_from_obs_text(&quoted[..len]))
        };
        // Past the opening quote, the opaque value and the closing quote.
        self.pos = self.bytes.len() - quoted.len() + len + 1;
        Ok(EntityTag { weak, opaque })
    }
}

/// Where the closing quote of an opaque value is in `bytes` (which follow its ASCII
/// start), with the errors of a value that holds a non-`etagc` byte or does not end.
fn closing_quote(bytes: &[u8]) -> Result<usize, InvalidEntityTag> {
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'"' {
            return Ok(i);
        }
        if !is_etagc(b) {
            return Err(InvalidEntityTag::new(
                "opaque value holds a character outside etagc",
            ));
        }
    }
    Err(InvalidEntityTag::new("missing closing double quote"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn representation_tags_name_their_version() {
        let v = EntityTag::strong("a-b").unwrap();
        let value = |s: &str| HeaderValue::from_str(s).unwrap();
        let gzip = v.for_content_encoding([&value("GZIP")]).unwrap();
        assert_eq!(gzip.opaque(), "a-b-gzip");
        let two = v.for_content_encoding([&value("x-gzip, br")]).unwrap();
        assert_eq!(two.opaque(), "a-b-gzip-br");
        assert_eq!(v.for_content_encoding([&value("identity")]).unwrap(), v);
        assert_eq!(v.for_content_encoding([&value("aes128gcm")]), None);
        for tag in [&v, &gzip, &two] {
            assert!(tag.names_version(&v), "{tag}");
        }
        for other in ["a", "a-b-", "a-b-gzipx", "a-b-identity", "a-bgzip"] {
            assert!(
                !EntityTag::strong(other).unwrap().names_version(&v),
                "{other}"
            );
        }
        let list = TagList::Tags(gzip.clone().into());
        assert!(list.strong_match(&v) && list.weak_match(&v));
        let weak = TagList::Tags(EntityTag::weak("a-b-gzip").unwrap().into());
        assert!(!weak.strong_match(&v) && weak.weak_match(&v));
    }
    use http::header::{IF_MATCH, IF_NONE_MATCH};

    fn list(lines: &[&[u8]]) -> Result<Option<TagList>, InvalidTagList> {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(IF_NONE_MATCH, HeaderValue::from_bytes(line).unwrap());
        }
        parse_tag_list(&headers, &IF_NONE_MATCH)
    }

    fn tags(lines: &[&[u8]]) -> Vec<String> {
        match list(lines).unwrap().unwrap() {
            TagList::Tags(t) => t.iter().map(|t| t.to_string()).collect(),
            TagList::Any => vec!["*".into()],
        }
    }

    #[test]
    fn parses_single_tags() {
        let t: EntityTag = "\"xyzzy\"".parse().unwrap();
        assert!(!t.is_weak());
        assert_eq!(t.opaque(), "xyzzy");
        let w: EntityTag = "W/\"xyzzy\"".parse().unwrap();
        assert!(w.is_weak());
        let empty: EntityTag = "\"\"".parse().unwrap();
        assert_eq!(empty.opaque(), "");
    }

    #[test]
    fn rejects_malformed_single_tags() {
        for bad in [
            "xyzzy", "\"xyzzy", "w/\"x\"", "W/x", "\"a\"b", " \"a\"", "\"a\"\"", "W/ \"a\"", "",
        ] {
            assert!(
                bad.parse::<EntityTag>().is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn rfc_9110_comparison_table() {
        // RFC 9110 section 8.8.3.2, the four example pairs.
        let w1: EntityTag = "W/\"1\"".parse().unwrap();
        let w2: EntityTag = "W/\"2\"".parse().unwrap();
        let s1: EntityTag = "\"1\"".parse().unwrap();
        assert!(!w1.strong_eq(&w1) && w1.weak_eq(&w1));
        assert!(!w1.strong_eq(&w2) && !w1.weak_eq(&w2));
        assert!(!w1.strong_eq(&s1) && w1.weak_eq(&s1));
        assert!(s1.strong_eq(&s1) && s1.weak_eq(&s1));
    }

    #[test]
    fn lists_across_lines_with_quoted_commas() {
        assert_eq!(
            tags(&[b"\"a\", W/\"b,c\"", b" \"d\" ,,", b"\t\"e\""]),
            ["\"a\"", "W/\"b,c\"", "\"d\"", "\"e\""]
        );
        assert_eq!(tags(&[b"*"]), ["*"]);
        assert_eq!(tags(&[b" * "]), ["*"]);
        assert_eq!(tags(&[b",\"a\","]), ["\"a\""]);
    }

    #[test]
    fn rejects_malformed_lists() {
        for bad in [
            &b"\"a\" \"b\""[..],
            b"*, \"a\"",
            b"a",
            b"\"a\", b",
            b"",
            b" , ",
            b"\"a",
            b"**",
            b"W/\"a\"W/\"b\"",
        ] {
            assert!(
                list(&[bad]).is_err(),
                "{:?} should be rejected",
                String::from_utf8_lossy(bad)
            );
        }
        // "*" on one line and a tag on another is still a mix.
        assert!(list(&[b"*", b"\"a\""]).is_err());
    }

    #[test]
    fn obs_text_round_trips() {
        let raw = b"\"caf\xc3\xa9\xff\"";
        let tag = EntityTag::parse_bytes(raw).unwrap();
        assert_eq!(tag.to_header_value().as_bytes(), raw);
        assert_eq!(tag.opaque().chars().count(), 6);
    }

    #[test]
    fn bounds_the_work() {
        let many = vec!["\"x\""; MAX_LIST_TAGS + 1].join(",");
        let err = list(&[many.as_bytes()]).unwrap_err();
        assert_eq!(err.reason(), "too many entity tags");
        let exactly = vec!["\"x\""; MAX_LIST_TAGS].join(",");
        assert!(list(&[exactly.as_bytes()]).is_ok());
        let long = format!("\"{}\"", "a".repeat(MAX_LIST_BYTES));
        assert_eq!(
            list(&[long.as_bytes()]).unwrap_err().reason(),
            "field is too long"
        );
    }

    #[test]
    fn absent_header_is_none() {
        assert_eq!(parse_tag_list(&HeaderMap::new(), &IF_MATCH).unwrap(), None);
    }

    #[test]
    fn short_and_long_opaque_values_compare_and_hash_alike() {
        use std::collections::hash_map::DefaultHasher;
        use std::hash::{Hash, Hasher};
        let hash = |tag: &EntityTag| {
            let mut hasher = DefaultHasher::new();
            tag.hash(&mut hasher);
            hasher.finish()
        };
        // Either side of the inline bound, and obs-text (two UTF-8 bytes per char).
        for opaque in [
            String::new(),
            "a".repeat(INLINE_OPAQUE),
            "a".repeat(INLINE_OPAQUE + 1),
            "\u{ff}".repeat(INLINE_OPAQUE / 2),
            "\u{ff}".repeat(INLINE_OPAQUE / 2 + 1),
            format!("{}-gzip", "a".repeat(INLINE_OPAQUE)),
        ] {
            let tag = EntityTag::strong(&opaque).unwrap();
            assert_eq!(tag.opaque(), opaque);
            let parsed = EntityTag::parse_bytes(tag.to_header_value().as_bytes()).unwrap();
            assert_eq!(parsed, tag);
            assert_eq!(hash(&parsed), hash(&tag));
            assert_eq!(parsed.opaque(), opaque);
            let shared = EntityTag {
                weak: false,
                opaque: Opaque::Shared(Arc::from(opaque.as_str())),
            };
            assert_eq!(shared, tag);
            assert_eq!(hash(&shared), hash(&tag));
            assert!(shared.strong_eq(&tag) && tag.names_version(&shared));
        }
        assert!(matches!(
            EntityTag::strong("a".repeat(INLINE_OPAQUE)).unwrap().opaque,
            Opaque::Inline { .. }
        ));
        assert!(matches!(
            EntityTag::strong("a".repeat(INLINE_OPAQUE + 1))
                .unwrap()
                .opaque,
            Opaque::Shared(_)
        ));
    }

    #[test]
    fn tags_round_trip_through_their_wire_bytes() {
        for opaque in ["v1", "", "caf\u{e9}\u{ff}", &"a".repeat(40)] {
            let tag = EntityTag::strong(opaque).unwrap();
            let stored = tag.opaque_wire_bytes();
            assert_eq!(
                matches!(stored, Cow::Borrowed(_)),
                opaque.is_ascii(),
                "{opaque:?}"
            );
            assert_eq!(EntityTag::strong_from_wire_bytes(&stored).unwrap(), tag);
        }
        let obs_text = EntityTag::strong("\u{ff}").unwrap();
        assert_eq!(&*obs_text.opaque_wire_bytes(), b"\xff");
        assert!(EntityTag::strong_from_wire_bytes(b"no\"quote").is_err());
        assert!(EntityTag::strong_from_wire_bytes(b"no space").is_err());
    }

    #[test]
    fn tags_and_lists_of_one_stay_small() {
        // Tags sit in every entry, list, reservation and response future.
        assert_eq!(std::mem::size_of::<EntityTag>(), 32);
        assert!(std::mem::size_of::<Option<TagList>>() <= 40);
    }

    #[test]
    fn tag_lists_of_one_and_of_many_read_alike() {
        let a = EntityTag::strong("a").unwrap();
        let b = EntityTag::weak("b").unwrap();
        let one = Tags::from(a.clone());
        assert_eq!(one, Tags::from(vec![a.clone()]));
        assert_eq!(one, std::iter::once(a.clone()).collect::<Tags>());
        assert!(matches!(one.0, TagsRepr::One(_)));
        let two: Tags = [a.clone(), b.clone()].into_iter().collect();
        assert_eq!(&*two, [a.clone(), b.clone()]);
        assert_ne!(one, two);
        assert_eq!(format!("{two:?}"), r#"["a", W/"b"]"#);
        assert_eq!((&two).into_iter().count(), 2);
        let Some(TagList::Tags(parsed)) = list(&[b"\"a\"", b"W/\"b\""]).unwrap() else {
            panic!("a list")
        };
        assert_eq!(parsed, two);
        let Some(TagList::Tags(parsed)) = list(&[b" \"a\" ,"]).unwrap() else {
            panic!("a list")
        };
        assert!(matches!(parsed.0, TagsRepr::One(_)));
    }

    /// The parser as it was before the one-pass scan (12a2bde), kept to compare with.
    mod before_one_pass_scan {
        use super::super::*;

        fn opaque_from_bytes(bytes: &[u8]) -> Opaque {
            if let Some(text) = std::str::from_utf8(bytes)
                .ok()
                .filter(|text| text.is_ascii())
            {
                return Opaque::new(text);
            }
            Opaque::new(&bytes.iter().map(|&b| char::from(b)).collect::<String>())
        }

        pub(super) fn entity_tag(cursor: &mut Cursor<'_>) -> Result<EntityTag, InvalidEntityTag> {
            let weak = cursor.bytes[cursor.pos..].starts_with(b"W/");
            if weak {
                cursor.pos += 2;
            }
            if cursor.peek() != Some(b'"') {
                return Err(InvalidEntityTag::new("expected an opening double quote"));
            }
            cursor.bump();
            let start = cursor.pos;
            loop {
                match cursor.peek() {
                    None => return Err(InvalidEntityTag::new("missing closing double quote")),
                    Some(b'"') => break,
                    Some(b) if is_etagc(b) => cursor.bump(),
                    Some(_) => {
                        return Err(InvalidEntityTag::new(
                            "opaque value holds a character outside etagc",
                        ))
                    }
                }
            }
            let opaque = opaque_from_bytes(&cursor.bytes[start..cursor.pos]);
            cursor.bump();
            Ok(EntityTag { weak, opaque })
        }
    }

    /// Whether two opaque values are held alike (inline or shared) with the same bytes.
    fn same_representation(a: &EntityTag, b: &EntityTag) -> bool {
        a.weak == b.weak
            && a.opaque.as_bytes() == b.opaque.as_bytes()
            && matches!(
                (&a.opaque, &b.opaque),
                (Opaque::Inline { .. }, Opaque::Inline { .. })
                    | (Opaque::Shared(_), Opaque::Shared(_))
            )
    }

    /// Both scans from the start of `bytes`: the same tag or error, the same position.
    fn assert_scans_alike(bytes: &[u8]) {
        let mut now = Cursor::new(bytes);
        let mut before = Cursor::new(bytes);
        let (now_tag, before_tag) = (
            now.entity_tag(),
            before_one_pass_scan::entity_tag(&mut before),
        );
        let shown = String::from_utf8_lossy(bytes);
        match (&now_tag, &before_tag) {
            (Ok(a), Ok(b)) => {
                assert!(same_representation(a, b), "{shown:?}: {a:?} / {b:?}");
                assert_eq!(a.opaque(), b.opaque(), "{shown:?}");
                assert_eq!(now.pos, before.pos, "{shown:?}");
            }
            _ => assert_eq!(now_tag, before_tag, "{shown:?}"),
        }
    }

    #[test]
    fn one_pass_scan_reads_tags_as_before() {
        let long = format!("\"{}\"", "a".repeat(INLINE_OPAQUE + 9));
        let cases: &[&[u8]] = &[
            b"\"\"",
            b"\"a\"",
            b"W/\"a\"",
            b"\"aaaaaaaaaaaaaaaaaaaaaa\"",
            b"W/\"aaaaaaaaaaaaaaaaaaaaaa\", \"b\"",
            b"\"aaaaaaaaaaaaaaaaaaaaaaa\"",
            long.as_bytes(),
            b"\"caf\xc3\xa9\xff\"",
            b"\"\x80\"",
            b"\"abcdefg\xff\"",
            b"\"abcdefgh\xffijklmnopqrstuvwxyz\"",
            b"\"abc",
            b"\"abcdefghijklmnop",
            b"\"abc\xff",
            b"\"a b\"",
            b"\"abcdefgh\x7f\"",
            b"\"abcdefghi\x00\"",
            b"\"\xffa\x20\"",
            b"\"",
            b"W/",
            b"W",
            b"",
            b"w/\"a\"",
            b"W/ \"a\"",
            b"x",
        ];
        for case in cases {
            assert_scans_alike(case);
        }
        // Every byte, at every place of a tag on either side of the block size.
        for len in 0..=INLINE_OPAQUE + 2 {
            for at in 0..len {
                for byte in 0..=u8::MAX {
                    let mut tag = vec![b'"'];
                    tag.extend(std::iter::repeat_n(b'k', len));
                    tag[1 + at] = byte;
                    tag.push(b'"');
                    assert_scans_alike(&tag);
                    tag.pop();
                    assert_scans_alike(&tag);
                }
            }
        }
    }

    #[test]
    fn blocks_find_the_first_byte_outside_ascii_etagc() {
        for byte in 0..=u8::MAX {
            for at in 0..8 {
                let mut block = [b'!'; 8];
                block[at] = byte;
                let expected = (!is_ascii_etagc(byte)).then_some(at);
                assert_eq!(first_non_ascii_etagc(&block), expected, "{byte:#x} at {at}");
                // A later stop never hides an earlier one.
                block[7] = b'"';
                let expected = if is_ascii_etagc(byte) { 7 } else { at };
                assert_eq!(first_non_ascii_etagc(&block), Some(expected));
            }
        }
        // 0x21 and 0x23..=0x7E.
        assert_eq!((0..=u8::MAX).filter(|&b| is_ascii_etagc(b)).count(), 93);
    }

    proptest::proptest! {
        #[test]
        fn ascii_runs_match_a_byte_by_byte_scan(
            bytes in proptest::collection::vec(
                proptest::prop_oneof![
                    8 => 0x21u8..=0x7E,
                    1 => proptest::prelude::any::<u8>(),
                ],
                0..48,
            )
        ) {
            let expected = bytes
                .iter()
                .position(|&b| !is_ascii_etagc(b))
                .unwrap_or(bytes.len());
            proptest::prop_assert_eq!(ascii_etagc_len(&bytes), expected);
        }

        #[test]
        fn tags_anywhere_in_a_line_scan_as_before(
            line in proptest::collection::vec(
                proptest::prop_oneof![
                    6 => 0x21u8..=0x7E,
                    3 => proptest::sample::select(b"\"W/, \t*".to_vec()),
                    1 => 0x80u8..=0xFF,
                    1 => proptest::prelude::any::<u8>(),
                ],
                0..96,
            )
        ) {
            // From every place a list member could start.
            for start in 0..=line.len() {
                assert_scans_alike(&line[start..]);
            }
        }
    }

    #[test]
    fn constructors_validate() {
        assert!(EntityTag::strong("ok-1").is_ok());
        assert!(EntityTag::strong("no\"quote").is_err());
        assert!(EntityTag::strong("no space").is_err());
        assert!(EntityTag::strong("\u{263a}").is_err());
        assert_eq!(EntityTag::weak("w").unwrap().to_string(), "W/\"w\"");
    }
}
