//! The S3 blob store: any S3-compatible service through `aws-sdk-s3`.
//!
//! Works against AWS and against MinIO, Garage, s3s and the like: with a
//! custom endpoint it uses path-style addressing, and it only sends or checks
//! payload checksums where the API requires them (newer SDK defaults add
//! CRC32 trailers many of those servers reject).
//!
//! Uploads are atomic, in three shapes:
//!
//! - a body whose length is known before its first byte
//!   ([`BodyLength::Exactly`]: a client that declared its file's size, the
//!   AMQP intake) streams into one `PutObject` as it arrives, with no part
//!   buffer; its last declared byte is sent only once the body is known to
//!   end there (ADR 0019), so a body that breaks off or runs long leaves the
//!   request short and the server stores nothing;
//! - any other body that fits in one part ([`PART_SIZE`]), or that arrives
//!   whole in one chunk, is a single `PutObject` from memory;
//! - a longer one is a multipart upload that is completed only after the whole
//!   body arrived within the limit, and aborted otherwise.
//!
//! Either way nothing appears under the key unless the upload succeeded.
//!
//! Memory and speed of a multipart upload: it holds one part buffer while it
//! reads its body.
//! A full part is sent while the next one is read (one part in flight at
//! most), but that second buffer comes from a budget shared by every upload
//! of the store ([`SPARE_PART_BUFFERS`]); without a spare buffer the upload
//! waits for its part to be sent before it reads on, as it would without
//! pipelining. So memory stays at about one part per upload plus the budget,
//! however many uploads run at once, and a few uploads at once still keep
//! both the client's connection and the S3 connection busy.
//!
//! Request bodies are sent with `UNSIGNED-PAYLOAD` (see [`S3BlobStore::put`]).
//!
//! TLS is rustls with the *ring* provider, chosen explicitly (the SDK's
//! default client would pull in aws-lc).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as SdkByteStream;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use bytes::{Bytes, BytesMut};
use dossier_domain::BlobKey;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use futures::StreamExt as _;

use super::{
    BlobError, BlobListStream, BlobListing, BlobObject, BlobStore, BodyLength, ByteStream,
    HashingLimited, StoredBlob, hashing_limited, limited, shown_key,
};

/// Size of one multipart part, and so the memory one upload holds while it
/// reads its body. S3 requires at least 5 MiB for every part but the last; the
/// minimum keeps an upload, with the HTTP buffers around it, inside the 8 MiB
/// per upload that the benchmark holds us to, and the part count is still low
/// (a 25 MiB file is 5 parts, far from the 10 000-part maximum).
pub const PART_SIZE: usize = 5 * 1024 * 1024;

/// Part buffers beyond one per upload, shared by all uploads of a store: an
/// upload with a part in flight reads on into a spare buffer if one is free,
/// and otherwise waits for its part to be sent. Four keep a handful of
/// concurrent uploads pipelined (on a small machine more would only compete
/// for the same cores) and bound the extra memory to 20 MiB per process.
pub const SPARE_PART_BUFFERS: usize = 4;

/// The largest object one `PutObject` may carry (5 GiB); a longer body of a
/// known length goes as a multipart upload.
const MAX_PUT_OBJECT: u64 = 5 * 1024 * 1024 * 1024;

/// The region AWS uses when a bucket is created without a location constraint.
const DEFAULT_AWS_REGION: &str = "us-east-1";

/// How to reach the bucket.
#[derive(Clone)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (without leading or trailing `/`), so
    /// several deployments can share a bucket; `None` for the bucket root.
    pub prefix: Option<String>,
    /// An S3-compatible endpoint URL (`http://127.0.0.1:9000`); `None` for
    /// AWS. When set, path-style addressing is used.
    pub endpoint: Option<String>,
    /// Region to sign requests for.
    pub region: String,
    /// Access key; with [`Self::secret_key`] replaces the standard AWS
    /// credential chain (environment, profile, web identity, instance role).
    pub access_key: Option<String>,
    /// Secret key; see [`Self::access_key`].
    pub secret_key: Option<String>,
    /// Create the bucket at open if it does not exist (development and
    /// tests). When off, open does not contact the service at all.
    pub create_bucket_if_missing: bool,
}

