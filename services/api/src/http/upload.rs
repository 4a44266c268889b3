//! Receiving a multipart upload: the `file` part streams straight into the
//! blob store (hashed as it goes, stopped at the size limit); the other parts
//! are small text fields collected on the side.
//!
//! The parts may come in any order, so the blob is written before the form is
//! known to be valid; [`ReceivedForm::discard`] removes it again when the
//! command is refused, so that nothing is left behind without its event.

use std::collections::HashMap;

use axum::extract::Multipart;
use axum::extract::multipart::Field;
use bytes::Bytes;
use dossier_blobstore::{BlobStore, ByteStream};
use dossier_domain::{BlobKey, ContentType, FileName, Sha256Hex};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;

/// Text fields are names, ids and flags: anything larger is not one of ours.
const MAX_TEXT_FIELD_BYTES: usize = 64 * 1024;

/// The stored `file` part.
#[derive(Debug, Clone)]
pub struct StoredUpload {
    pub key: BlobKey,
    pub file_name: FileName,
    pub content_type: ContentType,
    pub size: u64,
    pub sha256: Sha256Hex,
}

/// How a stored upload is to be recorded: everything the form or the route
/// decides besides the bytes.
pub struct Recording {
    pub tenant: dossier_domain::TenantId,
    pub file_id: dossier_domain::FileId,
    pub customer_id: dossier_domain::CustomerId,
    pub name: dossier_domain::DisplayName,
    pub visibility: dossier_domain::Visibility,
    pub origin: dossier_domain::Origin,
    pub contract_id: Option<dossier_domain::ContractId>,
    pub task_id: Option<uuid::Uuid>,
}

impl StoredUpload {
    /// The command that records these bytes as a file, now.
    pub fn into_command(self, recording: Recording) -> dossier_domain::FileCommand {
        dossier_domain::FileCommand::Upload(Box::new(dossier_domain::UploadFile {
            tenant: recording.tenant,
            file_id: recording.file_id,
            customer_id: recording.customer_id,
            name: recording.name,
            file_name: self.file_name,
            content_type: self.content_type,
            size: self.size,
            sha256: self.sha256,
            blob_key: self.key,
            visibility: recording.visibility,
            origin: recording.origin,
            contract_id: recording.contract_id,
            task_id: recording.task_id,
            at: chrono::Utc::now(),
        }))
    }
}

/// A received form: the stored file (if the form had one) and the text fields.
pub struct ReceivedForm {
    pub file: Option<StoredUpload>,
    pub fields: HashMap<String, String>,
}

impl ReceivedForm {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// Removes the stored blob of a form whose command was refused. A failure
    /// here leaves an orphan that the blob sweep removes later.
    pub async fn discard(&self, blobs: &dyn BlobStore) {
        if let Some(file) = &self.file
            && let Err(error) = blobs.delete(&file.key).await
        {
            tracing::warn!(key = %file.key, %error, "could not remove the blob of a refused upload; the orphan sweep will");
        }
    }
}

/// Reads the whole form, streaming its `file` part to `key`.
pub async fn receive(
    multipart: &mut Multipart,
    blobs: &dyn BlobStore,
    key: BlobKey,
    max_bytes: u64,
) -> Result<ReceivedForm, ApiError> {
    receive_unless(multipart, blobs, key, max_bytes, None).await
}

/// Like [`receive`], but a form that has a `file` part is refused with
/// `refuse_file` (when given) before a byte of it is stored.
pub async fn receive_unless(
    multipart: &mut Multipart,
    blobs: &dyn BlobStore,
    key: BlobKey,
    max_bytes: u64,
    refuse_file: Option<ApiError>,
) -> Result<ReceivedForm, ApiError> {
    let mut form = ReceivedForm {
        file: None,
        fields: HashMap::new(),
    };
    let outcome = read_parts(multipart, blobs, &key, max_bytes, refuse_file, &mut form).await;
    if let Err(error) = outcome {
        form.discard(blobs).await;
        return Err(error);
    }
    Ok(form)
}

async fn read_parts(
    multipart: &mut Multipart,
    blobs: &dyn BlobStore,
    key: &BlobKey,
    max_bytes: u64,
    mut refuse_file: Option<ApiError>,
    form: &mut ReceivedForm,
) -> Result<(), ApiError> {
    while let Some(field) = multipart.next_field().await.map_err(malformed)? {
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            if let Some(refusal) = refuse_file.take() {
                return Err(refusal);
            }
            if form.file.is_some() {
                return Err(ApiError::validation("file", "send exactly one file part"));
            }
            form.file = Some(store_file(field, blobs, key, max_bytes).await?);
        } else {
            let text = read_text(field, &name).await?;
            form.fields.insert(name, text);
        }
    }
    Ok(())
}

async fn store_file(
    mut field: Field<'_>,
    blobs: &dyn BlobStore,
    key: &BlobKey,
    max_bytes: u64,
) -> Result<StoredUpload, ApiError> {
    let file_name = FileName::parse(field.file_name().unwrap_or_default())
        .map_err(|_| ApiError::validation("file", "the file part needs a file name"))?;
    let content_type = ContentType::parse(field.content_type())?;

    // The blob store wants an owned stream; the field borrows the request. A
    // channel of one joins the two inside this task (so a longer one would
    // buy no parallelism). The chunks are slices of the multipart parser's
    // buffer, passed on without a copy; the store copies each into its part
    // buffer at once. Every chunk still waiting keeps a parser buffer alive,
    // and the parser allocates a new one while it does: with 32 uploads at
    // once, a channel of four cost about 40 MiB more peak RSS than one.
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let body: ByteStream = Box::pin(ReceiverStream::new(rx));
    let pump = async move {
        loop {
            let next = field.chunk().await;
            let item = match next {
                Ok(Some(chunk)) => Ok(chunk),
                Ok(None) => break,
                Err(error) => Err(std::io::Error::other(error.to_string())),
            };
            let failed = item.is_err();
            // The store stops reading when the limit is passed: stop pumping then.
            if tx.send(item).await.is_err() || failed {
                break;
            }
        }
    };
    let (stored, ()) = tokio::join!(blobs.put(key, body, max_bytes), pump);
    let stored = stored?;
    let sha256 = Sha256Hex::parse(&stored.sha256)
        .map_err(|_| ApiError::Internal("the blob store returned a malformed digest".into()))?;
    Ok(StoredUpload {
        key: key.clone(),
        file_name,
        content_type,
        size: stored.size,
        sha256,
    })
}

async fn read_text(mut field: Field<'_>, name: &str) -> Result<String, ApiError> {
    let mut buffer = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(malformed)? {
        if buffer.len() + chunk.len() > MAX_TEXT_FIELD_BYTES {
            return Err(ApiError::validation(
                "body",
                format!("the form field `{name}` is longer than {MAX_TEXT_FIELD_BYTES} bytes"),
            ));
        }
        buffer.extend_from_slice(&chunk);
    }
    String::from_utf8(buffer)
        .map_err(|_| ApiError::validation("body", format!("the form field `{name}` is not UTF-8")))
}

fn malformed(error: axum::extract::multipart::MultipartError) -> ApiError {
    ApiError::validation(
        "body",
        format!("malformed multipart body: {}", error.body_text()),
    )
}
