//! Receiving a multipart form, for every multipart route: the `file` part
//! streams straight into the blob store through the application's upload
//! path (hashed as it goes, stopped at the size limit); the other parts are
//! small text fields collected on the side.
//!
//! A form is held to what its endpoint names ([`FormSpec`], CONTRACT.md rule
//! 14), by multer (the parser under axum's `Multipart`, used directly for its
//! limits) and by the checks here:
//!
//! - only the fields the endpoint names, each at most once; any other field
//!   is refused when its headers arrive, before a byte of it is read;
//! - at most [`MAX_PARTS`] parts;
//! - text fields of at most [`MAX_TEXT_FIELD_BYTES`] each;
//! - the whole body at most the file limit plus [`FORM_OVERHEAD_BYTES`], so
//!   neither a preamble nor part headers can grow the parser's buffer without
//!   bound.
//!
//! A refused form answers `422 validation_failed` naming the field (`413
//! file_too_large` for a body past its size), and nothing of it stays: the
//! parts may come in any order, so the blob may already be written when a
//! later part is refused, and [`ReceivedForm::discard`] removes it again.
//! Once the command is sent, what becomes of the blob is the upload path's
//! decision ([`dossier_application::BlobFate`]), not the edge's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use axum::http::header::CONTENT_TYPE;
use bytes::Bytes;
use dossier_application::{StoredUpload, Uploads};
use dossier_blobstore::ByteStream;
use dossier_domain::{BlobKey, ContentType, FileName};
use futures::StreamExt as _;
use multer::{Constraints, Multipart, SizeLimit};

use crate::error::{ApiError, AppError};
use crate::http::idempotency::IdempotencyHandle;

/// The name of the part that carries a file's bytes.
pub const FILE_FIELD: &str = "file";

/// The optional field of every form that takes a file: the file's size in
/// bytes, declared before the file part (CONTRACT.md, "Uploads"). A file of
/// a size known up front streams into the store as one request, with no
/// part buffers; one of another size is refused and nothing of it stays.
/// Sent after the file part, it is only checked.
pub const SIZE_FIELD: &str = "size";

/// The most parts a form may have: every endpoint names fewer fields.
pub const MAX_PARTS: usize = 8;

/// Text fields are names, ids, flags and messages: anything larger is not
/// one of ours.
pub const MAX_TEXT_FIELD_BYTES: u64 = 64 * 1024;

/// What a form may carry besides the file's bytes: the text fields
/// ([`MAX_PARTS`] × [`MAX_TEXT_FIELD_BYTES`] is 512 KiB), the parts' headers
/// and boundaries, and what the parser reads ahead of the file's end.
pub const FORM_OVERHEAD_BYTES: u64 = 2 * 1024 * 1024;

/// The fields a multipart endpoint takes.
#[derive(Debug, Clone, Copy)]
pub struct FormSpec {
    /// Its text fields, each at most once.
    pub text_fields: &'static [&'static str],
    /// Whether it takes a [`FILE_FIELD`] part (at most one).
    pub takes_file: bool,
}

impl FormSpec {
    /// The field names the endpoint takes, for messages.
    fn names(&self) -> String {
        let mut names: Vec<&str> = Vec::with_capacity(self.text_fields.len() + 2);
        if self.takes_file {
            names.push(FILE_FIELD);
            names.push(SIZE_FIELD);
        }
        names.extend_from_slice(self.text_fields);
        names
            .iter()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The spec's own (static) name of a text field the form sent.
    fn text_field(&self, name: &str) -> Option<&'static str> {
        if self.takes_file && name == SIZE_FIELD {
            return Some(SIZE_FIELD);
        }
        self.text_fields
            .iter()
            .copied()
            .find(|field| *field == name)
    }

    fn constraints(&self, max_file_bytes: u64) -> Constraints {
        let mut allowed: Vec<&str> = self.text_fields.to_vec();
        let mut limits = SizeLimit::new()
            .whole_stream(max_file_bytes.saturating_add(FORM_OVERHEAD_BYTES))
            .per_field(MAX_TEXT_FIELD_BYTES);
        if self.takes_file {
            allowed.push(FILE_FIELD);
            allowed.push(SIZE_FIELD);
            // The blob store enforces the file limit itself and answers
            // `file_too_large`; the whole-stream limit bounds the rest.
            limits = limits.for_field(FILE_FIELD, u64::MAX);
        }
        Constraints::new()
            .allowed_fields(allowed)
            .size_limit(limits)
    }
}