impl fmt::Debug for S3Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret key, not even in a debug log.
        f.debug_struct("S3Options")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key", &self.access_key)
            .field(
                "secret_key",
                &self.secret_key.as_ref().map(|_| "<redacted>"),
            )
            .field("create_bucket_if_missing", &self.create_bucket_if_missing)
            .finish()
    }
}

/// Blobs as objects in an S3 bucket, under an optional key prefix.
#[derive(Debug, Clone)]
pub struct S3BlobStore {
    client: Client,
    bucket: String,
    /// `"{prefix}/"`, or empty for the bucket root.
    key_prefix: String,
    described: String,
    /// Permits for second part buffers; see [`SPARE_PART_BUFFERS`].
    spare_parts: Arc<Semaphore>,
}

impl S3BlobStore {
    /// Builds the client (rustls on ring); creates the bucket if asked to.
    pub async fn open(options: S3Options) -> Result<Self, BlobError> {
        if options.bucket.is_empty() {
            return Err(BlobError::Backend("the S3 bucket name is empty".into()));
        }
        let http_client = aws_smithy_http_client::Builder::new()
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .build_https();

        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
            // The credential chain (instance role, SSO, STS) makes HTTP calls
            // of its own; give it our client, aws-config has none built in here.
            .http_client(http_client.clone())
            .region(Region::new(options.region.clone()));
        match (&options.access_key, &options.secret_key) {
            (Some(access_key), Some(secret_key)) => {
                loader = loader.credentials_provider(Credentials::new(
                    access_key,
                    secret_key,
                    None,
                    None,
                    "dossier-settings",
                ));
            }
            (None, None) => {}
            _ => {
                return Err(BlobError::Backend(
                    "S3 credentials: give both the access key and the secret key, or neither"
                        .into(),
                ));
            }
        }
        let shared = loader.load().await;

        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .http_client(http_client)
            // Since early 2025 the SDK adds CRC32 checksums (as aws-chunked
            // trailers) to every upload and validates them on download; many
            // S3-compatible servers reject or lack them. Only where required.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(endpoint) = &options.endpoint {
            // Virtual-hosted style would need DNS for `<bucket>.<host>`,
            // which self-hosted servers rarely have.
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        let client = Client::from_conf(config.build());

        let prefix = options
            .prefix
            .as_deref()
            .map(|p| p.trim_matches('/'))
            .filter(|p| !p.is_empty());
        let key_prefix = prefix.map(|p| format!("{p}/")).unwrap_or_default();
        let described = format!(
            "s3://{}{}{} at {} (region {})",
            options.bucket,
            if prefix.is_some() { "/" } else { "" },
            prefix.unwrap_or_default(),
            options.endpoint.as_deref().unwrap_or("AWS"),
            options.region,
        );
        let store = Self {
            client,
            bucket: options.bucket,
            key_prefix,
            described,
            spare_parts: Arc::new(Semaphore::new(SPARE_PART_BUFFERS)),
        };
        if options.create_bucket_if_missing {
            store.create_bucket_if_missing(&options.region).await?;
        }
        Ok(store)
    }

    /// The SDK client, for callers that need more than the port (tests, tools).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The bucket name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// A listed object as the caller's key (our prefix stripped); `None` for
    /// an object outside the prefix.
    fn listing(&self, object: aws_sdk_s3::types::Object) -> Option<BlobListing> {
        // The server filtered by prefix already; stripping ours gives back the
        // caller's key.
        let key = object.key()?.strip_prefix(self.key_prefix.as_str())?;
        Some(BlobListing {
            key: key.to_owned(),
            size: object
                .size()
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(0),
            last_modified: object
                .last_modified()
                .and_then(|t| SystemTime::try_from(*t).ok()),
        })
    }

    /// The object key of blob key `key`: the store's prefix, then the key.
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    /// Where a key is, for errors: ids only (see [`shown_key`]).
    fn location(&self, key: &str) -> String {
        format!("s3://{}/{}{}", self.bucket, self.key_prefix, shown_key(key))
    }

