//! Reading one request's server-sent events to their end: each line bounded,
//! parsed into chunks, the text through stop strings to `Token` events, and
//! every stream ended whatever the server does — past `max_tokens` (counted
//! here), past the request's deadline, or without a token for too long.

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crossbeam_channel::Sender;

use super::RemoteConfig;
use super::sse::{Chunk, SseParser};
use crate::engine::protocol::{Event, RequestId};
use crate::engine::text_stream::StopMatcher;
use crate::errors::RemoteError;
use crate::request::FinishReason;

/// Longest event-stream line accepted from a server (one token's chunk is
/// a few hundred bytes).
const MAX_SSE_LINE: u64 = 1 << 20;

/// Most bytes of text one token may average before a stream counts as past
/// its `max_tokens` by size alone (a server that sends few, huge chunks).
const MAX_TOKEN_BYTES: usize = 64;

/// Tokens a stream may bring before it is cut with `MaxTokens`: the
/// request's `max_tokens` counted here as the server's chunks, plus a small
/// allowance (an eighth, at least 4) for servers whose chunks and tokens do
/// not match one to one. A server that honours `max_tokens` ends first.
pub(super) fn token_allowance(max_tokens: u32) -> usize {
    let max = max_tokens as usize;
    max.saturating_add((max / 8).max(4))
}

/// Why a stream stopped before its end.
pub(super) enum Stop {
    /// The request was cancelled (its terminal event already sent).
    Cancelled,
    /// The server or the connection failed.
    Failed(RemoteError),
}

/// One stream being read, and what it brought so far.
pub(super) struct Reading<'c> {
    cfg: &'c RemoteConfig,
    id: RequestId,
    started: Instant,
    pub(super) matcher: StopMatcher,
    pub(super) text: String,
    /// Chunks with text (tokens, as the server streams them).
    pub(super) tokens: usize,
    pub(super) first: Option<Instant>,
    finish: Option<FinishReason>,
    /// Prompt, generated and cached tokens as the server reports them.
    pub(super) usage: (Option<usize>, Option<usize>, Option<usize>),
    allowance: usize,
    received_bytes: usize,
    /// The token time-out counts from the last token, not the last byte:
    /// keep-alive comments and empty chunks do not restart it.
    last_token: Instant,
}

impl<'c> Reading<'c> {
    pub(super) fn new(
        cfg: &'c RemoteConfig,
        id: RequestId,
        stops: Vec<String>,
        started: Instant,
        max_tokens: u32,
    ) -> Self {
        Self {
            cfg,
            id,
            started,
            matcher: StopMatcher::new(stops),
            text: String::new(),
            tokens: 0,
            first: None,
            finish: None,
            usage: (None, None, None),
            allowance: token_allowance(max_tokens),
            received_bytes: 0,
            last_token: Instant::now(),
        }
    }

    /// Read the stream to its end: why generation ended, or why the stream
    /// stopped first (`cancelled` is asked after every line).
    pub(super) fn read(
        &mut self,
        body: impl Read,
        cancelled: impl Fn() -> bool,
        events: &Sender<Event>,
        generated: &AtomicU64,
    ) -> Result<FinishReason, Stop> {
        let mut reader = BufReader::new(body);
        let mut parser = SseParser::default();
        let mut line = String::new();
        loop {
            let (chunk, done) = self.next_chunk(&mut reader, &mut parser, &mut line)?;
            if cancelled() {
                // Cancelled: dropping the reader closes the connection.
                return Err(Stop::Cancelled);
            }
            let stopped = match chunk {
                None => false,
                Some(Chunk::Done) => {
                    self.finish.get_or_insert(FinishReason::EndOfTurn);
                    break;
                }
                Some(chunk) => self.take(chunk, events, generated),
            };
            // A stop string drops the stream: the server stops generating.
            if stopped || done || self.past_limits()? {
                break;
            }
        }
        self.finish
            .ok_or(Stop::Failed(RemoteError::ClosedMidStream {
                tokens: self.tokens,
            }))
    }

