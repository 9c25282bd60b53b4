//! # raft-storage-rocksdb
//!
//! A durable [`LogStore`] on RocksDB.
//!
//! One [`RocksDb`] (a directory) can hold the logs of many Raft groups; each
//! [`RocksLogStore`] is one group's log. Every mutation goes through one
//! writer thread that **group-commits**: whatever mutations are waiting when
//! it is free go into one `WriteBatch` and one synced WAL write, so
//! throughput grows with load instead of with fsync count.
//!
//! Layout (column families):
//! - `log`: `group (u64 BE) ++ index (u64 BE)` → `crc32 (LE) ++ entry`; big-endian keys
//!   so ranges scan in order; the checksum covers the key too, so a record
//!   moved to another key is detected.
//! - `hard_state`: `group ++ "hs"` → term and vote.
//! - `meta`: `format` → format version; `group ++ "purged"` → the last purged
//!   log id; the state machine's applied id, snapshot metadata and the
//!   snapshot being installed, if an install is under way.
//! - `sm`: state-machine data (see [`RocksStateMachine`]).
//!
//! Every value is checksummed.
//!
//! Durability: with [`RocksOptions::sync`] on (the default) every mutation's
//! future completes only after its WAL write is synced. Purge and truncate
//! update data and metadata in one batch, so any crash leaves a valid log.
//! WAL recovery tolerates a torn record at the tail (the write a crash
//! interrupted, which was never acknowledged) and a hole that a power loss
//! left among the unsynced apply batches at the tail, when the records past
//! it show that nothing in it had been acknowledged (`recovery`); other
//! damage, or a WAL shorter than the size the MANIFEST recorded when it was
//! synced, makes [`RocksDb::open`] fail with a typed error instead of
//! silently dropping records.

#![deny(missing_docs)]

pub mod backup;
mod codec;
mod legacy;
mod recovery;
mod sessions;
mod state_machine;
mod writer;

pub use sessions::RocksSessions;
pub use state_machine::{KeyValue, KvApply, RocksReader, RocksStateMachine, WriteView};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use async_trait::async_trait;
use raft_core::{Entry, HardState, LogId, LogIndex, LogState, LogStore, StorageError, TypeConfig};
use rocksdb::{BlockBasedOptions, Cache, DB, DBCompressionType, DBRecoveryMode, Options};
use thiserror::Error;

use self::writer::{Op, Writer};

/// The on-disk format this build writes and reads. Version 2 added
/// `SnapshotMeta::size`; a version 1 store is read (its snapshot meta
/// without the size) and marked version 2 on open, since what this build
/// writes next a version 1 build could not read. Version 3 added the
/// install marker (a snapshot install in progress, finished at open): an
/// older build would serve the half-replaced data it guards. Version 4
/// added node identities (`HardState::uuid`, `Membership::uuids`); older
/// records are read as they were written and converted (`legacy`).
pub const FORMAT_VERSION: u32 = 4;

const CF_LOG: &str = "log";
const CF_META: &str = "meta";
const CF_HARD_STATE: &str = "hard_state";
const CF_SM: &str = "sm";
const COLUMN_FAMILIES: [&str; 4] = [CF_LOG, CF_HARD_STATE, CF_META, CF_SM];
const KEY_FORMAT: &[u8] = b"format";

/// Tunables, with defaults suited to a Raft log (small sequential writes,
/// reads mostly of the recent tail).
#[derive(Clone, Debug)]
pub struct RocksOptions {
    /// Sync the WAL before acknowledging a mutation. Turning this off loses
    /// acknowledged writes on power loss; it exists for tests that show so.
    pub sync: bool,
    /// Memtable size per column family (default 64 MiB).
    pub write_buffer_size: usize,
    /// Most memory all column families' memtables hold together before
    /// the largest is flushed (RocksDB's `db_write_buffer_size`; default
    /// 128 MiB). Without it four column families of two 64 MiB memtables
    /// each could hold 512 MiB.
    pub memtable_budget_bytes: usize,
    /// Shared block cache (default 64 MiB).
    pub block_cache_bytes: usize,
    /// LZ4-compress SST blocks (default on).
    pub compression: bool,
    /// Keep non-synced WAL writes in process memory until a sync (models a
    /// power loss on kill; for tests).
    pub manual_wal_flush: bool,
}

impl RocksOptions {
    /// The memory these options budget for caches: the block cache and the
    /// memtables. (RocksDB's index and filter blocks live in the block
    /// cache only when so configured; these options do not, so they come
    /// on top, a few bytes per key.)
    pub fn memory_budget(&self) -> usize {
        self.block_cache_bytes + self.memtable_budget_bytes
    }
}

