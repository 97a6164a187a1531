//! Log fields that come from requests, tokens or files, escaped: a name,
//! CN, principal, key id or error message holding a newline or another
//! control character is written as `\n`, `\u{1b}`..., so no value can end
//! a log line and forge the next one.
//!
//! tracing's text output escapes plain string fields (it formats them with
//! `Debug`) but writes `%value` fields as they are; [`Escaped`] is for the
//! `%` fields that read better without quotes, errors above all.

use std::fmt;

/// Displays `T` with control characters, quotes and backslashes escaped.
pub struct Escaped<T>(pub T);

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.0.to_string();
        for c in text.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() => write!(f, "{}", c.escape_default())?,
                c => fmt::Write::write_char(f, c)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Escaped;

    #[test]
    fn control_characters_cannot_break_a_line() {
        let forged = "alice\n2026-01-01T00:00:00Z  INFO keyholder: unlocked\r\x1b[2K\t\\";
        let shown = Escaped(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert_eq!(
            shown,
            "alice\\n2026-01-01T00:00:00Z  INFO keyholder: unlocked\\r\\u{1b}[2K\\t\\\\"
        );
        assert_eq!(Escaped("plain name-1").to_string(), "plain name-1");
    }
}
