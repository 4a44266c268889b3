//! The opaque cursors of the lists: where the previous page ended.
//!
//! Each list is ordered by a time and a unique key, a total order, so the last row
//! of a page pins down exactly where the next one starts (keyset pagination: no
//! OFFSET, no row skipped or repeated when rows are added or deleted in between).
//!
//! - [`Cursor`]: the lists kept newest first (a customer's files, a customer's
//!   tasks), ordered by `(created_at DESC, id DESC)`. Encoding: URL-safe base64
//!   without padding of 25 bytes: a format version (1), the `created_at` in
//!   microseconds since the Unix epoch (big-endian i64, the precision Postgres
//!   keeps), and the row's id (16 bytes).
//! - [`ActivityCursor`]: the customers list, most recently active first, ordered by
//!   `(last_activity_at DESC, customer_id ASC)` (customer ids compared byte by byte).
//!   Encoding: `c`, the `last_activity_at` in microseconds since the Unix epoch in
//!   decimal (no leading zeros, at most 17 digits), `_`, and the customer id; every
//!   character is URL-safe in a query, and the shape is one exact pattern (the
//!   OpenAPI document's `CustomerCursor`).
//!
//! Clients must treat both as opaque; the version byte and the leading `c` let the
//! formats change without misreading old cursors.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use dossier_domain::CustomerId;
use uuid::Uuid;

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 16;
/// Rows are created after 1970 and long before 2^58 µs (the year 11103): a
/// time outside is no row's, and Postgres could not even compare with some.
/// The bound makes the text form a simple pattern (the OpenAPI document's
/// `Cursor`): `AQ`, one of `A`–`P`, 30 URL-safe characters, one of `AQgw`.
const MAX_MICROS: i64 = 1 << 58;

/// Where a page of a list ended; the next page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last row of the page, truncated to microseconds.
    pub created_at: DateTime<Utc>,
    /// Id of the last row of the page.
    pub id: Uuid,
}

/// Which page of a list kept newest first: at most `limit` rows (clamped to
/// 1..=[`Self::MAX_LIMIT`] by the queries), after `cursor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

impl Paging {
    /// The contract's default page size.
    pub const DEFAULT_LIMIT: u32 = 50;
    /// The largest page.
    pub const MAX_LIMIT: u32 = 500;
}

impl Default for Paging {
    /// The first page, of the default size.
    fn default() -> Self {
        Self {
            limit: Self::DEFAULT_LIMIT,
            cursor: None,
        }
    }
}

/// A string that is not a cursor this service gave out (the API answers
/// `validation_failed` for the field `cursor`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    /// Not URL-safe base64.
    #[error("the cursor is not URL-safe base64")]
    NotBase64,
    /// Decodes, but to the wrong number of bytes or an unknown format version.
    #[error("the cursor has an unknown format")]
    UnknownFormat,
    /// The timestamp inside is out of range.
    #[error("the cursor holds an impossible time")]
    BadTime,
}

impl Cursor {
    /// The cursor that continues after a row with these keys.
    pub fn after(created_at: DateTime<Utc>, id: Uuid) -> Self {
        Self { created_at, id }
    }

    /// The opaque text form.
    pub fn encode(&self) -> String {
        let mut bytes = [0u8; LEN];
        bytes[0] = VERSION;
        bytes[1..9].copy_from_slice(&self.created_at.timestamp_micros().to_be_bytes());
        bytes[9..].copy_from_slice(self.id.as_bytes());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Reads a cursor given out by [`Self::encode`]; anything else is an error.
    pub fn decode(text: &str) -> Result<Self, CursorError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim())
            .map_err(|_| CursorError::NotBase64)?;
        if bytes.len() != LEN || bytes[0] != VERSION {
            return Err(CursorError::UnknownFormat);
        }
        let mut micros = [0u8; 8];
        micros.copy_from_slice(&bytes[1..9]);
        let micros = i64::from_be_bytes(micros);
        if !(0..MAX_MICROS).contains(&micros) {
            return Err(CursorError::BadTime);
        }
        let created_at = DateTime::from_timestamp_micros(micros).ok_or(CursorError::BadTime)?;
        let id = Uuid::from_slice(&bytes[9..]).map_err(|_| CursorError::UnknownFormat)?;
        Ok(Self { created_at, id })
    }
}

/// Where a page of the customers list ended: the last customer's
/// `last_activity_at` (microseconds) and id. The next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityCursor {
    /// `last_activity_at` of the last customer of the page, truncated to
    /// microseconds.
    pub at: DateTime<Utc>,
    /// The last customer of the page.
    pub customer_id: CustomerId,
}

/// An [`ActivityCursor`]'s time has at most this many decimal digits of
/// microseconds (up to the year 5138), so its text form is one simple pattern.
const ACTIVITY_MAX_DIGITS: usize = 17;

