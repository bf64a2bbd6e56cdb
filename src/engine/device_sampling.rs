//! Top-k on the GPU: llama.cpp's backend sampling runs a `top_k(K)` chain on
//! the device for each sequence that has one attached, and hands back `K`
//! candidates (token ids and raw logits) per output instead of the whole
//! vocabulary row. The host then draws from those few with the request's
//! own [`Sampler`](super::sampler::Sampler) (repeat penalty, temperature,
//! top-p, min-p, seed), which [`Sampler::fits_top_k`](super::sampler::Sampler::fits_top_k)
//! proves gives the same draw as the whole row.
//!
//! Sequences that cannot use it (an output constraint needs the whole row
//! for its mask; `top_k` 0 or a large `top_k + repeat_last_n`) run without a
//! chain: llama.cpp then copies every output row of that step to the host,
//! as it does without backend sampling.
//!
//! llama.cpp's side is experimental ([`llama_set_sampler`] marks the graph
//! for a new reservation; a chain may be initialised once), so each attach
//! builds a fresh chain and a detached one is freed only after the next
//! decode, when no graph can refer to it any more.
//!
//! [`llama_set_sampler`]: llama_cpp_sys_2::llama_set_sampler

use std::ptr::NonNull;

use llama_cpp_2::context::LlamaContext;

/// Candidates the device keeps per output. Covers the default sampling
/// (`top_k` 40 + `repeat_last_n` 64) with room to spare.
pub(crate) const DEVICE_TOP_K: usize = 128;

/// One `top_k(K)` chain owned by us (llama.cpp only borrows it).
struct Chain(NonNull<llama_cpp_sys_2::llama_sampler>);

// SAFETY: a sampler chain is plain data owned by one thread at a time (the
// worker), like the context that borrows it.
unsafe impl Send for Chain {}

impl Chain {
    fn top_k(k: usize) -> Option<Self> {
        // SAFETY: plain constructors; the chain takes ownership of the top-k.
        unsafe {
            let chain = llama_cpp_sys_2::llama_sampler_chain_init(
                llama_cpp_sys_2::llama_sampler_chain_default_params(),
            );
            let chain = NonNull::new(chain)?;
            let top_k = llama_cpp_sys_2::llama_sampler_init_top_k(k as i32);
            if top_k.is_null() {
                llama_cpp_sys_2::llama_sampler_free(chain.as_ptr());
                return None;
            }
            llama_cpp_sys_2::llama_sampler_chain_add(chain.as_ptr(), top_k);
            Some(Self(chain))
        }
    }
}

impl Drop for Chain {
    fn drop(&mut self) {
        // SAFETY: ours, and no context refers to it any more (see `retired`).
        unsafe { llama_cpp_sys_2::llama_sampler_free(self.0.as_ptr()) }
    }
}

/// Which sequences of one context sample on the device.
pub(crate) struct DeviceSampling {
    k: usize,
    /// Per slot (llama.cpp sequence id): the attached chain.
    attached: Vec<Option<Chain>>,
    /// Detached chains, freed after the next decode.
    retired: Vec<Chain>,
    /// Attach/detach calls so far (each costs llama.cpp a graph reservation).
    pub switches: u64,
}

impl DeviceSampling {
    pub(crate) fn new(slots: usize, k: usize) -> Self {
        Self {
            k,
            attached: (0..slots).map(|_| None).collect(),
            retired: Vec::new(),
            switches: 0,
        }
    }

    /// Candidates per output.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Whether `slot` samples on the device.
    pub(crate) fn is_attached(&self, slot: usize) -> bool {
        self.attached.get(slot).is_some_and(Option::is_some)
    }

    /// Give `slot` a device top-k (`on`) or take it away; `false` when
    /// llama.cpp refused (the slot then samples on the host).
    pub(crate) fn set(&mut self, ctx: &mut LlamaContext<'_>, slot: usize, on: bool) -> bool {
        if slot >= self.attached.len() || self.is_attached(slot) == on {
            return self.is_attached(slot) == on;
        }
        self.switches += 1;
        let ptr = ctx.as_raw_ptr();
        if on {
            let Some(chain) = Chain::top_k(self.k) else {
                return false;
            };
            // SAFETY: a live context and chain; the chain outlives its use
            // (kept in `attached`, then `retired` until after a decode).
            let ok =
                unsafe { llama_cpp_sys_2::llama_set_sampler(ptr, slot as i32, chain.0.as_ptr()) };
            if ok {
                self.attached[slot] = Some(chain);
            } else {
                // llama.cpp did not keep it (it erased any entry for the slot).
                self.retired.push(chain);
            }
            ok
        } else {
            // SAFETY: a live context; a null sampler detaches.
            unsafe { llama_cpp_sys_2::llama_set_sampler(ptr, slot as i32, std::ptr::null_mut()) };
            if let Some(chain) = self.attached[slot].take() {
                self.retired.push(chain);
            }
            true
        }
    }

    /// After a decode: the graph no longer refers to detached chains.
    pub(crate) fn decoded(&mut self) {
        self.retired.clear();
    }

    /// The device's candidates for batch position `i` of the last decode
    /// (token ids and raw logits), `None` when that output had no chain.
    /// Waits for the device.
    pub(crate) fn candidates<'c>(
        ctx: &'c LlamaContext<'_>,
        i: i32,
    ) -> Option<(&'c [i32], &'c [f32])> {
        let ptr = ctx.as_raw_ptr();
        // SAFETY: a live context after a successful decode; llama.cpp keeps
        // these host buffers until the next decode, which needs `&mut ctx`
        // (so it cannot happen while the returned borrow of `ctx` lives).
        unsafe {
            let n = llama_cpp_sys_2::llama_get_sampled_logits_count_ith(ptr, i) as usize;
            let logits = llama_cpp_sys_2::llama_get_sampled_logits_ith(ptr, i);
            let nc = llama_cpp_sys_2::llama_get_sampled_candidates_count_ith(ptr, i) as usize;
            let ids = llama_cpp_sys_2::llama_get_sampled_candidates_ith(ptr, i);
            if n == 0 || logits.is_null() || ids.is_null() || nc != n {
                return None;
            }
            Some((
                std::slice::from_raw_parts(ids.cast_const(), n),
                std::slice::from_raw_parts(logits.cast_const(), n),
            ))
        }
    }
}
