//! What templates show, already in words: the page frame of a signed-in
//! person, and read-model rows turned into the text a person reads (dates,
//! sizes, labels). Templates only place these strings; askama escapes them.

use chrono::{DateTime, Utc};
use dossier_domain::{Origin, Visibility};
use dossier_projections::files::FileView;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::auth::Caller;
use crate::auth::jwt::Role;

/// The frame around every page: who is signed in, and where they can go.
pub struct Chrome {
    pub signed_in: Option<SignedIn>,
    pub nav: Vec<NavLink>,
}

pub struct SignedIn {
    pub user: String,
    pub tenant: String,
    pub role: &'static str,
}

pub struct NavLink {
    pub href: &'static str,
    pub label: &'static str,
    pub current: bool,
}

impl Chrome {
    /// The frame of a page shown to nobody in particular (sign-in, errors).
    pub fn anonymous() -> Self {
        Self {
            signed_in: None,
            nav: Vec::new(),
        }
    }

    /// The frame of `caller`'s page, with `current` (a nav link's href)
    /// marked as where they are.
    pub fn of(caller: &Caller, current: &str) -> Self {
        let links: &[(&'static str, &'static str)] = match caller.role {
            Role::Staff | Role::System => &[
                ("/app", "Customers"),
                ("/app/settings", "Settings"),
                ("/app/audit", "Audit"),
            ],
            Role::Auditor => &[("/app/audit", "Audit")],
            Role::Customer => &[("/portal", "My tasks and documents")],
        };
        Self {
            signed_in: Some(SignedIn {
                user: caller.sub.clone(),
                tenant: caller.tenant.as_str().to_owned(),
                role: caller.role.as_str(),
            }),
            nav: links
                .iter()
                .map(|&(href, label)| NavLink {
                    href,
                    label,
                    current: href == current,
                })
                .collect(),
        }
    }
}

/// What may stay as it is in a query value; everything else is escaped.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/')
    .remove(b':')
    .remove(b'@');

/// `raw` made safe as one value of a URL's query.
pub fn query_value(raw: &str) -> String {
    utf8_percent_encode(raw, QUERY_VALUE).to_string()
}

/// A moment as people read it here: `2026-11-22 10:15 UTC`.
pub fn when(at: DateTime<Utc>) -> String {
    at.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// The machine-readable form for `<time datetime=…>`.
pub fn iso(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A size as people read it: `48.2 KB` (powers of 1,000, like file managers).
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A size limit in the words of the contract's error (`25 MiB (26214400 bytes)`).
pub fn limit(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes.is_multiple_of(MIB) {
        format!("{} MiB ({bytes} bytes)", bytes / MIB)
    } else {
        format!("{bytes} bytes")
    }
}

pub fn visibility_label(visibility: Visibility) -> &'static str {
    match visibility {
        Visibility::Internal => "Internal",
        Visibility::Portal => "Customer portal",
        Visibility::PortalAndMoving => "Portal and moving",
    }
}

pub fn origin_label(origin: Origin) -> &'static str {
    match origin {
        Origin::StaffUpload => "Staff upload",
        Origin::CustomerUpload => "Customer upload",
        Origin::Contract => "Contract",
        Origin::Product => "Product",
        Origin::System => "System",
    }
}

/// One file as a table row shows it.
pub struct FileRow {
    pub id: String,
    pub name: String,
    pub file_name: String,
    pub created: String,
    pub created_iso: String,
    pub visibility: &'static str,
    pub visibility_value: &'static str,
    pub viewed: String,
    pub signed: String,
    pub origin: &'static str,
    pub size: String,
    pub protected: bool,
    pub contract_id: String,
}

impl From<&FileView> for FileRow {
    fn from(file: &FileView) -> Self {
        Self {
            id: file.id.to_string(),
            name: file.name.as_str().to_owned(),
            file_name: file.file_name.as_str().to_owned(),
            created: when(file.created_at),
            created_iso: iso(file.created_at),
            visibility: visibility_label(file.visibility),
            visibility_value: file.visibility.as_str(),
            viewed: file.viewed_at.map(when).unwrap_or_default(),
            signed: file.signed_at.map(when).unwrap_or_default(),
            origin: origin_label(file.origin),
            size: size(file.size),
            protected: file.protected,
            contract_id: file
                .contract_id
                .as_ref()
                .map(|c| c.as_str().to_owned())
                .unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_a_file_manager() {
        assert_eq!(size(0), "0 B");
        assert_eq!(size(999), "999 B");
        assert_eq!(size(48_213), "48.2 KB");
        assert_eq!(size(26_214_400), "26.2 MB");
        assert_eq!(limit(26_214_400), "25 MiB (26214400 bytes)");
        assert_eq!(limit(1000), "1000 bytes");
    }

    #[test]
    fn a_query_value_cannot_break_out_of_its_parameter() {
        assert_eq!(query_value("/app?x=1&y=2"), "/app%3Fx%3D1%26y%3D2");
        assert_eq!(query_value("a b#c"), "a%20b%23c");
    }
}
