//! The inference worker thread: owns the llama.cpp backend, the model and
//! its context; receives [`Command`]s and sends [`Event`]s over
//! crossbeam channels. Nothing here ever runs on Bevy's threads.

use std::num::NonZeroU32;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, select};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;

use super::intake::Intake;
use super::{BackendKind, InferenceBackend, LoadAbort, WorkerHandle};
use crate::engine::config::EngineConfig;
use crate::engine::constraint_jobs::ConstraintJobs;
use crate::engine::kv_snapshot::KvSnapshotError;
use crate::engine::layout::Layout;
use crate::engine::model_meta::KvShape;
use crate::engine::protocol::{Command, Event, Knobs, LoadSpec, LoadTicket, LoadedModelInfo};
use crate::engine::serve::Server;
use crate::errors::{LlmError, ModelLoadError};
use crate::events::LoadPhase;
use crate::registry::{VerifyOutcome, verify_model_file};

/// The process-wide llama.cpp backend and what was found when it started.
pub(crate) struct BackendInfo {
    pub backend: LlamaBackend,
    /// Folder GPU/CPU backend modules were loaded from (dynamic-backends builds).
    pub modules_dir: Option<std::path::PathBuf>,
    /// GPU backend module files found there (e.g. `libggml-cuda.so`).
    pub gpu_modules: Vec<String>,
}

/// llama.cpp's backend may be initialised once per process; every worker
/// (and every test `App` in one binary) shares it. With the
/// `dynamic-backends` feature the ggml backend modules (best CPU variant,
/// CUDA/Vulkan when shipped) are loaded first.
pub(crate) fn backend_info(logs: bool) -> Result<&'static BackendInfo, ModelLoadError> {
    static BACKEND: OnceLock<Result<BackendInfo, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(
                llama_cpp_2::LogOptions::default().with_logs_enabled(logs),
            );
            let (modules_dir, gpu_modules) = load_backend_modules();
            LlamaBackend::init()
                .map(|backend| BackendInfo {
                    backend,
                    modules_dir,
                    gpu_modules,
                })
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| ModelLoadError::Backend(e.clone()))
}

/// The shared llama.cpp backend.
#[cfg(test)]
pub(crate) fn backend(logs: bool) -> Result<&'static LlamaBackend, ModelLoadError> {
    backend_info(logs).map(|b| &b.backend)
}

/// Folders searched for ggml backend modules, in order.
#[cfg_attr(not(feature = "dynamic-backends"), allow(dead_code))]
fn module_dirs() -> Vec<std::path::PathBuf> {
    let mut dirs = Vec::new();
    if let Some(d) = std::env::var_os("BEVY_NPC_LLM_BACKENDS_DIR") {
        dirs.push(std::path::PathBuf::from(d));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.join("backends"));
        dirs.push(dir.to_path_buf());
    }
    dirs
}

#[cfg_attr(not(feature = "dynamic-backends"), allow(dead_code))]
fn module_files(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    (n.starts_with("libggml-") || n.starts_with("ggml-"))
                        && (n.contains(".so") || n.ends_with(".dll") || n.ends_with(".dylib"))
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(feature = "dynamic-backends")]
fn load_backend_modules() -> (Option<std::path::PathBuf>, Vec<String>) {
    const GPU: [&str; 6] = ["cuda", "vulkan", "metal", "hip", "sycl", "opencl"];
    for dir in module_dirs() {
        let files = module_files(&dir);
        if files.is_empty() {
            continue;
        }
        bevy::log::info!("bevy_npc_llm: loading ggml backends from {}", dir.display());
        llama_cpp_2::llama_backend::load_backends_from_path(&dir);
        let gpu = files
            .into_iter()
            .filter(|f| GPU.iter().any(|g| f.contains(g)))
            .collect();
        return (Some(dir), gpu);
    }
    // The modules the build produced (development runs).
    llama_cpp_2::llama_backend::load_backends();
    (None, Vec::new())
}

#[cfg(not(feature = "dynamic-backends"))]
fn load_backend_modules() -> (Option<std::path::PathBuf>, Vec<String>) {
    (None, Vec::new())
}

