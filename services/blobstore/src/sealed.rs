//! Sealed blobs: a [`BlobStore`] over another one that keeps only ciphertext
//! there (CONTRACT.md "Data protection").
//!
//! Each blob belongs to an owner its key names: a file (`{tenant}/{customer}/
//! {file_id}`) or a bundle archive (`{tenant}/!bundles/{bundle_id}.zip`, and
//! the older `{tenant}/_bundles/{bundle_id}.zip`). The owner has one data key
//! in the key table ([`KeyStore`]), and the blob is stored as
//! [`segments::seal`] makes it: a header naming the key, then 64 KiB AEAD
//! segments, each bound to its position and to whether it is the last.
//!
//! - **put** takes the owner's live key (creating it; a retried put reuses
//!   it), limits and hashes the plain bytes with the one [`hashing_limited`]
//!   reader, and streams them sealed into the inner store under the sealed
//!   size of the limit. It answers the plain size and SHA-256, as the log
//!   records them.
//! - **get** asks the table for the owner's key. A live key opens the blob:
//!   the first segment is opened before the answer, so a blob damaged there is
//!   refused with [`BlobError::Damaged`] before anything is sent or recorded;
//!   a later segment that fails ends the body with an error (an HTTP client
//!   sees the connection cut, never wrong bytes) and is logged. A destroyed
//!   key answers [`BlobError::Shredded`]. No key at all means the blob was
//!   stored before encryption: it is served as it is (unless it carries a
//!   sealed header, which no blob of that age can).
//! - **delete** destroys the owner's key, then removes the blob, both
//!   idempotently: from then on every copy of the blob, anywhere, is noise.
//!   Bundle expiry and file purges come through here.
//! - exists, list, check and describe are the inner store's.
//!
//! [`SealedBlobStore::seal_in_place`] turns a blob stored before encryption
//! into a sealed one (`dossier blobs encrypt`). Between its key's creation
//! and the end of its put, a download of that blob is refused as damaged
//! (its key is live but the blob is not yet sealed under it); a retry
//! succeeds. Serving it plain instead would let anyone who can write the
//! store replace a sealed blob with bytes of their choosing.

use std::io;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use dossier_domain::BlobKey;
use dossier_keys::segments::{self, HEADER, plain_len, sealed_by, sealed_len};
use dossier_keys::{DataKey, KeyError, KeyLookup, KeyStore, Owner};
use futures::StreamExt as _;
use uuid::Uuid;

use crate::{
    BlobError, BlobListStream, BlobObject, BlobStore, BodyLength, ByteStream, StoredBlob,
    hashing_limited, shown_key,
};

/// What [`SealedBlobStore::seal_in_place`] did with a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealedInPlace {
    /// It was stored before encryption and is now sealed under a key of its own.
    Sealed,
    /// It was sealed already.
    AlreadySealed,
    /// Its key was destroyed: there is nothing left to seal.
    Shredded,
}

/// A [`BlobStore`] that seals every blob it stores; see the module docs.
#[derive(Clone)]
pub struct SealedBlobStore {
    inner: Arc<dyn BlobStore>,
    keys: KeyStore,
}

impl std::fmt::Debug for SealedBlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBlobStore")
            .field("inner", &self.inner.describe())
            .field("keys", &self.keys)
            .finish()
    }
}

impl SealedBlobStore {
    /// `inner`, sealed under the data keys of `keys`.
    pub fn new(inner: Arc<dyn BlobStore>, keys: KeyStore) -> Self {
        Self { inner, keys }
    }

    /// [`Self::new`], shared as the port every part of a process uses.
    pub fn shared(inner: Arc<dyn BlobStore>, keys: KeyStore) -> Arc<dyn BlobStore> {
        Arc::new(Self::new(inner, keys))
    }

    /// The store that holds the ciphertext.
    pub fn inner(&self) -> &Arc<dyn BlobStore> {
        &self.inner
    }

    /// Seals the blob under `key` in place if it was stored before
    /// encryption: its owner gets a key first, then the sealed bytes replace
    /// the plain ones under the same blob key. Idempotent: a sealed blob is
    /// left alone, and a blob whose key an interrupted run created is sealed
    /// under that key. [`BlobError::NotFound`] if there is no blob.
    pub async fn seal_in_place(&self, key: &BlobKey) -> Result<SealedInPlace, BlobError> {
        let (tenant, owner) = owner_of(key)?;
        let known = match self
            .keys
            .of_owner(tenant, owner)
            .await
            .map_err(keys_failed)?
        {
            KeyLookup::Destroyed => return Ok(SealedInPlace::Shredded),
            KeyLookup::Live(data_key) => Some(data_key.id()),
            KeyLookup::Unknown => None,
        };
        let object = self.inner.get(key).await?;
        let (head, body) = peek_head(object.body).await.map_err(|error| {
            BlobError::backend(format!("reading blob {}", shown_key(key.as_str())), &error)
        })?;
        match (sealed_by(&head), known) {
            (Some(sealer), Some(live)) if sealer == live => {
                return Ok(SealedInPlace::AlreadySealed);
            }
            (Some(_), _) => return Err(damaged(key, "it is sealed under a key its owner lacks")),
            (None, Some(_)) => {}
            (None, None) => {
                self.keys.create(tenant, owner).await.map_err(keys_failed)?;
            }
        }
        // `put` takes the live key just made (or left by an interrupted run).
        self.put_sized(key, body, BodyLength::Exactly(object.size))
            .await?;
        Ok(SealedInPlace::Sealed)
    }

