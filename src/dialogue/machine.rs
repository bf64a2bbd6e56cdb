//! The conversation state machine: pure, no Bevy or llama types.
//!
//! `(Machine, Event) → (Machine, Vec<Command>)`. The dialogue systems route
//! what happens in the game and the engine in as [`Event`]s (one conversation
//! at a time, in arrival order) and carry the returned [`Command`]s out
//! (spawn or cancel a line request, append a line, write memories, end). The
//! systems never decide anything themselves, and nothing else writes a
//! conversation's state.
//!
//! Guarantees (tested by the (state, event) table and the properties in this
//! module's tests):
//! - at most one line request is in flight; a `CancelLine` only names one;
//! - a player line that arrives while an NPC line is being generated is held
//!   ([`Command::TakePlayerLines`] moves it into the transcript once that line
//!   is appended) and answered next; leaving cancels the line in flight and
//!   ends the conversation;
//! - every player line gets an NPC reply after it, or is counted in
//!   [`Command::End`]'s `unanswered`;
//! - every state has a way out: a line that takes too long is cancelled and
//!   retried once, then replaced by a fallback; a player who says nothing for
//!   [`ConversationTimeouts::player_idle_secs`] ends the conversation; summaries that take
//!   too long are cancelled;
//! - [`Command::End`] comes exactly once and nothing follows it; no command
//!   names a participant that has gone.

use super::data::ConversationState;

/// How long a conversation waits in each state before it moves on anyway
/// (seconds of game time).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConversationTimeouts {
    /// A line request that has not finished after this long is cancelled and
    /// retried once (then a fallback line is used).
    pub line_secs: f64,
    /// A player conversation whose player says nothing for this long ends
    /// (the player walked away without a [`PlayerLeaves`](crate::events::PlayerLeaves)).
    pub player_idle_secs: f64,
    /// Memories still being written after this long are abandoned and the
    /// conversation ends.
    pub summary_secs: f64,
}

impl Default for ConversationTimeouts {
    fn default() -> Self {
        Self {
            line_secs: 60.0,
            player_idle_secs: 300.0,
            summary_secs: 60.0,
        }
    }
}

/// Where a conversation is (the machine's own, finer view of
/// [`ConversationState`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// A line request for NPC `speaker` is in flight (`attempt` 0 or 1).
    Speaking { speaker: usize, attempt: u32 },
    /// A player conversation waits for the player.
    AwaitingPlayer,
    /// Memories are being written; `left` summaries still to come.
    Summarizing { left: usize },
    /// Over. Nothing happens any more.
    Ended,
}

/// What happened to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// A new or restored conversation: take the first step.
    Begin,
    /// The line in flight finished; `usable` is false for empty or
    /// degenerate output, `goodbye` when it says goodbye.
    LineDone { usable: bool, goodbye: bool },
    /// The line in flight failed.
    LineFailed,
    /// The line in flight was cancelled (not by this machine).
    LineCancelled,
    /// The player said something (its text waits in the glue's queue).
    PlayerSays,
    /// The player walked away.
    PlayerLeaves,
    /// NPC participant `0..n_npcs` despawned or lost its persona.
    NpcGone(usize),
    /// One summary finished (or failed: the glue writes a plain memory).
    SummaryDone,
    /// Time passed (checks the time-outs).
    Tick,
}

/// What the systems must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Spawn a line request for NPC `speaker`.
    RequestLine {
        speaker: usize,
        attempt: u32,
        closing: bool,
    },
    /// Cancel (despawn) the line request in flight.
    CancelLine,
    /// Append the finished line (its cleaned text, or a fallback line).
    AppendLine {
        speaker: usize,
        fallback: bool,
        retried: bool,
        closing: bool,
    },
    /// Move the oldest `n` held player lines into the transcript.
    TakePlayerLines(usize),
    /// Reject the player line just queued (the conversation is ending).
    RejectPlayerLine,
    /// Spawn the summary request of NPC `who`.
    Summarize { who: usize },
    /// Cancel every summary request still running.
    CancelSummaries,
    /// The conversation is over: free the NPCs, announce the end.
    /// `unanswered` player lines got no reply (the last ones of the transcript).
    End { unanswered: usize },
}

