//! Properties of offered download names and ZIP entry names (CONTRACT.md rules
//! 3, 4 and 12) over any Unicode the parsers accept: letters whose case changes
//! their length in bytes (the Kelvin sign, `Ⱥ`, `ß`), combining marks, emoji,
//! separators, bidirectional controls and control characters.

use std::collections::HashSet;

use dossier_domain::naming::{MAX_EXTENSION_BYTES, MAX_NAME_BYTES, ZipEntryNames, download_name};
use dossier_domain::{DisplayName, FileName};
use proptest::char::range;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

/// Letters whose case mapping changes their length or meets another letter.
const CASE_TRAPS: &[char] = &[
    '\u{212A}', 'k', 'K', '\u{212B}', 'å', 'Å', 'Σ', 'σ', 'ς', 'ß', 'ẞ', 'İ', 'ı', 'ſ', 'ﬁ', 'Ⱥ',
    'ü', '€',
];

/// Characters that separate, hide or reorder: what a name must be cleaned of.
const SEPARATING: &[char] = &[
    '.', '.', ' ', '/', '\\', ':', '*', '"', '|', '\u{202E}', '\u{2066}', '\u{200F}', '\u{061C}',
    '\u{3000}', '\u{FEFF}', '\u{200B}',
];

/// A letter that passes into a name unchanged: no separator, dot, space or control.
fn plain_letter() -> impl Strategy<Value = char> {
    prop_oneof![
        8 => range('a', 'z'),
        2 => range('A', 'Z'),
        3 => select(CASE_TRAPS),
        1 => range('\u{300}', '\u{36f}'),     // combining marks
        1 => range('\u{1F300}', '\u{1FAFF}'), // emoji, 4 bytes
        1 => range('\u{4E00}', '\u{9FFF}'),   // CJK, 3 bytes
    ]
}

/// Any letter a name might hold, the troublesome ones weighted up.
fn letter() -> impl Strategy<Value = char> {
    prop_oneof![
        12 => plain_letter(),
        3 => select(SEPARATING),
        1 => any::<char>().prop_filter("controls come from text()", |c| !c.is_control()),
    ]
}

fn plain(max: usize) -> impl Strategy<Value = String> {
    vec(plain_letter(), 1..=max).prop_map(String::from_iter)
}

/// Up to `max` characters; one string in ten has control characters, which
/// the parsers refuse (but a file name keeps only its last path segment).
fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        9 => vec(letter(), 0..=max),
        1 => vec(prop_oneof![4 => letter(), 1 => range('\0', '\u{1f}')], 0..=max),
    ]
    .prop_map(String::from_iter)
}

/// A file name as uploaded, often with an extension, plain or not, short or absurd.
fn file_name_text() -> impl Strategy<Value = String> {
    let extension = prop_oneof![2 => plain(20), 1 => text(80)];
    (text(200), prop::option::of(extension)).prop_map(|(stem, extension)| match extension {
        Some(extension) => format!("{stem}.{extension}"),
        None => stem,
    })
}

/// A display name and a file name, each as its parser made it.
fn names() -> impl Strategy<Value = (DisplayName, FileName)> {
    (text(300), file_name_text()).prop_filter_map("refused by the parsers", |(display, file)| {
        Some((
            DisplayName::parse(&display).ok()?,
            FileName::parse(&file).ok()?,
        ))
    })
}

