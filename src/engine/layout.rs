//! Where every slot lives: the one place that knows slots, lanes, llama.cpp
//! sequence ids, the slot kept for the player and the contexts' sizes.
//! Pure: no llama.cpp or Bevy types; table-tested below.
//!
//! A *slot* is one NPC request's place in the engine (its KV, its cached
//! prefix). The plan's `sequences` slots serve every request; one more slot,
//! the last, is kept for `RequestPriority::High` (the player's NPC never
//! waits for a slot). The slots are split across `lanes` llama.cpp
//! contexts decoded in turns: slot `s` is in lane `s % lanes`, where it is
//! llama.cpp sequence `s / lanes`; each lane's context holds the largest
//! lane's share of the slots.

/// llama.cpp's most sequences in one context (`LLAMA_MAX_SEQ`).
pub(crate) const LLAMA_MAX_SEQ: u32 = 256;

/// The most sequences a GPU lane holds where the plan can keep to it
/// ([`Layout::gpu_lanes`]): llama.cpp's matrix-vector kernels take up to 8
/// tokens. Also how many busy slots a lane takes before a fresh request
/// opens one more lane (`SlotTable::with_lanes`).
pub(crate) const LANE_SEQUENCES: u32 = 8;

/// The most lanes (llama.cpp contexts) a plan or `gpu.lanes` may ask for.
pub(crate) const MAX_LANES: u32 = 8;

/// How the engine's slots are laid out over llama.cpp contexts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Slots in all, the player's included (≤ [`LLAMA_MAX_SEQ`]).
    slots: u32,
    /// Contexts the slots are split across (1 ..= slots).
    lanes: u32,
}

impl Layout {
    /// The layout of a plan of `sequences` parallel sequences in `lanes`
    /// contexts: one slot more for the player, within llama.cpp's limit;
    /// never more lanes than slots, never fewer than one.
    pub(crate) fn for_sequences(sequences: u32, lanes: u32) -> Self {
        Self::with_slots(sequences.saturating_add(1).min(LLAMA_MAX_SEQ), lanes)
    }

    /// `slots` slots in all (at least one) in `lanes` contexts (at most
    /// [`MAX_LANES`], never more than slots).
    pub(crate) fn with_slots(slots: u32, lanes: u32) -> Self {
        let slots = slots.clamp(1, LLAMA_MAX_SEQ);
        Self {
            slots,
            lanes: lanes.clamp(1, slots.min(MAX_LANES)),
        }
    }

    /// The lanes a GPU plan decodes `sequences` parallel sequences in: at
    /// most [`LANE_SEQUENCES`] a lane up to eight lanes, never fewer than
    /// two (the device computes one lane's step while the host chooses the
    /// other's tokens); beyond 64 sequences four. llama.cpp decodes a step
    /// of up to 8 tokens with its matrix-vector kernels, larger ones with
    /// its batched kernels, which cost about as much at 16 tokens as at 32;
    /// each lane is a context with its own CUDA stream, so lanes' steps also
    /// overlap on the device (figures: docs/BENCHMARKS.md).
    pub(crate) fn gpu_lanes(sequences: u32) -> u32 {
        if sequences > MAX_LANES * LANE_SEQUENCES {
            4
        } else {
            sequences.div_ceil(LANE_SEQUENCES).clamp(2, MAX_LANES)
        }
    }

    /// Slots in all, the player's included.
    pub(crate) fn slots(&self) -> usize {
        self.slots as usize
    }

    /// Contexts (lanes).
    pub(crate) fn lanes(&self) -> usize {
        self.lanes as usize
    }

    /// Sequences each lane's context holds: the largest lane's share.
    pub(crate) fn per_lane(&self) -> u32 {
        self.slots.div_ceil(self.lanes)
    }

    /// Slot `slot`'s lane and its llama.cpp sequence id there.
    pub(crate) fn locate(&self, slot: usize) -> (usize, usize) {
        let lanes = self.lanes();
        (slot % lanes, slot / lanes)
    }

    /// The lane slot `slot` decodes in.
    pub(crate) fn lane_of(&self, slot: usize) -> usize {
        self.locate(slot).0
    }

    /// The slot of sequence `seq` of lane `lane`.
    pub(crate) fn slot_at(&self, lane: usize, seq: usize) -> usize {
        seq * self.lanes() + lane
    }

    /// Slots Normal-priority requests may use: all but the player's, when
    /// there are two or more.
    pub(crate) fn normal_slots(&self) -> usize {
        if self.slots > 1 {
            self.slots() - 1
        } else {
            self.slots()
        }
    }

    /// The same slots in half as many lanes, when a load's contexts do not
    /// all fit; `None` with one lane.
    pub(crate) fn halved(&self) -> Option<Self> {
        (self.lanes > 1).then(|| Self::with_slots(self.slots, self.lanes / 2))
    }

    /// KV cells of all the contexts for `per_seq` cells a sequence (the
    /// lanes hold whole shares: a lane's last sequences may stay unused).
    pub(crate) fn kv_cells(&self, per_seq: u32) -> u64 {
        u64::from(self.lanes) * u64::from(self.per_lane()) * u64::from(per_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_lanes_and_sequence_ids() {
        // (sequences, lanes) → (slots, lanes, per lane, normal slots)
        let table = [
            ((1, 1), (2, 1, 2, 1)),
            ((8, 1), (9, 1, 9, 8)),
            ((8, 2), (9, 2, 5, 8)),
            ((32, 4), (33, 4, 9, 32)),
            ((255, 4), (256, 4, 64, 255)),
            ((300, 4), (256, 4, 64, 255)),
            ((0, 1), (1, 1, 1, 1)),
            ((1, 8), (2, 2, 1, 1)),
            ((3, 0), (4, 1, 4, 3)),
        ];
        for ((sequences, lanes), want) in table {
            let l = Layout::for_sequences(sequences, lanes);
            assert_eq!(
                (
                    l.slots(),
                    l.lanes(),
                    l.per_lane() as usize,
                    l.normal_slots()
                ),
                want,
                "{sequences} sequences in {lanes} lanes"
            );
        }
    }

    #[test]
    fn every_slot_has_one_place_and_back() {
        for slots in 1..=40 {
            for lanes in 1..=8 {
                let l = Layout::with_slots(slots, lanes);
                let mut seen = std::collections::HashSet::new();
                for slot in 0..l.slots() {
                    let (lane, seq) = l.locate(slot);
                    assert!(lane < l.lanes() && seq < l.per_lane() as usize);
                    assert_eq!(l.lane_of(slot), lane);
                    assert_eq!(l.slot_at(lane, seq), slot);
                    assert!(seen.insert((lane, seq)), "two slots at {lane}/{seq}");
                }
                assert!(l.kv_cells(10) >= 10 * slots as u64);
            }
        }
    }

    #[test]
    fn halving_keeps_the_slots() {
        let l = Layout::for_sequences(64, 8);
        let h = l.halved().unwrap();
        assert_eq!((h.slots(), h.lanes()), (65, 4));
        assert_eq!(h.halved().unwrap().halved().unwrap().lanes(), 1);
        assert_eq!(Layout::for_sequences(64, 1).halved(), None);
    }

    #[test]
    fn the_gpu_lane_rule() {
        let table = [
            (1, 2),
            (8, 2),
            (16, 2),
            (17, 3),
            (32, 4),
            (64, 8),
            (65, 4),
            (255, 4),
        ];
        for (sequences, lanes) in table {
            assert_eq!(Layout::gpu_lanes(sequences), lanes, "{sequences}");
        }
    }
}
