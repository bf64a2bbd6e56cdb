//! Model downloads on a player's machine: [`DownloadModel`] fetches a
//! registry model from its entry's mirrors on a thread of its own (never the
//! inference worker, never a frame), resuming a partial file, checking size
//! and sha256 before the file takes its name. Progress and the outcome
//! arrive as messages; [`ModelDownloads`] holds what runs now.
//!
//! | message | when | must a game handle it? |
//! |---|---|---|
//! | [`ModelDownloadProgress`] | about ten times a second while bytes arrive | optional (progress bars) |
//! | [`ModelDownloaded`] | the file is complete and verified | yes, to load it (or send [`LoadModel`](crate::events::LoadModel)) |
//! | [`ModelDownloadFailed`] | it failed or was cancelled ([`DownloadError`]) | yes |

pub(crate) mod fetch;
pub(crate) mod resume;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bevy::prelude::*;
use crossbeam_channel::Receiver;

use crate::errors::DownloadError;
use crate::registry::ModelRegistry;
use crate::settings::LlmSettings;

/// Download a registry model's file (no-op while it is already downloading).
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct DownloadModel {
    /// Registry id.
    pub id: String,
}

/// Stop a running download; its partial file stays for a later resume.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct CancelModelDownload {
    /// Registry id.
    pub id: String,
}

/// Bytes arrived.
#[derive(Message, Debug, Clone, PartialEq, Reflect)]
pub struct ModelDownloadProgress {
    /// Registry id.
    pub id: String,
    /// Bytes on disk (a resumed download starts above 0).
    pub bytes: u64,
    /// The file's size.
    pub total: u64,
    /// Recent speed.
    pub bytes_per_s: f64,
    /// Estimated time left, when the speed is known.
    pub eta: Option<Duration>,
}

impl ModelDownloadProgress {
    /// Share done, `0.0..=1.0` (0 while the size is unknown).
    #[must_use]
    pub fn fraction(&self) -> f32 {
        if self.total == 0 {
            0.0
        } else {
            (self.bytes as f64 / self.total as f64).clamp(0.0, 1.0) as f32
        }
    }
}

/// The file is complete, verified and in place.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct ModelDownloaded {
    /// Registry id.
    pub id: String,
    /// Where the file is.
    pub path: PathBuf,
}

/// The download failed or was cancelled.
#[derive(Message, Debug, Clone, PartialEq, Eq)]
pub struct ModelDownloadFailed {
    /// Registry id.
    pub id: String,
    /// Why.
    pub error: DownloadError,
}

enum Report {
    Progress(u64, u64),
    Done(Result<PathBuf, DownloadError>),
}

struct Active {
    cancel: Arc<AtomicBool>,
    reports: Receiver<Report>,
    progress: ModelDownloadProgress,
    /// (time, bytes) of the speed window's start.
    window: (Instant, u64),
}

/// Downloads running now. Dropping it (app exit) cancels them; their
/// threads end at their next read.
#[derive(Resource, Default)]
pub struct ModelDownloads {
    active: HashMap<String, Active>,
}

impl ModelDownloads {
    /// The latest progress of a running download.
    #[must_use]
    pub fn progress(&self, id: &str) -> Option<&ModelDownloadProgress> {
        self.active.get(id).map(|a| &a.progress)
    }

    /// Every running download's latest progress.
    pub fn iter(&self) -> impl Iterator<Item = &ModelDownloadProgress> {
        self.active.values().map(|a| &a.progress)
    }

    /// Whether `id` is downloading.
    #[must_use]
    pub fn is_downloading(&self, id: &str) -> bool {
        self.active.contains_key(id)
    }

    /// Start downloading registry model `id` unless it already downloads.
    pub(crate) fn start_for(
        &mut self,
        registry: &ModelRegistry,
        settings: &LlmSettings,
        id: &str,
    ) -> Result<(), DownloadError> {
        if self.active.contains_key(id) {
            return Ok(());
        }
        let job = job_for(registry, settings, id)?;
        self.start(id, job)
    }

    fn start(&mut self, id: &str, job: fetch::FetchJob) -> Result<(), DownloadError> {
        let total = job.size;
        let cancel = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::unbounded();
        let flag = cancel.clone();
        std::thread::Builder::new()
            .name(format!("npc-llm-download-{id}"))
            .spawn(move || {
                let mut last = Instant::now() - Duration::from_secs(1);
                let result = fetch::fetch(&job, &flag, |done, total| {
                    if last.elapsed() >= Duration::from_millis(100) || done == total {
                        last = Instant::now();
                        let _ = tx.send(Report::Progress(done, total));
                    }
                });
                let _ = tx.send(Report::Done(result));
            })
            .map_err(|e| DownloadError::Io {
                path: PathBuf::new(),
                message: format!("cannot start a download thread: {e}"),
            })?;
        self.active.insert(
            id.to_string(),
            Active {
                cancel,
                reports: rx,
                progress: ModelDownloadProgress {
                    id: id.to_string(),
                    bytes: 0,
                    total,
                    bytes_per_s: 0.0,
                    eta: None,
                },
                window: (Instant::now(), 0),
            },
        );
        Ok(())
    }
}

