//! Value types parsed at the edge (HTTP, AMQP, command line).
//!
//! Parse, don't validate: once a raw string became one of these types it is
//! known to be well formed, so the aggregates never re-check it. Each parser
//! answers a [`ValidationError`] naming the field, which the edges map to the
//! contract's `validation_failed`.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A field that is missing or malformed. `field` is the contract's field name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: &'static str,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// Identifier characters allowed in ids that end up in blob keys: letters,
/// digits and `. _ - : @`, never a path separator, never `.` or `..` alone.
/// Whether `c` may appear in an identifier: an ASCII letter or digit, or one of
/// `. _ - : @`.
fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')
}

fn check_identifier(field: &'static str, raw: &str, max: usize) -> Result<(), ValidationError> {
    if raw.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if raw.len() > max {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    if raw == "." || raw == ".." {
        return Err(ValidationError::new(field, "must not be `.` or `..`"));
    }
    if let Some(c) = raw.chars().find(|&c| !is_identifier_char(c)) {
        return Err(ValidationError::new(
            field,
            format!("may only contain letters, digits and . _ - : @ (found {c:?})"),
        ));
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_newtype!(
    /// A tenant (service provider). Every piece of data belongs to exactly one.
    TenantId
);
string_newtype!(
    /// A tenant's customer, identified by a string chosen upstream.
    CustomerId
);
string_newtype!(
    /// The title a person gives a file ("Invoice November 2025"). Duplicates allowed.
    DisplayName
);
string_newtype!(
    /// The original file name on the uploader's computer ("invoice_11.pdf").
    FileName
);
string_newtype!(
    /// The declared content type, recorded as given ("application/pdf").
    ContentType
);
string_newtype!(
    /// A contract this file belongs to, an id chosen upstream.
    ContractId
);
string_newtype!(
    /// Where a file's bytes live in the blob store: `{tenant}/{customer}/{file_id}`.
    /// Never derived from a user-supplied name.
    BlobKey
);
string_newtype!(
    /// Who did something: a user id from a token, or an upstream system's name.
    Actor
);

impl TenantId {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        check_identifier("tenant", raw, 64)?;
        Ok(Self(raw.to_owned()))
    }
}

impl CustomerId {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        check_identifier("customer_id", raw, 128)?;
        Ok(Self(raw.to_owned()))
    }
}

/// The start of a customer id, as a search for customers takes it (`q` of
/// `GET /v1/customers`): 1 to 128 of the characters a [`CustomerId`] is made of.
/// Every character stands for itself: `_` and `.` are no wildcards, and `%`
/// or `*` are no customer id's characters at all, so they are refused.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CustomerIdPrefix(String);

impl CustomerIdPrefix {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.is_empty() || raw.len() > 128 {
            return Err(ValidationError::new(
                "q",
                "must be 1 to 128 characters of a customer id",
            ));
        }
        if let Some(c) = raw.chars().find(|&c| !is_identifier_char(c)) {
            return Err(ValidationError::new(
                "q",
                format!("may only contain letters, digits and . _ - : @ (found {c:?})"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `customer` starts with this prefix.
    pub fn matches(&self, customer: &CustomerId) -> bool {
        customer.as_str().starts_with(&self.0)
    }
}

impl ContractId {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        check_identifier("contract_id", raw, 128)?;
        Ok(Self(raw.to_owned()))
    }
}

impl DisplayName {
    pub const MAX_CHARS: usize = 255;

    /// Trims surrounding white space; refuses empty, over-long or control characters.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(ValidationError::new("name", "must not be empty"));
        }
        if name.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "name",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        if has_control(name) {
            return Err(ValidationError::new(
                "name",
                "must not contain control characters",
            ));
        }
        Ok(Self(name.to_owned()))
    }
}

impl FileName {
    pub const MAX_CHARS: usize = 255;

    /// Keeps only the last path segment (browsers may send `C:\fakepath\a.pdf`),
    /// refuses empty, over-long or control characters.
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let last = raw.rsplit(['/', '\\']).next().unwrap_or(raw).trim();
        if last.is_empty() || last == "." || last == ".." {
            return Err(ValidationError::new("file_name", "must name a file"));
        }
        if last.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "file_name",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        if has_control(last) {
            return Err(ValidationError::new(
                "file_name",
                "must not contain control characters",
            ));
        }
        Ok(Self(last.to_owned()))
    }

    /// The extension with its dot (`.pdf`), if the name has one that is not the
    /// whole name (`.bashrc` has none).
    pub fn extension(&self) -> Option<&str> {
        let dot = self.0.rfind('.')?;
        (dot > 0 && dot + 1 < self.0.len()).then(|| &self.0[dot..])
    }

    /// The name without its extension (`scan.final.pdf` → `scan.final`).
    pub fn stem(&self) -> &str {
        match self.extension() {
            Some(ext) => &self.0[..self.0.len() - ext.len()],
            None => &self.0,
        }
    }
}

impl ContentType {
    const FALLBACK: &'static str = "application/octet-stream";

    /// Accepts any `type/subtype[; params]`; an absent or blank value becomes
    /// `application/octet-stream`.
    pub fn parse(raw: Option<&str>) -> Result<Self, ValidationError> {
        let value = raw.map(str::trim).unwrap_or_default();
        if value.is_empty() {
            return Ok(Self(Self::FALLBACK.to_owned()));
        }
        let essence = value.split(';').next().unwrap_or_default().trim();
        let valid = value.len() <= 255
            && !has_control(value)
            && essence
                .split_once('/')
                .is_some_and(|(t, s)| !t.is_empty() && !s.is_empty() && !s.contains('/'));
        if !valid {
            return Err(ValidationError::new(
                "content_type",
                "must look like type/subtype",
            ));
        }
        Ok(Self(value.to_owned()))
    }

    /// The lower-cased `type/subtype` without parameters.
    pub fn essence(&self) -> String {
        self.0
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    }
}

impl BlobKey {
    /// The key of a file's bytes: built from ids only.
    pub fn for_file(tenant: &TenantId, customer: &CustomerId, file: FileId) -> Self {
        Self(format!("{tenant}/{customer}/{file}"))
    }

    /// The key of a bundle archive: `{tenant}/!bundles/{bundle}.zip`. No
    /// customer id can be [`Self::BUNDLES_SEGMENT`] (`!` is not an identifier
    /// character), so bundle archives and files never share a folder.
    pub fn for_bundle(tenant: &TenantId, bundle: Uuid) -> Self {
        Self(format!("{tenant}/{}/{bundle}.zip", Self::BUNDLES_SEGMENT))
    }

    /// Where [`Self::for_bundle`] wrote archives before: `{tenant}/_bundles/
    /// {bundle}.zip`, a folder a customer called `_bundles` shares. Keys of
    /// this shape stay readable (events record the key they wrote); only
    /// clean-up needs to know it.
    pub fn legacy_bundle(tenant: &TenantId, bundle: Uuid) -> Self {
        Self(format!(
            "{tenant}/{}/{bundle}.zip",
            Self::LEGACY_BUNDLES_SEGMENT
        ))
    }

    /// The second segment of every bundle archive's key.
    pub const BUNDLES_SEGMENT: &'static str = "!bundles";
    /// The second segment of bundle archives written before
    /// [`Self::BUNDLES_SEGMENT`]; also a valid customer id.
    pub const LEGACY_BUNDLES_SEGMENT: &'static str = "_bundles";

    /// Re-reads a key recorded in an event (already built by [`Self::for_file`]).
    pub fn from_recorded(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }
}

impl Actor {
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }
}

