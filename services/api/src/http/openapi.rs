//! `GET /openapi.json`: the OpenAPI 3.1 document, generated from the handlers'
//! annotations and the response types, so it cannot drift from the code.
//!
//! The document is exact (scripts/schemathesis.sh holds it to the running
//! API with every check on): each operation names every status it can answer,
//! its parameters and bodies carry the constraints the handlers enforce, and
//! ids link the answers that return them to the operations that take them.
//! What every operation shares is added once, by [`EveryOperation`]: the
//! bearer security requirement, and the answers any authenticated request
//! can get (401 without a valid token, 403 for a role that may not use it,
//! 503 when a backing service is down), plus 409 `conflict` for commands,
//! which can lose a race for their aggregate past the retry policy.
//! The [`schemas`] module describes the values the edge parses (ids, names,
//! times, cursors) the way the parsers accept them.

use axum::Json;
use utoipa::openapi::link::LinkBuilder;
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::error::ErrorBody;
use crate::http::bundles;
use crate::http::{audit, customers, events, files, portal, tasks};

#[derive(OpenApi)]
#[openapi(
    info(title = "Dossier", description = "Every customer's documents, event sourced. See CONTRACT.md."),
    paths(
        files::upload_file,
        files::list_files,
        files::get_file,
        files::file_content,
        files::edit_file,
        files::sign_file,
        files::delete_file,
        files::delete_files,
        bundles::request_bundle,
        bundles::bundle_status,
        bundles::bundle_content,
        audit::list_audit,
        events::list_events,
        portal::list_portal_files,
        portal::portal_file_content,
        tasks::create_task,
        tasks::list_tasks,
        tasks::list_portal_tasks,
        tasks::put_settings,
        tasks::upload_attachment,
        tasks::post_message,
        tasks::post_staff_message,
        customers::list_customers,
        customers::erase_customer,
    ),
    components(schemas(ErrorBody, schemas::CustomerIdText, schemas::ContractIdText,
        schemas::DisplayNameText, schemas::TaskTitleText, schemas::MessageTextText,
        schemas::VisibilityText, schemas::OriginText, schemas::TimeOrDate, schemas::CursorText,
        schemas::AuditCursorText, schemas::CustomerPrefixText, schemas::CustomerCursorText, schemas::Confirm, schemas::DeleteStatus, schemas::BundleStatusText,
        tasks::MessageForm, files::UploadForm, tasks::AttachmentForm)),
    modifiers(&EveryOperation),
    security(("bearer" = [])),
    tags((name = "files", description = "Staff file endpoints"), (name = "portal", description = "The customer portal"),
        (name = "audit", description = "Audit trail and the raw event log"),
        (name = "bundles", description = "Many files as one ZIP download"),
        (name = "tasks", description = "Tasks of a customer"), (name = "customers", description = "The customers of a tenant"), (name = "settings", description = "Tenant settings"))
)]
pub struct ApiDoc;

/// The name of the security scheme every operation requires.
const BEARER: &str = "bearer";

/// Adds what every operation shares (see the module header).
struct EveryOperation;

impl Modify for EveryOperation {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "`Authorization: Bearer <JWT>` (HS256); the scheme name is case-insensitive",
                    ))
                    .build(),
            ),
        );
        for item in openapi.paths.paths.values_mut() {
            let commands = [
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in commands.into_iter().flatten() {
                shared_answers(operation, true);
                idempotency_key(operation);
                link_files(operation);
            }
            if let Some(operation) = item.get.as_mut() {
                shared_answers(operation, false);
                link_files(operation);
            }
        }
    }
}

/// Every operation that takes a file's id, and the parameter it takes it in.
const TAKES_A_FILE_ID: [(&str, &str); 6] = [
    ("GetFile", "get_file"),
    ("GetFileContent", "file_content"),
    ("EditFile", "edit_file"),
    ("SignFile", "sign_file"),
    ("DeleteFile", "delete_file"),
    ("GetPortalFileContent", "portal_file_content"),
];

/// Links every answer that is one File to the operations that take its id,
/// and to its customer's list.
fn link_files(operation: &mut Operation) {
    let file = Ref::from_schema_name("File");
    for (status, response) in operation.responses.responses.iter_mut() {
        let RefOr::T(response) = response else {
            continue;
        };
        let is_file = status.starts_with('2')
            && response.content.get("application/json").is_some_and(|content| {
                matches!(content, RefOr::T(c) if matches!(&c.schema, Some(RefOr::Ref(r)) if r == &file))
            });
        if !is_file {
            continue;
        }
        for (name, operation_id) in TAKES_A_FILE_ID {
            response.links.insert(
                name.to_owned(),
                RefOr::T(
                    LinkBuilder::new()
                        .operation_id(operation_id)
                        .parameter("id", "$response.body#/id")
                        .build(),
                ),
            );
        }
        response.links.insert(
            "ListFiles".to_owned(),
            RefOr::T(
                LinkBuilder::new()
                    .operation_id("list_files")
                    .parameter("customer_id", "$response.body#/customer_id")
                    .build(),
            ),
        );
    }
}

