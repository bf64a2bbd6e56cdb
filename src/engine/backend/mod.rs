//! Where inference runs, behind one trait: [`local`] (llama.cpp in this
//! process, batched by the [scheduler](crate::engine::scheduler)) and
//! [`remote`] (an OpenAI-compatible server). Both are a worker thread that
//! takes [`Command`]s and answers with [`Event`]s over channels; the Bevy
//! glue ([`bridge`](crate::engine::bridge)) only sees
//! [`InferenceBackend`], never which one it is talking to, except for the
//! status shown to the player ([`BackendKind`]).

pub(crate) mod intake;
pub(crate) mod local;
pub(crate) mod remote;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

use super::kv_snapshot::NpcKvSnapshot;
use super::protocol::{Command, Event, Job, Knobs, LoadSpec, LoadTicket, RequestId};

/// Which kind of backend serves requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BackendKind {
    Local,
    Remote,
}

/// One inference backend: submit, cancel, load/unload, configure, poll its
/// events, and shut down. Every call returns at once (`false`: the backend
/// is gone); answers come back as [`Event`]s from [`Self::poll`].
pub(crate) trait InferenceBackend: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// The channels and thread of the backend's worker.
    fn handle(&self) -> &WorkerHandle;

    fn into_handle(self: Box<Self>) -> WorkerHandle;

    /// Queue `jobs` (in order) as one command; nothing is sent for none.
    fn submit(&self, jobs: Vec<Job>) -> bool {
        jobs.is_empty() || self.handle().send(Command::Submit(jobs))
    }

    fn cancel(&self, id: RequestId) -> bool {
        self.handle().send(Command::Cancel(id))
    }

    /// Queue a load; a verification or load still running for an older
    /// request stops early.
    fn load(&self, spec: LoadSpec) -> bool {
        let ticket = self.handle().abort.next_ticket();
        self.handle().send(Command::Load(Box::new(spec), ticket))
    }

    fn unload(&self) -> bool {
        self.handle().send(Command::Unload)
    }

    fn configure(&self, knobs: Knobs) -> bool {
        self.handle().send(Command::Configure(knobs))
    }

    /// Ask for these keys' KV snapshots (answered by `Event::KvSaved`).
    fn save_kv(&self, keys: Vec<u64>) -> bool {
        self.handle().send(Command::SaveKv(keys))
    }

    /// Restore these snapshots (answered by `Event::KvRestored`).
    fn restore_kv(&self, snapshots: Vec<(u64, NpcKvSnapshot)>) -> bool {
        self.handle().send(Command::RestoreKv(snapshots))
    }

    /// Whether an event waits to be polled.
    fn has_events(&self) -> bool {
        !self.handle().events.is_empty()
    }

    /// Every event that arrived since the last poll, without waiting.
    fn poll(&self, out: &mut Vec<Event>) {
        out.extend(self.handle().events.try_iter());
    }

    /// Stop the backend without waiting for it (safe inside a system): its
    /// thread is joined on a reaper thread, which then hands over the
    /// events it sent last.
    fn retire(self: Box<Self>) -> Receiver<Vec<Event>> {
        self.into_handle().retire()
    }

    /// Test hook: make the worker thread panic.
    #[cfg(debug_assertions)]
    fn crash(&self) {
        self.handle().send(Command::Crash);
    }
}

/// A backend being replaced: the requests that moved to its successor, the
/// requests it held, and its last events once its thread has ended.
pub(crate) struct Retiring {
    pub moved: HashSet<RequestId>,
    pub held: HashSet<RequestId>,
    pub last_events: Receiver<Vec<Event>>,
}

/// When a verification or model load stops early: once the worker is shut
/// down, or once a newer load was asked for after it. Each
/// [`Command::Load`] carries the [`LoadTicket`] it was sent with, so
/// whatever order the two threads run in, only a superseded load stops and a
/// shutdown is never forgotten (a single flag cleared as each load starts
/// could clear a shutdown that arrived just before it: the app's exit then
/// waited for a whole load).
#[derive(Debug, Default)]
pub(crate) struct LoadAbort {
    newest: AtomicU64,
    shutdown: AtomicBool,
}

