//! Receiving a multipart upload: the `file` part streams straight into the
//! blob store through the application's upload path (hashed as it goes,
//! stopped at the size limit); the other parts are small text fields
//! collected on the side.
//!
//! The parts may come in any order, so the blob is written before the form is
//! known to be valid; [`ReceivedForm::discard`] removes it again when the form
//! is refused before its command is sent. Once the command is sent, what
//! becomes of the blob is the upload path's decision
//! ([`dossier_application::BlobFate`]), not the edge's.

use std::collections::HashMap;

use axum::extract::Multipart;
use axum::extract::multipart::Field;
use bytes::Bytes;
use dossier_application::{StoredUpload, Uploads};
use dossier_blobstore::ByteStream;
use dossier_domain::{BlobKey, ContentType, FileName};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;

/// Text fields are names, ids and flags: anything larger is not one of ours.
const MAX_TEXT_FIELD_BYTES: usize = 64 * 1024;

/// A received form: the stored file (if the form had one) and the text fields.
pub struct ReceivedForm {
    pub file: Option<StoredUpload>,
    pub fields: HashMap<String, String>,
}

impl ReceivedForm {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// Removes the stored blob of a form refused before its command was sent.
    pub async fn discard(&self, uploads: &Uploads) {
        if let Some(file) = &self.file {
            uploads.discard(file).await;
        }
    }
}

/// Reads the whole form, streaming its `file` part to `key`.
pub async fn receive(
    multipart: &mut Multipart,
    uploads: &Uploads,
    key: BlobKey,
    max_bytes: u64,
) -> Result<ReceivedForm, ApiError> {
    receive_unless(multipart, uploads, key, max_bytes, None).await
}

/// Like [`receive`], but a form that has a `file` part is refused with
/// `refuse_file` (when given) before a byte of it is stored.
pub async fn receive_unless(
    multipart: &mut Multipart,
    uploads: &Uploads,
    key: BlobKey,
    max_bytes: u64,
    refuse_file: Option<ApiError>,
) -> Result<ReceivedForm, ApiError> {
    let mut form = ReceivedForm {
        file: None,
        fields: HashMap::new(),
    };
    let outcome = read_parts(multipart, uploads, &key, max_bytes, refuse_file, &mut form).await;
    if let Err(error) = outcome {
        form.discard(uploads).await;
        return Err(error);
    }
    Ok(form)
}

async fn read_parts(
    multipart: &mut Multipart,
    uploads: &Uploads,
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
            form.file = Some(store_file(field, uploads, key, max_bytes).await?);
        } else {
            let text = read_text(field, &name).await?;
            form.fields.insert(name, text);
        }
    }
    Ok(())
}

async fn store_file(
    mut field: Field<'_>,
    uploads: &Uploads,
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
    let (stored, ()) = tokio::join!(
        uploads.store(key.clone(), file_name, content_type, body, max_bytes),
        pump
    );
    Ok(stored?)
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