/// Every command takes an `Idempotency-Key` (CONTRACT.md "Idempotent
/// requests", ADR 0017), and may answer what it implies.
fn idempotency_key(operation: &mut Operation) {
    use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    let parameter = ParameterBuilder::new()
        .name("Idempotency-Key")
        .parameter_in(ParameterIn::Header)
        .required(utoipa::openapi::Required::False)
        .description(Some(
            "1 to 255 visible ASCII characters. The same key from the same tenant and user \
             within 24 hours has one effect: a repeat gets the first answer again (status and \
             body); while the first is still running, 409 conflict with Retry-After; with a \
             different request (path, body or file), 422 idempotency_key_reused.",
        ))
        .schema(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(255))
                .pattern(Some("^[!-~]{1,255}$")),
        ))
        .build();
    operation
        .parameters
        .get_or_insert_with(Vec::new)
        .push(RefOr::T(parameter));
    const REUSED: &str = "idempotency_key_reused: the Idempotency-Key was used for a different request; \
        validation_failed: a malformed Idempotency-Key";
    match operation.responses.responses.get_mut("422") {
        Some(RefOr::T(response)) => {
            response.description = format!("{}; or {REUSED}", response.description);
        }
        _ => {
            operation
                .responses
                .responses
                .insert("422".to_owned(), error_response(REUSED));
        }
    }
}

fn shared_answers(operation: &mut Operation, command: bool) {
    operation.security = Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
    let mut shared = vec![
        (
            "401",
            "unauthorized: no token, a bad signature, or an expired token",
        ),
        (
            "403",
            "forbidden: the token's role may not use this endpoint",
        ),
        (
            "503",
            "unavailable: a backing service is down; nothing was recorded, try again",
        ),
    ];
    if command {
        shared.push((
            "409",
            "conflict: a concurrent change won the race and this one could not be retried; \
             or the first request with this Idempotency-Key is still running (Retry-After)",
        ));
    }
    for (status, description) in shared {
        operation
            .responses
            .responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description));
    }
}

/// A response with the contract's error body.
pub fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Error")))
                    .build(),
            )
            .build(),
    )
}

pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The values the edge parses, described as its parsers accept them. Each
/// type here only describes (it is never built): the parsing lives in the
/// domain's value types and [`crate::http::params`].
#[allow(dead_code)]
pub mod schemas {
    use utoipa::ToSchema;
    use utoipa::openapi::RefOr;
    use utoipa::openapi::schema::{
        KnownFormat, ObjectBuilder, OneOfBuilder, Schema, SchemaFormat, Type,
    };

