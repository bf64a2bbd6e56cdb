//! Output constraints compiled off the worker's step loop. Compiling a
//! constraint (llguidance's grammar, its lexer, the first mask) takes from
//! a fraction of a millisecond to hundreds of milliseconds for a large
//! schema, and building the vocabulary's token trie for the first one takes
//! a fraction of a second: on the worker thread that stalled every other
//! NPC's decode step for as long. Here a thread of its own compiles each
//! constrained job as it leaves the queue; the worker waits a few
//! milliseconds for it at that step boundary (a line schema is ready by
//! then and joins the step as before), else the job waits (holding no slot)
//! until its matcher is ready and is admitted at a later boundary, while
//! the other NPCs' steps go on.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use llama_cpp_2::model::LlamaModel;
use llguidance::Matcher;

use super::protocol::{Job, RequestId};
use crate::constraint::OutputConstraint;
use crate::constraint::matcher::ConstraintCompiler;

/// A compiled constraint, or why it cannot be used.
pub(crate) type Compiled = Result<Matcher, String>;

/// The compile thread and the jobs waiting for it.
pub(crate) struct ConstraintJobs {
    /// To the compile thread (dropped: the thread ends after its current job).
    jobs: Option<Sender<(RequestId, OutputConstraint)>>,
    results: Receiver<(RequestId, Compiled)>,
    /// Jobs whose constraint is being compiled, in the order they left the queue.
    compiling: Vec<Job>,
    /// Jobs with their compiled constraint, waiting for a slot.
    ready: VecDeque<(Job, Compiled)>,
}

impl ConstraintJobs {
    /// Start the compile thread for `model`'s vocabulary (its token trie is
    /// built there, on the first constrained job).
    pub(crate) fn new(model: Arc<LlamaModel>) -> Self {
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<(RequestId, OutputConstraint)>();
        let (res_tx, res_rx) = crossbeam_channel::unbounded();
        let spawned = std::thread::Builder::new()
            .name("npc-llm-constraints".into())
            .spawn(move || compile_loop(&model, &job_rx, &res_tx));
        Self {
            jobs: spawned.is_ok().then_some(job_tx),
            results: res_rx,
            compiling: Vec::new(),
            ready: VecDeque::new(),
        }
    }

    /// Compile `job`'s constraint (the caller checked it has one).
    pub(crate) fn start(&mut self, job: Job) {
        let sent = match (&self.jobs, &job.constraint) {
            (Some(tx), Some(c)) => tx.send((job.id, c.clone())).is_ok(),
            _ => false,
        };
        if sent {
            self.compiling.push(job);
        } else {
            let why = "the constraint compiler is not running".to_string();
            self.ready.push_back((job, Err(why)));
        }
    }

    /// Results to wait on when nothing else can progress.
    pub(crate) fn results(&self) -> &Receiver<(RequestId, Compiled)> {
        &self.results
    }

    /// A result from [`Self::results`]: its job is ready (a job cancelled
    /// meanwhile is gone, and its result dropped).
    pub(crate) fn accept(&mut self, (id, compiled): (RequestId, Compiled)) {
        if let Some(i) = self.compiling.iter().position(|j| j.id == id) {
            let job = self.compiling.remove(i);
            self.ready.push_back((job, compiled));
        }
    }

    /// Wait up to `patience` for the constraints being compiled (returns as
    /// soon as none is left compiling).
    pub(crate) fn settle(&mut self, patience: std::time::Duration) {
        let deadline = std::time::Instant::now() + patience;
        while !self.compiling.is_empty() {
            match self.results.recv_deadline(deadline) {
                Ok(r) => self.accept(r),
                Err(_) => break,
            }
        }
    }

    /// Take every result that has arrived, without waiting.
    pub(crate) fn collect(&mut self) {
        while let Ok(r) = self.results.try_recv() {
            self.accept(r);
        }
    }

    /// The priority of the best ready job, if any.
    pub(crate) fn peek_ready_priority(&self) -> Option<i32> {
        self.ready.iter().map(|(j, _)| j.priority).max()
    }

    /// The best ready job (highest priority, then the earliest ready).
    pub(crate) fn pop_ready(&mut self) -> Option<(Job, Compiled)> {
        let best = self.peek_ready_priority()?;
        let i = self.ready.iter().position(|(j, _)| j.priority == best)?;
        self.ready.remove(i)
    }

    /// Remove a job that waits here (cancelled); `true` when it did.
    pub(crate) fn remove(&mut self, id: RequestId) -> bool {
        if let Some(i) = self.compiling.iter().position(|j| j.id == id) {
            self.compiling.remove(i);
            return true;
        }
        if let Some(i) = self.ready.iter().position(|(j, _)| j.id == id) {
            self.ready.remove(i);
            return true;
        }
        false
    }

    /// Every job waiting here, in the order they left the queue (the model
    /// is going away: they go back to the queue and compile again for the
    /// next model's vocabulary).
    pub(crate) fn take_all(&mut self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.ready.drain(..).map(|(j, _)| j).collect();
        jobs.append(&mut self.compiling);
        jobs.sort_by_key(|j| j.id);
        jobs
    }

    /// Jobs waiting here.
    pub(crate) fn len(&self) -> usize {
        self.compiling.len() + self.ready.len()
    }
}

/// The compile thread: one constraint at a time, until the worker drops its
/// sender. A panic inside a compiler is the job's error, never the thread's end.
fn compile_loop(
    model: &LlamaModel,
    jobs: &Receiver<(RequestId, OutputConstraint)>,
    results: &Sender<(RequestId, Compiled)>,
) {
    let mut compiler: Option<Result<ConstraintCompiler, String>> = None;
    for (id, constraint) in jobs {
        let compiled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let compiler = compiler.get_or_insert_with(|| {
                let env = llama_cpp_2::sampling::LlamaSampler::llguidance_tok_env(model);
                ConstraintCompiler::new(&env)
            });
            let mut m = compiler
                .as_ref()
                .map_err(Clone::clone)?
                .matcher(&constraint)?;
            // The first mask builds the lexer's first states: here, not in
            // the step that samples the first token.
            let _ = m.compute_mask();
            match m.get_error() {
                Some(e) => Err(format!("the {} cannot be used: {e}", constraint.kind())),
                None => Ok(m),
            }
        }))
        .unwrap_or_else(|_| Err(format!("compiling the {} failed", constraint.kind())));
        if results.send((id, compiled)).is_err() {
            return;
        }
    }
}
