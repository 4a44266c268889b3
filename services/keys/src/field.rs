//! Sealed strings: a personal field of an event as the log stores it.
//!
//! `enc:v1:<key id>:<base64 of nonce, ciphertext and tag>`, AES-256-GCM under
//! the data key named, with the key id as associated data. The key id is in
//! clear so that a reader knows which key to fetch, and so that an auditor can
//! see which fields a destroyed key shredded.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{Aad, NONCE_LEN, Nonce};
use uuid::Uuid;

use crate::{DataKey, KeyError, random_bytes};

const PREFIX: &str = "enc:v1:";

/// Whether `text` is a sealed field (it may still be malformed).
pub fn is_sealed(text: &str) -> bool {
    text.starts_with(PREFIX)
}

/// A sealed field, parsed: which key it needs and its sealed bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedField<'a> {
    /// The data key it was sealed under.
    pub key_id: Uuid,
    body: &'a str,
}

impl<'a> SealedField<'a> {
    /// `None` for a string that is not sealed (a value written before
    /// encryption, which stays readable as it is); an error for one that
    /// claims to be sealed but is malformed.
    pub fn parse(text: &'a str) -> Result<Option<Self>, KeyError> {
        let Some(rest) = text.strip_prefix(PREFIX) else {
            return Ok(None);
        };
        let (key_id, body) = rest
            .split_once(':')
            .ok_or(KeyError::Malformed("no key id"))?;
        let key_id = Uuid::try_parse(key_id).map_err(|_| KeyError::Malformed("bad key id"))?;
        Ok(Some(Self { key_id, body }))
    }
}

impl DataKey {
    /// `plain`, sealed as an `enc:v1:` string under this key.
    pub fn seal_field(&self, plain: &str) -> String {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let mut sealed = plain.as_bytes().to_vec();
        self.aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(self.id().as_bytes()),
                &mut sealed,
            )
            .expect("sealing a field cannot fail");
        let mut bytes = nonce.to_vec();
        bytes.extend_from_slice(&sealed);
        format!("{PREFIX}{}:{}", self.id(), STANDARD.encode(bytes))
    }

    /// The plain text of a field sealed under this key.
    pub fn open_field(&self, field: &SealedField<'_>) -> Result<String, KeyError> {
        if field.key_id != self.id() {
            return Err(KeyError::Tampered("a field sealed under another key"));
        }
        // One buffer: decoded, opened in place, and kept as the text.
        let mut bytes = STANDARD
            .decode(field.body)
            .map_err(|_| KeyError::Malformed("bad base64"))?;
        if bytes.len() < NONCE_LEN {
            return Err(KeyError::Malformed("too short"));
        }
        let nonce = Nonce::try_assume_unique_for_key(&bytes[..NONCE_LEN])
            .map_err(|_| KeyError::Malformed("bad nonce"))?;
        let plain_len = self
            .aead()
            .open_within(
                nonce,
                Aad::from(self.id().as_bytes()),
                &mut bytes,
                NONCE_LEN..,
            )
            .map_err(|_| KeyError::Tampered("a sealed field does not open"))?
            .len();
        bytes.truncate(plain_len);
        String::from_utf8(bytes).map_err(|_| KeyError::Tampered("a sealed field is not text"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KEY_LEN;

    fn key() -> DataKey {
        DataKey::from_bytes(Uuid::new_v4(), &random_bytes::<KEY_LEN>())
    }

    #[test]
    fn a_sealed_field_names_its_key_and_opens_to_the_plain_text() {
        let key = key();
        let sealed = key.seal_field("Tax return 2025.pdf");
        assert!(sealed.starts_with(&format!("enc:v1:{}:", key.id())));
        assert!(!sealed.contains("Tax return"));
        let field = SealedField::parse(&sealed).unwrap().unwrap();
        assert_eq!(field.key_id, key.id());
        assert_eq!(key.open_field(&field).unwrap(), "Tax return 2025.pdf");
    }

    #[test]
    fn the_same_text_seals_differently_each_time() {
        let key = key();
        assert_ne!(key.seal_field("a"), key.seal_field("a"));
    }

    #[test]
    fn an_altered_field_or_another_key_is_refused() {
        let key = key();
        let sealed = key.seal_field("secret");
        let mut altered = sealed.clone().into_bytes();
        let last = altered.len() - 2;
        altered[last] = if altered[last] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        assert!(
            key.open_field(&SealedField::parse(&altered).unwrap().unwrap())
                .is_err()
        );

        let other = DataKey::from_bytes(key.id(), &random_bytes::<KEY_LEN>());
        assert!(
            other
                .open_field(&SealedField::parse(&sealed).unwrap().unwrap())
                .is_err()
        );
    }

    #[test]
    fn plain_text_is_not_a_sealed_field_and_a_broken_prefix_is_malformed() {
        assert_eq!(SealedField::parse("report.pdf").unwrap(), None);
        assert!(SealedField::parse("enc:v1:nope").is_err());
        assert!(SealedField::parse("enc:v1:not-a-uuid:AAAA").is_err());
    }
}
