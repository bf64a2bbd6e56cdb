//! Small helpers shared by the RON-backed resources.

use std::path::{Path, PathBuf};

/// A RON parse error as (line, column, message), positions 1-based.
pub(crate) fn spanned(err: &ron::error::SpannedError) -> (usize, usize, String) {
    (
        err.span.start.line.max(1),
        err.span.start.col.max(1),
        err.code.to_string(),
    )
}

/// Resolve a relative data path the way a game expects: relative to the
/// working directory when it exists there (`cargo run`, tests), else relative
/// to `BEVY_ASSET_ROOT`, else beside the executable (a shipped game).
pub(crate) fn resolve_data_path(path: &Path) -> PathBuf {
    if path.is_absolute() || path.exists() {
        return path.to_path_buf();
    }
    let mut roots = Vec::new();
    if let Some(root) = std::env::var_os("BEVY_ASSET_ROOT") {
        roots.push(PathBuf::from(root));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        roots.push(dir.to_path_buf());
    }
    roots
        .into_iter()
        .map(|r| r.join(path))
        .find(|p| p.exists())
        .unwrap_or_else(|| path.to_path_buf())
}
