//! The opaque cursor of the lists kept newest first (a customer's files, a
//! customer's tasks in the portal): where the previous page ended.
//!
//! Each list is ordered by `(created_at DESC, id DESC)`, a total order, so the last
//! row of a page pins down exactly where the next one starts (keyset pagination: no
//! OFFSET, no row skipped or repeated when rows are added or deleted in between).
//!
//! Encoding: URL-safe base64 without padding of 25 bytes: a format version (1), the
//! `created_at` in microseconds since the Unix epoch (big-endian i64, the precision
//! Postgres keeps), and the row's id (16 bytes). Clients must treat it as opaque; the
//! version byte lets the format change without misreading old cursors.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
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

#[cfg(test)]
mod tests {
    use super::*;

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
