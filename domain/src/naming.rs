//! Names offered for downloads (CONTRACT.md rules 3, 4 and 12).
//!
//! A download is named after the display name plus the original file's
//! extension ("Invoice November 2025.pdf"), made safe for every file system:
//! no path separators, no control characters, no bidirectional controls,
//! nothing a ZIP reader could use to escape its target folder, never empty,
//! and at most 255 bytes.
//!
//! Two traps shape the code:
//! - File systems and ZIP readers count bytes, not characters: 180 characters
//!   of "ü" are 360 bytes. Every limit here is in bytes of UTF-8, and every cut
//!   falls on a character boundary of the string being cut.
//! - Changing case can change a string's length: the Kelvin sign K (U+212A,
//!   3 bytes) lower-cases to `k` (1 byte). A length or position measured on a
//!   lower-cased copy would slice the original inside a character (a panic) or
//!   cut the wrong letters. So comparisons without case go letter by letter
//!   (`same_letter`), and each cut is computed on the string it cuts.

use std::collections::{HashMap, HashSet};

use crate::types::{DisplayName, FileName};

/// Longest name we offer, in bytes of UTF-8: what ext4, APFS, NTFS (255 UTF-16
/// units, never fewer than our bytes) and ZIP tools all accept.
pub const MAX_NAME_BYTES: usize = 255;

/// Longest extension kept whole, in bytes, its dot included. Real extensions
/// are a few bytes; a longer one is cut so that the stem and a ` (n)` suffix
/// (at most 23 bytes) still have room.
pub const MAX_EXTENSION_BYTES: usize = 64;

/// The stem offered when nothing of the display name is left ("..").
const FALLBACK_STEM: &str = "file";

/// Characters that are separators or forbidden on common file systems.
fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        // Bidirectional controls turn "txt.exe" into something that reads "exe.txt".
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

fn sanitize(raw: &str) -> String {
    let replaced: String = raw
        .chars()
        .map(|c| if is_unsafe(c) { '_' } else { c })
        .collect();
    // Leading dots would hide the file or form `..`; trailing dots and spaces are dropped by Windows.
    replaced
        .trim_start_matches(['.', ' '])
        .trim_end_matches(['.', ' '])
        .to_owned()
}

/// One letter without case: the lower case of the upper case of its lower
/// case, so that `k`, `K` and the Kelvin sign meet, and so do `σ`, `ς` and
/// `Σ`, or `ß`, `ẞ` and `ss`. Coarser than some file systems is fine: it only
/// numbers a few more ZIP entries.
fn fold(c: char) -> impl Iterator<Item = char> {
    c.to_lowercase()
        .flat_map(char::to_uppercase)
        .flat_map(char::to_lowercase)
}

fn same_letter(a: char, b: char) -> bool {
    a == b || fold(a).eq(fold(b))
}

/// `stem` without a trailing `suffix` compared without case, or `None` if it
/// does not end with it. The cut is found by walking `stem`'s own characters,
/// so it always falls on one of its boundaries.
fn strip_suffix_ignoring_case<'a>(stem: &'a str, suffix: &str) -> Option<&'a str> {
    let mut letters = stem.char_indices().rev();
    let mut cut = stem.len();
    for wanted in suffix.chars().rev() {
        let (at, found) = letters.next()?;
        if !same_letter(found, wanted) {
            return None;
        }
        cut = at;
    }
    Some(&stem[..cut])
}

/// `s` if it has at most `max` bytes, else its longest prefix that does and
/// ends on a character boundary, without the dots and spaces the cut leaves
/// at its end (Windows would drop them).
fn shorten(s: &str, max: usize) -> &str {
    if s.len() <= max {
        s
    } else {
        s[..s.floor_char_boundary(max)].trim_end_matches(['.', ' '])
    }
}

/// `stem`, `suffix` (empty or ` (n)`) and `extension` joined in at most
/// [`MAX_NAME_BYTES`]: the suffix is kept, the extension too unless it is
/// longer than [`MAX_EXTENSION_BYTES`], and the stem gives up what is missing.
fn fit(stem: &str, suffix: &str, extension: &str) -> String {
    let extension = shorten(extension, MAX_EXTENSION_BYTES);
    // Cannot underflow: the suffix has at most 23 bytes, the extension 64.
    let stem = shorten(stem, MAX_NAME_BYTES - suffix.len() - extension.len());
    let stem = if stem.is_empty() { FALLBACK_STEM } else { stem };
    format!("{stem}{suffix}{extension}")
}

