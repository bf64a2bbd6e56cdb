//! The remote backend: the same commands and events as the local worker,
//! served by an OpenAI-compatible server (llama.cpp's `llama-server`, vLLM,
//! Ollama). One worker thread keeps the queue and the limits; each running
//! request streams on a thread of its own (the server batches them).
//! Cancel: the request's terminal `Cancelled` is sent at once and its
//! stream thread drops the connection at the next thing the server sends.

mod reading;
mod sse;
mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use serde_json::Value;

use super::intake::Intake;
use super::{BackendKind, InferenceBackend, WorkerHandle};
use crate::engine::protocol::{
    Command, EngineCounters, Event, Knobs, LoadSpec, LoadedModelInfo, RequestId,
};
use crate::errors::{LlmError, ModelLoadError, RemoteError};
use crate::settings::{RemotePromptFormat, RemoteSettings};
use stream::{Outcome, Reply, StreamControl};

/// Resolved remote settings, shared with the stream threads.
pub(crate) struct RemoteConfig {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<crate::settings::ApiKey>,
    pub prompt_format: RemotePromptFormat,
    pub token_timeout: Duration,
    pub request_timeout: Duration,
    pub max_retries: u32,
    pub retry_backoff: Duration,
    pub agent: ureq::Agent,
}

impl RemoteConfig {
    /// `e` with every secret it may quote (the API key, credentials in a
    /// URL, secret query values) redacted: every remote error leaves the
    /// backend through this.
    pub(crate) fn redacted(&self, e: RemoteError) -> RemoteError {
        let key = self.api_key.as_ref().map(crate::settings::ApiKey::expose);
        crate::http::redact_remote_error(e, key.as_slice())
    }

    pub(crate) fn new(s: &RemoteSettings) -> Self {
        let token_timeout = Duration::from_millis(s.token_timeout_ms);
        // An https server is never followed to plain http (redirects included).
        let agent = crate::http::agent_builder_for(&s.base_url)
            .timeout_connect(Duration::from_millis(s.connect_timeout_ms))
            .timeout_read(token_timeout)
            .timeout_write(token_timeout)
            .max_idle_connections_per_host(64)
            .build();
        let mut base = s.base_url.trim().trim_end_matches('/').to_string();
        if let Some(b) = base.strip_suffix("/v1") {
            base = b.to_string();
        }
        Self {
            base_url: base,
            model: s.model.clone(),
            api_key: s.resolved_api_key(),
            prompt_format: s.prompt_format,
            token_timeout,
            request_timeout: Duration::from_millis(s.request_timeout_ms),
            max_retries: s.max_retries,
            retry_backoff: Duration::from_millis(s.retry_backoff_ms),
            agent,
        }
    }
}

/// The load spec a remote worker gets: only the name and the stream count matter.
pub(crate) fn remote_spec(settings: &crate::settings::LlmSettings) -> LoadSpec {
    LoadSpec {
        model_id: settings.remote.model.clone(),
        path: PathBuf::new(),
        verify: None,
        cache: None,
        prompt_format: crate::registry::PromptFormat::ChatTemplate,
        architecture: None,
        model_sampling: crate::settings::SamplingOverrides::default(),
        engine: crate::engine::config::EngineConfig::remote(
            settings.max_parallel_sequences,
            settings.context_per_sequence,
        ),
    }
}

/// The remote backend: an OpenAI-compatible server, through a worker
/// thread that keeps the queue and one stream thread per running request.
pub(crate) struct RemoteBackend(WorkerHandle);

impl InferenceBackend for RemoteBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Remote
    }

    fn handle(&self) -> &WorkerHandle {
        &self.0
    }

    fn into_handle(self: Box<Self>) -> WorkerHandle {
        self.0
    }
}

