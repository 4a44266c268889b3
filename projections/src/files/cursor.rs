//! The opaque cursor of the file list: where the previous page ended.
//!
//! The list is ordered by `(created_at DESC, id DESC)`, a total order, so the last
//! row of a page pins down exactly where the next one starts (keyset pagination: no
//! OFFSET, no row skipped or repeated when files are added or deleted in between).
//!
//! Encoding: URL-safe base64 without padding of 25 bytes: a format version (1), the
//! `created_at` in microseconds since the Unix epoch (big-endian i64, the precision
//! Postgres keeps), and the file id (16 bytes). Clients must treat it as opaque; the
//! version byte lets the format change without misreading old cursors.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use uuid::Uuid;

const VERSION: u8 = 1;
const LEN: usize = 1 + 8 + 16;

/// Where a page of the file list ended; the next page starts after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last file of the page, truncated to microseconds.
    pub created_at: DateTime<Utc>,
    /// Id of the last file of the page.
    pub id: Uuid,
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
    /// The cursor that continues after a file with these keys.
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
        let created_at = DateTime::from_timestamp_micros(i64::from_be_bytes(micros))
            .ok_or(CursorError::BadTime)?;
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