impl Default for RocksOptions {
    fn default() -> Self {
        RocksOptions {
            sync: true,
            write_buffer_size: 64 << 20,
            memtable_budget_bytes: 128 << 20,
            block_cache_bytes: 64 << 20,
            compression: true,
            manual_wal_flush: false,
        }
    }
}

/// Why a store could not be opened or used.
#[derive(Debug, Error)]
pub enum RocksError {
    /// RocksDB itself failed.
    #[error("rocksdb at {path}: {source}")]
    Db {
        /// The database's directory.
        path: PathBuf,
        /// RocksDB's error.
        #[source]
        source: rocksdb::Error,
    },
    /// The store was written by a newer build; opening it could lose data.
    #[error(
        "{path} was written by format version {found}; this build reads up to {FORMAT_VERSION}"
    )]
    NewerFormat {
        /// The database's directory.
        path: PathBuf,
        /// The format version found.
        found: u32,
    },
    /// A column family this crate writes is not in the database.
    #[error("{path} is missing column family {name:?}")]
    MissingColumnFamily {
        /// The database's directory.
        path: PathBuf,
        /// The column family.
        name: &'static str,
    },
    /// A log record failed its checksum or did not decode.
    #[error("corrupt record in {path}, log group {group}, index {index}: {detail}")]
    CorruptEntry {
        /// The database's directory.
        path: PathBuf,
        /// The Raft group whose log holds it.
        group: u64,
        /// The entry's index.
        index: u64,
        /// What is wrong with it.
        detail: String,
    },
    /// A metadata record (hard state, log bounds, applied state) is bad.
    #[error("corrupt metadata in {path}: {detail}")]
    CorruptMeta {
        /// The database's directory.
        path: PathBuf,
        /// What is wrong with it.
        detail: String,
    },
    /// The log skips an index.
    #[error("log of group {group} in {path} has a hole: expected index {expected}, found {found}")]
    Hole {
        /// The database's directory.
        path: PathBuf,
        /// The Raft group.
        group: u64,
        /// The index that should come next.
        expected: u64,
        /// The index found instead.
        found: u64,
    },
    /// The group-commit thread is gone (the store is closing); the write
    /// was not made.
    #[error("the writer thread of {path} stopped")]
    WriterGone {
        /// The database's directory.
        path: PathBuf,
    },
    /// A read of a state machine's data while a snapshot replaces it: the
    /// data is part old, part new until the install ends. Retry shortly.
    #[error("group {group} in {path} is installing a snapshot; retry shortly")]
    Installing {
        /// The database's directory.
        path: PathBuf,
        /// The Raft group.
        group: u64,
    },
}

impl From<RocksError> for StorageError {
    fn from(e: RocksError) -> Self {
        match e {
            e @ (RocksError::CorruptEntry { .. }
            | RocksError::CorruptMeta { .. }
            | RocksError::Hole { .. }) => StorageError::Corrupt {
                location: "rocksdb log".into(),
                detail: e.to_string(),
            },
            e @ (RocksError::NewerFormat { .. } | RocksError::MissingColumnFamily { .. }) => {
                StorageError::Unsupported {
                    location: "rocksdb log".into(),
                    detail: e.to_string(),
                }
            }
            e => StorageError::Backend(Box::new(e)),
        }
    }
}

pub(crate) struct Shared {
    pub(crate) db: DB,
    pub(crate) path: PathBuf,
    pub(crate) sync: bool,
    /// The compression the column families use: an SST file written for
    /// ingestion (a snapshot install) uses it too.
    pub(crate) compression: DBCompressionType,
    /// How many synced groups the writer has committed and acknowledged;
    /// every batch records it (see `recovery`).
    pub(crate) acked: AtomicU64,
}

impl Shared {
    /// The handle of column family `name` (the error is built only when it
    /// is missing: this runs for every mutation).
    pub(crate) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, RocksError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| RocksError::MissingColumnFamily {
                path: self.path.clone(),
                name,
            })
    }

    pub(crate) fn db_err(&self, source: rocksdb::Error) -> RocksError {
        RocksError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// Group `group`'s log record at `index` is damaged.
    fn corrupt_entry(&self, group: u64, index: u64, detail: impl ToString) -> RocksError {
        RocksError::CorruptEntry {
            path: self.path.clone(),
            group,
            index,
            detail: detail.to_string(),
        }
    }

    /// Group `group`'s log skips from `expected` to `found`.
    fn hole(&self, group: u64, expected: u64, found: u64) -> RocksError {
        RocksError::Hole {
            path: self.path.clone(),
            group,
            expected,
            found,
        }
    }
}

