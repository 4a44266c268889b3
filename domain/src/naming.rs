//! Names offered for downloads (CONTRACT.md rules 3 and 4).
//!
//! A download is named after the display name plus the original file's
//! extension ("Invoice November 2025.pdf"), made safe for every file system:
//! no path separators, no control characters, nothing a ZIP reader could use
//! to escape its target folder.

use std::collections::HashSet;

use crate::types::{DisplayName, FileName};

/// Longest name we offer, in characters; file systems commonly allow 255 bytes.
const MAX_CHARS: usize = 180;

/// Characters that are separators or forbidden on common file systems.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        // Bidirectional overrides turn "txt.exe" into something that reads "exe.txt".
        || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn sanitize(raw: &str) -> String {
    let replaced: String = raw
        .chars()
        .map(|c| if is_unsafe(c) { '_' } else { c })
        .collect();
    // Leading dots would hide the file or form `..`; trailing dots and spaces are dropped by Windows.
    let trimmed = replaced
        .trim_start_matches(['.', ' '])
        .trim_end_matches(['.', ' ']);
    trimmed.chars().take(MAX_CHARS).collect()
}

/// The name offered for one file: display name plus the original extension.
pub fn download_name(name: &DisplayName, file_name: &FileName) -> String {
    let extension = file_name.extension().map(sanitize).unwrap_or_default();
    let extension = if extension.is_empty() {
        String::new()
    } else {
        format!(".{extension}")
    };
    let stem = sanitize(name.as_str());
    // "report.pdf" named "report.pdf" stays "report.pdf", not "report.pdf.pdf".
    let stem = if !extension.is_empty() && stem.to_lowercase().ends_with(&extension.to_lowercase())
    {
        stem[..stem.len() - extension.len()].to_owned()
    } else {
        stem
    };
    let stem = if stem.trim().is_empty() {
        "file".to_owned()
    } else {
        stem
    };
    format!("{stem}{extension}")
}

/// `Content-Disposition: attachment` with an ASCII `filename` fallback and the
/// exact UTF-8 name in `filename*` (RFC 6266, RFC 5987).
pub fn content_disposition(download_name: &str) -> String {
    let fallback: String = download_name
        .chars()
        .map(|c| {
            if c.is_ascii() && !c.is_ascii_control() && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut encoded = String::with_capacity(download_name.len() * 3);
    for byte in download_name.bytes() {
        // RFC 5987 attr-char: ALPHA / DIGIT / "!#$&+-.^_`|~"
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    format!("attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

/// Hands out unique entry names for one ZIP archive: a name already taken
/// (compared without case, as Windows and macOS do) gets ` (2)`, ` (3)`…
/// before its extension.
#[derive(Debug, Default)]
pub struct ZipEntryNames {
    taken: HashSet<String>,
}

impl ZipEntryNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// `name` is a [`download_name`]: already free of separators and dots at its start.
    pub fn claim(&mut self, name: &str) -> String {
        let (stem, extension) = match name.rfind('.') {
            Some(dot) if dot > 0 => name.split_at(dot),
            _ => (name, ""),
        };
        let mut candidate = name.to_owned();
        let mut n = 1;
        while !self.taken.insert(candidate.to_lowercase()) {
            n += 1;
            candidate = format!("{stem} ({n}){extension}");
        }
        candidate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(display: &str, file: &str) -> String {
        download_name(
            &DisplayName::parse(display).unwrap(),
            &FileName::parse(file).unwrap(),
        )
    }

    #[test]
    fn a_download_is_the_display_name_plus_the_original_extension() {
        assert_eq!(
            name("Invoice November 2025", "invoice_11.pdf"),
            "Invoice November 2025.pdf"
        );
        assert_eq!(name("Notes", "README"), "Notes");
        assert_eq!(name("report.pdf", "report.PDF"), "report.PDF");
    }

    #[test]
    fn path_like_and_control_characters_never_reach_the_name() {
        assert_eq!(name("../../etc/passwd", "x.txt"), "_.._etc_passwd.txt");
        assert_eq!(name(r"C:\Windows\evil", "x.exe"), "C__Windows_evil.exe");
        assert_eq!(name("..", "a.pdf"), "file.pdf");
        assert_eq!(name("a\u{202e}b", "a.pdf").chars().count(), 7);
        assert!(!name("/abs", "a.pdf").starts_with('/'));
    }

    #[test]
    fn non_ascii_names_get_an_ascii_fallback_and_a_utf8_filename_star() {
        let header = content_disposition("Vertrag Müller ü.pdf");
        assert_eq!(
            header,
            "attachment; filename=\"Vertrag M_ller _.pdf\"; filename*=UTF-8''Vertrag%20M%C3%BCller%20%C3%BC.pdf"
        );
        let quoted = content_disposition("say \"hi\".txt");
        assert!(quoted.starts_with("attachment; filename=\"say _hi_.txt\""));
    }

    #[test]
    fn colliding_zip_entries_are_numbered_before_the_extension() {
        let mut names = ZipEntryNames::new();
        assert_eq!(names.claim("Invoice.pdf"), "Invoice.pdf");
        assert_eq!(names.claim("Invoice.pdf"), "Invoice (2).pdf");
        assert_eq!(names.claim("invoice.PDF"), "invoice (3).PDF");
        assert_eq!(names.claim("Invoice (2).pdf"), "Invoice (2) (2).pdf");
        assert_eq!(names.claim("Notes"), "Notes");
        assert_eq!(names.claim("Notes"), "Notes (2)");
    }
}