/// The name offered for one file: display name plus the original extension,
/// at most [`MAX_NAME_BYTES`] bytes.
pub fn download_name(name: &DisplayName, file_name: &FileName) -> String {
    let extension = file_name.extension().map(sanitize).unwrap_or_default();
    let extension = if extension.is_empty() {
        String::new()
    } else {
        format!(".{extension}")
    };
    let stem = sanitize(name.as_str());
    // "report.pdf" named "report.pdf" stays "report.pdf", not "report.pdf.pdf".
    let stem = strip_suffix_ignoring_case(&stem, &extension).unwrap_or(&stem);
    let stem = if stem.trim().is_empty() {
        FALLBACK_STEM
    } else {
        stem
    };
    fit(stem, "", &extension)
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
/// before its extension, and its stem is shortened so that the name still has
/// at most [`MAX_NAME_BYTES`] bytes.
#[derive(Debug, Default)]
pub struct ZipEntryNames {
    /// The [`key`] of every name handed out.
    taken: HashSet<String>,
    /// The number each name (by [`key`]) last got, so that a thousand equal
    /// names do not each count up from 2 again.
    numbers: HashMap<String, usize>,
}

/// `name` with each letter [`fold`]ed: names with the same key are the same
/// file to a case-insensitive file system.
fn key(name: &str) -> String {
    name.chars().flat_map(fold).collect()
}

impl ZipEntryNames {
    pub fn new() -> Self {
        Self::default()
    }

    /// `name` is a [`download_name`]: already free of separators and dots at
    /// its start, and handed back unchanged unless taken. Any other string
    /// still gets a unique, non-empty name of at most [`MAX_NAME_BYTES`] bytes.
    pub fn claim(&mut self, name: &str) -> String {
        // An extension as `download_name` makes them: one dot, not the whole
        // name, at most MAX_EXTENSION_BYTES; a longer tail is part of the stem.
        let (stem, extension) = match name.rfind('.') {
            Some(dot) if dot > 0 && name.len() - dot <= MAX_EXTENSION_BYTES => name.split_at(dot),
            _ => (name, ""),
        };
        let n = self.numbers.entry(key(name)).or_insert(1);
        // Ends: each n gives another name, as ` (n)` stays whole before the extension.
        loop {
            let suffix = if *n == 1 {
                String::new()
            } else {
                format!(" ({n})")
            };
            let candidate = fit(stem, &suffix, extension);
            if self.taken.insert(key(&candidate)) {
                return candidate;
            }
            *n += 1;
        }
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

    #[test]
    fn the_kelvin_sign_never_cuts_a_character_in_half() {
        // U+212A is 3 bytes; its lower case `k` is 1.
        assert_eq!(name("\u{212A}.\u{212A}", "x.k"), "\u{212A}.k");
        assert_eq!(name("a.k", "x.\u{212A}"), "a.\u{212A}");
        assert_eq!(name("\u{212A}", "x.\u{212A}"), "\u{212A}.\u{212A}");
    }

    #[test]
    fn a_250_character_name_offers_at_most_255_bytes() {
        // 250 "ü" are 500 bytes: the stem is cut, the extension kept.
        assert_eq!(name(&"ü".repeat(250), "scan.pdf"), "ü".repeat(125) + ".pdf");
        assert_eq!(name(&"€".repeat(250), "scan.pdf"), "€".repeat(83) + ".pdf");
        assert_eq!(
            name(&"😀".repeat(250), "scan.pdf"),
            "😀".repeat(62) + ".pdf"
        );
        // 254 bytes fit whole.
        assert_eq!(name(&"a".repeat(250), "scan.pdf"), "a".repeat(250) + ".pdf");
        assert_eq!(name(&"ü".repeat(255), "README"), "ü".repeat(127));
    }

    #[test]
    fn a_cut_leaves_no_dot_or_space_at_the_end() {
        let display = format!("üü{}z", ". ".repeat(126));
        assert_eq!(name(&display, "README"), "üü");
    }

    #[test]
    fn an_absurdly_long_extension_is_cut_too() {
        let offered = name("Report", &format!("x.{}", "e".repeat(200)));
        assert_eq!(offered, format!("Report.{}", "e".repeat(63)));
        let offered = name(&"ü".repeat(250), &format!("x.{}", "€".repeat(250)));
        assert!(offered.len() <= MAX_NAME_BYTES, "{} bytes", offered.len());
        assert!(offered.ends_with(&format!(".{}", "€".repeat(21))));
    }

    #[test]
    fn long_zip_entries_keep_their_number_within_255_bytes() {
        let long = name(&"ü".repeat(250), "scan.pdf");
        let mut names = ZipEntryNames::new();
        assert_eq!(names.claim(&long), long);
        assert_eq!(names.claim(&long), "ü".repeat(123) + " (2).pdf");
        let mut seen = HashSet::new();
        for _ in 0..1000 {
            let entry = names.claim(&long);
            assert!(entry.len() <= MAX_NAME_BYTES, "{entry}");
            assert!(entry.ends_with(").pdf"), "{entry}");
            assert!(seen.insert(entry));
        }
    }

    #[test]
    fn zip_entries_compare_without_case_letter_by_letter() {
        let mut names = ZipEntryNames::new();
        assert_eq!(names.claim("\u{212A}.pdf"), "\u{212A}.pdf");
        assert_eq!(names.claim("k.pdf"), "k (2).pdf");
        assert_eq!(names.claim("K.PDF"), "K (3).PDF");
        assert_eq!(names.claim("ΟΔΟΣ.txt"), "ΟΔΟΣ.txt");
        assert_eq!(names.claim("οδος.txt"), "οδος (2).txt");
    }
}
