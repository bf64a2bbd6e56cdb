//! Inference servers for the remote-backend tests: llama.cpp's
//! `llama-server` with the SmolLM2 model, and the misbehaving stub
//! (`tests/support/stub_openai.py`). Each is a child process killed on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::smol_file;

/// A child process killed when dropped.
pub struct Server {
    child: Child,
    pub url: String,
    pub port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn llama_server_binary() -> PathBuf {
    let path = std::env::var_os("BEVY_NPC_LLM_LLAMA_SERVER").map_or_else(
        || {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/bevy_npc_llm/llama-server/bin/llama-server")
        },
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run scripts/llama-server.sh (the README's test command does), \
         or point BEVY_NPC_LLM_LLAMA_SERVER at a llama-server binary",
        path.display()
    );
    path
}

/// A plain GET; the whole response when the status is 200.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200").then_some(out)
}

/// A plain POST of a JSON body; the response body when the status is 200.
pub fn http_post(port: u16, path: &str, body: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    if !out.starts_with("HTTP/1.1 200") {
        return None;
    }
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// How many of llama-server's slots are generating now.
pub fn busy_slots(server: &Server) -> usize {
    http_get(server.port, "/slots").map_or(0, |body| body.matches("\"is_processing\":true").count())
}

/// llama-server with SmolLM2, 8 slots, on a free port; ready when /health says so.
pub fn llama_server() -> Server {
    let port = free_port();
    let child = Command::new(llama_server_binary())
        .args(["-m"])
        .arg(smol_file())
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        // One thread: tests run in parallel on small machines, and
        // llama.cpp's spinning thread pools crawl when oversubscribed.
        .args(["-np", "8", "-c", "8192", "-t", "1", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start llama-server");
    let server = Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        port,
    };
    let start = Instant::now();
    while http_get(port, "/health").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "llama-server did not become ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    server
}

/// The stub server; `modes` are extra behaviours for every request (e.g. "auth").
pub fn stub(modes: &[&str]) -> Server {
    python_server("stub_openai.py", modes.iter().map(std::ffi::OsStr::new))
}

/// A Python server from `tests/support/` started with port 0 and `args`;
/// ready when it prints "ready PORT".
fn python_server<'a>(script: &str, args: impl IntoIterator<Item = &'a std::ffi::OsStr>) -> Server {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(script);
    let mut child = Command::new("python3")
        .arg(&script)
        .arg("0")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start python3 {}: {e}", script.display()));
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .strip_prefix("ready ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{} said {line:?}", script.display()));
    Server {
        child,
        url: format!("http://127.0.0.1:{port}"),
        port,
    }
}

/// `tests/support/file_server.py` serving `file`, logging each request as a
/// JSON line to `log`.
pub fn file_server(file: &std::path::Path, log: &std::path::Path) -> Server {
    python_server("file_server.py", [file.as_os_str(), log.as_os_str()])
}
