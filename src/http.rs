//! What the crate sends over HTTP and what it keeps of the answers, in one
//! place: URLs are read with the same parser as the HTTP client (`url`,
//! which ureq uses), an agent never follows an https URL to plain http, and
//! every error text that may hold a URL or a server's words is redacted
//! here before it reaches an error, a log or the overlay.

use std::borrow::Cow;

/// What replaces a secret in text.
pub(crate) const REDACTED: &str = "<redacted>";

/// Query parameters whose values are secrets (compared without case).
const SECRET_PARAMS: &[&str] = &[
    "key",
    "api_key",
    "apikey",
    "api-key",
    "token",
    "access_token",
    "refresh_token",
    "id_token",
    "auth",
    "authorization",
    "password",
    "passwd",
    "pass",
    "secret",
    "client_secret",
    "sig",
    "signature",
    "x-amz-signature",
    "x-amz-credential",
    "x-amz-security-token",
];

/// Why a URL is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UrlProblem(pub String);

/// An `http://` or `https://` URL as the HTTP client reads it, refused when
/// another reader could take it differently: a backslash, whitespace or a
/// control character anywhere, no host, another scheme, or an authority
/// whose plain reading (`user@host:port` up to the first `/`, `?` or `#`)
/// names another host than the parser's.
pub(crate) fn parse_http_url(text: &str) -> Result<url::Url, UrlProblem> {
    let shown = || redact_url(text).into_owned();
    if let Some(c) = text
        .chars()
        .find(|c| *c == '\\' || c.is_whitespace() || c.is_control())
    {
        return Err(UrlProblem(format!(
            "`{}` holds {c:?}, which HTTP clients read differently",
            shown()
        )));
    }
    let lower = text.get(..8).unwrap_or(text).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) {
        return Err(UrlProblem(format!(
            "`{}` must start with http:// or https://",
            shown()
        )));
    }
    let url = url::Url::parse(text).map_err(|e| match e {
        url::ParseError::EmptyHost => UrlProblem(format!("`{}` names no host", shown())),
        e => UrlProblem(format!("`{}` is not a URL: {e}", shown())),
    })?;
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return Err(UrlProblem(format!("`{}` names no host", shown())));
    };
    let plain = plain_host(text).unwrap_or_default();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !plain.eq_ignore_ascii_case(host) {
        return Err(UrlProblem(format!(
            "`{}` could be read as host `{plain}` or `{host}`: write it plainly",
            shown()
        )));
    }
    Ok(url)
}

/// The host of `scheme://[user@]host[:port]/…` read naively: the authority
/// ends at the first `/`, `?` or `#`; the host follows its last `@`. IPv6
/// brackets are dropped. What the key check used to trust.
fn plain_host(text: &str) -> Option<String> {
    let rest = text.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = host.strip_prefix('[') {
        v6.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    Some(host.to_string())
}

/// Whether the parsed URL's host is this machine (`localhost`,
/// `127.0.0.0/8`, `::1`).
pub(crate) fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// An agent builder for requests that start at `url`: one that starts at
/// https never follows a redirect to plain http (ureq refuses non-https
/// requests, redirects included, once `https_only` is set).
pub(crate) fn agent_builder_for(url: &str) -> ureq::AgentBuilder {
    ureq::AgentBuilder::new().https_only(url.trim_start().starts_with("https://"))
}

/// `url` with any `user:password@` part replaced by `<redacted>@` and the
/// values of secret query parameters (`?key=`, `token=`, …) by
/// `<redacted>`, for logs and displays.
pub(crate) fn redact_url(url: &str) -> Cow<'_, str> {
    let out = redact_params(&redact_userinfo(url));
    if out == url { url.into() } else { out.into() }
}

