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

/// Holds `<file>.lock` (our process id inside) while it lives.
struct Lock(PathBuf);

impl Lock {
    /// Take the lock, or `Busy` when a live process holds it. A lock left
    /// by a process that is gone is taken over.
    fn take(path: PathBuf) -> Result<Self, DownloadError> {
        for _ in 0..2 {
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let _ = write!(f, "{}", std::process::id());
                    return Ok(Self(path));
                }
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    let alive = holder.is_none_or(process_alive);
                    if alive {
                        return Err(DownloadError::Busy { lock: path });
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(DownloadError::Busy { lock: path })
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
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
pub(crate) fn fetch(
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
    let _lock = Lock::take(lock_path(&job.dest))?;
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
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_millis(job.settings.connect_timeout_ms))
        .timeout_read(Duration::from_millis(job.settings.read_timeout_ms))
        .build();
    let mut last = DownloadError::Network {
        url: String::new(),
        message: "no mirror tried".into(),
    };
    progress(part.len, job.size);
    'mirrors: for url in &job.urls {
        let mut attempt = 0u32;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Err(DownloadError::Cancelled);
            }
            let outcome = if part.len == job.size {
                Attempt::Complete
            } else {
                try_once(&agent, url, job, &mut part, cancel, &mut progress)?
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