/// A file's id: a UUID chosen by the server at upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FileId(pub Uuid);

impl FileId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        Uuid::parse_str(raw)
            .map(Self)
            .map_err(|_| ValidationError::new("file_id", "must be a UUID"))
    }
}

impl Default for FileId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Who can see a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Visibility {
    /// Staff only.
    #[default]
    Internal,
    /// Also the customer, in the portal.
    Portal,
    /// The portal and the moving-process flow.
    PortalAndMoving,
}

impl Visibility {
    pub const ALL: [Visibility; 3] = [Self::Internal, Self::Portal, Self::PortalAndMoving];

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        match raw {
            "internal" => Ok(Self::Internal),
            "portal" => Ok(Self::Portal),
            "portal_and_moving" => Ok(Self::PortalAndMoving),
            _ => Err(ValidationError::new(
                "visibility",
                "must be internal, portal or portal_and_moving",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Portal => "portal",
            Self::PortalAndMoving => "portal_and_moving",
        }
    }

    /// Whether the customer sees the file in the portal.
    pub fn in_portal(self) -> bool {
        !matches!(self, Self::Internal)
    }
}

/// Where a file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    #[default]
    StaffUpload,
    CustomerUpload,
    Contract,
    Product,
    System,
}

impl Origin {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        match raw {
            "staff_upload" => Ok(Self::StaffUpload),
            "customer_upload" => Ok(Self::CustomerUpload),
            "contract" => Ok(Self::Contract),
            "product" => Ok(Self::Product),
            "system" => Ok(Self::System),
            _ => Err(ValidationError::new(
                "origin",
                "must be staff_upload, customer_upload, contract, product or system",
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::StaffUpload => "staff_upload",
            Self::CustomerUpload => "customer_upload",
            Self::Contract => "contract",
            Self::Product => "product",
            Self::System => "system",
        }
    }

