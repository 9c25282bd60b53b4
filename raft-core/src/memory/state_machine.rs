//! An in-memory [`StateMachine`] for any [`MemApp`] (the key-value
//! [`KvStore`] by default). Clones share state, so the application keeps a
//! clone to read from.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;

use super::MemApp;
use super::kv::{KvConfig, KvStore};
use crate::message::SnapshotMeta;
use crate::state_machine::{SnapshotChunk, StateMachine};
use crate::storage::StorageError;
use crate::types::{Entry, LogId};

#[derive(Debug)]
struct Inner<C: MemApp> {
    store: C::State,
    snapshot: Option<Snapshot<C>>,
    /// The snapshot the last build replaced, readable until the next build
    /// or install (a transfer may be reading it).
    previous: Option<Snapshot<C>>,
    receiving: Vec<u8>,
    next_snapshot_id: u64,
}

/// A snapshot: a point-in-time copy of the store, encoded only when a
/// follower first reads it. Most snapshots only let the log be purged and
/// are never sent, and copying the map costs a fraction of encoding it.
#[derive(Debug)]
struct Snapshot<C: MemApp> {
    meta: SnapshotMeta<C>,
    data: SnapshotData<C>,
}

#[derive(Debug)]
enum SnapshotData<C: MemApp> {
    Copy(Box<C::State>),
    Encoded(Arc<Vec<u8>>),
}

impl<C: MemApp> Snapshot<C> {
    /// The snapshot's bytes, encoding the copy (and dropping it) once.
    fn encoded(&mut self) -> Result<Arc<Vec<u8>>, StorageError> {
        let bytes = match &self.data {
            SnapshotData::Encoded(bytes) => return Ok(bytes.clone()),
            SnapshotData::Copy(store) => Arc::new(C::encode(store).map_err(corrupt)?),
        };
        self.data = SnapshotData::Encoded(bytes.clone());
        Ok(bytes)
    }
}

/// An application's state ([`MemApp`]; the key-value [`KvStore`] by
/// default) as a Raft state machine, with snapshots kept in memory.
#[derive(Debug)]
pub struct MemStateMachine<C: MemApp = KvConfig> {
    inner: Arc<Mutex<Inner<C>>>,
}

impl<C: MemApp> Clone for MemStateMachine<C> {
    fn clone(&self) -> Self {
        MemStateMachine {
            inner: self.inner.clone(),
        }
    }
}

impl<C: MemApp> Default for MemStateMachine<C> {
    fn default() -> Self {
        MemStateMachine {
            inner: Arc::new(Mutex::new(Inner {
                store: C::State::default(),
                snapshot: None,
                previous: None,
                receiving: Vec::new(),
                next_snapshot_id: 0,
            })),
        }
    }
}

impl<C: MemApp> MemStateMachine<C> {
    /// An empty state machine with no snapshot.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of the whole state.
    pub fn state(&self) -> C::State {
        self.inner
            .lock()
            .map(|g| g.store.clone())
            .unwrap_or_default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner<C>>, StorageError> {
        self.inner.lock().map_err(|_| StorageError::Corrupt {
            location: "memory state machine".into(),
            detail: "a writer panicked while holding the lock".into(),
        })
    }

    /// Runs `f` with a handle on the state: on tokio's blocking pool when a
    /// runtime is there, inline otherwise. Copying, encoding, decoding or
    /// dropping a large store takes long enough that on a runtime worker
    /// it would hold up every task scheduled there, the node's driver and
    /// its heartbeats among them (a 256 MiB store cost the core bench its
    /// leader at 1,024 writers).
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(MemStateMachine<C>) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let this = self.clone();
        let run = move || f(this);
        #[cfg(feature = "driver")]
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            return rt
                .spawn_blocking(run)
                .await
                .map_err(|e| StorageError::Backend(e.to_string().into()))?;
        }
        run()
    }
}

impl MemStateMachine {
    /// Reads a key from the local state. After `Raft::ensure_linearizable`
    /// the read is linearizable; otherwise it may be stale.
    pub fn get(&self, key: &str) -> Option<String> {
        self.inner.lock().ok()?.store.get(key).cloned()
    }

    /// A copy of the whole store (for tests).
    pub fn snapshot_of_store(&self) -> KvStore {
        self.state()
    }
}

fn corrupt(detail: impl ToString) -> StorageError {
    StorageError::Corrupt {
        location: "memory state machine snapshot".into(),
        detail: detail.to_string(),
    }
}

#[async_trait]
impl<C: MemApp> StateMachine<C> for MemStateMachine<C> {
    async fn applied(&mut self) -> Result<LogId, StorageError> {
        Ok(C::applied(&self.lock()?.store))
    }

    async fn apply(&mut self, entries: Vec<Entry<C>>) -> Result<Vec<C::Response>, StorageError> {
        let mut g = self.lock()?;
        Ok(entries
            .into_iter()
            .map(|e| C::apply(&mut g.store, e))
            .collect())
    }

