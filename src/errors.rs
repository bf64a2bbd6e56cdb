//! Typed errors, one enum per operation.
//!
//! Every error is `Clone` so it can travel inside events, and its `Display`
//! text is written for a game developer reading a log line or the overlay.

use std::path::PathBuf;

use thiserror::Error;

pub use crate::engine::kv_snapshot::KvSnapshotError;

/// Loading or editing the [`ModelRegistry`](crate::registry::ModelRegistry).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegistryError {
    /// The manifest file could not be read.
    #[error("cannot read model registry {path}: {message}")]
    Io {
        /// The manifest path.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },
    /// The manifest is not valid RON for the registry's format (wrong type,
    /// missing or unknown field, unknown prompt format, ...).
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        /// Where the text came from (a path, or `<string>`).
        origin: String,
        /// 1-based line of the problem.
        line: usize,
        /// 1-based column of the problem.
        column: usize,
        /// What RON/serde said, naming the field.
        message: String,
    },
    /// An entry parsed but holds a value that makes no sense.
    #[error("model `{id}`: invalid `{field}`: {message}")]
    Invalid {
        /// The entry's id (or its index, when the id itself is bad).
        id: String,
        /// The offending field.
        field: &'static str,
        /// Why it is invalid.
        message: String,
    },
    /// Two entries share one id.
    #[error("duplicate model id `{0}` in the registry")]
    DuplicateId(String),
    /// No entry has this id.
    #[error("no model `{id}` in the registry (known: {known})")]
    UnknownModel {
        /// The id asked for.
        id: String,
        /// The ids the registry holds, comma separated.
        known: String,
    },
}

/// Loading or validating [`LlmSettings`](crate::settings::LlmSettings).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SettingsError {
    /// The settings file exists but could not be read.
    #[error("cannot read settings {path}: {message}")]
    Io {
        /// The settings path.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },
    /// The file is not valid RON for the settings format.
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What RON/serde said, naming the field.
        message: String,
    },
    /// A value is out of range.
    #[error("invalid setting `{field}`: {message}")]
    Invalid {
        /// The setting's path, e.g. `sampling.temperature`.
        field: &'static str,
        /// Why it is invalid.
        message: String,
    },
}

/// Checking a model file against its registry entry (size and sha256).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum VerifyError {
    /// The file does not exist.
    #[error("model file not found: {0} (run scripts/fetch-models.sh or fix `file` in models.ron)")]
    Missing(PathBuf),
    /// The path exists but is not a regular file.
    #[error("model path is not a file: {0}")]
    NotAFile(PathBuf),
    /// Reading failed.
    #[error("cannot read model file {path}: {message}")]
    Io {
        /// The model path.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },
    /// The file has the wrong size (truncated or a different file).
    #[error("model file {path} has {actual} bytes, the registry expects {expected}")]
    SizeMismatch {
        /// The model path.
        path: PathBuf,
        /// Size from the registry.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },
    /// The content hash differs from the registry's.
    #[error("model file {path} has sha256 {actual}, the registry expects {expected}")]
    Sha256Mismatch {
        /// The model path.
        path: PathBuf,
        /// Hash from the registry.
        expected: String,
        /// Hash of the file.
        actual: String,
    },
    /// Verification was stopped (shutdown or a newer load request).
    #[error("verification aborted")]
    Aborted,
    /// The registry entry has no sha256 yet (an example entry): run
    /// `cargo run --example add_model` on the file to fill it in.
    #[error(
        "the registry entry for {0} has no sha256 to check it against (fill it with the add_model example)"
    )]
    NoSha256(PathBuf),
}

