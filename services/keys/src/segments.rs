//! Sealed blobs: a byte stream in fixed-size AEAD segments (the STREAM
//! construction of Hoang, Reyhanitabar, Rogaway and Vizár, over AES-256-GCM).
//!
//! ```text
//! header   "DSB1" | data key id (16) | nonce prefix (7)             27 bytes
//! segment  AES-256-GCM(plain[i·64 KiB ..], nonce = prefix | i (u32 BE) | last (1))
//!          with the header as associated data; 64 KiB + 16-byte tag, the last
//!          one shorter (possibly empty) and flagged last
//! ```
//!
//! Each segment is authenticated with its position and with whether it is the
//! last, so an altered byte, a reordered, repeated or dropped segment, and a
//! blob cut at a segment boundary all fail to open: [`open`] yields an error
//! instead of the bytes, and never hands out a segment it has not checked.
//! Both directions hold one segment at a time, so memory stays bounded for any
//! file size.

use std::io;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use ring::aead::{Aad, NONCE_LEN, Nonce};
use uuid::Uuid;

use crate::{DataKey, KeyError, random_bytes};

/// Plain bytes per segment.
pub const SEGMENT: usize = 64 * 1024;
const TAG: usize = 16;
const SEALED_SEGMENT: usize = SEGMENT + TAG;
const MAGIC: &[u8; 4] = b"DSB1";
const PREFIX_LEN: usize = NONCE_LEN - 5;
/// Length of the header in front of the first segment.
pub const HEADER: usize = MAGIC.len() + 16 + PREFIX_LEN;

/// Stored size of a blob of `plain` bytes.
pub fn sealed_len(plain: u64) -> u64 {
    let segments = plain.div_ceil(SEGMENT as u64).max(1);
    HEADER as u64 + plain + segments * TAG as u64
}

/// Plain size of a stored blob of `sealed` bytes (`None` if no blob sealed
/// here can have that size), for `Content-Length` before reading a byte.
pub fn plain_len(sealed: u64) -> Option<u64> {
    let body = sealed.checked_sub(HEADER as u64)?;
    let segments = body.div_ceil(SEALED_SEGMENT as u64).max(1);
    let plain = body.checked_sub(segments * TAG as u64)?;
    (sealed_len(plain) == sealed).then_some(plain)
}

/// The data key a stored blob names in its header, if it starts with one (a
/// blob stored before encryption does not).
pub fn sealed_by(head: &[u8]) -> Option<Uuid> {
    let head = head.get(..HEADER)?;
    if &head[..MAGIC.len()] != MAGIC {
        return None;
    }
    Uuid::from_slice(&head[MAGIC.len()..MAGIC.len() + 16]).ok()
}

fn nonce(prefix: &[u8; PREFIX_LEN], index: u32, last: bool) -> Nonce {
    let mut bytes = [0u8; NONCE_LEN];
    bytes[..PREFIX_LEN].copy_from_slice(prefix);
    bytes[PREFIX_LEN..NONCE_LEN - 1].copy_from_slice(&index.to_be_bytes());
    bytes[NONCE_LEN - 1] = u8::from(last);
    Nonce::assume_unique_for_key(bytes)
}

fn tampered(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, KeyError::Tampered(what))
}

struct Sealer<S> {
    key: DataKey,
    body: S,
    header: [u8; HEADER],
    prefix: [u8; PREFIX_LEN],
    /// The segment being filled, with room for its tag: the plain bytes are
    /// copied once, into it, and sealed in place.
    segment: Vec<u8>,
    /// What is left of the body's last chunk.
    rest: Bytes,
    index: u32,
    started: bool,
    done: bool,
}

impl<S> Sealer<S> {
    /// Seals the filled segment and starts the next one.
    fn seal(&mut self, last: bool) -> io::Result<Bytes> {
        let mut out = std::mem::replace(&mut self.segment, Vec::with_capacity(SEGMENT + TAG));
        self.key
            .aead()
            .seal_in_place_append_tag(
                nonce(&self.prefix, self.index, last),
                Aad::from(&self.header),
                &mut out,
            )
            .map_err(|_| io::Error::other("sealing a segment failed"))?;
        self.index = self
            .index
            .checked_add(1)
            .ok_or_else(|| io::Error::other("a blob of more than 2^32 segments"))?;
        Ok(Bytes::from(out))
    }
}

