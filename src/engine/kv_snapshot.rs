//! An NPC's KV cache as bytes a game can keep in its save: llama.cpp's
//! per-sequence state behind a header that is checked before anything
//! reaches llama.cpp (a bad blob handed to its restore can abort the
//! process). Pure: the worker fills [`KvIdentity`] from its model and
//! contexts; everything here is tested without a model.

use std::sync::Arc;

use bevy::reflect::Reflect;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The snapshot format this crate writes and reads.
pub const KV_SNAPSHOT_FORMAT: u32 = 1;

/// The llama.cpp bindings whose state format the blobs follow (the locked
/// `llama-cpp-sys-2`; a test checks it against Cargo.lock). A blob from
/// another build is refused rather than handed to llama.cpp.
pub(crate) const LLAMA_BUILD: &str = "llama-cpp-sys-2 0.1.161";

/// The first bytes of a snapshot file.
const MAGIC: &[u8; 8] = b"NPCKV\x00\x01\n";

/// What a snapshot was taken from; a restore requires the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reflect)]
pub struct KvIdentity {
    /// Registry id of the model.
    pub model: String,
    /// The model file's sha256 (empty when the load did not verify it).
    pub model_sha256: String,
    /// The model's weight bytes, as llama.cpp reports them.
    pub model_bytes: u64,
    /// The llama.cpp build.
    pub llama_build: String,
    /// KV cell type (K and V).
    pub kv_type: String,
    /// KV bytes a token (a cell) takes.
    pub bytes_per_cell: u64,
    /// The model's sliding window (0: none).
    pub sliding_window: u32,
    /// One KV buffer shared by all sequences.
    pub kv_unified: bool,
    /// A sliding-window model keeps its whole context (not only the window).
    pub swa_full: bool,
    /// Flash attention as asked (`None`: llama.cpp's choice); it changes how
    /// V is stored.
    pub flash_attention: Option<bool>,
}

/// A snapshot's header: where it comes from and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Reflect)]
pub struct KvHeader {
    /// [`KV_SNAPSHOT_FORMAT`] when written.
    pub format: u32,
    /// What it was taken from.
    pub identity: KvIdentity,
    /// Tokens whose KV the blob holds.
    pub token_count: u32,
    /// Checksum of the tokens.
    pub tokens_checksum: u64,
    /// Length of the blob.
    pub blob_len: u64,
    /// Checksum of the blob.
    pub blob_checksum: u64,
}

/// One NPC's KV cache: the prompt tokens it holds and llama.cpp's state of
/// their sequence. Take one with [`SaveNpcKv`](crate::events::SaveNpcKv),
/// give it back with [`RestoreNpcKv`](crate::events::RestoreNpcKv); keep it
/// with [`NpcKvSnapshot::to_bytes`].
#[derive(Clone, PartialEq, Eq, Reflect)]
pub struct NpcKvSnapshot {
    /// Where it comes from and what it holds.
    pub header: KvHeader,
    /// Shared, so that messages and archives carry it without copying
    /// megabytes.
    #[reflect(ignore)]
    pub(crate) tokens: Arc<[i32]>,
    #[reflect(ignore)]
    pub(crate) blob: Arc<[u8]>,
}

impl std::fmt::Debug for NpcKvSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NpcKvSnapshot")
            .field("header", &self.header)
            .field("tokens", &self.tokens.len())
            .field("blob", &self.blob.len())
            .finish()
    }
}

