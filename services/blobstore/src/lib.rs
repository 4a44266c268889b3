//! The blob store port: where a file's bytes live, outside the event log.
//!
//! An upload streams to the blob store first, hashing as it goes and stopping
//! at the size limit; only then does the command record the key, size and
//! SHA-256 in the log. So a blob store never holds half an upload under a
//! final key, and the log never points at bytes that were not fully stored.
//!
//! Two adapters implement [`BlobStore`]:
//! - [`dir::DirBlobStore`], the embedded default: a local directory, written
//!   through a temporary file and a rename;
//! - [`s3::S3BlobStore`]: any S3-compatible service through `aws-sdk-s3`
//!   (AWS, MinIO, Garage, ...), with single-request or multipart uploads.
//!
//! [`open`] picks one from a [`BlobStoreSpec`]. The size limit and the hash
//! are computed once, in [`HashingLimited`], shared by both adapters.
//!
//! [`sealed::SealedBlobStore`] wraps either one: every blob is stored sealed
//! under a data key of its own, so the store holds only ciphertext.

pub mod dir;
pub mod s3;
pub mod sealed;

use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use dossier_domain::BlobKey;
use futures::{Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};

pub use dir::DirBlobStore;
pub use s3::{S3BlobStore, S3Options};
pub use sealed::{SealedBlobStore, SealedInPlace};

/// A stream of bytes in chunks: an upload's body, or a stored blob's content.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// What [`BlobStore::put`] stored: the facts the command records in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlob {
    /// Number of bytes stored.
    pub size: u64,
    /// SHA-256 of the bytes, 64 lower-case hex digits.
    pub sha256: String,
}

/// A stored blob being read: its size (known before the body is read, for
/// `Content-Length`) and its content as a stream.
pub struct BlobObject {
    /// Number of bytes the body will yield.
    pub size: u64,
    /// The content, streamed (never read whole into memory).
    pub body: ByteStream,
}

impl fmt::Debug for BlobObject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlobObject")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// One entry of [`BlobStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobListing {
    /// The key, as given to [`BlobStore::put`] (without any store prefix).
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When it was last written, if the store says.
    pub last_modified: Option<SystemTime>,
}

/// A key as errors and logs show it: its first and last segments (the tenant
/// and the file or archive id), every segment between as `…`. A file's key
/// names its customer (`{tenant}/{customer}/{file_id}`), and an error of the
/// store must not carry a customer id into the service log.
pub fn shown_key(key: &str) -> String {
    let mut segments = key.split('/');
    let first = segments.next().unwrap_or_default();
    match segments.next_back() {
        None => first.to_owned(),
        Some(last) if segments.next().is_none() => format!("{first}/{last}"),
        Some(last) => format!("{first}/…/{last}"),
    }
}

/// The blobs under a prefix, one at a time: [`BlobStore::list`] reads the
/// store as the stream is polled (a page of S3 keys, a directory entry), so a
/// reader of a store of any size holds one page at most.
pub type BlobListStream<'a> =
    Pin<Box<dyn Stream<Item = Result<BlobListing, BlobError>> + Send + 'a>>;

/// Why a blob store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The upload had more bytes than allowed; nothing was stored.
    #[error("the upload is larger than the limit of {limit} bytes")]
    TooLarge {
        /// The limit that was exceeded, in bytes.
        limit: u64,
    },
    /// The upload was declared to be exactly `declared` bytes long
    /// ([`BodyLength::Exactly`]) and was not; nothing was stored.
    #[error("the upload is not the {declared} bytes its sender declared")]
    LengthMismatch {
        /// The length the sender declared, in bytes.
        declared: u64,
    },
    /// No blob under the key.
    #[error("no blob under this key")]
    NotFound,
    /// The upload body (the client's stream) failed, e.g. the client went
    /// away; nothing was stored. Not a fault of the store.
    #[error("reading the upload body failed: {0}")]
    Body(#[source] std::io::Error),
    /// The store itself failed (disk, network, S3 error, bad configuration).
    /// The message names the operation and carries the underlying cause.
    #[error("blob store: {0}")]
    Backend(String),
    /// The blob's data key was destroyed (its file was deleted, its bundle
    /// expired): whatever is still stored under the key is noise for good.
    #[error("the blob's data key was destroyed")]
    Shredded,
    /// A sealed blob failed to open: a byte altered, a segment moved or cut
    /// off, or a header naming another key. Its bytes are never served; the
    /// message names the key (as [`shown_key`] shows it) and what failed.
    #[error("the stored blob failed its integrity check: {0}")]
    Damaged(String),
}

