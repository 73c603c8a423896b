//! Resource keys: one resource, one key.
//!
//! A layer versions requests per *key*, so every URL that names one resource must map
//! to exactly one key. If two spellings of a URL reach the same data under two keys,
//! each has its own version and two writers, each with a valid `ETag`, both win: the
//! lost update the crate exists to prevent.
//!
//! # The default key: the canonical path
//!
//! By default the key is [`canonical_path`] of the request path (the query is not part
//! of it). It applies RFC 3986 section 6.2.2 syntax-based normalization, exactly:
//!
//! * percent-encodings of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded:
//!   `/items/%31` is `/items/1`, `%7e` is `~`;
//! * the hex digits of every other percent-encoding are uppercased: `%2f` is `%2F`;
//! * dot segments are removed (RFC 3986 section 5.2.4): `/items/./1` and
//!   `/items/a/../1` are `/items/1`.
//!
//! To make its output a valid path, it also percent-encodes what a path cannot hold
//! raw (a `%` that starts no percent-encoding, non-ASCII bytes, spaces, `"`, `{`, ...).
//! Frameworks decode those too (axum's `Path` turns `%7B` and `{` into the same `{`),
//! so encoding them merges real aliases and never splits one resource.
//!
//! **Kept as they are**: empty segments (`/items//1`) and a trailing slash (`/items/1/`)
//! stay distinct from `/items/1`, because RFC 3986 does not equate them and routers
//! (axum included) route them differently. An application that serves one resource
//! under both must say so in its own key function. Reserved characters are not
//! decoded either (`%2B` stays distinct from `+`, `%2F` from `/`); a handler that
//! decodes its path parameters fully (axum's `Path` does) is keyed exactly by
//! [`route_key`], from the matched route and the decoded parameters.
//!
//! # Keys the stores can hold
//!
//! Whatever the key function returns, the layers store [`bounded_key`] of it: a key
//! longer than [`MAX_KEY_LEN`] bytes is replaced by a fixed-size SHA-256 digest form,
//! so every store (memory, Redis, Postgres, the transactional mode) sees the same key
//! of at most 136 bytes, and a 3,000-byte path cannot break a Postgres index.
//!
//! # Keying by what the handler uses
//!
//! Under [`Router::nest`](https://docs.rs/axum/latest/axum/struct.Router.html#method.nest)
//! axum strips the prefix from the URI before the nested router (and a layer inside it)
//! sees the request, so two nested routers would share keys. axum keeps the full URI in
//! the `OriginalUri` extension; key by it:
//!
//! ```
//! use axum::{extract::OriginalUri, routing::get, Router};
//! use tower_precondition::{key, MemoryStore, PreconditionLayer};
//!
//! let layer = PreconditionLayer::new(MemoryStore::new()).key_fn(|parts| {
//!     // The full path the client sent, as axum saw it before `nest` stripped it.
//!     let path = parts
//!         .extensions
//!         .get::<OriginalUri>()
//!         .map_or(parts.uri.path(), |original| original.0.path());
//!     Some(key::canonical_path(path).into_owned())
//! });
//! let items = Router::new()
//!     .route("/items/{id}", get(|| async { "item" }).put(|| async { "saved" }))
//!     .layer(layer);
//! let app: Router = Router::new().nest("/shop-a", items.clone()).nest("/shop-b", items);
//! # let _ = app;
//! ```
//!
//! With [`route_layer`](https://docs.rs/axum/latest/axum/struct.Router.html#method.route_layer)
//! the layer runs after routing, and axum's `MatchedPath` extension names the route;
//! [`route_key`] then keys by the route and the parameters as the handler decodes them:
//!
//! ```
//! use axum::{extract::{MatchedPath, OriginalUri}, routing::get, Router};
//! use tower_precondition::{key, MemoryStore, PreconditionLayer};
//!
//! let layer = PreconditionLayer::new(MemoryStore::new()).key_fn(|parts| {
//!     let path = parts
//!         .extensions
//!         .get::<OriginalUri>()
//!         .map_or(parts.uri.path(), |original| original.0.path());
//!     Some(match parts.extensions.get::<MatchedPath>() {
//!         Some(route) => key::route_key(route.as_str(), path),
//!         // Never `None` for a write we cannot classify: that would skip versioning.
//!         None => key::canonical_path(path).into_owned(),
//!     })
//! });
//! let app: Router = Router::new()
//!     .route("/items/{id}", get(|| async { "item" }).put(|| async { "saved" }))
//!     .route_layer(layer);
//! # let _ = app;
//! ```