/// One conversation's state.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Machine {
    pub phase: Phase,
    /// The line being generated is the closing one.
    pub closing: bool,
    /// Whether the player takes part (as the last speaker index, `n_npcs`).
    pub with_player: bool,
    /// NPC participants.
    pub n_npcs: usize,
    /// Who speaks next (index into names: NPCs, then the player).
    pub next_speaker: usize,
    /// NPC lines so far.
    pub npc_lines: usize,
    /// Transcript lines so far (NPC and player).
    pub transcript: usize,
    /// NPC-to-NPC conversations end after this many lines.
    pub max_lines: usize,
    /// Player lines held by the glue, not yet in the transcript.
    pub queued: usize,
    /// Player lines in the transcript with no NPC line after them.
    pub unanswered: usize,
    /// NPC participants that have gone.
    pub gone: Vec<bool>,
    /// Game time the current wait began.
    pub since: f64,
}

impl Machine {
    /// A conversation of `n_npcs` NPCs (plus the player when `with_player`),
    /// resumed at `state` with the transcript so far (`lines`, of which
    /// `npc_lines` spoken by NPCs). Feed [`Event::Begin`] next.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n_npcs: usize,
        with_player: bool,
        max_lines: usize,
        state: ConversationState,
        next_speaker: usize,
        lines: usize,
        npc_lines: usize,
        now: f64,
    ) -> Self {
        let phase = match state {
            ConversationState::Ended => Phase::Ended,
            ConversationState::Summarizing => Phase::Summarizing { left: 0 },
            // Resolved by Begin.
            _ => Phase::AwaitingPlayer,
        };
        Self {
            phase,
            closing: state == ConversationState::Closing,
            with_player,
            n_npcs: n_npcs.max(1),
            next_speaker,
            npc_lines,
            transcript: lines,
            max_lines: max_lines.max(1),
            queued: 0,
            unanswered: 0,
            gone: vec![false; n_npcs.max(1)],
            since: now,
        }
    }

    /// The coarse state games see on [`Conversation`](super::Conversation).
    pub fn public_state(&self) -> ConversationState {
        match self.phase {
            Phase::Speaking { .. } if self.closing => ConversationState::Closing,
            Phase::Speaking { .. } => ConversationState::Active,
            Phase::AwaitingPlayer => ConversationState::AwaitingPlayer,
            Phase::Summarizing { .. } => ConversationState::Summarizing,
            Phase::Ended => ConversationState::Ended,
        }
    }

    /// Speaker count (NPCs plus the player).
    fn n_names(&self) -> usize {
        self.n_npcs + usize::from(self.with_player)
    }

    fn enter(&mut self, phase: Phase, now: f64) {
        self.phase = phase;
        self.since = now;
    }

    /// Handle one event at game time `now`.
    pub fn handle(&mut self, event: Event, now: f64, t: &ConversationTimeouts) -> Vec<Command> {
        let mut out = Vec::new();
        match (self.phase, event) {
            (Phase::Ended, _) => {}
            // --- starting and resuming ---
            (Phase::AwaitingPlayer, Event::Begin) => {
                if self.with_player && self.next_speaker >= self.n_npcs {
                    // The player's turn: wait.
                } else {
                    self.speak(now, &mut out);
                }
            }
            (Phase::Summarizing { left: 0 }, Event::Begin) => self.summarize(now, &mut out),
            (_, Event::Begin) => {}
            // --- the line in flight ---
            (Phase::Speaking { speaker, attempt }, Event::LineDone { usable, goodbye }) => {
                self.line_finished(speaker, attempt, usable, goodbye, now, &mut out);
            }
            (Phase::Speaking { speaker, attempt }, Event::LineFailed | Event::LineCancelled) => {
                self.line_finished(speaker, attempt, false, false, now, &mut out);
            }
            (_, Event::LineDone { .. } | Event::LineFailed | Event::LineCancelled) => {}
            // --- the player ---
            (_, Event::PlayerSays) if !self.with_player => out.push(Command::RejectPlayerLine),
            (Phase::AwaitingPlayer, Event::PlayerSays) => {
                out.push(Command::TakePlayerLines(1));
                self.transcript += 1;
                self.unanswered += 1;
                self.next_speaker = 0;
                self.speak(now, &mut out);
            }
            (Phase::Speaking { .. }, Event::PlayerSays) => self.queued += 1,
            (Phase::Summarizing { .. }, Event::PlayerSays) => out.push(Command::RejectPlayerLine),
            (_, Event::PlayerLeaves) if !self.with_player => {}
            (Phase::Speaking { .. }, Event::PlayerLeaves) => {
                out.push(Command::CancelLine);
                self.take_queued(&mut out);
                self.summarize(now, &mut out);
            }
            (Phase::AwaitingPlayer, Event::PlayerLeaves) => self.summarize(now, &mut out),
            (Phase::Summarizing { .. }, Event::PlayerLeaves) => {}
            // --- participants ---
            (_, Event::NpcGone(i)) if i >= self.gone.len() || self.gone[i] => {}
            (Phase::Speaking { .. }, Event::NpcGone(i)) => {
                self.gone[i] = true;
                out.push(Command::CancelLine);
                self.take_queued(&mut out);
                self.summarize(now, &mut out);
            }
            (Phase::AwaitingPlayer, Event::NpcGone(i)) => {
                self.gone[i] = true;
                self.summarize(now, &mut out);
            }
            (Phase::Summarizing { .. }, Event::NpcGone(i)) => self.gone[i] = true,
            // --- memories ---
            (Phase::Summarizing { left }, Event::SummaryDone) if left > 0 => {
                if left == 1 {
                    self.end(now, &mut out);
                } else {
                    self.phase = Phase::Summarizing { left: left - 1 };
                }
            }
            (_, Event::SummaryDone) => {}
            // --- time-outs ---
            (Phase::Speaking { speaker, attempt }, Event::Tick) => {
                if now - self.since >= t.line_secs {
                    out.push(Command::CancelLine);
                    self.line_finished(speaker, attempt, false, false, now, &mut out);
                }
            }
            (Phase::AwaitingPlayer, Event::Tick) => {
                if now - self.since >= t.player_idle_secs {
                    self.summarize(now, &mut out);
                }
            }
            (Phase::Summarizing { .. }, Event::Tick) => {
                if now - self.since >= t.summary_secs {
                    out.push(Command::CancelSummaries);
                    self.end(now, &mut out);
                }
            }
        }
        out
    }

    /// Request the next speaker's line.
    fn speak(&mut self, now: f64, out: &mut Vec<Command>) {
        let speaker = self.next_speaker.min(self.n_npcs - 1);
        if self.gone[speaker] {
            self.summarize(now, out);
            return;
        }
        self.enter(
            Phase::Speaking {
                speaker,
                attempt: 0,
            },
            now,
        );
        out.push(Command::RequestLine {
            speaker,
            attempt: 0,
            closing: self.closing,
        });
    }

    fn take_queued(&mut self, out: &mut Vec<Command>) {
        if self.queued > 0 {
            out.push(Command::TakePlayerLines(self.queued));
            self.transcript += self.queued;
            self.unanswered += self.queued;
            self.queued = 0;
        }
    }

    fn line_finished(
        &mut self,
        speaker: usize,
        attempt: u32,
        usable: bool,
        goodbye: bool,
        now: f64,
        out: &mut Vec<Command>,
    ) {
        if !usable && attempt == 0 {
            // Retry once with another seed; held player lines join the prompt.
            self.take_queued(out);
            self.enter(
                Phase::Speaking {
                    speaker,
                    attempt: 1,
                },
                now,
            );
            out.push(Command::RequestLine {
                speaker,
                attempt: 1,
                closing: self.closing,
            });
            return;
        }
        out.push(Command::AppendLine {
            speaker,
            fallback: !usable,
            retried: attempt > 0,
            closing: self.closing,
        });
        self.npc_lines += 1;
        self.transcript += 1;
        self.unanswered = 0;
        self.next_speaker = (speaker + 1) % self.n_names();
        if self.with_player {
            if self.queued > 0 {
                self.take_queued(out);
                self.next_speaker = 0;
                self.speak(now, out);
            } else {
                self.enter(Phase::AwaitingPlayer, now);
            }
            return;
        }
        let n = self.npc_lines;
        if self.closing || n >= self.max_lines {
            self.summarize(now, out);
            return;
        }
        if n + 1 >= self.max_lines || (n >= 2 && goodbye) {
            self.closing = true;
        }
        self.speak(now, out);
    }

    /// Write memories (one summary per NPC still present), or end when there
    /// is nothing to remember.
    fn summarize(&mut self, now: f64, out: &mut Vec<Command>) {
        debug_assert_eq!(self.queued, 0);
        let present: Vec<usize> = (0..self.n_npcs).filter(|i| !self.gone[*i]).collect();
        if self.transcript == 0 || present.is_empty() {
            self.end(now, out);
            return;
        }
        self.enter(
            Phase::Summarizing {
                left: present.len(),
            },
            now,
        );
        out.extend(present.into_iter().map(|who| Command::Summarize { who }));
    }

    fn end(&mut self, now: f64, out: &mut Vec<Command>) {
        self.take_queued(out);
        out.push(Command::End {
            unanswered: self.unanswered,
        });
        self.enter(Phase::Ended, now);
    }
}

#[cfg(test)]
mod tests;
