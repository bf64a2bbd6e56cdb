//! The scheduler, model-free: hand-written cases for each rule, and
//! properties over random interleavings of arrivals, priorities, cancels,
//! samples and decode outcomes, checked against a fake decoder that keeps
//! its own KV from the batches it really decoded.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::engine::slots::JobQueue;
use proptest::prelude::*;

const HIGH: i32 = 10;

fn limits(slots: usize, batch: usize) -> Limits {
    Limits {
        batch_tokens: batch,
        prompt_chunk: 4,
        cells_per_seq: 64,
        layout: Layout::with_slots(slots as u32, 1),
        swa_window: 0,
        max_sit_out: 3,
        shaping: BatchShaping::default(),
        single_output: false,
    }
}

/// `l` with the batch shaping switched as given.
fn shaped(l: Limits, fill_gaps: bool, even_prompt_steps: bool, round_prompt_steps: bool) -> Limits {
    Limits {
        shaping: BatchShaping {
            fill_gaps,
            even_prompt_steps,
            round_prompt_steps,
        },
        ..l
    }
}

fn id(n: u64) -> RequestId {
    RequestId(n)
}

/// Decode every plan; sample a fixed token for everything it names.
fn run_step(s: &mut Scheduler<u32>) -> Applied<()> {
    let plan = s.plan();
    let applied = s.apply(plan, Outcome::Decoded);
    for &(rid, _) in &applied.sample {
        assert!(s.sampled(rid, 7));
    }
    applied
}

#[test]
fn reusable_prefix_table() {
    // (lcp, first position held, window) -> kept
    let cases = [
        (10, -1, 0, 10), // empty KV: the caller's lcp (0 from the slot table)
        (10, 0, 0, 10),  // full KV
        (10, 0, 4, 10),  // SWA cache still holding position 0
        (10, 6, 4, 10),  // window before 10 = 6..10, held
        (10, 7, 4, 0),   // position 6 dropped: re-decode
        (3, 2, 4, 0),    // a prefix shorter than the window needs position 0
        (10, 3, 0, 0),   // full-attention KV missing its start: never reuse
    ];
    for (lcp, first, window, kept) in cases {
        assert_eq!(
            reusable_prefix(lcp, first, window),
            kept,
            "lcp {lcp}, first {first}, window {window}"
        );
    }
}