/// The body of a `multipart/form-data` request, not yet read: the extractor
/// of every multipart route (so it is the last argument of the handler).
/// Reading it is [`receive`]'s job, under the endpoint's [`FormSpec`].
pub struct FormBody {
    boundary: String,
    body: Body,
    /// The request's `Idempotency-Key`, if it has one: the form's content is
    /// part of the request's identity.
    idempotency: Option<IdempotencyHandle>,
}

impl<S: Send + Sync> FromRequest<S> for FormBody {
    type Rejection = ApiError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, ApiError> {
        let boundary = boundary(request.headers()).ok_or_else(|| {
            ApiError::validation(
                "body",
                "expected a multipart/form-data body (Content-Type with a boundary)",
            )
        })?;
        let idempotency = request.extensions().get::<IdempotencyHandle>().cloned();
        Ok(Self {
            boundary,
            body: request.into_body(),
            idempotency,
        })
    }
}

/// A received form: the stored file (if the form had one) and the text fields.
pub struct ReceivedForm {
    pub file: Option<StoredUpload>,
    pub fields: HashMap<&'static str, String>,
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

/// Reads the whole form under `spec`, streaming its `file` part to `key`.
pub async fn receive(
    form: FormBody,
    spec: &FormSpec,
    uploads: &Uploads,
    key: BlobKey,
    max_bytes: u64,
) -> Result<ReceivedForm, ApiError> {
    receive_unless(form, spec, uploads, key, max_bytes, None).await
}

/// Like [`receive`], but a form that has a `file` part is refused with
/// `refuse_file` (when given) before a byte of it is stored.
pub async fn receive_unless(
    form: FormBody,
    spec: &FormSpec,
    uploads: &Uploads,
    key: BlobKey,
    max_bytes: u64,
    refuse_file: Option<ApiError>,
) -> Result<ReceivedForm, ApiError> {
    let mut multipart = Multipart::with_constraints(
        form.body.into_data_stream(),
        form.boundary,
        spec.constraints(max_bytes),
    );
    let mut received = ReceivedForm {
        file: None,
        fields: HashMap::new(),
    };
    let outcome = read_parts(
        &mut multipart,
        spec,
        uploads,
        &key,
        max_bytes,
        refuse_file,
        &mut received,
    )
    .await;
    if let Err(error) = outcome {
        received.discard(uploads).await;
        return Err(error);
    }
    // With an idempotency key, the content is recorded with the key: a
    // repeat must send the same.
    if let Some(idempotency) = &form.idempotency
        && let Err(error) = idempotency
            .content(&received.fields, received.file.as_ref())
            .await
    {
        received.discard(uploads).await;
        return Err(error);
    }
    Ok(received)
}

async fn read_parts(
    multipart: &mut Multipart<'static>,
    spec: &FormSpec,
    uploads: &Uploads,
    key: &BlobKey,
    max_bytes: u64,
    mut refuse_file: Option<ApiError>,
    form: &mut ReceivedForm,
) -> Result<(), ApiError> {
    let mut parts = 0;
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|error| refusal(error, spec, max_bytes))?
    {
        count_part(&mut parts)?;
        // The constraints let only named fields through.
        let name = field.name().unwrap_or_default().to_owned();
        if name == FILE_FIELD {
            if let Some(refusal) = refuse_file.take() {
                return Err(refusal);
            }
            if form.file.is_some() {
                return Err(ApiError::validation("file", "send exactly one file part"));
            }
            let declared = match form.field(SIZE_FIELD) {
                Some(size) => Some(declared_size(size)?),
                None => None,
            };
            form.file = Some(store_file(field, spec, uploads, key, max_bytes, declared).await?);
        } else if let Some(name) = spec.text_field(&name) {
            if form.fields.contains_key(name) {
                return Err(ApiError::validation(name, "is sent more than once"));
            }
            let text = read_text(field, spec, name, max_bytes).await?;
            if name == SIZE_FIELD {
                let declared = declared_size(&text)?;
                // After the file part it is only a check of what arrived.
                if let Some(file) = &form.file
                    && file.size != declared
                {
                    return Err(ApiError::validation(
                        SIZE_FIELD,
                        format!("the file sent has {} bytes, not {declared}", file.size),
                    ));
                }
            }
            form.fields.insert(name, text);
        } else {
            return Err(unknown_field(Some(&name), spec));
        }
    }
    Ok(())
}