/// Start a remote worker for `settings` (already validated).
pub(crate) fn spawn(
    settings: &RemoteSettings,
    knobs: Knobs,
    streams: usize,
) -> Result<RemoteBackend, ModelLoadError> {
    // Settings may have changed since startup: never send a key in clear
    // text to another machine, whatever they say now.
    settings.validate()?;
    let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
    let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
    let cfg = Arc::new(RemoteConfig::new(settings));
    let abort = Arc::new(super::LoadAbort::default());
    let join = std::thread::Builder::new()
        .name("npc-llm-remote".into())
        .spawn(move || {
            let (done_tx, done_rx) = crossbeam_channel::unbounded();
            let events = ev_tx.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                RemoteWorker {
                    cfg,
                    commands: cmd_rx,
                    events: ev_tx,
                    done_tx,
                    done_rx,
                    queue: Intake::new(knobs.queue_capacity as usize),
                    active: HashMap::new(),
                    streams: streams.max(1),
                    connected: None,
                    last_error: None,
                    generated: Arc::new(AtomicU64::new(0)),
                    counters: EngineCounters::default(),
                }
                .run();
            }));
            let reason = result
                .err()
                .map(|_| "the remote worker panicked".to_string());
            let _ = events.send(Event::Stopped { reason });
        })
        .map_err(|e| {
            ModelLoadError::Backend(format!("cannot spawn the remote worker thread: {e}"))
        })?;
    Ok(RemoteBackend(WorkerHandle::from_parts(
        cmd_tx, ev_rx, abort, join,
    )))
}

/// How often the counters go out while streams run.
const COUNTERS_EVERY: Duration = Duration::from_millis(250);

/// How long the worker waits for a command with no stream running (it
/// blocks: nothing changes meanwhile).
const IDLE_WAIT: Duration = Duration::from_secs(3600);

struct RemoteWorker {
    cfg: Arc<RemoteConfig>,
    commands: Receiver<Command>,
    events: Sender<Event>,
    done_tx: Sender<(RequestId, Outcome)>,
    done_rx: Receiver<(RequestId, Outcome)>,
    queue: Intake,
    active: HashMap<RequestId, Arc<StreamControl>>,
    streams: usize,
    /// The model name in use once the server answered.
    connected: Option<String>,
    /// Why the last connection check failed (requests then fail at once).
    last_error: Option<ModelLoadError>,
    generated: Arc<AtomicU64>,
    counters: EngineCounters,
}

