//! The model registry: which models a game knows, where their files are and
//! how to check and prompt them, read from a RON manifest
//! (`assets/models/models.ron`).
//!
//! ```
//! use bevy_npc_llm::registry::ModelRegistry;
//!
//! let registry = ModelRegistry::from_ron_str(
//!     r#"(models: [(
//!         id: "tiny", name: "Tiny", file: "tiny.gguf",
//!         sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
//!         size_bytes: 1000, context_length: 2048, quantization: "Q4_1",
//!         memory_estimate_bytes: 2000, prompt_format: ChatTemplate, tags: ["chat"],
//!     )])"#,
//!     "assets/models",
//!     "<inline>",
//! )
//! .unwrap();
//! assert_eq!(registry.get("tiny").unwrap().context_length, 2048);
//! assert_eq!(registry.with_tag("chat").count(), 1);
//! assert!(registry.resolve("tiny").unwrap().ends_with("tiny.gguf"));
//! ```

mod from_gguf;
mod manifest;
pub(crate) mod verify;

use std::path::{Path, PathBuf};

use bevy::prelude::Resource;

pub use from_gguf::{GgufFacts, append_entry_to_ron, entry_from_gguf, write_registry_file};
pub use manifest::{
    DownloadSource, ExplicitTemplate, HardwareRequirements, ModelEntry, ModelSource, PromptFormat,
};
pub(crate) use verify::sha256_file;
pub use verify::{VerificationCache, VerifyOutcome, verify_model_file};

use crate::errors::RegistryError;
use crate::ron_util::parse_ron;
use manifest::Manifest;

/// The models a game can use. Loaded from RON by the plugin; entries can be
/// added at run time with [`ModelRegistry::add`].
#[derive(Resource, Debug, Clone, Default)]
pub struct ModelRegistry {
    models_dir: PathBuf,
    default_model: Option<String>,
    entries: Vec<ModelEntry>,
}

impl ModelRegistry {
    /// An empty registry whose relative `file`s resolve against `models_dir`.
    #[must_use]
    pub fn new(models_dir: impl Into<PathBuf>) -> Self {
        Self {
            models_dir: models_dir.into(),
            default_model: None,
            entries: Vec::new(),
        }
    }