/// Detect the machine (needs the backend initialised).
pub(crate) fn detect_hardware(info: &BackendInfo) -> crate::hardware::HardwareProfile {
    let mut profile = crate::hardware::HardwareProfile::detect();
    profile.backend_modules_dir.clone_from(&info.modules_dir);
    for module in &info.gpu_modules {
        let has_device = profile.gpus.iter().any(|g| {
            module
                .to_ascii_lowercase()
                .contains(&g.backend.to_ascii_lowercase())
        });
        if !has_device {
            profile.failed_backends.push(module.clone());
        }
    }
    profile
}

/// The local backend: llama.cpp in this process, on its own worker thread.
pub(crate) struct LocalBackend(WorkerHandle);

impl InferenceBackend for LocalBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Local
    }

    fn handle(&self) -> &WorkerHandle {
        &self.0
    }

    fn into_handle(self: Box<Self>) -> WorkerHandle {
        self.0
    }
}

impl LocalBackend {
    /// Start the worker and wait for its handshake (backend initialised).
    pub(crate) fn spawn(
        logs: bool,
        knobs: Knobs,
    ) -> Result<(Self, crate::hardware::HardwareProfile), ModelLoadError> {
        let (cmd_tx, cmd_rx) = crossbeam_channel::unbounded();
        let (ev_tx, ev_rx) = crossbeam_channel::unbounded();
        let (ready_tx, ready_rx) = crossbeam_channel::bounded(1);
        let abort = Arc::new(LoadAbort::default());
        let abort2 = abort.clone();
        let join = std::thread::Builder::new()
            .name("npc-llm-worker".into())
            .spawn(move || {
                let backend = match backend_info(logs) {
                    Ok(info) => {
                        let _ = ready_tx.send(Ok(detect_hardware(info)));
                        &info.backend
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let events = ev_tx.clone();
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
                    Worker {
                        backend,
                        commands: cmd_rx,
                        events: ev_tx,
                        abort: abort2,
                        queue: Intake::new(knobs.queue_capacity as usize),
                        knobs,
                        no_model: None,
                    }
                    .run();
                }));
                let reason = result.err().map(|p| {
                    p.downcast_ref::<&str>()
                        .map(|s| (*s).to_string())
                        .or_else(|| p.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "panic".into())
                });
                let _ = events.send(Event::Stopped { reason });
            })
            .map_err(|e| ModelLoadError::Backend(format!("cannot spawn worker thread: {e}")))?;
        match ready_rx.recv() {
            Ok(Ok(profile)) => Ok((
                Self(WorkerHandle::from_parts(cmd_tx, ev_rx, abort, join)),
                profile,
            )),
            Ok(Err(e)) => {
                let _ = join.join();
                Err(e)
            }
            Err(_) => {
                let _ = join.join();
                Err(ModelLoadError::WorkerGone)
            }
        }
    }
}

struct Worker {
    backend: &'static LlamaBackend,
    commands: Receiver<Command>,
    events: Sender<Event>,
    abort: Arc<LoadAbort>,
    queue: Intake,
    knobs: Knobs,
    /// Why the last load failed when no model is left: requests arriving
    /// after it fail at once instead of waiting for a load nobody asked for.
    no_model: Option<ModelLoadError>,
}

/// The loaded model and how it was loaded.
struct Loaded {
    model: Arc<LlamaModel>,
    spec: LoadSpec,
    info: LoadedModelInfo,
}

/// What the worker should do after serving stops.
pub(crate) enum Next {
    Load(Box<LoadSpec>, LoadTicket),
    Unload,
    Shutdown,
}