impl RemoteWorker {
    fn send(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn run(mut self) {
        let mut last_counters = Instant::now();
        loop {
            select! {
                recv(self.commands) -> cmd => match cmd {
                    Ok(Command::Shutdown) | Err(_) => break,
                    Ok(cmd) => self.command(cmd),
                },
                recv(self.done_rx) -> done => {
                    if let Ok((id, outcome)) = done {
                        self.active.remove(&id);
                        match outcome {
                            Outcome::Completed => self.counters.completed += 1,
                            Outcome::Failed => self.counters.failed += 1,
                            Outcome::Cancelled => {}
                        }
                        self.pump();
                        self.publish();
                    }
                },
                // While streams run, the counters (tokens generated) go out
                // every 250 ms; with none, nothing changes: block (an hour).
                default(if self.active.is_empty() { IDLE_WAIT } else { COUNTERS_EVERY }) => {}
            }
            if !self.active.is_empty() && last_counters.elapsed() >= COUNTERS_EVERY {
                self.publish();
                last_counters = Instant::now();
            }
        }
        // Shutdown: running streams end at their next read; queued ones fail.
        for control in self.active.values() {
            control.claim();
        }
        self.queue.fail_all(
            || LlmError::WorkerGone("the engine shut down".into()),
            &self.events,
        );
    }

    fn command(&mut self, cmd: Command) {
        match cmd {
            Command::Submit(jobs) => {
                let unavailable = match &self.connected {
                    None => self.last_error.as_ref(),
                    Some(_) => None,
                };
                self.counters.failed += self.queue.submit(jobs, unavailable, &self.events);
                self.pump();
            }
            Command::Cancel(id) => {
                if self.queue.cancel(id, &self.events) {
                    self.counters.cancelled += 1;
                } else if let Some(control) = self.active.get(&id)
                    && control.claim()
                {
                    self.counters.cancelled += 1;
                    self.send(Event::Cancelled { id });
                }
            }
            Command::Load(spec, _) => self.connect(&spec),
            Command::Unload => {
                if let Some(model) = self.connected.take() {
                    self.send(Event::Unloaded { model });
                }
            }
            Command::Configure(k) => self.queue.set_capacity(k.queue_capacity as usize),
            // A server keeps its KV to itself.
            Command::SaveKv(keys) => {
                let answers = keys.into_iter().map(|k| (k, Err(no_kv()))).collect();
                self.send(Event::KvSaved(answers));
            }
            Command::RestoreKv(snapshots) => {
                let answers = snapshots
                    .into_iter()
                    .map(|(k, _)| (k, Err(no_kv())))
                    .collect();
                self.send(Event::KvRestored(answers));
            }
            Command::Shutdown => {}
            #[cfg(debug_assertions)]
            Command::Crash => panic!("remote worker crash requested by a test"),
        }
        self.publish();
    }

    /// Check that the server answers (`GET /v1/models`), then serve.
    fn connect(&mut self, spec: &LoadSpec) {
        let started = Instant::now();
        let url = format!("{}/v1/models", self.cfg.base_url);
        match self.probe(&url) {
            Ok(served) => {
                let model = if self.cfg.model.is_empty() || self.cfg.model == "default" {
                    served.unwrap_or_else(|| spec.model_id.clone())
                } else {
                    self.cfg.model.clone()
                };
                self.connected = Some(model.clone());
                self.last_error = None;
                self.counters.slots = self.streams;
                self.send(Event::Loaded(Box::new(LoadedModelInfo {
                    model,
                    path: PathBuf::new(),
                    n_params: 0,
                    size_bytes: 0,
                    context_per_sequence: spec.engine.context_per_sequence,
                    sequences: self.streams as u32,
                    lanes: 1,
                    kv_bytes: 0,
                    threads: 0,
                    gpu_layers: 0,
                    has_chat_template: self.cfg.prompt_format == RemotePromptFormat::Chat,
                    hashed: false,
                    load_time: started.elapsed(),
                    remote: Some(crate::settings::redact_url(&self.cfg.base_url).into_owned()),
                })));
                self.pump();
            }
            Err(e) => {
                let error = ModelLoadError::Remote(self.cfg.redacted(e));
                self.last_error = Some(error.clone());
                self.send(Event::LoadFailed {
                    model: spec.model_id.clone(),
                    error: error.clone(),
                    still_loaded: self.connected.clone(),
                });
                if self.connected.is_none() {
                    self.counters.failed += self
                        .queue
                        .fail_all(|| LlmError::ModelUnavailable(error.clone()), &self.events);
                }
            }
        }
    }

    /// The first model id the server lists, if any.
    fn probe(&self, url: &str) -> Result<Option<String>, RemoteError> {
        let reply = stream::send_with_retries(&self.cfg, url, None, |agent| agent.get(url), None)?;
        match reply {
            Some(Reply::Ok(resp)) => {
                let v: Option<Value> = resp
                    .into_string()
                    .ok()
                    .and_then(|t| serde_json::from_str(&t).ok());
                Ok(v.and_then(|v| {
                    v.get("data")?
                        .get(0)?
                        .get("id")?
                        .as_str()
                        .map(str::to_string)
                }))
            }
            // Reachable, but no model list: fine for serving, except
            // when the server refuses our credentials.
            Some(Reply::Status(status, resp))
                if status == 401 || status == 403 || status >= 500 =>
            {
                Err(stream::status_error(url, status, resp))
            }
            Some(Reply::Status(..)) | None => Ok(None),
        }
    }

    /// Start waiting requests while streams are free.
    fn pump(&mut self) {
        if self.connected.is_none() {
            return;
        }
        while self.active.len() < self.streams {
            let Some(job) = self.queue.pop() else { break };
            let control = Arc::new(StreamControl::default());
            self.active.insert(job.id, control.clone());
            let cfg = self.cfg.clone();
            let events = self.events.clone();
            let done = self.done_tx.clone();
            let generated = self.generated.clone();
            let spawned = std::thread::Builder::new()
                .name("npc-llm-stream".into())
                .spawn(move || {
                    let outcome = stream::run(&cfg, &job, &control, &events, &generated);
                    let _ = done.send((job.id, outcome));
                });
            if let Err(e) = spawned {
                // The job moved into the closure that failed to start.
                self.send(Event::Stopped {
                    reason: Some(format!("cannot start a stream thread: {e}")),
                });
                return;
            }
        }
    }

    fn publish(&mut self) {
        self.counters.generated_tokens = self.generated.load(Ordering::Relaxed);
        self.counters.queued = self.queue.len();
        self.counters.active_sequences = self.active.len();
        self.counters.slots = self.streams;
        self.send(Event::Counters(Box::new(self.counters.clone())));
    }
}

/// Why a remote server gives no KV snapshot.
fn no_kv() -> crate::engine::kv_snapshot::KvSnapshotError {
    crate::engine::kv_snapshot::KvSnapshotError::Unavailable(
        "a remote server keeps its KV cache to itself".into(),
    )
}