/// An open RocksDB directory holding one or more Raft logs.
#[derive(Clone)]
pub struct RocksDb {
    pub(crate) shared: Arc<Shared>,
    pub(crate) writer: Writer,
}

impl RocksDb {
    /// Opens (or creates) the store at `path`. Refuses a directory written by
    /// a newer format, one missing a column family, or one whose WAL is
    /// damaged.
    pub fn open(path: impl AsRef<Path>, options: RocksOptions) -> Result<RocksDb, RocksError> {
        let path = path.as_ref().to_path_buf();
        let db_err = |source| RocksError::Db {
            path: path.clone(),
            source,
        };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_paranoid_checks(true);
        // A crash can tear the record being written at the WAL's tail: that
        // record was never acknowledged, so tolerate it; other damage fails
        // this open and is looked at by `recovery`. Synced WAL sizes are also
        // recorded in the MANIFEST, so a WAL truncated at rest is detected.
        opts.set_wal_recovery_mode(DBRecoveryMode::TolerateCorruptedTailRecords);
        opts.set_track_and_verify_wals_in_manifest(true);
        opts.set_write_buffer_size(options.write_buffer_size);
        opts.set_db_write_buffer_size(options.memtable_budget_bytes);
        opts.set_manual_wal_flush(options.manual_wal_flush);
        let cache = Cache::new_lru_cache(options.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        opts.set_block_based_table_factory(&table);
        let compression = if options.compression {
            DBCompressionType::Lz4
        } else {
            DBCompressionType::None
        };
        opts.set_compression_type(compression);

        let exists = path.join("CURRENT").exists();
        if exists {
            let cfs = DB::list_cf(&opts, &path).map_err(db_err)?;
            for name in COLUMN_FAMILIES {
                if !cfs.iter().any(|c| c == name) {
                    return Err(RocksError::MissingColumnFamily { path, name });
                }
            }
        } else {
            opts.create_missing_column_families(true);
        }
        let db = match DB::open_cf_descriptors(&opts, &path, recovery::descriptors(&opts)) {
            Ok(db) => db,
            Err(e) if exists && e.kind() == rocksdb::ErrorKind::Corruption => {
                recovery::open_past_torn_tail(&opts, &path, e)?
            }
            Err(e) => return Err(db_err(e)),
        };
        let shared = Arc::new(Shared {
            acked: AtomicU64::new(recovery::counter(&db, recovery::KEY_SYNCED)),
            db,
            path: path.clone(),
            sync: options.sync,
            compression,
        });

        let meta = shared
            .db
            .cf_handle(CF_META)
            .ok_or(RocksError::MissingColumnFamily {
                path: path.clone(),
                name: CF_META,
            })?;
        match shared.db.get_cf(meta, KEY_FORMAT).map_err(db_err)? {
            Some(v) => {
                let found = codec::decode_u32(&v).ok_or_else(|| RocksError::CorruptMeta {
                    path: path.clone(),
                    detail: "format version".into(),
                })?;
                if found > FORMAT_VERSION {
                    return Err(RocksError::NewerFormat { path, found });
                }
                if found < FORMAT_VERSION {
                    shared
                        .db
                        .put_cf(meta, KEY_FORMAT, FORMAT_VERSION.to_le_bytes())
                        .map_err(db_err)?;
                }
            }
            None => shared
                .db
                .put_cf(meta, KEY_FORMAT, FORMAT_VERSION.to_le_bytes())
                .map_err(db_err)?,
        }
        let writer = Writer::start(shared.clone());
        Ok(RocksDb { shared, writer })
    }

    /// The database's directory.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub(crate) fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, RocksError> {
        self.shared.cf(name)
    }

    /// Reads and verifies a checksummed metadata record of `group`.
    pub(crate) fn meta_get<T: legacy::Record>(
        &self,
        group: u64,
        tag: &[u8],
    ) -> Result<Option<T>, RocksError> {
        self.record_get(CF_META, group, tag)
    }

    /// Reads and verifies a checksummed record of `group` in column family `cf`.
    pub(crate) fn record_get<T: legacy::Record>(
        &self,
        cf: &'static str,
        group: u64,
        tag: &[u8],
    ) -> Result<Option<T>, RocksError> {
        let key = codec::meta_key(group, tag);
        let value = self
            .shared
            .db
            .get_cf(self.cf(cf)?, &key)
            .map_err(|source| RocksError::Db {
                path: self.shared.path.clone(),
                source,
            })?;
        let Some(v) = value else { return Ok(None) };
        codec::open_record(&key, &v)
            .map(Some)
            .map_err(|detail| RocksError::CorruptMeta {
                path: self.shared.path.clone(),
                detail: format!("group {group} {}: {detail}", String::from_utf8_lossy(tag)),
            })
    }

