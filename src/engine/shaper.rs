//! Shaping a decode step's batch for a GPU: the scheduler decides *which*
//! sequences advance and by how many tokens; this module decides the
//! batch's *shape* — throw-away tokens that keep a step one run of
//! sequence ids, even prompt slices, lone prompt steps rounded to a fixed
//! width — so that llama.cpp's CUDA backend replays a recorded graph
//! instead of launching a new shape kernel by kernel. Every throw-away
//! token ([`Filler`]) is removed from the KV after its step and its logits
//! are ignored: shaping never changes a text. Pure: no llama.cpp or Bevy
//! types; tested through the scheduler's cases and properties
//! (`scheduler/tests.rs`) and the cases below.
//!
//! Why shapes matter: with a KV stream per sequence, llama.cpp splits a
//! batch into micro-batches of *consecutive* sequence ids with as many
//! tokens each (`split_equal(…, sequential)`), and a GPU runs each new
//! micro-batch shape kernel by kernel (on an H100 about 5 ms of host time
//! for SmolLM2-135M) where a shape it has seen replays its recorded graph.
//! Which of these pay, where, is the plan's choice
//! ([`BatchShaping`](crate::hardware::BatchShaping)); the figures are in
//! docs/BENCHMARKS.md.

use super::config::BatchShaping;
use super::layout::Layout;

/// Gap fillers a step may always have; beyond this, at most one per
/// sequence in the step (see [`Filler`]).
const MAX_FILLERS_ALWAYS: usize = 8;

/// The widths a lone prompt step is rounded up to (see
/// [`Shaper::round_lone_prompt`]); a longer step is not rounded. The
/// largest is also the CUDA module's contract: its patch
/// (`scripts/gpu/patch-cuda-graphs.py`, `NPC_LLM_ROUNDED_MAX`) keeps a
/// recorded graph per KV stream for prompt steps of at most this many
/// tokens — a test checks the two agree.
pub(crate) const ROUND_WIDTHS: [usize; 3] = [16, 32, 64];

/// One token of a planned batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchToken<T> {
    pub token: T,
    pub pos: i32,
    /// The slot (its lane's sequence id: [`Layout::locate`]).
    pub seq: i32,
    pub logits: bool,
}

/// Throw-away tokens for one slot: to fill a gap in a generation step, to
/// pad a sequence's share of an even prompt step, or to round a lone
/// prompt step.
///
/// A gap filler goes at the end of its sequence (`pos` = the tokens its KV
/// holds: a running sequence's record, an idle slot's cache), asks for
/// logits (so the step's shape is a generation step's: one output per
/// token) and is never recorded: the caller removes it from the KV
/// (`seq_rm(slot, pos, -1)`) after the decode, whatever its outcome, and
/// ignores its logits. Padding ([`Shaper::even_step`],
/// [`Shaper::round_lone_prompt`]) goes after the sequence's own tokens of
/// the step and asks for no logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Filler {
    /// The slot.
    pub slot: usize,
    /// Its first position: the tokens the slot's KV holds, plus the
    /// sequence's own tokens in the step.
    pub pos: i32,
    /// Throw-away tokens at `pos`, `pos + 1`, …
    pub count: usize,
}

impl Filler {
    /// Its tokens for the batch: `token` at `pos`, `pos + 1`, … in its
    /// slot's sequence, each asking for `logits` or not.
    pub(crate) fn batch_tokens<T: Copy>(
        self,
        token: T,
        logits: bool,
    ) -> impl Iterator<Item = BatchToken<T>> {
        (0..self.count as i32).map(move |j| BatchToken {
            token,
            pos: self.pos + j,
            seq: self.slot as i32,
            logits,
        })
    }
}

/// Append `fillers`' tokens to a batch (each `token`, asking for `logits`).
pub(crate) fn append<T: Copy>(
    tokens: &mut Vec<BatchToken<T>>,
    fillers: &[Filler],
    token: T,
    logits: bool,
) {
    tokens.extend(fillers.iter().flat_map(|f| f.batch_tokens(token, logits)));
}

/// What the shaper knows of one sequence the scheduler put in a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepSeq {
    pub slot: usize,
    /// High priority (the player's).
    pub high: bool,
    /// It decodes its sampled token (one token) in the step.
    pub generating: bool,
    /// Prompt tokens it has not decoded yet.
    pub prompt_left: usize,
}

/// What the scheduler planned for a step, as the gap filler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StepKind {
    /// Some sequence decodes its sampled token.
    pub generates: bool,
    /// Some sequence reads prompt tokens.
    pub reads_prompt: bool,
    /// A High-priority sequence reads prompt tokens.
    pub high_prompt: bool,
    /// Sequences in the step.
    pub sequences: usize,
}

