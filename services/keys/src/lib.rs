//! Data keys: what makes a delete provable on an append-only log.
//!
//! Every file, bundle archive and customer has a random 256-bit data key of its
//! own ([`DataKey`]). A file's bytes are stored sealed under its key in
//! fixed-size AEAD segments ([`segments`]); a file's personal fields in events
//! (name, file name, content type, SHA-256) are stored as
//! `enc:v1:<key id>:<base64>` strings under the same key, and task titles and
//! message texts under the customer's key ([`field`]).
//!
//! Data keys are kept wrapped under the master key (`DOSSIER_MASTER_KEY`,
//! [`MasterKey`]) in a table of their own ([`KeyStore`]), never in the event
//! log. Destroying a key (a delete, an erasure, a bundle's expiry) drops its
//! wrapped bytes: from then on everything it sealed, in the log, in the bucket
//! and in every copy of either, is noise. The log itself is never rewritten, so
//! its hash chain still verifies.
//!
//! One crypto library: `ring` (AES-256-GCM), which rustls already runs on.

pub mod field;
pub mod master;
pub mod segments;
pub mod store;

use std::fmt;
use std::sync::Arc;

use ring::aead::{AES_256_GCM, LessSafeKey, UnboundKey};
use ring::rand::{SecureRandom as _, SystemRandom};
use uuid::Uuid;

pub use field::{SealedField, is_sealed};
pub use master::{DEV_MASTER_KEY, MasterKey, MasterKeys};
pub use store::{KeyLookup, KeyStore, Owner};

/// Length of every key here: AES-256.
pub const KEY_LEN: usize = 32;

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// `DOSSIER_MASTER_KEY` (or a key given to `dossier keys`) is not 32 bytes
    /// of standard base64.
    #[error("a master key must be 32 bytes in standard base64: {0}")]
    BadMasterKey(String),
    /// A data key is wrapped under a master key this process does not have.
    #[error(
        "data key {key_id} is wrapped under master key {master_key_id}, which this process does not have (set DOSSIER_MASTER_KEY_PREVIOUS during a rotation)"
    )]
    UnknownMasterKey {
        /// The data key.
        key_id: Uuid,
        /// The id of the master key it is wrapped under.
        master_key_id: String,
    },
    /// Sealed bytes or a sealed field failed authentication: altered,
    /// truncated, reordered, or sealed under another key.
    #[error("sealed data failed authentication: {0}")]
    Tampered(&'static str),
    /// A sealed field is not of the form `enc:v1:<key id>:<base64>`.
    #[error("not a sealed field: {0}")]
    Malformed(&'static str),
    /// The key's table could not be read or written.
    #[error("key store: {0}")]
    Store(String),
}

impl From<tokio_postgres::Error> for KeyError {
    fn from(err: tokio_postgres::Error) -> Self {
        let detail = err
            .as_db_error()
            .map(|db| db.message().to_owned())
            .unwrap_or_else(|| err.to_string());
        Self::Store(detail)
    }
}

impl From<deadpool_postgres::PoolError> for KeyError {
    fn from(err: deadpool_postgres::PoolError) -> Self {
        Self::Store(err.to_string())
    }
}

/// The process's one source of randomness for keys and nonces.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random source failed");
    bytes
}

/// An unwrapped data key, shared cheaply. Its bytes never leave this crate:
/// callers seal and open through it.
#[derive(Clone)]
pub struct DataKey {
    id: Uuid,
    key: Arc<LessSafeKey>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl DataKey {
    pub(crate) fn from_bytes(id: Uuid, bytes: &[u8; KEY_LEN]) -> Self {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key");
        Self {
            id,
            key: Arc::new(LessSafeKey::new(unbound)),
        }
    }

    /// The key's id: what a sealed field and a sealed blob name.
    pub fn id(&self) -> Uuid {
        self.id
    }

    pub(crate) fn aead(&self) -> &LessSafeKey {
        &self.key
    }
}
