//! Turning a stream of token bytes into safe text pieces: UTF-8 characters
//! split across tokens are held until whole, and stop strings are never
//! emitted, even when they arrive split across tokens.

/// Accumulates raw token bytes and releases only complete UTF-8 text.
#[derive(Debug, Default)]
pub(crate) struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Add bytes; returns the text that is now complete. Invalid sequences
    /// become U+FFFD, never a panic.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // SAFETY-free: from_utf8 said this prefix is valid.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // Incomplete trailing character: keep it for the next token.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// End of stream: whatever is left is an unfinished character.
    pub(crate) fn finish(&mut self) -> String {
        if self.pending.is_empty() {
            String::new()
        } else {
            self.pending.clear();
            char::REPLACEMENT_CHARACTER.to_string()
        }
    }
}

/// Holds back text that could be the start of a stop string.
#[derive(Debug)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
    stopped: bool,
}

/// What one push released.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Released {
    /// Text safe to emit now.
    pub text: String,
    /// A stop string was found: generation must end; nothing after it is emitted.
    pub stopped: bool,
}

impl StopMatcher {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            stopped: false,
        }
    }

    pub(crate) fn push(&mut self, text: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        // Earliest complete stop string wins.
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..pos].to_string();
            self.held.clear();
            self.stopped = true;
            return Released {
                text: out,
                stopped: true,
            };
        }
        // Keep the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for stop in &self.stops {
            let max = stop.len().saturating_sub(1).min(self.held.len());
            for n in (1..=max).rev() {
                let start = self.held.len() - n;
                if self.held.is_char_boundary(start) && stop.starts_with(&self.held[start..]) {
                    keep = keep.max(n);
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        Released {
            text: out,
            stopped: false,
        }
    }

    /// End of generation without a stop: release what was held back.
    pub(crate) fn finish(&mut self) -> String {
        if self.stopped {
            String::new()
        } else {
            std::mem::take(&mut self.held)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_pushes_is_emitted_whole() {
        let mut s = Utf8Stream::default();
        let bytes = "é😀".as_bytes();
        assert_eq!(s.push(&bytes[..1]), "");
        assert_eq!(s.push(&bytes[1..3]), "é");
        assert_eq!(s.push(&bytes[3..5]), "");
        assert_eq!(s.push(&bytes[5..]), "😀");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn invalid_utf8_becomes_replacement() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(&[b'a', 0xff, b'b']), "a\u{fffd}b");
        assert_eq!(s.push(&[0xe2, 0x82]), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_string_split_across_tokens_is_never_emitted() {
        let mut m = StopMatcher::new(vec!["\nBob:".into()]);
        let mut out = String::new();
        let mut stopped = false;
        for piece in ["Hello", " there", "\n", "Bo", "b:", " hi"] {
            let r = m.push(piece);
            out.push_str(&r.text);
            if r.stopped {
                stopped = true;
                break;
            }
        }
        assert!(stopped);
        assert_eq!(out, "Hello there");
    }

    #[test]
    fn held_text_that_is_not_a_stop_is_released() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abc ST").text, "abc ");
        assert_eq!(m.push("AR").text, "STAR");
        assert_eq!(m.push("ST").text, "");
        assert_eq!(m.finish(), "ST");
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["b".into(), "a".into()]);
        let r = m.push("xxab");
        assert_eq!(r.text, "xx");
        assert!(r.stopped);
        assert_eq!(m.push("more").text, "");
    }
}