/// `body` sealed under `key`: the header, then one sealed segment per 64 KiB.
/// An error of `body` is passed on and ends the stream.
pub fn seal<S>(key: DataKey, body: S) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send + Unpin,
{
    let prefix: [u8; PREFIX_LEN] = random_bytes();
    let mut header = [0u8; HEADER];
    header[..MAGIC.len()].copy_from_slice(MAGIC);
    header[MAGIC.len()..MAGIC.len() + 16].copy_from_slice(key.id().as_bytes());
    header[MAGIC.len() + 16..].copy_from_slice(&prefix);
    let state = Sealer {
        key,
        body,
        header,
        prefix,
        segment: Vec::with_capacity(SEGMENT + TAG),
        rest: Bytes::new(),
        index: 0,
        started: false,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        if !state.started {
            state.started = true;
            let header = Bytes::copy_from_slice(&state.header);
            return Some((Ok(header), state));
        }
        loop {
            // A full segment is sealed once it is known whether more bytes
            // follow it (the last one is marked so).
            if state.segment.len() == SEGMENT && !state.rest.is_empty() {
                let sealed = state.seal(false);
                state.done = sealed.is_err();
                return Some((sealed, state));
            }
            if state.rest.is_empty() {
                match state.body.next().await {
                    Some(Ok(chunk)) => state.rest = chunk,
                    Some(Err(err)) => {
                        state.done = true;
                        return Some((Err(err), state));
                    }
                    None => {
                        let sealed = state.seal(true);
                        state.done = true;
                        return Some((sealed, state));
                    }
                }
                continue;
            }
            let take = (SEGMENT - state.segment.len()).min(state.rest.len());
            let taken = state.rest.split_to(take);
            state.segment.extend_from_slice(&taken);
        }
    })
}

struct Opener<S> {
    key: DataKey,
    body: S,
    header: Option<([u8; HEADER], [u8; PREFIX_LEN])>,
    buffer: BytesMut,
    index: u32,
    done: bool,
}

impl<S> Opener<S> {
    fn open(&mut self, mut sealed: BytesMut, last: bool) -> io::Result<Bytes> {
        let (header, prefix) = self.header.as_ref().expect("the header is read first");
        let plain_len = self
            .key
            .aead()
            .open_in_place(
                nonce(prefix, self.index, last),
                Aad::from(header),
                &mut sealed,
            )
            .map_err(|_| {
                tampered(if last {
                    "a segment was altered, or the blob was cut short"
                } else {
                    "a segment was altered or moved"
                })
            })?
            .len();
        sealed.truncate(plain_len);
        self.index = self.index.wrapping_add(1);
        Ok(sealed.freeze())
    }
}

