//! Small helpers shared by the RON-backed resources.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A RON parse failure: 1-based line and column, and a message that names
/// the field (`models[1].size_bytes: expected ...`).
pub(crate) struct RonFailure {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parse RON with `Option` fields written without `Some(...)` allowed, and
/// errors that carry position and field path.
pub(crate) fn parse_ron<T: DeserializeOwned>(text: &str) -> Result<T, RonFailure> {
    let options =
        ron::Options::default().with_default_extension(ron::extensions::Extensions::IMPLICIT_SOME);
    let spanned = |e: ron::error::SpannedError, path: String| RonFailure {
        line: e.span.start.line.max(1),
        column: e.span.start.col.max(1),
        message: if path.is_empty() || path == "." {
            e.code.to_string()
        } else {
            format!("field `{path}`: {}", e.code)
        },
    };
    let mut de = ron::Deserializer::from_str_with_options(text, &options)
        .map_err(|e| spanned(e, String::new()))?;
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        spanned(de.span_error(inner), path)
    })?;
    de.end()
        .map_err(|e| spanned(de.span_error(e), String::new()))?;
    Ok(value)
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
