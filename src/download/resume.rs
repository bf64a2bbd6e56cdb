//! The downloader's decisions, model-free and network-free: what a server's
//! reply means for the partial file, and how long to wait before a retry.

use std::time::Duration;

/// What the server answered to a request for the file (from byte `have` on
/// when `have > 0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// 206 with `Content-Range: bytes START-…`.
    Partial { start: u64 },
    /// 200: the whole file from byte 0 (the server ignored `Range`).
    Full,
    /// 416: the range is past the end (the partial file may be complete).
    RangeNotSatisfiable,
    /// Another status.
    Status(u16),
}

/// What to do with the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// Write the body after the `have` bytes already on disk.
    Append,
    /// Throw the partial file away and write the body from byte 0.
    Restart,
    /// Nothing to fetch: check size and hash of what is on disk.
    Verify,
    /// Discard the partial file, then ask again from byte 0.
    RetryFromZero,
    /// A transient server error: ask this mirror again later.
    Retry,
    /// This mirror cannot serve the file: try the next one.
    NextMirror,
}

/// The decision for `reply` when `have` bytes of a `size`-byte file are on disk.
pub(crate) fn on_reply(have: u64, size: u64, reply: Reply) -> Step {
    match reply {
        Reply::Partial { start } if start == have && have < size => Step::Append,
        // A range we did not ask for: start over rather than splice.
        Reply::Partial { .. } => Step::RetryFromZero,
        Reply::Full => Step::Restart,
        Reply::RangeNotSatisfiable if have == size => Step::Verify,
        Reply::RangeNotSatisfiable => Step::RetryFromZero,
        Reply::Status(s) if s == 408 || s == 429 || s >= 500 => Step::Retry,
        Reply::Status(_) => Step::NextMirror,
    }
}

/// The wait before retry number `attempt` (0-based): `base` doubled each
/// time, at most 30 s.
pub(crate) fn backoff(base: Duration, attempt: u32) -> Duration {
    base.saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(30))
}

/// The start offset of a `Content-Range: bytes START-END/TOTAL` header.
pub(crate) fn content_range_start(header: &str) -> Option<u64> {
    let rest = header.trim().strip_prefix("bytes")?.trim_start();
    rest.split('-').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reply_for_every_partial_state() {
        // (have, size, reply) -> step
        let cases = [
            (0, 100, Reply::Full, Step::Restart),
            (40, 100, Reply::Full, Step::Restart), // Range ignored
            (40, 100, Reply::Partial { start: 40 }, Step::Append),
            (40, 100, Reply::Partial { start: 0 }, Step::RetryFromZero),
            (40, 100, Reply::Partial { start: 50 }, Step::RetryFromZero),
            (100, 100, Reply::Partial { start: 100 }, Step::RetryFromZero),
            (100, 100, Reply::RangeNotSatisfiable, Step::Verify),
            (40, 100, Reply::RangeNotSatisfiable, Step::RetryFromZero),
            (0, 100, Reply::Status(404), Step::NextMirror),
            (0, 100, Reply::Status(403), Step::NextMirror),
            (0, 100, Reply::Status(500), Step::Retry),
            (0, 100, Reply::Status(503), Step::Retry),
            (0, 100, Reply::Status(429), Step::Retry),
        ];
        for (have, size, reply, step) in cases {
            assert_eq!(on_reply(have, size, reply), step, "{have}/{size} {reply:?}");
        }
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let b = Duration::from_millis(500);
        assert_eq!(backoff(b, 0), Duration::from_millis(500));
        assert_eq!(backoff(b, 3), Duration::from_millis(4000));
        assert_eq!(backoff(b, 40), Duration::from_secs(30));
    }

    #[test]
    fn content_range_is_parsed() {
        assert_eq!(content_range_start("bytes 40-99/100"), Some(40));
        assert_eq!(content_range_start("bytes  0-0/1"), Some(0));
        assert_eq!(content_range_start("items 1-2/3"), None);
        assert_eq!(content_range_start("bytes x-1/2"), None);
    }
}