#[test]
fn sat_out_sequences_record_nothing_while_a_high_prompt_is_read() {
    // The bug this module exists for: six Normal sequences generating, then
    // a High prompt arrives. Those that sit out must not record a token.
    let mut s = Scheduler::new(limits(8, 64), true);
    for n in 0..6 {
        s.admit(id(n), 0, Some(n), vec![1, 2, 3], |_| -1, ())
            .unwrap();
    }
    run_step(&mut s); // all six prompts decoded, each sampled once
    let before: Vec<usize> = (0..6).map(|n| s.kv_of(id(n)).unwrap().len()).collect();
    s.admit(id(99), HIGH, None, (0..40).collect(), |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert_eq!(plan.sequences(), 1, "the High prompt decodes alone");
    assert!((0..6).all(|n| !plan.holds(id(n))), "the six sit out");
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(applied.sample, vec![(id(99), 39)]);
    for n in 0..6 {
        assert_eq!(s.kv_of(id(n)).unwrap().len(), before[n as usize]);
    }
    assert!(s.sampled(id(99), 5));
    // Next step: everyone generates together again.
    let plan = s.plan();
    assert_eq!(plan.sequences(), 7);
    let _ = s.apply(plan, Outcome::Decoded);
}

#[test]
fn with_two_lanes_the_player_step_computes_alone_until_its_first_token() {
    // Slots 0..4: lane 0 holds slots 0 and 2, lane 1 slots 1 and 3 (the
    // player's kept slot, 3, is in lane 1).
    let mut l = limits(4, 64);
    l.layout = Layout::with_slots(4, 2);
    let mut s = Scheduler::new(l, true);
    for n in 0..3 {
        s.admit(id(n), 0, None, vec![1, 2, 3], |_| -1, ()).unwrap();
    }
    for lane in [0, 1] {
        let plan = s.plan_lane(lane);
        for (rid, _) in s.apply(plan, Outcome::Decoded).sample {
            assert!(s.sampled(rid, 9));
        }
    }
    assert_eq!(s.urgent_slot(), None);
    let admitted = s
        .admit(id(99), HIGH, None, (0..20).collect(), |_| -1, ())
        .unwrap();
    assert_eq!(admitted.slot % 2, 1, "the kept slot is in lane 1");
    assert_eq!(s.urgent_slot(), Some(admitted.slot));
    // Lane 0's NPCs sit out while the player's prompt is read in lane 1 ...
    let plan = s.plan_lane(0);
    assert!(plan.tokens.is_empty());
    let _ = s.apply(plan, Outcome::Decoded);
    let plan = s.plan_lane(1);
    assert_eq!(plan.sequences(), 1, "the player's prompt alone in its lane");
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(applied.sample, vec![(id(99), 19)]);
    // ... and while its first token is chosen (its step computing).
    let plan = s.plan_lane(0);
    assert!(
        plan.tokens.is_empty(),
        "lane 0 waits for the player's first token"
    );
    let _ = s.apply(plan, Outcome::Decoded);
    assert_eq!(
        s.urgent_slot(),
        Some(admitted.slot),
        "first token not chosen yet"
    );
    assert!(s.sampled(id(99), 5));
    assert_eq!(s.urgent_slot(), None);
    let plan = s.plan_lane(0);
    assert_eq!(plan.sequences(), 2, "lane 0 generates again");
    let _ = s.apply(plan, Outcome::Decoded);
    // A lane never sits out longer than the bound, whatever the player does.
    let mut s = Scheduler::new(l, true);
    s.admit(id(1), 0, None, vec![1, 2, 3], |_| -1, ()).unwrap();
    s.admit(id(99), HIGH, None, (0..20).collect(), |_| -1, ())
        .unwrap();
    let mut empty = 0;
    loop {
        let plan = s.plan_lane(0);
        if !plan.tokens.is_empty() {
            break;
        }
        empty += 1;
        assert!(empty <= l.max_sit_out, "lane 0 starved");
        let _ = s.apply(plan, Outcome::Decoded);
    }
}

#[test]
fn a_sequence_sat_out_too_long_is_scheduled_regardless() {
    let mut l = limits(3, 64);
    l.max_sit_out = 2;
    let mut s = Scheduler::new(l, true);
    s.admit(id(0), 0, None, vec![1, 2], |_| -1, ()).unwrap();
    run_step(&mut s);
    let mut next = 100;
    let mut sat = 0;
    for _ in 0..10 {
        // A High request arrives every step and reads its prompt.
        if s.can_admit(HIGH) {
            s.admit(id(next), HIGH, None, (0..10).collect(), |_| -1, ())
                .unwrap();
            next += 1;
        }
        let plan = s.plan();
        if plan.holds(id(0)) {
            sat = 0;
        } else {
            sat += 1;
        }
        assert!(sat <= 2, "sat out {sat} steps in a row");
        let applied = s.apply(plan, Outcome::Decoded);
        for (rid, _) in applied.sample {
            if rid != id(0) {
                s.finish(rid);
            } else {
                assert!(s.sampled(rid, 1));
            }
        }
    }
}

#[test]
fn normal_prompts_are_chunked_while_others_generate_high_prompts_are_not() {
    let mut s = Scheduler::new(limits(4, 64), true);
    s.admit(id(0), 0, None, vec![1], |_| -1, ()).unwrap();
    run_step(&mut s);
    s.admit(id(1), 0, None, (0..20).collect(), |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert_eq!(plan.prompt_tokens(), 4, "chunk cap");
    let _ = s.apply(plan, Outcome::Decoded);
    s.admit(id(2), HIGH, None, (0..30).collect(), |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert_eq!(
        plan.prompt_tokens(),
        30,
        "the player's prompt is not capped"
    );
    assert_eq!(plan.sequences(), 1);
    let _ = s.apply(plan, Outcome::Decoded);
}

#[test]
fn no_kv_slot_halves_the_batch_then_fails_one_sequence_typed() {
    let mut s = Scheduler::new(limits(4, 32), true);
    s.admit(id(0), 0, None, (0..20).collect(), |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert_eq!(plan.tokens.len(), 20);
    let a = s.apply(plan, Outcome::NoKvSlot);
    assert!(a.retry && a.failed.is_empty() && a.sample.is_empty());
    assert_eq!(s.kv_of(id(0)).unwrap().len(), 0, "nothing recorded");
    let mut sizes = Vec::new();
    loop {
        let plan = s.plan();
        sizes.push(plan.tokens.len());
        let a = s.apply(plan, Outcome::NoKvSlot);
        if !a.retry {
            assert_eq!(a.failed.len(), 1);
            assert_eq!(
                a.failed[0].error,
                LlmError::KvCacheFull {
                    needed: 1,
                    capacity: 64
                }
            );
            break;
        }
    }
    assert_eq!(sizes, vec![10, 5, 2, 1]);
    assert!(s.is_idle());
    assert!(s.can_admit(0), "the slot is free again");
}

#[test]
fn a_failed_decode_fails_only_the_sequences_in_that_batch() {
    let mut s = Scheduler::new(limits(4, 64), true);
    s.admit(id(0), 0, None, vec![1, 2], |_| -1, ()).unwrap();
    s.admit(id(1), 0, None, vec![1, 2], |_| -1, ()).unwrap();
    run_step(&mut s);
    s.admit(id(2), HIGH, None, vec![3, 4, 5], |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert!(plan.holds(id(2)) && !plan.holds(id(0)) && !plan.holds(id(1)));
    let a = s.apply(plan, Outcome::Failed("boom".into()));
    assert_eq!(a.failed.len(), 1);
    assert_eq!(a.failed[0].id, id(2));
    assert_eq!(s.running(), 2);
    let a = run_step(&mut s);
    assert_eq!(a.sample.len(), 2);
}

#[test]
fn the_last_slot_is_kept_for_high_priority() {
    let mut s = Scheduler::new(limits(3, 64), true);
    s.admit(id(0), 0, None, vec![1], |_| -1, ()).unwrap();
    s.admit(id(1), 0, None, vec![1], |_| -1, ()).unwrap();
    assert!(!s.can_admit(0));
    assert!(s.can_admit(HIGH));
    s.admit(id(2), HIGH, None, vec![1], |_| -1, ()).unwrap();
    assert!(!s.can_admit(HIGH));
    // One slot: it is shared, nothing is kept back.
    let s1 = Scheduler::<u32>::new(limits(1, 8), true);
    assert!(s1.can_admit(0));
}

#[test]
fn prompts_that_leave_no_room_to_answer_are_rejected_typed() {
    let mut s = Scheduler::new(limits(2, 64), true);
    assert_eq!(
        s.admit(id(0), 0, None, vec![0; 64], |_| -1, ()),
        Err(LlmError::PromptTooLong {
            tokens: 64,
            limit: 63
        })
    );
    assert_eq!(
        s.admit(id(0), 0, None, vec![], |_| -1, ()),
        Err(LlmError::EmptyPrompt)
    );
    assert!(s.is_idle() && s.can_admit(0));
}

/// Found by `every_interleaving_keeps_the_invariants`: the same prompt
/// again reuses all but its last token, so the window must be checked for
/// that shorter prefix, not for the whole common prefix.
#[test]
fn a_fully_cached_prompt_checks_the_window_before_its_last_token() {
    let mut l = limits(2, 64);
    l.swa_window = 4;
    let mut s = Scheduler::new(l, true);
    let prompt: Vec<u32> = (0..23).collect();
    s.admit(id(0), 0, Some(1), prompt.clone(), |_| -1, ())
        .unwrap();
    run_step(&mut s);
    s.finish(id(0)).unwrap();
    // The window kept positions 19..23: position 22 needs 18.
    let a = s
        .admit(id(1), 0, Some(1), prompt.clone(), |_| 19, ())
        .unwrap();
    assert_eq!(a.reuse, 0);
    run_step(&mut s); // read again: the cache holds all 23 tokens
    s.finish(id(1)).unwrap();
    let a = s.admit(id(2), 0, Some(1), prompt, |_| 18, ()).unwrap();
    assert_eq!(a.reuse, 22);
}

#[test]
fn prefix_reuse_respects_what_a_sliding_window_cache_still_holds() {
    let mut l = limits(2, 64);
    l.swa_window = 8;
    for (first, want) in [(0, 20), (12, 20), (13, 0)] {
        let mut s = Scheduler::new(l, true);
        let prompt: Vec<u32> = (0..20).collect();
        s.admit(id(0), 0, Some(1), prompt.clone(), |_| -1, ())
            .unwrap();
        run_step(&mut s);
        s.finish(id(0)).unwrap();
        let mut longer = prompt.clone();
        longer.extend([7, 50, 51]);
        let a = s.admit(id(1), 0, Some(1), longer, |_| first, ()).unwrap();
        assert_eq!(a.reuse, want, "first position {first}");
    }
}

// ---------------------------------------------------------------------
// Properties over random interleavings, with a fake decoder.

/// Three NPCs on slots 0, 1, 2 generating after `steps` decoded steps;
/// the one on slot 1 (a 3-token prompt) then ends, its slot keeping its KV
/// as a cache. Returns the scheduler for the next plan.
fn gap_in_the_middle(l: Limits, cache: bool, steps: usize) -> Scheduler<u32> {
    let mut s = Scheduler::new(l, cache);
    for (n, prompt) in [vec![1], vec![1, 2, 3], vec![1]].into_iter().enumerate() {
        s.admit(id(n as u64), 0, Some(n as u64), prompt, |_| -1, ())
            .unwrap();
    }
    for _ in 0..steps {
        let plan = s.plan();
        for (rid, _) in s.apply(plan, Outcome::Decoded).sample {
            let _ = s.sampled(rid, 7);
        }
    }
    assert!(s.finish(id(1)).is_some());
    s
}

/// Three NPCs talking on slots 0, 1, 2 (one step decoded), then a fourth
/// admitted with `prompt`: its prompt is read beside their generation.
fn talking_then_arriving(l: Limits, prompt: Vec<u32>) -> Scheduler<u32> {
    let mut s = Scheduler::new(l, true);
    for n in 0..3 {
        s.admit(id(n), 0, Some(n), vec![1, 2], |_| -1, ()).unwrap();
    }
    run_step(&mut s);
    s.admit(id(7), 0, Some(7), prompt, |_| -1, ()).unwrap();
    s
}

#[test]
fn gap_fillers_table() {
    let on = shaped(limits(4, 16), true, false, false);
    // Filled: slot 1's cache holds 3 tokens, so its filler goes at 3.
    let one_at_3 = vec![Filler {
        slot: 1,
        pos: 3,
        count: 1,
    }];
    let mut s = gap_in_the_middle(on, true, 1);
    let plan = s.plan();
    assert_eq!(plan.fillers, one_at_3);
    check_fillers(&plan, &on);
    assert_eq!(
        plan.sequences(),
        2,
        "a filler is not a sequence of the step"
    );
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(applied.sample.len(), 2, "a filler is never sampled");
    assert_eq!(
        s.slot_table().tokens(1),
        &[1, 2, 3],
        "a filler is never recorded"
    );

    // Not filled: the setting off; a sliding window; the cache off (an idle
    // slot's KV is unknown); no room in slot 1's KV; no room in the batch.
    let cases = [
        ("off", limits(4, 16), true),
        (
            "window",
            Limits {
                swa_window: 8,
                ..on
            },
            true,
        ),
        ("cache off", on, false),
        (
            "KV full",
            Limits {
                cells_per_seq: 4,
                ..on
            },
            true,
        ),
        (
            "batch full",
            Limits {
                batch_tokens: 2,
                ..on
            },
            true,
        ),
    ];
    for (what, l, cache) in cases {
        // Two steps: slot 1's cache then holds 4 tokens (its KV is full
        // with 4 cells per sequence).
        let mut s = gap_in_the_middle(l, cache, 2);
        let plan = s.plan();
        assert!(plan.fillers.is_empty(), "{what}: filled");
        let _ = s.apply(plan, Outcome::Decoded);
    }

    // A High prompt read in the step (the player's): not filled.
    let mut s = gap_in_the_middle(on, true, 1);
    s.admit(id(9), HIGH, None, vec![4, 5], |_| -1, ()).unwrap();
    let plan = s.plan();
    assert!(
        plan.fillers.is_empty(),
        "the player's prompt step was filled"
    );
    let _ = s.apply(plan, Outcome::Decoded);

    // A Normal prompt chunk beside generation: filled, and the chunk's
    // first token asks for logits (the first micro-batch has one output
    // per token) while only its last is sampled.
    let mut s = gap_in_the_middle(
        Limits {
            layout: Layout::with_slots(5, 1),
            ..on
        },
        true,
        1,
    );
    s.admit(id(7), 0, Some(7), vec![4, 5, 6, 7, 8, 9], |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert_eq!(plan.fillers, one_at_3);
    check_fillers(
        &plan,
        &Limits {
            layout: Layout::with_slots(5, 1),
            ..on
        },
    );
    let chunk: Vec<_> = plan.tokens.iter().filter(|t| t.seq == 3).collect();
    assert_eq!(chunk.len(), 4, "the chunk cap");
    assert!(chunk[0].logits && !chunk[1].logits);
    let _ = s.apply(plan, Outcome::Decoded);

    // The same chunk beside generation without a gap (slot 1 still talks):
    // nothing to fill, and the chunk's first token still asks for logits.
    let l5 = Limits {
        layout: Layout::with_slots(5, 1),
        ..on
    };
    let mut s = talking_then_arriving(l5, vec![4, 5, 6, 7, 8, 9]);
    let plan = s.plan();
    assert!(plan.fillers.is_empty());
    check_fillers(&plan, &l5);
    check_first_micro_batch(&s, &plan);
    let chunk: Vec<_> = plan.tokens.iter().filter(|t| t.seq == 3).collect();
    assert!(chunk[0].logits && !chunk[1].logits);
    assert_eq!(
        micro_batches(&plan, 1, usize::MAX)[0],
        (4, 1),
        "one token of each sequence first"
    );
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(
        applied.sample.len(),
        3,
        "the chunk is not sampled mid-prompt"
    );
    // One output per sequence (device top-k): a prompt's last chunk, sampled
    // at its last token, asks for nothing at its first; a chunk that is not
    // the last still does.
    let single = Limits {
        single_output: true,
        ..l5
    };
    for (prompt, first, last) in [
        (vec![4, 5, 6], false, true),
        (vec![4, 5, 6, 7, 8, 9], true, false),
    ] {
        let mut s = talking_then_arriving(single, prompt);
        let plan = s.plan();
        check_first_micro_batch(&s, &plan);
        check_single_output(&plan, &single);
        let chunk: Vec<_> = plan.tokens.iter().filter(|t| t.seq == 3).collect();
        assert_eq!(
            (chunk[0].logits, chunk.last().unwrap().logits),
            (first, last)
        );
        let _ = s.apply(plan, Outcome::Decoded);
    }
    // The setting off: the chunk's first token asks for none.
    let mut s = talking_then_arriving(limits(5, 16), vec![4, 5, 6, 7, 8, 9]);
    let plan = s.plan();
    assert!(plan.tokens.iter().filter(|t| t.seq == 3).all(|t| !t.logits));
    let _ = s.apply(plan, Outcome::Decoded);

    // No gap between the step's sequences (slot 0 idle below them, or one
    // sequence alone on slot 2): nothing to fill.
    for ends in [vec![0], vec![0, 1]] {
        let mut s = Scheduler::new(on, true);
        for n in 0..3 {
            s.admit(id(n), 0, Some(n), vec![1, 2], |_| -1, ()).unwrap();
        }
        run_step(&mut s);
        for n in ends {
            assert!(s.finish(id(n)).is_some());
        }
        let plan = s.plan();
        assert!(plan.fillers.is_empty());
        let _ = s.apply(plan, Outcome::Decoded);
    }

    // Two sequences with 12 idle slots between them: more fillers than the
    // cap (8, or one per sequence), so the step is left split.
    let l = Limits {
        layout: Layout::with_slots(16, 1),
        ..on
    };
    let mut s = Scheduler::new(l, true);
    for n in 0..14 {
        s.admit(id(n), 0, Some(n), vec![1, 2], |_| -1, ()).unwrap();
    }
    run_step(&mut s);
    for n in 1..13 {
        assert!(s.finish(id(n)).is_some());
    }
    let plan = s.plan();
    assert_eq!(plan.sequences(), 2);
    assert!(plan.fillers.is_empty(), "12 fillers for 2 sequences");
    let _ = s.apply(plan, Outcome::Decoded);
}

/// NPCs admitted together with prompts of `lens` tokens (ids `0..`).
fn crowd(l: Limits, lens: &[usize]) -> Scheduler<u32> {
    let mut s = Scheduler::new(l, true);
    for (n, &len) in lens.iter().enumerate() {
        let prompt = (0..len as u32).map(|t| 1 + t + 100 * n as u32).collect();
        s.admit(id(n as u64), 0, Some(n as u64), prompt, |_| -1, ())
            .unwrap();
    }
    s
}

#[test]
fn even_prompt_steps_table() {
    let even = shaped(limits(4, 64), false, true, false);
    // Three prompts of 5, 7 and 9 tokens, nothing generating: one slice of
    // 9 each (the longest), the shorter two padded; all three finish.
    let mut s = crowd(even, &[5, 7, 9]);
    let plan = s.plan();
    assert!(plan.even);
    check_fillers(&plan, &even);
    assert_eq!(
        plan.fillers,
        vec![
            Filler {
                slot: 0,
                pos: 5,
                count: 4
            },
            Filler {
                slot: 1,
                pos: 7,
                count: 2
            },
        ]
    );
    assert_eq!(plan.tokens.len(), 27);
    assert_eq!(plan.prompt_tokens(), 21);
    assert_eq!(micro_batches(&plan, 1, 512), vec![(3, 9)]);
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(applied.sample.len(), 3, "every prompt was read");
    for n in 0..3u64 {
        assert_eq!(
            s.kv_of(id(n)).unwrap().len(),
            [5, 7, 9][n as usize],
            "fillers recorded"
        );
    }
    // The same crowd greedily: 9 + 7 + 5 tokens in three micro-batches.
    let mut g = crowd(limits(4, 64), &[5, 7, 9]);
    let plan = g.plan();
    assert!(!plan.even && plan.fillers.is_empty());
    assert_eq!(micro_batches(&plan, 1, 512), vec![(3, 5), (2, 2), (1, 2)]);
    let _ = g.apply(plan, Outcome::Decoded);

    // A batch limit of 12: slices of 4 (12 / 3 sequences), then the rest
    // padded to 4, then one token each (two generate, one reads its last
    // prompt token): every step one micro-batch.
    let small = Limits {
        batch_tokens: 12,
        ..even
    };
    let mut s = crowd(small, &[5, 7, 9]);
    let mut widths = Vec::new();
    for _ in 0..3 {
        let plan = s.plan();
        assert!(plan.even, "{plan:?}");
        check_fillers(&plan, &small);
        let mb = micro_batches(&plan, 1, 512);
        assert_eq!(mb.len(), 1);
        widths.push(mb[0].1);
        let applied = s.apply(plan, Outcome::Decoded);
        for (rid, _) in applied.sample {
            assert!(s.sampled(rid, 7));
        }
    }
    assert_eq!(widths, vec![4, 4, 1]);
    // Then all three generate: an ordinary step.
    let plan = s.plan();
    assert!(!plan.even && plan.prompt_tokens() == 0);
    let _ = s.apply(plan, Outcome::Decoded);

    // Greedy instead: the setting off; a sliding window; a High sequence
    // in the step; padding above the step's own tokens (a prompt beside
    // generating sequences); no KV room for the padding; an idle slot
    // between them whose KV is unknown (cache off).
    let greedy = |what: &str, l: Limits, s: &mut Scheduler<u32>| {
        let plan = s.plan();
        assert!(!plan.even, "{what}: even");
        check_fillers(&plan, &l);
        let _ = s.apply(plan, Outcome::Decoded);
    };
    greedy("off", limits(4, 64), &mut crowd(limits(4, 64), &[5, 7, 9]));
    let window = Limits {
        swa_window: 8,
        ..even
    };
    greedy("window", window, &mut crowd(window, &[5, 7, 9]));
    let mut s = crowd(even, &[5, 7]);
    s.admit(id(9), HIGH, None, vec![4, 5, 6], |_| -1, ())
        .unwrap();
    greedy("High", even, &mut s);
    let mut s = crowd(
        Limits {
            layout: Layout::with_slots(5, 1),
            ..even
        },
        &[2, 2, 2],
    );
    run_step(&mut s);
    s.admit(id(5), 0, Some(5), (1..=12).collect(), |_| -1, ())
        .unwrap();
    // Three generate (1 token each), one prompt slice of 4 (the chunk
    // cap): 4 × 4 = 16 tokens for 7 of their own.
    greedy(
        "padding",
        Limits {
            layout: Layout::with_slots(5, 1),
            ..even
        },
        &mut s,
    );
    // Slot 0 holds 6 of 8 cells and generates; a 3-token prompt beside it
    // would pad it to 9.
    let tight = Limits {
        cells_per_seq: 8,
        ..even
    };
    let mut s = crowd(tight, &[6]);
    run_step(&mut s);
    s.admit(id(1), 0, Some(1), vec![3, 4, 5], |_| -1, ())
        .unwrap();
    greedy("KV room", tight, &mut s);
    // Cache off: slices of 3 (batch 9), slot 1's line ends, its KV is
    // unknown while slot 2 still reads its prompt.
    let off = Limits {
        batch_tokens: 9,
        ..even
    };
    let mut s = Scheduler::new(off, false);
    for (n, len) in [(0, 2), (1, 2), (2, 6)] {
        s.admit(id(n), 0, None, (1..=len).collect(), |_| -1, ())
            .unwrap();
    }
    let plan = s.plan();
    assert!(plan.even);
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(applied.sample.len(), 2);
    assert!(s.sampled(id(0), 7));
    assert!(s.finish(id(1)).is_some());
    greedy("cache off", off, &mut s);

    // An idle cached slot between them is padded like a sequence.
    let l = Limits {
        layout: Layout::with_slots(5, 1),
        ..even
    };
    let mut s = Scheduler::new(l, true);
    for n in 0..3 {
        s.admit(id(n), 0, Some(n), vec![1, 2], |_| -1, ()).unwrap();
    }
    run_step(&mut s);
    assert!(s.finish(id(1)).is_some());
    let a = s.admit(id(7), 0, Some(7), vec![3, 4], |_| -1, ()).unwrap();
    assert_eq!(a.slot, 3);
    let plan = s.plan();
    // Slots 0 and 2 generate, slot 3 reads 2 prompt tokens, slot 1 is idle
    // (its cache holds its prompt, 2 tokens): width 2, 8 tokens for 4 of
    // their own.
    assert!(plan.even, "{plan:?}");
    check_fillers(&plan, &l);
    assert!(plan.fillers.contains(&Filler {
        slot: 1,
        pos: 2,
        count: 2
    }));
    assert!(plan.fillers.contains(&Filler {
        slot: 0,
        pos: 3,
        count: 1
    }));
    let _ = s.apply(plan, Outcome::Decoded);
    assert_eq!(
        s.slot_table().tokens(1),
        &[1, 2],
        "an idle slot's cache changed"
    );
}

/// The prompt phase of a crowd (the bench's: 32 NPCs on two lanes, prompts
/// of 36 to 44 tokens, batch 512): greedily 13 micro-batches per lane,
/// in even steps one per step.
#[test]
fn even_steps_read_a_crowd_in_fewer_micro_batches() {
    let lens: Vec<usize> = (0..32).map(|n| 36 + (n * 7) % 9).collect();
    let mut counts = Vec::new();
    for even_prompt_steps in [false, true] {
        let l = Limits {
            batch_tokens: 512,
            prompt_chunk: 128,
            cells_per_seq: 512,
            layout: Layout::with_slots(33, 2),
            ..shaped(limits(33, 512), true, even_prompt_steps, false)
        };
        let mut s = crowd(l, &lens);
        let mut micro = 0;
        let mut first = 0;
        let mut steps = 0;
        while first < lens.len() {
            steps += 1;
            assert!(steps < 40, "the prompt phase did not end");
            let lane = steps % 2;
            let plan = s.plan_lane(lane);
            check_fillers(&plan, &l);
            micro += micro_batches(&plan, 2, 512).len();
            let applied = s.apply(plan, Outcome::Decoded);
            for (rid, _) in applied.sample {
                if s.kv_of(rid).unwrap().len() == lens[rid.0 as usize] {
                    first += 1;
                }
                assert!(s.sampled(rid, 7));
            }
        }
        counts.push(micro);
    }
    println!("micro-batches of the prompt phase, greedy / even: {counts:?}");
    assert!(counts[0] >= 20, "greedy: {counts:?}");
    assert!(counts[1] <= 6, "even: {counts:?}");
}

/// What a plan's fillers must be: only where allowed, the step then one
/// run of sequence ids, each filler's tokens at the end of its slot's
/// tokens in the step, right after the ones before them. A gap-filling
/// step: one filler token per missing sequence, asking for logits, and the
/// first token of every sequence asks for logits too. An even prompt
/// step: every sequence of the run has as many tokens (one micro-batch),
/// fillers ask for no logits, and a High sequence is never in it. A
/// rounded lone prompt step: one sequence, its prompt's last token the one
/// output, one filler after it (no logits) up to a width of
/// [`ROUND_WIDTHS`].
fn check_fillers(plan: &Plan<u32>, l: &Limits) {
    let lanes = l.layout.lanes();
    assert!(!(plan.even && plan.rounded), "a step both even and rounded");
    if plan.rounded {
        assert!(
            l.shaping.round_prompt_steps && l.swa_window == 0,
            "a rounded step where not allowed"
        );
        assert_eq!(plan.fillers.len(), 1, "a rounded step's fillers");
        let f = plan.fillers[0];
        assert!(
            plan.tokens.iter().all(|t| t.seq as usize == f.slot),
            "a rounded step of two sequences"
        );
        assert!(
            ROUND_WIDTHS.contains(&plan.tokens.len()),
            "rounded to {}",
            plan.tokens.len()
        );
        let own = plan.tokens.len() - f.count;
        assert!(
            own >= 1 && plan.tokens[own - 1].logits,
            "the prompt's last token is the output"
        );
        assert_eq!(
            plan.tokens.iter().filter(|t| t.logits).count(),
            1,
            "a rounded step has one output"
        );
        assert!(
            plan.tokens.len() <= l.batch_tokens && f.pos as usize + f.count <= l.cells_per_seq,
            "a rounded step over the batch or the KV"
        );
    }
    if plan.even {
        assert!(
            l.shaping.even_prompt_steps && l.swa_window == 0,
            "an even step where not allowed"
        );
        assert!(
            plan.prompt_tokens() > 0,
            "an even step that reads no prompt"
        );
        assert_eq!(
            micro_batches(plan, lanes, usize::MAX).len(),
            1,
            "an even step of more than one micro-batch: {:?}",
            micro_batches(plan, lanes, usize::MAX)
        );
    }
    if plan.fillers.is_empty() {
        return;
    }
    assert!(
        (l.shaping.fill_gaps || plan.even || plan.rounded) && l.swa_window == 0,
        "fillers where not allowed"
    );
    assert!(
        plan.rounded
            || plan
                .tokens
                .iter()
                .any(|t| !plan.fillers.iter().any(|f| f.slot as i32 == t.seq)),
        "a step of fillers only"
    );
    let ids = step_ids(plan, lanes);
    let (low, top) = (ids[0], *ids.last().unwrap());
    assert_eq!(
        ids,
        (low..=top).collect::<Vec<_>>(),
        "a gap left in a filled step"
    );
    for f in &plan.fillers {
        assert!(f.count >= 1);
        assert_eq!(
            plan.fillers.iter().filter(|g| g.slot == f.slot).count(),
            1,
            "two fillers of slot {}",
            f.slot
        );
        let of_seq: Vec<_> = plan
            .tokens
            .iter()
            .filter(|t| t.seq as usize == f.slot)
            .collect();
        let own = of_seq.len() - f.count;
        // The slot's tokens: its own first, then the fillers, in order.
        for (k, t) in of_seq.iter().enumerate() {
            if k > 0 {
                assert_eq!(t.pos, of_seq[k - 1].pos + 1, "slot {}: positions", f.slot);
            }
            if k >= own {
                let pads = plan.even || plan.rounded;
                assert!(t.logits != pads, "filler logits in slot {}", f.slot);
            }
        }
        assert_eq!(of_seq[own].pos, f.pos, "slot {}: filler position", f.slot);
        if !plan.even && !plan.rounded {
            assert_eq!(
                (own, f.count),
                (0, 1),
                "a gap filler beside real tokens of slot {}",
                f.slot
            );
        }
    }
    if !plan.even && !plan.rounded {
        first_tokens_ask_logits(plan, l, "in a filled step");
    }
}

/// The lane sequence ids of a step's tokens (fillers included), sorted,
/// each once.
fn step_ids(plan: &Plan<u32>, lanes: usize) -> Vec<usize> {
    let mut ids: Vec<usize> = plan.tokens.iter().map(|t| t.seq as usize / lanes).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Every sequence's first token in the step asks for logits — except, with
/// one output per sequence, where the sequence is sampled in the step.
fn first_tokens_ask_logits(plan: &Plan<u32>, l: &Limits, what: &str) {
    let mut seen = Vec::new();
    for t in &plan.tokens {
        if !seen.contains(&t.seq) {
            seen.push(t.seq);
            let sampled = plan.tokens.iter().any(|u| u.seq == t.seq && u.logits);
            assert!(
                t.logits || (l.single_output && sampled),
                "the first token of sequence {} asks no logits {what}",
                t.seq
            );
        }
    }
}

/// Where gap fillers are allowed (the setting on, no sliding window, not
/// an even step), a step that generates, reads no High prompt and has no
/// gap between its sequences (none, or filled) asks for logits at the
/// first token of every sequence: llama.cpp's first micro-batch of it has a
/// generation step's shape.
fn check_first_micro_batch(s: &Scheduler<u32>, plan: &Plan<u32>) {
    let l = s.limits();
    let lanes = l.layout.lanes();
    let generates = plan.entries.iter().any(|e| e.part == Part::Next);
    let high_prompt = plan.entries.iter().any(|e| {
        matches!(e.part, Part::Prompt { .. })
            && s.seqs.iter().any(|q| q.id == e.id && q.priority > NORMAL)
    });
    if !l.shaping.fill_gaps || l.swa_window > 0 || plan.even || !generates || high_prompt {
        return;
    }
    let ids = step_ids(plan, lanes);
    if ids.last().map(|&top| top - ids[0] + 1) != Some(ids.len()) {
        return;
    }
    first_tokens_ask_logits(plan, l, "in a step without a gap");
}

/// With [`Limits::single_output`] (llama.cpp's backend sampling), no
/// sequence asks for logits at two tokens of a step.
fn check_single_output(plan: &Plan<u32>, l: &Limits) {
    if !l.single_output {
        return;
    }
    for t in &plan.tokens {
        let outputs = plan
            .tokens
            .iter()
            .filter(|u| u.seq == t.seq && u.logits)
            .count();
        assert!(
            outputs <= 1,
            "sequence {} asks for {outputs} outputs",
            t.seq
        );
    }
}

/// The micro-batches llama.cpp makes of a lane's step with a KV stream
/// per sequence: `split_equal(n_ubatch, sequential = true)` of
/// llama-batch.cpp on the batch as the worker builds it (sorted by
/// sequence): from the first unused token, sequences with consecutive ids
/// in batch order, as many tokens from each as all have, within `n_ubatch`.
/// Each as (sequences, tokens per sequence).
fn micro_batches(plan: &Plan<u32>, lanes: usize, n_ubatch: usize) -> Vec<(usize, usize)> {
    let mut seqs: Vec<usize> = plan
        .tokens
        .iter()
        .map(|t| t.seq as usize / lanes.max(1))
        .collect();
    seqs.sort_unstable();
    let mut used = vec![false; seqs.len()];
    let mut out = Vec::new();
    while used.iter().any(|u| !u) {
        let mut cur: Vec<usize> = Vec::new();
        for (i, &q) in seqs.iter().enumerate() {
            if used[i] || cur.contains(&q) || cur.last().is_some_and(|&last| q != last + 1) {
                continue;
            }
            cur.push(q);
            if cur.len() > n_ubatch {
                break;
            }
        }
        let idx: Vec<Vec<usize>> = cur
            .iter()
            .map(|&q| {
                (0..seqs.len())
                    .filter(|&i| seqs[i] == q && !used[i])
                    .collect()
            })
            .collect();
        let mut k = 0;
        while idx.iter().all(|v| v.len() > k) {
            for v in &idx {
                used[v[k]] = true;
            }
            k += 1;
            if (k + 1) * cur.len() > n_ubatch {
                break;
            }
        }
        out.push((cur.len(), k));
    }
    out
}

/// A fake llama.cpp: per sequence id the tokens at positions `0..len`
/// (positions below `first` dropped by a sliding window), and a shared pool
/// of cells (the unified-KV case) that answers "no KV slot" when full.
struct FakeKv {
    seqs: Vec<Vec<u32>>,
    first: Vec<usize>,
    window: usize,
    pool: usize,
}

impl FakeKv {
    fn used(&self) -> usize {
        self.seqs.iter().map(Vec::len).sum()
    }

    fn first_pos(&self, slot: usize) -> i32 {
        if self.seqs[slot].is_empty() {
            -1
        } else {
            self.first[slot] as i32
        }
    }

    fn seq_rm(&mut self, slot: usize, from: usize) {
        self.seqs[slot].truncate(from);
        if self.first[slot] >= from {
            self.first[slot] = 0;
            self.seqs[slot].clear();
        }
    }

    /// Decode a batch: positions must continue each sequence exactly, and
    /// (sliding window) the window before each position must be held.
    fn decode(&mut self, tokens: &[BatchToken<u32>], inject: Inject) -> Outcome {
        assert!(!tokens.is_empty(), "an empty batch was planned");
        match inject {
            Inject::NoKvSlot => return Outcome::NoKvSlot,
            Inject::Fail => {
                // Half the batch may have landed: the KV of these sequences is unknown.
                for t in &tokens[..tokens.len() / 2] {
                    self.seqs[t.seq as usize].push(t.token);
                }
                return Outcome::Failed("injected".into());
            }
            Inject::None => {}
        }
        if self.used() + tokens.len() > self.pool {
            return Outcome::NoKvSlot;
        }
        for t in tokens {
            let slot = t.seq as usize;
            assert_eq!(
                t.pos as usize,
                self.seqs[slot].len(),
                "position gap or overlap in sequence {slot}"
            );
            if self.window > 0 && !self.seqs[slot].is_empty() {
                assert!(
                    self.first[slot] <= (t.pos as usize).saturating_sub(self.window),
                    "decoding position {} of sequence {slot} whose window starts at {}",
                    t.pos,
                    self.first[slot]
                );
            }
            self.seqs[slot].push(t.token);
            if self.window > 0 {
                let len = self.seqs[slot].len();
                self.first[slot] = self.first[slot].max(len.saturating_sub(self.window));
            }
        }
        Outcome::Decoded
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inject {
    None,
    NoKvSlot,
    Fail,
}

#[derive(Debug, Clone)]
enum Op {
    Submit {
        high: bool,
        key: Option<u64>,
        prefix: usize,
        suffix: Vec<u32>,
        max_tokens: usize,
    },
    Cancel(usize),
    Step(Inject),
    /// The next sampled token of the `n`th running sequence is an end of turn.
    EndOfTurn(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (
            proptest::bool::weighted(0.25),
            proptest::option::of(0u64..4),
            0usize..24,
            proptest::collection::vec(100u32..200, 0..20),
            1usize..12,
        )
            .prop_map(|(high, key, prefix, suffix, max_tokens)| Op::Submit {
                high,
                key,
                prefix,
                suffix,
                max_tokens
            }),
        1 => (0usize..64).prop_map(Op::Cancel),
        8 => prop_oneof![
            20 => Just(Inject::None),
            1 => Just(Inject::NoKvSlot),
            1 => Just(Inject::Fail),
        ]
        .prop_map(Op::Step),
        1 => (0usize..8).prop_map(Op::EndOfTurn),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Cancelled,
    Failed,
}

struct JobInfo {
    priority: i32,
    max_tokens: usize,
    generated: usize,
    key: Option<u64>,
    prompt: Vec<u32>,
}

/// The worker's loop around the scheduler, with the fake decoder.
struct Harness {
    s: Scheduler<u32>,
    kv: FakeKv,
    queue: JobQueue<RequestId>,
    jobs: BTreeMap<RequestId, JobInfo>,
    ends: HashMap<RequestId, Vec<End>>,
    slot_of: HashMap<RequestId, usize>,
    eot: Vec<usize>,
    next: u64,
    steps: u64,
    /// Consecutive decoded steps each running sequence sat out (as the
    /// scheduler counts them).
    sat: HashMap<RequestId, u32>,
    /// The same, reset whenever the batch limit is below its maximum.
    starve: HashMap<RequestId, u32>,
    /// Jobs refused before they ran (queue full, empty or too long prompt).
    refused: Vec<RequestId>,
}

impl Harness {
    fn new(l: Limits, pool: usize) -> Self {
        Self {
            s: Scheduler::new(l, true),
            kv: FakeKv {
                seqs: vec![Vec::new(); l.layout.slots()],
                first: vec![0; l.layout.slots()],
                window: l.swa_window,
                pool,
            },
            queue: JobQueue::new(16),
            jobs: BTreeMap::new(),
            ends: HashMap::new(),
            slot_of: HashMap::new(),
            eot: Vec::new(),
            next: 0,
            steps: 0,
            sat: HashMap::new(),
            starve: HashMap::new(),
            refused: Vec::new(),
        }
    }

    fn end(&mut self, rid: RequestId, how: End) {
        self.ends.entry(rid).or_default().push(how);
        self.slot_of.remove(&rid);
        self.sat.remove(&rid);
        self.starve.remove(&rid);
    }

    fn submit(&mut self, high: bool, key: Option<u64>, prompt: Vec<u32>, max_tokens: usize) {
        let rid = id(self.next);
        self.next += 1;
        let priority = if high { HIGH } else { 0 };
        self.jobs.insert(
            rid,
            JobInfo {
                priority,
                max_tokens,
                generated: 0,
                key,
                prompt,
            },
        );
        if self.queue.push(priority, rid).is_err() {
            self.refused.push(rid);
            self.end(rid, End::Failed); // QueueFull
        }
    }

    fn admit(&mut self) {
        while let Some(p) = self.queue.peek_priority()
            && self.s.can_admit(p)
        {
            let rid = self.queue.pop().unwrap();
            let job = &self.jobs[&rid];
            let (priority, key, prompt) = (job.priority, job.key, job.prompt.clone());
            let kv = &self.kv;
            match self
                .s
                .admit(rid, priority, key, prompt, |slot| kv.first_pos(slot), ())
            {
                Ok(a) => {
                    assert!(
                        !self.slot_of.values().any(|&s| s == a.slot),
                        "slot {} given to two live jobs",
                        a.slot
                    );
                    self.kv.seq_rm(a.slot, a.reuse);
                    assert_eq!(
                        self.kv.seqs[a.slot][..],
                        self.jobs[&rid].prompt[..a.reuse],
                        "reused KV is not the prompt's prefix"
                    );
                    self.slot_of.insert(rid, a.slot);
                }
                Err(_) => {
                    self.refused.push(rid);
                    self.end(rid, End::Failed);
                }
            }
        }
    }

    fn cancel(&mut self, n: usize) {
        if self.next == 0 {
            return;
        }
        let rid = id(n as u64 % self.next);
        if let Some(r) = self.s.finish(rid) {
            self.kv_matches_cache(r.slot);
            self.end(rid, End::Cancelled);
        } else if self.queue.remove_where(|j| *j == rid).is_some() {
            self.end(rid, End::Cancelled);
        }
    }

    /// A finished sequence's cache is exactly what its KV holds.
    fn kv_matches_cache(&self, slot: usize) {
        assert_eq!(
            self.s.slot_table().tokens(slot),
            &self.kv.seqs[slot][..],
            "slot {slot}'s cache record differs from its KV"
        );
    }

    fn step(&mut self, inject: Inject) {
        self.admit();
        let limit = self.s.batch_limit();
        let plan = self.s.plan();
        if self.s.is_idle() {
            assert!(plan.tokens.is_empty());
            return;
        }
        self.steps += 1;
        // The plan never exceeds the batch, and holds every running sequence
        // it can: it is empty only when nothing runs.
        assert!(!plan.tokens.is_empty(), "sequences run but nothing planned");
        assert!(plan.tokens.len() <= limit && limit <= self.s.limits().batch_tokens);
        // A High sequence is never left out behind a Normal one.
        let snap = self.s.snapshot();
        let high_out = snap
            .iter()
            .any(|&(r, _, p, work)| p > 0 && work && !plan.holds(r));
        if high_out {
            for &(r, _, p, _) in &snap {
                if plan.holds(r) && p <= 0 {
                    assert!(
                        self.sat.get(&r).copied().unwrap_or(0) >= self.s.limits().max_sit_out,
                        "a Normal sequence went ahead of a waiting High one"
                    );
                }
            }
        }
        check_fillers(&plan, self.s.limits());
        check_first_micro_batch(&self.s, &plan);
        check_single_output(&plan, self.s.limits());
        let tokens = plan.tokens.clone();
        let fillers = plan.fillers.clone();
        let held: Vec<(RequestId, bool)> = snap
            .iter()
            .map(|&(r, _, _, w)| (r, w && !plan.holds(r)))
            .collect();
        let outcome = self.kv.decode(&tokens, inject);
        // The worker drops the gap fillers again, whatever the outcome.
        for f in &fillers {
            self.kv.seq_rm(f.slot, f.pos as usize);
        }
        let applied = self.s.apply(plan, outcome.clone());
        if outcome == Outcome::Decoded {
            let full = limit == self.s.limits().batch_tokens;
            for (r, out) in held {
                let sat = self.sat.entry(r).or_default();
                *sat = if out { *sat + 1 } else { 0 };
                let starve = self.starve.entry(r).or_default();
                *starve = if out && full { *starve + 1 } else { 0 };
            }
            let bound = self.s.limits().max_sit_out + self.s.limits().layout.slots() as u32;
            for (&r, &n) in &self.starve {
                assert!(n <= bound, "{r:?} sat out {n} steps in a row");
            }
        }
        if applied.retry {
            assert!(
                self.s.batch_limit() < tokens.len() || !applied.evicted.is_empty(),
                "a retry must be smaller or have made room"
            );
        }
        for slot in applied.evicted {
            assert!(
                !self.slot_of.values().any(|&s| s == slot),
                "evicted a live slot"
            );
            self.kv.seq_rm(slot, 0);
        }
        if outcome == Outcome::Decoded {
            assert!(applied.failed.is_empty());
        } else {
            assert!(applied.sample.is_empty());
        }
        for d in applied.failed {
            assert_eq!(self.slot_of.get(&d.id), Some(&d.slot));
            self.kv.seq_rm(d.slot, 0);
            if outcome == Outcome::NoKvSlot {
                assert!(matches!(d.error, LlmError::KvCacheFull { .. }));
                assert_eq!(tokens.len(), 1, "only a batch of one fails on no KV slot");
            }
            self.end(d.id, End::Failed);
        }
        // No token is in a sequence's KV record unless it was decoded.
        for (&rid, &slot) in &self.slot_of {
            assert_eq!(
                self.s.kv_of(rid).unwrap(),
                &self.kv.seqs[slot][..],
                "KV record of {rid:?} differs from what was decoded"
            );
        }
        for (rid, at) in applied.sample {
            let slot = self.slot_of[&rid];
            assert_eq!(tokens[at].seq as usize, slot);
            assert!(tokens[at].logits);
            let job = self.jobs.get_mut(&rid).unwrap();
            job.generated += 1;
            let running = self.s.snapshot();
            let rank = running.iter().position(|r| r.0 == rid).unwrap();
            let eot = self.eot.contains(&rank);
            if eot
                || job.generated >= job.max_tokens
                || !self.s.sampled(rid, 1000 + job.generated as u32)
            {
                // End of turn, max tokens, or context full.
                let r = self.s.finish(rid).unwrap();
                self.kv_matches_cache(r.slot);
                self.end(rid, End::Completed);
            }
        }
        self.eot.clear();
        // An idle slot's KV is exactly its cache record (gap fillers left
        // nothing behind).
        for slot in 0..self.s.limits().layout.slots() {
            if !self.s.slot_table().is_busy(slot) {
                self.kv_matches_cache(slot);
            }
        }
        // No slot leaks: busy slots are exactly the running sequences'.
        for slot in 0..self.s.limits().layout.slots() {
            assert_eq!(
                self.s.slot_table().is_busy(slot),
                self.slot_of.values().any(|&s| s == slot),
                "slot {slot} busy flag disagrees with the running jobs"
            );
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Submit {
                high,
                key,
                prefix,
                suffix,
                max_tokens,
            } => {
                // Prompts of one key share a prefix, so the cache is exercised.
                let base = key.unwrap_or(9) as u32 * 50;
                let mut prompt: Vec<u32> = (base..base + prefix as u32).collect();
                prompt.extend(suffix);
                self.submit(high, key, prompt, max_tokens);
            }
            Op::Cancel(n) => self.cancel(n),
            Op::Step(inject) => self.step(inject),
            Op::EndOfTurn(n) => self.eot.push(n),
        }
    }

    /// Run until every job ended; each must end exactly once, within a
    /// bound on steps derived from the work there is.
    fn drain(&mut self) {
        let work: usize = self
            .jobs
            .values()
            .map(|j| j.prompt.len() + j.max_tokens + 2)
            .sum();
        let bound = 4 * work as u64 + 64;
        let start = self.steps;
        while !(self.s.is_idle() && self.queue.is_empty()) {
            self.step(Inject::None);
            assert!(
                self.steps - start <= bound,
                "not finished after {bound} steps: {} running, {} queued",
                self.s.running(),
                self.queue.len()
            );
        }
        for rid in self.jobs.keys() {
            let ends = self.ends.get(rid).map_or(0, Vec::len);
            assert_eq!(ends, 1, "{rid:?} ended {ends} times");
        }
        assert!(self.kv_is_cache_only());
    }

    fn kv_is_cache_only(&self) -> bool {
        (0..self.s.limits().layout.slots()).all(|slot| !self.s.slot_table().is_busy(slot))
    }
}

fn limits_strategy() -> impl Strategy<Value = (Limits, usize)> {
    (
        1usize..6,
        0usize..24,
        1usize..9,
        prop_oneof![Just(0usize), 4usize..12],
        1u32..4,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(
                slots,
                extra,
                chunk,
                window,
                sit,
                fill_gaps,
                even_prompt_steps,
                round_prompt_steps,
                single_output,
            )| {
                let l = Limits {
                    batch_tokens: slots + 1 + extra,
                    prompt_chunk: chunk,
                    cells_per_seq: 48,
                    layout: Layout::with_slots(slots as u32, 1),
                    swa_window: window,
                    max_sit_out: sit,
                    shaping: BatchShaping {
                        fill_gaps,
                        even_prompt_steps,
                        round_prompt_steps,
                    },
                    single_output,
                };
                // A pool sometimes smaller than every slot's share: "no KV slot".
                (l, 40 * slots)
            },
        )
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Every job ends exactly once in bounded steps; nothing unplanned is
    /// recorded in KV; batches fit; High is never behind Normal; Normal is
    /// never starved; slots never shared or leaked; "no KV slot" retries
    /// smaller and fails only a batch of one, typed.
    #[test]
    fn every_interleaving_keeps_the_invariants(
        (l, pool) in limits_strategy(),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut h = Harness::new(l, pool);
        for op in ops {
            h.apply(op);
        }
        h.drain();
    }

    /// With a decoder that never fails and room for everyone, every job
    /// completes (none fails), whatever the priorities and arrival times.
    #[test]
    fn with_room_every_job_completes(
        (l, _) in limits_strategy(),
        ops in proptest::collection::vec(op(), 0..120),
    ) {
        let mut h = Harness::new(l, usize::MAX);
        for op in ops {
            match op {
                Op::Step(_) => h.step(Inject::None),
                Op::Cancel(_) => {}
                other => h.apply(other),
            }
        }
        h.drain();
        for (rid, ends) in &h.ends {
            if !h.refused.contains(rid) {
                prop_assert_eq!(ends, &vec![End::Completed], "{:?}", rid);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]
    /// Slots split across lanes, the lanes planned and applied in any
    /// order (an empty plan applied too, as the worker does): a lane's plan
    /// holds only its own slots, is empty while some of them have work only
    /// when a High sequence runs in another lane (the sit-out rule holds
    /// across lanes, bounded), applying it leaves the other lanes' KV
    /// records as they were, and every job completes.
    #[test]
    fn lanes_plan_apart_and_every_job_completes(
        lanes in 2usize..=8,
        slots in 2usize..19,
        fill_gaps in any::<bool>(),
        even_prompt_steps in any::<bool>(),
        round_prompt_steps in any::<bool>(),
        single_output in any::<bool>(),
        jobs in proptest::collection::vec((any::<bool>(), 1usize..12, 1usize..6), 1..14),
        turns in proptest::collection::vec(0usize..8, 0..300),
    ) {
        let l = Limits {
            batch_tokens: slots + 9,
            prompt_chunk: 4,
            cells_per_seq: 64,
            layout: Layout::with_slots(slots as u32, lanes as u32),
            swa_window: 0,
            max_sit_out: 3,
            shaping: BatchShaping {
                fill_gaps,
                even_prompt_steps,
                round_prompt_steps,
            },
            single_output,
        };
        let mut s: Scheduler<u32> = Scheduler::new(l, true);
        let mut queue: std::collections::VecDeque<(u64, bool, usize, usize)> = jobs
            .iter()
            .enumerate()
            .map(|(n, &(high, p, m))| (n as u64, high, p, m))
            .collect();
        let mut generated: std::collections::HashMap<u64, (usize, usize)> = Default::default();
        let mut done = 0usize;
        let work: usize = jobs.iter().map(|j| j.1 + j.2 + 2).sum();
        let bound = 4 * lanes * work + 64 + turns.len();
        let mut turn = turns.iter().copied().chain(0..).map(|t| t % lanes);
        let mut steps = 0;
        while done < jobs.len() {
            steps += 1;
            prop_assert!(steps <= bound, "not finished after {} steps", bound);
            while let Some(&(n, high, p, m)) = queue.front() {
                let prio = if high { HIGH } else { 0 };
                if !s.can_admit(prio) {
                    break;
                }
                queue.pop_front();
                let prompt: Vec<u32> = (0..p as u32).map(|t| t + 100 * n as u32).collect();
                s.admit(id(n), prio, None, prompt, |_| -1, ()).unwrap();
                generated.insert(n, (0, m));
            }
            let lane = turn.next().unwrap();
            let snap = s.snapshot();
            let plan = s.plan_lane(lane);
            prop_assert_eq!(plan.lane(), lane);
            for t in &plan.tokens {
                prop_assert_eq!(t.seq as usize % lanes, lane, "a token of another lane");
            }
            check_first_micro_batch(&s, &plan);
            check_single_output(&plan, &l);
            if !plan.fillers.is_empty() {
                // The lane's step is one run of its sequence ids from 0.
                let ids = step_ids(&plan, lanes);
                let (low, top) = (ids[0], *ids.last().unwrap());
                prop_assert_eq!(ids, (low..=top).collect::<Vec<_>>());
            }
            let lane_has_work = snap
                .iter()
                .any(|&(_, slot, _, work)| slot % lanes == lane && work);
            let high_elsewhere = snap
                .iter()
                .any(|&(_, slot, p, _)| slot % lanes != lane && p > 0);
            if lane_has_work && plan.tokens.is_empty() {
                prop_assert!(high_elsewhere, "a lane with work planned nothing");
            }
            if !lane_has_work {
                prop_assert!(plan.tokens.is_empty());
            }
            let others: Vec<(RequestId, Vec<u32>)> = snap
                .iter()
                .filter(|&&(_, slot, _, _)| slot % lanes != lane)
                .map(|&(r, _, _, _)| (r, s.kv_of(r).unwrap().to_vec()))
                .collect();
            let applied = s.apply(plan, Outcome::Decoded);
            for (r, kv) in &others {
                prop_assert_eq!(s.kv_of(*r).unwrap(), &kv[..], "another lane's KV changed");
            }
            for (rid, _) in applied.sample {
                let g = generated.get_mut(&rid.0).unwrap();
                g.0 += 1;
                if g.0 >= g.1 || !s.sampled(rid, 7) {
                    s.finish(rid).unwrap();
                    done += 1;
                }
            }
        }
        prop_assert!(s.is_idle() && queue.is_empty());
    }
}

/// Three slots, a batch of 128, 256 cells a sequence, rounding on.
fn rounding() -> Limits {
    Limits {
        cells_per_seq: 256,
        ..shaped(limits(3, 128), false, false, true)
    }
}

/// A lone step that ends a prompt, rounded up to a width of
/// [`ROUND_WIDTHS`]: when it is, when it is not, and that the rounding is
/// never recorded.
#[test]
fn rounded_lone_prompt_steps_table() {
    let on = rounding();
    // (prompt tokens, limits) -> the step's tokens, rounded or not.
    let cases: [(usize, Limits, usize, bool); 11] = [
        (1, on, 16, true),
        (15, on, 16, true),
        (16, on, 16, false), // already a width
        (17, on, 32, true),
        (22, on, 32, true),
        (33, on, 64, true),
        (64, on, 64, false),
        (65, on, 65, false), // longer than the widest
        (
            22,
            Limits {
                cells_per_seq: 31,
                ..on
            },
            22,
            false,
        ), // 32 cells do not fit
        (
            22,
            Limits {
                batch_tokens: 31,
                ..on
            },
            22,
            false,
        ), // nor the batch
        (22, shaped(on, false, false, false), 22, false),
    ];
    for (len, l, width, rounded) in cases {
        let mut s = crowd(l, &[len]);
        let plan = s.plan();
        check_fillers(&plan, &l);
        assert_eq!(
            (plan.tokens.len(), plan.rounded),
            (width, rounded),
            "{len} tokens, {l:?}"
        );
        if rounded {
            assert_eq!(
                plan.fillers,
                vec![Filler {
                    slot: 0,
                    pos: len as i32,
                    count: width - len
                }]
            );
        }
        let applied = s.apply(plan, Outcome::Decoded);
        assert_eq!(applied.sample.len(), 1, "the prompt was read");
        assert_eq!(s.kv_of(id(0)).unwrap().len(), len, "padding recorded");
    }
    // With even prompt steps on (a GPU's default), a lone Normal prompt is
    // still rounded: one sequence is no crowd.
    let both = shaped(on, true, true, true);
    let mut s = crowd(both, &[22]);
    let plan = s.plan();
    check_fillers(&plan, &both);
    assert!(plan.rounded && !plan.even && plan.tokens.len() == 32);
    let _ = s.apply(plan, Outcome::Decoded);
    assert_eq!(s.kv_of(id(0)).unwrap().len(), 22);
    // A sliding window: never rounded.
    let window = Limits {
        swa_window: 8,
        ..on
    };
    let plan = crowd(window, &[5]).plan();
    assert!(!plan.rounded && plan.tokens.len() == 5);

    // A prompt read in two steps (a batch of 32): the first step does not
    // end it (not rounded), the second reads its last 8 tokens alone,
    // rounded to 16 at position 40.
    let small = Limits {
        batch_tokens: 32,
        ..on
    };
    let mut s = crowd(small, &[40]);
    let plan = s.plan();
    assert!(!plan.rounded && plan.tokens.len() == 32);
    let _ = s.apply(plan, Outcome::Decoded);
    let plan = s.plan();
    check_fillers(&plan, &small);
    assert!(plan.rounded);
    assert_eq!(
        plan.fillers,
        vec![Filler {
            slot: 0,
            pos: 40,
            count: 8
        }]
    );
    let _ = s.apply(plan, Outcome::Decoded);
    assert_eq!(s.kv_of(id(0)).unwrap().len(), 40);

    // Two prompts in one step, or a prompt beside a generating sequence:
    // not lone, not rounded.
    let four = Limits {
        layout: Layout::with_slots(4, 1),
        ..on
    };
    let mut s = crowd(four, &[5, 7]);
    let plan = s.plan();
    assert!(!plan.rounded && plan.fillers.is_empty());
    let applied = s.apply(plan, Outcome::Decoded);
    for &(rid, _) in &applied.sample {
        assert!(s.sampled(rid, 7));
    }
    s.admit(id(9), 0, Some(9), vec![3; 6], |_| -1, ()).unwrap();
    let plan = s.plan();
    assert!(
        !plan.rounded && plan.fillers.is_empty(),
        "{:?}",
        plan.tokens
    );
}

/// The player's next turn, cached: a High request whose prompt extends an
/// idle slot's cache reads only its new tokens — alone, while a Normal
/// sequence sits out — rounded up, its fillers right after the prompt.
#[test]
fn a_cached_turn_of_the_player_is_rounded() {
    let on = rounding();
    let mut s: Scheduler<u32> = Scheduler::new(on, true);
    let first: Vec<u32> = (0..70).collect();
    s.admit(id(0), HIGH, Some(1), first.clone(), |_| -1, ())
        .unwrap();
    let plan = s.plan();
    assert!(!plan.rounded, "70 tokens: not rounded");
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(applied.sample.len(), 1);
    assert!(s.sampled(id(0), 77));
    let _ = s.finish(id(0)).unwrap();
    // A Normal NPC talking, then the player's second turn: the 70 cached
    // tokens, the answer (77, never decoded: not cached) and 9 new ones.
    s.admit(id(1), 0, Some(2), vec![500; 4], |_| -1, ())
        .unwrap();
    let _ = run_step(&mut s);
    let mut second = first;
    second.push(77);
    second.extend(200..209);
    let admitted = s.admit(id(2), HIGH, Some(1), second, |_| -1, ()).unwrap();
    assert_eq!(admitted.reuse, 70);
    let plan = s.plan();
    check_fillers(&plan, &on);
    assert!(plan.rounded, "{:?}", plan.tokens);
    assert!(!plan.holds(id(1)), "the Normal NPC sits out");
    assert_eq!(
        plan.fillers,
        vec![Filler {
            slot: admitted.slot,
            pos: 80,
            count: 6
        }]
    );
    let applied = s.apply(plan, Outcome::Decoded);
    assert_eq!(
        applied.sample.iter().map(|a| a.0).collect::<Vec<_>>(),
        vec![id(2)]
    );
    assert_eq!(s.kv_of(id(2)).unwrap().len(), 80);
}