impl Drop for ModelDownloads {
    fn drop(&mut self) {
        for a in self.active.values() {
            a.cancel.store(true, Ordering::Relaxed);
        }
    }
}

/// The job for a registry model, or why there is none.
pub(crate) fn job_for(
    registry: &ModelRegistry,
    settings: &LlmSettings,
    id: &str,
) -> Result<fetch::FetchJob, DownloadError> {
    if settings.downloads.offline {
        return Err(DownloadError::Offline);
    }
    let entry = registry
        .get(id)
        .ok_or_else(|| DownloadError::UnknownModel(id.into()))?;
    let urls = entry.download_urls();
    if urls.is_empty() {
        return Err(DownloadError::NoSource(id.into()));
    }
    if entry.sha256.is_empty() {
        return Err(DownloadError::Refused {
            url: urls[0].clone(),
            reason: "the registry entry has no sha256 to check the file against".into(),
        });
    }
    Ok(fetch::FetchJob {
        urls,
        dest: crate::ron_util::resolve_data_path(&registry.path_of(entry)),
        sha256: entry.sha256.clone(),
        size: entry.size_bytes,
        settings: settings.downloads.clone(),
    })
}

/// [`NpcLlmSystems::Control`](crate::NpcLlmSystems::Control): start and cancel downloads.
/// Whether a download was asked for or cancelled this frame.
pub(crate) fn downloads_asked_for(
    mut starts: MessageReader<DownloadModel>,
    mut cancels: MessageReader<CancelModelDownload>,
) -> bool {
    starts.read().count() + cancels.read().count() > 0
}

/// Whether a download runs (its reports wait to be read).
pub(crate) fn downloads_running(downloads: Res<ModelDownloads>) -> bool {
    !downloads.active.is_empty()
}

pub(crate) fn start_downloads(
    mut downloads: ResMut<ModelDownloads>,
    mut starts: MessageReader<DownloadModel>,
    mut cancels: MessageReader<CancelModelDownload>,
    registry: Res<ModelRegistry>,
    settings: Res<LlmSettings>,
    mut failed: MessageWriter<ModelDownloadFailed>,
) {
    for c in cancels.read() {
        if let Some(a) = downloads.active.get(&c.id) {
            a.cancel.store(true, Ordering::Relaxed);
        }
    }
    for m in starts.read() {
        if let Err(error) = downloads.start_for(&registry, &settings, &m.id) {
            failed.write(ModelDownloadFailed {
                id: m.id.clone(),
                error,
            });
        }
    }
}

/// [`NpcLlmSystems::Receive`](crate::NpcLlmSystems::Receive): progress and
/// outcomes of running downloads, as messages.
pub(crate) fn report_downloads(
    mut downloads: ResMut<ModelDownloads>,
    mut progress: MessageWriter<ModelDownloadProgress>,
    mut done: MessageWriter<ModelDownloaded>,
    mut failed: MessageWriter<ModelDownloadFailed>,
) {
    let mut ended = Vec::new();
    for (id, a) in &mut downloads.active {
        let mut moved = false;
        for r in a.reports.try_iter() {
            match r {
                Report::Progress(bytes, total) => {
                    let (t0, b0) = a.window;
                    let dt = t0.elapsed().as_secs_f64();
                    if a.progress.bytes == 0 && bytes > 0 && b0 == 0 {
                        // A resumed file: speed counts from here.
                        a.window = (Instant::now(), bytes);
                    } else if dt >= 0.5 {
                        a.progress.bytes_per_s = bytes.saturating_sub(b0) as f64 / dt;
                        a.window = (Instant::now(), bytes);
                    }
                    a.progress.bytes = bytes;
                    a.progress.total = total;
                    a.progress.eta = (a.progress.bytes_per_s > 0.0).then(|| {
                        Duration::from_secs_f64(
                            total.saturating_sub(bytes) as f64 / a.progress.bytes_per_s,
                        )
                    });
                    moved = true;
                }
                Report::Done(result) => ended.push((id.clone(), result)),
            }
        }
        if moved {
            progress.write(a.progress.clone());
        }
    }
    for (id, result) in ended {
        downloads.active.remove(&id);
        match result {
            Ok(path) => {
                info!(
                    "bevy_npc_llm: model `{id}` downloaded to {}",
                    path.display()
                );
                done.write(ModelDownloaded { id, path });
            }
            Err(error) => {
                warn!("bevy_npc_llm: download of `{id}` failed: {error}");
                failed.write(ModelDownloadFailed { id, error });
            }
        }
    }
}