/// An even prompt step: each sequence's share, in the order given, and
/// the padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EvenStep {
    pub takes: Vec<usize>,
    pub fillers: Vec<Filler>,
}

/// The shaper of one step: the sizes it must respect and what each slot's
/// KV holds.
pub(crate) struct Shaper<H> {
    pub layout: Layout,
    pub shaping: BatchShaping,
    /// The model's KV keeps only a sliding window: no filler may move it.
    pub sliding_window: bool,
    /// KV cells each sequence may hold.
    pub cells_per_seq: usize,
    /// Most prompt tokens a Normal sequence adds while others generate.
    pub prompt_chunk: usize,
    /// At most one output per sequence in a step (device top-k).
    pub single_output: bool,
    /// Tokens the step may hold.
    pub batch_limit: usize,
    /// The tokens a slot's KV holds; `None` when unknown (an idle slot
    /// with the prefix cache off).
    pub held: H,
}

impl<H> Shaper<H> {
    /// Whether a step may be read in even prompt slices at all (on, and no
    /// sliding window): the scheduler asks before it gathers the step.
    pub(crate) fn evens_prompts(&self) -> bool {
        self.shaping.even_prompt_steps && !self.sliding_window
    }

    /// Whether a step's gaps may be filled at all (on, and no sliding
    /// window): the scheduler asks before it describes the step.
    pub(crate) fn fills_gaps(&self) -> bool {
        self.shaping.fill_gaps && !self.sliding_window
    }
}

impl<H: Fn(usize) -> Option<usize>> Shaper<H> {
    /// An even prompt step: every sequence of the lane's step (`seqs`, in
    /// plan order) gets the same number of tokens, `width`, so that with a
    /// KV stream per sequence llama.cpp decodes the step as **one**
    /// micro-batch.
    ///
    /// Why: NPCs whose prompts are read together have prompts of different
    /// lengths, so a step of them — greedy prompt chunks, or generated
    /// tokens beside chunks — falls apart into up to one micro-batch per
    /// length, each a new shape. Here a prompt takes `min(left, width)`
    /// tokens, a generating sequence its one token, and each is padded to
    /// `width` with [`Filler`]s (no logits), as is an idle slot between
    /// them. `width` is the longest prompt share (at most `prompt_chunk`
    /// while some sequence generates), cut so that the step fits the batch
    /// limit: a crowd of prompts is read in even slices, one micro-batch
    /// per step.
    ///
    /// `None` (the greedy plan then) unless: even prompt steps are on, no
    /// sliding window, two or more sequences in the step (one alone is one
    /// micro-batch already), a Normal prompt is read in the step and no
    /// High sequence is in it (the player's steps stay small), every slot
    /// of the step's span has a known KV with room for `width` more tokens,
    /// and the padding is at most the step's own tokens (the step at most
    /// doubles: a prompt beside many generating NPCs stays a chunk of its
    /// own, one extra micro-batch).
    pub(crate) fn even_step(&self, lane: usize, seqs: &[StepSeq]) -> Option<EvenStep> {
        if !self.evens_prompts() {
            return None;
        }
        if seqs.len() < 2 || seqs.iter().any(|s| s.high) || seqs.iter().all(|s| s.generating) {
            return None;
        }
        let id_of = |slot: usize| self.layout.locate(slot).1;
        let low = seqs.iter().map(|s| id_of(s.slot)).min()?;
        let top = seqs.iter().map(|s| id_of(s.slot)).max()?;
        let span = top - low + 1;
        let cap = if seqs.iter().any(|s| s.generating) {
            self.prompt_chunk.max(1)
        } else {
            usize::MAX
        };
        let share = |s: &StepSeq, width: usize| {
            if s.generating {
                1
            } else {
                s.prompt_left.min(cap).min(width)
            }
        };
        let longest = seqs.iter().map(|s| share(s, usize::MAX)).max()?;
        let width = longest.min(self.batch_limit / span);
        if width == 0 {
            return None;
        }
        // What each slot of the span holds: its own tokens are planned at
        // the end of its KV, its fillers after them.
        let held: Vec<usize> = (low..=top)
            .map(|q| (self.held)(self.layout.slot_at(lane, q)))
            .collect::<Option<_>>()?;
        if held.iter().any(|&h| h + width > self.cells_per_seq) {
            return None;
        }
        let takes: Vec<usize> = seqs.iter().map(|s| share(s, width)).collect();
        if span * width > 2 * takes.iter().sum::<usize>() {
            return None;
        }
        let mut count = vec![0usize; span];
        for (s, &take) in seqs.iter().zip(&takes) {
            count[id_of(s.slot) - low] = take;
        }
        let fillers = count
            .iter()
            .zip(&held)
            .enumerate()
            .filter(|(_, (n, _))| **n != width)
            .map(|(q, (&n, &h))| Filler {
                slot: self.layout.slot_at(lane, low + q),
                pos: (h + n) as i32,
                count: width - n,
            })
            .collect();
        Some(EvenStep { takes, fillers })
    }