    /// Files from the system or a product can never be deleted.
    pub fn is_protected(self) -> bool {
        matches!(self, Self::System | Self::Product)
    }
}

/// A SHA-256 digest as 64 lower-case hex characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Sha256Hex(String);

impl Sha256Hex {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.len() == 64 && raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(ValidationError::new(
                "sha256",
                "must be 64 lower-case hex characters",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sha256Hex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The per-file size limit of a deployment, in bytes (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxFileBytes(pub u64);

impl MaxFileBytes {
    /// 25 MiB, the contract's default.
    pub const DEFAULT: Self = Self(26_214_400);

    pub fn allows(self, size: u64) -> bool {
        size <= self.0
    }
}

impl Default for MaxFileBytes {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customer_id_prefix_is_literal_and_made_of_id_characters() {
        let prefix = CustomerIdPrefix::parse("a_b.").unwrap();
        assert!(prefix.matches(&CustomerId::parse("a_b.c").unwrap()));
        assert!(
            !prefix.matches(&CustomerId::parse("axb.c").unwrap()),
            "_ is no wildcard"
        );
        assert!(
            !prefix.matches(&CustomerId::parse("a_bxc").unwrap()),
            ". is no wildcard"
        );
        assert!(CustomerIdPrefix::parse(".").is_ok(), "the start of `.a`");
        for bad in ["", "a%", "%", "a*", "a b", "a/b", &"a".repeat(129)] {
            assert_eq!(
                CustomerIdPrefix::parse(bad).unwrap_err().field,
                "q",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn identifiers_refuse_path_separators_and_dot_segments() {
        assert!(CustomerId::parse("cust-42").is_ok());
        assert!(CustomerId::parse("a/b").is_err());
        assert!(CustomerId::parse("..").is_err());
        assert!(CustomerId::parse("").is_err());
        assert_eq!(
            TenantId::parse("t 1").unwrap_err().field,
            "tenant",
            "the error names the field"
        );
    }

    #[test]
    fn display_names_are_trimmed_and_bounded() {
        assert_eq!(
            DisplayName::parse("  Invoice November 2025 ")
                .unwrap()
                .as_str(),
            "Invoice November 2025"
        );
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse("a\u{7}b").is_err());
        assert!(DisplayName::parse(&"x".repeat(256)).is_err());
        assert!(DisplayName::parse(&"ü".repeat(255)).is_ok());
    }

    #[test]
    fn file_names_keep_the_last_segment_and_know_their_extension() {
        let name = FileName::parse(r"C:\fakepath\scan.final.PDF").unwrap();
        assert_eq!(name.as_str(), "scan.final.PDF");
        assert_eq!(name.extension(), Some(".PDF"));
        assert_eq!(name.stem(), "scan.final");
        assert_eq!(FileName::parse(".bashrc").unwrap().extension(), None);
        assert_eq!(FileName::parse("README").unwrap().stem(), "README");
        assert_eq!(FileName::parse("trailing.").unwrap().extension(), None);
        assert!(FileName::parse("dir/").is_err());
        assert!(FileName::parse("../..").is_err());
    }

    #[test]
    fn content_types_default_and_validate() {
        assert_eq!(
            ContentType::parse(None).unwrap().as_str(),
            "application/octet-stream"
        );
        assert_eq!(
            ContentType::parse(Some("Text/Plain; charset=utf-8"))
                .unwrap()
                .essence(),
            "text/plain"
        );
        assert!(ContentType::parse(Some("pdf")).is_err());
    }

    #[test]
    fn protected_origins_are_system_and_product() {
        assert!(Origin::System.is_protected());
        assert!(Origin::Product.is_protected());
        assert!(!Origin::StaffUpload.is_protected());
        assert!(!Origin::CustomerUpload.is_protected());
        assert!(!Origin::Contract.is_protected());
    }

    #[test]
    fn the_size_limit_is_inclusive() {
        let limit = MaxFileBytes::DEFAULT;
        assert!(limit.allows(26_214_400));
        assert!(!limit.allows(26_214_401));
        assert!(limit.allows(0));
    }

    #[test]
    fn blob_keys_are_built_from_ids_only() {
        let tenant = TenantId::parse("acme").unwrap();
        assert!(
            CustomerId::parse(BlobKey::BUNDLES_SEGMENT).is_err(),
            "no customer can share the bundles' folder"
        );
        let customer = CustomerId::parse("cust-42").unwrap();
        let id = FileId::new();
        assert_eq!(
            BlobKey::for_file(&tenant, &customer, id).as_str(),
            format!("acme/cust-42/{id}")
        );
    }
}