impl BlobError {
    /// A [`BlobError::Backend`] saying what was being done and the whole
    /// cause chain of `err`, so an operator sees the root cause in one line.
    pub(crate) fn backend(
        doing: impl fmt::Display,
        err: &(dyn std::error::Error + 'static),
    ) -> Self {
        let mut message = format!("{doing}: {err}");
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Self::Backend(message)
    }
}

/// The port: a key-value store of immutable byte blobs.
///
/// Implementations are shared by every task of a process (`Arc<dyn
/// BlobStore>`), so they are `Send + Sync` and hold no per-request state.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// Streams `body` under `key`, hashing while writing. Stops reading as
    /// soon as more than `max_bytes` arrived and answers
    /// [`BlobError::TooLarge`]. On any failure nothing is left under `key`
    /// (a blob already there stays as it was); on success the whole body is
    /// durably stored and replaces any earlier blob under `key`.
    async fn put(
        &self,
        key: &BlobKey,
        body: ByteStream,
        max_bytes: u64,
    ) -> Result<StoredBlob, BlobError> {
        self.put_sized(key, body, BodyLength::AtMost(max_bytes))
            .await
    }

    /// [`Self::put`] for a body whose `length` may be known before its first
    /// byte: [`BodyLength::Exactly`] (a client that declared its file's size)
    /// lets an adapter send it as one streamed request instead of buffering
    /// parts, and a body of another length fails with
    /// [`BlobError::LengthMismatch`], storing nothing.
    async fn put_sized(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<StoredBlob, BlobError>;

    /// [`Self::put_sized`] for a caller that hashes what it stores itself
    /// (the sealing decorator hashes the plain bytes; a hash of its
    /// ciphertext would be a second pass over every byte for nothing): the
    /// same limits and guarantees, answering only the number of bytes
    /// stored. Adapters skip the hash; the default runs [`Self::put_sized`].
    async fn put_unhashed(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<u64, BlobError> {
        self.put_sized(key, body, length)
            .await
            .map(|stored| stored.size)
    }

    /// Opens the blob under `key` for streaming; [`BlobError::NotFound`] if absent.
    async fn get(&self, key: &BlobKey) -> Result<BlobObject, BlobError>;

    /// Removes the blob under `key`. Absent is fine (idempotent), so a retried
    /// deletion succeeds.
    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError>;

    /// Whether a blob exists under `key`.
    async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError>;

    /// Every blob whose key starts with `prefix` (plain string prefix, `""`
    /// for all), as a stream read from the store while it is consumed (the
    /// orphan sweep walks a whole store this way in bounded memory). Order
    /// unspecified; an error ends the stream.
    fn list<'a>(&'a self, prefix: &'a str) -> BlobListStream<'a>;

    /// [`Self::list`], collected: only for prefixes known to be small (one
    /// test's bucket, one tenant's bundles), never for a whole store.
    async fn list_all(&self, prefix: &str) -> Result<Vec<BlobListing>, BlobError> {
        use futures::TryStreamExt as _;
        self.list(prefix).try_collect().await
    }

    /// Readiness probe: the store is reachable and usable.
    async fn check(&self) -> Result<(), BlobError>;

    /// Where the blobs live, for logs, e.g. `s3://bucket/prefix at http://...`.
    fn describe(&self) -> String;
}

/// Which blob store to open, with everything it needs. Built from the
/// configuration by the caller.
#[derive(Debug, Clone)]
pub enum BlobStoreSpec {
    /// A local directory (created if missing).
    Dir(PathBuf),
    /// An S3 bucket.
    S3(S3Options),
}

/// Opens the blob store described by `spec`. The directory store is created
/// if missing; the S3 store creates its bucket if
/// [`S3Options::create_bucket_if_missing`] asks for it, and otherwise does not
/// contact the service (see [`BlobStore::check`]).
pub async fn open(spec: &BlobStoreSpec) -> Result<Arc<dyn BlobStore>, BlobError> {
    let store: Arc<dyn BlobStore> = match spec {
        BlobStoreSpec::Dir(root) => Arc::new(DirBlobStore::open(root.clone()).await?),
        BlobStoreSpec::S3(options) => Arc::new(S3BlobStore::open(options.clone()).await?),
    };
    tracing::info!(store = %store.describe(), "blob store opened");
    Ok(store)
}

/// How long an upload body may or must be, as known before its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// At most this many bytes (the size limit); the length shows at the end.
    AtMost(u64),
    /// Exactly this many bytes, as the sender declared up front.
    Exactly(u64),
}

impl BodyLength {
    /// The most bytes the body may have.
    pub fn limit(self) -> u64 {
        match self {
            Self::AtMost(limit) | Self::Exactly(limit) => limit,
        }
    }