/// Text from outside the crate (an HTTP client's error, a server's body, a
/// URL) with every secret it may hold replaced by `<redacted>`: each of
/// `secrets` (the API key) wherever it appears, `user:password@` in every
/// URL, the values of secret query parameters (`?key=`, `token=`, …) and
/// `Bearer` tokens. The one redaction every error string of the remote
/// backend and the downloads passes through.
pub(crate) fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        if out.contains(*s) {
            out = out.replace(*s, REDACTED);
        }
    }
    out = redact_userinfo(&out);
    out = redact_params(&out);
    redact_bearer(&out)
}

/// Characters that end a URL (or a value) inside free text.
fn ends_value(c: char) -> bool {
    c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`' | ')' | ']' | '}' | ',')
}

/// `scheme://user:pass@host` → `scheme://<redacted>@host`, for every URL in
/// the text (a backslash ends the authority too, as some clients read it).
fn redact_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        let (head, tail) = rest.split_at(i + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| matches!(c, '/' | '?' | '#') || ends_value(c))
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        match authority.rfind('@') {
            Some(at) => {
                out.push_str(REDACTED);
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// The values of secret query parameters.
fn redact_params(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.char_indices().peekable();
    let mut last = 0;
    while let Some((i, c)) = chars.next() {
        if !matches!(c, '?' | '&' | ';') {
            continue;
        }
        let start = i + 1;
        let Some(eq) = text[start..].find('=').map(|e| start + e) else {
            break;
        };
        let name = &text[start..eq];
        if name.contains(|c: char| matches!(c, '&' | '?' | '#') || ends_value(c))
            || !SECRET_PARAMS.iter().any(|p| p.eq_ignore_ascii_case(name))
        {
            continue;
        }
        let value_end = text[eq + 1..]
            .find(|c: char| matches!(c, '&' | '#' | ';') || ends_value(c))
            .map_or(text.len(), |e| eq + 1 + e);
        out.push_str(&text[last..=eq]);
        out.push_str(REDACTED);
        last = value_end;
        while chars.peek().is_some_and(|(j, _)| *j < value_end) {
            chars.next();
        }
    }
    out.push_str(&text[last..]);
    out
}

/// `Bearer <token>` → `Bearer <redacted>`.
fn redact_bearer(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let find = |rest: &str| {
        rest.char_indices()
            .find(|(i, _)| {
                rest[*i..]
                    .get(..7)
                    .is_some_and(|w| w.eq_ignore_ascii_case("bearer "))
            })
            .map(|(i, _)| i)
    };
    while let Some(i) = find(rest) {
        out.push_str(&rest[..i + 7]);
        let tail = &rest[i + 7..];
        let end = tail.find(ends_value).unwrap_or(tail.len());
        if end > 0 {
            out.push_str(REDACTED);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// A remote error with [`redact`] applied to every text it carries.
pub(crate) fn redact_remote_error(
    e: crate::errors::RemoteError,
    secrets: &[&str],
) -> crate::errors::RemoteError {
    use crate::errors::RemoteError as E;
    let r = |t: String| redact(&t, secrets);
    match e {
        E::Unreachable {
            url,
            attempts,
            message,
        } => E::Unreachable {
            url: r(url),
            attempts,
            message: r(message),
        },
        E::Status { url, status, body } => E::Status {
            url: r(url),
            status,
            body: r(body),
        },
        E::Malformed(m) => E::Malformed(r(m)),
        E::Io(m) => E::Io(r(m)),
        other @ (E::ClosedMidStream { .. } | E::Timeout { .. } | E::Deadline { .. }) => other,
    }
}

/// A download error with [`redact`] applied to every text it carries.
pub(crate) fn redact_download_error(
    e: crate::errors::DownloadError,
) -> crate::errors::DownloadError {
    use crate::errors::DownloadError as E;
    let r = |t: String| redact(&t, &[]);
    match e {
        E::Refused { url, reason } => E::Refused {
            url: r(url),
            reason: r(reason),
        },
        E::Status { url, status } => E::Status {
            url: r(url),
            status,
        },
        E::Network { url, message } => E::Network {
            url: r(url),
            message: r(message),
        },
        E::Timeout { url, waited_ms } => E::Timeout {
            url: r(url),
            waited_ms,
        },
        E::Io { path, message } => E::Io {
            path,
            message: r(message),
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_in_text_are_redacted() {
        let key = "sk-live-0123456789";
        let table = [
            (
                "http://alice:hunter2@example.com:8080/v1/models: Connection refused",
                &["hunter2", "alice"][..],
            ),
            (
                "https://mirror.example/m.gguf?key=abc123&x=1 failed",
                &["abc123"],
            ),
            ("GET https://h/x?a=1&Token=T0K3N#frag", &["T0K3N"]),
            ("https://h/x?sig=S1G;token=T2", &["S1G", "T2"]),
            (
                "{\"error\":\"invalid key sk-live-0123456789\"}",
                &["sk-live-0123456789"],
            ),
            ("Authorization: Bearer abc.def.ghi", &["abc.def.ghi"]),
            ("bad url http://u:p\\@evil.example@127.0.0.1/", &["u:p"]),
            ("two: http://a:b@h1/ and https://c:d@h2/", &["a:b", "c:d"]),
        ];
        for (text, gone) in table {
            let out = redact(text, &[key]);
            for g in gone {
                assert!(!out.contains(g), "{text:?} -> {out:?}");
            }
            assert!(out.contains(REDACTED), "{text:?} -> {out:?}");
        }
        // Nothing secret: unchanged.
        for plain in [
            "connection refused",
            "http://127.0.0.1:8080/v1/models: timed out",
            "https://h/x?page=2&lang=en",
            "a ? b & c = d",
        ] {
            assert_eq!(redact(plain, &[key]), plain);
        }
        // A short "secret" is never used to scrub text.
        assert_eq!(redact("abc", &["ab"]), "abc");
    }

    #[test]
    fn urls_are_read_as_the_client_reads_them() {
        for (url, host, loopback) in [
            ("http://127.0.0.1:8080", "127.0.0.1", true),
            ("http://localhost/v1", "localhost", true),
            ("http://[::1]:8080/", "[::1]", true),
            ("http://127.1.2.3", "127.1.2.3", true),
            ("https://api.example.com/v1", "api.example.com", false),
            ("http://user:pw@10.0.0.5:80/", "10.0.0.5", false),
        ] {
            let u = parse_http_url(url).unwrap_or_else(|e| panic!("{url}: {e:?}"));
            assert_eq!(u.host_str(), Some(host), "{url}");
            assert_eq!(is_loopback(&u), loopback, "{url}");
        }
        for bad in [
            // The naive split sees 127.0.0.1, the parser evil.example.
            "http://evil.example\\@127.0.0.1:8080/",
            "http://127.0.0.1\\@evil.example/",
            // Hosts the parser decodes into another one.
            "http://%31%32%37.0.0.1/",
            "http://0x7f.1/",
            "http://127.0.0.1 @evil.example/",
            "ftp://127.0.0.1/",
            "http://",
            "http:///x",
            "127.0.0.1:8080",
            "http://exa\tmple.com/",
        ] {
            assert!(parse_http_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn an_https_agent_refuses_plain_http_redirects_included() {
        // ureq checks every hop against https_only, redirects included:
        // no request to a plain http URL leaves an agent made for https.
        let agent = agent_builder_for("https://example.com/m.gguf").build();
        let err = agent.get("http://127.0.0.1:9/").call().unwrap_err();
        assert!(
            err.to_string().contains("https"),
            "refused before connecting: {err}"
        );
        let agent = agent_builder_for("http://127.0.0.1:9/").build();
        let err = agent.get("http://127.0.0.1:9/").call().unwrap_err();
        assert!(!err.to_string().contains("https_only"), "{err}");
    }
}
