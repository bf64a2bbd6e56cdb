//! Scheduling state that needs no model: the waiting queue (priority, then
//! FIFO, bounded) and the sequence slots with their per-key prefix cache
//! (longest common prefix reuse, least-recently-used eviction).

use super::layout::Layout;

/// One sequence slot of the llama.cpp context (one sequence id).
#[derive(Debug, Clone)]
pub(crate) struct Slot<T> {
    /// Cache key of the last request served here (normally an NPC).
    pub key: Option<u64>,
    /// Tokens whose KV entries this slot's sequence holds, in order.
    pub tokens: Vec<T>,
    /// Serving a request now.
    pub busy: bool,
    /// Logical time of the last release, for LRU eviction.
    pub last_used: u64,
}

/// A slot given to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Acquired {
    /// The slot (= llama.cpp sequence id).
    pub slot: usize,
    /// Leading prompt tokens whose KV can be kept.
    pub reuse: usize,
    /// Another key's cached prefix was dropped to make room.
    pub evicted: bool,
}

/// The slot table.
#[derive(Debug)]
pub(crate) struct SlotTable<T> {
    slots: Vec<Slot<T>>,
    clock: u64,
    cache_enabled: bool,
    /// Where each slot lives (its lane), and how many busy slots a lane
    /// should hold before a new request goes to one more lane: see
    /// [`SlotTable::with_lane_fill`].
    layout: Layout,
    lane_fill: usize,
    /// Cached prefixes dropped to make room, since creation.
    pub evictions: u64,
}