    /// The length, if it is known before the body is read.
    pub fn exact(self) -> Option<u64> {
        match self {
            Self::AtMost(_) => None,
            Self::Exactly(length) => Some(length),
        }
    }
}

/// Wraps an upload body: counts and hashes each chunk, and refuses the chunk
/// that takes the total over the limit of `length`. Every adapter reads uploads
/// through this, so the limit, the declared length and the hash are defined
/// in one place.
///
/// For a body of [`BodyLength::Exactly`] `n` bytes, the chunk holding byte
/// `n` is handed out only once the body is known to end there: a store that
/// streams exactly `n` bytes into one request has then sent its last byte
/// only for a body that really was `n` bytes long, so a longer one never
/// becomes an object. A shorter one fails at its end, before that.
pub fn hashing_limited(body: ByteStream, length: impl Into<BodyLength>) -> HashingLimited {
    HashingLimited {
        body,
        length: length.into(),
        size: 0,
        held: None,
        ended: false,
        hasher: Some(Sha256::new()),
    }
}

impl From<u64> for BodyLength {
    /// A bare number is a size limit.
    fn from(max_bytes: u64) -> Self {
        Self::AtMost(max_bytes)
    }
}

/// [`hashing_limited`] without the hash, for [`BlobStore::put_unhashed`]:
/// [`HashingLimited::finish`] then answers an empty `sha256`.
pub fn limited(body: ByteStream, length: impl Into<BodyLength>) -> HashingLimited {
    HashingLimited {
        hasher: None,
        ..hashing_limited(body, length)
    }
}

/// An upload body being read under a size limit; see [`hashing_limited`].
pub struct HashingLimited {
    body: ByteStream,
    length: BodyLength,
    size: u64,
    /// A chunk read (and counted) but not yet handed out.
    held: Option<Bytes>,
    /// The end of the body was seen (after its last chunk was read ahead).
    ended: bool,
    hasher: Option<Sha256>,
}

impl fmt::Debug for HashingLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HashingLimited")
            .field("length", &self.length)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl HashingLimited {
    /// The next non-empty chunk, already counted and hashed; `None` at the
    /// end of the body. [`BlobError::TooLarge`] as soon as the total would
    /// exceed the limit (the offending chunk is not handed out),
    /// [`BlobError::LengthMismatch`] for a body that is not the length it
    /// was declared to be (see [`hashing_limited`]), and [`BlobError::Body`]
    /// when the client's stream fails. After an error the caller must
    /// discard what it wrote.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, BlobError> {
        if self.ended {
            return Ok(None);
        }
        // Kept in `held` across the read-ahead below, so that a caller that
        // drops this future (in a `select!`) loses no chunk.
        if self.held.is_none() {
            let Some(chunk) = self.read().await? else {
                self.ended = true;
                return match self.length {
                    BodyLength::Exactly(declared) if self.size != declared => {
                        Err(BlobError::LengthMismatch { declared })
                    }
                    _ => Ok(None),
                };
            };
            self.held = Some(chunk);
        }
        if let BodyLength::Exactly(declared) = self.length
            && self.size == declared
        {
            // The last byte declared: make sure the body ends here (a
            // further chunk fails in `read`, over the length) before it goes.
            if self.read().await?.is_some() {
                return Err(BlobError::LengthMismatch { declared });
            }
            self.ended = true;
        }
        let chunk = self.held.take().unwrap_or_default();
        if let Some(hasher) = &mut self.hasher {
            hasher.update(&chunk);
        }
        Ok(Some(chunk))
    }

    /// The length this body may or must have.
    pub fn length(&self) -> BodyLength {
        self.length
    }