    /// The owner's live key, and whether this call created it (a retried
    /// put reuses the key of the first).
    async fn key_for_put(
        &self,
        tenant: &str,
        owner: Owner<'_>,
    ) -> Result<(DataKey, bool), BlobError> {
        // Creating first costs one round trip for a new blob, the common case.
        match self.keys.create(tenant, owner).await {
            Ok(created) => Ok((created, true)),
            // The owner has its key already (a retried put, a blob sealed in
            // place, another put of the same owner): take it.
            Err(_) => Ok((
                self.keys
                    .live_or_create(tenant, owner)
                    .await
                    .map_err(keys_failed)?,
                false,
            )),
        }
    }

    /// Opens a sealed blob under `data_key`: the first segment before
    /// answering, the rest as the body is read.
    async fn open(&self, key: &BlobKey, data_key: DataKey) -> Result<BlobObject, BlobError> {
        let object = self.inner.get(key).await?;
        let size = plain_len(object.size)
            .ok_or_else(|| damaged(key, "its size is not the size of a sealed blob"))?;
        let mut opened = Box::pin(segments::open(data_key, object.body));
        let first = match opened.next().await {
            Some(Ok(first)) => first,
            Some(Err(error)) => return Err(refused(key, &error)),
            None => return Err(damaged(key, "it ended before its first segment")),
        };
        let shown = shown_key(key.as_str());
        let rest = opened.map(move |item| {
            if let Err(error) = &item {
                if is_tampered(error) {
                    tracing::error!(
                        key = %shown,
                        %error,
                        "a stored blob failed its integrity check while it was being sent; the answer was cut off and no wrong byte left"
                    );
                } else {
                    tracing::warn!(key = %shown, %error, "reading a stored blob failed while it was being sent; the answer was cut off");
                }
            }
            item
        });
        Ok(BlobObject {
            size,
            body: Box::pin(futures::stream::iter([Ok(first)]).chain(rest)),
        })
    }

    /// Serves a blob stored before encryption as it is, unless it carries a
    /// sealed header (then its key is missing from the table).
    async fn open_unsealed(&self, key: &BlobKey) -> Result<BlobObject, BlobError> {
        let object = self.inner.get(key).await?;
        let (head, body) = peek_head(object.body).await.map_err(|error| {
            BlobError::backend(format!("reading blob {}", shown_key(key.as_str())), &error)
        })?;
        if sealed_by(&head).is_some() {
            return Err(damaged(
                key,
                "it is sealed, but the key table holds no key for its owner",
            ));
        }
        Ok(BlobObject {
            size: object.size,
            body,
        })
    }
}

#[async_trait]
impl BlobStore for SealedBlobStore {
    async fn put_sized(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<StoredBlob, BlobError> {
        let (tenant, owner) = owner_of(key)?;
        let (data_key, created) = self.key_for_put(tenant, owner).await?;
        let (plain, tally) = hashing_limited(body, length).into_stream();
        let sealed: ByteStream = Box::pin(segments::seal(data_key, plain));
        // A plain length known up front is a sealed length known up front.
        let sealed_length = match length {
            BodyLength::AtMost(limit) => BodyLength::AtMost(sealed_limit(limit)),
            BodyLength::Exactly(plain) if sealed_limit(plain) < u64::MAX => {
                BodyLength::Exactly(sealed_len(plain))
            }
            // No body is that long; the plain reader refuses it first.
            BodyLength::Exactly(_) => BodyLength::AtMost(u64::MAX),
        };
        // The plain bytes are hashed above; the inner store need not hash
        // the ciphertext.
        let stored = self.inner.put_unhashed(key, sealed, sealed_length).await;
        let outcome = tally.outcome(stored);
        if outcome.is_err() && created {
            // Nothing was stored under the key this put made: it goes too.
            if let Err(error) = self.keys.destroy_now(tenant, &[owner]).await {
                tracing::warn!(key = %shown_key(key.as_str()), %error, "a failed upload's data key could not be destroyed; it seals nothing");
            }
        }
        outcome
    }

    async fn get(&self, key: &BlobKey) -> Result<BlobObject, BlobError> {
        let (tenant, owner) = owner_of(key)?;
        match self
            .keys
            .of_owner(tenant, owner)
            .await
            .map_err(keys_failed)?
        {
            KeyLookup::Live(data_key) => self.open(key, data_key).await,
            KeyLookup::Destroyed => Err(BlobError::Shredded),
            KeyLookup::Unknown => self.open_unsealed(key).await,
        }
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        // The key first: once it is gone, so is the blob, wherever a copy of
        // it is; a failed removal after that leaves only noise for a retry.
        if let Ok((tenant, owner)) = owner_of(key) {
            self.keys
                .destroy_now(tenant, &[owner])
                .await
                .map_err(keys_failed)?;
        }
        self.inner.delete(key).await
    }

    async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        self.inner.exists(key).await
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BlobListStream<'a> {
        self.inner.list(prefix)
    }