fn common_prefix<T: PartialEq>(a: &[T], b: &[T]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl<T: PartialEq + Clone> SlotTable<T> {
    /// The slots of `layout`, each a prefix cache when `cache_enabled`.
    pub(crate) fn new(layout: Layout, cache_enabled: bool) -> Self {
        Self {
            slots: (0..layout.slots())
                .map(|_| Slot {
                    key: None,
                    tokens: Vec::new(),
                    busy: false,
                    last_used: 0,
                })
                .collect(),
            clock: 0,
            cache_enabled,
            layout,
            lane_fill: usize::MAX,
            evictions: 0,
        }
    }

    /// With several lanes, a request that takes a fresh slot goes to the
    /// least busy of the first `max(2, ⌈(busy + 1) / lane_fill⌉)` lanes (all
    /// of them at most), so few talking NPCs share two lanes and each
    /// further `lane_fill` opens one more, rather than each NPC decoding
    /// alone in a lane of its own. A request that finds its own cached
    /// prefix keeps that slot, wherever it is.
    pub(crate) fn with_lane_fill(mut self, lane_fill: usize) -> Self {
        self.lane_fill = lane_fill.max(1);
        self
    }

    /// How much a fresh slot suits a new request (higher is better), for
    /// the busy slots of now: a lane among those in use first, then the
    /// least busy lane. The lanes' loads are counted once, here.
    fn lane_preference(&self) -> impl Fn(usize) -> (bool, std::cmp::Reverse<usize>) + use<T> {
        let layout = self.layout;
        let lanes = layout.lanes();
        let mut busy_in = vec![0usize; lanes];
        for (j, s) in self.slots.iter().enumerate() {
            if s.busy {
                busy_in[layout.lane_of(j)] += 1;
            }
        }
        let busy: usize = busy_in.iter().sum();
        let open = (busy + 1).div_ceil(self.lane_fill).max(2).min(lanes);
        move |i| {
            let lane = layout.lane_of(i);
            (lane < open, std::cmp::Reverse(busy_in[lane]))
        }
    }

    pub(crate) fn set_cache_enabled(&mut self, enabled: bool) {
        self.cache_enabled = enabled;
    }

    /// Whether released slots keep their tokens as a cache.
    pub(crate) fn cache_enabled(&self) -> bool {
        self.cache_enabled
    }

    pub(crate) fn has_free(&self) -> bool {
        self.slots.iter().any(|s| !s.busy)
    }

    pub(crate) fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.busy).count()
    }

    /// Idle slots holding a keyed prefix.
    pub(crate) fn cached(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !s.busy && s.key.is_some() && !s.tokens.is_empty())
            .count()
    }

    /// Tokens held in KV over all slots.
    pub(crate) fn cells_used(&self) -> usize {
        self.slots.iter().map(|s| s.tokens.len()).sum()
    }

    /// Give a free slot to a request with `key` and `prompt`; `None` when
    /// every slot is busy. `keep(slot, lcp)` says how much of a common
    /// prefix of `lcp` tokens the slot's KV can really serve (a sliding-window
    /// cache may have dropped its start). The caller must drop the slot's KV
    /// from `reuse` onwards.
    pub(crate) fn acquire(
        &mut self,
        key: Option<u64>,
        prompt: &[T],
        keep: impl Fn(usize, usize) -> usize,
    ) -> Option<Acquired> {
        let max_reuse = prompt.len().saturating_sub(1);
        let free = |s: &Slot<T>| !s.busy;
        let preference = self.lane_preference();
        let mut pick: Option<(usize, usize, bool)> = None;
        if self.cache_enabled {
            // 1. This key's own slot.
            if let Some(k) = key
                && let Some(i) = self.slots.iter().position(|s| free(s) && s.key == Some(k))
            {
                pick = Some((i, common_prefix(&self.slots[i].tokens, prompt), false));
            }
            // 2. A slot no key owns, best prefix first (shared system prompts).
            if pick.is_none() {
                pick = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| free(s) && s.key.is_none())
                    .map(|(i, s)| (i, common_prefix(&s.tokens, prompt)))
                    .max_by_key(|&(i, lcp)| (lcp, preference(i), std::cmp::Reverse(i)))
                    .map(|(i, lcp)| (i, lcp, false));
            }
        } else {
            pick = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| free(s) && s.key.is_none())
                .max_by_key(|&(i, _)| (preference(i), std::cmp::Reverse(i)))
                .map(|(i, _)| (i, 0, false));
        }
        // 3. Evict the least recently used keyed slot.
        if pick.is_none() {
            pick = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| free(s))
                .min_by_key(|(_, s)| s.last_used)
                .map(|(i, s)| (i, 0, !s.tokens.is_empty()));
        }
        let (slot, lcp, evicted) = pick?;
        if evicted {
            self.evictions += 1;
        }
        // The window check is on the prefix really kept (the last prompt
        // token is always decoded again), not on the common prefix.
        let reuse = if self.cache_enabled {
            let candidate = lcp.min(max_reuse);
            keep(slot, candidate).min(candidate)
        } else {
            0
        };
        let s = &mut self.slots[slot];
        s.busy = true;
        s.key = if self.cache_enabled { key } else { None };
        s.tokens.truncate(reuse);
        Some(Acquired {
            slot,
            reuse,
            evicted,
        })
    }

    /// The request on `slot` ended; `kv_tokens` are the tokens its sequence
    /// now holds in KV (kept as the key's cache when caching is on).
    pub(crate) fn release(&mut self, slot: usize, kv_tokens: Vec<T>) {
        self.clock += 1;
        let cache = self.cache_enabled;
        let s = &mut self.slots[slot];
        s.busy = false;
        s.last_used = self.clock;
        if cache {
            s.tokens = kv_tokens;
        } else {
            s.tokens.clear();
            s.key = None;
        }
    }

    /// The slot's KV is unknown (after a failed decode): forget it.
    pub(crate) fn invalidate(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        s.busy = false;
        s.key = None;
        s.tokens.clear();
    }

    /// Forget every cached prefix; returns the slots whose KV the caller
    /// must clear.
    pub(crate) fn clear_idle(&mut self) -> Vec<usize> {
        let mut cleared = Vec::new();
        for (i, s) in self.slots.iter_mut().enumerate().filter(|(_, s)| !s.busy) {
            if !s.tokens.is_empty() {
                cleared.push(i);
            }
            s.key = None;
            s.tokens.clear();
        }
        cleared
    }

    /// Idle slots holding cached tokens.
    pub(crate) fn idle_cached_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| !self.slots[i].busy && !self.slots[i].tokens.is_empty())
            .collect()
    }

    /// Drop the least recently used idle cache (the caller clears its KV).
    pub(crate) fn evict_lru_idle(&mut self) -> Option<usize> {
        let slot = self
            .idle_cached_slots()
            .into_iter()
            .min_by_key(|&i| self.slots[i].last_used)?;
        let s = &mut self.slots[slot];
        s.key = None;
        s.tokens.clear();
        self.evictions += 1;
        Some(slot)
    }

    /// The idle slot holding `key`'s cached prefix: `Ok(slot)`; `Err(true)`
    /// when the key's slot is busy generating, `Err(false)` when no slot
    /// holds it.
    pub(crate) fn cached_slot(&self, key: u64) -> Result<usize, bool> {
        match self
            .slots
            .iter()
            .position(|s| s.key == Some(key) && !s.tokens.is_empty())
        {
            Some(i) if self.slots[i].busy => Err(true),
            Some(i) => Ok(i),
            None => Err(false),
        }
    }

    /// A slot for `key`'s restored prefix `tokens`: the key's own idle slot,
    /// else a free slot no key owns, else the least recently used idle one
    /// (its cache dropped); `None` when every slot is busy. The slot is
    /// recorded as holding `tokens` for `key`, most recently used; the
    /// caller replaces its KV (and calls [`Self::invalidate`] if that fails).
    pub(crate) fn place(&mut self, key: u64, tokens: Vec<T>) -> Option<usize> {
        let free = |s: &Slot<T>| !s.busy;
        let slot = self
            .slots
            .iter()
            .position(|s| free(s) && s.key == Some(key))
            .or_else(|| {
                self.slots
                    .iter()
                    .position(|s| free(s) && s.key.is_none() && s.tokens.is_empty())
            })
            .or_else(|| {
                let lru = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| free(s))
                    .min_by_key(|(_, s)| s.last_used)
                    .map(|(i, _)| i)?;
                if !self.slots[lru].tokens.is_empty() {
                    self.evictions += 1;
                }
                Some(lru)
            })?;
        // Another slot may hold an older prefix of the same key: forget it
        // there (its KV stays until reused), so the key has one place.
        for (i, s) in self.slots.iter_mut().enumerate() {
            if i != slot && !s.busy && s.key == Some(key) {
                s.key = None;
            }
        }
        self.clock += 1;
        let s = &mut self.slots[slot];
        s.key = Some(key);
        s.tokens = tokens;
        s.last_used = self.clock;
        Some(slot)
    }

    /// Tokens the slot's KV holds, as recorded.
    pub(crate) fn tokens(&self, slot: usize) -> &[T] {
        &self.slots[slot].tokens
    }

    /// Whether `slot` serves a request now.
    #[cfg(test)]
    pub(crate) fn is_busy(&self, slot: usize) -> bool {
        self.slots[slot].busy
    }
}

