//! The browser's session: the caller's own token kept in a cookie, and the
//! check that an unsafe request carrying it comes from a page of this site.
//!
//! The cookie holds the very JWT that `POST /login` was given (CONTRACT.md
//! "Authentication"), so a session needs no server-side store, ends when the
//! token expires, and is checked exactly like a bearer token. It is
//! `HttpOnly` (no script reads it), `SameSite=Lax` (another site's forms and
//! scripts do not send it; a link from an e-mail still opens the page signed
//! in) and `Secure` when the request came over HTTPS.

use axum::http::HeaderMap;
use axum::http::header::{COOKIE, HOST, ORIGIN};

/// The session cookie's name.
pub const COOKIE_NAME: &str = "dossier_session";

/// The token in the request's session cookie, if it has one.
pub fn token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim())
        .filter(|value| !value.is_empty())
}

/// Whether the browser says this request was started by a page of this very
/// site (or typed by the user): `Sec-Fetch-Site` when the browser sends it,
/// else an `Origin` equal to this site's. A request with neither is refused:
/// every browser that keeps cookies sends at least `Origin` on an unsafe
/// request, and a client that is not a browser uses the bearer header.
pub fn from_this_site(headers: &HeaderMap) -> bool {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (header(ORIGIN.as_str()), header(HOST.as_str())) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, authority)| authority.eq_ignore_ascii_case(host)),
        _ => false,
    }
}

/// Whether the request reached us over HTTPS (through a proxy that says so):
/// then the cookie is `Secure`. A forged header only hurts the forger's own
/// session.
fn over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

/// The `Set-Cookie` value that starts a session with `token` for
/// `max_age_secs` seconds (until the token's `exp`).
pub fn start(request: &HeaderMap, token: &str, max_age_secs: i64) -> String {
    let secure = if over_https(request) { "; Secure" } else { "" };
    format!(
        "{COOKIE_NAME}={token}; Path=/; Max-Age={}; HttpOnly; SameSite=Lax{secure}",
        max_age_secs.max(0)
    )
}

/// The `Set-Cookie` value that ends the session.
pub fn end(request: &HeaderMap) -> String {
    start(request, "", 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn the_session_token_is_found_among_other_cookies() {
        let h = headers(&[("cookie", "a=1; dossier_session=abc.def.ghi; b=2")]);
        assert_eq!(token(&h), Some("abc.def.ghi"));
        assert_eq!(token(&headers(&[("cookie", "dossier_session=")])), None);
        assert_eq!(token(&headers(&[("cookie", "other=1")])), None);
        assert_eq!(token(&HeaderMap::new()), None);
    }

    #[test]
    fn a_request_from_this_site_is_told_apart_from_one_of_another_site() {
        assert!(from_this_site(&headers(&[(
            "sec-fetch-site",
            "same-origin"
        )])));
        assert!(from_this_site(&headers(&[("sec-fetch-site", "none")])));
        assert!(!from_this_site(&headers(&[(
            "sec-fetch-site",
            "same-site"
        )])));
        assert!(!from_this_site(&headers(&[(
            "sec-fetch-site",
            "cross-site"
        )])));
        // Sec-Fetch-Site wins over a matching Origin.
        assert!(!from_this_site(&headers(&[
            ("sec-fetch-site", "cross-site"),
            ("origin", "http://dossier.test"),
            ("host", "dossier.test"),
        ])));
        assert!(from_this_site(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ])));
        assert!(!from_this_site(&headers(&[
            ("origin", "http://127.0.0.1:9999"),
            ("host", "127.0.0.1:8080"),
        ])));
        assert!(!from_this_site(&headers(&[
            ("origin", "null"),
            ("host", "127.0.0.1:8080")
        ])));
        assert!(!from_this_site(&headers(&[("host", "127.0.0.1:8080")])));
    }

    #[test]
    fn the_cookie_is_http_only_lax_and_secure_only_over_https() {
        let plain = start(&HeaderMap::new(), "t", 60);
        assert_eq!(
            plain,
            "dossier_session=t; Path=/; Max-Age=60; HttpOnly; SameSite=Lax"
        );
        let https = start(&headers(&[("x-forwarded-proto", "https")]), "t", 60);
        assert!(https.ends_with("; Secure"), "{https}");
        assert!(end(&HeaderMap::new()).contains("Max-Age=0"));
    }
}
