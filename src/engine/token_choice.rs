//! Token choice: each sampled sequence's next token from the scores its
//! step left — a whole logits row, or the device's top-k candidates — with
//! its own sampler, a constrained sequence among the tokens its grammar
//! allows (and its grammar advanced). Many rows are chosen in parallel on
//! the worker's small sampling pool.

use llama_cpp_2::token::LlamaToken;

use super::delivery::Active;
use super::sampler::Sampler;

/// One sequence's scores for this step, as the device left them.
#[derive(Clone, Copy)]
pub(crate) enum Row<'c> {
    /// The whole vocabulary's logits.
    Full(&'c [f32]),
    /// The device's top-k: token ids and their logits.
    Top(&'c [i32], &'c [f32]),
}

/// Whole rows (host sampling) in one step from which choosing them in
/// parallel pays for the hand-off to the pool.
const PARALLEL_ROWS: usize = 4;

/// Whole rows in one step from which the worker thread takes a share of
/// them itself while the pool takes the rest ([`super::row_pool`]); below
/// it the pool takes them all (`install` + `par_iter`). Measured on the
/// H100 machine, alternating in one sitting: 16 rows a lane step (32 NPCs,
/// two lanes) 0.20 vs 0.38 ms of token choice, +6–9 % generation rate; 4
/// rows (8 NPCs) 0.21–0.25 vs 0.15 ms, −10 %.
const SHARED_ROWS: usize = 16;

/// Choose every sequence's token from its row (into its `picked`): on the
/// pool when `full_rows` of them read whole rows and there are enough of
/// them to pay for it, else on this thread.
pub(crate) fn choose_all(
    pool: Option<&rayon::ThreadPool>,
    work: &mut [(&mut Active, Row<'_>)],
    full_rows: usize,
) {
    match pool {
        Some(pool) if full_rows >= SHARED_ROWS => {
            super::row_pool::for_each_shared(pool, work, |(a, row)| {
                a.picked = Some(pick(a, *row));
            });
        }
        Some(pool) if full_rows >= PARALLEL_ROWS => {
            use rayon::prelude::*;
            pool.install(|| {
                work.par_iter_mut()
                    .for_each(|(a, row)| a.picked = Some(pick(a, *row)));
            });
        }
        _ => {
            for (a, row) in work.iter_mut() {
                a.picked = Some(pick(a, *row));
            }
        }
    }
}

/// Choose a sequence's next token from its row.
fn pick(a: &mut Active, row: Row<'_>) -> Result<LlamaToken, String> {
    match (a.matcher.as_mut(), row) {
        (None, Row::Full(logits)) => Ok(LlamaToken(a.sampler.sample(logits))),
        (None, Row::Top(ids, logits)) => Ok(LlamaToken(a.sampler.sample_candidates(ids, logits))),
        (Some(m), Row::Full(logits)) => constrained_sample(m, &mut a.sampler, logits),
        (Some(_), Row::Top(..)) => {
            Err("internal: a constrained sequence got device candidates".to_string())
        }
    }
}

/// Sample one token among those the constraint allows, and advance it.
fn constrained_sample(
    m: &mut llguidance::Matcher,
    sampler: &mut Sampler,
    logits: &[f32],
) -> Result<LlamaToken, String> {
    let mask = m.compute_mask_or_eos().map_err(|e| e.to_string())?;
    let tok = sampler
        .sample_allowed(logits, |t| mask.is_allowed(t))
        .ok_or_else(|| "the constraint allows no token here".to_string())?;
    if !m.is_stopped() {
        m.consume_token(tok as u32).map_err(|e| e.to_string())?;
    }
    Ok(LlamaToken(tok))
}