fn is_forbidden(c: char) -> bool {
    c.is_control()
        || matches!(c, '/' | '\\' | ':' | '*' | '?' | '"' | '<' | '>' | '|')
        || matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// What every offered name is, whatever went in.
fn check_safe(offered: &str) -> Result<(), TestCaseError> {
    prop_assert!(!offered.is_empty());
    prop_assert!(
        offered.len() <= MAX_NAME_BYTES,
        "{} bytes: {offered:?}",
        offered.len()
    );
    prop_assert!(!offered.starts_with(['.', ' ']), "{offered:?}");
    prop_assert!(!offered.ends_with(['.', ' ']), "{offered:?}");
    prop_assert!(!offered.chars().any(is_forbidden), "{offered:?}");
    Ok(())
}

/// The file's extension after its dot, if it passes into a name unchanged.
fn plain_extension(file: &FileName) -> Option<&str> {
    let extension = &file.extension()?[1..];
    let plain = !extension.starts_with(' ')
        && !extension.ends_with(' ')
        && !extension.chars().any(|c| is_forbidden(c) || c == '.');
    plain.then_some(extension)
}

proptest! {
    #[test]
    fn download_names_are_short_safe_and_never_empty((display, file) in names()) {
        let offered = download_name(&display, &file);
        check_safe(&offered)?;
        // A fresh archive takes a download name as it is.
        prop_assert_eq!(ZipEntryNames::new().claim(&offered), offered);
    }

    #[test]
    fn download_names_keep_the_extension_or_as_much_as_fits((display, file) in names()) {
        let offered = download_name(&display, &file);
        if let Some(extension) = plain_extension(&file) {
            let (_, kept) = offered.rsplit_once('.').expect("the extension's dot");
            prop_assert!(!kept.is_empty() && extension.starts_with(kept), "{offered:?}");
            if extension.len() < MAX_EXTENSION_BYTES {
                prop_assert_eq!(kept, extension);
            }
        }
    }

    #[test]
    fn download_names_cut_only_what_does_not_fit(display in plain(255), extension in plain(20)) {
        let display = DisplayName::parse(&display).unwrap();
        let file = FileName::parse(&format!("x.{extension}")).unwrap();
        prop_assume!(extension.len() < MAX_EXTENSION_BYTES);
        let offered = download_name(&display, &file);
        prop_assert!(offered.len() <= MAX_NAME_BYTES, "{} bytes", offered.len());
        let stem = offered.strip_suffix(&format!(".{extension}")).expect("the extension");
        prop_assert!(display.as_str().starts_with(stem));
        if display.as_str().len() + 1 + extension.len() <= MAX_NAME_BYTES {
            prop_assert_eq!(stem, display.as_str());
        } else {
            // Cut at the last character boundary that fits: at most 3 bytes short.
            prop_assert!(offered.len() > MAX_NAME_BYTES - 4, "{} bytes", offered.len());
        }
    }

    #[test]
    fn a_display_name_ending_in_the_extension_in_another_case_is_not_doubled(
        stem in plain(40),
        letters in vec((select(EQUAL_BUT_FOR_CASE), 0..3_usize, 0..3_usize), 1..8),
    ) {
        let pick = |group: &[char], i: usize| group[i % group.len()];
        let in_file: String = letters.iter().map(|(g, a, _)| pick(g, *a)).collect();
        let in_display: String = letters.iter().map(|(g, _, b)| pick(g, *b)).collect();
        let display = DisplayName::parse(&format!("{stem}.{in_display}")).unwrap();
        let file = FileName::parse(&format!("scan.{in_file}")).unwrap();
        prop_assert_eq!(download_name(&display, &file), format!("{stem}.{in_file}"));
    }

    #[test]
    fn zip_entry_names_cope_with_any_string(
        raw in vec(vec(any::<char>(), 0..400).prop_map(String::from_iter), 1..8),
        copies in 1..20_usize,
    ) {
        let mut entries = ZipEntryNames::new();
        let mut lower = HashSet::new();
        for _ in 0..copies {
            for name in &raw {
                let entry = entries.claim(name);
                prop_assert!(!entry.is_empty());
                prop_assert!(entry.len() <= MAX_NAME_BYTES, "{} bytes", entry.len());
                prop_assert!(lower.insert(entry.to_lowercase()), "{entry:?} twice");
            }
        }
    }
}

proptest! {
    // Each case generates up to 8 name pairs, about as slow as 8 cases above.
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn zip_entry_names_are_unique_short_and_safe(
        files in vec(names(), 1..8),
        copies in 1..30_usize,
    ) {
        let mut entries = ZipEntryNames::new();
        let mut lower = HashSet::new();
        let mut upper = HashSet::new();
        for _ in 0..copies {
            for (display, file) in &files {
                let entry = entries.claim(&download_name(display, file));
                check_safe(&entry)?;
                if let Some(extension) = plain_extension(file).filter(|e| e.len() < MAX_EXTENSION_BYTES) {
                    prop_assert!(entry.ends_with(&format!(".{extension}")), "{entry:?}");
                }
                prop_assert!(lower.insert(entry.to_lowercase()), "{entry:?} twice");
                prop_assert!(upper.insert(entry.to_uppercase()), "{entry:?} twice");
            }
        }
    }
}

/// Letters equal but for case, each group one letter to a case-insensitive file system.
const EQUAL_BUT_FOR_CASE: &[&[char]] = &[
    &['k', 'K', '\u{212A}'],
    &['å', 'Å', '\u{212B}'],
    &['s', 'S', 'ſ'],
    &['σ', 'ς', 'Σ'],
    &['ß', 'ẞ'],
    &['ⱥ', 'Ⱥ'],
    &['a', 'A'],
];
