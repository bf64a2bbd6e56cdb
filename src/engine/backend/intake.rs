//! The waiting queue both workers keep, in one implementation: a frame's
//! jobs queued in order or refused typed (no model: `ModelUnavailable`; full:
//! `QueueFull` with the queue's capacity), a waiting job cancelled, the
//! capacity changed, everything waiting failed. The workers differ only in
//! what runs a job once it leaves the queue (llama.cpp decode steps here,
//! one HTTP stream per request for a remote server).

use std::ops::{Deref, DerefMut};

use crossbeam_channel::Sender;

use crate::engine::protocol::{Event, Job, RequestId};
use crate::engine::slots::JobQueue;
use crate::errors::{LlmError, ModelLoadError};

/// Jobs waiting for a worker to run them.
#[derive(Debug)]
pub(crate) struct Intake {
    queue: JobQueue<Job>,
}

impl Intake {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            queue: JobQueue::new(capacity),
        }
    }

    /// Queue a frame's jobs in order; a job that cannot wait fails typed:
    /// `ModelUnavailable` while `unavailable` says why no model serves,
    /// `QueueFull` (with the capacity) when the queue is full. Returns how
    /// many failed.
    pub(crate) fn submit(
        &mut self,
        jobs: Vec<Job>,
        unavailable: Option<&ModelLoadError>,
        events: &Sender<Event>,
    ) -> u64 {
        let mut failed = 0;
        for job in jobs {
            let id = job.id;
            let error = if let Some(why) = unavailable {
                LlmError::ModelUnavailable(why.clone())
            } else if self.queue.push(job.priority, job).is_err() {
                LlmError::QueueFull {
                    capacity: self.queue.capacity(),
                }
            } else {
                continue;
            };
            failed += 1;
            let _ = events.send(Event::Failed { id, error });
        }
        failed
    }

    /// Cancel `id` if it is waiting here (`Cancelled` sent).
    pub(crate) fn cancel(&mut self, id: RequestId, events: &Sender<Event>) -> bool {
        let found = self.queue.remove_where(|j| j.id == id).is_some();
        if found {
            let _ = events.send(Event::Cancelled { id });
        }
        found
    }

    /// Fail every waiting job with `error`; returns how many.
    pub(crate) fn fail_all(&mut self, error: impl Fn() -> LlmError, events: &Sender<Event>) -> u64 {
        let jobs: Vec<Job> = self.queue.drain().collect();
        for job in &jobs {
            let _ = events.send(Event::Failed {
                id: job.id,
                error: error(),
            });
        }
        jobs.len() as u64
    }
}

impl Deref for Intake {
    type Target = JobQueue<Job>;

    fn deref(&self) -> &Self::Target {
        &self.queue
    }
}

impl DerefMut for Intake {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.queue
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::LlmPrompt;

    fn job(id: u64) -> Job {
        Job {
            id: RequestId(id),
            prompt: LlmPrompt::Raw("hi".into()),
            base_sampling: Default::default(),
            overrides: Default::default(),
            priority: 0,
            cache_key: None,
            trim_prompt: false,
            constraint: None,
            submitted: std::time::Instant::now(),
        }
    }

    /// Both workers refuse the same way: the capacity (not the queue's
    /// length) in `QueueFull`, `ModelUnavailable` while no model serves,
    /// and a cancelled waiting job answered once.
    #[test]
    fn refusals_are_typed_and_name_the_capacity() {
        let (tx, rx) = crossbeam_channel::unbounded();
        let mut intake = Intake::new(2);
        assert_eq!(intake.submit((0..3).map(job).collect(), None, &tx), 1);
        let refused: Vec<Event> = rx.try_iter().collect();
        assert!(
            matches!(
                refused.as_slice(),
                [Event::Failed {
                    id: RequestId(2),
                    error: LlmError::QueueFull { capacity: 2 }
                }]
            ),
            "{refused:?}"
        );
        assert!(intake.cancel(RequestId(0), &tx));
        assert!(!intake.cancel(RequestId(0), &tx));
        assert_eq!(rx.try_iter().count(), 1);
        intake.set_capacity(5);
        let why = ModelLoadError::WorkerGone;
        assert_eq!(intake.submit(vec![job(7)], Some(&why), &tx), 1);
        assert!(matches!(
            rx.try_recv(),
            Ok(Event::Failed {
                error: LlmError::ModelUnavailable(_),
                ..
            })
        ));
        assert_eq!(intake.len(), 1);
        assert_eq!(intake.fail_all(|| LlmError::EmptyPrompt, &tx), 1);
        assert!(intake.is_empty());
    }
}