/// The plain bytes of a blob sealed under `key` by [`seal`]. Yields an
/// [`io::ErrorKind::InvalidData`] error (and ends) at the first segment that
/// fails to open, at a header naming another key, and at a cut-short blob.
pub fn open<S>(key: DataKey, body: S) -> impl Stream<Item = io::Result<Bytes>> + Send
where
    S: Stream<Item = io::Result<Bytes>> + Send + Unpin,
{
    let state = Opener {
        key,
        body,
        header: None,
        buffer: BytesMut::new(),
        index: 0,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        if state.done {
            return None;
        }
        loop {
            if state.header.is_none() && state.buffer.len() >= HEADER {
                let head = state.buffer.split_to(HEADER);
                if sealed_by(&head) != Some(state.key.id()) {
                    state.done = true;
                    return Some((
                        Err(tampered("the blob is not sealed under its file's key")),
                        state,
                    ));
                }
                let mut header = [0u8; HEADER];
                header.copy_from_slice(&head);
                let mut prefix = [0u8; PREFIX_LEN];
                prefix.copy_from_slice(&head[MAGIC.len() + 16..]);
                state.header = Some((header, prefix));
            }
            if state.header.is_some() && state.buffer.len() > SEALED_SEGMENT {
                let sealed = state.buffer.split_to(SEALED_SEGMENT);
                let plain = state.open(sealed, false);
                state.done = plain.is_err();
                return Some((plain, state));
            }
            match state.body.next().await {
                Some(Ok(chunk)) => state.buffer.extend_from_slice(&chunk),
                Some(Err(err)) => {
                    state.done = true;
                    return Some((Err(err), state));
                }
                None => {
                    state.done = true;
                    if state.header.is_none() || state.buffer.len() < TAG {
                        return Some((Err(tampered("the blob was cut short")), state));
                    }
                    let sealed = std::mem::take(&mut state.buffer);
                    return Some((state.open(sealed, true), state));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KEY_LEN;
    use futures::TryStreamExt as _;

    fn key() -> DataKey {
        DataKey::from_bytes(Uuid::new_v4(), &random_bytes::<KEY_LEN>())
    }

    fn chunks(bytes: &[u8], size: usize) -> impl Stream<Item = io::Result<Bytes>> + Send + Unpin {
        let parts: Vec<io::Result<Bytes>> = bytes
            .chunks(size.max(1))
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        futures::stream::iter(parts)
    }

    async fn sealed(key: &DataKey, plain: &[u8]) -> Vec<u8> {
        let parts: Vec<Bytes> = seal(key.clone(), chunks(plain, 10_000))
            .try_collect()
            .await
            .unwrap();
        parts.concat()
    }

    async fn opened(key: &DataKey, sealed: &[u8], chunk: usize) -> io::Result<Vec<u8>> {
        let parts: Vec<Bytes> = open(key.clone(), chunks(sealed, chunk))
            .try_collect()
            .await?;
        Ok(parts.concat())
    }

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn every_size_round_trips_and_the_sizes_are_predicted() {
        let key = key();
        for len in [
            0,
            1,
            SEGMENT - 1,
            SEGMENT,
            SEGMENT + 1,
            3 * SEGMENT,
            3 * SEGMENT + 5,
        ] {
            let plain = sample(len);
            let stored = sealed(&key, &plain).await;
            assert_eq!(stored.len() as u64, sealed_len(len as u64), "len {len}");
            assert_eq!(
                plain_len(stored.len() as u64),
                Some(len as u64),
                "len {len}"
            );
            assert_eq!(sealed_by(&stored), Some(key.id()));
            for chunk in [1, 1000, 70_000] {
                assert_eq!(
                    opened(&key, &stored, chunk).await.unwrap(),
                    plain,
                    "len {len}"
                );
            }
        }
    }

    #[tokio::test]
    async fn a_flipped_byte_anywhere_is_refused() {
        let key = key();
        let stored = sealed(&key, &sample(2 * SEGMENT + 10)).await;
        for at in [
            0,
            5,
            HEADER + 1,
            HEADER + SEALED_SEGMENT + 3,
            stored.len() - 1,
        ] {
            let mut bad = stored.clone();
            bad[at] ^= 1;
            let err = opened(&key, &bad, 4096).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "byte {at}");
        }
    }

    #[tokio::test]
    async fn a_blob_cut_at_a_segment_boundary_or_with_segments_swapped_is_refused() {
        let key = key();
        let stored = sealed(&key, &sample(3 * SEGMENT + 10)).await;
        let cut = &stored[..HEADER + 2 * SEALED_SEGMENT];
        assert!(opened(&key, cut, 4096).await.is_err());
        assert!(opened(&key, &stored[..HEADER], 4096).await.is_err());

        let mut swapped = stored[..HEADER].to_vec();
        swapped.extend_from_slice(&stored[HEADER + SEALED_SEGMENT..HEADER + 2 * SEALED_SEGMENT]);
        swapped.extend_from_slice(&stored[HEADER..HEADER + SEALED_SEGMENT]);
        swapped.extend_from_slice(&stored[HEADER + 2 * SEALED_SEGMENT..]);
        assert!(opened(&key, &swapped, 4096).await.is_err());
    }

    #[tokio::test]
    async fn a_blob_opens_only_under_its_own_key() {
        let stored = sealed(&key(), b"hello").await;
        assert!(opened(&key(), &stored, 4096).await.is_err());
        assert_eq!(sealed_by(b"%PDF-1.7 plain file"), None);
        assert_eq!(plain_len(3), None);
    }
}