impl ActivityCursor {
    /// The cursor that continues after a customer with these keys.
    pub fn after(at: DateTime<Utc>, customer_id: CustomerId) -> Self {
        Self { at, customer_id }
    }

    /// The opaque text form.
    pub fn encode(&self) -> String {
        format!(
            "c{}_{}",
            self.at.timestamp_micros(),
            self.customer_id.as_str()
        )
    }

    /// Reads a cursor given out by [`Self::encode`]; anything else (leading
    /// zeros, a sign, a time out of range, a malformed customer id) is an error,
    /// so that exactly the strings of the documented pattern are accepted.
    pub fn decode(text: &str) -> Result<Self, CursorError> {
        let (micros, customer) = text
            .strip_prefix('c')
            .and_then(|rest| rest.split_once('_'))
            .ok_or(CursorError::UnknownFormat)?;
        let canonical = !micros.is_empty()
            && micros.len() <= ACTIVITY_MAX_DIGITS
            && micros.bytes().all(|b| b.is_ascii_digit())
            && (micros == "0" || !micros.starts_with('0'));
        if !canonical {
            return Err(CursorError::BadTime);
        }
        let at = micros
            .parse::<i64>()
            .ok()
            .and_then(DateTime::from_timestamp_micros)
            .ok_or(CursorError::BadTime)?;
        let customer_id = CustomerId::parse(customer).map_err(|_| CursorError::UnknownFormat)?;
        Ok(Self { at, customer_id })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_activity_cursor_survives_its_text_form_and_nothing_else_reads() {
        let at = DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap();
        for id in ["cust-42", "a_b.c:d@e", "0", "._-"] {
            let cursor = ActivityCursor::after(at, CustomerId::parse(id).unwrap());
            let text = cursor.encode();
            assert_eq!(text, format!("c1795000000123456_{id}"));
            assert_eq!(ActivityCursor::decode(&text), Ok(cursor));
        }
        let epoch = ActivityCursor::after(
            DateTime::from_timestamp_micros(0).unwrap(),
            CustomerId::parse("x").unwrap(),
        );
        assert_eq!(ActivityCursor::decode("c0_x"), Ok(epoch));
        let latest = format!("c{}_x", "9".repeat(ACTIVITY_MAX_DIGITS));
        assert!(ActivityCursor::decode(&latest).is_ok());
        for bad in [
            "",
            "c",
            "c_x",
            "c1x",
            "c01_x",
            "c-1_x",
            "c+1_x",
            "x1_x",
            "c1_",
            "c1_.",
            "c1_..",
            "c1_a b",
            "c1_a%",
            &format!("c1{}_x", "0".repeat(ACTIVITY_MAX_DIGITS)),
            &format!("c1_{}", "a".repeat(129)),
        ] {
            assert!(ActivityCursor::decode(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_cursor_survives_its_text_form() {
        let created_at = DateTime::from_timestamp_micros(1_795_000_000_123_456).unwrap();
        let cursor = Cursor::after(created_at, Uuid::now_v7());
        let text = cursor.encode();
        assert!(
            text.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "URL-safe: {text}"
        );
        assert_eq!(Cursor::decode(&text), Ok(cursor));
    }

    #[test]
    fn the_text_form_has_the_documented_shape() {
        for micros in [0, 1_795_000_000_123_456, MAX_MICROS - 1] {
            let at = DateTime::from_timestamp_micros(micros).unwrap();
            for id in [Uuid::nil(), Uuid::max(), Uuid::now_v7()] {
                let text = Cursor::after(at, id).encode();
                let chars: Vec<char> = text.chars().collect();
                assert_eq!(chars.len(), 34, "{text}");
                assert_eq!(&text[..2], "AQ", "{text}");
                assert!(('A'..='P').contains(&chars[2]), "{text}");
                assert!("AQgw".contains(chars[33]), "{text}");
            }
        }
        let before_1970 = DateTime::from_timestamp_micros(-1).unwrap();
        let text = Cursor::after(before_1970, Uuid::nil()).encode();
        assert_eq!(Cursor::decode(&text), Err(CursorError::BadTime));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(Cursor::decode("not a cursor!"), Err(CursorError::NotBase64));
        assert_eq!(Cursor::decode(""), Err(CursorError::UnknownFormat));
        assert_eq!(Cursor::decode("AAAA"), Err(CursorError::UnknownFormat));
        let mut wrong_version = [0u8; LEN];
        wrong_version[0] = 9;
        assert_eq!(
            Cursor::decode(&URL_SAFE_NO_PAD.encode(wrong_version)),
            Err(CursorError::UnknownFormat)
        );
        let mut bad_time = [0u8; LEN];
        bad_time[0] = VERSION;
        bad_time[1..9].copy_from_slice(&i64::MAX.to_be_bytes());
        assert_eq!(
            Cursor::decode(&URL_SAFE_NO_PAD.encode(bad_time)),
            Err(CursorError::BadTime)
        );
    }
}
