//! Streaming a ZIP archive out of blobs and into a blob, in bounded memory.
//!
//! Three parts run at once, joined by one bounded channel:
//!
//! ```text
//!  blob store ──get──► [blocking thread] ZipWriter::new_stream(ChannelWriter)
//!                       reads each blob chunk by chunk, hashes and counts it,
//!                       stores or deflates it into the archive
//!                                   │ chunks of CHUNK bytes, at most
//!                                   ▼ IN_FLIGHT of them waiting
//!  blob store ◄──put (multipart above 8 MiB)── ByteStream over the channel
//! ```
//!
//! The ZIP writer never seeks: every entry has a data descriptor after its data
//! (sizes and CRC-32 are only known at the end), and the central directory is
//! written from the small per-entry records the writer keeps. So no whole file and
//! no whole archive is ever in memory: at any moment there is one chunk of a blob
//! being read, the deflate state of one entry, at most `IN_FLIGHT + 1` archive
//! chunks, and whatever the blob store's `put` buffers (one multipart part for S3).
//! Peak memory does not depend on the number or size of the files.
//!
//! ZIP64 is used where needed: an entry that could reach 4 GiB is written with
//! ZIP64 sizes, and entries starting beyond 4 GiB, or a central directory beyond
//! it, get ZIP64 offsets and a ZIP64 end record (the `zip` crate does that on its
//! own once the offsets need it).
//!
//! Every entry's bytes are checked while they pass: their count against the size
//! recorded at upload, and their SHA-256 against the recorded digest. A missing
//! blob or one that does not match fails the archive ([`ArchiveError::Content`]);
//! the channel then ends with an error instead of a clean end, so the store's
//! `put` aborts and nothing is left under the key: there is never a partial
//! archive.

use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ::zip::write::{FullFileOptions, ZipWriter};
use ::zip::{CompressionMethod, DateTime as ZipDateTime};
use bytes::{Bytes, BytesMut};
use chrono::{DateTime, Datelike as _, Timelike as _, Utc};
use dossier_blobstore::{BlobError, BlobStore, ByteStream};
use dossier_domain::{BlobKey, EntryCompression, Sha256Hex};
use futures::StreamExt as _;
use sha2::{Digest as _, Sha256};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

/// Size of the archive chunks handed to the blob store.
pub const CHUNK: usize = 256 * 1024;
/// Archive chunks that may wait for the blob store at once.
pub const IN_FLIGHT: usize = 4;

/// An entry whose compressed size could reach this needs ZIP64 sizes.
const ZIP64_SIZE: u64 = 0xFFFF_FFFF;
/// Why the writer stopped when the blob store's `put` stopped reading.
const SINK_CLOSED: &str = "the blob store stopped taking the archive";
/// Extra field id of the Info-ZIP extended timestamp (exact UTC modification
/// time, which the DOS date and time of a ZIP header cannot say).
const EXTENDED_TIMESTAMP: u16 = 0x5455;

/// One entry of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveEntry {
    /// The entry's name: already safe (no separators, no `..`) and unique in
    /// the archive (see `dossier_domain::naming`).
    pub name: String,
    /// Where its bytes are.
    pub blob_key: BlobKey,
    /// How many bytes there must be.
    pub size: u64,
    /// Their SHA-256, checked while they pass; `None` skips the check.
    pub sha256: Option<Sha256Hex>,
    /// The entry's modification time.
    pub modified: DateTime<Utc>,
    pub compression: EntryCompression,
    /// How errors name the entry to people ("file 0193… (Invoice.pdf)").
    pub label: String,
}

/// The stored archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuiltArchive {
    /// Size of the ZIP in bytes.
    pub size: u64,
    /// SHA-256 of the ZIP.
    pub sha256: Sha256Hex,
}

/// Why no archive was stored. In every case nothing is left under the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// A file cannot go into the archive as it is (its blob is missing or does
    /// not match its record): trying again gives the same answer. The message
    /// names the entry by its label (ids only) and is for the service log.
    #[error("{0}")]
    Content(String),
    /// The archive would be larger than the store allows.
    #[error("the archive would be larger than its limit of {limit} bytes")]
    TooLarge {
        /// The limit, in bytes.
        limit: u64,
    },
    /// The blob store failed while reading or writing: trying again may work.
    #[error("{0}")]
    Store(String),
    /// A bug or a crash of the writer thread.
    #[error("building the archive failed: {0}")]
    Internal(String),
}

impl ArchiveError {
    /// Whether trying again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Store(_))
    }
}

