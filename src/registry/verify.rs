//! Integrity checks for model files: size, then sha256 streamed in 1 MiB
//! chunks with progress, with a small cache so a verified file is not
//! re-hashed on every start.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::errors::VerifyError;

const CHUNK: usize = 1 << 20;

/// How a file passed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// The file was hashed now.
    Hashed,
    /// The cache held a verification for the same path, size and mtime.
    Cached,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CacheRecord {
    size: u64,
    mtime_ns: u64,
    sha256: String,
}

/// Remembers successful verifications as `(path, size, mtime) → sha256` in a
/// small RON file. A file whose size or mtime changed is hashed again.
#[derive(Debug, Clone)]
pub struct VerificationCache {
    path: PathBuf,
}

impl VerificationCache {
    /// A cache stored at `path` (created on first store).
    #[must_use]
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into() }
    }

    /// Where the cache lives.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> BTreeMap<String, CacheRecord> {
        std::fs::read_to_string(&self.path)
            .ok()
            .and_then(|t| ron::from_str(&t).ok())
            .unwrap_or_default()
    }

    fn key(file: &Path) -> String {
        std::fs::canonicalize(file)
            .unwrap_or_else(|_| file.to_path_buf())
            .display()
            .to_string()
    }

    /// Whether `file`, as it is now, was verified to have `sha256`.
    #[must_use]
    pub fn is_verified(&self, file: &Path, sha256: &str) -> bool {
        let Some((size, mtime_ns)) = stat(file) else {
            return false;
        };
        self.read().get(&Self::key(file)).is_some_and(|r| {
            r.size == size && r.mtime_ns == mtime_ns && r.sha256.eq_ignore_ascii_case(sha256)
        })
    }

    /// Record that `file`, as it is now, has `sha256`. Failures to write the
    /// cache are ignored (the file is simply hashed again next time).
    pub fn store(&self, file: &Path, sha256: &str) {
        let Some((size, mtime_ns)) = stat(file) else {
            return;
        };
        let mut records = self.read();
        records.insert(
            Self::key(file),
            CacheRecord {
                size,
                mtime_ns,
                sha256: sha256.to_ascii_lowercase(),
            },
        );
        if let Ok(text) = ron::ser::to_string_pretty(&records, ron::ser::PrettyConfig::default()) {
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let tmp = self.path.with_extension(format!(
                "tmp.{}.{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            if std::fs::write(&tmp, text).is_ok() {
                let _ = std::fs::rename(&tmp, &self.path);
            }
        }
    }
}

fn stat(file: &Path) -> Option<(u64, u64)> {
    let meta = std::fs::metadata(file).ok()?;
    let mtime = meta.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    Some((
        meta.len(),
        u64::try_from(mtime.as_nanos()).unwrap_or(u64::MAX),
    ))
}

/// Check that `path` is a file of `expected_size` bytes whose sha256 is
/// `expected_sha256`, reading it in 1 MiB chunks. `progress(done, total)` is
/// called after each chunk; returning `false` aborts. With a `cache`, a file
/// verified before (same path, size and mtime) is not read again, and a
/// successful hash is recorded.
///
/// # Errors
/// [`VerifyError`]: missing file, not a file, I/O, size or hash mismatch, aborted.
pub fn verify_model_file(
    path: &Path,
    expected_sha256: &str,
    expected_size: u64,
    cache: Option<&VerificationCache>,
    mut progress: impl FnMut(u64, u64) -> bool,
) -> Result<VerifyOutcome, VerifyError> {
    if expected_sha256.is_empty() {
        return Err(VerifyError::NoSha256(path.to_path_buf()));
    }
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(VerifyError::Missing(path.to_path_buf()));
        }
        Err(e) => {
            return Err(VerifyError::Io {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
    };
    if !meta.is_file() {
        return Err(VerifyError::NotAFile(path.to_path_buf()));
    }
    if meta.len() != expected_size {
        return Err(VerifyError::SizeMismatch {
            path: path.to_path_buf(),
            expected: expected_size,
            actual: meta.len(),
        });
    }
    if let Some(cache) = cache
        && cache.is_verified(path, expected_sha256)
    {
        progress(expected_size, expected_size);
        return Ok(VerifyOutcome::Cached);
    }
    let io_err = |e: std::io::Error| VerifyError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let actual = hash_reader(file, |done| progress(done, expected_size))
        .map_err(io_err)?
        .ok_or(VerifyError::Aborted)?;
    if !actual.eq_ignore_ascii_case(expected_sha256) {
        return Err(VerifyError::Sha256Mismatch {
            path: path.to_path_buf(),
            expected: expected_sha256.to_ascii_lowercase(),
            actual,
        });
    }
    if let Some(cache) = cache {
        cache.store(path, &actual);
    }
    Ok(VerifyOutcome::Hashed)
}

/// Lower-case hex of a sha256 digest.
pub(crate) fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of everything `reader` yields, in 1 MiB chunks; `progress(done)`
/// returning false stops early (`Ok(None)`).
pub(crate) fn hash_reader(
    mut reader: impl Read,
    mut progress: impl FnMut(u64) -> bool,
) -> std::io::Result<Option<String>> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        if !progress(done) {
            return Ok(None);
        }
    }
    Ok(Some(hex(&hasher.finalize())))
}

/// sha256 of a file, lower-case hex.
pub(crate) fn sha256_file(path: &Path) -> std::io::Result<String> {
    hash_reader(std::fs::File::open(path)?, |_| true).map(Option::unwrap_or_default)
}