    /// The log of Raft group `group`, checked for damage: every record's
    /// checksum is verified and the log must have no holes.
    pub fn log_store<C: TypeConfig>(&self, group: u64) -> Result<RocksLogStore<C>, RocksError> {
        let mut store = RocksLogStore {
            db: self.clone(),
            group,
            state: LogState::default(),
            _c: std::marker::PhantomData,
        };
        store.state = store.scan()?;
        Ok(store)
    }
}

/// One Raft group's log and hard state in a [`RocksDb`].
pub struct RocksLogStore<C: TypeConfig> {
    db: RocksDb,
    group: u64,
    /// First and last ids, kept in step with what is durable.
    state: LogState,
    _c: std::marker::PhantomData<fn() -> C>,
}

impl<C: TypeConfig> RocksLogStore<C> {
    fn shared(&self) -> &Shared {
        &self.db.shared
    }

    fn db_err(&self, source: rocksdb::Error) -> RocksError {
        self.shared().db_err(source)
    }

    fn cf(&self, name: &'static str) -> Result<&rocksdb::ColumnFamily, RocksError> {
        self.db.cf(name)
    }

    fn corrupt(&self, index: u64, detail: impl ToString) -> RocksError {
        self.shared().corrupt_entry(self.group, index, detail)
    }

    /// Reads purge point and every record, verifying checksums and that the
    /// log is contiguous.
    fn scan(&self) -> Result<LogState, RocksError> {
        let last_purged: LogId = self
            .db
            .meta_get(self.group, codec::TAG_PURGED)?
            .unwrap_or_default();
        let mut last = last_purged;
        let lo = codec::log_key(self.group, 0);
        let hi = codec::log_key(self.group, u64::MAX);
        let mode = rocksdb::IteratorMode::From(&lo, rocksdb::Direction::Forward);
        for item in self.shared().db.iterator_cf(self.cf(CF_LOG)?, mode) {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            if k.as_ref() > hi.as_slice() {
                break;
            }
            let index = codec::index_of(&k).ok_or_else(|| self.corrupt(0, "malformed key"))?;
            let entry: Entry<C> = codec::open_record(&k, &v).map_err(|d| self.corrupt(index, d))?;
            if entry.log_id.index.0 != index {
                return Err(self.corrupt(index, format!("record holds entry {}", entry.log_id)));
            }
            if index != last.index.0 + 1 {
                return Err(self.shared().hole(self.group, last.index.0 + 1, index));
            }
            last = entry.log_id;
        }
        Ok(LogState { last_purged, last })
    }

    async fn write(&self, ops: Vec<Op>) -> Result<(), RocksError> {
        self.db.writer.write(ops).await
    }
}

#[async_trait]
impl<C: TypeConfig> LogStore<C> for RocksLogStore<C> {
    async fn log_state(&mut self) -> Result<LogState, StorageError> {
        Ok(self.state)
    }

    /// Runs on a blocking thread: a read-back for a follower far behind
    /// is megabytes of records to decode and check, and on the runtime it
    /// held up everything beside it (with one runtime thread per node, the
    /// node's heartbeats and answers: followers timed out and called
    /// elections in `cargo xtask bench join`).
    async fn read(&mut self, from: LogIndex, to: LogIndex) -> Result<Vec<Entry<C>>, StorageError> {
        let start = from.0.max(self.state.last_purged.index.0 + 1);
        let end = to.0.min(self.state.last.index.0);
        if start > end {
            return Ok(Vec::new());
        }
        let (db, group) = (self.db.clone(), self.group);
        let job = tokio::task::spawn_blocking(move || {
            read_entries::<C>(&db, group, start, end).map_err(StorageError::from)
        });
        joined(job.await)
    }