    /// A customer id: 1 to 128 letters, digits and `. _ - : @`, not `.` or `..`
    /// (`dossier_domain::CustomerId`).
    #[derive(ToSchema)]
    #[schema(
        as = CustomerId,
        pattern = r"^(?!\.\.?$)[A-Za-z0-9._:@-]{1,128}$",
        example = "cust-42"
    )]
    pub struct CustomerIdText(String);

    /// A contract id, with the same characters as a customer id
    /// (`dossier_domain::ContractId`).
    #[derive(ToSchema)]
    #[schema(as = ContractId, pattern = r"^(?!\.\.?$)[A-Za-z0-9._:@-]{1,128}$")]
    pub struct ContractIdText(String);

    /// A display name: 1 to 255 characters once surrounding white space is
    /// trimmed, no control characters (`dossier_domain::DisplayName`).
    #[derive(ToSchema)]
    #[schema(
        as = DisplayName,
        max_length = 255,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\t-\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        example = "Invoice November 2025"
    )]
    pub struct DisplayNameText(String);

    /// A task title: 1 to 200 characters once trimmed, no control characters.
    #[derive(ToSchema)]
    #[schema(
        as = TaskTitle,
        max_length = 200,
        pattern = r"^[^\x00-\x1F\x7F-\x9F]*[^\t-\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F][^\x00-\x1F\x7F-\x9F]*$",
        example = "Send your bank statements"
    )]
    pub struct TaskTitleText(String);

    /// A message: 1 to 10,000 characters once trimmed; line breaks and tabs,
    /// but no other control characters (`dossier_domain::MessageText`).
    #[derive(ToSchema)]
    #[schema(
        as = MessageText,
        max_length = 10000,
        pattern = r"^[^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*[^\t-\r \x85\xA0\u1680\u2000-\u200A\u2028\u2029\u202F\u205F\u3000\x00-\x1F\x7F-\x9F][^\x00-\x08\x0B\x0C\x0E-\x1F\x7F-\x9F]*$",
        example = "Here is the signed form"
    )]
    pub struct MessageTextText(String);

    /// Where a bundle stands.
    #[derive(ToSchema, serde::Serialize)]
    #[schema(as = BundleStatus)]
    #[serde(rename_all = "snake_case")]
    pub enum BundleStatusText {
        Pending,
        Ready,
        Failed,
    }

    /// Who can see a file.
    #[derive(ToSchema, serde::Serialize)]
    #[schema(as = Visibility)]
    #[serde(rename_all = "snake_case")]
    pub enum VisibilityText {
        Internal,
        Portal,
        PortalAndMoving,
    }

    /// Where a file came from.
    #[derive(ToSchema, serde::Serialize)]
    #[schema(as = Origin)]
    #[serde(rename_all = "snake_case")]
    pub enum OriginText {
        StaffUpload,
        CustomerUpload,
        Contract,
        Product,
        System,
    }

    /// An RFC 3339 time, or a plain `YYYY-MM-DD` date (a whole day, UTC).
    pub struct TimeOrDate;

    impl utoipa::PartialSchema for TimeOrDate {
        fn schema() -> RefOr<Schema> {
            let string = |format| {
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(format)))
                    .build()
            };
            OneOfBuilder::new()
                .item(string(KnownFormat::DateTime))
                .item(string(KnownFormat::Date))
                .description(Some(
                    "An RFC 3339 time, or a plain YYYY-MM-DD date (a whole day, UTC)",
                ))
                .into()
        }
    }

    impl ToSchema for TimeOrDate {}

    /// `true`, the only value a delete accepts (`confirmation_required` otherwise).
    pub struct Confirm;

    impl utoipa::PartialSchema for Confirm {
        fn schema() -> RefOr<Schema> {
            ObjectBuilder::new()
                .schema_type(Type::Boolean)
                .enum_values(Some([true]))
                .into()
        }
    }

    impl ToSchema for Confirm {}

    /// What became of one id of a bulk delete: deleted; protected (a system
    /// or product file, kept); not found; or unavailable (a backing service
    /// failed for it: not deleted, try again).
    #[derive(ToSchema, serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    pub enum DeleteStatus {
        Deleted,
        Protected,
        NotFound,
        Unavailable,
    }

    /// The opaque cursor of a list kept newest first, exactly as the API
    /// gives it out in `next_cursor` (`dossier_projections::cursor`).
    #[derive(ToSchema)]
    #[schema(as = Cursor, pattern = r"^AQ[A-P][A-Za-z0-9_-]{30}[AQgw]$")]
    pub struct CursorText(String);

    /// The start of a customer id (`q` of the customers list): 1 to 128 of the
    /// characters of a customer id, each standing for itself
    /// (`dossier_domain::CustomerIdPrefix`).
    #[derive(ToSchema)]
    #[schema(as = CustomerIdPrefix, pattern = r"^[A-Za-z0-9._:@-]{1,128}$", example = "cust-4")]
    pub struct CustomerPrefixText(String);

    /// The opaque cursor of the customers list, exactly as the API gives it
    /// out in `next_cursor` (`dossier_projections::cursor::ActivityCursor`).
    #[derive(ToSchema)]
    #[schema(
        as = CustomerCursor,
        pattern = r"^c(0|[1-9][0-9]{0,16})_(?!\.\.?$)[A-Za-z0-9._:@-]{1,128}$"
    )]
    pub struct CustomerCursorText(String);

    /// The cursor of the audit trail, exactly as the API gives it out.
    #[derive(ToSchema)]
    #[schema(as = AuditCursor, pattern = r"^p[1-9][0-9]{0,17}$")]
    pub struct AuditCursorText(String);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_requires_the_bearer_token_and_documents_the_shared_answers() {
        let doc = ApiDoc::openapi();
        let mut operations = 0;
        for (path, item) in &doc.paths.paths {
            for (operation, command) in [
                (&item.get, false),
                (&item.post, true),
                (&item.put, true),
                (&item.patch, true),
                (&item.delete, true),
            ] {
                let Some(operation) = operation else { continue };
                operations += 1;
                let security = operation.security.as_ref().expect("security");
                assert_eq!(security.len(), 1, "{path}");
                let mut expected = vec!["401", "403", "503"];
                if command {
                    expected.push("409");
                }
                for status in expected {
                    assert!(
                        operation.responses.responses.contains_key(status),
                        "{path} documents {status}"
                    );
                }
            }
        }
        assert_eq!(operations, 24);
    }

    #[test]
    fn the_erasure_of_a_customer_is_documented_with_its_answers() {
        let doc = ApiDoc::openapi();
        let erasure = doc.paths.paths["/v1/customers/{customer_id}/erasure"]
            .post
            .as_ref()
            .expect("POST");
        for status in ["202", "422", "403"] {
            assert!(erasure.responses.responses.contains_key(status), "{status}");
        }
        assert!(erasure.request_body.is_some());
        let schemas = &doc.components.as_ref().unwrap().schemas;
        assert!(schemas.contains_key("Erasure") && schemas.contains_key("EraseCustomer"));
    }
}