use std::borrow::Cow;

use http::request::Parts;
use sha2::{Digest, Sha256};

/// The longest key, in bytes, that [`bounded_key`] stores as it is.
pub const MAX_KEY_LEN: usize = 256;

/// How many leading bytes of a long key its digest form keeps (readable in logs).
const DIGEST_PREFIX_LEN: usize = 64;

/// Separates the kept prefix from the digest. A short key that contains it is digested
/// too, so that no key can be spelled to look like another key's digest form.
const DIGEST_MARK: &str = "#sha256:";

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The default key: [`canonical_path`] of the request path.
///
/// This is what [`PreconditionLayer`](crate::PreconditionLayer) and the transactional
/// layer use when no `key_fn` is set; pass it to `key_fn` to combine it with other
/// settings explicitly.
///
/// ```
/// use http::Request;
/// use tower_precondition::key::canonical_path_key;
///
/// let (parts, ()) = Request::put("/items/%31?x=1").body(()).unwrap().into_parts();
/// assert_eq!(canonical_path_key(&parts).as_deref(), Some("/items/1"));
/// ```
pub fn canonical_path_key(parts: &Parts) -> Option<String> {
    Some(canonical_path(parts.uri.path()).into_owned())
}

/// `bounded_key(canonical_path(path))`, shared: one allocation for a path that is
/// already canonical and short (the layers' default key, on every request).
pub(crate) fn bounded_path_key(path: &str) -> std::sync::Arc<str> {
    if is_short_canonical(path) {
        return std::sync::Arc::from(path);
    }
    bounded_canonical_key(path)
}

/// `bounded_path_key` without its fast path: every path's key, step by step.
fn bounded_canonical_key(path: &str) -> std::sync::Arc<str> {
    match canonical_path(path) {
        Cow::Borrowed(path) if fits_unbounded(path) => std::sync::Arc::from(path),
        other => std::sync::Arc::from(bounded_key(other.into_owned())),
    }
}

/// Whether `path` is its own stored key, checked in one pass: at most [`MAX_KEY_LEN`]
/// bytes, only raw path chars (so no `%` to normalize, and no [`DIGEST_MARK`], whose
/// `#` is not one) and no dot segment. What nearly every request path is.
fn is_short_canonical(path: &str) -> bool {
    if path.len() > MAX_KEY_LEN {
        return false;
    }
    // The dots that begin the current segment; `NOT_DOTS` once it has another char.
    const NOT_DOTS: u8 = 3;
    let mut dots = 0;
    for &b in path.as_bytes() {
        match b {
            b'/' if dots == 1 || dots == 2 => return false,
            b'/' => dots = 0,
            b'.' => dots = (dots + 1).min(NOT_DOTS),
            b if is_path_char(b) => dots = NOT_DOTS,
            _ => return false,
        }
    }
    dots != 1 && dots != 2
}

/// Whether `key` is stored as it is (see [`bounded_key`]).
fn fits_unbounded(key: &str) -> bool {
    key.len() <= MAX_KEY_LEN && !key.contains(DIGEST_MARK)
}

/// The RFC 3986 section 6.2.2 normal form of a path (see the [module docs](self)):
/// unreserved characters decoded, other percent-encodings in uppercase hex, dot
/// segments removed, and bytes a path cannot hold raw percent-encoded.
///
/// Idempotent: `canonical_path(&canonical_path(p)) == canonical_path(p)`. Borrows when
/// `path` is already canonical.
///
/// ```
/// use tower_precondition::key::canonical_path;
///
/// assert_eq!(canonical_path("/items/%31"), "/items/1");
/// assert_eq!(canonical_path("/items/a/../%7e/./x%2fy"), "/items/~/x%2Fy");
/// // Empty segments and a trailing slash are kept.
/// assert_eq!(canonical_path("/items//1/"), "/items//1/");
/// ```
pub fn canonical_path(path: &str) -> Cow<'_, str> {
    let encoded = normalize_percent(path);
    if !has_dot_segment(&encoded) {
        return encoded;
    }
    Cow::Owned(remove_dot_segments(&encoded))
}

