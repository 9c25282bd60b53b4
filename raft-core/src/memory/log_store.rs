//! An in-memory [`LogStore`]. Clones share one store, so a test can "crash"
//! a node (drop its `Raft`) and restart it on the same storage.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::storage::{LogState, LogStore, StorageError};
use crate::types::{Entry, HardState, LogId, LogIndex, TypeConfig};

#[derive(Debug)]
struct Inner<C: TypeConfig> {
    hard_state: HardState,
    last_purged: LogId,
    entries: Vec<Entry<C>>,
}

/// A [`LogStore`] in process memory: "durable" for as long as the process
/// lives. For tests and quick starts.
#[derive(Debug, Clone)]
pub struct MemLogStore<C: TypeConfig> {
    inner: Arc<Mutex<Inner<C>>>,
}

impl<C: TypeConfig> Default for MemLogStore<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: TypeConfig> MemLogStore<C> {
    /// An empty log with no hard state.
    pub fn new() -> Self {
        MemLogStore {
            inner: Arc::new(Mutex::new(Inner {
                hard_state: HardState::default(),
                last_purged: LogId::ZERO,
                entries: Vec::new(),
            })),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner<C>>, StorageError> {
        self.inner.lock().map_err(|_| StorageError::Corrupt {
            location: "memory log store".into(),
            detail: "a writer panicked while holding the lock".into(),
        })
    }
}

impl<C: TypeConfig> Inner<C> {
    fn last(&self) -> LogId {
        self.entries
            .last()
            .map(|e| e.log_id)
            .unwrap_or(self.last_purged)
    }
}

#[async_trait]
impl<C: TypeConfig> LogStore<C> for MemLogStore<C> {
    async fn log_state(&mut self) -> Result<LogState, StorageError> {
        let g = self.lock()?;
        Ok(LogState {
            last_purged: g.last_purged,
            last: g.last(),
        })
    }

    async fn read(&mut self, from: LogIndex, to: LogIndex) -> Result<Vec<Entry<C>>, StorageError> {
        let g = self.lock()?;
        let base = g.last_purged.index.0;
        let start = from.0.max(base + 1);
        let end = to.0.min(g.last().index.0);
        if start > end {
            return Ok(Vec::new());
        }
        Ok(g.entries[(start - base - 1) as usize..(end - base) as usize].to_vec())
    }

    async fn append(&mut self, entries: Vec<Entry<C>>) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        let mut expect = g.last().index.next();
        for e in &entries {
            if e.log_id.index != expect {
                return Err(StorageError::Corrupt {
                    location: "memory log store".into(),
                    detail: format!(
                        "append of {} would leave a hole before {}",
                        e.log_id, expect
                    ),
                });
            }
            expect = expect.next();
        }
        g.entries.extend(entries);
        Ok(())
    }

    async fn truncate(&mut self, from: LogIndex) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        let keep = from.0.saturating_sub(g.last_purged.index.0 + 1) as usize;
        g.entries.truncate(keep);
        Ok(())
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        let mut g = self.lock()?;
        if upto.index <= g.last_purged.index {
            return Ok(());
        }
        let n = ((upto.index.0 - g.last_purged.index.0) as usize).min(g.entries.len());
        g.entries.drain(..n);
        g.last_purged = upto;
        Ok(())
    }

    async fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        self.lock()?.hard_state = hard_state;
        Ok(())
    }

    async fn load_hard_state(&mut self) -> Result<HardState, StorageError> {
        Ok(self.lock()?.hard_state)
    }

    /// Every call is a lock and a copy in memory.
    fn never_blocks(&self) -> bool {
        true
    }
}