impl Worker {
    fn send(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn run(mut self) {
        let mut current: Option<Loaded> = None;
        let mut next: Option<Next> = None;
        loop {
            let step = match next.take() {
                Some(n) => n,
                None => match &current {
                    Some(loaded) => match self.serve(loaded) {
                        Ok(n) => n,
                        Err(reason) => {
                            // The context could not be created again: drop the model.
                            let model = loaded.spec.model_id.clone();
                            let engine = &loaded.spec.engine;
                            let error = context_error(engine, engine.layout(), &reason);
                            self.send(Event::LoadFailed {
                                model: model.clone(),
                                error: error.clone(),
                                still_loaded: None,
                            });
                            self.fail_queue(|| LlmError::ModelUnavailable(error.clone()));
                            self.no_model = Some(error);
                            current = None;
                            self.send(Event::Unloaded { model });
                            continue;
                        }
                    },
                    None => match self.idle() {
                        Some(n) => n,
                        None => return,
                    },
                },
            };
            match step {
                Next::Shutdown => {
                    self.fail_queue(|| LlmError::WorkerGone("the engine shut down".into()));
                    return;
                }
                Next::Unload => {
                    if let Some(old) = current.take() {
                        let model = old.spec.model_id.clone();
                        drop(old);
                        self.send(Event::Unloaded { model });
                    }
                }
                Next::Load(spec, ticket) => {
                    self.no_model = None;
                    match self.load(&spec, ticket) {
                        Ok(loaded) => {
                            if let Some(old) = current.take() {
                                let id = old.spec.model_id.clone();
                                drop(old);
                                if id != loaded.spec.model_id {
                                    self.send(Event::Unloaded { model: id });
                                }
                            }
                            self.send(Event::Loaded(Box::new(loaded.info.clone())));
                            current = Some(loaded);
                        }
                        Err(error) => {
                            let still_loaded = current.as_ref().map(|c| c.spec.model_id.clone());
                            self.send(Event::LoadFailed {
                                model: spec.model_id.clone(),
                                error: error.clone(),
                                still_loaded: still_loaded.clone(),
                            });
                            if still_loaded.is_none() {
                                self.fail_queue(|| LlmError::ModelUnavailable(error.clone()));
                                self.no_model = Some(error.clone());
                            }
                        }
                    }
                    // A command that arrived during the load may already ask for more.
                    if let Some(n) = self.drain_pending() {
                        next = Some(n);
                    }
                }
            }
        }
    }

    /// No model: wait for commands. Submitted jobs wait in the queue for the
    /// next load, or fail at once when the last load failed.
    fn idle(&mut self) -> Option<Next> {
        loop {
            let cmd = self.commands.recv().ok()?;
            if let Some(n) = self.handle_idle(cmd) {
                return Some(n);
            }
        }
    }

    fn handle_idle(&mut self, cmd: Command) -> Option<Next> {
        match cmd {
            Command::Submit(jobs) => {
                self.queue
                    .submit(jobs, self.no_model.as_ref(), &self.events);
                None
            }
            Command::Cancel(id) => {
                self.queue.cancel(id, &self.events);
                None
            }
            Command::Configure(k) => {
                self.knobs = k;
                self.queue.set_capacity(k.queue_capacity as usize);
                None
            }
            Command::SaveKv(keys) => {
                let none = || Err(KvSnapshotError::Unavailable("no model is loaded".into()));
                self.send(Event::KvSaved(
                    keys.into_iter().map(|k| (k, none())).collect(),
                ));
                None
            }
            Command::RestoreKv(snapshots) => {
                let none = || Err(KvSnapshotError::Unavailable("no model is loaded".into()));
                let answers = snapshots.into_iter().map(|(k, _)| (k, none())).collect();
                self.send(Event::KvRestored(answers));
                None
            }
            Command::Load(spec, ticket) => Some(Next::Load(spec, ticket)),
            Command::Unload => Some(Next::Unload),
            Command::Shutdown => Some(Next::Shutdown),
            #[cfg(debug_assertions)]
            Command::Crash => panic!("crash requested by a test"),
        }
    }

    /// Handle commands that arrived while loading, without blocking. Of
    /// several load/unload commands only the newest counts; shutdown wins.
    fn drain_pending(&mut self) -> Option<Next> {
        let mut next = None;
        while let Ok(cmd) = self.commands.try_recv() {
            match self.handle_idle(cmd) {
                Some(Next::Shutdown) => return Some(Next::Shutdown),
                Some(n) => next = Some(n),
                None => {}
            }
        }
        next
    }

    fn fail_queue(&mut self, error: impl Fn() -> LlmError) {
        self.queue.fail_all(error, &self.events);
    }

    /// Check the file (size and sha256 unless verification is off or
    /// cached), reporting progress; `true` when it was hashed now.
    fn verify(&self, spec: &LoadSpec, ticket: LoadTicket) -> Result<bool, ModelLoadError> {
        let Some((sha, size)) = &spec.verify else {
            if !spec.path.is_file() {
                return Err(crate::errors::VerifyError::Missing(spec.path.clone()).into());
            }
            return Ok(false);
        };
        let mut last = -1.0f32;
        let outcome = verify_model_file(
            &spec.path,
            sha,
            *size,
            spec.cache.as_ref(),
            |done, total| {
                let p = if total == 0 {
                    1.0
                } else {
                    done as f32 / total as f32
                };
                if p - last >= 0.02 || p >= 1.0 {
                    last = p;
                    let _ = self.events.send(Event::Loading {
                        model: spec.model_id.clone(),
                        phase: LoadPhase::Verifying,
                        progress: p,
                    });
                }
                !self.abort.stops(ticket)
            },
        )?;
        Ok(outcome == VerifyOutcome::Hashed)
    }

    fn load(&mut self, spec: &LoadSpec, ticket: LoadTicket) -> Result<Loaded, ModelLoadError> {
        let started = Instant::now();
        let id = spec.model_id.clone();
        let hashed = self.verify(spec, ticket)?;
        let model = self.open_model(spec, ticket)?;
        let n_train = model.n_ctx_train().max(64);
        let mut spec = spec.clone();
        spec.engine.context_per_sequence = spec.engine.context_per_sequence.min(n_train);
        let per_seq = spec.engine.context_per_sequence;
        let has_chat_template = model.chat_template(None).is_ok();
        // Check once that the prompt format works and the context fits.
        crate::engine::prompt::PromptRenderer::new(&model, &spec.prompt_format).map_err(
            |message| ModelLoadError::Llama {
                path: spec.path.clone(),
                message,
            },
        )?;
        let layout = self.fitting_layout(&model, &spec.engine)?;
        spec.engine.lanes = layout.lanes() as u32;
        let info = LoadedModelInfo {
            model: id.clone(),
            path: spec.path.clone(),
            n_params: model.n_params(),
            size_bytes: model.size(),
            context_per_sequence: per_seq,
            sequences: spec.engine.sequences,
            lanes: spec.engine.lanes,
            kv_bytes: layout.kv_cells(per_seq) * KvShape::of(&model).bytes_per_cell(),
            threads: spec.engine.threads,
            gpu_layers: spec.engine.gpu_layers.min(model.n_layer() + 1),
            has_chat_template,
            remote: None,
            hashed,
            load_time: started.elapsed(),
        };
        Ok(Loaded {
            model: Arc::new(model),
            spec,
            info,
        })
    }

    /// The model file opened by llama.cpp (progress reported, stopped when
    /// a newer load asks), and its architecture checked against the entry's.
    fn open_model(
        &self,
        spec: &LoadSpec,
        ticket: LoadTicket,
    ) -> Result<LlamaModel, ModelLoadError> {
        let events = self.events.clone();
        let abort = self.abort.clone();
        let id = spec.model_id.clone();
        let params = LlamaModelParams::default()
            .with_n_gpu_layers(spec.engine.gpu_layers)
            .with_progress_callback(move |p| {
                let _ = events.send(Event::Loading {
                    model: id.clone(),
                    phase: LoadPhase::Loading,
                    progress: p,
                });
                !abort.stops(ticket)
            });
        let model = LlamaModel::load_from_file(self.backend, &spec.path, &params).map_err(|e| {
            if self.abort.stops(ticket) {
                ModelLoadError::Aborted
            } else {
                ModelLoadError::Llama {
                    path: spec.path.clone(),
                    message: format!("{e} (corrupt, truncated or unsupported GGUF?)"),
                }
            }
        })?;
        if let Some(expected) = &spec.architecture {
            let found = model
                .meta_val_str("general.architecture")
                .unwrap_or_default();
            if !found.eq_ignore_ascii_case(expected) {
                return Err(ModelLoadError::WrongArchitecture {
                    path: spec.path.clone(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(model)
    }

    /// The layout the lanes' contexts fit in: every lane's context made at
    /// once, as serving holds them. Each lane has compute buffers of its
    /// own: when they do not all fit, the same slots in half as many lanes
    /// are tried, down to one, before failing the load; the layout made is
    /// the one reported and served.
    fn fitting_layout(
        &self,
        model: &LlamaModel,
        engine: &EngineConfig,
    ) -> Result<Layout, ModelLoadError> {
        let mut layout = engine.layout();
        loop {
            match lane_contexts(model, self.backend, engine, layout) {
                Ok(contexts) => {
                    drop(contexts);
                    break;
                }
                Err(e) => {
                    let e = context_error(engine, layout, &e.to_string());
                    let Some(fewer) = layout.halved() else {
                        return Err(e);
                    };
                    bevy::log::warn!(
                        "bevy_npc_llm: {} lanes (llama.cpp contexts) do not fit ({e}); trying {}",
                        layout.lanes(),
                        fewer.lanes()
                    );
                    layout = fewer;
                }
            }
        }
        Ok(layout)
    }

    /// Serve requests with a loaded model until a command needs the model
    /// changed. Running requests then fail; waiting ones stay queued.
    fn serve(&mut self, loaded: &Loaded) -> Result<Next, String> {
        let model = loaded.model.clone();
        let engine = &loaded.spec.engine;
        let contexts = lane_contexts(&model, self.backend, engine, engine.layout())
            .map_err(|e| e.to_string())?;
        let mut server = Server::new(
            &model,
            contexts,
            &loaded.spec,
            self.knobs,
            self.events.clone(),
        )
        .map_err(|e| e.to_string())?;
        let mut constraints = ConstraintJobs::new(model.clone());
        loop {
            constraints.collect();
            // Commands first: new jobs join between decode steps. With no
            // sequence running and nothing admissible, nothing can progress:
            // block on the channel and the constraint compiler (the loop
            // never spins).
            let fits = |server: &Server<'_>, p: Option<i32>| {
                p.is_some_and(|p| server.has_free_slot_for(p))
            };
            let admissible = fits(&server, self.queue.peek_priority())
                || fits(&server, constraints.peek_ready_priority());
            let cmd = if server.is_idle() && !admissible {
                select! {
                    recv(self.commands) -> c => match c {
                        Ok(c) => Some(c),
                        Err(_) => return Ok(Next::Shutdown),
                    },
                    recv(constraints.results()) -> r => {
                        if let Ok(r) = r {
                            constraints.accept(r);
                        }
                        continue;
                    },
                }
            } else {
                self.commands.try_recv().ok()
            };
            if let Some(cmd) = cmd {
                if let Some(next) = self.serve_command(cmd, &mut server, &mut constraints) {
                    return Ok(next);
                }
                continue;
            }
            // Admit waiting jobs into free slots, then run one decode step.
            // A constrained job first has its constraint compiled off this
            // thread ([`ConstraintJobs`]); one that compiles within
            // `QUICK_COMPILE` (an NPC's line schema: a few ms) still joins
            // this step, a larger one a later step, while the others go on.
            admit_compiled(&mut server, &mut constraints);
            let mut compiling = false;
            while fits(&server, self.queue.peek_priority()) {
                let Some(job) = self.queue.pop() else { break };
                if job.constraint.is_some() {
                    constraints.start(job);
                    compiling = true;
                } else {
                    server.admit(job, None);
                }
            }
            if compiling {
                constraints.settle(QUICK_COMPILE);
                admit_compiled(&mut server, &mut constraints);
            }
            server.step();
            server.send_counters(self.queue.len() + constraints.len());
        }
    }

    /// One command while serving; `Some` when serving must stop (running
    /// requests then fail; waiting ones, compiled or not, go back to the
    /// queue for the next model).
    fn serve_command(
        &mut self,
        cmd: Command,
        server: &mut Server<'_>,
        constraints: &mut ConstraintJobs,
    ) -> Option<Next> {
        let next = match cmd {
            Command::Load(spec, ticket) => Some(Next::Load(spec, ticket)),
            Command::Unload => Some(Next::Unload),
            Command::Shutdown => Some(Next::Shutdown),
            Command::Cancel(id) => {
                if !server.cancel(id)
                    && (self.queue.remove_where(|j| j.id == id).is_some() || constraints.remove(id))
                {
                    self.send(Event::Cancelled { id });
                }
                None
            }
            Command::Configure(k) => {
                self.knobs = k;
                self.queue.set_capacity(k.queue_capacity as usize);
                server.configure(k);
                None
            }
            Command::SaveKv(keys) => {
                let saved = keys.into_iter().map(|k| (k, server.save_kv(k))).collect();
                self.send(Event::KvSaved(saved));
                None
            }
            Command::RestoreKv(snapshots) => {
                let restored = snapshots
                    .into_iter()
                    .map(|(k, snapshot)| (k, server.restore_kv(k, &snapshot)))
                    .collect();
                self.send(Event::KvRestored(restored));
                None
            }
            other => self.handle_idle(other),
        }?;
        let reason = match &next {
            Next::Load(spec, _) => format!("switching to model `{}`", spec.model_id),
            Next::Unload => "model unloaded".into(),
            Next::Shutdown => "engine shut down".into(),
        };
        server.fail_all(&LlmError::ModelUnloaded { reason });
        for job in constraints.take_all().into_iter().rev() {
            self.queue.push_front(job.priority, job);
        }
        Some(next)
    }
}

/// Admit the jobs whose constraints are compiled while slots are free for them.
fn admit_compiled(server: &mut Server<'_>, constraints: &mut ConstraintJobs) {
    while constraints
        .peek_ready_priority()
        .is_some_and(|p| server.has_free_slot_for(p))
    {
        let Some((job, compiled)) = constraints.pop_ready() else {
            break;
        };
        server.admit(job, Some(compiled));
    }
}

/// How long a step waits for constraints that started compiling at its
/// boundary: an NPC's line schema compiles in a few milliseconds and so
/// starts in this step, as it did when it compiled on the worker; a large
/// schema, or the first one of a model (its vocabulary's token trie), goes
/// on compiling while this step runs.
const QUICK_COMPILE: std::time::Duration = std::time::Duration::from_millis(3);

/// The load error for contexts of `layout` that llama.cpp could not make.
fn context_error(engine: &EngineConfig, layout: Layout, message: &str) -> ModelLoadError {
    let n_seq = layout.per_lane();
    ModelLoadError::Context {
        n_ctx: engine.context_per_sequence * n_seq,
        n_seq,
        message: message.to_string(),
    }
}

/// One context per lane of `layout`, each for its share of the slots.
fn lane_contexts<'m>(
    model: &'m LlamaModel,
    backend: &LlamaBackend,
    engine: &EngineConfig,
    layout: Layout,
) -> Result<Vec<llama_cpp_2::context::LlamaContext<'m>>, llama_cpp_2::LlamaContextLoadError> {
    (0..layout.lanes())
        .map(|_| model.new_context(backend, context_params(engine, layout)))
        .collect()
}

/// One lane's context: its share of the slots (all of them with one lane).
/// A step may hold one output per sequence, so the batch holds at least one
/// token more than there are sequences (llama.cpp aborts the process
/// otherwise; settings validation refuses such values first).
pub(crate) fn context_params(engine: &EngineConfig, layout: Layout) -> LlamaContextParams {
    let spec = engine;
    let n_seq = layout.per_lane();
    let n_ctx = spec.context_per_sequence * n_seq;
    let n_batch = spec.batch_size.max(n_seq + 1);
    LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_batch.min(512))
        .with_swa_full(spec.swa_full)
        .with_n_seq_max(n_seq)
        .with_n_threads(spec.threads as i32)
        .with_n_threads_batch(spec.threads as i32)
        .with_kv_unified(spec.kv_unified)
        .with_flash_attention_policy(match spec.flash_attention {
            None => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_AUTO,
            Some(true) => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED,
            Some(false) => llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED,
        })
}