/// A key that names the matched route and its parameters as the handler decodes them:
/// the [`canonical_path`] of `path`, with each segment captured by a `{param}` of
/// `route` fully percent-decoded and re-encoded (only unreserved characters raw), and
/// a `{*rest}` capture likewise with its `/`s kept. So `/items/a+b` and `/items/a%2Bb`,
/// which axum's `Path` hands to the handler as the same `a+b`, get one key.
///
/// `route` is axum's `MatchedPath` (available to a layer added with `route_layer`);
/// `path` the full request path (`OriginalUri` under `nest`). When `route` does not
/// match `path`, or uses a capture inside a segment, the result is
/// [`canonical_path`] of `path`: never an absent key.
///
/// ```
/// use tower_precondition::key::route_key;
///
/// assert_eq!(route_key("/items/{id}", "/items/a+b"), "/items/a%2Bb");
/// assert_eq!(route_key("/items/{id}", "/items/a%2bb"), "/items/a%2Bb");
/// assert_eq!(route_key("/files/{*rest}", "/files/a%2Fb/c"), "/files/a/b/c");
/// ```
pub fn route_key(route: &str, path: &str) -> String {
    let canonical = canonical_path(path);
    match_route(route, &canonical).unwrap_or_else(|| canonical.into_owned())
}

fn match_route(route: &str, path: &str) -> Option<String> {
    let mut out = String::with_capacity(path.len() + 8);
    let mut segments = path.split('/');
    for (i, pattern) in route.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if let Some(name) = pattern.strip_prefix("{*").and_then(|p| p.strip_suffix('}')) {
            if name.contains(['{', '}']) {
                return None;
            }
            let rest: Vec<&str> = segments.by_ref().collect();
            encode_into(&mut out, &percent_decode(&rest.join("/")), true);
            return Some(out);
        }
        let segment = segments.next()?;
        if let Some(name) = pattern.strip_prefix('{').and_then(|p| p.strip_suffix('}')) {
            if name.is_empty() || name.contains(['{', '}']) {
                return None;
            }
            encode_into(&mut out, &percent_decode(segment), false);
        } else if pattern.contains(['{', '}']) {
            // `{{` escapes and captures inside a segment: not matched here.
            return None;
        } else if pattern == segment {
            out.push_str(segment);
        } else {
            return None;
        }
    }
    segments.next().is_none().then_some(out)
}

/// The key a store holds for `key`: `key` itself when it has at most [`MAX_KEY_LEN`]
/// bytes, otherwise `<its first 64 bytes, cut at a char boundary>#sha256:<64 hex>`,
/// the SHA-256 of the whole key. A key that contains `#sha256:` is always digested, so
/// a short key can never equal another key's digest form.
///
/// Distinct keys give distinct stored keys unless SHA-256 collides (no collision is
/// known, and finding one is computationally infeasible), so two long keys that share
/// a long prefix stay two resources. The layers apply this after the key function, the
/// same way for every store; a [`Reservation`](crate::Reservation) carries the stored key.
///
/// ```
/// use tower_precondition::key::{bounded_key, MAX_KEY_LEN};
///
/// assert_eq!(bounded_key("/items/1".into()), "/items/1");
/// let long = format!("/items/{}", "x".repeat(3000));
/// let stored = bounded_key(long.clone());
/// assert!(stored.len() <= 136 && stored.contains("#sha256:"));
/// assert_ne!(stored, bounded_key(format!("{long}y")));
/// ```
pub fn bounded_key(key: String) -> String {
    if fits_unbounded(&key) {
        return key;
    }
    let mut cut = DIGEST_PREFIX_LEN.min(key.len());
    while !key.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = Sha256::digest(key.as_bytes());
    let mut out = String::with_capacity(cut + DIGEST_MARK.len() + 2 * digest.len());
    out.push_str(&key[..cut]);
    out.push_str(DIGEST_MARK);
    for byte in digest.iter() {
        // Lowercase hex, as digests are usually written.
        out.push(char::from(HEX[usize::from(byte >> 4)].to_ascii_lowercase()));
        out.push(char::from(
            HEX[usize::from(byte & 0xF)].to_ascii_lowercase(),
        ));
    }
    out
}

const fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Bytes a path holds raw: `pchar` (RFC 3986 section 3.3) without `%`, plus `/`.
fn is_path_char(b: u8) -> bool {
    PATH_CHARS[usize::from(b)]
}

/// [`is_path_char`] as a table: one load per byte of every request path.
const PATH_CHARS: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = is_path_char_by_class(b as u8);
        b += 1;
    }
    table
};

const fn is_path_char_by_class(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The byte a `%XX` at `bytes[i]` encodes, if it is one.
fn escape_at(bytes: &[u8], i: usize) -> Option<u8> {
    let hi = hex_value(*bytes.get(i + 1)?)?;
    let lo = hex_value(*bytes.get(i + 2)?)?;
    Some(hi << 4 | lo)
}

fn push_escape(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xF)]));
}