/// Waiting requests: higher priority first, FIFO within a priority, bounded.
#[derive(Debug)]
pub(crate) struct JobQueue<J> {
    items: Vec<(i32, u64, J)>,
    next: u64,
    capacity: usize,
}

impl<J> JobQueue<J> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            items: Vec::new(),
            next: 0,
            capacity,
        }
    }

    pub(crate) fn set_capacity(&mut self, capacity: usize) {
        self.capacity = capacity;
    }

    /// The most jobs that may wait.
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Add a job; gives it back when the queue is full.
    pub(crate) fn push(&mut self, priority: i32, job: J) -> Result<(), J> {
        if self.items.len() >= self.capacity {
            return Err(job);
        }
        self.items.push((priority, self.next, job));
        self.next += 1;
        Ok(())
    }

    /// Put back a job that had left the queue, ahead of every job of its
    /// priority (capacity not checked: it was counted when it came).
    pub(crate) fn push_front(&mut self, priority: i32, job: J) {
        let seq = self
            .items
            .iter()
            .map(|(_, s, _)| *s)
            .min()
            .map_or(self.next, |m| m.saturating_sub(1));
        self.items.push((priority, seq, job));
    }

    /// Highest priority waiting, without removing it.
    pub(crate) fn peek_priority(&self) -> Option<i32> {
        self.items.iter().map(|(p, _, _)| *p).max()
    }

    pub(crate) fn pop(&mut self) -> Option<J> {
        let idx = self
            .items
            .iter()
            .enumerate()
            .max_by_key(|(_, (p, seq, _))| (*p, std::cmp::Reverse(*seq)))
            .map(|(i, _)| i)?;
        Some(self.items.remove(idx).2)
    }

    /// Remove the first job matching `pred`.
    pub(crate) fn remove_where(&mut self, mut pred: impl FnMut(&J) -> bool) -> Option<J> {
        let idx = self.items.iter().position(|(_, _, j)| pred(j))?;
        Some(self.items.remove(idx).2)
    }

    pub(crate) fn drain(&mut self) -> impl Iterator<Item = J> + '_ {
        self.items.drain(..).map(|(_, _, j)| j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_reuses_longest_common_prefix() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(2, 1), true);
        let a = t.acquire(Some(7), &[1, 2, 3], |_, l| l).unwrap();
        assert_eq!(a.reuse, 0);
        t.release(a.slot, vec![1, 2, 3, 9]);
        let b = t.acquire(Some(7), &[1, 2, 3, 9, 4, 5], |_, l| l).unwrap();
        assert_eq!((b.slot, b.reuse), (a.slot, 4));
        t.release(b.slot, vec![1, 2, 3, 9, 4, 5]);
        // Diverging history keeps only the shared part.
        let c = t.acquire(Some(7), &[1, 2, 8], |_, l| l).unwrap();
        assert_eq!(c.reuse, 2);
    }

    #[test]
    fn whole_prompt_cached_still_decodes_last_token() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(1, 1), true);
        let a = t.acquire(Some(1), &[1, 2, 3], |_, l| l).unwrap();
        t.release(a.slot, vec![1, 2, 3]);
        assert_eq!(t.acquire(Some(1), &[1, 2, 3], |_, l| l).unwrap().reuse, 2);
    }

    #[test]
    fn lru_keyed_slot_is_evicted_when_full() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(2, 1), true);
        let a = t.acquire(Some(1), &[1], |_, l| l).unwrap();
        let b = t.acquire(Some(2), &[2], |_, l| l).unwrap();
        t.release(a.slot, vec![1]);
        t.release(b.slot, vec![2]);
        assert!(!t.has_free() || t.cached() == 2);
        let c = t.acquire(Some(3), &[3], |_, l| l).unwrap();
        assert!(c.evicted);
        assert_eq!(c.slot, a.slot, "key 1 was used least recently");
        assert_eq!(t.evictions, 1);
        // Key 2 still finds its prefix.
        let d = t.acquire(Some(2), &[2, 5], |_, l| l).unwrap();
        assert_eq!((d.slot, d.reuse), (b.slot, 1));
        assert!(
            t.acquire(Some(4), &[4], |_, l| l).is_none(),
            "all slots busy"
        );
    }

    #[test]
    fn a_restored_prefix_takes_a_free_slot_then_the_lru_one_and_serves_its_key() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(3, 1), true);
        let a = t.acquire(Some(1), &[1], |_, l| l).unwrap();
        t.release(a.slot, vec![1, 1]);
        assert_eq!(t.cached_slot(1), Ok(a.slot));
        assert_eq!(t.cached_slot(9), Err(false));
        // An empty slot first, the cached one kept.
        let p = t.place(9, vec![9, 9, 9]).unwrap();
        assert_ne!(p, a.slot);
        assert_eq!(t.cached_slot(9), Ok(p));
        assert_eq!(t.evictions, 0);
        // Placing the same key again reuses its slot.
        assert_eq!(t.place(9, vec![9, 8]), Some(p));
        // The restored prefix serves its key's next request.
        let r = t.acquire(Some(9), &[9, 8, 7], |_, l| l).unwrap();
        assert_eq!((r.slot, r.reuse), (p, 2));
        assert_eq!(t.cached_slot(9), Err(true), "busy now");
        // Slot 3 free, then none: the least recently used idle cache goes.
        let q = t.place(5, vec![5]).unwrap();
        let lru = t.place(6, vec![6]).unwrap();
        assert_eq!(lru, a.slot, "key 1 was used least recently");
        assert_ne!(q, lru);
        assert_eq!(t.evictions, 1);
        assert_eq!(t.cached_slot(1), Err(false));
        // Every slot busy: nowhere to place.
        let _ = t.acquire(Some(5), &[5, 1], |_, l| l).unwrap();
        let _ = t.acquire(Some(6), &[6, 1], |_, l| l).unwrap();
        assert_eq!(t.place(7, vec![7]), None);
    }

    #[test]
    fn cache_disabled_never_reuses() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(1, 1), false);
        let a = t.acquire(Some(1), &[1, 2, 3], |_, l| l).unwrap();
        t.release(a.slot, vec![1, 2, 3]);
        assert_eq!(
            t.acquire(Some(1), &[1, 2, 3, 4], |_, l| l).unwrap().reuse,
            0
        );
    }

    /// Busy slots per lane.
    fn lane_loads(t: &SlotTable<u32>, lanes: usize) -> Vec<usize> {
        let mut loads = vec![0; lanes];
        for i in (0..t.slots.len()).filter(|&i| t.is_busy(i)) {
            loads[i % lanes] += 1;
        }
        loads
    }

    /// 64 NPCs arriving one by one in a context of 65 slots in eight lanes
    /// (the GPU plan's largest): the first sixteen share two lanes, then
    /// each eight open one more lane; no lane holds more than eight.
    #[test]
    fn fresh_slots_fill_two_lanes_then_one_more_per_eight() {
        for cache in [true, false] {
            let mut t = SlotTable::<u32>::new(Layout::with_slots(65, 8), cache).with_lane_fill(8);
            for k in 1..=64usize {
                let key = k as u64;
                let a = t.acquire(Some(key), &[key as u32, 1, 2], |_, l| l).unwrap();
                assert_eq!(a.reuse, 0);
                let loads = lane_loads(&t, 8);
                let used = loads.iter().filter(|&&n| n > 0).count();
                let want = if k == 1 { 1 } else { k.div_ceil(8).max(2) };
                assert_eq!(used, want, "{k} NPCs: {loads:?} (cache {cache})");
                assert!(loads.iter().all(|&n| n <= 8), "{k} NPCs: {loads:?}");
                if k == 8 {
                    assert_eq!(loads[..2], [4, 4], "{loads:?}");
                }
            }
        }
    }

    /// After some NPCs finish, a new one goes to the emptier of the lanes in
    /// use, not to a lane of its own; an NPC with a cached prefix keeps its
    /// slot wherever it is.
    #[test]
    fn a_new_npc_joins_the_emptier_lane_in_use() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(17, 4), true).with_lane_fill(8);
        let got: Vec<usize> = (0..6u64)
            .map(|k| t.acquire(Some(k), &[k as u32, 9], |_, l| l).unwrap().slot)
            .collect();
        assert_eq!(lane_loads(&t, 4), vec![3, 3, 0, 0]);
        // Two of lane 1's NPCs finish.
        let lane1: Vec<usize> = got.iter().copied().filter(|s| s % 4 == 1).collect();
        t.release(lane1[0], vec![1, 9]);
        t.release(lane1[1], vec![3, 9]);
        let a = t.acquire(Some(100), &[100, 9], |_, l| l).unwrap();
        assert_eq!(
            a.slot % 4,
            1,
            "the emptier lane in use: {:?}",
            lane_loads(&t, 4)
        );
        // A returning NPC finds its own slot (and prefix).
        let back = t.acquire(Some(3), &[3, 9, 4], |_, l| l).unwrap();
        assert_eq!((back.slot, back.reuse), (lane1[1], 2));
    }

    /// One lane (the CPU), or lanes without a fill: the lowest free slot,
    /// as before lanes.
    #[test]
    fn one_lane_takes_the_lowest_free_slot() {
        let mut t = SlotTable::<u32>::new(Layout::with_slots(4, 1), false);
        let a = t.acquire(None, &[1], |_, l| l).unwrap();
        let b = t.acquire(None, &[1], |_, l| l).unwrap();
        assert_eq!((a.slot, b.slot), (0, 1));
        t.release(0, vec![]);
        assert_eq!(t.acquire(None, &[1], |_, l| l).unwrap().slot, 0);
    }

    proptest::proptest! {
        /// Any interleaving of arrivals (a few returning keys) and
        /// departures, any lane count: a request gets a slot exactly when
        /// one is free, and never a busy one.
        #[test]
        fn lanes_never_refuse_a_free_slot(
            lanes in 1usize..=8,
            slots in 1usize..20,
            cache in proptest::bool::ANY,
            ops in proptest::collection::vec((proptest::bool::ANY, 0u64..6, 0usize..20), 0..200),
        ) {
            let mut t = SlotTable::<u32>::new(Layout::with_slots(slots as u32, lanes as u32), cache).with_lane_fill(3);
            for (arrive, key, pick) in ops {
                if arrive {
                    let free_before = t.has_free();
                    let busy_before: Vec<bool> = (0..slots).map(|i| t.is_busy(i)).collect();
                    let got = t.acquire(Some(key), &[key as u32, 7], |_, l| l);
                    proptest::prop_assert_eq!(got.is_some(), free_before);
                    if let Some(a) = got {
                        proptest::prop_assert!(!busy_before[a.slot]);
                        proptest::prop_assert!(t.is_busy(a.slot));
                    }
                } else {
                    let busy: Vec<usize> = (0..slots).filter(|&i| t.is_busy(i)).collect();
                    if !busy.is_empty() {
                        let s = busy[pick % busy.len()];
                        t.release(s, vec![s as u32, 7]);
                    }
                }
            }
        }
    }

    #[test]
    fn queue_is_priority_then_fifo_and_bounded() {
        let mut q = JobQueue::new(3);
        q.push(0, "a").unwrap();
        q.push(5, "b").unwrap();
        q.push(0, "c").unwrap();
        assert_eq!(q.push(9, "d"), Err("d"));
        assert_eq!(q.peek_priority(), Some(5));
        assert_eq!(q.pop(), Some("b"));
        assert_eq!(q.pop(), Some("a"));
        assert_eq!(q.remove_where(|j| *j == "c"), Some("c"));
        assert!(q.is_empty());
    }
}
