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
}

/// One step's outputs on the host, by output ordinal (the order of the
/// batch's tokens that asked for logits), found with one wait for the
/// device instead of one per sequence (each of llama.cpp's per-row getters
/// synchronises the device and re-checks the output order: ~1–4 µs each,
/// milliseconds a step at 128+ NPCs).
pub(crate) struct StepRows<'c> {
    n_vocab: usize,
    /// Raw logits rows (`llama_get_logits`: rows in batch order, by contract).
    raw: *const f32,
    /// Device top-k rows: token ids and logits bases, and the count per row
    /// (llama.cpp keeps them at the same `n_vocab` stride as the logits; the
    /// layout is checked on the step's first and last device rows).
    top: Option<(*const i32, *const f32, usize)>,
    ctx: &'c LlamaContext<'c>,
}

impl<'c> StepRows<'c> {
    /// `device_rows`: (batch position, output ordinal) of the outputs whose
    /// sequences have a device top-k, in batch order.
    pub(crate) fn read(
        ctx: &'c LlamaContext<'c>,
        n_vocab: usize,
        device_rows: &[(i32, usize)],
    ) -> Self {
        let ptr = ctx.as_raw_ptr();
        // SAFETY: a live context after a successful decode; one wait, then
        // the rows are in batch order.
        let raw = unsafe { llama_cpp_sys_2::llama_get_logits(ptr) }.cast_const();
        let top = match (device_rows.first(), device_rows.last()) {
            (Some(&first), Some(&last)) => Self::device_bases(ctx, n_vocab, first, last),
            _ => None,
        };
        Self {
            n_vocab,
            raw,
            top,
            ctx,
        }
    }

    /// The bases of the device rows, when the first and last rows sit where
    /// the stride says (else `None`: [`Self::top`] asks per row).
    fn device_bases(
        ctx: &LlamaContext<'_>,
        n_vocab: usize,
        (p0, r0): (i32, usize),
        (p1, r1): (i32, usize),
    ) -> Option<(*const i32, *const f32, usize)> {
        let (ids0, log0, n) = sampled_row(ctx, p0)?;
        let (ids1, log1, n1) = sampled_row(ctx, p1)?;
        // Pointers only compared here.
        let ids_base = ids0.wrapping_sub(r0 * n_vocab);
        let log_base = log0.wrapping_sub(r0 * n_vocab);
        let fits = ids1 == ids_base.wrapping_add(r1 * n_vocab)
            && log1 == log_base.wrapping_add(r1 * n_vocab)
            && n1 == n;
        fits.then_some((ids_base, log_base, n))
    }

    /// Whether the device rows were found at the logits' stride (one wait
    /// per step); `false` with device rows means one wait per row.
    pub(crate) fn strided(&self) -> bool {
        self.top.is_some()
    }

    /// The whole logits row of output `ordinal` (its sequence had no device top-k).
    pub(crate) fn full(&self, ordinal: usize) -> Option<&'c [f32]> {
        if self.raw.is_null() {
            return None;
        }
        // SAFETY: llama.cpp holds one row of n_vocab floats per output of the
        // last decode, contiguous in batch order, until the next decode
        // (which needs `&mut` of the context borrowed here).
        Some(unsafe {
            std::slice::from_raw_parts(self.raw.add(ordinal * self.n_vocab), self.n_vocab)
        })
    }

    /// The device's candidates (token ids, raw logits) of the output at batch
    /// position `pos`, output `ordinal`; `None` when it had no device top-k.
    pub(crate) fn top(&self, pos: i32, ordinal: usize) -> Option<(&'c [i32], &'c [f32])> {
        if let Some((ids, logits, n)) = self.top {
            // SAFETY: checked layout (see `device_bases`); buffers live until
            // the next decode, as above.
            return Some(unsafe {
                (
                    std::slice::from_raw_parts(ids.add(ordinal * self.n_vocab), n),
                    std::slice::from_raw_parts(logits.add(ordinal * self.n_vocab), n),
                )
            });
        }
        let (ids, logits, n) = sampled_row(self.ctx, pos)?;
        // SAFETY: as in `full`; llama.cpp's own row pointers and count.
        Some(unsafe {
            (
                std::slice::from_raw_parts(ids, n),
                std::slice::from_raw_parts(logits, n),
            )
        })
    }
}

/// llama.cpp's device top-k of the output at batch position `pos`: token
/// ids, logits and their count (`None` when that output had no chain).
/// Each of these getters waits for the device.
fn sampled_row(ctx: &LlamaContext<'_>, pos: i32) -> Option<(*const i32, *const f32, usize)> {
    let ptr = ctx.as_raw_ptr();
    // SAFETY: a live context after a successful decode.
    let (n, ids, logits) = unsafe {
        (
            llama_cpp_sys_2::llama_get_sampled_logits_count_ith(ptr, pos) as usize,
            llama_cpp_sys_2::llama_get_sampled_candidates_ith(ptr, pos).cast_const(),
            llama_cpp_sys_2::llama_get_sampled_logits_ith(ptr, pos).cast_const(),
        )
    };
    (n > 0 && !ids.is_null() && !logits.is_null()).then_some((ids, logits, n))
}
