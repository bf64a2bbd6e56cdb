//! One model download, on its own thread: lock file, disk-space check,
//! `<file>.part` with HTTP Range resume (also across restarts), sha256 while
//! writing, mirrors in order with retries and back-off, size and hash check,
//! fsync and an atomic rename. Decisions about replies are in
//! [`resume`](super::resume).

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::resume::{Reply, Step, backoff, content_range_start, on_reply};
use crate::errors::DownloadError;
use crate::settings::DownloadSettings;

/// What to download.
#[derive(Debug, Clone)]
pub(crate) struct FetchJob {
    pub urls: Vec<String>,
    pub dest: PathBuf,
    pub sha256: String,
    pub size: u64,
    pub settings: DownloadSettings,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> DownloadError + '_ {
    move |e| DownloadError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The partial file of a download to `dest`.
pub(crate) fn part_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".part")
}

/// The lock file of a download to `dest`.
pub(crate) fn lock_path(dest: &Path) -> PathBuf {
    with_suffix(dest, ".lock")
}

/// A lock untouched for this long is stale whoever wrote it: a running
/// download refreshes its lock's modification time every
/// [`LOCK_HEARTBEAT`] (while bytes arrive and while it waits to retry), so
/// only a lock whose holder died (or a PID that was reused) gets this old.
pub(crate) const LOCK_STALE_AFTER: Duration = Duration::from_secs(120);
/// How often a running download refreshes its lock.
const LOCK_HEARTBEAT: Duration = Duration::from_secs(10);
/// An empty or unreadable lock younger than this may be one another process
/// has just created and not yet written: it is respected that long.
const LOCK_WRITE_GRACE: Duration = Duration::from_secs(2);

/// Locks this process holds now (a second download of the same file in
/// this process is `Busy`, whatever the lock file says).
static HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// A number drawn once per process, written into its locks beside the PID:
/// after a crash, a new process in a fresh PID namespace may get the same
/// PID, but never the same number.
fn process_nonce() -> u64 {
    static NONCE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *NONCE.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish()
    })
}

/// Who wrote a lock file, as far as its text tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LockHolder {
    /// Empty, unreadable or not a lock we wrote.
    Unknown,
    /// A process id, and the writer's per-process number (absent in locks
    /// written by older versions).
    Process { pid: u32, nonce: Option<u64> },
}

impl LockHolder {
    fn parse(text: &str) -> Self {
        let mut it = text.split_whitespace();
        let pid = it.next().and_then(|p| p.parse::<u32>().ok());
        let nonce = it.next().and_then(|n| n.parse::<u64>().ok());
        match pid {
            Some(pid) => Self::Process { pid, nonce },
            None => Self::Unknown,
        }
    }
}

/// Whether a lock file another download may hold is stale and may be taken
/// over (pure: the caller reads the file, its age and whether the process
/// runs). A lock is respected only while its holder can be alive: a
/// process that runs, that is not this process (whose own locks are in
/// [`HELD`]), and that touched the lock within [`LOCK_STALE_AFTER`].
pub(crate) fn lock_is_stale(
    holder: LockHolder,
    age: Option<Duration>,
    own_pid: u32,
    alive: impl Fn(u32) -> bool,
) -> bool {
    // Unknown age (a clock that went backwards, no mtime): judged by content.
    let older_than = |d: Duration| age.is_some_and(|a| a > d);
    match holder {
        LockHolder::Unknown => older_than(LOCK_WRITE_GRACE),
        // Our PID, but not one of our locks: a process before us had it.
        LockHolder::Process { pid, .. } if pid == own_pid => true,
        LockHolder::Process { pid, .. } => !alive(pid) || older_than(LOCK_STALE_AFTER),
    }
}

/// Holds `<file>.lock` (our process id and number inside) while it lives.
struct Lock {
    path: PathBuf,
    touched: Instant,
}

impl Lock {
    /// Take the lock, or `Busy` when a download that may still run holds it
    /// (see [`lock_is_stale`]); a stale lock is taken over.
    fn take(path: PathBuf) -> Result<Self, DownloadError> {
        let mut held = HELD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.contains(&path) {
            return Err(DownloadError::Busy { lock: path });
        }
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = write!(f, "{} {}", std::process::id(), process_nonce());
                    held.push(path.clone());
                    return Ok(Self {
                        path,
                        touched: Instant::now(),
                    });
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .map_or(LockHolder::Unknown, |t| LockHolder::parse(&t));
                    let age = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok());
                    if !lock_is_stale(holder, age, std::process::id(), process_alive) {
                        return Err(DownloadError::Busy { lock: path });
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(DownloadError::Busy { lock: path })
    }