/// Loading a model into the inference worker.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ModelLoadError {
    /// The registry has no such model, or could not be loaded.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The machine cannot run the model asked for (or any model).
    #[error(transparent)]
    Selection(#[from] SelectionError),
    /// The remote inference server cannot be used.
    #[error("remote server: {0}")]
    Remote(RemoteError),
    /// The model file was missing and downloading it failed.
    #[error("cannot download the model: {0}")]
    Download(DownloadError),
    /// The settings forbid what was asked (e.g. an API key over plain
    /// http to another machine).
    #[error(transparent)]
    InvalidSettings(#[from] SettingsError),
    /// The file failed its integrity check; it was not loaded.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// llama.cpp refused the file (corrupt, truncated, unsupported architecture).
    #[error("llama.cpp could not load {path}: {message}")]
    Llama {
        /// The model path.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// The file is a model of another architecture than its registry entry says.
    #[error("{path} is a `{found}` model, the registry entry expects `{expected}`")]
    WrongArchitecture {
        /// The model path.
        path: PathBuf,
        /// `architecture` from the registry.
        expected: String,
        /// `general.architecture` from the GGUF.
        found: String,
    },
    /// The inference context could not be created (usually out of memory).
    #[error("cannot create an inference context ({n_ctx} tokens for {n_seq} sequences): {message}")]
    Context {
        /// Total context asked for.
        n_ctx: u32,
        /// Parallel sequences asked for.
        n_seq: u32,
        /// What failed.
        message: String,
    },
    /// The llama.cpp backend could not be initialised.
    #[error("llama.cpp backend failed to initialise: {0}")]
    Backend(String),
    /// The worker thread is gone.
    #[error("the inference worker is not running")]
    WorkerGone,
    /// The load was aborted by shutdown or by a newer load.
    #[error("model load aborted")]
    Aborted,
}

/// Why a request failed. Carried by [`LlmFailed`](crate::events::LlmFailed).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum LlmError {
    /// The engine already holds `capacity` requests; this one was rejected.
    #[error("request queue is full ({capacity} requests waiting or running)")]
    QueueFull {
        /// Queue capacity plus parallel sequences.
        capacity: usize,
    },
    /// The prompt does not fit the per-sequence context.
    #[error(
        "prompt is {tokens} tokens but a sequence holds {limit} (set `trim_prompt` on the request or raise `context_per_sequence`)"
    )]
    PromptTooLong {
        /// Prompt length in tokens.
        tokens: usize,
        /// Tokens that fit (context per sequence minus room to answer).
        limit: usize,
    },
    /// The prompt rendered to no tokens at all.
    #[error("the request has an empty prompt")]
    EmptyPrompt,
    /// The request itself is malformed (e.g. bad sampling values).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request's output constraint (JSON schema or grammar) cannot be
    /// used: it does not parse, or the backend does not support its kind.
    #[error("invalid output constraint: {0}")]
    InvalidConstraint(String),
    /// The prompt could not be rendered with the model's template.
    #[error("cannot render the prompt with the model's template: {0}")]
    Template(String),
    /// No model could be loaded to serve the request.
    #[error("no model available: {0}")]
    ModelUnavailable(ModelLoadError),
    /// The model was unloaded or switched while the request was running.
    #[error("the model was unloaded while the request ran ({reason})")]
    ModelUnloaded {
        /// What replaced or unloaded it.
        reason: String,
    },
    /// llama.cpp failed to decode.
    #[error("llama.cpp decode failed: {0}")]
    Decode(String),
    /// The KV cache had no room for this sequence's next token even in a
    /// batch of its own (llama.cpp's decode returned 1 at batch size 1).
    #[error(
        "no KV cache room: the sequence needs {needed} cells of {capacity} per sequence (raise `context_per_sequence`, or lower `max_parallel_sequences`)"
    )]
    KvCacheFull {
        /// Cells the sequence needed.
        needed: usize,
        /// Cells one sequence may hold.
        capacity: usize,
    },
    /// The inference worker stopped or crashed.
    #[error("the inference worker stopped: {0}")]
    WorkerGone(String),
    /// The remote inference server failed this request.
    #[error("remote server: {0}")]
    Remote(RemoteError),
}

