//! Reading query strings and JSON bodies into typed values, with the
//! contract's `validation_failed` for anything malformed (axum's own
//! rejections would answer plain text).

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use chrono::{DateTime, NaiveDate, NaiveTime, Utc};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

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

    /// The last value of `key`, if present and not empty.
    pub fn one(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    /// Every value of `key`, also split at commas (`visibility=portal,internal`).
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .filter(|v| !v.is_empty())
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
    percent_decode_str(&spaced)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| ApiError::validation("query", "is not valid UTF-8"))
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

/// `Json<T>` whose rejections answer the contract's error body.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
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
        assert_eq!(q.one("x"), None);
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
