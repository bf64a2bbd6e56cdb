//! NPCs' KV caches beside a dialogue save. The dialogue keys each NPC's
//! line requests by the NPC's entity, which changes from one play session
//! to the next; a save names NPCs by persona. [`NpcKvArchive`] holds one
//! snapshot per persona name as one file; [`npc_cache_keys`] says which key
//! is whose now, in the world being saved or in the one just loaded.
//!
//! Saving: send [`SaveNpcKv`](crate::events::SaveNpcKv) with the keys of
//! [`npc_cache_keys`], then build the archive from the
//! [`NpcKvSaved`](crate::events::NpcKvSaved) answer with
//! [`NpcKvArchive::from_saved`]. Loading: restore the dialogue first
//! ([`load_dialogue`](super::load_dialogue)), then send
//! [`NpcKvArchive::restore_request`]'s message once the model is ready.

use bevy::prelude::*;

use super::data::Persona;
use crate::engine::kv_snapshot::{KvSnapshotError, NpcKvSnapshot};
use crate::events::{NpcKvSaved, RestoreNpcKv};
use crate::request::CacheKey;

/// The first bytes of an archive file.
const MAGIC: &[u8; 8] = b"NPCKVA\x01\n";

/// Every NPC's (entity with a [`Persona`]) cache key, by persona name, in
/// name order.
pub fn npc_cache_keys(world: &mut World) -> Vec<(String, CacheKey)> {
    let mut keys: Vec<(String, CacheKey)> = world
        .query::<(Entity, &Persona)>()
        .iter(world)
        .map(|(e, p)| (p.name.clone(), CacheKey::from(e)))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.0.cmp(&b.1.0)));
    keys
}

/// NPCs' KV snapshots by persona name, for a save file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NpcKvArchive {
    /// Each NPC's name and snapshot.
    pub entries: Vec<(String, NpcKvSnapshot)>,
}

impl NpcKvArchive {
    /// The snapshots of `saved` under the names `keys` gives their keys (as
    /// [`npc_cache_keys`] returned them); keys without a snapshot
    /// (not cached, busy) are left out with their reasons.
    #[must_use]
    pub fn from_saved(
        keys: &[(String, CacheKey)],
        saved: &NpcKvSaved,
    ) -> (Self, Vec<(String, KvSnapshotError)>) {
        let mut archive = Self::default();
        let mut missing = Vec::new();
        for (key, result) in &saved.snapshots {
            let Some((name, _)) = keys.iter().find(|(_, k)| k == key) else {
                continue;
            };
            match result {
                Ok(s) => archive.entries.push((name.clone(), s.clone())),
                Err(e) => missing.push((name.clone(), e.clone())),
            }
        }
        (archive, missing)
    }

    /// The message that gives each snapshot to the NPC of its name in
    /// `world` (after its dialogue was loaded); names with no NPC there are
    /// returned apart.
    #[must_use]
    pub fn restore_request(&self, world: &mut World) -> (RestoreNpcKv, Vec<String>) {
        let keys = npc_cache_keys(world);
        let mut snapshots = Vec::new();
        let mut unknown = Vec::new();
        for (name, s) in &self.entries {
            match keys.iter().find(|(n, _)| n == name) {
                Some((_, key)) => snapshots.push((*key, s.clone())),
                None => unknown.push(name.clone()),
            }
        }
        (RestoreNpcKv { snapshots }, unknown)
    }

    /// The archive as bytes: a magic, then per entry the name's and the
    /// snapshot's lengths and bytes.
    #[must_use]
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for (name, s) in &self.entries {
            let bytes = s.to_bytes();
            out.extend_from_slice(&(name.len() as u64).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(&bytes);
        }
        out
    }

    /// An archive read back from [`Self::to_bytes`]'s bytes (each snapshot
    /// checked in form; the engine checks the rest when restoring).
    ///
    /// # Errors
    /// [`KvSnapshotError::Format`] when the bytes are not an archive or are
    /// cut short.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KvSnapshotError> {
        let short = || KvSnapshotError::Format("the archive is cut short".into());
        let mut rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| KvSnapshotError::Format("not an NPC KV archive (no magic)".into()))?;
        let mut take = |n: usize| -> Result<&[u8], KvSnapshotError> {
            let (head, tail) = rest.split_at_checked(n).ok_or_else(short)?;
            rest = tail;
            Ok(head)
        };
        let count = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        let mut entries = Vec::new();
        for _ in 0..count {
            let n = usize::try_from(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")))
                .map_err(|_| short())?;
            let name = String::from_utf8(take(n)?.to_vec())
                .map_err(|_| KvSnapshotError::Format("a name is not UTF-8".into()))?;
            let n = usize::try_from(u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")))
                .map_err(|_| short())?;
            entries.push((name, NpcKvSnapshot::from_bytes(take(n)?)?));
        }
        Ok(Self { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kv_snapshot::KvIdentity;

    fn snapshot(n: i32) -> NpcKvSnapshot {
        let identity = KvIdentity {
            model: "m".into(),
            model_sha256: String::new(),
            model_bytes: 1,
            llama_build: "b".into(),
            kv_type: "f16".into(),
            bytes_per_cell: 8,
            sliding_window: 0,
            kv_unified: false,
            swa_full: false,
            flash_attention: None,
        };
        NpcKvSnapshot::new(
            identity,
            (0..n).collect(),
            vec![n as u8; n as usize * 3],
            None,
        )
    }

    #[test]
    fn an_archive_maps_keys_to_names_and_round_trips_through_bytes() {
        let keys = vec![
            ("Brom".to_string(), CacheKey(1)),
            ("Ilse".to_string(), CacheKey(2)),
            ("Mira".to_string(), CacheKey(3)),
        ];
        let saved = NpcKvSaved {
            snapshots: vec![
                (CacheKey(2), Ok(snapshot(5))),
                (CacheKey(3), Err(KvSnapshotError::Busy)),
                (CacheKey(1), Ok(snapshot(9))),
                (CacheKey(7), Ok(snapshot(1))),
            ],
        };
        let (archive, missing) = NpcKvArchive::from_saved(&keys, &saved);
        let names: Vec<&str> = archive.entries.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["Ilse", "Brom"]);
        assert_eq!(missing, vec![("Mira".to_string(), KvSnapshotError::Busy)]);
        let bytes = archive.to_bytes();
        assert_eq!(NpcKvArchive::from_bytes(&bytes), Ok(archive));
        for cut in [0, 7, 8, 15, 20, bytes.len() / 2, bytes.len() - 1] {
            assert!(matches!(
                NpcKvArchive::from_bytes(&bytes[..cut]),
                Err(KvSnapshotError::Format(_))
            ));
        }
        assert_eq!(
            NpcKvArchive::from_bytes(&NpcKvArchive::default().to_bytes()),
            Ok(NpcKvArchive::default())
        );
    }

    #[test]
    fn a_restore_request_finds_each_name_in_the_loaded_world() {
        let mut world = World::new();
        let ilse = world
            .spawn(Persona::new("Ilse", "the miller's daughter"))
            .id();
        let archive = NpcKvArchive {
            entries: vec![("Ilse".into(), snapshot(4)), ("Gone".into(), snapshot(2))],
        };
        let (request, unknown) = archive.restore_request(&mut world);
        assert_eq!(request.snapshots.len(), 1);
        assert_eq!(request.snapshots[0].0, CacheKey::from(ilse));
        assert_eq!(unknown, ["Gone"]);
    }
}