    /// Load and validate a manifest file; relative model files resolve
    /// against the manifest's folder.
    ///
    /// # Errors
    /// [`RegistryError::Io`], [`RegistryError::Parse`] (with line, column and
    /// the field), [`RegistryError::Invalid`] or [`RegistryError::DuplicateId`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self, RegistryError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| RegistryError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::from_ron_str(&text, dir, &path.display().to_string())
    }

    /// Parse and validate manifest text. `origin` names the text in errors.
    ///
    /// # Errors
    /// As [`Self::load`], without `Io`.
    pub fn from_ron_str(
        text: &str,
        models_dir: impl Into<PathBuf>,
        origin: &str,
    ) -> Result<Self, RegistryError> {
        let manifest: Manifest = parse_ron(text).map_err(|f| RegistryError::Parse {
            origin: origin.to_string(),
            line: f.line,
            column: f.column,
            message: f.message,
        })?;
        let mut registry = Self::new(models_dir);
        for entry in manifest.models {
            registry.add(entry)?;
        }
        if let Some(default) = manifest.default_model {
            registry.set_default_model(&default)?;
        }
        Ok(registry)
    }

    /// Add an entry after validating it.
    ///
    /// # Errors
    /// [`RegistryError::Invalid`] or [`RegistryError::DuplicateId`].
    pub fn add(&mut self, mut entry: ModelEntry) -> Result<(), RegistryError> {
        validate_entry(&mut entry)?;
        if self.get(&entry.id).is_some() {
            return Err(RegistryError::DuplicateId(entry.id));
        }
        self.entries.push(entry);
        Ok(())
    }

    /// Choose the model used for `model: "auto"` when nothing better is known.
    ///
    /// # Errors
    /// [`RegistryError::UnknownModel`].
    pub fn set_default_model(&mut self, id: &str) -> Result<(), RegistryError> {
        self.require(id)?;
        self.default_model = Some(id.to_string());
        Ok(())
    }

    /// The entry with this id.
    #[must_use]
    pub fn get(&self, id: &str) -> Option<&ModelEntry> {
        self.entries.iter().find(|e| e.id == id)
    }

    /// The entry with this id, or an error listing the known ids.
    ///
    /// # Errors
    /// [`RegistryError::UnknownModel`].
    pub fn require(&self, id: &str) -> Result<&ModelEntry, RegistryError> {
        self.get(id).ok_or_else(|| RegistryError::UnknownModel {
            id: id.to_string(),
            known: self
                .entries
                .iter()
                .map(|e| e.id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// All entries, in manifest order.
    pub fn iter(&self) -> impl Iterator<Item = &ModelEntry> {
        self.entries.iter()
    }

    /// Entries carrying `tag`.
    pub fn with_tag<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a ModelEntry> + 'a {
        self.entries.iter().filter(move |e| e.has_tag(tag))
    }

    /// Number of entries.
    #[must_use]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the registry has no entries.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The folder relative model files resolve against.
    #[must_use]
    pub fn models_dir(&self) -> &Path {
        &self.models_dir
    }

    /// The default model: the manifest's `default_model`, else the first
    /// entry tagged `default`, else the first entry.
    #[must_use]
    pub fn default_model(&self) -> Option<&ModelEntry> {
        self.default_model
            .as_deref()
            .and_then(|id| self.get(id))
            .or_else(|| self.with_tag("default").next())
            .or_else(|| self.entries.first())
    }

    /// Resolve `"auto"` or an id to an entry.
    ///
    /// # Errors
    /// [`RegistryError::UnknownModel`] (also for `"auto"` on an empty registry).
    pub fn select(&self, id_or_auto: &str) -> Result<&ModelEntry, RegistryError> {
        if id_or_auto == "auto" {
            return self.default_model().ok_or(RegistryError::UnknownModel {
                id: "auto".into(),
                known: String::new(),
            });
        }
        self.require(id_or_auto)
    }

    /// The file of an entry as a path to open.
    #[must_use]
    pub fn path_of(&self, entry: &ModelEntry) -> PathBuf {
        if entry.file.is_absolute() {
            entry.file.clone()
        } else {
            self.models_dir.join(&entry.file)
        }
    }

    /// The file of the entry with this id.
    ///
    /// # Errors
    /// [`RegistryError::UnknownModel`].
    pub fn resolve(&self, id: &str) -> Result<PathBuf, RegistryError> {
        Ok(self.path_of(self.require(id)?))
    }
}

fn validate_entry(entry: &mut ModelEntry) -> Result<(), RegistryError> {
    let id = entry.id.clone();
    let bad = |field, message: String| {
        Err(RegistryError::Invalid {
            id: id.clone(),
            field,
            message,
        })
    };
    if entry.id.is_empty()
        || !entry
            .id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
    {
        return bad(
            "id",
            "must be non-empty and use only a-z, 0-9, '.', '_' and '-'".into(),
        );
    }
    if entry.name.trim().is_empty() {
        return bad("name", "must not be empty".into());
    }
    if entry.file.as_os_str().is_empty() {
        return bad("file", "must not be empty".into());
    }
    // A relative file stays inside the models folder (a download writes
    // there); an absolute path is the documented way to point elsewhere.
    if !entry.file.is_absolute()
        && entry.file.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    {
        return bad(
            "file",
            format!(
                "`{}` leaves the models folder: a relative path may not use `..` \
                 (or a root or drive prefix); give an absolute path to use a file elsewhere",
                entry.file.display()
            ),
        );
    }
    entry.sha256 = entry.sha256.to_ascii_lowercase();
    // Empty: not verified yet (example entries); loading and downloading
    // such an entry are refused while verification is on.
    let hex = entry.sha256.chars().all(|c| c.is_ascii_hexdigit());
    if !entry.sha256.is_empty() && (entry.sha256.len() != 64 || !hex) {
        return bad(
            "sha256",
            format!(
                "must be 64 hex digits, got {:?} ({} chars)",
                entry.sha256,
                entry.sha256.len()
            ),
        );
    }
    if entry.size_bytes == 0 {
        return bad("size_bytes", "must be greater than 0".into());
    }
    if entry.context_length < 64 {
        return bad("context_length", "must be at least 64 tokens".into());
    }
    if entry.quantization.trim().is_empty() {
        return bad("quantization", "must not be empty".into());
    }
    if let PromptFormat::Named(name) = &entry.prompt_format
        && name.trim().is_empty()
    {
        return bad("prompt_format", "a named template needs a name".into());
    }
    if let PromptFormat::Explicit(t) = &entry.prompt_format
        && t.user_prefix.is_empty()
        && t.assistant_prefix.is_empty()
    {
        return bad(
            "prompt_format",
            "an explicit template needs at least user_prefix or assistant_prefix".into(),
        );
    }
    for url in entry.download_urls() {
        // Read as the HTTP client will read it (see `crate::http`).
        if let Err(e) = crate::http::parse_http_url(&url) {
            return bad(
                "download",
                format!("not an http(s) URL the crate can use: {}", e.0),
            );
        }
    }
    let defaults = crate::settings::SamplingParams::default();
    if let Err(crate::errors::SettingsError::Invalid { field, message }) =
        defaults.with_overrides(&entry.sampling).validate()
    {
        return bad("sampling", format!("{field}: {message}"));
    }
    Ok(())
}