impl LoadAbort {
    /// The ticket of a new load request; every older load now stops.
    pub(crate) fn next_ticket(&self) -> LoadTicket {
        LoadTicket(self.newest.fetch_add(1, Ordering::SeqCst) + 1)
    }

    /// Stop every load, now and later.
    pub(crate) fn shut_down(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }

    /// Whether the load sent with `ticket` should stop.
    pub(crate) fn stops(&self, ticket: LoadTicket) -> bool {
        self.shutdown.load(Ordering::SeqCst) || self.newest.load(Ordering::SeqCst) != ticket.0
    }
}

/// Owner of a backend's worker thread. Dropping it stops and joins the
/// thread (at app exit); inside systems use [`WorkerHandle::retire`].
pub(crate) struct WorkerHandle {
    pub(crate) commands: Sender<Command>,
    pub(crate) events: Receiver<Event>,
    abort: Arc<LoadAbort>,
    join: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// A handle over a worker thread started by a backend.
    pub(crate) fn from_parts(
        commands: Sender<Command>,
        events: Receiver<Event>,
        abort: Arc<LoadAbort>,
        join: JoinHandle<()>,
    ) -> Self {
        Self {
            commands,
            events,
            abort,
            join: Some(join),
        }
    }

    /// Send a command; `false` when the worker is gone.
    pub(crate) fn send(&self, cmd: Command) -> bool {
        self.commands.send(cmd).is_ok()
    }

    /// Ask the worker to stop and join it on a reaper thread; the returned
    /// channel yields every event the worker sent before it ended.
    pub(crate) fn retire(mut self) -> Receiver<Vec<Event>> {
        self.abort.shut_down();
        let _ = self.commands.send(Command::Shutdown);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let join = self.join.take();
        let events = self.events.clone();
        let reap = move || {
            if let Some(join) = join {
                let _ = join.join();
            }
            let _ = tx.send(events.try_iter().collect());
        };
        if let Err(e) = std::thread::Builder::new()
            .name("npc-llm-reaper".into())
            .spawn(reap)
        {
            // No thread to spare: the worker was told to stop and ends on
            // its own; its events are whatever arrived so far.
            bevy::log::warn!("bevy_npc_llm: cannot start a reaper thread: {e}");
            let (tx, rx) = crossbeam_channel::bounded(1);
            let _ = tx.send(self.events.try_iter().collect());
            return rx;
        }
        rx
    }

    /// What the app's exit does: stop every load, ask the worker to stop
    /// and join it.
    fn stop_and_join(&mut self) {
        self.abort.shut_down();
        let _ = self.commands.send(Command::Shutdown);
        if let Some(join) = self.join.take() {
            let _ = join.join();
        }
    }

    /// [`Self::stop_and_join`], then every event the worker sent that
    /// nobody polled (a test hook: what the worker did on its way out).
    #[cfg(debug_assertions)]
    pub(crate) fn exit(mut self) -> Vec<Event> {
        self.stop_and_join();
        self.events.try_iter().collect()
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_stops_when_superseded_or_shut_down_whatever_the_order() {
        let abort = LoadAbort::default();
        let first = abort.next_ticket();
        assert!(!abort.stops(first));
        let second = abort.next_ticket();
        assert!(abort.stops(first), "a newer request stops the older load");
        assert!(!abort.stops(second), "but not itself");
        // A shutdown that arrives before the worker even starts the newest
        // load (the order that once let exit wait for a whole load) still
        // stops it, and any load after it.
        abort.shut_down();
        assert!(abort.stops(second));
        let third = abort.next_ticket();
        assert!(abort.stops(third));
    }
}