    /// Refresh the lock's modification time (at most every
    /// [`LOCK_HEARTBEAT`]), so other processes see the download is alive.
    fn touch(&mut self) {
        if self.touched.elapsed() < LOCK_HEARTBEAT {
            return;
        }
        self.touched = Instant::now();
        if let Ok(f) = OpenOptions::new().write(true).open(&self.path) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let mut held = HELD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        held.retain(|p| *p != self.path);
    }
}

/// Whether process `pid` runs (Linux: `/proc/<pid>`; elsewhere assumed).
fn process_alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Free bytes on the disk holding `dir` (the mount point with the longest
/// matching prefix); `None` when unknown.
fn free_space(dir: &Path) -> Option<u64> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list().ok()?;
    disks
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(sysinfo::Disk::available_space)
}

/// Whether the settings (and this build) allow fetching from `url`.
fn check_url(url: &str, settings: &DownloadSettings) -> Result<(), DownloadError> {
    let refused = |reason: &str| {
        Err(DownloadError::Refused {
            url: crate::settings::redact_url(url).into_owned(),
            reason: reason.into(),
        })
    };
    if let Err(e) = crate::http::parse_http_url(url) {
        return refused(&e.0);
    }
    if url.starts_with("https://") {
        if cfg!(feature = "remote-tls") {
            Ok(())
        } else {
            refused("https needs the crate's `remote-tls` feature")
        }
    } else if url.starts_with("http://") {
        if settings.allow_http {
            Ok(())
        } else {
            refused("plain http is off (`downloads.allow_http`)")
        }
    } else {
        refused("not an http(s) URL")
    }
}

/// The partial file and the hash of what it holds.
struct Partial {
    path: PathBuf,
    file: File,
    hasher: Sha256,
    len: u64,
}

impl Partial {
    /// Open (or create) the partial file and hash what it already holds.
    fn open(path: PathBuf, cancel: &AtomicBool) -> Result<Self, DownloadError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io_err(&path))?;
        let mut hasher = Sha256::new();
        let mut len = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(DownloadError::Cancelled);
            }
            let n = file.read(&mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            len += n as u64;
        }
        Ok(Self {
            path,
            file,
            hasher,
            len,
        })
    }

    fn reset(&mut self) -> Result<(), DownloadError> {
        self.file.set_len(0).map_err(io_err(&self.path))?;
        self.file
            .seek(SeekFrom::Start(0))
            .map_err(io_err(&self.path))?;
        self.hasher = Sha256::new();
        self.len = 0;
        Ok(())
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), DownloadError> {
        self.file.write_all(bytes).map_err(io_err(&self.path))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }
}

/// How one attempt at one mirror ended.
enum Attempt {
    /// The whole file is on disk (not yet verified).
    Complete,
    /// Broken or transient: try this mirror again (resuming).
    Retry(DownloadError),
    /// Throw away the partial file, then try this mirror again.
    RetryFromZero,
    /// This mirror cannot serve the file.
    NextMirror(DownloadError),
}

/// Download `job` to its destination. `progress(done, total)` is called as
/// bytes arrive; `cancel` stops at the next read (the partial file stays).
/// Errors are redacted ([`crate::http::redact`]): a mirror's credentials or
/// token never reach a message.
pub(crate) fn fetch(
    job: &FetchJob,
    cancel: &AtomicBool,
    progress: impl FnMut(u64, u64),
) -> Result<PathBuf, DownloadError> {
    fetch_unredacted(job, cancel, progress).map_err(crate::http::redact_download_error)
}