/// The most bytes an archive of `entries` can take: their content, every
/// header, descriptor and directory record, and what deflate may add to
/// content that does not compress. `put` stops at this limit.
pub fn archive_limit(entries: &[ArchiveEntry]) -> u64 {
    entries
        .iter()
        .map(|entry| {
            let name = entry.name.len() as u64;
            // Local header, data descriptor and central record, each with
            // ZIP64 and timestamp fields: well under 1 KiB plus the name twice.
            let headers = 1024 + 2 * name;
            let slack = match entry.compression {
                EntryCompression::Stored => 0,
                // Deflate's stored blocks cost 5 bytes per 64 KiB at worst.
                EntryCompression::Deflated => entry.size / 1000 + 1024,
            };
            entry.size.saturating_add(headers + slack)
        })
        .fold(4096, u64::saturating_add)
}

/// Streams `entries`, in order, into one ZIP stored under `key` (see the module
/// docs). `progress` is told how many entries are complete after each one.
pub async fn build_archive(
    blobs: Arc<dyn BlobStore>,
    key: &BlobKey,
    entries: Vec<ArchiveEntry>,
    progress: watch::Sender<u32>,
) -> Result<BuiltArchive, ArchiveError> {
    let limit = archive_limit(&entries);
    let (chunks, received) = mpsc::channel::<io::Result<Bytes>>(IN_FLIGHT);
    let runtime = Handle::current();
    let reading = Arc::clone(&blobs);
    let writing = tokio::task::spawn_blocking(move || {
        write_zip(&runtime, reading.as_ref(), entries, chunks, &progress)
    });
    let body: ByteStream = Box::pin(futures::stream::unfold(received, |mut received| async {
        received.recv().await.map(|chunk| (chunk, received))
    }));
    let stored = blobs.put(key, body, limit).await;
    let written = writing
        .await
        .map_err(|e| ArchiveError::Internal(format!("the archive writer stopped: {e}")))
        .and_then(|written| written);

    match (written, stored) {
        (Ok(()), Ok(stored)) => Ok(BuiltArchive {
            size: stored.size,
            sha256: Sha256Hex::parse(&stored.sha256)
                .map_err(|e| ArchiveError::Internal(format!("the store's digest: {e}")))?,
        }),
        // The store gave up first (its writes failed): its own error says why.
        (Err(ArchiveError::Store(reason)), Err(error)) if reason == SINK_CLOSED => {
            Err(put_failure(error))
        }
        (Err(error), stored) => {
            if stored.is_ok() {
                // Cannot happen (an unfinished writer ends the stream with an
                // error), but a broken archive must never stay under the key.
                let _ = blobs.delete(key).await;
            }
            Err(error)
        }
        (Ok(()), Err(error)) => Err(put_failure(error)),
    }
}

fn put_failure(error: BlobError) -> ArchiveError {
    match error {
        BlobError::TooLarge { limit } => ArchiveError::TooLarge { limit },
        error => ArchiveError::Store(format!("storing the archive failed: {error}")),
    }
}

/// The blocking half: writes the whole archive into the channel. Runs on the
/// blocking pool, so it may block on the channel and on `runtime.block_on`.
fn write_zip(
    runtime: &Handle,
    blobs: &dyn BlobStore,
    entries: Vec<ArchiveEntry>,
    chunks: mpsc::Sender<io::Result<Bytes>>,
    progress: &watch::Sender<u32>,
) -> Result<(), ArchiveError> {
    let abandoned = Arc::new(AtomicBool::new(false));
    let mut zip = ZipWriter::new_stream(ChannelWriter::new(chunks, Arc::clone(&abandoned)));
    for (done, entry) in entries.iter().enumerate() {
        if let Err(error) = write_entry(runtime, blobs, &mut zip, entry) {
            // The ZIP writer finishes the archive when dropped: let it write
            // into the void. The channel then ends with an error.
            abandoned.store(true, Ordering::Relaxed);
            return Err(error);
        }
        progress.send_replace(u32::try_from(done + 1).unwrap_or(u32::MAX));
    }
    let finished = zip.finish().map_err(|e| sink_error(e.into()))?;
    finished.into_inner().complete().map_err(sink_error)
}