    async fn create_bucket_if_missing(&self, region: &str) -> Result<(), BlobError> {
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(err) if is_not_found(&err) => {}
            Err(err) => return Err(sdk_error(format!("checking bucket {}", self.bucket), &err)),
        }
        let mut request = self.client.create_bucket().bucket(&self.bucket);
        if region != DEFAULT_AWS_REGION {
            // AWS rejects a CreateBucket whose location differs from the
            // signing region, and an explicit us-east-1 constraint too.
            request = request.create_bucket_configuration(
                CreateBucketConfiguration::builder()
                    .location_constraint(BucketLocationConstraint::from(region))
                    .build(),
            );
        }
        match request.send().await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "created the S3 bucket, it did not exist");
                Ok(())
            }
            Err(create_err) => {
                // Another process may have created it in the meantime
                // (BucketAlreadyExists / BucketAlreadyOwnedByYou, depending on
                // the server): fine if we can reach it now.
                match self.client.head_bucket().bucket(&self.bucket).send().await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(sdk_error(
                        format!("creating bucket {}", self.bucket),
                        &create_err,
                    )),
                }
            }
        }
    }

    /// The single-request upload, for bodies of at most one part or handed
    /// over whole in one chunk (up to S3's 5 GiB, far above any file limit
    /// we would set). S3 makes a `PutObject` atomic: the object appears whole
    /// or not at all.
    async fn put_single(&self, key: &BlobKey, bytes: Bytes) -> Result<(), BlobError> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key.as_str()))
            .content_length(content_length(&bytes))
            .body(SdkByteStream::from(bytes))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|err| sdk_error(format!("uploading {}", self.location(key.as_str())), &err))?;
        Ok(())
    }

    /// One `PutObject` of a body of exactly `length` bytes, streamed as it
    /// arrives: no part buffers, and the object starts to be written with
    /// the body's first chunk. Atomic as the multipart upload is: `body`
    /// hands out its last declared byte only once it knows the body ends
    /// there ([`HashingLimited`]), so a body that is cut off, fails, or runs
    /// long ends the request before its `Content-Length` is reached, and
    /// the server stores nothing.
    async fn put_streamed(
        &self,
        key: &BlobKey,
        body: HashingLimited,
        length: u64,
    ) -> Result<StoredBlob, BlobError> {
        let (stream, tally) = body.into_stream();
        let declared = i64::try_from(length)
            .map_err(|_| BlobError::Backend(format!("{length} bytes is not an object size")))?;
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key.as_str()))
            .content_length(declared)
            .body(SdkByteStream::from_body_1_x(KnownLength {
                stream: std::sync::Mutex::new(stream),
                remaining: length,
            }))
            .customize()
            .disable_payload_signing()
            .send()
            .await
            .map_err(|err| sdk_error(format!("uploading {}", self.location(key.as_str())), &err));
        tally.outcome(sent)
    }

    async fn start_multipart(&self, key: &BlobKey) -> Result<MultipartUpload, BlobError> {
        let object_key = self.object_key(key.as_str());
        let output = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&object_key)
            .send()
            .await
            .map_err(|err| {
                sdk_error(
                    format!(
                        "starting a multipart upload to {}",
                        self.location(key.as_str())
                    ),
                    &err,
                )
            })?;
        let upload_id = output.upload_id.ok_or_else(|| {
            BlobError::Backend(format!(
                "starting a multipart upload to {}: the server returned no upload id",
                self.location(key.as_str())
            ))
        })?;
        Ok(MultipartUpload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: object_key,
            upload_id,
            parts: Vec::new(),
            finished: false,
        })
    }

    /// Reads `body` into parts; every part but the last goes out as soon as
    /// more bytes follow it (starting the multipart upload with the first).
    /// Answers the last part (possibly empty), not yet sent. On error, the
    /// part in flight has settled, so that an abort comes after every part.
    async fn send_parts(
        &self,
        key: &BlobKey,
        body: &mut HashingLimited,
        multipart: &mut Option<MultipartUpload>,
    ) -> Result<PartBuffer, BlobError> {
        let mut pending = PartBuffer::default();
        // At most one part in flight, and the permit for the second buffer
        // this upload holds from its first part in flight to its end.
        let mut in_flight: Option<InFlightPart> = None;
        let mut spare: Option<OwnedSemaphorePermit> = None;
        // The buffer of the last part sent, while another one fills.
        let mut recycled: Option<Bytes> = None;
        // A chunk read ahead, handled before the next one is read.
        let mut carried: Option<Bytes> = None;

        let result = async {
            loop {
                let next = match (carried.take(), in_flight.as_mut()) {
                    (Some(chunk), _) => Next::Chunk(Some(chunk)),
                    (None, Some(part)) => tokio::select! {
                        sent = &mut part.request => Next::Sent(Box::new(sent)),
                        // Cancel-safe: a chunk is only taken once it is handed out.
                        chunk = body.next_chunk() => Next::Chunk(chunk?),
                    },
                    (None, None) => Next::Chunk(body.next_chunk().await?),
                };
                let next = match next {
                    Next::Chunk(next) => next,
                    Next::Sent(sent) => {
                        // Its buffer is kept for the next part (with the spare
                        // permit): a new one every part would churn the heap.
                        if let Some(part) = in_flight.take() {
                            recycled = Some(part.buffer);
                        }
                        if let Some(upload) = multipart.as_mut() {
                            upload.parts.push((*sent)?);
                        }
                        continue;
                    }
                };
                let Some(mut chunk) = next else {
                    return Ok(());
                };
                if multipart.is_none() && pending.len() == 0 && chunk.len() > PART_SIZE {
                    // A body handed over in memory (an AMQP upload): if this
                    // chunk is all of it, it goes as one PutObject, uncopied.
                    match body.next_chunk().await? {
                        None => {
                            pending = PartBuffer::Sliced(chunk);
                            return Ok(());
                        }
                        Some(next) => carried = Some(next),
                    }
                }
                while !chunk.is_empty() {
                    if pending.len() == PART_SIZE {
                        // More bytes follow, so this is not the last part: send
                        // it, after the one still in flight.
                        if let Some(InFlightPart { request, buffer }) = in_flight.take() {
                            let sent = request.await?;
                            if let Some(upload) = multipart.as_mut() {
                                upload.parts.push(sent);
                            }
                            recycled = Some(buffer);
                        }
                        let upload = match multipart.as_mut() {
                            Some(upload) => upload,
                            None => multipart.insert(self.start_multipart(key).await?),
                        };
                        let part = std::mem::take(&mut pending).freeze();
                        let sending = upload.send_part(part)?;
                        // Read on into a second buffer while this part is sent,
                        // if this upload has a spare one or can get one.
                        if spare.is_none() {
                            spare = Arc::clone(&self.spare_parts).try_acquire_owned().ok();
                        }
                        match spare {
                            Some(_) => {
                                in_flight = Some(sending);
                                if let Some(buffer) = recycled.take() {
                                    pending = PartBuffer::reuse(buffer);
                                }
                            }
                            // No spare buffer: send, then reuse the buffer.
                            None => {
                                let InFlightPart { request, buffer } = sending;
                                // Awaited by value: the request and its handle
                                // on the bytes are gone before the reuse.
                                upload.parts.push(request.await?);
                                pending = PartBuffer::reuse(buffer);
                            }
                        }
                    }
                    pending.fill_from(&mut chunk);
                }
            }
        }
        .await;

        if let Err(err) = result {
            // Let the part in flight settle (its outcome no longer matters),
            // so that the caller's abort is the last word on this upload.
            if let Some(part) = in_flight.take() {
                let _ = part.request.await;
            }
            drop(spare);
            return Err(err);
        }
        if let Some(part) = in_flight.take() {
            let sent = part.request.await?;
            if let Some(upload) = multipart.as_mut() {
                upload.parts.push(sent);
            }
        }
        drop(spare);
        Ok(pending)
    }
}