    /// The next non-empty chunk of the client's body, counted against the
    /// limit.
    async fn read(&mut self) -> Result<Option<Bytes>, BlobError> {
        loop {
            let Some(item) = self.body.next().await else {
                return Ok(None);
            };
            let chunk = item.map_err(BlobError::Body)?;
            if chunk.is_empty() {
                continue;
            }
            let limit = self.length.limit();
            self.size = u64::try_from(chunk.len())
                .ok()
                .and_then(|len| self.size.checked_add(len))
                .filter(|&size| size <= limit)
                .ok_or(match self.length {
                    BodyLength::AtMost(limit) => BlobError::TooLarge { limit },
                    BodyLength::Exactly(declared) => BlobError::LengthMismatch { declared },
                })?;
            return Ok(Some(chunk));
        }
    }

    /// Bytes accepted so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// This reader as a stream of the chunks it accepts, for a store that
    /// hands an upload on to another one (the sealing decorator): the limit
    /// and the hash stay this reader's, and [`HashingTally::outcome`] tells
    /// the inner store's answer apart from this reader's own refusal. The
    /// client's error ends the stream as it came; an over-limit chunk ends it
    /// with an error (the inner store then stores nothing).
    pub fn into_stream(self) -> (ByteStream, HashingTally) {
        let tally = HashingTally::default();
        let state = (Some(self), tally.clone());
        let stream = futures::stream::unfold(state, |(reader, tally)| async move {
            let mut reader = reader?;
            match reader.next_chunk().await {
                // The body of a declared length is known to end with this
                // chunk: settled now, since a consumer that stops at the
                // declared length never asks for the end.
                Ok(Some(chunk)) if reader.ended => {
                    tally.settle(Ok(reader.finish()));
                    Some((Ok(chunk), (None, tally)))
                }
                Ok(Some(chunk)) => Some((Ok(chunk), (Some(reader), tally))),
                Ok(None) => {
                    tally.settle(Ok(reader.finish()));
                    None
                }
                Err(BlobError::Body(error)) => {
                    // Settled too: a store that hands the stream to a client
                    // library sees only that library's error, not this one.
                    tally.settle(Err(BlobError::Body(std::io::Error::new(
                        error.kind(),
                        error.to_string(),
                    ))));
                    Some((Err(error), (None, tally)))
                }
                Err(error) => {
                    let message = error.to_string();
                    tally.settle(Err(error));
                    Some((Err(std::io::Error::other(message)), (None, tally)))
                }
            }
        });
        (Box::pin(stream), tally)
    }

    /// Size and hash of everything read (no hash from [`limited`]); call
    /// after [`Self::next_chunk`] answered `None`.
    pub fn finish(self) -> StoredBlob {
        StoredBlob {
            size: self.size,
            sha256: self
                .hasher
                .map(|hasher| hex::encode(hasher.finalize()))
                .unwrap_or_default(),
        }
    }
}

/// What the stream of [`HashingLimited::into_stream`] read: known once the
/// stream ended (or refused a chunk).
#[derive(Debug, Clone, Default)]
pub struct HashingTally(Arc<Mutex<Option<Result<StoredBlob, BlobError>>>>);

impl HashingTally {
    fn settle(&self, outcome: Result<StoredBlob, BlobError>) {
        *self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(outcome);
    }

