//! Showing text that came from outside (a bundle, an envelope, a registry response) to a
//! person or a log: control characters (terminal escape sequences among them) escaped, the
//! length cut on a character boundary. Never byte-slices: a key id or digest from outside may
//! be short or not ASCII.

/// Whether `c` is a bidirectional-format character: shown as is, it reorders the text around
/// it (a name could read as another).
pub fn is_bidi(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` with control and bidirectional-format characters escaped (newline and tab too), at most
/// `max` characters, with `…` when cut.
pub fn shown(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max.saturating_mul(4)));
    for (i, c) in s.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        if c.is_control() || is_bidi(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The first `n` characters of an identifier (a key id or digest in hex), escaped: what the
/// CLI prints as a short id.
pub fn short(id: &str, n: usize) -> String {
    id.chars()
        .take(n)
        .flat_map(|c| {
            if c.is_control() || is_bidi(c) {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_panics_and_escapes() {
        assert_eq!(short("abc", 16), "abc");
        assert_eq!(short("ééééééééééééééééé", 16).chars().count(), 16);
        assert_eq!(short("a\u{1b}[8m", 4), "a\\u{1b}[8");
        assert_eq!(shown("x\ny", 10), "x\\ny");
        assert_eq!(shown("abcdef", 3), "abc…");
        assert_eq!(shown("", 3), "");
        assert_eq!(shown("a\u{202E}b", 5), "a\\u{202e}b");
    }
}
