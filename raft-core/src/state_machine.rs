//! The application state machine trait.

use std::future::Future;
use std::pin::Pin;

use async_trait::async_trait;

use crate::message::SnapshotMeta;
use crate::storage::StorageError;
#[cfg(doc)]
use crate::types::EntryPayload;
use crate::types::{Entry, LogId, TypeConfig};

/// One chunk of a snapshot read back for sending.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    /// The bytes at the offset asked for; at most the length asked for.
    pub data: Vec<u8>,
    /// This chunk ends the snapshot.
    pub done: bool,
}

/// The rest of a snapshot build begun by [`StateMachine::begin_snapshot`]:
/// it runs while later entries are applied, and yields the snapshot's meta
/// once the snapshot is durable.
pub type SnapshotBuild<C> =
    Pin<Box<dyn Future<Output = Result<SnapshotMeta<C>, StorageError>> + Send + 'static>>;

/// The replicated application: applies committed entries and snapshots
/// itself.
///
/// # Contract
/// - Calls are serialized and come in log order (only the future of
///   [`StateMachine::begin_snapshot`] runs beside them); `apply` receives each
///   committed entry exactly once per life of the process (after a restart,
///   entries after [`StateMachine::applied`] are applied again).
/// - `apply` must be deterministic: every node applying the same entries
///   holds the same state.
/// - Snapshots are streamed in chunks so they never have to fit in memory.
///   A snapshot returned by `build_snapshot` or installed by
///   `install_snapshot` must be durable when the future completes, and
///   installing must be atomic: after a crash the state machine holds either
///   the old state or the new one.
/// - An `Err` stops the node.
/// - The futures run on the node's runtime, beside its driver. Work that
///   takes long without awaiting (copying, scanning or encoding a large
///   state for a snapshot) belongs on `tokio::task::spawn_blocking`, as
///   `MemStateMachine` does: on a runtime worker it holds up the driver's
///   heartbeats and can cost the leader its term.
/// - An [`EntryPayload::Command`] is shared
///   with the log and its messages; take it owned with
///   `Arc::unwrap_or_clone`, which copies it only while others hold it.
///
/// # Example: `Raft` over an application's own types and state machine
/// A replicated counter: commands add to it, responses are the new total,
/// a snapshot is the total's eight bytes. (The log store and network are
/// the in-memory ones here; a deployment brings durable ones, e.g.
/// raft-storage-rocksdb and raft-transport-quic.)
///
/// ```
/// use std::collections::BTreeMap;
/// use async_trait::async_trait;
/// use raft_core::memory::{MemLogStore, MemRouter};
/// use raft_core::{
///     Config, Entry, EntryPayload, LogId, Membership, NodeId, Raft, SnapshotChunk, SnapshotMeta,
///     StateMachine, StorageError, TypeConfig,
/// };
///
/// #[derive(Clone, Debug, PartialEq, Eq)]
/// struct Counter;
/// impl TypeConfig for Counter {
///     type Command = u64; // add this much
///     type Response = u64; // the total after it
///     type Node = String;
///     fn command_size(_: &u64) -> usize {
///         8
///     }
/// }
///
/// #[derive(Default)]
/// struct Total {
///     total: u64,
///     applied: LogId,
///     membership: Membership<String>,
///     snapshot: Option<(SnapshotMeta<Counter>, Vec<u8>)>,
///     receiving: Vec<u8>,
/// }
///
/// #[async_trait]
/// impl StateMachine<Counter> for Total {
///     async fn applied(&mut self) -> Result<LogId, StorageError> {
///         Ok(self.applied)
///     }
///     async fn apply(&mut self, entries: Vec<Entry<Counter>>) -> Result<Vec<u64>, StorageError> {
///         let mut out = Vec::with_capacity(entries.len());
///         for e in entries {
///             self.applied = e.log_id;
///             match e.payload {
///                 EntryPayload::Command(add) => self.total += *add,
///                 EntryPayload::Membership(m) => self.membership = m,
///                 EntryPayload::Blank => {}
///             }
///             out.push(self.total);
///         }
///         Ok(out)
///     }
///     async fn build_snapshot(&mut self) -> Result<SnapshotMeta<Counter>, StorageError> {
///         let meta = SnapshotMeta {
///             last_log_id: self.applied,
///             membership: self.membership.clone(),
///             id: self.applied.index.0,
///             size: 8,
///         };
///         self.snapshot = Some((meta.clone(), self.total.to_le_bytes().to_vec()));
///         Ok(meta)
///     }
///     async fn current_snapshot(&mut self) -> Result<Option<SnapshotMeta<Counter>>, StorageError> {
///         Ok(self.snapshot.as_ref().map(|(m, _)| m.clone()))
///     }
///     async fn read_snapshot_chunk(
///         &mut self,
///         id: u64,
///         offset: u64,
///         max_len: usize,
///     ) -> Result<Option<SnapshotChunk>, StorageError> {
///         Ok(self.snapshot.as_ref().filter(|(m, _)| m.id == id).map(|(_, bytes)| {
///             let start = (offset as usize).min(bytes.len());
///             let end = (start + max_len).min(bytes.len());
///             SnapshotChunk { data: bytes[start..end].to_vec(), done: end == bytes.len() }
///         }))
///     }
///     async fn write_snapshot_chunk(
///         &mut self,
///         _: &SnapshotMeta<Counter>,
///         offset: u64,
///         data: Vec<u8>,
///     ) -> Result<(), StorageError> {
///         self.receiving.truncate(offset as usize);
///         self.receiving.extend(data);
///         Ok(())
///     }
///     async fn install_snapshot(&mut self, meta: &SnapshotMeta<Counter>) -> Result<(), StorageError> {
///         let bytes: [u8; 8] = self.receiving.as_slice().try_into().map_err(|_| {
///             StorageError::Corrupt { location: "snapshot".into(), detail: "not 8 bytes".into() }
///         })?;
///         self.total = u64::from_le_bytes(bytes);
///         self.applied = meta.last_log_id;
///         self.membership = meta.membership.clone();
///         self.snapshot = Some((meta.clone(), bytes.to_vec()));
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let router = MemRouter::<Counter>::new();
/// let members: BTreeMap<NodeId, String> = (1..=3).map(|i| (NodeId(i), format!("n{i}"))).collect();
/// let mut nodes = Vec::new();
/// for id in members.keys() {
///     let raft = Raft::start(*id, Config::default(), MemLogStore::new(), Total::default(), router.factory(*id)).await?;
///     router.register(*id, raft.clone());
///     nodes.push(raft);
/// }
/// nodes[0].initialize(members).await?;
/// let leader = nodes[0].wait_for_leader(std::time::Duration::from_secs(5)).await.expect("a leader");
/// let leader = &nodes[(leader.0 - 1) as usize];
/// let (_, total) = leader.client_write(2).await?;
/// assert_eq!(total, 2);
/// let (_, total) = leader.client_write(40).await?;
/// assert_eq!(total, 42);
/// for raft in &nodes {
///     raft.shutdown().await;
/// }
/// # Ok(()) }
/// ```
#[async_trait]
pub trait StateMachine<C: TypeConfig>: Send + Sync + 'static {
    /// The last applied entry (`LogId::ZERO` if none). A durable state
    /// machine returns what survived the last restart; an in-memory one
    /// restores its latest snapshot and returns its last entry.
    async fn applied(&mut self) -> Result<LogId, StorageError>;

    /// Applies committed entries in order, returning one response per entry
    /// (for blank and membership entries the response is ignored, but the
    /// entry still counts as applied: record its log id, and keep the
    /// membership for snapshots).
    ///
    /// Need not be durable on completion: the log holds every committed
    /// entry, so what a crash loses is applied again at the next start
    /// (from [`StateMachine::applied`] on). What it must be is atomic with
    /// its bookkeeping: after a crash, `applied` names the last entry whose
    /// effects the state holds, never one before or after (a durable state
    /// machine writes data and last applied id in one batch).
    async fn apply(&mut self, entries: Vec<Entry<C>>) -> Result<Vec<C::Response>, StorageError>;

    /// Captures the state as of the last applied entry as a new snapshot
    /// and makes it the current one. Durable on completion.
    async fn build_snapshot(&mut self) -> Result<SnapshotMeta<C>, StorageError>;

    /// Begins a snapshot of the state as of the last applied entry and
    /// returns the work that finishes it, so that applying goes on while a
    /// large state is written out. The driver calls this where it would
    /// call `build_snapshot`, then runs the returned future beside the
    /// state-machine worker. Until that future completes the driver calls
    /// nothing but `apply`, so the future must work from a point-in-time
    /// view captured here (a storage engine's snapshot, a copy-on-write
    /// handle), never from the live state. When it completes, the snapshot
    /// must be durable; the driver then calls
    /// [`StateMachine::snapshot_built`], in order with the applies, to make
    /// it current. An `Err` from either stops the node.
    ///
    /// The default builds in place with `build_snapshot` (which already
    /// makes the snapshot current) and returns a finished future: correct,
    /// but applies wait for the whole build.
    async fn begin_snapshot(&mut self) -> Result<SnapshotBuild<C>, StorageError> {
        let meta = self.build_snapshot().await?;
        Ok(Box::pin(std::future::ready(Ok(meta))))
    }

    /// Makes the snapshot `meta`, finished by a [`SnapshotBuild`], the
    /// current one (what `current_snapshot` answers and
    /// `read_snapshot_chunk` serves). Durable on completion. The default
    /// does nothing, matching the default `begin_snapshot`.
    async fn snapshot_built(&mut self, meta: &SnapshotMeta<C>) -> Result<(), StorageError> {
        let _ = meta;
        Ok(())
    }

    /// The current snapshot, if any.
    async fn current_snapshot(&mut self) -> Result<Option<SnapshotMeta<C>>, StorageError>;

    /// `max_len` bytes at `offset` of snapshot `snapshot_id`, fewer only
    /// in the chunk that ends the snapshot (`done`), none at or past its
    /// end (the leader reads a window of chunks ahead, at offsets a
    /// multiple of `max_len` apart, trusting `SnapshotMeta::size` only as
    /// a hint). The snapshot is the current one, or the one the last build
    /// replaced. Keep that one
    /// readable until the next build or install, so a transfer that
    /// started on it finishes instead of starting over on the new one
    /// (the engine reads no older one, and builds no new one while a live
    /// follower receives a transfer, up to `Config::purge_keep_max`
    /// entries or twice the snapshot's weight in entries). `None` if that snapshot is gone: correct, but the
    /// transfer then starts over.
    async fn read_snapshot_chunk(
        &mut self,
        snapshot_id: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Option<SnapshotChunk>, StorageError>;

    /// Stores a chunk of an incoming snapshot. `offset` 0 discards any
    /// partial earlier transfer. Chunks arrive in order, each starting
    /// where the one before ended (the engine holds back those that arrive
    /// early).
    async fn write_snapshot_chunk(
        &mut self,
        meta: &SnapshotMeta<C>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), StorageError>;

    /// Atomically replaces the state with the fully received snapshot
    /// `meta`, which becomes the current snapshot. Durable on completion.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta<C>) -> Result<(), StorageError>;

    /// Whether every future of this state machine waits without blocking
    /// its thread: applies are short CPU work in memory, and anything that
    /// touches a disk or takes long (builds, installs, chunk reads) runs on
    /// threads of its own or with `spawn_blocking`.
    ///
    /// The driver then applies inside its own task instead of a separate
    /// worker task, which takes a task hand-off off every write's path (on
    /// a 2-core machine, a quarter of a single client's latency). Messages,
    /// heartbeats and timers never wait for a build or an install either
    /// way: the driver polls the state-machine work beside them.
    ///
    /// The default, `false`, is always safe. Answer `true` only if no call
    /// blocks: a state machine that reads a disk while it applies (most
    /// durable ones) keeps the default; a wrapper answers what it wraps.
    fn never_blocks(&self) -> bool {
        false
    }
}