/// Steps 1 and 2 of RFC 3986 section 6.2.2 (case and percent-encoding normalization),
/// plus encoding what a path cannot hold raw. The output is ASCII.
fn normalize_percent(path: &str) -> Cow<'_, str> {
    let bytes = path.as_bytes();
    let canonical_at = |i: usize| match bytes[i] {
        b'%' => escape_at(bytes, i).is_some_and(|b| {
            !is_unreserved(b) && !bytes[i + 1..i + 3].iter().any(u8::is_ascii_lowercase)
        }),
        b => is_path_char(b),
    };
    let mut i = 0;
    while i < bytes.len() && canonical_at(i) {
        i += if bytes[i] == b'%' { 3 } else { 1 };
    }
    if i == bytes.len() {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 8);
    out.push_str(&path[..i]);
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            match escape_at(bytes, i) {
                Some(decoded) if is_unreserved(decoded) => out.push(char::from(decoded)),
                Some(decoded) => push_escape(&mut out, decoded),
                // A `%` that starts no percent-encoding is data: decoders keep it as a
                // literal `%`, which is what `%25` means.
                None => {
                    push_escape(&mut out, b'%');
                    i += 1;
                    continue;
                }
            }
            i += 3;
        } else {
            if is_path_char(b) {
                out.push(char::from(b));
            } else {
                push_escape(&mut out, b);
            }
            i += 1;
        }
    }
    Cow::Owned(out)
}

fn has_dot_segment(path: &str) -> bool {
    // Split as bytes: a `char` pattern costs a searcher per segment.
    path.as_bytes()
        .split(|&b| b == b'/')
        .any(|s| s == b"." || s == b"..")
}

/// RFC 3986 section 5.2.4, step by step.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path;
    let mut output = String::with_capacity(path.len());
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../") {
            input = rest; // A
        } else if let Some(rest) = input.strip_prefix("./") {
            input = rest; // A
        } else if input.starts_with("/./") {
            input = &input[2..]; // B
        } else if input == "/." {
            input = "/"; // B
        } else if input.starts_with("/../") {
            input = &input[3..]; // C
            pop_segment(&mut output);
        } else if input == "/.." {
            input = "/"; // C
            pop_segment(&mut output);
        } else if input == "." || input == ".." {
            input = ""; // D
        } else {
            // E: the first segment, with its leading `/`, moves to the output.
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input = &input[end..];
        }
    }
    output
}

fn pop_segment(output: &mut String) {
    match output.rfind('/') {
        Some(i) => output.truncate(i),
        None => output.clear(),
    }
}

