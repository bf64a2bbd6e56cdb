//! The server's side of KV snapshots: an idle NPC's sequence state taken
//! from its lane's context, or a checked snapshot put into a slot as that
//! key's cached prefix (its next request reuses it like any cache).

use llama_cpp_2::context::session::LlamaStateSeqFlags;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;

use super::Server;
use crate::engine::kv_snapshot::{KvIdentity, KvSnapshotError, LLAMA_BUILD, NpcKvSnapshot};
use crate::engine::model_meta::{KvShape, sliding_window};
use crate::engine::protocol::LoadSpec;

/// What this engine's snapshots are taken from and restored into.
pub(super) fn identity(model: &LlamaModel, spec: &LoadSpec) -> KvIdentity {
    KvIdentity {
        model: spec.model_id.clone(),
        model_sha256: spec
            .verify
            .as_ref()
            .map(|v| v.0.clone())
            .unwrap_or_default(),
        model_bytes: model.size(),
        llama_build: LLAMA_BUILD.into(),
        // llama.cpp's default; the engine does not change it.
        kv_type: "f16".into(),
        bytes_per_cell: KvShape::of(model).bytes_per_cell(),
        sliding_window: sliding_window(model) as u32,
        kv_unified: spec.engine.kv_unified,
        swa_full: spec.engine.swa_full,
        flash_attention: spec.engine.flash_attention,
    }
}

impl Server<'_> {
    /// `key`'s cached KV as a snapshot (its lane's device work waited for).
    pub(crate) fn save_kv(&mut self, key: u64) -> Result<NpcKvSnapshot, KvSnapshotError> {
        let (slot, tokens) = match self.sched.cached(key) {
            Ok((slot, tokens)) => (slot, tokens.iter().map(|t| t.0).collect::<Vec<i32>>()),
            Err(true) => return Err(KvSnapshotError::Busy),
            Err(false) => return Err(KvSnapshotError::NotCached),
        };
        let (lane, seq) = self.locate(slot);
        let ctx = &mut self.lanes[lane].ctx;
        ctx.synchronize();
        let flags = LlamaStateSeqFlags::default();
        let size = ctx.state_seq_get_size_ext(seq as i32, flags);
        let mut blob = vec![0u8; size];
        // SAFETY: `blob` has the size llama.cpp asked for this sequence.
        let written = unsafe { ctx.state_seq_get_data_ext(blob.as_mut_ptr(), seq as i32, flags) };
        if written != size {
            return Err(KvSnapshotError::Rejected(format!(
                "llama.cpp wrote {written} bytes of a {size}-byte state"
            )));
        }
        Ok(NpcKvSnapshot::new(
            self.kv_identity.clone(),
            tokens,
            blob,
            self.pool.as_ref(),
        ))
    }

    /// `snapshot` checked, then put into a slot as `key`'s cached prefix.
    /// On any failure the slot is forgotten (its KV cleared): the key's
    /// next request reads its prompt again.
    pub(crate) fn restore_kv(
        &mut self,
        key: u64,
        snapshot: &NpcKvSnapshot,
    ) -> Result<(), KvSnapshotError> {
        snapshot.check(&self.kv_identity, self.per_seq as u32, self.pool.as_ref())?;
        let tokens: Vec<LlamaToken> = snapshot.tokens.iter().map(|&t| LlamaToken(t)).collect();
        let Some(slot) = self.sched.place_restored(key, tokens) else {
            return Err(if self.knobs.prefix_cache {
                KvSnapshotError::NoIdleSlot
            } else {
                KvSnapshotError::Unavailable("the prefix cache is off".into())
            });
        };
        let (lane, seq) = self.locate(slot);
        let cleared = self.clear_slot(slot, None);
        let ctx = &mut self.lanes[lane].ctx;
        // SAFETY: the blob passed every check above: this crate's format,
        // this model, llama.cpp build and KV layout, its checksum, and a
        // length that fits a sequence.
        let read = cleared
            && unsafe {
                ctx.state_seq_set_data_ext(
                    &snapshot.blob,
                    seq as i32,
                    LlamaStateSeqFlags::default(),
                )
            };
        if !read {
            self.clear_slot(slot, None);
            self.sched.forget_slot(slot);
            return Err(KvSnapshotError::Rejected(
                "llama.cpp could not read the state into the sequence".into(),
            ));
        }
        Ok(())
    }
}