    /// The next line's chunk, if it holds one, and whether the stream
    /// ended with it.
    fn next_chunk(
        &self,
        reader: &mut impl BufRead,
        parser: &mut SseParser,
        line: &mut String,
    ) -> Result<(Option<Chunk>, bool), Stop> {
        line.clear();
        // One SSE line is bounded: a server that never sends a newline
        // cannot grow this buffer without limit.
        let read = reader.take(MAX_SSE_LINE).read_line(line);
        if matches!(read, Ok(n) if n as u64 >= MAX_SSE_LINE && !line.ends_with('\n')) {
            return Err(Stop::Failed(RemoteError::Malformed(format!(
                "an event-stream line is longer than {MAX_SSE_LINE} bytes"
            ))));
        }
        let malformed = |m| Stop::Failed(RemoteError::Malformed(m));
        match read {
            Ok(0) => parser.finish().map(|c| (c, true)).map_err(malformed),
            Ok(_) => parser
                .line(line.trim_end_matches('\n'))
                .map(|c| (c, false))
                .map_err(malformed),
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                Err(Stop::Failed(RemoteError::Timeout {
                    waited_ms: self.cfg.token_timeout.as_millis() as u64,
                }))
            }
            Err(e) if e.kind() == ErrorKind::InvalidData => Err(Stop::Failed(
                RemoteError::Malformed(format!("not UTF-8 text: {e}")),
            )),
            Err(e) => Err(Stop::Failed(RemoteError::Io(e.to_string()))),
        }
    }

    /// Take a text chunk in: usage figures, the text through the stop
    /// strings to a `Token` event, the server's finish reason. `true` when
    /// a stop string ended the text.
    fn take(&mut self, chunk: Chunk, events: &Sender<Event>, generated: &AtomicU64) -> bool {
        let Chunk::Delta {
            text: piece,
            finish: reason,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        } = chunk
        else {
            return false;
        };
        self.usage.0 = prompt_tokens.or(self.usage.0);
        self.usage.1 = completion_tokens.or(self.usage.1);
        self.usage.2 = cached_tokens.or(self.usage.2);
        if !piece.is_empty() {
            self.tokens += 1;
            self.received_bytes = self.received_bytes.saturating_add(piece.len());
            self.last_token = Instant::now();
            generated.fetch_add(1, Ordering::Relaxed);
            self.first.get_or_insert_with(Instant::now);
            let released = self.matcher.push(&piece);
            if !released.text.is_empty() {
                self.text.push_str(&released.text);
                let _ = events.send(Event::Token {
                    id: self.id,
                    text: released.text,
                });
            }
            if released.stopped {
                self.finish = Some(FinishReason::StopString);
                return true;
            }
        }
        if let Some(r) = reason {
            self.finish.get_or_insert(match r.as_str() {
                "length" => FinishReason::MaxTokens,
                _ => FinishReason::EndOfTurn,
            });
        }
        false
    }

    /// Every request ends, whatever the server does: `true` past
    /// `max_tokens` (counted here, also by size), an error past the
    /// request's deadline or without a token for too long.
    fn past_limits(&mut self) -> Result<bool, Stop> {
        let bytes = self.allowance.saturating_mul(MAX_TOKEN_BYTES);
        if self.tokens >= self.allowance || self.received_bytes > bytes {
            // Dropping the stream stops the server.
            self.finish.get_or_insert(FinishReason::MaxTokens);
            return Ok(true);
        }
        if self.started.elapsed() > self.cfg.request_timeout {
            return Err(Stop::Failed(RemoteError::Deadline {
                limit_ms: self.cfg.request_timeout.as_millis() as u64,
            }));
        }
        if self.last_token.elapsed() > self.cfg.token_timeout {
            return Err(Stop::Failed(RemoteError::Timeout {
                waited_ms: self.cfg.token_timeout.as_millis() as u64,
            }));
        }
        Ok(false)
    }
}