fn fetch_unredacted(
    job: &FetchJob,
    cancel: &AtomicBool,
    mut progress: impl FnMut(u64, u64),
) -> Result<PathBuf, DownloadError> {
    if job.settings.offline {
        return Err(DownloadError::Offline);
    }
    for url in &job.urls {
        check_url(url, &job.settings)?;
    }
    let dir = job
        .dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut lock = Lock::take(lock_path(&job.dest))?;
    let part_file = part_path(&job.dest);
    let mut part = Partial::open(part_file.clone(), cancel)?;
    if part.len > job.size {
        part.reset()?;
    }
    let needed = job.size - part.len;
    if let Some(available) = free_space(&dir)
        && available < needed
    {
        return Err(DownloadError::NotEnoughDisk {
            dir,
            needed,
            available,
        });
    }
    // One agent a mirror: one that starts at https never follows a
    // redirect to plain http.
    let agent_for = |url: &str| {
        crate::http::agent_builder_for(url)
            .timeout_connect(Duration::from_millis(job.settings.connect_timeout_ms))
            .timeout_read(Duration::from_millis(job.settings.read_timeout_ms))
            .build()
    };
    let mut last = DownloadError::Network {
        url: String::new(),
        message: "no mirror tried".into(),
    };
    progress(part.len, job.size);
    'mirrors: for url in &job.urls {
        let agent = agent_for(url);
        let mut attempt = 0u32;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(DownloadError::Cancelled);
            }
            let outcome = if part.len == job.size {
                Attempt::Complete
            } else {
                try_once(&agent, url, job, &mut part, cancel, &mut |done, total| {
                    lock.touch();
                    progress(done, total);
                })?
            };
            match outcome {
                Attempt::Complete => match finish(job, part) {
                    Ok(path) => return Ok(path),
                    Err(e @ DownloadError::HashMismatch { .. })
                    | Err(e @ DownloadError::SizeMismatch { .. }) => {
                        // This mirror's file is wrong; the next one may not be.
                        last = e;
                        part = Partial::open(part_file.clone(), cancel)?;
                        continue 'mirrors;
                    }
                    Err(e) => return Err(e),
                },
                Attempt::NextMirror(e) => {
                    last = e;
                    continue 'mirrors;
                }
                Attempt::RetryFromZero => part.reset()?,
                Attempt::Retry(e) => last = e,
            }
            if attempt >= job.settings.max_retries {
                continue 'mirrors;
            }
            let wait = backoff(
                Duration::from_millis(job.settings.retry_backoff_ms),
                attempt,
            );
            attempt += 1;
            let until = Instant::now() + wait;
            while Instant::now() < until {
                if cancel.load(Ordering::Relaxed) {
                    return Err(DownloadError::Cancelled);
                }
                lock.touch();
                std::thread::sleep(Duration::from_millis(20).min(wait));
            }
        }
    }
    if part.len == 0 {
        // Nothing worth resuming (e.g. a wrong file was deleted): no litter.
        drop(part);
        let _ = std::fs::remove_file(&part_file);
    }
    Err(last)
}

/// One request to one mirror, writing what arrives to the partial file.
fn try_once(
    agent: &ureq::Agent,
    url: &str,
    job: &FetchJob,
    part: &mut Partial,
    cancel: &AtomicBool,
    progress: &mut impl FnMut(u64, u64),
) -> Result<Attempt, DownloadError> {
    let shown = crate::settings::redact_url(url).into_owned();
    let mut req = agent.get(url);
    if part.len > 0 {
        req = req.set("Range", &format!("bytes={}-", part.len));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(ureq::Error::Status(416, _)) => {
            return Ok(
                match on_reply(part.len, job.size, Reply::RangeNotSatisfiable) {
                    Step::Verify => Attempt::Complete,
                    _ => Attempt::RetryFromZero,
                },
            );
        }
        Err(ureq::Error::Status(status, _)) => {
            let e = DownloadError::Status { url: shown, status };
            return Ok(match on_reply(part.len, job.size, Reply::Status(status)) {
                Step::Retry => Attempt::Retry(e),
                _ => Attempt::NextMirror(e),
            });
        }
        Err(ureq::Error::Transport(t)) => {
            return Ok(Attempt::Retry(transport_error(&shown, &t, job)));
        }
    };
    let reply = match resp.status() {
        206 => Reply::Partial {
            start: resp
                .header("Content-Range")
                .and_then(content_range_start)
                .unwrap_or(u64::MAX),
        },
        200 => Reply::Full,
        other => Reply::Status(other),
    };
    match on_reply(part.len, job.size, reply) {
        Step::Append => {}
        Step::Restart => part.reset()?,
        Step::Verify => return Ok(Attempt::Complete),
        Step::RetryFromZero => return Ok(Attempt::RetryFromZero),
        Step::Retry => {
            return Ok(Attempt::Retry(DownloadError::Status {
                url: shown,
                status: resp.status(),
            }));
        }
        Step::NextMirror => {
            return Ok(Attempt::NextMirror(DownloadError::Status {
                url: shown,
                status: resp.status(),
            }));
        }
    }
    let mut body = resp.into_reader();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(DownloadError::Cancelled);
        }
        match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                // Never write past the registry's size.
                let room = (job.size - part.len).min(n as u64) as usize;
                part.append(&buf[..room])?;
                progress(part.len, job.size);
                if room < n {
                    break;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                return Ok(Attempt::Retry(DownloadError::Timeout {
                    url: shown,
                    waited_ms: job.settings.read_timeout_ms,
                }));
            }
            Err(e) => {
                return Ok(Attempt::Retry(DownloadError::Network {
                    url: shown,
                    message: e.to_string(),
                }));
            }
        }
    }
    if part.len == job.size {
        Ok(Attempt::Complete)
    } else {
        Ok(Attempt::Retry(DownloadError::Network {
            url: shown,
            message: format!("connection closed after {} of {} bytes", part.len, job.size),
        }))
    }
}

