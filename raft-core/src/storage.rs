//! The log storage trait.

use async_trait::async_trait;
use thiserror::Error;

use crate::types::{Entry, HardState, LogId, LogIndex, TypeConfig};

/// A storage failure. The driver treats every storage error as fatal: the
/// node stops (fail-stop) rather than continue with state it cannot trust.
#[derive(Debug, Error)]
pub enum StorageError {
    /// An I/O call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, and to which file.
        context: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Stored data failed validation (checksum, decoding, a hole in the log).
    #[error("corrupt data in {location}: {detail}")]
    Corrupt {
        /// Where the bad data is (a file, a column family, a key).
        location: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The data was written by a newer or unknown format version.
    #[error("unsupported format in {location}: {detail}")]
    Unsupported {
        /// Where the data is.
        location: String,
        /// Which version was found, and which are understood.
        detail: String,
    },
    /// Any other backend failure.
    #[error("storage backend: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where a log begins and ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogState {
    /// The last purged entry (`LogId::ZERO` if nothing was purged). The log
    /// holds the entries after it.
    pub last_purged: LogId,
    /// The last entry, or `last_purged` when the log is empty.
    pub last: LogId,
}

/// Durable storage for the Raft log and the hard state (term and vote).
///
/// # Contract
/// - Calls are serialized: the driver never issues a call before the
///   previous one completed, so `&mut self` is enough.
/// - **Durability:** when a mutating future (`append`, `truncate`, `purge`,
///   `save_hard_state`) completes with `Ok`, its effect must survive a crash
///   or power loss (written and synced). Nothing may be acknowledged before.
/// - The log never has holes: entries are contiguous from
///   `last_purged.index + 1` to `last.index`.
/// - On `Err`, the node stops; the store must still reopen to a valid log
///   (each mutation atomic: all of it or none of it).
#[async_trait]
pub trait LogStore<C: TypeConfig>: Send + Sync + 'static {
    /// First and last entry ids. On an empty, never-written store both are
    /// `LogId::ZERO`.
    async fn log_state(&mut self) -> Result<LogState, StorageError>;

    /// Entries with indices in `[from, to]`, clipped to what the log holds.
    /// Called at start-up, and while the node runs to read back entries the
    /// engine evicted from its cache (`Config::log_cache_bytes`) for a
    /// follower that lags; such a read sees every earlier call's effect.
    async fn read(&mut self, from: LogIndex, to: LogIndex) -> Result<Vec<Entry<C>>, StorageError>;

    /// Appends `entries` after the last entry. The first entry's index is
    /// always `last.index + 1` (the driver truncates first when needed).
    /// Durable on completion.
    async fn append(&mut self, entries: Vec<Entry<C>>) -> Result<(), StorageError>;

    /// Deletes every entry with index `>= from`. Durable on completion.
    async fn truncate(&mut self, from: LogIndex) -> Result<(), StorageError>;

    /// Deletes every entry with index `<= upto.index` and records `upto` as
    /// `last_purged`. If the log ends before `upto`, it becomes empty and
    /// `last` becomes `upto`. Durable on completion.
    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError>;

    /// Saves term and vote. Durable on completion: a node must never vote
    /// twice in a term, even across a power loss.
    async fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError>;

    /// The last saved hard state, or the default on a new store.
    async fn load_hard_state(&mut self) -> Result<HardState, StorageError>;

    /// Whether every future of this store waits without blocking its
    /// thread: it does its disk I/O on threads of its own (or with
    /// `spawn_blocking`) and only awaits their answer, and does little CPU
    /// work in between (encoding a batch, say).
    ///
    /// The driver then runs the log operations inside its own task instead
    /// of a separate worker task: a follower's append and its
    /// acknowledgement no longer cross two task hand-offs, which on a busy
    /// machine are a large part of a write's latency. Messages, heartbeats
    /// and timers still never wait behind the disk, because the driver
    /// polls the operation beside them rather than awaiting it.
    ///
    /// The default, `false`, is always safe: the operations run on their
    /// own task, so a store that blocks (a synchronous `fsync` in `append`)
    /// stalls only that task. Answer `true` only if no call blocks; a store
    /// that wraps another answers what the inner one does.
    fn never_blocks(&self) -> bool {
        false
    }
}