fn write_entry(
    runtime: &Handle,
    blobs: &dyn BlobStore,
    zip: &mut ZipWriter<::zip::write::StreamWriter<ChannelWriter>>,
    entry: &ArchiveEntry,
) -> Result<(), ArchiveError> {
    let label = &entry.label;
    let object = match runtime.block_on(blobs.get(&entry.blob_key)) {
        Ok(object) => object,
        Err(BlobError::NotFound) => {
            return Err(ArchiveError::Content(format!(
                "the content of {label} is missing from the blob store"
            )));
        }
        Err(BlobError::Shredded) => {
            return Err(ArchiveError::Content(format!(
                "the content of {label} was deleted (its data key is destroyed)"
            )));
        }
        Err(BlobError::Damaged(detail)) => {
            return Err(ArchiveError::Content(format!(
                "the content of {label} failed its integrity check: {detail}"
            )));
        }
        Err(error) => {
            return Err(ArchiveError::Store(format!("reading {label}: {error}")));
        }
    };
    if object.size != entry.size {
        return Err(size_mismatch(label, object.size, entry.size));
    }
    zip.start_file(entry.name.as_str(), entry_options(entry)?)
        .map_err(|e| ArchiveError::Internal(format!("starting the entry of {label}: {e}")))?;

    let mut body = object.body;
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    while let Some(chunk) = runtime.block_on(body.next()) {
        let chunk = chunk.map_err(|e| ArchiveError::Store(format!("reading {label}: {e}")))?;
        count = count.saturating_add(chunk.len() as u64);
        if count > entry.size {
            return Err(size_mismatch(label, count, entry.size));
        }
        hasher.update(&chunk);
        zip.write_all(&chunk).map_err(sink_error)?;
    }
    if count != entry.size {
        return Err(size_mismatch(label, count, entry.size));
    }
    if let Some(expected) = &entry.sha256
        && hex::encode(hasher.finalize()) != expected.as_str()
    {
        return Err(ArchiveError::Content(format!(
            "the content of {label} does not match the SHA-256 recorded at its upload"
        )));
    }
    Ok(())
}

fn size_mismatch(label: &str, found: u64, recorded: u64) -> ArchiveError {
    ArchiveError::Content(format!(
        "the content of {label} has {found} bytes in the blob store, but {recorded} were recorded"
    ))
}

/// A failed write into the channel: the blob store stopped taking the archive
/// (its own error says why) or the ZIP writer failed.
fn sink_error(error: io::Error) -> ArchiveError {
    if error.kind() == io::ErrorKind::BrokenPipe {
        ArchiveError::Store(SINK_CLOSED.to_owned())
    } else {
        ArchiveError::Internal(format!("writing the archive: {error}"))
    }
}

fn entry_options(entry: &ArchiveEntry) -> Result<FullFileOptions<'static, 'static>, ArchiveError> {
    let (method, worst_case) = match entry.compression {
        EntryCompression::Stored => (CompressionMethod::Stored, entry.size),
        EntryCompression::Deflated => (
            CompressionMethod::Deflated,
            entry.size.saturating_add(entry.size / 1000 + 1024),
        ),
    };
    let mut options = FullFileOptions::default()
        .compression_method(method)
        .last_modified_time(dos_time(entry.modified))
        .unix_permissions(0o644)
        .large_file(worst_case >= ZIP64_SIZE);
    // Seconds since 1970 as an unsigned 32-bit number (until 2106); beyond
    // that only the DOS time is written.
    if let Ok(seconds) = u32::try_from(entry.modified.timestamp()) {
        let mut field = [0u8; 5];
        field[0] = 1; // flags: the modification time follows
        field[1..].copy_from_slice(&seconds.to_le_bytes());
        options
            .add_extra_field(EXTENDED_TIMESTAMP, field, false)
            .map_err(|e| ArchiveError::Internal(format!("the timestamp field: {e}")))?;
    }
    Ok(options)
}

/// The DOS date and time of an entry (UTC; ZIP says nothing about time zones),
/// clamped to what the format can hold (1980 to 2107).
pub fn dos_time(at: DateTime<Utc>) -> ZipDateTime {
    let year = at.year().clamp(1980, 2107);
    if year != at.year() {
        let (month, day, hour, minute, second) = if year == 1980 {
            (1, 1, 0, 0, 0)
        } else {
            (12, 31, 23, 59, 58)
        };
        return ZipDateTime::from_date_and_time(year as u16, month, day, hour, minute, second)
            .unwrap_or_default();
    }
    ZipDateTime::from_date_and_time(
        year as u16,
        at.month() as u8,
        at.day() as u8,
        at.hour() as u8,
        at.minute() as u8,
        at.second() as u8,
    )
    .unwrap_or_default()
}

