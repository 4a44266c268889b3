//! The master key (key-encryption key) that wraps every data key.
//!
//! A master key's id is derived from its bytes (the first 8 bytes of a SHA-256
//! under a fixed label, in hex), so every wrapped key names the master key it
//! needs without the master key ever being stored. A rotation runs with the new
//! key as `DOSSIER_MASTER_KEY` and the old one as `DOSSIER_MASTER_KEY_PREVIOUS`:
//! keys under either unwrap, `dossier keys rotate` re-wraps the old ones, and
//! then the previous key can be dropped.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::{KEY_LEN, KeyError, random_bytes};

pub use dossier_runtime::config::DEV_MASTER_KEY;

/// A master key: AES-256-GCM over data keys, with the data key's id as
/// associated data (a wrapped key moved to another row does not unwrap).
pub struct MasterKey {
    id: String,
    key: LessSafeKey,
    development: bool,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// Parses 32 bytes of standard base64 (surrounding white space ignored).
    pub fn from_base64(text: &str) -> Result<Self, KeyError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|err| KeyError::BadMasterKey(err.to_string()))?;
        let bytes: [u8; KEY_LEN] = bytes
            .try_into()
            .map_err(|bytes: Vec<u8>| KeyError::BadMasterKey(format!("{} bytes", bytes.len())))?;
        Ok(Self::from_bytes(&bytes, text.trim() == DEV_MASTER_KEY))
    }

    /// The public development key ([`DEV_MASTER_KEY`]).
    pub fn development() -> Self {
        Self::from_base64(DEV_MASTER_KEY).expect("the development key is valid")
    }

    /// A new random master key and its base64 form (for `dossier keys generate`).
    pub fn generate() -> (Self, String) {
        let bytes: [u8; KEY_LEN] = random_bytes();
        (Self::from_bytes(&bytes, false), STANDARD.encode(bytes))
    }

    fn from_bytes(bytes: &[u8; KEY_LEN], development: bool) -> Self {
        let mut label = Sha256::new();
        label.update(b"dossier master key id\0");
        label.update(bytes);
        let id = hex::encode(&label.finalize()[..8]);
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key");
        Self {
            id,
            key: LessSafeKey::new(unbound),
            development,
        }
    }

    /// The id every key wrapped under this one records.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this is the public [`DEV_MASTER_KEY`].
    pub fn is_development(&self) -> bool {
        self.development
    }

    /// `nonce || ciphertext || tag` of a data key, bound to its id.
    pub(crate) fn wrap(&self, key_id: Uuid, data_key: &[u8; KEY_LEN]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let mut sealed = data_key.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key_id.as_bytes()),
                &mut sealed,
            )
            .expect("sealing 32 bytes cannot fail");
        let mut wrapped = nonce.to_vec();
        wrapped.extend_from_slice(&sealed);
        wrapped
    }

    /// The data key inside [`Self::wrap`]'s output.
    pub(crate) fn unwrap(&self, key_id: Uuid, wrapped: &[u8]) -> Result<[u8; KEY_LEN], KeyError> {
        if wrapped.len() < NONCE_LEN {
            return Err(KeyError::Tampered("a wrapped key is too short"));
        }
        let (nonce, sealed) = wrapped.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| KeyError::Tampered("a wrapped key's nonce"))?;
        let mut sealed = sealed.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(key_id.as_bytes()), &mut sealed)
            .map_err(|_| {
                KeyError::Tampered("a wrapped key does not unwrap under its master key")
            })?;
        plain
            .try_into()
            .map_err(|_| KeyError::Tampered("a wrapped key is not 32 bytes"))
    }
}

/// The master keys a process holds: the current one, which wraps every new
/// key, and during a rotation the previous one, which still unwraps.
#[derive(Debug)]
pub struct MasterKeys {
    current: MasterKey,
    previous: Option<MasterKey>,
}

impl MasterKeys {
    /// The current key and, during a rotation, the previous one.
    pub fn new(current: MasterKey, previous: Option<MasterKey>) -> Self {
        Self { current, previous }
    }

    /// The key every new data key is wrapped under.
    pub fn current(&self) -> &MasterKey {
        &self.current
    }

    /// The key with this id, if this process holds it.
    pub fn by_id(&self, id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.current)
            .chain(&self.previous)
            .find(|key| key.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrapped_key_unwraps_only_under_its_master_key_and_its_own_id() {
        let (master, _) = MasterKey::generate();
        let (other, _) = MasterKey::generate();
        let id = Uuid::new_v4();
        let data = random_bytes::<KEY_LEN>();
        let wrapped = master.wrap(id, &data);
        assert_eq!(master.unwrap(id, &wrapped).unwrap(), data);
        assert!(other.unwrap(id, &wrapped).is_err());
        assert!(master.unwrap(Uuid::new_v4(), &wrapped).is_err());
    }

    #[test]
    fn master_key_ids_follow_the_bytes() {
        let (key, text) = MasterKey::generate();
        assert_eq!(MasterKey::from_base64(&text).unwrap().id(), key.id());
        assert_ne!(MasterKey::development().id(), key.id());
        assert!(MasterKey::development().is_development());
        assert!(!key.is_development());
    }

    #[test]
    fn a_master_key_of_the_wrong_length_is_refused() {
        assert!(matches!(
            MasterKey::from_base64("c2hvcnQ="),
            Err(KeyError::BadMasterKey(_))
        ));
        assert!(MasterKey::from_base64("not base64!").is_err());
    }
}