/// Full percent-decoding, as a framework decodes a path parameter; invalid escapes
/// stay as they are.
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], escape_at(bytes, i)) {
            (b'%', Some(decoded)) => {
                out.push(decoded);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

/// Encodes `bytes` with only unreserved characters (and `/` when `keep_slash`) raw.
fn encode_into(out: &mut String, bytes: &[u8], keep_slash: bool) {
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            push_escape(out, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rfc_3986_examples() {
        // Section 6.2.2.1 / 6.2.2.2.
        assert_eq!(canonical_path("/a%c2%b1b"), "/a%C2%B1b");
        assert_eq!(canonical_path("/%7Euser/%41%62%2d%2E%5f"), "/~user/Ab-._");
        // Section 5.2.4.
        assert_eq!(canonical_path("/a/b/c/./../../g"), "/a/g");
        assert_eq!(canonical_path("mid/content=5/../6"), "mid/6");
        assert_eq!(canonical_path("/../a"), "/a");
        assert_eq!(canonical_path("/a/.."), "/");
        assert_eq!(canonical_path("/a/."), "/a/");
        // A dot segment spelled with `%2E` is a dot segment.
        assert_eq!(canonical_path("/items/%2e%2E/1"), "/1");
        // `..` inside a longer segment is not one.
        assert_eq!(canonical_path("/a/..b/.c"), "/a/..b/.c");
    }

    #[test]
    fn encodes_what_a_path_cannot_hold() {
        assert_eq!(canonical_path("/a b"), "/a%20b");
        assert_eq!(canonical_path("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(canonical_path("/100%"), "/100%25");
        assert_eq!(canonical_path("/%zz"), "/%25zz");
        // Stays stable: the literal `%` is encoded, so no new escape forms.
        assert_eq!(canonical_path("/%%34%31"), "/%2541");
        assert_eq!(canonical_path("/%2541"), "/%2541");
    }

    #[test]
    fn borrows_when_canonical() {
        assert!(matches!(canonical_path("/items/1"), Cow::Borrowed(_)));
        assert!(matches!(canonical_path("/a%2Fb;x=1"), Cow::Borrowed(_)));
        assert!(matches!(canonical_path("/a%2fb"), Cow::Owned(_)));
        assert!(matches!(canonical_path("*"), Cow::Borrowed(_)));
    }

    #[test]
    fn keeps_empty_segments_and_trailing_slash() {
        assert_eq!(canonical_path("/items//1"), "/items//1");
        assert_eq!(canonical_path("/items/1/"), "/items/1/");
        assert_eq!(canonical_path(""), "");
    }

    #[test]
    fn route_keys() {
        assert_eq!(route_key("/items/{id}", "/items/1"), "/items/1");
        assert_eq!(route_key("/items/{id}", "/items/%31"), "/items/1");
        assert_eq!(route_key("/items/{id}", "/items/a%2Fb"), "/items/a%2Fb");
        assert_eq!(
            route_key("/a/{x}/b/{y}", "/a/%2b/b/%3d"),
            route_key("/a/{x}/b/{y}", "/a/+/b/=")
        );
        // No match: the canonical path, never nothing.
        assert_eq!(route_key("/items/{id}", "/other/1"), "/other/1");
        assert_eq!(route_key("/items/{id}", "/items/1/x"), "/items/1/x");
        assert_eq!(route_key("/f/{name}.txt", "/f/a+b.txt"), "/f/a+b.txt");
        assert_eq!(
            route_key("/files/{*rest}", "/files/a+b/c"),
            "/files/a%2Bb/c"
        );
    }

    #[test]
    fn bounded_keys() {
        let short = "k".repeat(MAX_KEY_LEN);
        assert_eq!(bounded_key(short.clone()), short);
        let long = "k".repeat(MAX_KEY_LEN + 1);
        let stored = bounded_key(long.clone());
        assert_eq!(stored.len(), DIGEST_PREFIX_LEN + DIGEST_MARK.len() + 64);
        assert!(stored.starts_with(&long[..DIGEST_PREFIX_LEN]));
        // Two long keys with a long common prefix stay distinct.
        let a = format!("/items/{}a", "x".repeat(3000));
        let b = format!("/items/{}b", "x".repeat(3000));
        assert_ne!(bounded_key(a.clone()), bounded_key(b));
        assert_eq!(bounded_key(a.clone()), bounded_key(a.clone()));
        // A short key spelled like a digest form is digested too.
        let lookalike = bounded_key(a);
        assert_ne!(bounded_key(lookalike.clone()), lookalike);
        // The prefix is cut at a char boundary.
        let wide = "\u{e9}".repeat(200);
        let stored = bounded_key(wide);
        assert!(stored.starts_with(&"\u{e9}".repeat(32)));
        assert_eq!(bounded_key("a".repeat(300)).len(), 136);
    }

    #[test]
    fn digest_is_sha256() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1, after the mark.
        let key = format!("abc{DIGEST_MARK}");
        let stored = bounded_key(key.clone());
        let expected = Sha256::digest(key.as_bytes());
        let hex: String = expected.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(stored, format!("{key}{DIGEST_MARK}{hex}"));
        assert_eq!(
            Sha256::digest(b"abc")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    const UNRESERVED: &str = "ABCXYZabcxyz0189-._~";

    /// `has_dot_segment` as it was, splitting at a `char`.
    fn has_dot_segment_by_char(path: &str) -> bool {
        path.split('/').any(|s| s == "." || s == "..")
    }

    /// The fast path agrees with the step-by-step key, and is taken only where it may be.
    fn assert_fast_path_exact(path: &str) {
        let fast = is_short_canonical(path);
        assert_eq!(
            bounded_path_key(path),
            bounded_canonical_key(path),
            "{path:?}"
        );
        let canonical = canonical_path(path);
        let own_key = matches!(canonical, Cow::Borrowed(_)) && fits_unbounded(path);
        // Taken only for a path that is its own key (one with `%XX` takes the long way).
        assert!(!fast || own_key, "{path:?}");
        assert_eq!(
            has_dot_segment(path),
            has_dot_segment_by_char(path),
            "{path:?}"
        );
    }

    #[test]
    fn fast_path_keys_are_exact() {
        let at_bound = format!("/{}", "a".repeat(MAX_KEY_LEN - 1));
        let over_bound = format!("/{}", "a".repeat(MAX_KEY_LEN));
        let marked = format!("/a{DIGEST_MARK}b");
        for path in [
            "",
            "/",
            "/items/42",
            "/items//1/",
            "*",
            ".",
            "..",
            "...",
            "/.",
            "/..",
            "/...",
            "./a",
            "../a",
            "/a/./b",
            "/a/../b",
            "/a/.../b",
            "/a/.b",
            "/a/b.",
            "/a/..b",
            "/a/b/.",
            "/a/b/..",
            "a/.",
            "/a%2Fb",
            "/a%2fb",
            "/%31",
            "/a b",
            "/caf\u{e9}",
            "/a#b",
            "/a?b",
            "/a;b=c,d",
            "/~user",
            "/%",
            "/%2",
            "/a/%2e/b",
            "//",
            "/./",
            at_bound.as_str(),
            over_bound.as_str(),
            marked.as_str(),
        ] {
            assert_fast_path_exact(path);
        }
        assert!(is_short_canonical("/items/42") && is_short_canonical(&at_bound));
        assert!(!is_short_canonical(&over_bound) && !is_short_canonical(&marked));
        // Every byte as a segment of its own and inside one.
        for byte in 0..=0x7F_u8 {
            let c = char::from(byte);
            assert_fast_path_exact(&format!("/{c}"));
            assert_fast_path_exact(&format!("/a{c}b/c"));
            assert_fast_path_exact(&format!("/.{c}/.."));
        }
    }

    #[test]
    fn path_char_table_is_the_char_classes() {
        for b in 0..=u8::MAX {
            let by_class = is_unreserved(b) || b"!$&'()*+,;=:@/".contains(&b);
            assert_eq!(is_path_char(b), by_class, "{b:#x}");
        }
    }

    proptest! {
        #[test]
        fn idempotent(path in "[/a.%0-9A-Fa-f~ \u{e9}+]{0,24}") {
            let once = canonical_path(&path).into_owned();
            let twice = canonical_path(&once).into_owned();
            prop_assert_eq!(&once, &twice);
        }

        #[test]
        fn idempotent_any(path in any::<String>()) {
            let once = canonical_path(&path).into_owned();
            prop_assert_eq!(canonical_path(&once).into_owned(), once.clone());
            prop_assert!(once.is_ascii());
        }

        #[test]
        fn escaped_unreserved_is_the_char(
            before in "[/a-z]{0,8}",
            index in 0..UNRESERVED.len(),
            lower in any::<bool>(),
            after in "[/a-z]{0,8}",
        ) {
            let c = UNRESERVED.as_bytes()[index];
            let escape = if lower { format!("%{c:02x}") } else { format!("%{c:02X}") };
            let escaped = format!("/{before}{escape}{after}");
            let plain = format!("/{before}{}{after}", char::from(c));
            prop_assert_eq!(canonical_path(&escaped), canonical_path(&plain));
        }

        #[test]
        fn route_key_matches_decoded_params(value in "[a-z+=,;%]{1,8}") {
            // Whatever spelling, the decoded value decides the key.
            let decoded = percent_decode(&value);
            let mut spelled = String::new();
            encode_into(&mut spelled, &decoded, false);
            prop_assert_eq!(
                route_key("/items/{id}", &format!("/items/{value}")),
                route_key("/items/{id}", &format!("/items/{spelled}"))
            );
        }

        #[test]
        fn fast_path_keys_equal_step_by_step_keys(path in "[/a.%0-9A-Fa-f~ \u{e9}+#:;]{0,24}") {
            assert_fast_path_exact(&path);
        }

        #[test]
        fn fast_path_keys_equal_step_by_step_keys_any(path in any::<String>()) {
            assert_fast_path_exact(&path);
        }

        #[test]
        fn fast_path_keys_near_the_bound(
            segments in proptest::collection::vec("[a-z.]{0,3}|[a-z]{60,70}", 0..12)
        ) {
            assert_fast_path_exact(&segments.join("/"));
            assert_fast_path_exact(&format!("/{}", segments.join("/")));
        }

        #[test]
        fn bounded_key_is_bounded(key in any::<String>()) {
            let stored = bounded_key(key.clone());
            prop_assert!(stored.len() <= DIGEST_PREFIX_LEN + DIGEST_MARK.len() + 64 || stored == key);
            prop_assert!(stored.len() <= MAX_KEY_LEN.max(136));
        }
    }
}
