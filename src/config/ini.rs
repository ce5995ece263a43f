//! A small INI reader that keeps the line number of every value.
//!
//! Written here rather than taken from a crate because every error and warning must say
//! which line of which file a value came from, and because inline comments must be
//! stripped the way the earlier implementation's files use them (`value  # note`).
//! The INI crates we looked at drop line numbers or keep `# note` in the value.

/// One `key = value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub section: String,
    pub key: String,
    pub value: String,
    pub line: usize,
}

/// A line that is not a section, an assignment, a comment or blank.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}: {text:?}")]
pub struct SyntaxError {
    pub line: usize,
    pub problem: &'static str,
    pub text: String,
}

/// Parses INI text. Section and key names are lower-cased; values are trimmed and lose
/// an inline comment (`#` or `;` preceded by white space).
pub fn parse(text: &str) -> Result<Vec<Entry>, SyntaxError> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        if let Some(rest) = trimmed.strip_prefix('[') {
            let Some(name) = rest.strip_suffix(']') else {
                return Err(SyntaxError {
                    line,
                    problem: "unclosed section header",
                    text: raw.into(),
                });
            };
            section = name.trim().to_ascii_lowercase();
            continue;
        }
        let Some(split) = trimmed.find(['=', ':']) else {
            return Err(SyntaxError {
                line,
                problem: "expected `key = value`",
                text: raw.into(),
            });
        };
        let key = trimmed[..split].trim().to_ascii_lowercase();
        if key.is_empty() {
            return Err(SyntaxError {
                line,
                problem: "missing key name",
                text: raw.into(),
            });
        }
        let value = strip_inline_comment(&trimmed[split + 1..])
            .trim()
            .to_string();
        entries.push(Entry {
            section: section.clone(),
            key,
            value,
            line,
        });
    }
    Ok(entries)
}

fn strip_inline_comment(value: &str) -> &str {
    let bytes = value.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if (b == b'#' || b == b';') && i > 0 && bytes[i - 1].is_ascii_whitespace() {
            return &value[..i];
        }
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_comments_are_stripped_but_not_inside_words() {
        let e =
            parse("[settings]\nmax_scan_threads = 4   # four\nx = a#b\ny = 5 ; five\n").unwrap();
        assert_eq!(e[0].value, "4");
        assert_eq!(e[0].line, 2);
        assert_eq!(e[1].value, "a#b");
        assert_eq!(e[2].value, "5");
    }

    #[test]
    fn sections_and_keys_are_case_insensitive() {
        let e = parse("[Paths]\nSource_Path: /x\n").unwrap();
        assert_eq!(
            (
                e[0].section.as_str(),
                e[0].key.as_str(),
                e[0].value.as_str()
            ),
            ("paths", "source_path", "/x")
        );
    }

    #[test]
    fn garbage_line_is_an_error_with_its_line() {
        let err = parse("[paths]\n\njust words\n").unwrap_err();
        assert_eq!(err.line, 3);
        assert!(parse("[paths\n").is_err());
    }
}
