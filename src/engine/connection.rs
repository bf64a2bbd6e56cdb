//! The Bevy side of the worker: the backend serving requests, request ids
//! and the entities they belong to, the load waiting for a download, and
//! replaced backends whose last events are still to be delivered.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use bevy::prelude::*;

use super::backend::{BackendKind, InferenceBackend, Retiring};
use super::load_intent::LoadIntent;
use super::protocol::{Event, Job, Knobs, RequestId};
use crate::errors::LlmError;

/// The Bevy side of the worker.
#[derive(Resource)]
pub(crate) struct LlmEngine {
    pub(crate) worker: Option<Box<dyn InferenceBackend>>,
    pub(crate) next_id: u64,
    pub(crate) by_id: HashMap<RequestId, Entity>,
    pub(crate) by_entity: HashMap<Entity, RequestId>,
    /// Requests whose events are dropped (entity despawned or request replaced).
    pub(crate) silent: HashSet<RequestId>,
    /// Failures decided on the main thread, delivered with the worker's events.
    pub(crate) local: Vec<Event>,
    pub(crate) verification_cache: Option<PathBuf>,
    pub(crate) knobs: Option<Knobs>,
    /// The load that waits for its model file to download, if any (the
    /// newest load or unload wins: [`LoadIntent`]).
    pub(crate) intent: LoadIntent,
    pub(crate) last_rate: Option<(Instant, u64)>,
    /// Backends being replaced, until their threads ended and their last
    /// events were delivered.
    pub(crate) retiring: Vec<Retiring>,
    /// Copies of submitted requests that have not started, so they can move
    /// to another worker (the remote fallback) instead of failing.
    pub(crate) pending: HashMap<RequestId, Job>,
}

impl LlmEngine {
    pub(crate) fn new(verification_cache: Option<PathBuf>) -> Self {
        Self {
            worker: None,
            next_id: 0,
            by_id: HashMap::new(),
            by_entity: HashMap::new(),
            silent: HashSet::new(),
            local: Vec::new(),
            verification_cache,
            knobs: None,
            intent: LoadIntent::default(),
            last_rate: None,
            retiring: Vec::new(),
            pending: HashMap::new(),
        }
    }

    /// The kind of backend serving requests now.
    pub(crate) fn kind(&self) -> Option<BackendKind> {
        self.worker.as_ref().map(|w| w.kind())
    }

    /// Put `new` in place of the current backend, which is retired without
    /// waiting (its thread is joined on a reaper thread). Requests that had
    /// not started move to the new backend at once (their ids are returned:
    /// events the old one sent for them are dropped); the old backend's
    /// other request events are delivered when it has ended, and requests it
    /// left without an answer then fail with `WorkerGone`, so nothing hangs.
    pub(crate) fn replace_worker(&mut self, new: Box<dyn InferenceBackend>) -> HashSet<RequestId> {
        let mut moved = HashSet::new();
        let old = self.worker.replace(new);
        self.knobs = None;
        self.last_rate = None;
        let Some(old) = old else { return moved };
        // In submission order (ids grow), as one command.
        let mut jobs: Vec<Job> = self.pending.values().cloned().collect();
        jobs.sort_by_key(|j| j.id);
        let ids: Vec<RequestId> = jobs.iter().map(|j| j.id).collect();
        if self.worker.as_ref().is_some_and(|w| w.submit(jobs)) {
            moved.extend(ids);
        }
        self.retire(old, moved.clone());
        moved
    }

    /// Retire the current backend (it stopped, or cannot take commands).
    pub(crate) fn drop_worker(&mut self) {
        if let Some(old) = self.worker.take() {
            self.retire(old, HashSet::new());
        }
    }

    /// Stop `old` without waiting; every request it holds now, except the
    /// `moved` ones, is answered from its last events or fails later.
    pub(crate) fn retire(&mut self, old: Box<dyn InferenceBackend>, moved: HashSet<RequestId>) {
        self.retiring.push(Retiring {
            moved,
            held: self.by_id.keys().copied().collect(),
            last_events: old.retire(),
        });
    }

    /// The last events of retired backends whose threads have ended, and
    /// `WorkerGone` for each request they left unanswered.
    pub(crate) fn collect_retired(&mut self, events: &mut Vec<Event>) {
        let mut still = Vec::new();
        for r in std::mem::take(&mut self.retiring) {
            let last = match r.last_events.try_recv() {
                Ok(last) => last,
                Err(crossbeam_channel::TryRecvError::Empty) => {
                    still.push(r);
                    continue;
                }
                Err(crossbeam_channel::TryRecvError::Disconnected) => Vec::new(),
            };
            let mut answered = HashSet::new();
            for ev in last {
                let Some((id, terminal)) = ev.request() else {
                    continue;
                };
                if r.moved.contains(&id) {
                    continue;
                }
                if terminal {
                    answered.insert(id);
                }
                events.push(ev);
            }
            for id in r.held {
                if !r.moved.contains(&id) && !answered.contains(&id) && self.by_id.contains_key(&id)
                {
                    events.push(Event::Failed {
                        id,
                        error: LlmError::WorkerGone("the inference backend was switched".into()),
                    });
                }
            }
        }
        self.retiring = still;
    }

    pub(crate) fn cancel(&self, id: RequestId) {
        if let Some(w) = self.backend() {
            w.cancel(id);
        }
    }

    /// The current backend, if any, to call.
    pub(crate) fn backend(&self) -> Option<&dyn InferenceBackend> {
        self.worker.as_deref()
    }

    pub(crate) fn fresh_id(&mut self) -> RequestId {
        self.next_id += 1;
        RequestId(self.next_id)
    }
}