/// The bytes of the part being collected. Chunks are copied into one buffer
/// of [`PART_SIZE`], allocated with the first byte; a chunk that holds a whole
/// part on its own (an AMQP upload is a single chunk) is sliced, not copied.
/// A body that is one such chunk in all stays whole: one `PutObject`.
#[derive(Default)]
enum PartBuffer {
    #[default]
    Empty,
    Filling(BytesMut),
    Sliced(Bytes),
}

impl PartBuffer {
    /// An empty part that will fill the buffer of a part already sent, if no
    /// one else holds on to it; otherwise a new one is allocated when needed.
    fn reuse(sent: Bytes) -> Self {
        match sent.try_into_mut() {
            Ok(mut buffer) if buffer.capacity() >= PART_SIZE => {
                buffer.clear();
                Self::Filling(buffer)
            }
            _ => Self::Empty,
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::Filling(buffer) => buffer.len(),
            Self::Sliced(bytes) => bytes.len(),
        }
    }

    /// Moves as many bytes as fit from the front of `chunk` into the part.
    fn fill_from(&mut self, chunk: &mut Bytes) {
        match self {
            Self::Empty if chunk.len() >= PART_SIZE => {
                *self = Self::Sliced(chunk.split_to(PART_SIZE));
            }
            Self::Empty => {
                let mut buffer = BytesMut::with_capacity(PART_SIZE);
                buffer.extend_from_slice(&chunk.split_to(chunk.len().min(PART_SIZE)));
                *self = Self::Filling(buffer);
            }
            Self::Filling(buffer) => {
                let take = (PART_SIZE - buffer.len()).min(chunk.len());
                buffer.extend_from_slice(&chunk.split_to(take));
            }
            // Full by construction: the caller sends it before filling more.
            Self::Sliced(_) => {}
        }
    }

