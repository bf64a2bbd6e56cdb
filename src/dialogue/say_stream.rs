//! The spoken text of a JSON line (`{"say": "...", "action": ...}`) as it
//! streams: fed the generated JSON in arbitrary chunks, it hands back the
//! decoded characters of the `say` string as soon as they are known, so a
//! line with an action still reaches the screen token by token. Pure.

/// Incremental extractor of the top-level `"say"` string.
#[derive(Debug, Default, Clone)]
pub(crate) struct SayStream {
    state: State,
}

#[derive(Debug, Default, Clone)]
enum State {
    /// Before the value: the text seen so far (a few bytes).
    #[default]
    Seeking,
    /// Inside the string; `escape` holds an unfinished escape sequence
    /// (after the backslash), `high` a high surrogate waiting for its pair.
    Inside {
        escape: Option<String>,
        high: Option<u16>,
    },
    /// The string ended.
    Done,
}

impl SayStream {
    /// Feed the next chunk of generated JSON, after `seen` (everything fed
    /// before, this chunk included, is `seen`); returns the newly decoded
    /// say text.
    pub(crate) fn push(&mut self, seen: &str, chunk: &str) -> String {
        let mut out = String::new();
        let mut rest = chunk;
        if matches!(self.state, State::Seeking) {
            // The value starts after `"say"`, optional spaces, `:`, spaces, `"`.
            let Some(start) = value_start(seen) else {
                return out;
            };
            let consumed_before = seen.len() - chunk.len();
            self.state = State::Inside {
                escape: None,
                high: None,
            };
            rest = &seen[start.max(consumed_before)..];
        }
        let State::Inside { escape, high } = &mut self.state else {
            return out;
        };
        for c in rest.chars() {
            if let Some(esc) = escape {
                esc.push(c);
                match decode_escape(esc) {
                    Escape::More => continue,
                    Escape::Char(ch) => {
                        *high = None;
                        out.push(ch);
                    }
                    Escape::High(h) => *high = Some(h),
                    Escape::Low(l) => {
                        if let Some(h) = high.take() {
                            let cp =
                                0x10000 + ((u32::from(h) - 0xD800) << 10) + (u32::from(l) - 0xDC00);
                            out.extend(char::from_u32(cp));
                        }
                    }
                    Escape::Bad => *high = None,
                }
                *escape = None;
            } else if c == '\\' {
                *escape = Some(String::new());
            } else if c == '"' {
                self.state = State::Done;
                break;
            } else {
                *high = None;
                out.push(c);
            }
        }
        out
    }
}

/// Byte offset where the top-level `say` string's characters start in
/// `seen`, once its opening quote has been seen (keys of nested objects and
/// text inside other strings are skipped).
fn value_start(seen: &str) -> Option<usize> {
    let b = seen.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                // A whole string: its end (past escapes), or not yet seen.
                let start = i + 1;
                let mut j = start;
                while j < b.len() && b[j] != b'"' {
                    j += if b[j] == b'\\' { 2 } else { 1 };
                }
                if j >= b.len() {
                    return None;
                }
                if depth == 1 && &b[start..j] == b"say" {
                    let mut k = j + 1;
                    while k < b.len() && b[k].is_ascii_whitespace() {
                        k += 1;
                    }
                    if k < b.len() && b[k] == b':' {
                        k += 1;
                        while k < b.len() && b[k].is_ascii_whitespace() {
                            k += 1;
                        }
                        return (k < b.len() && b[k] == b'"').then_some(k + 1);
                    }
                    if k >= b.len() {
                        return None;
                    }
                }
                i = j;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

enum Escape {
    More,
    Char(char),
    High(u16),
    Low(u16),
    Bad,
}

fn decode_escape(esc: &str) -> Escape {
    let mut chars = esc.chars();
    match chars.next() {
        Some('n') => Escape::Char('\n'),
        Some('t') => Escape::Char('\t'),
        Some('r') => Escape::Char('\r'),
        Some('b') => Escape::Char('\u{8}'),
        Some('f') => Escape::Char('\u{c}'),
        Some(c @ ('"' | '\\' | '/')) => Escape::Char(c),
        Some('u') if esc.len() < 5 => Escape::More,
        Some('u') => match u16::from_str_radix(&esc[1..5], 16) {
            Ok(v @ 0xD800..=0xDBFF) => Escape::High(v),
            Ok(v @ 0xDC00..=0xDFFF) => Escape::Low(v),
            Ok(v) => char::from_u32(u32::from(v)).map_or(Escape::Bad, Escape::Char),
            Err(_) => Escape::Bad,
        },
        _ => Escape::Bad,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stream(chunks: &[&str]) -> String {
        let mut s = SayStream::default();
        let mut seen = String::new();
        let mut out = String::new();
        for c in chunks {
            seen.push_str(c);
            out.push_str(&s.push(&seen, c));
        }
        out
    }

    #[test]
    fn streams_the_say_string_only() {
        assert_eq!(
            stream(&[
                "{\"sa",
                "y\": \"Hel",
                "lo \\\"you\\\"",
                "!\", \"action\": {\"say\": \"no\"}}"
            ]),
            "Hello \"you\"!"
        );
        assert_eq!(stream(&["{\"mood\": 3, \"say\":\"", "ok\"}"]), "ok");
        assert_eq!(
            stream(&["{\"say\": \"a\\u00", "e9\\ud83d", "\\ude00b\"}"]),
            "aé😀b"
        );
        assert_eq!(stream(&["{\"action\": null}"]), "");
    }

    proptest! {
        /// Any text, serialized by serde_json and cut anywhere, streams back whole.
        #[test]
        fn any_chunking_gives_back_the_text(text in "\\PC{0,40}", cuts in proptest::collection::vec(0usize..200, 0..8)) {
            let json = serde_json::json!({"say": text, "action": {"kind": "Wave", "say": "x"}}).to_string();
            let mut bounds: Vec<usize> = cuts.into_iter().map(|c| c % (json.len() + 1)).filter(|c| json.is_char_boundary(*c)).collect();
            bounds.sort_unstable();
            bounds.dedup();
            let mut chunks = Vec::new();
            let mut last = 0;
            for b in bounds { chunks.push(&json[last..b]); last = b; }
            chunks.push(&json[last..]);
            prop_assert_eq!(stream(&chunks), text);
        }
    }
}
