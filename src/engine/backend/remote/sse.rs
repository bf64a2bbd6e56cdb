//! The OpenAI streaming format: server-sent events whose `data:` fields
//! hold JSON chunks, ended by `data: [DONE]`.

use serde_json::Value;

/// One decoded event of a completion stream.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Chunk {
    /// Generated text (possibly empty, e.g. the role-only first chat delta),
    /// with the finish reason when this chunk ends the answer.
    Delta {
        text: String,
        finish: Option<String>,
        /// `usage.prompt_tokens` when the server reports it.
        prompt_tokens: Option<usize>,
        /// `usage.completion_tokens` when the server reports it.
        completion_tokens: Option<usize>,
        /// Prompt tokens the server took from its prompt cache
        /// (llama-server's `timings.cache_n`).
        cached_tokens: Option<usize>,
    },
    /// `data: [DONE]`.
    Done,
}

/// Most bytes of one event, all its `data:` lines together (one token's
/// chunk is a few hundred bytes; the cap per line alone would let an event
/// of many lines grow without bound).
pub(crate) const MAX_SSE_EVENT: usize = 1 << 20;

/// Assembles SSE lines into events (`data:` lines up to a blank line).
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    data: Option<String>,
}

impl SseParser {
    /// Feed one line (without its line ending). Returns a chunk when the
    /// line completed an event.
    pub(crate) fn line(&mut self, line: &str) -> Result<Option<Chunk>, String> {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return match self.data.take() {
                Some(data) => parse_data(&data).map(Some),
                None => Ok(None),
            };
        }
        if line.starts_with(':') {
            return Ok(None); // comment / keep-alive
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                let held = self.data.as_ref().map_or(0, |d| d.len() + 1);
                if held + value.len() > MAX_SSE_EVENT {
                    self.data = None;
                    return Err(format!("an event is longer than {MAX_SSE_EVENT} bytes"));
                }
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => self.data = Some(value.to_string()),
                }
                Ok(None)
            }
            "event" | "id" | "retry" => Ok(None),
            _ => Err(format!("not a server-sent event line: {:?}", clip(line))),
        }
    }

    /// The stream ended: an event still being assembled counts.
    pub(crate) fn finish(&mut self) -> Result<Option<Chunk>, String> {
        match self.data.take() {
            Some(data) => parse_data(&data).map(Some),
            None => Ok(None),
        }
    }
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

fn parse_data(data: &str) -> Result<Chunk, String> {
    if data.trim() == "[DONE]" {
        return Ok(Chunk::Done);
    }
    let v: Value = serde_json::from_str(data)
        .map_err(|e| format!("bad JSON in a chunk ({e}): {:?}", clip(data)))?;
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map_or_else(|| err.to_string(), str::to_string);
        return Err(format!("the server reported an error mid-stream: {msg}"));
    }
    // OpenAI's `usage` (with `stream_options.include_usage`), else
    // llama-server's own `timings`.
    let field = |obj: &str, k: &str| {
        v.get(obj)
            .and_then(|u| u.get(k))
            .and_then(Value::as_u64)
            .map(|n| n as usize)
    };
    let prompt_tokens = field("usage", "prompt_tokens").or_else(|| {
        field("timings", "prompt_n")
            .zip(field("timings", "cache_n"))
            .map(|(p, c)| p + c)
    });
    let completion_tokens =
        field("usage", "completion_tokens").or_else(|| field("timings", "predicted_n"));
    let cached_tokens = field("timings", "cache_n");
    let choices = v
        .get("choices")
        .and_then(Value::as_array)
        .ok_or_else(|| format!("a chunk without `choices`: {:?}", clip(data)))?;
    let Some(choice) = choices.first() else {
        // The usage-only chunk some servers send last.
        return Ok(Chunk::Delta {
            text: String::new(),
            finish: None,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        });
    };
    let text = match (choice.get("delta"), choice.get("text")) {
        (Some(delta), _) => match delta.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => return Err(format!("`delta.content` is not text: {other}")),
        },
        (None, Some(Value::String(s))) => s.clone(),
        (None, Some(Value::Null)) => String::new(),
        _ => {
            return Err(format!(
                "a choice without `delta` or `text`: {:?}",
                clip(data)
            ));
        }
    };
    let finish = match choice.get("finish_reason") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    Ok(Chunk::Delta {
        text,
        finish,
        prompt_tokens,
        completion_tokens,
        cached_tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(p: &mut SseParser, text: &str) -> Vec<Result<Option<Chunk>, String>> {
        text.split('\n').map(|l| p.line(l)).collect()
    }

    #[test]
    fn chat_and_completion_chunks_decode() {
        let mut p = SseParser::default();
        let out = feed(
            &mut p,
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":null}}]}\n\n\
             : keep-alive\n\
             data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
             data: {\"choices\":[{\"text\":\"lo\",\"finish_reason\":\"length\"}],\"usage\":{\"prompt_tokens\":7,\"completion_tokens\":2}}\r\n\r\n\
             data: [DONE]\n\n",
        );
        let chunks: Vec<Chunk> = out.into_iter().filter_map(|r| r.unwrap()).collect();
        assert_eq!(chunks.len(), 4);
        assert!(matches!(&chunks[0], Chunk::Delta { text, .. } if text.is_empty()));
        assert!(matches!(&chunks[1], Chunk::Delta { text, .. } if text == "Hel"));
        assert_eq!(
            chunks[2],
            Chunk::Delta {
                text: "lo".into(),
                finish: Some("length".into()),
                prompt_tokens: Some(7),
                completion_tokens: Some(2),
                cached_tokens: None,
            }
        );
        // llama-server's own figures when there is no `usage`.
        let mut p = SseParser::default();
        p.line(r#"data: {"choices":[{"delta":{},"finish_reason":"stop"}],"timings":{"cache_n":20,"prompt_n":11,"predicted_n":5}}"#).unwrap();
        assert_eq!(
            p.line("").unwrap(),
            Some(Chunk::Delta {
                text: String::new(),
                finish: Some("stop".into()),
                prompt_tokens: Some(31),
                completion_tokens: Some(5),
                cached_tokens: Some(20),
            })
        );
        assert_eq!(chunks[3], Chunk::Done);
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        for bad in [
            "data: {not json}\n\n",
            "data: {\"choices\":3}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":5}}]}\n\n",
            "garbage line\n",
            "data: {\"error\":{\"message\":\"out of memory\"}}\n\n",
        ] {
            let mut p = SseParser::default();
            assert!(feed(&mut p, bad).iter().any(Result::is_err), "{bad}");
        }
        // An event of many `data:` lines is capped as a whole.
        let mut p = SseParser::default();
        let line = format!("data: {}", "x".repeat(1000));
        let fed = (0..2 * MAX_SSE_EVENT / 1000).map(|_| p.line(&line));
        let err = fed.filter_map(Result::err).next();
        assert!(err.is_some_and(|e| e.contains("longer than")));
        // Empty `data:` lines count too (each adds a line break).
        let mut p = SseParser::default();
        assert!(
            (0..MAX_SSE_EVENT + 2)
                .map(|_| p.line("data:"))
                .any(|r| r.is_err())
        );
        // An event cut off by the end of the stream still parses.
        let mut p = SseParser::default();
        p.line("data: [DONE]").unwrap();
        assert_eq!(p.finish().unwrap(), Some(Chunk::Done));
    }
}