/// Talking to a remote OpenAI-compatible server. Each ends the one request
/// (or the connection check) it happened to; the game keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RemoteError {
    /// No connection could be made (after the configured retries).
    #[error("cannot reach {url} after {attempts} attempt(s): {message}")]
    Unreachable {
        /// The URL asked.
        url: String,
        /// Connection attempts made.
        attempts: u32,
        /// The last error.
        message: String,
    },
    /// The server answered with an error status.
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        /// The URL asked.
        url: String,
        /// HTTP status code.
        status: u16,
        /// The start of the response body (the server's own message).
        body: String,
    },
    /// The server sent something that is not the OpenAI streaming format.
    #[error("malformed response from the server: {0}")]
    Malformed(String),
    /// The connection ended before the server said the answer was complete.
    #[error("the server closed the stream mid-answer after {tokens} token(s)")]
    ClosedMidStream {
        /// Tokens received before it closed.
        tokens: usize,
    },
    /// No token arrived for longer than `token_timeout_ms` (keep-alive
    /// comments and empty chunks do not count as tokens).
    #[error("the server sent no token for {waited_ms} ms")]
    Timeout {
        /// How long was waited.
        waited_ms: u64,
    },
    /// The whole request took longer than `request_timeout_ms`.
    #[error("the request took longer than its {limit_ms} ms deadline")]
    Deadline {
        /// The deadline.
        limit_ms: u64,
    },
    /// The connection broke while reading.
    #[error("connection error: {0}")]
    Io(String),
}

/// Choosing a model and placement for this machine.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SelectionError {
    /// The settings name a model the registry does not have.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The settings name a model this machine cannot run.
    #[error("cannot run model `{model}` here: {shortfall}")]
    CannotRun {
        /// The model asked for.
        model: String,
        /// What the machine lacks, in words.
        shortfall: String,
    },
    /// No registry model fits this machine.
    #[error("no registry model can run on this machine: {reason}")]
    NoModelFits {
        /// The closest model's shortfall.
        reason: String,
    },
}

/// Loading personas or dialogue saves.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DialogueError {
    /// A file could not be read.
    #[error("cannot read {path}: {message}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },
    /// Not valid RON for the expected format.
    #[error("{origin}:{line}:{column}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What RON/serde said, naming the field.
        message: String,
    },
    /// Parsed but inconsistent (e.g. a conversation naming an unknown NPC).
    #[error("invalid dialogue data: {0}")]
    Invalid(String),
}

/// Downloading a model file ([`DownloadModel`](crate::download::DownloadModel)).
/// Nothing is loaded from a download that failed; a partial file
/// (`<file>.part`) is kept for a later resume unless its content was wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DownloadError {
    /// The registry has no model with this id.
    #[error("no model `{0}` in the registry")]
    UnknownModel(String),
    /// The entry names no URL to download from.
    #[error("model `{0}` has no download URL in the registry")]
    NoSource(String),
    /// Downloads are switched off (`DownloadSettings::offline`).
    #[error("downloads are off (offline mode in the settings)")]
    Offline,
    /// A URL the settings do not allow (plain http) or the build cannot
    /// reach (https without the `remote-tls` feature).
    #[error("cannot download from {url}: {reason}")]
    Refused {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Not enough free disk space for the rest of the file.
    #[error("not enough disk space in {dir}: {needed} bytes needed, {available} available")]
    NotEnoughDisk {
        /// The folder the file goes to.
        dir: PathBuf,
        /// Bytes still to download.
        needed: u64,
        /// Bytes free there.
        available: u64,
    },
    /// Another download of the same file (this or another game instance)
    /// holds its lock file.
    #[error("another download of this file is running (lock {lock})")]
    Busy {
        /// The lock file.
        lock: PathBuf,
    },
    /// The server answered with an error status.
    #[error("{url} answered HTTP {status}")]
    Status {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// No connection, or it broke, after the retries.
    #[error("cannot download {url}: {message}")]
    Network {
        /// The URL.
        url: String,
        /// What failed last.
        message: String,
    },
    /// The server sent nothing for too long.
    #[error("{url} sent nothing for {waited_ms} ms")]
    Timeout {
        /// The URL.
        url: String,
        /// How long the download waited.
        waited_ms: u64,
    },
    /// The file's size is not the registry's.
    #[error("downloaded {got} bytes, the registry says {expected}")]
    SizeMismatch {
        /// Registry size.
        expected: u64,
        /// What arrived.
        got: u64,
    },
    /// The file's sha256 is not the registry's: it was deleted.
    #[error("sha256 mismatch: expected {expected}, got {found} (file deleted)")]
    HashMismatch {
        /// Registry hash.
        expected: String,
        /// Hash of what arrived.
        found: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's message.
        message: String,
    },
    /// Cancelled by [`CancelModelDownload`](crate::download::CancelModelDownload)
    /// (the partial file is kept for a resume).
    #[error("download cancelled")]
    Cancelled,
}