    async fn append(&mut self, entries: Vec<Entry<C>>) -> Result<(), StorageError> {
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(());
        };
        let mut expect = self.state.last.index.next();
        let mut ops = Vec::with_capacity(entries.len());
        for e in &entries {
            if e.log_id.index != expect {
                return Err(StorageError::Corrupt {
                    location: format!("{} group {}", self.shared().path.display(), self.group),
                    detail: format!(
                        "append of {} would not follow index {}",
                        e.log_id,
                        expect.prev()
                    ),
                });
            }
            expect = expect.next();
            let key = codec::log_key(self.group, e.log_id.index.0);
            let value =
                codec::seal_record(&key, e).map_err(|d| self.corrupt(e.log_id.index.0, d))?;
            ops.push(Op::Put {
                cf: CF_LOG,
                key,
                value,
            });
        }
        self.write(ops).await?;
        self.state.last = last;
        Ok(())
    }

    async fn truncate(&mut self, from: LogIndex) -> Result<(), StorageError> {
        if from > self.state.last.index {
            return Ok(());
        }
        let from = from.max(self.state.last_purged.index.next());
        let ops = vec![Op::DeleteRange {
            cf: CF_LOG,
            from: codec::log_key(self.group, from.0),
            to: codec::log_key(self.group, u64::MAX),
        }];
        self.write(ops).await?;
        self.state.last = if from.prev() == self.state.last_purged.index {
            self.state.last_purged
        } else {
            // The entry before `from` is still there: read its term.
            let prev = self.read(from.prev(), from.prev()).await?;
            prev.first()
                .map(|e| e.log_id)
                .unwrap_or(self.state.last_purged)
        };
        Ok(())
    }

    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        if upto.index <= self.state.last_purged.index {
            return Ok(());
        }
        let key = codec::meta_key(self.group, codec::TAG_PURGED);
        let value = codec::seal_record(&key, &upto).map_err(|d| self.corrupt(upto.index.0, d))?;
        // Data and metadata in one batch: a crash leaves either both or neither.
        let ops = vec![
            Op::DeleteRange {
                cf: CF_LOG,
                from: codec::log_key(self.group, 0),
                to: codec::log_key(self.group, upto.index.0.saturating_add(1)),
            },
            Op::Put {
                cf: CF_META,
                key,
                value,
            },
        ];
        self.write(ops).await?;
        self.state.last_purged = upto;
        if self.state.last.index <= upto.index {
            self.state.last = upto;
        }
        Ok(())
    }

    async fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        let key = codec::meta_key(self.group, codec::TAG_HARD_STATE);
        let value = codec::seal_record(&key, &hard_state).map_err(|d| self.corrupt(0, d))?;
        self.write(vec![Op::Put {
            cf: CF_HARD_STATE,
            key,
            value,
        }])
        .await?;
        Ok(())
    }

    async fn load_hard_state(&mut self) -> Result<HardState, StorageError> {
        Ok(self
            .db
            .record_get(CF_HARD_STATE, self.group, codec::TAG_HARD_STATE)?
            .unwrap_or_default())
    }
    /// Mutations go to the group-commit writer thread and reads to
    /// `spawn_blocking`; what runs in place is encoding and checksumming a
    /// batch. (`load_hard_state` reads in place, but only at start-up.)
    fn never_blocks(&self) -> bool {
        true
    }
}

/// Group `group`'s entries `start ..= end`, which the log holds (no hole,
/// every checksum verified). Blocking.
fn read_entries<C: TypeConfig>(
    db: &RocksDb,
    group: u64,
    start: u64,
    end: u64,
) -> Result<Vec<Entry<C>>, RocksError> {
    let shared = &db.shared;
    let lo = codec::log_key(group, start);
    let cf = db.cf(CF_LOG)?;
    let mode = rocksdb::IteratorMode::From(&lo, rocksdb::Direction::Forward);
    let mut out = Vec::with_capacity((end - start + 1) as usize);
    for item in shared.db.iterator_cf(cf, mode) {
        let (k, v) = item.map_err(|e| shared.db_err(e))?;
        let Some(index) = codec::index_of(&k).filter(|_| k.starts_with(&group.to_be_bytes()))
        else {
            break;
        };
        if index > end {
            break;
        }
        let expected = start + out.len() as u64;
        if index != expected {
            return Err(shared.hole(group, expected, index));
        }
        let entry: Entry<C> =
            codec::open_record(&k, &v).map_err(|d| shared.corrupt_entry(group, index, d))?;
        out.push(entry);
    }
    if out.len() as u64 != end - start + 1 {
        return Err(shared.hole(group, start + out.len() as u64, end + 1));
    }
    Ok(out)
}

/// A blocking task's result, its panic or cancellation as a backend error.
pub(crate) fn joined<T>(
    r: Result<Result<T, StorageError>, tokio::task::JoinError>,
) -> Result<T, StorageError> {
    r.map_err(|e| StorageError::Backend(e.to_string().into()))?
}