    fn freeze(self) -> Bytes {
        match self {
            Self::Empty => Bytes::new(),
            Self::Filling(buffer) => buffer.freeze(),
            Self::Sliced(bytes) => bytes,
        }
    }
}

/// What came first while a part was in flight.
enum Next {
    Sent(Box<Result<CompletedPart, BlobError>>),
    Chunk(Option<Bytes>),
}

/// An `UploadPart` request on its way, and its buffer (a second handle on
/// the bytes, to reuse the buffer once the request is done with it).
struct InFlightPart {
    request: Pin<Box<dyn Future<Output = Result<CompletedPart, BlobError>> + Send>>,
    buffer: Bytes,
}

fn content_length(bytes: &Bytes) -> i64 {
    // A part is at most a few MiB; i64 holds any length a Bytes can have.
    i64::try_from(bytes.len()).unwrap_or(i64::MAX)
}

/// A multipart upload in progress.
///
/// Until `CompleteMultipartUpload` succeeds, the parts are invisible: no
/// object exists under the key, and a blob already there stays as it was.
/// Every way out other than completion aborts the upload, because S3 keeps
/// (and bills) the parts of an upload that is neither completed nor aborted,
/// indefinitely unless the bucket has a lifecycle rule for it. Dropping an
/// unfinished upload (a cancelled request) also aborts it, in the background.
/// A request body of a length known up front, for a streamed `PutObject`:
/// its exact size hint lets the request carry `Content-Length` and go
/// unchunked. (The stream sits in a mutex only because the SDK wants a
/// `Sync` body; polling takes it by `&mut`, never locking.)
struct KnownLength {
    stream: std::sync::Mutex<ByteStream>,
    remaining: u64,
}

impl http_body::Body for KnownLength {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        let stream = this
            .stream
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        stream.poll_next_unpin(cx).map(|next| {
            next.map(|chunk| {
                chunk.map(|chunk| {
                    this.remaining = this.remaining.saturating_sub(chunk.len() as u64);
                    http_body::Frame::data(chunk)
                })
            })
        })
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.remaining)
    }
}

struct MultipartUpload {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    parts: Vec<CompletedPart>,
    finished: bool,
}

