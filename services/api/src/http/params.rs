//! Reading query strings and JSON bodies into typed values, with the
//! contract's `validation_failed` for anything malformed (axum's own
//! rejections would answer plain text).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Path, Request};
use axum::http::request::Parts;
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use dossier_projections::cursor::{Cursor, Paging};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, AppError};

/// An id in a path that is not a UUID names nothing there: 404, like any
/// unknown id (rule 6).
pub fn path_uuid(raw: &str) -> Result<uuid::Uuid, ApiError> {
    uuid::Uuid::parse_str(raw).map_err(|_| ApiError(AppError::NotFound))
}

/// A query string as ordered pairs; keys may repeat (`visibility=a&visibility=b`).
pub struct QueryPairs(Vec<(String, String)>);

impl QueryPairs {
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let mut pairs = Vec::new();
        for part in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or((part, ""));
            pairs.push((decode(key)?, decode(value)?));
        }
        Ok(Self(pairs))
    }

    /// The last value of `key`, if present. An empty value (`key=`) is a
    /// value like any other, which the typed readers refuse: a parameter is
    /// either absent or well formed, as the OpenAPI document says.
    pub fn one(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The pairs that have a value. A page's filter form sends its blank
    /// fields as `key=`, which there means "no filter on this".
    pub fn without_blanks(mut self) -> Self {
        self.0.retain(|(_, value)| !value.trim().is_empty());
        self
    }

    /// These pairs as a query string, with `key` set to `value` alone (or
    /// removed, for `None`): a page's link to the next page of the same list.
    pub fn with(&self, key: &str, value: Option<&str>) -> String {
        let encode = |raw: &str| {
            percent_encoding::utf8_percent_encode(raw, percent_encoding::NON_ALPHANUMERIC)
                .to_string()
        };
        self.0
            .iter()
            .filter(|(k, _)| k != key)
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(value.map(|v| (key, v)))
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&")
    }

    /// Every value of `key`, also split at commas (`visibility=portal,internal`);
    /// an empty one stays, for the caller's parser to refuse.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect()
    }

    pub fn bool(&self, key: &'static str) -> Result<Option<bool>, ApiError> {
        match self.one(key) {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(_) => Err(ApiError::validation(key, "must be true or false")),
        }
    }

    pub fn int(&self, key: &'static str, min: i64, max: i64) -> Result<Option<i64>, ApiError> {
        match self.one(key) {
            None => Ok(None),
            Some(raw) => match raw.parse::<i64>() {
                Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(ApiError::validation(
                    key,
                    format!("must be a whole number from {min} to {max}"),
                )),
            },
        }
    }

    /// `limit` (1–500, default 50) and `cursor` of a list kept newest first
    /// (a customer's files, the portal's lists).
    pub fn paging(&self) -> Result<Paging, ApiError> {
        Ok(Paging {
            limit: self.limit()?,
            cursor: self.cursor(Cursor::decode)?,
        })
    }

    /// `limit` of any list: 1–500, default 50.
    pub fn limit(&self) -> Result<u32, ApiError> {
        Ok(self
            .int("limit", 1, i64::from(Paging::MAX_LIMIT))?
            .map_or(Paging::DEFAULT_LIMIT, |n| n as u32))
    }

    /// `cursor` of any list, read by that list's cursor's `decode`.
    pub fn cursor<C, E>(
        &self,
        decode: impl FnOnce(&str) -> Result<C, E>,
    ) -> Result<Option<C>, ApiError> {
        self.cursor_in("cursor", decode)
    }

    /// A cursor under another name, for a page that pages two lists at once.
    pub fn cursor_in<C, E>(
        &self,
        key: &'static str,
        decode: impl FnOnce(&str) -> Result<C, E>,
    ) -> Result<Option<C>, ApiError> {
        self.one(key)
            .map(|raw| {
                decode(raw)
                    .map_err(|_| ApiError::validation(key, "is not a cursor this API gave out"))
            })
            .transpose()
    }

    /// RFC 3339, or a plain date: the start of that day (UTC).
    pub fn time_from(&self, key: &'static str) -> Result<Option<DateTime<Utc>>, ApiError> {
        self.one(key)
            .map(|raw| parse_time(key, raw, NaiveTime::MIN))
            .transpose()
    }

    /// RFC 3339, or a plain date: the end of that day (UTC), so the day is included.
    pub fn time_to(&self, key: &'static str) -> Result<Option<DateTime<Utc>>, ApiError> {
        let end_of_day =
            NaiveTime::from_hms_micro_opt(23, 59, 59, 999_999).unwrap_or(NaiveTime::MIN);
        self.one(key)
            .map(|raw| parse_time(key, raw, end_of_day))
            .transpose()
    }
}