/// The `std::io::Write` the ZIP writer writes into: collects [`CHUNK`] bytes at
/// a time and hands them to the channel, blocking while [`IN_FLIGHT`] chunks
/// wait there (which is what bounds the memory).
///
/// The channel ends cleanly only after [`Self::complete`]; a writer dropped
/// before (an error, a panic, a cancelled build) sends an error as its last
/// item, so the blob store aborts the upload instead of storing a truncated
/// archive.
struct ChannelWriter {
    chunks: mpsc::Sender<io::Result<Bytes>>,
    pending: BytesMut,
    completed: bool,
    /// Set when the archive is abandoned: further writes (the directory the
    /// ZIP writer writes when dropped) are discarded.
    abandoned: Arc<AtomicBool>,
}

impl ChannelWriter {
    fn new(chunks: mpsc::Sender<io::Result<Bytes>>, abandoned: Arc<AtomicBool>) -> Self {
        Self {
            chunks,
            pending: BytesMut::with_capacity(CHUNK),
            completed: false,
            abandoned,
        }
    }

    fn send(&mut self, chunk: Bytes) -> io::Result<()> {
        self.chunks
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, SINK_CLOSED))
    }

    /// Sends what is left and ends the channel cleanly: the archive is whole.
    fn complete(mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            let last = self.pending.split().freeze();
            self.send(last)?;
        }
        self.completed = true;
        Ok(())
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.abandoned.load(Ordering::Relaxed) {
            return Ok(buf.len());
        }
        let taken = buf.len().min(CHUNK - self.pending.len());
        self.pending.extend_from_slice(&buf[..taken]);
        if self.pending.len() >= CHUNK {
            let chunk = self.pending.split().freeze();
            self.send(chunk)?;
            self.pending.reserve(CHUNK);
        }
        Ok(taken)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks go out when full; the last one in `complete`.
        Ok(())
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        if !self.completed {
            // The receiver may be gone already (the store failed first): fine.
            let _ = self
                .chunks
                .try_send(Err(io::Error::other("the archive was not completed")))
                .or_else(|error| match error {
                    mpsc::error::TrySendError::Full(item) => {
                        self.chunks.blocking_send(item).map_err(|_| ())
                    }
                    mpsc::error::TrySendError::Closed(_) => Ok(()),
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dos_times_are_utc_and_clamped_to_the_format() {
        let at = DateTime::parse_from_rfc3339("2026-11-22T10:15:31Z")
            .unwrap()
            .with_timezone(&Utc);
        let time = dos_time(at);
        assert_eq!(
            (
                time.year(),
                time.month(),
                time.day(),
                time.hour(),
                time.minute(),
                time.second()
            ),
            (2026, 11, 22, 10, 15, 30)
        );
        assert_eq!(dos_time(DateTime::UNIX_EPOCH).year(), 1980);
    }

    #[test]
    fn the_limit_covers_content_headers_and_deflate_slack() {
        let entry = |size, compression| ArchiveEntry {
            name: "a.txt".into(),
            blob_key: BlobKey::from_recorded("t/c/f"),
            size,
            sha256: None,
            modified: DateTime::UNIX_EPOCH,
            compression,
            label: "a".into(),
        };
        let stored = archive_limit(&[entry(1_000_000, EntryCompression::Stored)]);
        let deflated = archive_limit(&[entry(1_000_000, EntryCompression::Deflated)]);
        assert!(stored > 1_000_000 && stored < 1_010_000, "{stored}");
        assert!(deflated > stored, "{deflated}");
    }

    #[test]
    fn an_unfinished_writer_ends_the_channel_with_an_error() {
        let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
        std::thread::spawn(move || {
            let mut writer = ChannelWriter::new(tx, Arc::default());
            writer.write_all(&vec![7u8; CHUNK + 10]).unwrap();
            // dropped without complete()
        })
        .join()
        .unwrap();
        let first = rx.try_recv().unwrap().unwrap();
        assert_eq!(first.len(), CHUNK);
        assert!(rx.try_recv().unwrap().is_err(), "the last item is an error");

        let (tx, mut rx) = mpsc::channel(IN_FLIGHT);
        std::thread::spawn(move || {
            let mut writer = ChannelWriter::new(tx, Arc::default());
            writer.write_all(b"whole").unwrap();
            writer.complete().unwrap();
        })
        .join()
        .unwrap();
        assert_eq!(&rx.try_recv().unwrap().unwrap()[..], b"whole");
        assert!(rx.try_recv().is_err(), "then the channel just ends");
    }
}