impl MultipartUpload {
    fn location(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// Starts sending `bytes` as the next part; the request runs when
    /// polled and answers the part for the completion.
    fn send_part(&self, bytes: Bytes) -> Result<InFlightPart, BlobError> {
        let part_number = i32::try_from(self.parts.len() + 1)
            .map_err(|_| BlobError::Backend("too many multipart parts".into()))?;
        let request = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .part_number(part_number)
            .content_length(content_length(&bytes))
            .body(SdkByteStream::from(bytes.clone()))
            .customize()
            .disable_payload_signing();
        let location = self.location();
        let request = async move {
            let output = request.send().await.map_err(|err| {
                sdk_error(format!("uploading part {part_number} of {location}"), &err)
            })?;
            Ok(CompletedPart::builder()
                .part_number(part_number)
                .set_e_tag(output.e_tag)
                .build())
        };
        Ok(InFlightPart {
            request: Box::pin(request),
            buffer: bytes,
        })
    }

    async fn complete(mut self) -> Result<(), BlobError> {
        let parts = std::mem::take(&mut self.parts);
        let result = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await;
        match result {
            Ok(_) => {
                self.finished = true;
                Ok(())
            }
            // Not finished: dropping `self` aborts. Should the completion have
            // gone through and only the answer been lost, the abort fails
            // harmlessly and the object is an orphan the sweep removes.
            Err(err) => Err(sdk_error(
                format!("completing the multipart upload to {}", self.location()),
                &err,
            )),
        }
    }

    /// Aborts now and waits for it; failures are logged, since the caller
    /// is already returning the error that made it abort.
    async fn abort(mut self) {
        self.finished = true;
        if let Err(err) = self.abort_request().send().await {
            warn_abort_failed(&self.location(), &self.upload_id, &err);
        }
    }

    fn abort_request(
        &self,
    ) -> aws_sdk_s3::operation::abort_multipart_upload::builders::AbortMultipartUploadFluentBuilder
    {
        self.client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(&self.key)
            .upload_id(&self.upload_id)
    }
}

impl Drop for MultipartUpload {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let request = self.abort_request();
        let location = self.location();
        let upload_id = self.upload_id.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(err) = request.send().await {
                        warn_abort_failed(&location, &upload_id, &err);
                    }
                });
            }
            Err(_) => tracing::warn!(
                location = %location,
                upload_id = %upload_id,
                "an unfinished multipart upload could not be aborted (no runtime); \
                 its parts stay in the bucket until a lifecycle rule removes them"
            ),
        }
    }
}

fn warn_abort_failed(location: &str, upload_id: &str, err: &(dyn std::error::Error + 'static)) {
    tracing::warn!(
        location = %location,
        upload_id = %upload_id,
        error = %DisplayErrorContext(err),
        "aborting a failed multipart upload failed; nothing is visible under the key, \
         but its parts stay in the bucket until a lifecycle rule removes them"
    );
}

/// A [`BlobError::Backend`] with the SDK error's whole context (service error
/// code and message, or the connection failure).
fn sdk_error<E, R>(doing: impl fmt::Display, err: &SdkError<E, R>) -> BlobError
where
    E: std::error::Error + 'static,
    R: fmt::Debug,
{
    BlobError::Backend(format!("{doing}: {}", DisplayErrorContext(err)))
}

/// Whether the service said the object (or bucket, for bucket calls) does
/// not exist. A missing bucket on an object call is not "not found": that is
/// a misconfiguration the operator must see.
fn is_not_found<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> bool
where
    E: ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(service) => match service.err().code() {
            Some("NoSuchBucket") => false,
            Some("NoSuchKey" | "NotFound") => true,
            // HEAD responses have no body, hence no code: the status says it.
            _ => service.raw().status().as_u16() == 404,
        },
        _ => false,
    }
}