/// Why a KV snapshot was not taken, not read or not restored. The NPC loses
/// nothing: its next line reads its prompt again.
#[derive(Debug, Clone, PartialEq, Eq, Error, Reflect)]
pub enum KvSnapshotError {
    /// The key has no cached KV in the engine (never spoke, evicted, or
    /// the prefix cache is off).
    #[error("no cached KV for this key")]
    NotCached,
    /// The key's sequence is generating now; ask again when its line ends.
    #[error("the key's sequence is busy generating")]
    Busy,
    /// No model is loaded, or the backend keeps no KV (a remote server).
    #[error("no local model holds KV: {0}")]
    Unavailable(String),
    /// Not a snapshot, a newer format, or cut short.
    #[error("not a readable KV snapshot: {0}")]
    Format(String),
    /// Taken with another model, llama.cpp build or KV layout.
    #[error(
        "the snapshot is for another engine: {field} is `{found}`, this engine has `{expected}`"
    )]
    Mismatch {
        /// Which part of the identity differs.
        field: String,
        /// This engine's.
        expected: String,
        /// The snapshot's.
        found: String,
    },
    /// The tokens or the blob do not match their checksums (a damaged save).
    #[error("the snapshot is damaged: {0}")]
    Corrupt(String),
    /// More tokens than a sequence's context holds.
    #[error("the snapshot holds {tokens} tokens; a sequence holds {context}")]
    TooLong {
        /// Tokens in the snapshot.
        tokens: u32,
        /// Context per sequence.
        context: u32,
    },
    /// Every slot is busy generating: nowhere to put it now.
    #[error("every sequence is busy")]
    NoIdleSlot,
    /// llama.cpp refused the state.
    #[error("llama.cpp refused the state: {0}")]
    Rejected(String),
}