fn decode(raw: &str) -> Result<String, ApiError> {
    let spaced = raw.replace('+', " ");
    let decoded = percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::validation("query", "is not valid UTF-8"))?;
    // No value of ours holds a NUL, and Postgres cannot take one in text.
    if decoded.contains('\0') {
        return Err(ApiError::validation(
            "query",
            "must not contain NUL characters",
        ));
    }
    Ok(decoded)
}

fn parse_time(
    key: &'static str,
    raw: &str,
    time_of_day: NaiveTime,
) -> Result<DateTime<Utc>, ApiError> {
    if let Ok(at) = DateTime::parse_from_rfc3339(raw) {
        return Ok(at.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(raw, "%Y-%m-%d")
        .map(|day| day.and_time(time_of_day).and_utc())
        .map_err(|_| ApiError::validation(key, "must be an RFC 3339 time or a YYYY-MM-DD date"))
}

/// A path segment as text. One that does not decode (invalid UTF-8 after
/// percent-decoding) names nothing: `not_found`, in the contract's error body
/// (axum's own rejection would answer a plain-text 400).
pub struct PathText(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathText {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(text)) => Ok(Self(text)),
            Err(_) => Err(ApiError(AppError::NotFound)),
        }
    }
}

/// `Multipart` whose rejection (not `multipart/form-data`, no boundary)
/// answers the contract's `validation_failed`.
pub struct Form(pub Multipart);

impl<S: Send + Sync> FromRequest<S> for Form {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        Multipart::from_request(req, state)
            .await
            .map(Self)
            .map_err(|rejection| ApiError::validation("body", rejection.body_text()))
    }
}

/// `Json<T>` whose rejections answer the contract's error body.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(value)) => json_object(value).map(Self),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A body of ours is a JSON object: serde would also read a struct from an
/// array of its fields in order (`[null, null]`), which no client means.
pub fn json_object<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    if !value.is_object() {
        return Err(ApiError::validation("body", "must be a JSON object"));
    }
    serde_json::from_value(value).map_err(|e| ApiError::validation("body", e.to_string()))
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    ApiError::validation("body", rejection.body_text())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_and_comma_separated_values_are_all_read() {
        let q = QueryPairs::parse(Some(
            "visibility=portal&visibility=internal,portal_and_moving&x=",
        ))
        .unwrap();
        assert_eq!(
            q.all("visibility"),
            ["portal", "internal", "portal_and_moving"]
        );
        assert_eq!(q.one("x"), Some(""), "present, and empty");
        assert_eq!(q.one("y"), None);
    }

    #[test]
    fn an_empty_or_nul_value_is_refused_not_taken_for_absent() {
        let q = QueryPairs::parse(Some("limit=&viewed=&cursor=&from=")).unwrap();
        assert!(q.int("limit", 1, 500).is_err());
        assert!(q.bool("viewed").is_err());
        assert!(q.paging().is_err());
        assert!(q.time_from("from").is_err());
        assert!(QueryPairs::parse(Some("contract_id=a%00b")).is_err());
    }

    #[test]
    fn a_plain_date_is_a_whole_day_inclusive() {
        let q = QueryPairs::parse(Some("from=2026-11-22&to=2026-11-22")).unwrap();
        let from = q.time_from("from").unwrap().unwrap();
        let to = q.time_to("to").unwrap().unwrap();
        assert_eq!(from.to_rfc3339(), "2026-11-22T00:00:00+00:00");
        assert_eq!(to.to_rfc3339(), "2026-11-22T23:59:59.999999+00:00");
        assert!(
            QueryPairs::parse(Some("to=22.11.2026"))
                .unwrap()
                .time_to("to")
                .is_err()
        );
    }

    #[test]
    fn percent_encoded_rfc3339_times_are_read() {
        let q = QueryPairs::parse(Some("from=2026-11-22T10%3A15%3A00%2B01%3A00")).unwrap();
        assert_eq!(
            q.time_from("from").unwrap().unwrap().to_rfc3339(),
            "2026-11-22T09:15:00+00:00"
        );
    }
}