    /// Rounds a step that reads one sequence's prompt alone — the tokens
    /// `from..to` in slot `slot`, `ends` when `to` is the prompt's end — up
    /// to the smallest of [`ROUND_WIDTHS`] that holds it: one [`Filler`] of
    /// the missing tokens right after the prompt's own, in the same
    /// sequence, none asking for logits (the prompt's last token keeps the
    /// step's one output; a filler after it is invisible to it under the
    /// causal mask).
    ///
    /// Why: the player's next line, or an NPC resuming a cached
    /// conversation, is such a step, and its length is new almost every
    /// time; rounded, the same sequence's next short turns have one shape,
    /// whose recorded graph the patched CUDA module keeps per KV stream.
    ///
    /// `None` unless: rounded prompt steps are on, no sliding window (a
    /// filler would slide it), the step ends the prompt in at most the
    /// largest width, and the width fits both the batch limit and the
    /// sequence's KV cells.
    pub(crate) fn round_lone_prompt(
        &self,
        slot: usize,
        from: usize,
        to: usize,
        ends: bool,
    ) -> Option<Filler> {
        if !self.shaping.round_prompt_steps || self.sliding_window || !ends {
            return None;
        }
        let own = to - from;
        let width = ROUND_WIDTHS.into_iter().find(|&w| w >= own)?;
        if width == own || width > self.batch_limit || to + width - own > self.cells_per_seq {
            return None;
        }
        Some(Filler {
            slot,
            pos: to as i32,
            count: width - own,
        })
    }