/// A 64-bit checksum of `bytes` (four independent lanes of 64-bit words,
/// multiply-rotate as xxHash's rounds, and the length): several GB/s, so a
/// save of thousands of NPCs is not slowed by it. It finds damage, not
/// forgery.
pub(crate) fn checksum64(bytes: &[u8]) -> u64 {
    const P1: u64 = 0x9E37_79B1_85EB_CA87;
    const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    let round = |acc: u64, w: u64| {
        acc.wrapping_add(w.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    };
    let mut acc = [
        P1 ^ 1,
        P2 ^ 2,
        P1.rotate_left(7) ^ 3,
        P2.rotate_left(11) ^ 4,
    ];
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (lane, w) in acc.iter_mut().zip(c.chunks_exact(8)) {
            *lane = round(*lane, u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    let mut h = acc
        .iter()
        .enumerate()
        .fold(bytes.len() as u64, |h, (i, &a)| {
            h ^ a.rotate_left(i as u32 * 13 + 1)
        });
    for (i, &b) in chunks.remainder().iter().enumerate() {
        h = round(h, u64::from(b) | ((i as u64) << 8));
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^ (h >> 29)
}

/// Bytes of a blob checksummed alone; the blob's checksum is that of its
/// pieces' checksums, so that the pieces can be checked in parallel.
const PIECE: usize = 1 << 20;

/// A state blob's checksum: [`checksum64`] of each [`PIECE`], then of
/// their checksums and the length; the pieces on `pool`'s threads when
/// there is one (GPU plans: a 23 MB blob in a fraction of a millisecond
/// instead of ~2.5).
pub(crate) fn blob_checksum(blob: &[u8], pool: Option<&rayon::ThreadPool>) -> u64 {
    let pieces: Vec<u64> = match pool {
        Some(pool) if blob.len() > PIECE => {
            use rayon::prelude::*;
            pool.install(|| blob.par_chunks(PIECE).map(checksum64).collect())
        }
        _ => blob.chunks(PIECE).map(checksum64).collect(),
    };
    let mut bytes: Vec<u8> = pieces.iter().flat_map(|h| h.to_le_bytes()).collect();
    bytes.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    checksum64(&bytes)
}

fn tokens_checksum(tokens: &[i32]) -> u64 {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    checksum64(&bytes)
}

impl NpcKvSnapshot {
    /// A snapshot of `tokens` and their state `blob`, taken from `identity`
    /// (the blob's checksum on `pool`, when given).
    pub(crate) fn new(
        identity: KvIdentity,
        tokens: Vec<i32>,
        blob: Vec<u8>,
        pool: Option<&rayon::ThreadPool>,
    ) -> Self {
        Self {
            header: KvHeader {
                format: KV_SNAPSHOT_FORMAT,
                identity,
                token_count: tokens.len() as u32,
                tokens_checksum: tokens_checksum(&tokens),
                blob_len: blob.len() as u64,
                blob_checksum: blob_checksum(&blob, pool),
            },
            tokens: tokens.into(),
            blob: blob.into(),
        }
    }

    /// Tokens whose KV it holds.
    #[must_use]
    pub fn token_count(&self) -> usize {
        self.tokens.len()
    }

    /// Bytes of llama.cpp state it carries.
    #[must_use]
    pub fn blob_len(&self) -> usize {
        self.blob.len()
    }

    /// Whether this snapshot can be handed to llama.cpp by an engine that
    /// is `engine` with sequences of `context` tokens: its header matches,
    /// its tokens and blob match their checksums, and it fits.
    pub(crate) fn check(
        &self,
        engine: &KvIdentity,
        context: u32,
        pool: Option<&rayon::ThreadPool>,
    ) -> Result<(), KvSnapshotError> {
        let h = &self.header;
        if h.format != KV_SNAPSHOT_FORMAT {
            return Err(KvSnapshotError::Format(format!(
                "format {} (this crate reads {KV_SNAPSHOT_FORMAT})",
                h.format
            )));
        }
        mismatch(engine, &h.identity)?;
        if h.token_count as usize != self.tokens.len()
            || tokens_checksum(&self.tokens) != h.tokens_checksum
        {
            return Err(KvSnapshotError::Corrupt(
                "the tokens differ from the header's".into(),
            ));
        }
        if h.blob_len != self.blob.len() as u64
            || blob_checksum(&self.blob, pool) != h.blob_checksum
        {
            return Err(KvSnapshotError::Corrupt(
                "the state differs from the header's checksum".into(),
            ));
        }
        if h.token_count >= context {
            return Err(KvSnapshotError::TooLong {
                tokens: h.token_count,
                context,
            });
        }
        Ok(())
    }

    /// The snapshot as bytes (a magic, the header as JSON, the tokens, the
    /// blob), for a save file.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = serde_json::to_vec(&self.header).expect("a header serializes");
        let mut out = Vec::with_capacity(
            MAGIC.len() + 8 + header.len() + self.tokens.len() * 4 + self.blob.len(),
        );
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        for t in self.tokens.iter() {
            out.extend_from_slice(&t.to_le_bytes());
        }
        out.extend_from_slice(&self.blob);
        out
    }

    /// A snapshot read back from [`Self::to_bytes`]'s bytes. Checks the
    /// form only; the engine checks the rest before restoring it.
    ///
    /// # Errors
    /// [`KvSnapshotError::Format`] when the bytes are not a snapshot of this
    /// crate's format or are cut short.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KvSnapshotError> {
        let short = || KvSnapshotError::Format("cut short".into());
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| KvSnapshotError::Format("not a KV snapshot (no magic)".into()))?;
        let (len, rest) = rest.split_at_checked(8).ok_or_else(short)?;
        let len = u64::from_le_bytes(len.try_into().expect("8 bytes"));
        let len = usize::try_from(len).map_err(|_| short())?;
        let (header, rest) = rest.split_at_checked(len).ok_or_else(short)?;
        let header: KvHeader = serde_json::from_slice(header)
            .map_err(|e| KvSnapshotError::Format(format!("header: {e}")))?;
        let token_bytes = (header.token_count as usize)
            .checked_mul(4)
            .ok_or_else(short)?;
        let (tokens, blob) = rest.split_at_checked(token_bytes).ok_or_else(short)?;
        if blob.len() as u64 != header.blob_len {
            return Err(KvSnapshotError::Format(format!(
                "{} bytes of state where the header says {}",
                blob.len(),
                header.blob_len
            )));
        }
        Ok(Self {
            tokens: tokens
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect(),
            blob: blob.into(),
            header,
        })
    }
}

/// The first part of the identity in which `found` differs from `engine`.
fn mismatch(engine: &KvIdentity, found: &KvIdentity) -> Result<(), KvSnapshotError> {
    let differ = |field: &str, e: String, f: String| {
        Err(KvSnapshotError::Mismatch {
            field: field.into(),
            expected: e,
            found: f,
        })
    };
    let sha_known = !engine.model_sha256.is_empty() && !found.model_sha256.is_empty();
    if engine.model != found.model {
        return differ("model", engine.model.clone(), found.model.clone());
    }
    if sha_known && engine.model_sha256 != found.model_sha256 {
        return differ(
            "model sha256",
            engine.model_sha256.clone(),
            found.model_sha256.clone(),
        );
    }
    let pairs: [(&str, String, String); 8] = [
        (
            "model bytes",
            engine.model_bytes.to_string(),
            found.model_bytes.to_string(),
        ),
        (
            "llama.cpp build",
            engine.llama_build.clone(),
            found.llama_build.clone(),
        ),
        ("KV type", engine.kv_type.clone(), found.kv_type.clone()),
        (
            "KV bytes a token",
            engine.bytes_per_cell.to_string(),
            found.bytes_per_cell.to_string(),
        ),
        (
            "sliding window",
            engine.sliding_window.to_string(),
            found.sliding_window.to_string(),
        ),
        (
            "unified KV",
            engine.kv_unified.to_string(),
            found.kv_unified.to_string(),
        ),
        (
            "full sliding-window cache",
            engine.swa_full.to_string(),
            found.swa_full.to_string(),
        ),
        (
            "flash attention",
            format!("{:?}", engine.flash_attention),
            format!("{:?}", found.flash_attention),
        ),
    ];
    for (field, e, f) in pairs {
        if e != f {
            return differ(field, e, f);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> KvIdentity {
        KvIdentity {
            model: "smol".into(),
            model_sha256: "ab".repeat(32),
            model_bytes: 1000,
            llama_build: LLAMA_BUILD.into(),
            kv_type: "f16".into(),
            bytes_per_cell: 23_040,
            sliding_window: 0,
            kv_unified: false,
            swa_full: false,
            flash_attention: None,
        }
    }

    fn snapshot() -> NpcKvSnapshot {
        NpcKvSnapshot::new(
            identity(),
            (0..300).collect(),
            (0..5000u32).map(|i| (i * 7) as u8).collect(),
            None,
        )
    }

    #[test]
    fn llama_build_is_the_locked_bindings() {
        let lock =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.lock")).unwrap();
        let at = lock
            .find("name = \"llama-cpp-sys-2\"\nversion = \"")
            .expect("locked");
        let version = lock[at..].lines().nth(1).unwrap();
        let version = version
            .trim_start_matches("version = \"")
            .trim_end_matches('"');
        assert_eq!(LLAMA_BUILD, format!("llama-cpp-sys-2 {version}"));
    }

    #[test]
    fn a_snapshot_round_trips_through_bytes_and_passes_its_checks() {
        let s = snapshot();
        let back = NpcKvSnapshot::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.check(&identity(), 1024, None), Ok(()));
    }

    #[test]
    fn every_identity_difference_is_a_typed_mismatch_naming_its_field() {
        let s = snapshot();
        type Change = Box<dyn Fn(&mut KvIdentity)>;
        let changes: Vec<(&str, Change)> = vec![
            ("model", Box::new(|i| i.model = "gemma".into())),
            (
                "model sha256",
                Box::new(|i| i.model_sha256 = "cd".repeat(32)),
            ),
            ("model bytes", Box::new(|i| i.model_bytes += 1)),
            (
                "llama.cpp build",
                Box::new(|i| i.llama_build = "llama-cpp-sys-2 0.0.1".into()),
            ),
            ("KV type", Box::new(|i| i.kv_type = "q8_0".into())),
            ("KV bytes a token", Box::new(|i| i.bytes_per_cell *= 2)),
            ("sliding window", Box::new(|i| i.sliding_window = 512)),
            ("unified KV", Box::new(|i| i.kv_unified = true)),
            ("full sliding-window cache", Box::new(|i| i.swa_full = true)),
            (
                "flash attention",
                Box::new(|i| i.flash_attention = Some(true)),
            ),
        ];
        for (field, change) in changes {
            let mut engine = identity();
            change(&mut engine);
            match s.check(&engine, 1024, None) {
                Err(KvSnapshotError::Mismatch { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        // An unverified load (no sha256 on one side) compares the rest.
        let mut engine = identity();
        engine.model_sha256.clear();
        assert_eq!(s.check(&engine, 1024, None), Ok(()));
    }

    #[test]
    fn any_damaged_byte_is_found_before_llama_cpp_sees_it() {
        let bytes = snapshot().to_bytes();
        // Every byte of the tokens and the blob, flipped one at a time.
        let header_end = bytes.len() - 5000 - 300 * 4;
        for i in (header_end..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            let read = NpcKvSnapshot::from_bytes(&b).unwrap();
            assert!(
                matches!(
                    read.check(&identity(), 1024, None),
                    Err(KvSnapshotError::Corrupt(_))
                ),
                "byte {i}"
            );
        }
        // Cut short anywhere, or not a snapshot: a format error, no panic.
        for cut in [0, 4, 8, 12, header_end - 1, header_end + 3, bytes.len() - 1] {
            assert!(matches!(
                NpcKvSnapshot::from_bytes(&bytes[..cut]),
                Err(KvSnapshotError::Format(_))
            ));
        }
        assert!(matches!(
            NpcKvSnapshot::from_bytes(b"{\"not\": \"a snapshot\"}"),
            Err(KvSnapshotError::Format(_))
        ));
        // A header that lies about its length.
        let mut b = bytes.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            NpcKvSnapshot::from_bytes(&b),
            Err(KvSnapshotError::Format(_))
        ));
    }

    #[test]
    fn a_snapshot_longer_than_a_sequence_or_of_another_format_is_refused() {
        let s = snapshot();
        assert!(matches!(
            s.check(&identity(), 300, None),
            Err(KvSnapshotError::TooLong { .. })
        ));
        let mut f = s.clone();
        f.header.format = 2;
        assert!(matches!(
            f.check(&identity(), 1024, None),
            Err(KvSnapshotError::Format(_))
        ));
    }

    #[test]
    fn a_blob_checksum_is_the_same_on_a_pool_and_sees_each_piece() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let blob: Vec<u8> = (0..3 * PIECE + 123).map(|i| (i * 31 % 251) as u8).collect();
        let plain = blob_checksum(&blob, None);
        assert_eq!(blob_checksum(&blob, Some(&pool)), plain);
        for at in [0, PIECE - 1, PIECE, 2 * PIECE + 5, blob.len() - 1] {
            let mut b = blob.clone();
            b[at] ^= 1;
            assert_ne!(blob_checksum(&b, Some(&pool)), plain, "byte {at}");
        }
        assert_ne!(blob_checksum(&blob[..blob.len() - 1], None), plain);
        // Two pieces swapped.
        let mut b = blob[PIECE..2 * PIECE].to_vec();
        b.extend_from_slice(&blob[..PIECE]);
        b.extend_from_slice(&blob[2 * PIECE..]);
        assert_ne!(blob_checksum(&b, None), plain);
    }

    #[test]
    fn the_checksum_sees_order_length_and_every_bit() {
        let a: Vec<u8> = (0..100).collect();
        let mut b = a.clone();
        b.swap(3, 40);
        assert_ne!(checksum64(&a), checksum64(&b));
        assert_ne!(checksum64(&a), checksum64(&a[..99]));
        assert_ne!(checksum64(&[]), checksum64(&[0]));
        for bit in 0..8 * a.len() {
            let mut c = a.clone();
            c[bit / 8] ^= 1 << (bit % 8);
            assert_ne!(checksum64(&a), checksum64(&c), "bit {bit}");
        }
    }
}