    /// The answer of a put that read the stream into another store, whose
    /// answer is `stored`: this reader's refusal (over the limit) if there
    /// was one, whatever the other store said; otherwise the other store's
    /// error; otherwise the size and hash of the bytes this reader passed.
    pub fn outcome<T>(&self, stored: Result<T, BlobError>) -> Result<StoredBlob, BlobError> {
        let read = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        match (read, stored) {
            (Some(Err(refused)), _) => Err(refused),
            (_, Err(error)) => Err(error),
            (Some(Ok(read)), Ok(_)) => Ok(read),
            (None, Ok(_)) => Err(BlobError::Backend(
                "the store answered before the whole upload was read".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(chunks: Vec<Result<&'static [u8], std::io::Error>>) -> ByteStream {
        Box::pin(futures::stream::iter(
            chunks.into_iter().map(|c| c.map(Bytes::from_static)),
        ))
    }

    async fn drain(mut reader: HashingLimited) -> Result<StoredBlob, BlobError> {
        while reader.next_chunk().await?.is_some() {}
        Ok(reader.finish())
    }

    #[tokio::test]
    async fn hashes_and_counts_everything_within_the_limit() {
        let stored = drain(hashing_limited(body(vec![Ok(b"ab"), Ok(b""), Ok(b"c")]), 3))
            .await
            .unwrap();
        assert_eq!(stored.size, 3);
        assert_eq!(
            stored.sha256,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[tokio::test]
    async fn refuses_the_chunk_that_crosses_the_limit() {
        let err = drain(hashing_limited(body(vec![Ok(b"ab"), Ok(b"cd")]), 3))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit: 3 }), "{err:?}");
    }

    #[tokio::test]
    async fn passes_on_a_failing_body() {
        let err = drain(hashing_limited(
            body(vec![Ok(b"ab"), Err(std::io::Error::other("gone"))]),
            10,
        ))
        .await
        .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_body_of_its_declared_length_passes_whole() {
        let stored = drain(hashing_limited(
            body(vec![Ok(b"ab"), Ok(b""), Ok(b"c")]),
            BodyLength::Exactly(3),
        ))
        .await
        .unwrap();
        assert_eq!(stored.size, 3);
    }

    #[tokio::test]
    async fn a_body_shorter_or_longer_than_declared_is_refused() {
        for chunks in [vec![Ok(&b"ab"[..])], vec![Ok(&b"ab"[..]), Ok(b"cd")]] {
            let err = drain(hashing_limited(body(chunks), BodyLength::Exactly(3)))
                .await
                .unwrap_err();
            assert!(
                matches!(err, BlobError::LengthMismatch { declared: 3 }),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn the_chunk_with_the_last_declared_byte_waits_for_the_end_of_the_body() {
        // "abc" are the three bytes declared; "d" follows. The chunk that
        // completes the declared length must not be handed out, or a store
        // streaming exactly three bytes would complete an object.
        let mut reader = hashing_limited(
            body(vec![Ok(b"ab"), Ok(b"c"), Ok(b"d")]),
            BodyLength::Exactly(3),
        );
        assert_eq!(reader.next_chunk().await.unwrap().unwrap(), &b"ab"[..]);
        let err = reader.next_chunk().await.unwrap_err();
        assert!(
            matches!(err, BlobError::LengthMismatch { declared: 3 }),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn as_a_stream_it_passes_the_chunks_and_tallies_them_or_the_refusal() {
        use futures::TryStreamExt as _;
        let (stream, tally) = hashing_limited(body(vec![Ok(b"ab"), Ok(b"c")]), 3).into_stream();
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
        assert_eq!(chunks.concat(), b"abc");
        let stored = tally.outcome(Ok(())).unwrap();
        assert_eq!(stored.size, 3);

        let (stream, tally) = hashing_limited(body(vec![Ok(b"ab"), Ok(b"cd")]), 3).into_stream();
        let read: Result<Vec<Bytes>, _> = stream.try_collect().await;
        assert!(read.is_err());
        // Whatever the other store made of the failed stream, the refusal stands.
        let err = tally
            .outcome::<()>(Err(BlobError::Body(std::io::Error::other("x"))))
            .unwrap_err();
        assert!(matches!(err, BlobError::TooLarge { limit: 3 }), "{err:?}");

        let (stream, tally) = hashing_limited(
            body(vec![Ok(b"ab"), Err(std::io::Error::other("gone"))]),
            10,
        )
        .into_stream();
        let read: Result<Vec<Bytes>, _> = stream.try_collect().await;
        assert_eq!(read.unwrap_err().to_string(), "gone");
        let err = tally
            .outcome::<()>(Err(BlobError::Body(std::io::Error::other("gone"))))
            .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
    }

    #[test]
    fn shown_keys_keep_ids_and_hide_the_customer() {
        assert_eq!(shown_key("acme/cust-42/0193-f"), "acme/…/0193-f");
        assert_eq!(shown_key("acme/!bundles/b.zip"), "acme/…/b.zip");
        assert_eq!(shown_key("acme/x"), "acme/x");
        assert_eq!(shown_key("acme"), "acme");
        assert_eq!(shown_key("acme/"), "acme/");
    }

    #[test]
    fn backend_errors_carry_the_cause_chain() {
        let inner = std::io::Error::other("disk on fire");
        let outer = std::io::Error::other(OuterError(inner));
        let err = BlobError::backend("writing x", &outer);
        assert_eq!(
            err.to_string(),
            "blob store: writing x: outer: disk on fire"
        );
    }

    #[derive(Debug)]
    struct OuterError(std::io::Error);
    impl fmt::Display for OuterError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("outer")
        }
    }
    impl std::error::Error for OuterError {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