    /// The gap fillers of a lane's step, appended to `tokens` (the step the
    /// scheduler planned, `kind`; `budget` tokens left); with fillers, or
    /// with a prompt chunk read beside generating sequences and no gap, the
    /// first token of every sequence in the step asks for logits too:
    /// llama.cpp's first micro-batch of the step (one token of each
    /// sequence) then has a generation step's shape, one output per token,
    /// and replays its recorded graph instead of being launched kernel by
    /// kernel (a prompt chunk's first token without logits made it a prompt
    /// graph). A sequence that sits between two that decode, with nothing
    /// to decode itself (an idle slot, a line that just ended), gets one
    /// filler, so the step covers the lane's sequence ids from its lowest to
    /// its highest without a gap; nothing below the lowest is filled.
    ///
    /// None unless: gap filling is on, no sliding window, the step
    /// generates, no High-priority prompt is read in it (the player's step
    /// stays small), each filled slot's KV is known and has room, and the
    /// fillers fit the budget and are at most [`MAX_FILLERS_ALWAYS`] or as
    /// many as the step's sequences (many fillers for few sequences, two
    /// NPCs far apart, would cost more compute than the split they save).
    pub(crate) fn fill_gaps<T: Copy>(
        &self,
        lane: usize,
        tokens: &mut Vec<BatchToken<T>>,
        kind: StepKind,
        budget: usize,
    ) -> Vec<Filler> {
        if !self.fills_gaps() || !kind.generates || kind.high_prompt {
            return Vec::new();
        }
        let layout = self.layout;
        let seq_of = |t: &BatchToken<T>| layout.locate(t.seq as usize).1;
        let (Some(low), Some(top)) = (
            tokens.iter().map(seq_of).min(),
            tokens.iter().map(seq_of).max(),
        ) else {
            return Vec::new();
        };
        // The step's sequences, by lane sequence id from `low`.
        let mut marked = vec![false; top - low + 1];
        for t in tokens.iter() {
            marked[seq_of(t) - low] = true;
        }
        let most = budget.min(kind.sequences.max(MAX_FILLERS_ALWAYS));
        let mut fillers = Vec::new();
        for q in low + 1..top {
            if marked[q - low] {
                continue;
            }
            if fillers.len() == most {
                return Vec::new();
            }
            let slot = layout.slot_at(lane, q);
            let Some(held) = (self.held)(slot) else {
                return Vec::new();
            };
            if held + 1 > self.cells_per_seq {
                return Vec::new();
            }
            fillers.push(Filler {
                slot,
                pos: held as i32,
                count: 1,
            });
        }
        // Without a gap the step is one run of sequences already; its first
        // micro-batch (one token of each) is a generation step's shape unless
        // a prompt chunk's first token in it asks for no logits.
        if fillers.is_empty() && !kind.reads_prompt {
            return fillers;
        }
        // The first token of each sequence asks for logits, unless the
        // sequence has one sampled in the step and only one output is allowed
        // (that step's first micro-batch then keeps a prompt graph's shape).
        marked.fill(false);
        if self.single_output {
            for t in tokens.iter().filter(|t| t.logits) {
                marked[seq_of(t) - low] = true;
            }
        }
        for t in tokens.iter_mut() {
            let k = seq_of(&*t) - low;
            if !marked[k] {
                marked[k] = true;
                t.logits = true;
            }
        }
        let token = tokens[0].token;
        append(tokens, &fillers, token, true);
        fillers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The patch script and the engine share one width: the script's
    /// constant is the largest rounding width.
    #[test]
    fn the_cuda_patch_keeps_graphs_for_the_widest_rounded_step() {
        let script = include_str!("../../scripts/gpu/patch-cuda-graphs.py");
        let widest = ROUND_WIDTHS[ROUND_WIDTHS.len() - 1];
        assert!(
            script.contains(&format!("\nNPC_LLM_ROUNDED_MAX = {widest}\n")),
            "scripts/gpu/patch-cuda-graphs.py must set NPC_LLM_ROUNDED_MAX = {widest}"
        );
        assert!(ROUND_WIDTHS.windows(2).all(|w| w[0] < w[1]));
    }

    fn shaper(shaping: BatchShaping) -> Shaper<impl Fn(usize) -> Option<usize>> {
        Shaper {
            layout: Layout::with_slots(8, 1),
            shaping,
            sliding_window: false,
            cells_per_seq: 64,
            prompt_chunk: 4,
            single_output: false,
            batch_limit: 64,
            held: |slot: usize| Some(slot),
        }
    }

    const ALL: BatchShaping = BatchShaping {
        fill_gaps: true,
        even_prompt_steps: true,
        round_prompt_steps: true,
    };

    #[test]
    fn each_shape_only_when_its_switch_is_on() {
        let seqs = [
            StepSeq {
                slot: 0,
                high: false,
                generating: false,
                prompt_left: 10,
            },
            StepSeq {
                slot: 2,
                high: false,
                generating: false,
                prompt_left: 8,
            },
        ];
        let off = shaper(BatchShaping::default());
        assert_eq!(off.even_step(0, &seqs), None);
        assert_eq!(off.round_lone_prompt(0, 0, 5, true), None);
        let on = shaper(ALL);
        // Width 10: slot 0 reads 10, slot 2 (holding 2 tokens) reads 8 and
        // gets 2 padding, slot 1 (idle, holding 1 token) gets 10.
        assert_eq!(
            on.even_step(0, &seqs),
            Some(EvenStep {
                takes: vec![10, 8],
                fillers: vec![
                    Filler {
                        slot: 1,
                        pos: 1,
                        count: 10
                    },
                    Filler {
                        slot: 2,
                        pos: 10,
                        count: 2
                    }
                ],
            })
        );
        // Padding beyond the step's own tokens: the greedy plan instead.
        let short = [
            seqs[0],
            StepSeq {
                prompt_left: 3,
                ..seqs[1]
            },
        ];
        assert_eq!(on.even_step(0, &short), None);
        assert_eq!(
            on.round_lone_prompt(3, 2, 7, true),
            Some(Filler {
                slot: 3,
                pos: 7,
                count: 11
            })
        );
        // Not the prompt's end, exactly a width, or longer than the largest.
        assert_eq!(on.round_lone_prompt(3, 0, 5, false), None);
        assert_eq!(on.round_lone_prompt(3, 0, 16, true), None);
        assert_eq!(on.round_lone_prompt(3, 0, 65, true), None);
        let windowed = Shaper {
            sliding_window: true,
            ..on
        };
        assert_eq!(windowed.even_step(0, &seqs), None);
        assert_eq!(windowed.round_lone_prompt(3, 2, 7, true), None);
    }

    #[test]
    fn a_gap_between_generating_sequences_is_filled() {
        let on = shaper(ALL);
        let talking = |slot: i32| BatchToken {
            token: 7u32,
            pos: 20,
            seq: slot,
            logits: true,
        };
        let mut tokens = vec![talking(0), talking(3)];
        let kind = StepKind {
            generates: true,
            reads_prompt: false,
            high_prompt: false,
            sequences: 2,
        };
        let fillers = on.fill_gaps(0, &mut tokens, kind, 10);
        assert_eq!(
            fillers,
            vec![
                Filler {
                    slot: 1,
                    pos: 1,
                    count: 1
                },
                Filler {
                    slot: 2,
                    pos: 2,
                    count: 1
                }
            ]
        );
        assert_eq!(tokens.len(), 4);
        let mut tokens = vec![talking(0), talking(3)];
        let high = StepKind {
            high_prompt: true,
            ..kind
        };
        assert!(on.fill_gaps(0, &mut tokens, high, 10).is_empty());
        assert!(
            shaper(BatchShaping::default())
                .fill_gaps(0, &mut tokens, kind, 10)
                .is_empty()
        );
        assert_eq!(tokens.len(), 2);
    }
}
