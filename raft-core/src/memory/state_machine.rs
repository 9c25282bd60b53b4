//! An in-memory key-value [`StateMachine`]. Clones share state, so the
//! application keeps a clone to read from.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::kv::{KvConfig, KvResponse, KvStore};
use crate::message::SnapshotMeta;
use crate::state_machine::{SnapshotChunk, StateMachine};
use crate::storage::StorageError;
use crate::types::{Entry, LogId};

#[derive(Debug, Default)]
struct Inner {
    store: KvStore,
    snapshot: Option<(SnapshotMeta<KvConfig>, Arc<Vec<u8>>)>,
    receiving: Vec<u8>,
    next_snapshot_id: u64,
}

/// The [`KvStore`] as a Raft state machine, with snapshots kept in memory.
#[derive(Debug, Clone, Default)]
pub struct MemStateMachine {
    inner: Arc<Mutex<Inner>>,
}

impl MemStateMachine {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, StorageError> {
        self.inner.lock().map_err(|_| StorageError::Corrupt {
            location: "memory state machine".into(),
            detail: "a writer panicked while holding the lock".into(),
        })
    }

    /// Reads a key from the local state. After `Raft::ensure_linearizable`
    /// the read is linearizable; otherwise it may be stale.
    pub fn get(&self, key: &str) -> Option<String> {
        self.inner.lock().ok()?.store.get(key).cloned()
    }

    /// A copy of the whole store (for tests).
    pub fn snapshot_of_store(&self) -> KvStore {
        self.inner
            .lock()
            .map(|g| g.store.clone())
            .unwrap_or_default()
    }
}

fn corrupt(detail: impl ToString) -> StorageError {
    StorageError::Corrupt {
        location: "memory state machine snapshot".into(),
        detail: detail.to_string(),
    }
}

#[async_trait]
impl StateMachine<KvConfig> for MemStateMachine {
    async fn applied(&mut self) -> Result<LogId, StorageError> {
        Ok(self.lock()?.store.last_applied)
    }

    async fn apply(
        &mut self,
        entries: Vec<Entry<KvConfig>>,
    ) -> Result<Vec<KvResponse>, StorageError> {
        let mut g = self.lock()?;
        Ok(entries.into_iter().map(|e| g.store.apply(e)).collect())
    }

    async fn build_snapshot(&mut self) -> Result<SnapshotMeta<KvConfig>, StorageError> {
        let mut g = self.lock()?;
        let data = g.store.encode().map_err(corrupt)?;
        g.next_snapshot_id += 1;
        let meta = SnapshotMeta {
            last_log_id: g.store.last_applied,
            membership: g.store.membership.clone(),
            id: g.next_snapshot_id,
        };
        g.snapshot = Some((meta.clone(), Arc::new(data)));
        Ok(meta)
    }

    async fn current_snapshot(&mut self) -> Result<Option<SnapshotMeta<KvConfig>>, StorageError> {
        Ok(self.lock()?.snapshot.as_ref().map(|(m, _)| m.clone()))
    }

    async fn read_snapshot_chunk(
        &mut self,
        snapshot_id: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Option<SnapshotChunk>, StorageError> {
        let g = self.lock()?;
        let Some((meta, data)) = &g.snapshot else {
            return Ok(None);
        };
        if meta.id != snapshot_id {
            return Ok(None);
        }
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(max_len).min(data.len());
        Ok(Some(SnapshotChunk {
            data: data[start..end].to_vec(),
            done: end == data.len(),
        }))
    }

    async fn write_snapshot_chunk(
        &mut self,
        _meta: &SnapshotMeta<KvConfig>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        if offset == 0 {
            g.receiving.clear();
        }
        if offset as usize != g.receiving.len() {
            return Err(corrupt(format!(
                "chunk at {offset} but {} bytes received",
                g.receiving.len()
            )));
        }
        g.receiving.extend_from_slice(&data);
        Ok(())
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<KvConfig>,
    ) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        let data = std::mem::take(&mut g.receiving);
        let store = KvStore::decode(&data).map_err(corrupt)?;
        if store.last_applied != meta.last_log_id {
            return Err(corrupt(format!(
                "data ends at {} but meta says {}",
                store.last_applied, meta.last_log_id
            )));
        }
        g.store = store;
        g.snapshot = Some((meta.clone(), Arc::new(data)));
        Ok(())
    }
}