    async fn check(&self) -> Result<(), BlobError> {
        self.inner.check().await
    }

    fn describe(&self) -> String {
        format!("{}, sealed", self.inner.describe())
    }
}

/// The tenant and owner a blob key names (see the module docs).
fn owner_of(key: &BlobKey) -> Result<(&str, Owner<'static>), BlobError> {
    let raw = key.as_str();
    let mut segments = raw.split('/');
    let parsed = match (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) {
        (Some(tenant), Some(folder), Some(last), None) if !tenant.is_empty() => {
            let bundle = (folder == BlobKey::BUNDLES_SEGMENT
                || folder == BlobKey::LEGACY_BUNDLES_SEGMENT)
                .then(|| last.strip_suffix(".zip"))
                .flatten()
                .and_then(|id| Uuid::try_parse(id).ok());
            match bundle {
                Some(bundle) => Some((tenant, Owner::Bundle(bundle))),
                None => Uuid::try_parse(last)
                    .ok()
                    .map(|file| (tenant, Owner::File(file))),
            }
        }
        _ => None,
    };
    parsed.ok_or_else(|| {
        BlobError::Backend(format!(
            "blob key {} names no file or bundle archive, so no data key can seal it",
            shown_key(raw)
        ))
    })
}

/// The inner store's limit for a plain limit of `max_bytes`.
fn sealed_limit(max_bytes: u64) -> u64 {
    // Far beyond any real limit; keeps the arithmetic from overflowing.
    const HUGE: u64 = u64::MAX / 2;
    if max_bytes >= HUGE {
        u64::MAX
    } else {
        sealed_len(max_bytes)
    }
}

fn keys_failed(error: KeyError) -> BlobError {
    BlobError::Backend(format!("data keys: {error}"))
}

fn damaged(key: &BlobKey, what: &str) -> BlobError {
    BlobError::Damaged(format!("{}: {what}", shown_key(key.as_str())))
}

/// Whether an error of [`segments::open`] says the bytes failed to open (as
/// opposed to the inner store's read failing).
fn is_tampered(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::InvalidData
        && error
            .get_ref()
            .is_some_and(|inner| inner.downcast_ref::<KeyError>().is_some())
}

fn refused(key: &BlobKey, error: &io::Error) -> BlobError {
    if is_tampered(error) {
        let refused = damaged(key, &error.to_string());
        tracing::error!(error = %refused, "a stored blob failed its integrity check and was not served");
        refused
    } else {
        BlobError::backend(format!("reading blob {}", shown_key(key.as_str())), error)
    }
}

/// The first [`HEADER`] bytes of `body` (fewer if it is shorter) and the
/// whole body again, unread.
async fn peek_head(mut body: ByteStream) -> io::Result<(Bytes, ByteStream)> {
    let mut head = BytesMut::new();
    while head.len() < HEADER {
        match body.next().await {
            Some(chunk) => head.extend_from_slice(&chunk?),
            None => break,
        }
    }
    let head = head.freeze();
    let again: ByteStream = Box::pin(futures::stream::iter([Ok(head.clone())]).chain(body));
    Ok((head, again))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(raw: &str) -> BlobKey {
        BlobKey::from_recorded(raw)
    }

    #[test]
    fn owners_follow_from_the_shape_of_the_key() {
        let id = Uuid::new_v4();
        assert_eq!(
            owner_of(&key(&format!("acme/cust-1/{id}"))).unwrap(),
            ("acme", Owner::File(id))
        );
        assert_eq!(
            owner_of(&key(&format!("acme/!bundles/{id}.zip"))).unwrap(),
            ("acme", Owner::Bundle(id))
        );
        assert_eq!(
            owner_of(&key(&format!("acme/_bundles/{id}.zip"))).unwrap(),
            ("acme", Owner::Bundle(id))
        );
        // A customer called `_bundles` has files there too.
        assert_eq!(
            owner_of(&key(&format!("acme/_bundles/{id}"))).unwrap(),
            ("acme", Owner::File(id))
        );
        for bad in ["acme", "acme/x", "acme/cust-1/not-an-id", "a/b/c/d", "/b/c"] {
            assert!(owner_of(&key(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_inner_limit_is_the_sealed_size_of_the_plain_limit() {
        assert_eq!(sealed_limit(100), sealed_len(100));
        assert_eq!(sealed_limit(u64::MAX), u64::MAX);
    }
}
