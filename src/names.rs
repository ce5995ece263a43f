//! File names as Shuttle shows them: every log line, mail subject or body and report
//! line that carries a name from the drop directory goes through [`shown`].
//!
//! A name comes from an untrusted client and may hold anything but `/` and NUL:
//! newlines (a forged log line), terminal escapes, bidirectional overrides
//! (`report\u{202e}txt.scr` displays as `reportrcs.txt`), zero-width characters, bytes
//! that are not UTF-8. [`shown`] escapes all of them, the same way everywhere:
//! `\n`, `\t`, `\r`, `\\`, `\u{202e}` for control, format (Unicode category Cf) and
//! line/paragraph separator characters, `\xff` for a byte that is not UTF-8. An
//! ordinary name is shown as it is.
//!
//! The Unicode category comes from the `unicode-general-category` crate (the tables
//! of the Unicode Character Database), not from a hand-kept list.

use std::ffi::OsStr;
use std::fmt::{self, Write as _};
use std::os::unix::ffi::OsStrExt;

use unicode_general_category::{GeneralCategory, get_general_category};

/// A Unicode format character (category Cf): bidirectional overrides and isolates,
/// zero-width spaces and joiners, the byte-order mark, soft hyphen, tag characters.
pub fn is_format(c: char) -> bool {
    get_general_category(c) == GeneralCategory::Format
}

/// Characters never shown raw: control, format, line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || is_format(c)
        || matches!(
            get_general_category(c),
            GeneralCategory::LineSeparator | GeneralCategory::ParagraphSeparator
        )
}

/// A name ready to be printed: `{}` gives the escaped name, `{:?}` the escaped name
/// in double quotes (the way log lines quote names).
#[derive(Clone, Copy)]
pub struct Shown<'a>(&'a [u8]);

/// Wraps anything path-like (`&str`, `&Path`, `&OsStr`, `&String`) for printing.
pub fn shown<S: AsRef<OsStr> + ?Sized>(name: &S) -> Shown<'_> {
    Shown(name.as_ref().as_bytes())
}

/// The escaped name as a `String` (for mail subjects and the like).
pub fn escape<S: AsRef<OsStr> + ?Sized>(name: &S) -> String {
    shown(name).to_string()
}

impl Shown<'_> {
    fn write(&self, f: &mut fmt::Formatter<'_>, quoted: bool) -> fmt::Result {
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                match c {
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    '\\' => f.write_str("\\\\")?,
                    '"' if quoted => f.write_str("\\\"")?,
                    c if needs_escape(c) => write!(f, "\\u{{{:x}}}", c as u32)?,
                    c => f.write_char(c)?,
                }
            }
            for b in chunk.invalid() {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.write(f, false)
    }
}

impl fmt::Debug for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        self.write(f, true)?;
        f.write_char('"')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordinary_names_are_shown_as_they_are() {
        assert_eq!(escape("in/a b.txt"), "in/a b.txt");
        assert_eq!(format!("{:?}", shown("in/big.bin")), "\"in/big.bin\"");
        assert_eq!(escape("Übersicht—日本.pdf"), "Übersicht—日本.pdf");
    }

    #[test]
    fn control_format_and_invalid_bytes_are_escaped() {
        assert_eq!(escape("a\nb\tc\\d"), "a\\nb\\tc\\\\d");
        assert_eq!(escape("report\u{202e}txt.scr"), "report\\u{202e}txt.scr");
        assert_eq!(
            escape("a\u{200b}b\u{feff}\u{2028}"),
            "a\\u{200b}b\\u{feff}\\u{2028}"
        );
        assert_eq!(escape("\u{1b}[31m"), "\\u{1b}[31m");
        assert_eq!(escape(OsStr::from_bytes(b"x\xffy")), "x\\xffy");
        assert_eq!(format!("{:?}", shown("say \"hi\"")), "\"say \\\"hi\\\"\"");
        for c in [
            '\u{202a}', '\u{202d}', '\u{2066}', '\u{2069}', '\u{200d}', '\u{ad}',
        ] {
            assert!(is_format(c), "{c:?}");
        }
        assert!(!is_format('a'));
    }
}