    async fn build_snapshot(&mut self) -> Result<SnapshotMeta<C>, StorageError> {
        self.blocking(|sm| {
            let (meta, replaced) = {
                let mut g = sm.lock()?;
                g.next_snapshot_id += 1;
                let meta = SnapshotMeta {
                    last_log_id: C::applied(&g.store),
                    membership: C::membership(&g.store),
                    id: g.next_snapshot_id,
                    size: C::size_hint(&g.store),
                };
                let copy = Snapshot {
                    meta: meta.clone(),
                    data: SnapshotData::Copy(Box::new(g.store.clone())),
                };
                let replaced = g.snapshot.replace(copy);
                let replaced = std::mem::replace(&mut g.previous, replaced);
                (meta, replaced)
            };
            // The snapshot it frees is dropped off the lock.
            drop(replaced);
            Ok(meta)
        })
        .await
    }

    async fn current_snapshot(&mut self) -> Result<Option<SnapshotMeta<C>>, StorageError> {
        Ok(self.lock()?.snapshot.as_ref().map(|s| s.meta.clone()))
    }

    async fn read_snapshot_chunk(
        &mut self,
        snapshot_id: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Option<SnapshotChunk>, StorageError> {
        // The first read encodes the whole copy.
        let data = self
            .blocking(move |sm| {
                let mut g = sm.lock()?;
                let g = &mut *g;
                let found = [g.snapshot.as_mut(), g.previous.as_mut()]
                    .into_iter()
                    .flatten()
                    .find(|s| s.meta.id == snapshot_id);
                match found {
                    Some(snapshot) => snapshot.encoded().map(Some),
                    None => Ok(None),
                }
            })
            .await?;
        let Some(data) = data else {
            return Ok(None);
        };
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(max_len).min(data.len());
        Ok(Some(SnapshotChunk {
            data: data[start..end].to_vec(),
            done: end == data.len(),
        }))
    }

    async fn write_snapshot_chunk(
        &mut self,
        _meta: &SnapshotMeta<C>,
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

    async fn install_snapshot(&mut self, meta: &SnapshotMeta<C>) -> Result<(), StorageError> {
        let meta = meta.clone();
        self.blocking(move |sm| {
            let replaced = {
                let mut g = sm.lock()?;
                let data = std::mem::take(&mut g.receiving);
                let store = C::decode(&data).map_err(corrupt)?;
                if C::applied(&store) != meta.last_log_id {
                    return Err(corrupt(format!(
                        "data ends at {} but meta says {}",
                        C::applied(&store),
                        meta.last_log_id
                    )));
                }
                let snapshot = Snapshot {
                    meta,
                    data: SnapshotData::Encoded(Arc::new(data)),
                };
                (
                    std::mem::replace(&mut g.store, store),
                    g.snapshot.replace(snapshot),
                    g.previous.take(),
                )
            };
            // What it replaces is freed off the lock.
            drop(replaced);
            Ok(())
        })
        .await
    }

    /// Applies are map updates under a lock; builds, installs and the
    /// encoding of a snapshot run on blocking threads.
    fn never_blocks(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::KvCommand;
    use crate::types::EntryPayload;

    fn put(index: u64, key: &str, value: &str) -> Entry<KvConfig> {
        Entry {
            log_id: LogId::new(1, index),
            payload: EntryPayload::command(KvCommand::Put {
                key: key.into(),
                value: value.into(),
            }),
        }
    }

    /// A snapshot is the state when it was built, however much is applied
    /// before a follower first reads it (it is encoded only then).
    #[tokio::test]
    async fn a_snapshot_read_later_is_the_state_it_was_built_at() {
        let mut sm = MemStateMachine::new();
        sm.apply(vec![put(1, "a", "1"), put(2, "b", "2")])
            .await
            .unwrap();
        let meta = sm.build_snapshot().await.unwrap();
        let at_build = sm.snapshot_of_store();
        sm.apply(vec![put(3, "a", "changed"), put(4, "c", "3")])
            .await
            .unwrap();

        let mut follower = MemStateMachine::new();
        let mut offset = 0;
        loop {
            let chunk = sm
                .read_snapshot_chunk(meta.id, offset, 7)
                .await
                .unwrap()
                .expect("the current snapshot");
            let n = chunk.data.len() as u64;
            follower
                .write_snapshot_chunk(&meta, offset, chunk.data)
                .await
                .unwrap();
            offset += n;
            if chunk.done {
                break;
            }
        }
        follower.install_snapshot(&meta).await.unwrap();
        assert_eq!(follower.snapshot_of_store(), at_build);
        assert_eq!(follower.get("a").as_deref(), Some("1"));
        assert_eq!(sm.get("a").as_deref(), Some("changed"));
        // A snapshot that was never built is not read.
        assert!(
            sm.read_snapshot_chunk(meta.id + 1, 0, 7)
                .await
                .unwrap()
                .is_none()
        );
    }

    /// A transfer may read the snapshot the last build replaced, not an
    /// older one.
    #[tokio::test]
    async fn the_snapshot_before_the_current_one_stays_readable() {
        let mut sm = MemStateMachine::new();
        let mut ids = Vec::new();
        for i in 1..=3 {
            sm.apply(vec![put(i, "k", "v")]).await.unwrap();
            ids.push(sm.build_snapshot().await.unwrap().id);
        }
        let mut readable = Vec::new();
        for id in &ids {
            readable.push(sm.read_snapshot_chunk(*id, 0, 7).await.unwrap().is_some());
        }
        assert_eq!(readable, [false, true, true]);
    }
}