impl S3BlobStore {
    /// Both puts: `body` (hashing or not) into a `PutObject` or a
    /// multipart upload (see [`BlobStore::put`] of this adapter). A body
    /// whose length is known up front streams into one `PutObject` as it
    /// arrives.
    async fn write(
        &self,
        key: &BlobKey,
        mut body: HashingLimited,
    ) -> Result<StoredBlob, BlobError> {
        if let Some(length) = body.length().exact().filter(|&n| n <= MAX_PUT_OBJECT) {
            return self.put_streamed(key, body, length).await;
        }
        let mut multipart: Option<MultipartUpload> = None;
        let read = self.send_parts(key, &mut body, &mut multipart).await;

        match (read, multipart) {
            (Ok(last), None) => self.put_single(key, last.freeze()).await?,
            (Ok(last), Some(mut upload)) => {
                if last.len() > 0 {
                    let sent = match upload.send_part(last.freeze()) {
                        Ok(part) => part.request.await,
                        Err(err) => Err(err),
                    };
                    match sent {
                        Ok(part) => upload.parts.push(part),
                        Err(err) => {
                            upload.abort().await;
                            return Err(err);
                        }
                    }
                }
                upload.complete().await?;
            }
            (Err(err), None) => return Err(err),
            // Over the limit, a failed client stream or a failed part: abort,
            // so the parts sent so far vanish and nothing appears under the key.
            (Err(err), Some(upload)) => {
                upload.abort().await;
                return Err(err);
            }
        }
        Ok(body.finish())
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    /// Streams the body into a `PutObject` (at most one part) or a multipart
    /// upload (see the module docs for memory and pipelining).
    ///
    /// Bodies are sent with `UNSIGNED-PAYLOAD`: SigV4 still signs the
    /// request, but not a SHA-256 of its body, which would be a second pass
    /// over every byte here and a third on the server, on top of our own
    /// SHA-256 of the upload. That is sound over TLS (the record layer
    /// authenticates every byte, which is what AWS and every remote endpoint
    /// use) and on a trusted network; an `http://` endpoint is meant to be a
    /// local development or test server, because over plain HTTP the
    /// documents themselves would travel readable, signed or not. No
    /// CRC32/CRC64 checksum header is sent either: it would add nothing TLS
    /// does not already give on the way, composite part checksums must be
    /// declared on `CreateMultipartUpload` and repeated on completion (more
    /// requests' worth of state, and support varies among S3-compatible
    /// servers), and the content check that counts end to end is our own
    /// SHA-256, recorded in the log and computed over every byte received.
    async fn put_sized(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<StoredBlob, BlobError> {
        self.write(key, hashing_limited(body, length)).await
    }

    async fn put_unhashed(
        &self,
        key: &BlobKey,
        body: ByteStream,
        length: BodyLength,
    ) -> Result<u64, BlobError> {
        Ok(self.write(key, limited(body, length)).await?.size)
    }

    async fn get(&self, key: &BlobKey) -> Result<BlobObject, BlobError> {
        let output = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.object_key(key.as_str()))
            .send()
            .await
        {
            Ok(output) => output,
            Err(err) if is_not_found(&err) => return Err(BlobError::NotFound),
            Err(err) => {
                return Err(sdk_error(
                    format!("downloading {}", self.location(key.as_str())),
                    &err,
                ));
            }
        };
        let size = output
            .content_length
            .and_then(|len| u64::try_from(len).ok())
            .ok_or_else(|| {
                BlobError::Backend(format!(
                    "downloading {}: the server sent no valid Content-Length",
                    self.location(key.as_str())
                ))
            })?;
        // Pass the SDK's body through chunk by chunk; it is never collected.
        let body = futures::stream::try_unfold(output.body, |mut body| async move {
            let next = body.try_next().await.map_err(io::Error::from)?;
            Ok(next.map(|chunk| (chunk, body)))
        });
        Ok(BlobObject {
            size,
            body: Box::pin(body),
        })
    }

    async fn delete(&self, key: &BlobKey) -> Result<(), BlobError> {
        // S3 answers 204 for an absent key too; some compatible servers say
        // NoSuchKey instead, which is just as fine here.
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.object_key(key.as_str()))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(err) => Err(sdk_error(
                format!("deleting {}", self.location(key.as_str())),
                &err,
            )),
        }
    }

    async fn exists(&self, key: &BlobKey) -> Result<bool, BlobError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(self.object_key(key.as_str()))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if is_not_found(&err) => Ok(false),
            Err(err) => Err(sdk_error(
                format!("looking up {}", self.location(key.as_str())),
                &err,
            )),
        }
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BlobListStream<'a> {
        let full_prefix = self.object_key(prefix);
        let pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&full_prefix)
            .into_paginator()
            .send();
        // One page (at most 1000 keys) at a time: the next page is asked for
        // only when this one has been consumed.
        let pages = futures::stream::unfold(pages, |mut pages| async move {
            pages.next().await.map(|page| (page, pages))
        });
        Box::pin(
            pages
                .map(move |page| {
                    let objects = match page {
                        Ok(page) => page
                            .contents
                            .unwrap_or_default()
                            .into_iter()
                            .filter_map(|object| self.listing(object))
                            .map(Ok)
                            .collect::<Vec<_>>(),
                        Err(err) => vec![Err(sdk_error(
                            format!("listing s3://{}/{full_prefix}", self.bucket),
                            &err,
                        ))],
                    };
                    futures::stream::iter(objects)
                })
                .flatten(),
        )
    }

    async fn check(&self) -> Result<(), BlobError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|err| sdk_error(format!("reaching {}", self.described), &err))?;
        Ok(())
    }

    fn describe(&self) -> String {
        self.described.clone()
    }
}