/// The content fingerprint of a form read only to be compared with the first
/// request of its `Idempotency-Key` ([`crate::http::idempotency`]): its text
/// fields and its file's name, type and SHA-256, hashed as the file streams
/// by; nothing is stored. Under the limits of every form ([`MAX_PARTS`],
/// [`MAX_TEXT_FIELD_BYTES`], the file limit).
pub async fn form_fingerprint(
    boundary: String,
    body: Body,
    max_bytes: u64,
) -> Result<String, ApiError> {
    use sha2::{Digest as _, Sha256};
    let limits = SizeLimit::new()
        .whole_stream(max_bytes.saturating_add(FORM_OVERHEAD_BYTES))
        .per_field(MAX_TEXT_FIELD_BYTES)
        .for_field(FILE_FIELD, u64::MAX);
    let mut multipart = Multipart::with_constraints(
        body.into_data_stream(),
        boundary,
        Constraints::new().size_limit(limits),
    );
    let any_fields = FormSpec {
        text_fields: &[],
        takes_file: true,
    };
    let refused = |error| refusal(error, &any_fields, max_bytes);
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut file: Option<(String, String, String)> = None;
    let mut parts = 0;
    while let Some(mut field) = multipart.next_field().await.map_err(refused)? {
        count_part(&mut parts)?;
        let name = field.name().unwrap_or_default().to_owned();
        if name == FILE_FIELD {
            let file_name = FileName::parse(field.file_name().unwrap_or_default())
                .map_err(|_| ApiError::validation("file", "the file part needs a file name"))?;
            let content_type = ContentType::parse(field.content_type().map(|mime| mime.as_ref()))?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = field.chunk().await.map_err(refused)? {
                size += chunk.len() as u64;
                if size > max_bytes {
                    return Err(ApiError(AppError::FileTooLarge { limit: max_bytes }));
                }
                hasher.update(&chunk);
            }
            let sha256: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            file = Some((
                file_name.as_str().to_owned(),
                content_type.as_str().to_owned(),
                sha256,
            ));
        } else {
            let text = field.bytes().await.map_err(refused)?;
            let text = String::from_utf8(text.to_vec())
                .map_err(|_| ApiError::validation("body", "a text field is not UTF-8"))?;
            fields.push((name, text));
        }
    }
    Ok(crate::http::idempotency::content_fingerprint(
        fields.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        file.as_ref()
            .map(|(n, t, s)| (n.as_str(), t.as_str(), s.as_str())),
    ))
}

/// The boundary of a `multipart/form-data` request, if it is one.
pub fn boundary(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|content_type| multer::parse_boundary(content_type).ok())
}

/// Counts one more part of a form, refusing the one past [`MAX_PARTS`].
fn count_part(parts: &mut usize) -> Result<(), ApiError> {
    *parts += 1;
    if *parts > MAX_PARTS {
        return Err(ApiError::validation(
            "body",
            format!("a form has at most {MAX_PARTS} parts"),
        ));
    }
    Ok(())
}

/// The value of a [`SIZE_FIELD`]: a byte count in decimal digits.
fn declared_size(text: &str) -> Result<u64, ApiError> {
    let digits = text.trim();
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ApiError::validation(
            SIZE_FIELD,
            "is the file's size in bytes, as decimal digits",
        ));
    }
    digits
        .parse()
        .map_err(|_| ApiError::validation(SIZE_FIELD, "is not a size any file has"))
}

async fn store_file(
    field: multer::Field<'static>,
    spec: &FormSpec,
    uploads: &Uploads,
    key: &BlobKey,
    max_bytes: u64,
    declared: Option<u64>,
) -> Result<StoredUpload, ApiError> {
    let file_name = FileName::parse(field.file_name().unwrap_or_default())
        .map_err(|_| ApiError::validation("file", "the file part needs a file name"))?;
    let content_type = ContentType::parse(field.content_type().map(|mime| mime.as_ref()))?;

    // The part streams into the store as it arrives. When reading it fails
    // (the body stalled, broke off, or broke a limit of the form), the store
    // sees an I/O error and discards what it wrote; the parser's own error is
    // kept aside so the answer says what really happened.
    let failure: Arc<Mutex<Option<multer::Error>>> = Arc::default();
    let seen = Arc::clone(&failure);
    let body: ByteStream = Box::pin(field.map(move |item| {
        item.map_err(|error| {
            let message = error.to_string();
            if let Ok(mut slot) = seen.lock() {
                slot.get_or_insert(error);
            }
            std::io::Error::other(message)
        })
    }));
    let stored = uploads
        .store(
            key.clone(),
            file_name,
            content_type,
            body,
            max_bytes,
            declared,
        )
        .await;
    match stored {
        Ok(stored) => Ok(stored),
        Err(error) => {
            let parser_error = failure.lock().ok().and_then(|mut slot| slot.take());
            Err(match parser_error {
                Some(parser_error) => refusal(parser_error, spec, max_bytes),
                None => ApiError(error),
            })
        }
    }
}

