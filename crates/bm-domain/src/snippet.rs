//! Client input made safe to quote: the one way an error message or a log line echoes a
//! string that came from a client (ids, paths, selectors, endpoints, notes, sources...).
//!
//! Echoing input verbatim lets a client do harm far from where it sent it: a 15 KB field
//! path echoed in an error message overflows the response headers of standard gRPC clients
//! (they report RESOURCE_EXHAUSTED instead of the INVALID_ARGUMENT the server meant), and a
//! newline or an ANSI escape in a logged string forges log lines. A [`Snippet`] is escaped
//! the way `{:?}` escapes a string and cut after a bounded number of characters.

use std::fmt;

/// A client string as an error message or a log line may quote it: in double quotes,
/// escaped like Rust's `{:?}` (a newline is `\n`, an ANSI escape is `\u{1b}`, so no control
/// character comes through), and cut after [`Snippet::DEFAULT_MAX_CHARS`] characters (or
/// [`Snippet::max_chars`]), with the length of the whole string said when it is cut:
///
/// ```
/// use bm_domain::snippet;
///
/// assert_eq!(snippet("rack=r1").to_string(), r#""rack=r1""#);
/// assert_eq!(snippet("a\nERROR forged").to_string(), r#""a\nERROR forged""#);
/// assert_eq!(
///     snippet(&"x".repeat(1000)).max_chars(3).to_string(),
///     r#""xxx"… (1000 bytes)"#
/// );
/// ```
///
/// The output is at most about ten bytes per kept character (the longest escape is
/// `\u{10ffff}`), whatever the input's size.
#[derive(Clone, Copy, Debug)]
pub struct Snippet<'a> {
    text: &'a str,
    max_chars: usize,
}

/// The snippet of `text`, to quote client input in an error message or a log line.
pub fn snippet(text: &str) -> Snippet<'_> {
    Snippet {
        text,
        max_chars: Snippet::DEFAULT_MAX_CHARS,
    }
}

impl<'a> Snippet<'a> {
    /// The characters kept by default: enough to recognise a value, small enough that an
    /// error message with a few of them fits any client's header limit.
    pub const DEFAULT_MAX_CHARS: usize = 64;

    /// Keeps at most `max_chars` characters instead of [`Snippet::DEFAULT_MAX_CHARS`].
    #[must_use]
    pub fn max_chars(self, max_chars: usize) -> Self {
        Snippet { max_chars, ..self }
    }

    /// True when the text is longer than what is kept.
    pub fn is_cut(&self) -> bool {
        self.cut_at().is_some()
    }

    /// The byte offset where the kept part ends, if the text is cut.
    fn cut_at(&self) -> Option<usize> {
        self.text.char_indices().nth(self.max_chars).map(|(i, _)| i)
    }
}

impl fmt::Display for Snippet<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cut_at() {
            None => write!(f, "{:?}", self.text),
            Some(end) => write!(f, "{:?}… ({} bytes)", &self.text[..end], self.text.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_come_through() {
        let hostile = "x\r\n2025-01-01T00:00:00Z ERROR forged\u{1b}[31mred\u{7}\u{202e}\0";
        let s = snippet(hostile).to_string();
        assert!(!s.chars().any(char::is_control), "{s}");
        assert!(!s.contains('\u{202e}'), "bidi overrides are escaped: {s}");
        assert!(s.contains(r"\n") && s.contains(r"\u{1b}"), "{s}");
    }

    #[test]
    fn long_input_is_cut_and_its_size_said() {
        let huge = "é".repeat(5_000_000);
        let s = snippet(&huge).to_string();
        assert!(s.len() < 200, "{} bytes", s.len());
        assert!(s.ends_with("… (10000000 bytes)"), "{s}");
        assert!(snippet(&huge).is_cut());
        // Exactly at the limit: whole, not cut.
        let exact = "a".repeat(Snippet::DEFAULT_MAX_CHARS);
        assert_eq!(snippet(&exact).to_string(), format!("{exact:?}"));
        assert!(!snippet(&exact).is_cut());
        // The worst case stays bounded: every kept character escapes to ten bytes.
        let worst = "\u{10ffff}".repeat(1000);
        assert!(snippet(&worst).to_string().len() <= 64 * 10 + 40);
    }
}