fn transport_error(url: &str, t: &ureq::Transport, job: &FetchJob) -> DownloadError {
    let text = t.to_string();
    if text.contains("timed out") || text.contains("Timeout") {
        DownloadError::Timeout {
            url: url.into(),
            waited_ms: job.settings.connect_timeout_ms,
        }
    } else {
        DownloadError::Network {
            url: url.into(),
            message: text,
        }
    }
}

/// Size and hash check, fsync, atomic rename. A wrong file is deleted.
fn finish(job: &FetchJob, part: Partial) -> Result<PathBuf, DownloadError> {
    let Partial {
        path,
        file,
        hasher,
        len,
    } = part;
    if len != job.size {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(DownloadError::SizeMismatch {
            expected: job.size,
            got: len,
        });
    }
    let found = crate::registry::verify::hex(&hasher.finalize());
    if !found.eq_ignore_ascii_case(&job.sha256) {
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(DownloadError::HashMismatch {
            expected: job.sha256.clone(),
            found,
        });
    }
    file.sync_all().map_err(io_err(&path))?;
    drop(file);
    std::fs::rename(&path, &job.dest).map_err(io_err(&job.dest))?;
    if let Some(dir) = job.dest.parent()
        && let Ok(d) = File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(job.dest.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: u32 = 4242;

    #[test]
    fn which_locks_are_stale() {
        let alive = |pid: u32| pid == 7;
        let p = |pid, nonce| LockHolder::Process { pid, nonce };
        let s = Duration::from_secs;
        let young = Some(s(1));
        let old = Some(LOCK_STALE_AFTER + s(1));
        // (holder, age, stale?)
        let table = [
            // Empty or unreadable: respected only while it may be mid-write.
            (LockHolder::Unknown, young, false),
            (LockHolder::Unknown, Some(s(3)), true),
            (LockHolder::Unknown, old, true),
            (LockHolder::Unknown, None, false),
            // This process's PID but not a lock it holds: a previous
            // process (same PID in a fresh namespace) left it.
            (p(OWN, None), young, true),
            (p(OWN, Some(1)), young, true),
            // Another process: respected while it runs and touches the lock.
            (p(7, Some(9)), young, false),
            (p(7, None), None, false),
            (p(7, Some(9)), old, true),
            (p(8, Some(9)), young, true),
        ];
        for (holder, age, stale) in table {
            assert_eq!(
                lock_is_stale(holder, age, OWN, alive),
                stale,
                "{holder:?} aged {age:?}"
            );
        }
        assert_eq!(LockHolder::parse(""), LockHolder::Unknown);
        assert_eq!(LockHolder::parse("\u{0}\u{1}garbage"), LockHolder::Unknown);
        assert_eq!(LockHolder::parse("12"), p(12, None));
        assert_eq!(LockHolder::parse("12 34\n"), p(12, Some(34)));
    }

    fn aged(path: &Path, text: &[u8], age: Duration) {
        std::fs::write(path, text).unwrap();
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.set_modified(std::time::SystemTime::now() - age).unwrap();
    }

    /// Locks a crash left behind are taken over; a live one is not.
    #[test]
    fn stale_lock_files_are_taken_over() {
        let dir = std::env::temp_dir().join(format!("npc-llm-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.gguf.lock");
        let own = std::process::id().to_string();
        let cases: [(&str, &[u8], Duration, bool); 6] = [
            ("our PID, not ours", own.as_bytes(), Duration::ZERO, true),
            ("empty, old", b"", Duration::from_secs(60), true),
            ("garbage, old", b"\xff\xfe", Duration::from_secs(60), true),
            ("empty, just created", b"", Duration::ZERO, false),
            // PID 1 always runs (in a container too).
            ("a live process", b"1 5", Duration::ZERO, false),
            (
                "a live PID, untouched for long",
                b"1 5",
                LOCK_STALE_AFTER + Duration::from_secs(5),
                true,
            ),
        ];
        for (what, text, age, taken) in cases {
            aged(&path, text, age);
            let got = Lock::take(path.clone());
            assert_eq!(got.is_ok(), taken, "{what}");
            if let Ok(lock) = got {
                // The lock now names this process, and a second taker in
                // this process is refused while it is held.
                let text = std::fs::read_to_string(&path).unwrap();
                assert_eq!(
                    LockHolder::parse(&text),
                    LockHolder::Process {
                        pid: std::process::id(),
                        nonce: Some(process_nonce())
                    }
                );
                assert!(matches!(
                    Lock::take(path.clone()),
                    Err(DownloadError::Busy { .. })
                ));
                drop(lock);
                assert!(!path.exists(), "{what}: released");
            } else {
                assert!(path.exists(), "{what}: a live lock is left alone");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