async fn read_text(
    field: multer::Field<'static>,
    spec: &FormSpec,
    name: &'static str,
    max_bytes: u64,
) -> Result<String, ApiError> {
    // The constraints stop the field at MAX_TEXT_FIELD_BYTES.
    let bytes: Bytes = field
        .bytes()
        .await
        .map_err(|error| refusal(error, spec, max_bytes))?;
    String::from_utf8(bytes.to_vec()).map_err(|_| ApiError::validation(name, "is not UTF-8"))
}

/// The answer to a form the parser refused.
fn refusal(error: multer::Error, spec: &FormSpec, max_bytes: u64) -> ApiError {
    match error {
        multer::Error::UnknownField { field_name } => unknown_field(field_name.as_deref(), spec),
        multer::Error::FieldSizeExceeded { limit, field_name } => {
            let field = field_name
                .as_deref()
                .and_then(|name| spec.text_field(name))
                .unwrap_or("body");
            ApiError::validation(field, format!("is longer than {limit} bytes"))
        }
        // Only a body far past the file limit gets here (the text fields are
        // bounded on their own): it is too large, whatever it carries.
        multer::Error::StreamSizeExceeded { .. } => {
            ApiError(AppError::FileTooLarge { limit: max_bytes })
        }
        multer::Error::StreamReadFailed(cause) => ApiError::validation(
            "body",
            format!("the request body broke off before the form was complete: {cause}"),
        ),
        other => ApiError::validation("body", format!("malformed multipart body: {other}")),
    }
}

/// A field the endpoint does not take; its name is the client's text, so it
/// is quoted and shortened.
fn unknown_field(name: Option<&str>, spec: &FormSpec) -> ApiError {
    const SHOWN: usize = 64;
    let named = match name {
        None => "a part without a field name".to_owned(),
        Some(name) if name.chars().count() > SHOWN => {
            let shown: String = name.chars().take(SHOWN).collect();
            format!("the form field {shown:?}…")
        }
        Some(name) => format!("the form field {name:?}"),
    };
    ApiError::validation(
        "body",
        format!(
            "{named} is not one this endpoint takes (it takes {})",
            spec.names()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: FormSpec = FormSpec {
        text_fields: &["name", "visibility"],
        takes_file: true,
    };

    fn message(error: &ApiError) -> String {
        error.0.to_string()
    }

    #[test]
    fn an_unknown_field_is_named_and_shortened() {
        let error = refusal(
            multer::Error::UnknownField {
                field_name: Some("colour".into()),
            },
            &SPEC,
            10,
        );
        assert_eq!(error.code(), "validation_failed");
        assert!(
            message(&error).contains("\"colour\""),
            "{}",
            message(&error)
        );
        assert!(
            message(&error).contains("`file`, `size`, `name`, `visibility`"),
            "{}",
            message(&error)
        );
        let long = "x".repeat(10_000);
        let error = unknown_field(Some(&long), &SPEC);
        assert!(message(&error).len() < 300, "{}", message(&error));
        let error = unknown_field(None, &SPEC);
        assert!(message(&error).contains("without a field name"));
    }

    #[test]
    fn an_oversized_text_field_names_the_field() {
        let error = refusal(
            multer::Error::FieldSizeExceeded {
                limit: MAX_TEXT_FIELD_BYTES,
                field_name: Some("name".into()),
            },
            &SPEC,
            10,
        );
        assert_eq!(error.code(), "validation_failed");
        assert!(message(&error).starts_with("name: "), "{}", message(&error));
    }

    #[test]
    fn a_body_past_the_form_limit_is_too_large() {
        let error = refusal(multer::Error::StreamSizeExceeded { limit: 99 }, &SPEC, 10);
        assert_eq!(error.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
    }
}
