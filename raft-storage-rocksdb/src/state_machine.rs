//! A state machine whose data lives in RocksDB.
//!
//! The application supplies only its command logic ([`KvApply`]): given a
//! command and a view of the data, stage writes and return a response. This
//! helper does the rest of the [`StateMachine`] contract:
//! - each `apply` batch writes the data, the last applied log id and the
//!   membership **in one atomic batch**, so a restart resumes exactly after
//!   the last applied entry: nothing applied twice. The batch is not synced
//!   on its own (the entries are already durable in the log, earlier in the
//!   same WAL): after a power loss the state machine may resume from an
//!   earlier batch and apply the rest again from the log;
//! - snapshots are a consistent iteration of the group's data (a RocksDB
//!   snapshot), written to a file and streamed in chunks from it. A
//!   receiving node writes the chunks to a file and, on a blocking thread,
//!   into SST files as they arrive (in key order, as the snapshot holds
//!   them; one file per [`INSTALL_FILE_BYTES`], so memory stays bounded);
//!   the install ingests those files (or builds them from the file, when a
//!   restart's redo or a broken stream needs it) after deleting the
//!   group's old data: no WAL, memtable or flush for the bulk of it. It
//!   is redo-logged: the file is renamed into place and an install marker
//!   written (synced) before the old data goes, and a synced last batch
//!   records the new applied id and removes the marker.
//!   A crash in between leaves the marker, and [`RocksStateMachine::open`]
//!   finishes the install from the file before anything reads the data;
//!   reads meanwhile get [`RocksError::Installing`], never a half-replaced
//!   state. A partly received snapshot is just a stray file.
//!
//! Keys of group `g` are stored as `g (u64 BE) ++ key` in the `sm` column
//! family.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use raft_core::{
    Entry, EntryPayload, LogId, Membership, SnapshotBuild, SnapshotChunk, SnapshotMeta,
    StateMachine, StorageError, TypeConfig,
};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::backup::BackupHeader;
use crate::codec;
use crate::legacy::{MembershipV3, Record, SnapshotMetaV1};
use crate::writer::Op;
use crate::{CF_META, CF_SM, RocksDb, RocksError, joined};

pub(crate) const TAG_APPLIED: &[u8] = b"sm_applied";
const TAG_SNAPSHOT: &[u8] = b"sm_snapshot";
/// The snapshot an unfinished install is loading (its meta).
const TAG_INSTALLING: &[u8] = b"sm_installing";

/// Received chunks queued for the SST builder of a transfer; see
/// `stream_chunk`.
const STREAM_QUEUE_CHUNKS: usize = 16;

/// Bytes of data an install writes per SST file: a file's index and
/// filter are held in memory until it is finished, so memory stays bounded
/// by this, whatever the snapshot's size. Small in tests, so that they
/// cover a snapshot spread over several files.
const INSTALL_FILE_BYTES: usize = if cfg!(test) { 4 << 20 } else { 256 << 20 };

/// The application's command logic.
pub trait KvApply<C: TypeConfig>: Send + Sync + 'static {
    /// Applies one command: read through `view`, stage writes on it, return
    /// the response. Must be deterministic.
    fn apply(&self, command: &C::Command, view: &mut WriteView<'_>) -> C::Response;
    /// Applies the command of the entry `log_id`: what the helper calls.
    /// The default ignores the log id and calls [`KvApply::apply`]; logic
    /// that needs it (client sessions are named by the index of their
    /// registration entry) overrides this instead.
    fn apply_at(
        &self,
        log_id: LogId,
        command: &C::Command,
        view: &mut WriteView<'_>,
    ) -> C::Response {
        let _ = log_id;
        self.apply(command, view)
    }
    /// The response recorded for blank and membership entries (ignored).
    fn empty_response(&self) -> C::Response;
}

/// Reads see earlier writes of the same batch; writes are staged until the
/// batch commits.
pub struct WriteView<'a> {
    db: &'a RocksDb,
    group: u64,
    pending: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    error: Option<RocksError>,
}

impl WriteView<'_> {
    /// The value of `key` as of the writes staged so far in this batch.
    pub fn get(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        if let Some(v) = self.pending.get(key) {
            return v.clone();
        }
        match read_key(self.db, self.group, key) {
            Ok(v) => v,
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }
    /// Stages `key = value`, written with the batch.
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.pending.insert(key.to_vec(), Some(value.to_vec()));
    }
    /// Stages the removal of `key`, written with the batch.
    pub fn delete(&mut self, key: &[u8]) {
        self.pending.insert(key.to_vec(), None);
    }

    /// Every key beginning with `prefix` and its value, in key order, as
    /// of the writes staged so far in this batch. Reads them all: for
    /// small key ranges (bookkeeping, not the application's data).
    pub fn scan_prefix(&mut self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut found = BTreeMap::new();
        if let Err(e) = scan_stored(self.db, self.group, prefix, &mut found) {
            self.error.get_or_insert(e);
        }
        for (k, v) in self.pending.range(prefix.to_vec()..) {
            if !k.starts_with(prefix) {
                break;
            }
            match v {
                Some(v) => found.insert(k.clone(), v.clone()),
                None => found.remove(k),
            };
        }
        found.into_iter().collect()
    }

    /// Fails the batch with `error` (the first one reported wins): the
    /// apply returns it and nothing of the batch is written.
    pub fn fail(&mut self, error: RocksError) {
        self.error.get_or_insert(error);
    }

    /// A [`RocksError::CorruptMeta`] about this view's database.
    pub fn corrupt(&self, detail: impl Into<String>) -> RocksError {
        RocksError::CorruptMeta {
            path: self.db.shared.path.clone(),
            detail: detail.into(),
        }
    }
}

fn scan_stored(
    db: &RocksDb,
    group: u64,
    prefix: &[u8],
    into: &mut BTreeMap<Vec<u8>, Vec<u8>>,
) -> Result<(), RocksError> {
    let cf = db.cf(CF_SM)?;
    let start = data_key(group, prefix);
    let mode = rocksdb::IteratorMode::From(&start, rocksdb::Direction::Forward);
    for item in db.shared.db.iterator_cf(cf, mode) {
        let (k, v) = item.map_err(|e| db.shared.db_err(e))?;
        if !k.starts_with(&start) {
            break;
        }
        into.insert(k[8..].to_vec(), v.to_vec());
    }
    Ok(())
}

fn data_key(group: u64, key: &[u8]) -> Vec<u8> {
    let mut k = group.to_be_bytes().to_vec();
    k.extend_from_slice(key);
    k
}

fn read_key(db: &RocksDb, group: u64, key: &[u8]) -> Result<Option<Vec<u8>>, RocksError> {
    let cf = db.cf(CF_SM)?;
    db.shared
        .db
        .get_cf(cf, data_key(group, key))
        .map_err(|e| db.shared.db_err(e))
}

#[derive(Serialize, Deserialize)]
#[serde(bound = "")]
pub(crate) struct Applied<C: TypeConfig> {
    pub(crate) log_id: LogId,
    pub(crate) membership: Membership<C::Node>,
}

/// `Applied` before identities (formats 1 to 3).
#[derive(Deserialize)]
#[serde(bound = "")]
struct AppliedV3<C: TypeConfig> {
    log_id: LogId,
    membership: MembershipV3<C::Node>,
}

impl<C: TypeConfig> Record for Applied<C> {
    fn legacy(payload: &[u8]) -> Option<Self> {
        let old: AppliedV3<C> = raft_core::codec::decode(payload).ok()?;
        Some(Applied {
            log_id: old.log_id,
            membership: old.membership.into(),
        })
    }
}

/// A [`StateMachine`] over RocksDB for one Raft group.
pub struct RocksStateMachine<C: TypeConfig, A: KvApply<C>> {
    db: RocksDb,
    group: u64,
    app: A,
    applied: LogId,
    membership: Membership<C::Node>,
    snapshot: Option<SnapshotMeta<C>>,
    /// The snapshot the last build replaced: its file stays until the next
    /// build or install, for a transfer that may still be reading it.
    previous: Option<u64>,
    snapshot_dir: PathBuf,
    /// An install is replacing the data: reads are refused until it ends.
    installing: Arc<AtomicBool>,
    /// The snapshot being received, its SST files built as it arrives.
    streamed: Option<Streamed>,
    /// Transfers received since open: names each one's SST files apart
    /// from those of an abandoned one still being deleted.
    transfers: u64,
}

pub(crate) fn io(context: String) -> impl FnOnce(std::io::Error) -> StorageError {
    move |source| StorageError::Io { context, source }
}

impl<C: TypeConfig, A: KvApply<C>> RocksStateMachine<C, A> {
    /// Opens group `group`'s state machine in `db`, resuming after the last
    /// applied entry.
    pub fn open(db: &RocksDb, group: u64, app: A) -> Result<Self, StorageError> {
        let snapshot_dir = db.path().join("snapshots").join(group.to_string());
        std::fs::create_dir_all(&snapshot_dir)
            .map_err(io(format!("creating {}", snapshot_dir.display())))?;
        let applied: Option<Applied<C>> = db.meta_get(group, TAG_APPLIED)?;
        let snapshot = match db.meta_get::<SnapshotMeta<C>>(group, TAG_SNAPSHOT) {
            Ok(s) => s,
            // Format 1 had no `size`; the file has it. The meta is written
            // in the current format at the next build or install.
            Err(e) => match db.meta_get::<SnapshotMetaV1<C>>(group, TAG_SNAPSHOT) {
                Ok(Some(old)) => Some(SnapshotMeta {
                    size: std::fs::metadata(snapshot_dir.join(snapshot_name(old.id)))
                        .map_or(0, |m| m.len()),
                    last_log_id: old.last_log_id,
                    membership: old.membership.into(),
                    id: old.id,
                }),
                _ => return Err(e.into()),
            },
        };
        let unfinished = db.meta_get::<SnapshotMeta<C>>(group, TAG_INSTALLING)?;
        let (applied, snapshot) = match unfinished {
            Some(meta) => {
                // A crash interrupted an install: its file is in place (it
                // was renamed before the marker was written); load it again.
                let path = snapshot_dir.join(snapshot_name(meta.id));
                load_snapshot_file(db, group, &path, &meta)?;
                let applied = Applied::<C> {
                    log_id: meta.last_log_id,
                    membership: meta.membership.clone(),
                };
                (Some(applied), Some(meta))
            }
            None => (applied, snapshot),
        };
        let (applied, membership) = applied
            .map(|a| (a.log_id, a.membership))
            .unwrap_or_default();
        remove_stray_files(&snapshot_dir, snapshot.as_ref().map(|s| s.id))?;
        Ok(RocksStateMachine {
            db: db.clone(),
            group,
            app,
            applied,
            membership,
            snapshot,
            previous: None,
            snapshot_dir,
            installing: Arc::default(),
            streamed: None,
            transfers: 0,
        })
    }

    /// Reads a key of the local state (linearizable after
    /// `Raft::ensure_linearizable`).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RocksError> {
        self.reader().get(key)
    }

    /// A read handle for the application, sharing this state machine's data.
    pub fn reader(&self) -> RocksReader {
        RocksReader {
            db: self.db.clone(),
            group: self.group,
            installing: self.installing.clone(),
        }
    }

    /// Seeds this state machine, which must be empty (nothing applied, no
    /// snapshot), from the backup file at `path`: checks it whole, installs
    /// its data as the current snapshot (the snapshot install path:
    /// bounded memory, atomic across a crash) with `membership` (the new
    /// cluster's) instead of the one recorded in the backup, and returns
    /// that snapshot. The caller then makes the log start after it
    /// (`LogStore::purge` up to its last log id, and a hard state of its
    /// term), so the node recovers as if it had taken the snapshot itself.
    pub async fn restore(
        &mut self,
        path: &Path,
        membership: Membership<C::Node>,
    ) -> Result<SnapshotMeta<C>, StorageError> {
        if self.applied != LogId::ZERO || self.snapshot.is_some() {
            return Err(StorageError::Corrupt {
                location: self.db.shared.path.display().to_string(),
                detail: format!(
                    "restore needs an empty state machine; this one has applied up to {}",
                    self.applied
                ),
            });
        }
        let (path, dir) = (path.to_path_buf(), self.snapshot_dir.clone());
        let staging = dir.join("restore.partial");
        let unpacked = {
            let staging = staging.clone();
            tokio::task::spawn_blocking(move || crate::backup::unpack::<C>(&path, &staging))
        };
        let (header, size) = joined(unpacked.await)?;
        let meta = SnapshotMeta {
            last_log_id: header.last_log_id,
            membership,
            id: header.last_log_id.index.0.max(1),
            size,
        };
        std::fs::rename(&staging, self.receive_file(meta.id))
            .map_err(io(format!("renaming {}", staging.display())))?;
        self.install_snapshot(&meta).await?;
        Ok(meta)
    }

    /// Hands a received chunk to the SST builder of its transfer: a chunk
    /// at offset 0 starts one (abandoning any other); a chunk out of step
    /// with it abandons it, and the install then builds from the file.
    async fn stream_chunk(&mut self, id: u64, offset: u64, data: Vec<u8>) {
        if offset == 0 {
            self.streamed = None;
            self.transfers += 1;
            // Chunks the builder may fall behind by before a chunk's write
            // (and so its answer) waits for it: 16 MiB at the default
            // 1 MiB chunks, twice the leader's window, so a builder that
            // loses the CPU for a moment does not stop the transfer.
            let (tx, rx) = tokio::sync::mpsc::channel(STREAM_QUEUE_CHUNKS);
            let store = (
                self.db.path().to_path_buf(),
                self.db.shared.compression,
                self.group,
            );
            let base = self
                .snapshot_dir
                .join(format!("{id}.{}.received", self.transfers));
            let built = tokio::task::spawn_blocking(move || sst_files_from_chunks(store, base, rx));
            self.streamed = Some(Streamed {
                id,
                next: 0,
                chunks: Some(tx),
                built,
            });
        }
        let Some(s) = &mut self.streamed else {
            return;
        };
        if s.id != id || s.next != offset {
            self.streamed = None;
            return;
        }
        s.next += data.len() as u64;
        if let Some(tx) = &s.chunks
            && tx.send(data).await.is_err()
        {
            // The builder stopped: done (the snapshot's end was in an
            // earlier chunk) or failed; the install finds out which.
            s.chunks = None;
        }
    }

    /// The SST files built for snapshot `id` while it was received, if they
    /// were (a builder that failed is logged; the install then builds from
    /// the file).
    async fn streamed_files(&mut self, id: u64) -> Option<SstFiles> {
        let s = self.streamed.take().filter(|s| s.id == id)?;
        drop(s.chunks);
        match joined(s.built.await) {
            Ok(files) => Some(files),
            Err(e) => {
                tracing::warn!(snapshot = id, error = %e, "SST files built while receiving failed; building from the file");
                None
            }
        }
    }

    fn snapshot_file(&self, id: u64) -> PathBuf {
        self.snapshot_dir.join(snapshot_name(id))
    }

    /// Deletes the snapshot files of `ids`, on a blocking thread: unlinking
    /// a file of hundreds of megabytes frees its extents there and then,
    /// and on the node's runtime thread that holds up its driver (in `cargo
    /// xtask bench join` a leader's first turn after such a delete was 60
    /// ms late, and check-quorum deposed it in that turn). Best effort: a
    /// file left behind is removed at the next open.
    async fn remove_snapshot_files(&self, ids: impl IntoIterator<Item = u64>) {
        let paths: Vec<PathBuf> = ids.into_iter().map(|id| self.snapshot_file(id)).collect();
        if paths.is_empty() {
            return;
        }
        let _ = tokio::task::spawn_blocking(move || {
            for path in paths {
                let _ = std::fs::remove_file(path);
            }
        })
        .await;
    }

    fn receive_file(&self, id: u64) -> PathBuf {
        self.snapshot_dir.join(format!("{id}.partial"))
    }
}

/// Records group `group`'s last applied entry and the membership as of it.
fn applied_op<C: TypeConfig>(
    group: u64,
    log_id: LogId,
    membership: &Membership<C::Node>,
) -> Result<Op, StorageError> {
    let key = codec::meta_key(group, TAG_APPLIED);
    let value = codec::seal_record(
        &key,
        &Applied::<C> {
            log_id,
            membership: membership.clone(),
        },
    )
    .map_err(|d| StorageError::Corrupt {
        location: "state machine meta".into(),
        detail: d,
    })?;
    Ok(Op::Put {
        cf: CF_META,
        key,
        value,
    })
}

/// Records `meta` under `tag` (the current snapshot, or the one an install
/// is loading).
fn meta_op<C: TypeConfig>(
    group: u64,
    tag: &[u8],
    meta: &SnapshotMeta<C>,
) -> Result<Op, StorageError> {
    let key = codec::meta_key(group, tag);
    let value = codec::seal_record(&key, meta).map_err(|d| StorageError::Corrupt {
        location: "snapshot meta".into(),
        detail: d,
    })?;
    Ok(Op::Put {
        cf: CF_META,
        key,
        value,
    })
}

/// A key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Reads one group's state-machine data.
#[derive(Clone)]
pub struct RocksReader {
    db: RocksDb,
    group: u64,
    installing: Arc<AtomicBool>,
}

impl RocksReader {
    /// `key`'s value; [`RocksError::Installing`] while a snapshot install
    /// replaces the data.
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, RocksError> {
        self.refuse_while_installing()?;
        let value = read_key(&self.db, self.group, key)?;
        // An install that began during the read may have replaced part of
        // the data already: that value is not of one state.
        self.refuse_while_installing()?;
        Ok(value)
    }

    /// Every key beginning with `prefix` and its value, in key order. Reads
    /// them all: for small key ranges (an application's bookkeeping, such
    /// as access tokens), not for its data. [`RocksError::Installing`]
    /// while a snapshot install replaces the data.
    pub fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, RocksError> {
        self.refuse_while_installing()?;
        let mut found = BTreeMap::new();
        scan_stored(&self.db, self.group, prefix, &mut found)?;
        self.refuse_while_installing()?;
        Ok(found.into_iter().collect())
    }

    /// Writes the group's state as of one point in time (a RocksDB
    /// snapshot: every write applied before it, none after) to a backup
    /// file at `path` ([`crate::backup`]); returns its header. Blocking:
    /// run it off the runtime. Refused while a snapshot install replaces
    /// the data. For a backup that holds every acknowledged write, make the
    /// read linearizable first (`Raft::ensure_linearizable`) on the leader.
    pub fn export<C: TypeConfig>(&self, path: &Path) -> Result<BackupHeader<C>, StorageError> {
        self.refuse_while_installing()?;
        let header = crate::backup::export(&self.db, self.group, path)?;
        // An install that began meanwhile does not touch the RocksDB
        // snapshot the file was written from: the file is of one state.
        Ok(header)
    }

    fn refuse_while_installing(&self) -> Result<(), RocksError> {
        match self.installing.load(Ordering::Acquire) {
            true => Err(RocksError::Installing {
                path: self.db.shared.path.clone(),
                group: self.group,
            }),
            false => Ok(()),
        }
    }
}

/// One key and its value.
type Pair = (Vec<u8>, Vec<u8>);

/// A snapshot's file name in the group's snapshot directory.
fn snapshot_name(id: u64) -> String {
    format!("{id}.snap")
}

/// Deletes what a crash or an abandoned transfer left in the snapshot
/// directory: half-written builds (`.tmp`), partly received snapshots
/// (`.partial`) and snapshot files that are not the current one (a build
/// or install that was renamed into place but not yet recorded, or the
/// previous one kept for a transfer: no transfer outlives a restart).
fn remove_stray_files(dir: &Path, current: Option<u64>) -> Result<(), StorageError> {
    remove_files_where(dir, |name| {
        name.ends_with(".tmp")
            || name.ends_with(".partial")
            || name.ends_with(".snap") && current.is_none_or(|id| name != snapshot_name(id))
    })
}

/// Deletes the files in `dir` whose names `stray` picks.
fn remove_files_where(dir: &Path, stray: impl Fn(&str) -> bool) -> Result<(), StorageError> {
    let entries = std::fs::read_dir(dir).map_err(io(format!("listing {}", dir.display())))?;
    for entry in entries {
        let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
        if stray(&entry.file_name().to_string_lossy()) {
            tracing::info!(file = %entry.path().display(), "removing stray snapshot file");
            match std::fs::remove_file(entry.path()) {
                // Gone meanwhile: an abandoned transfer's SST builder, still
                // winding down after its store was closed, deletes its own.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                r => r.map_err(io(format!("removing {}", entry.path().display())))?,
            }
        }
    }
    Ok(())
}

/// Renames `from` to `to` and syncs their directory, so that the rename
/// survives a crash before what refers to the new name is written.
fn rename_durably(from: &Path, to: &Path) -> Result<(), StorageError> {
    std::fs::rename(from, to).map_err(io(format!("renaming {}", from.display())))?;
    let dir = to.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))
}

/// Writes group `group`'s state as of now to `path` (through a temporary
/// file, synced, then renamed into place), telling `captured` as soon as
/// its point-in-time view is taken: writes after that are not in the file.
/// Returns the file's size. Blocking: run it off the runtime.
fn write_snapshot_file(
    db: &RocksDb,
    group: u64,
    path: &Path,
    captured: oneshot::Sender<()>,
) -> Result<u64, StorageError> {
    let tmp = path.with_extension("tmp");
    let snap = db.shared.db.snapshot();
    let _ = captured.send(());
    let file = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let mut w = BufWriter::new(SyncedAsWritten::new(file));
    write_pairs(db, &snap, group, &mut w, &tmp)?;
    let file = w
        .into_inner()
        .map_err(|e| io(format!("flushing {}", tmp.display()))(e.into_error()))?
        .file;
    file.sync_all()
        .map_err(io(format!("syncing {}", tmp.display())))?;
    let size = file
        .metadata()
        .map_err(io(format!("stat {}", tmp.display())))?
        .len();
    rename_durably(&tmp, path)?;
    Ok(size)
}

/// How much of a snapshot file may be written and not yet synced. A
/// node's WAL shares the disk with its snapshot files: one fsync of a
/// whole 312 MB file held the WAL's fsyncs (and every unsynced write
/// grouped behind them, on the node's runtime thread) for 20-160 ms in
/// `cargo xtask bench join`, long enough to miss heartbeats. Synced as it
/// is written, no sync has more than this to flush.
const SYNC_EVERY_BYTES: u64 = 8 << 20;

/// A file that syncs its data every [`SYNC_EVERY_BYTES`] written.
struct SyncedAsWritten {
    file: File,
    unsynced: u64,
}

impl SyncedAsWritten {
    fn new(file: File) -> Self {
        SyncedAsWritten { file, unsynced: 0 }
    }
}

impl Write for SyncedAsWritten {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// At most `max_len` bytes of the snapshot file at `path` from `offset`.
/// Blocking.
fn read_chunk(path: &Path, offset: u64, max_len: usize) -> Result<SnapshotChunk, StorageError> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let len = file
        .metadata()
        .map_err(io(format!("stat {}", path.display())))?
        .len();
    let start = offset.min(len);
    let n = (max_len as u64).min(len - start) as usize;
    let mut data = vec![0u8; n];
    file.read_exact_at(&mut data, start)
        .map_err(io(format!("reading {}", path.display())))?;
    Ok(SnapshotChunk {
        data,
        done: start + n as u64 == len,
    })
}

/// Writes a received chunk at `offset` of the partial file `path` in `dir`,
/// which must hold exactly `offset` bytes (offset 0 starts it over).
/// Blocking.
fn write_chunk(dir: &Path, path: &Path, offset: u64, data: &[u8]) -> Result<(), StorageError> {
    if offset == 0 {
        // A node receives one transfer at a time: one that starts
        // abandons any other (the leader changed mid-transfer), whose
        // file would otherwise stay until the next restart.
        remove_files_where(dir, |name| name.ends_with(".partial"))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(offset == 0)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    let len = file
        .metadata()
        .map_err(io(format!("stat {}", path.display())))?
        .len();
    if len != offset {
        return Err(StorageError::Corrupt {
            location: path.display().to_string(),
            detail: format!("chunk at {offset} but {len} bytes received"),
        });
    }
    file.write_all_at(data, offset)
        .map_err(io(format!("writing {}", path.display())))?;
    // The install syncs the whole file; synced in steps as it arrives,
    // that sync has little left to flush (see `SYNC_EVERY_BYTES`).
    let end = offset + data.len() as u64;
    if end / SYNC_EVERY_BYTES > offset / SYNC_EVERY_BYTES {
        file.sync_data()
            .map_err(io(format!("syncing {}", path.display())))?;
    }
    Ok(())
}

/// Read options for a scan of group `group`'s keys: its blocks are read
/// once, so they stay out of the block cache (which holds what reads and
/// applies use, and which the scan of a state larger than the cache would
/// empty); the bound stops the iterator at the group's end instead of the
/// next key after it (the last group has none: check the prefix too).
fn group_scan(group: u64) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    opts.fill_cache(false);
    if let Some(next) = group.checked_add(1) {
        opts.set_iterate_upper_bound(next.to_be_bytes());
    }
    opts
}

/// Writes group `group`'s data as `snap` sees it to `w` in the snapshot
/// file format, terminator included (`path` names `w` in errors).
pub(crate) fn write_pairs(
    db: &RocksDb,
    snap: &rocksdb::Snapshot<'_>,
    group: u64,
    w: &mut impl Write,
    path: &Path,
) -> Result<(), StorageError> {
    let cf = db.cf(CF_SM)?;
    let prefix = group.to_be_bytes();
    // The raw iterator lends each pair instead of copying it into two new
    // boxes per key, as the iterator adapter does.
    let mut it = snap.raw_iterator_cf_opt(cf, group_scan(group));
    it.seek(prefix);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if !k.starts_with(&prefix) {
            break;
        }
        // The error's context is built only on error: this runs per key.
        write_pair(w, &k[8..], v).map_err(|e| io(format!("writing {}", path.display()))(e))?;
        it.next();
    }
    it.status().map_err(|e| db.shared.db_err(e))?;
    w.write_all(&0u32.to_le_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

/// Snapshot file: a sequence of `(key, value)` records, each
/// `u32 LE length ++ codec((key, value))`, ending with a zero length.
/// Key and value go through serde as byte strings: the encoding is the
/// same as a sequence of `u8` (length, then the bytes), but it is one copy
/// instead of one serializer call per byte, which made decoding the
/// received snapshot a third of a learner's CPU during a transfer.
fn write_pair(w: &mut impl Write, key: &[u8], value: &[u8]) -> std::io::Result<()> {
    let pair = (serde_bytes::Bytes::new(key), serde_bytes::Bytes::new(value));
    let bytes = raft_core::codec::encode(&pair).map_err(std::io::Error::other)?;
    w.write_all(&(bytes.len() as u32).to_le_bytes())?;
    w.write_all(&bytes)
}

fn read_pair(r: &mut impl Read) -> Result<Option<Pair>, String> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .map_err(|e| format!("record length: {e}"))?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 {
        return Ok(None);
    }
    if len > 64 << 20 {
        return Err(format!("record of {len} bytes"));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf)
        .map_err(|e| format!("record body: {e}"))?;
    raft_core::codec::decode::<(serde_bytes::ByteBuf, serde_bytes::ByteBuf)>(&buf)
        .map(|(k, v)| Some((k.into_vec(), v.into_vec())))
        .map_err(|e| e.to_string())
}

#[async_trait]
impl<C, A> StateMachine<C> for RocksStateMachine<C, A>
where
    C: TypeConfig,
    A: KvApply<C>,
{
    async fn applied(&mut self) -> Result<LogId, StorageError> {
        Ok(self.applied)
    }

    async fn apply(&mut self, entries: Vec<Entry<C>>) -> Result<Vec<C::Response>, StorageError> {
        let Some(last) = entries.last().map(|e| e.log_id) else {
            return Ok(Vec::new());
        };
        let mut view = WriteView {
            db: &self.db,
            group: self.group,
            pending: BTreeMap::new(),
            error: None,
        };
        let mut membership = self.membership.clone();
        let mut responses = Vec::with_capacity(entries.len());
        for e in &entries {
            responses.push(match &e.payload {
                EntryPayload::Command(c) => self.app.apply_at(e.log_id, c, &mut view),
                EntryPayload::Membership(m) => {
                    membership = m.clone();
                    self.app.empty_response()
                }
                EntryPayload::Blank => self.app.empty_response(),
            });
        }
        if let Some(e) = view.error.take() {
            return Err(e.into());
        }
        let mut ops: Vec<Op> = view
            .pending
            .into_iter()
            .map(|(k, v)| {
                let key = data_key(self.group, &k);
                match v {
                    Some(value) => Op::Put {
                        cf: CF_SM,
                        key,
                        value,
                    },
                    None => Op::Delete { cf: CF_SM, key },
                }
            })
            .collect();
        ops.push(applied_op::<C>(self.group, last, &membership)?);
        // Not synced: the entries are durable in the log (their appends were
        // synced earlier in the same WAL), so a power loss can only take
        // back whole apply batches, which are then applied again from the
        // log. Data, applied id and membership stay one atomic batch.
        self.db.writer.write_unsynced(ops).await?;
        self.applied = last;
        self.membership = membership;
        Ok(responses)
    }

    async fn build_snapshot(&mut self) -> Result<SnapshotMeta<C>, StorageError> {
        let meta = self.begin_snapshot().await?.await?;
        self.snapshot_built(&meta).await?;
        Ok(meta)
    }

    /// Takes a RocksDB snapshot (a point-in-time view) and returns once it
    /// is taken; the scan of the whole group, the file and its fsync then
    /// go on under `spawn_blocking` while entries are applied. On a runtime
    /// worker that work held up the driver beside it, and a leader that
    /// sends no heartbeat for an election timeout is deposed (seen in
    /// `cargo xtask bench` at 256 clients); awaited in place it stopped
    /// applies for as long, the bench's slowest writes.
    async fn begin_snapshot(&mut self) -> Result<SnapshotBuild<C>, StorageError> {
        let id = self
            .snapshot
            .as_ref()
            .map(|s| s.id + 1)
            .unwrap_or(1)
            .max(self.applied.index.0);
        let mut meta = SnapshotMeta {
            last_log_id: self.applied,
            membership: self.membership.clone(),
            id,
            size: 0,
        };
        let path = self.snapshot_file(id);
        let (db, group) = (self.db.clone(), self.group);
        let (captured, view_taken) = oneshot::channel();
        let job =
            tokio::task::spawn_blocking(move || write_snapshot_file(&db, group, &path, captured));
        if view_taken.await.is_err() {
            // The job ended before taking its view: it failed, say why.
            joined(job.await)?;
            return Err(StorageError::Backend(
                "snapshot job ended without taking its view".into(),
            ));
        }
        Ok(Box::pin(async move {
            meta.size = joined(job.await)?;
            Ok(meta)
        }))
    }

    async fn snapshot_built(&mut self, meta: &SnapshotMeta<C>) -> Result<(), StorageError> {
        self.db
            .writer
            .write(vec![meta_op(self.group, TAG_SNAPSHOT, meta)?])
            .await?;
        let replaced = self.snapshot.replace(meta.clone()).map(|s| s.id);
        let freed = std::mem::replace(&mut self.previous, replaced.filter(|&id| id != meta.id));
        self.remove_snapshot_files(freed.filter(|&id| id != meta.id))
            .await;
        Ok(())
    }

    async fn current_snapshot(&mut self) -> Result<Option<SnapshotMeta<C>>, StorageError> {
        Ok(self.snapshot.clone())
    }

    /// File I/O on a blocking thread, as every other file operation here:
    /// on the runtime a chunk's disk wait held up the node's heartbeats.
    async fn read_snapshot_chunk(
        &mut self,
        snapshot_id: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Option<SnapshotChunk>, StorageError> {
        let current = self.snapshot.as_ref().map(|s| s.id);
        if current != Some(snapshot_id) && self.previous != Some(snapshot_id) {
            return Ok(None);
        }
        let path = self.snapshot_file(snapshot_id);
        let job = tokio::task::spawn_blocking(move || read_chunk(&path, offset, max_len));
        joined(job.await).map(Some)
    }

    async fn write_snapshot_chunk(
        &mut self,
        meta: &SnapshotMeta<C>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        let path = self.receive_file(meta.id);
        let dir = self.snapshot_dir.clone();
        let job = tokio::task::spawn_blocking(move || {
            write_chunk(&dir, &path, offset, &data).map(|()| data)
        });
        let data = joined(job.await)?;
        self.stream_chunk(meta.id, offset, data).await;
        Ok(())
    }

    /// Bounded memory, off the runtime, atomic by redo: see the module
    /// doc.
    async fn install_snapshot(&mut self, meta: &SnapshotMeta<C>) -> Result<(), StorageError> {
        let partial = self.receive_file(meta.id);
        let path = self.snapshot_file(meta.id);
        let synced = {
            let (partial, path) = (partial.clone(), path.clone());
            tokio::task::spawn_blocking(move || {
                File::open(&partial)
                    .and_then(|f| f.sync_all())
                    .map_err(io(format!("syncing {}", partial.display())))?;
                rename_durably(&partial, &path)
            })
        };
        joined(synced.await)?;
        // From here a crash finishes the install at the next open.
        self.installing.store(true, Ordering::Release);
        self.db
            .writer
            .write(vec![meta_op(self.group, TAG_INSTALLING, meta)?])
            .await?;
        let streamed = self.streamed_files(meta.id).await;
        let (db, group, m) = (self.db.clone(), self.group, meta.clone());
        let loaded = tokio::task::spawn_blocking(move || match streamed {
            Some(files) => install_files(&db, group, &m, &files.0),
            None => load_snapshot_file(&db, group, &path, &m),
        });
        joined(loaded.await)?;
        self.installing.store(false, Ordering::Release);
        let replaced = self.snapshot.replace(meta.clone()).map(|s| s.id);
        let old = [replaced, self.previous.take()];
        self.remove_snapshot_files(old.into_iter().flatten().filter(|&id| id != meta.id))
            .await;
        self.applied = meta.last_log_id;
        self.membership = meta.membership.clone();
        Ok(())
    }
}

/// Replaces group `group`'s data with the snapshot file at `path`, whose
/// meta is `meta`: writes the file's pairs into SST files beside it, then
/// one batch deletes the group's data, the SST files are ingested (moved
/// into the store, synced), and a synced last batch records the applied id
/// and the snapshot and removes the install marker. Idempotent, so a crash
/// anywhere is repaired by running it again (a later delete covers what an
/// earlier run ingested). Blocking: run it off the runtime.
fn load_snapshot_file<C: TypeConfig>(
    db: &RocksDb,
    group: u64,
    path: &Path,
    meta: &SnapshotMeta<C>,
) -> Result<(), StorageError> {
    let files = write_sst_files(db, group, path)?;
    install_files(db, group, meta, &files)
}

/// The rest of [`load_snapshot_file`] once the SST files are written.
fn install_files<C: TypeConfig>(
    db: &RocksDb,
    group: u64,
    meta: &SnapshotMeta<C>,
    files: &[PathBuf],
) -> Result<(), StorageError> {
    let ingested = ingest(db, group, files);
    // Ingestion moves the files into the store; what is left is a failed
    // run's (the next start removes them too, as `.tmp` files).
    for f in files {
        let _ = std::fs::remove_file(f);
    }
    ingested?;
    let last = [
        applied_op::<C>(group, meta.last_log_id, &meta.membership)?,
        meta_op(group, TAG_SNAPSHOT, meta)?,
        Op::Delete {
            cf: CF_META,
            key: codec::meta_key(group, TAG_INSTALLING),
        },
    ];
    Ok(db.writer.write_blocking(&last, true)?)
}

/// Deletes group `group`'s data and ingests `files` in its place.
///
/// A group with no keys (a new learner's) is not range-deleted: the
/// tombstone would overlap the files, so RocksDB would flush it and place
/// them in level 0, and then compact all of the state once more (in
/// `cargo xtask bench join`, 356,000 records just as the learner began
/// catching up). Without it they go straight to the bottom level.
fn ingest(db: &RocksDb, group: u64, files: &[PathBuf]) -> Result<(), StorageError> {
    if group_has_keys(db, group)? {
        let range = Op::DeleteRange {
            cf: CF_SM,
            from: group.to_be_bytes().to_vec(),
            to: (group + 1).to_be_bytes().to_vec(),
        };
        db.writer.write_blocking(&[range], false)?;
    }
    if files.is_empty() {
        return Ok(());
    }
    let mut opts = rocksdb::IngestExternalFileOptions::default();
    opts.set_move_files(true);
    let shared = &db.shared;
    shared
        .db
        .ingest_external_file_cf_opts(shared.cf(CF_SM)?, &opts, files.to_vec())
        .map_err(|e| shared.db_err(e).into())
}

/// Group `group` holds at least one live key.
fn group_has_keys(db: &RocksDb, group: u64) -> Result<bool, StorageError> {
    let prefix = group.to_be_bytes();
    let mut it = db
        .shared
        .db
        .raw_iterator_cf_opt(db.cf(CF_SM)?, group_scan(group));
    it.seek(prefix);
    let found = it.key().is_some_and(|k| k.starts_with(&prefix));
    it.status().map_err(|e| db.shared.db_err(e))?;
    Ok(found)
}

/// Writes the pairs of the snapshot file at `path` as group `group`'s keys
/// into SST files beside it, [`INSTALL_FILE_BYTES`] of data each, and
/// returns their paths (none for an empty snapshot).
fn write_sst_files(db: &RocksDb, group: u64, path: &Path) -> Result<Vec<PathBuf>, StorageError> {
    let file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
    let r = BufReader::with_capacity(1 << 20, file);
    let store = (db.path().to_path_buf(), db.shared.compression, group);
    sst_files_from(r, store, path)
}

/// Reads snapshot records from `r` up to the terminator and writes them
/// as group `group`'s keys into SST files named after `base`, of the
/// store at `db_path` (named in errors) with its compression.
fn sst_files_from(
    mut r: impl Read,
    (db_path, compression, group): (PathBuf, rocksdb::DBCompressionType, u64),
    base: &Path,
) -> Result<Vec<PathBuf>, StorageError> {
    let opts = sst_options(compression);
    let mut sink = SstSink::new(&db_path, group, base, &opts);
    while let Some((k, v)) = read_pair(&mut r).map_err(|e| sink.corrupt(e))? {
        sink.put(&k, &v)?;
    }
    sink.finish()
}

/// What an SST file written for ingestion is written with: the column
/// family's compression (and, as ever, its default comparator).
fn sst_options(compression: rocksdb::DBCompressionType) -> rocksdb::Options {
    let mut opts = rocksdb::Options::default();
    opts.set_compression_type(compression);
    opts
}

/// Group `group`'s pairs, given in key order, written into SST files named
/// `<base>.<n>.sst.tmp`, [`INSTALL_FILE_BYTES`] of data each.
struct SstSink<'a> {
    /// The store's directory, for errors.
    db_path: &'a Path,
    group: u64,
    base: &'a Path,
    opts: &'a rocksdb::Options,
    files: Vec<PathBuf>,
    /// The file being written and the bytes of data in it.
    writer: Option<(rocksdb::SstFileWriter<'a>, usize)>,
}

impl<'a> SstSink<'a> {
    fn new(db_path: &'a Path, group: u64, base: &'a Path, opts: &'a rocksdb::Options) -> Self {
        SstSink {
            db_path,
            group,
            base,
            opts,
            files: Vec::new(),
            writer: None,
        }
    }

    fn corrupt(&self, detail: String) -> StorageError {
        StorageError::Corrupt {
            location: self.base.display().to_string(),
            detail,
        }
    }

    fn db_err(&self, source: rocksdb::Error) -> StorageError {
        RocksError::Db {
            path: self.db_path.to_path_buf(),
            source,
        }
        .into()
    }

    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        let (w, bytes) = match &mut self.writer {
            Some(w) => w,
            None => {
                let sst = PathBuf::from(format!(
                    "{}.{}.sst.tmp",
                    self.base.display(),
                    self.files.len()
                ));
                let w = rocksdb::SstFileWriter::create(self.opts);
                if let Err(e) = w.open(&sst) {
                    return Err(self.db_err(e));
                }
                self.files.push(sst);
                self.writer.insert((w, 0))
            }
        };
        // Refused (out of order) only if the data is not what a store wrote.
        if let Err(e) = w.put(data_key(self.group, key), value) {
            return Err(self.corrupt(format!("record refused by the SST writer: {e}")));
        }
        *bytes += key.len() + value.len();
        if *bytes >= INSTALL_FILE_BYTES {
            self.finish_file()?;
        }
        Ok(())
    }

    fn finish_file(&mut self) -> Result<(), StorageError> {
        match self.writer.take() {
            Some((mut w, _)) => w.finish().map_err(|e| self.db_err(e)),
            None => Ok(()),
        }
    }

    /// The files written, all finished.
    fn finish(mut self) -> Result<Vec<PathBuf>, StorageError> {
        self.finish_file()?;
        Ok(std::mem::take(&mut self.files))
    }
}

impl Drop for SstSink<'_> {
    /// Files of a sink dropped unfinished (a failure, an abandoned
    /// transfer) are deleted.
    fn drop(&mut self) {
        self.writer = None;
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Builds the SST files of a snapshot from its bytes as they are received
/// (`chunks`, in order from offset 0), so that an install waits only for
/// the last chunk's records and the ingestion. Blocking: runs on a
/// blocking thread for the length of the transfer. Returns the files once
/// the snapshot's terminator is read; an error if the chunks stop before it
/// (the transfer was abandoned: its files are deleted) or do not parse.
/// It holds no handle on the store, so a store closed meanwhile (the node
/// shut down) is released at once.
fn sst_files_from_chunks(
    store: (PathBuf, rocksdb::DBCompressionType, u64),
    base: PathBuf,
    chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
) -> Result<SstFiles, StorageError> {
    let r = ChunkReader {
        chunks,
        chunk: Vec::new(),
        at: 0,
    };
    sst_files_from(r, store, &base).map(SstFiles)
}

/// The bytes of the chunks received on `chunks`, in order, as a reader;
/// it ends when the sender is dropped (a record cut short there is an
/// error to `read_pair`).
struct ChunkReader {
    chunks: tokio::sync::mpsc::Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    at: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.at == self.chunk.len() {
            match self.chunks.blocking_recv() {
                Some(chunk) => (self.chunk, self.at) = (chunk, 0),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.chunk.len() - self.at);
        out[..n].copy_from_slice(&self.chunk[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// A received snapshot's SST files being built as its chunks arrive.
struct Streamed {
    /// The snapshot, and the offset the next chunk must start at.
    id: u64,
    next: u64,
    /// Where the chunks go; `None` once the builder stopped taking them.
    chunks: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    built: tokio::task::JoinHandle<Result<SstFiles, StorageError>>,
}

/// SST files built for an install: deleted when dropped (those the install
/// ingested are gone by then; a transfer abandoned after its last chunk
/// leaves none).
struct SstFiles(Vec<PathBuf>);

impl Drop for SstFiles {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use raft_core::memory::{KvConfig, KvResponse};

    use super::*;
    use crate::{KEY_FORMAT, RocksOptions};

    #[test]
    fn a_file_synced_as_written_holds_what_was_written_and_syncs_in_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let mut w = SyncedAsWritten::new(File::create(&path).unwrap());
        let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        for _ in 0..9 {
            w.write_all(&block).unwrap();
        }
        // Synced at 8 MiB: only the ninth MiB waits for the final sync.
        assert_eq!(w.unsynced, 1 << 20);
        drop(w);
        let read = std::fs::read(&path).unwrap();
        assert_eq!(read.len(), 9 << 20);
        assert!(read.chunks(1 << 20).all(|c| c == block.as_slice()));
    }

    struct Ignore;
    impl KvApply<KvConfig> for Ignore {
        fn apply(&self, _: &raft_core::memory::KvCommand, _: &mut WriteView<'_>) -> KvResponse {
            KvResponse::None
        }
        fn empty_response(&self) -> KvResponse {
            KvResponse::None
        }
    }

    /// Snapshot files (and so transfers) written by earlier builds, whose
    /// records encoded key and value as sequences of `u8`, read the same,
    /// and records are written byte for byte as they were.
    #[test]
    fn snapshot_records_keep_the_encoding_of_u8_sequences() {
        let (key, value) = (b"k\x00\xff".to_vec(), vec![7u8; 300]);
        let old = raft_core::codec::encode(&(key.as_slice(), value.as_slice())).expect("encode");
        let mut new = Vec::new();
        write_pair(&mut new, &key, &value).expect("write");
        assert_eq!(new[..4], (old.len() as u32).to_le_bytes());
        assert_eq!(new[4..], old[..]);
        let mut file = (old.len() as u32).to_le_bytes().to_vec();
        file.extend_from_slice(&old);
        file.extend_from_slice(&0u32.to_le_bytes());
        let mut r = file.as_slice();
        assert_eq!(read_pair(&mut r), Ok(Some((key, value))));
        assert_eq!(read_pair(&mut r), Ok(None));
    }

    /// `Membership` as formats 1 to 3 wrote it.
    #[derive(Serialize)]
    struct V3Membership {
        configs: Vec<std::collections::BTreeSet<raft_core::NodeId>>,
        nodes: BTreeMap<raft_core::NodeId, String>,
    }

    impl From<&Membership<String>> for V3Membership {
        fn from(m: &Membership<String>) -> Self {
            V3Membership {
                configs: m.configs.clone(),
                nodes: m.nodes.clone(),
            }
        }
    }

    #[derive(Serialize)]
    struct V1Meta {
        last_log_id: LogId,
        membership: V3Membership,
        id: u64,
    }

    /// A store written by format 1 (snapshot meta without `size`) opens,
    /// its snapshot's size is taken from the file, and the store is marked
    /// format 2, which a format-1 build refuses instead of misreading.
    #[tokio::test]
    async fn a_format_1_store_opens_and_is_marked_format_2() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (db, mut sm) = open_sm(dir.path());
        let meta = snapshot_after_blank(&mut sm, LogId::new(1, 1)).await;
        assert!(meta.size > 0);
        let key = codec::meta_key(1, TAG_SNAPSHOT);
        let v1 = V1Meta {
            last_log_id: meta.last_log_id,
            membership: (&meta.membership).into(),
            id: meta.id,
        };
        let cf = db.cf(CF_META).expect("cf");
        let raw = &db.shared.db;
        raw.put_cf(cf, &key, codec::seal_record(&key, &v1).expect("seal"))
            .expect("put");
        raw.put_cf(cf, KEY_FORMAT, 1u32.to_le_bytes()).expect("put");
        drop((sm, db));

        let db = RocksDb::open(dir.path(), RocksOptions::default()).expect("reopen");
        let format = db.shared.db.get_cf(db.cf(CF_META).unwrap(), KEY_FORMAT);
        assert_eq!(
            format.expect("get").as_deref(),
            Some(&crate::FORMAT_VERSION.to_le_bytes()[..])
        );
        let mut sm: Sm = RocksStateMachine::open(&db, 1, Ignore).expect("sm");
        assert_eq!(sm.current_snapshot().await.expect("meta"), Some(meta));
    }

    /// A store written by format 3 (before node identities): its hard
    /// state, log entries (a membership among them), applied record and
    /// snapshot meta read back as they were written, with no identity
    /// recorded, and the store is marked format 4.
    #[tokio::test]
    async fn a_format_3_store_reads_back_without_identities() {
        use raft_core::{HardState, LogIndex, LogStore, NodeId, Term};
        #[derive(Serialize)]
        struct V3HardState {
            term: Term,
            voted_for: Option<NodeId>,
        }
        #[derive(Serialize)]
        enum V3Payload {
            #[allow(dead_code)]
            Blank,
            Command(raft_core::memory::KvCommand),
            Membership(V3Membership),
        }
        #[derive(Serialize)]
        struct V3Entry {
            log_id: LogId,
            payload: V3Payload,
        }
        #[derive(Serialize)]
        struct V3Applied {
            log_id: LogId,
            membership: V3Membership,
        }
        #[derive(Serialize)]
        struct V3Meta {
            last_log_id: LogId,
            membership: V3Membership,
            id: u64,
            size: u64,
        }

        let dir = tempfile::tempdir().expect("tempdir");
        let (db, mut sm) = open_sm(dir.path());
        let meta = snapshot_after_blank(&mut sm, LogId::new(1, 1)).await;
        let members: BTreeMap<NodeId, String> =
            (1..=3).map(|i| (NodeId(i), format!("n{i}"))).collect();
        let membership = Membership::new_voters(members);
        let command = raft_core::memory::KvCommand::Put {
            key: "k".into(),
            value: "v".into(),
        };
        let mut ops = Vec::new();
        fn record(ops: &mut Vec<Op>, cf: &'static str, key: Vec<u8>, value: &impl Serialize) {
            let value = codec::seal_record(&key, value).expect("seal");
            ops.push(Op::Put { cf, key, value });
        }
        let hard_state = V3HardState {
            term: Term(5),
            voted_for: Some(NodeId(2)),
        };
        record(
            &mut ops,
            crate::CF_HARD_STATE,
            codec::meta_key(1, codec::TAG_HARD_STATE),
            &hard_state,
        );
        let entries = [
            V3Entry {
                log_id: LogId::new(1, 1),
                payload: V3Payload::Membership((&membership).into()),
            },
            V3Entry {
                log_id: LogId::new(1, 2),
                payload: V3Payload::Command(command.clone()),
            },
        ];
        for e in &entries {
            record(
                &mut ops,
                crate::CF_LOG,
                codec::log_key(1, e.log_id.index.0),
                e,
            );
        }
        let applied = V3Applied {
            log_id: LogId::new(1, 2),
            membership: (&membership).into(),
        };
        record(&mut ops, CF_META, codec::meta_key(1, TAG_APPLIED), &applied);
        let old_meta = V3Meta {
            last_log_id: meta.last_log_id,
            membership: (&membership).into(),
            id: meta.id,
            size: meta.size,
        };
        record(
            &mut ops,
            CF_META,
            codec::meta_key(1, TAG_SNAPSHOT),
            &old_meta,
        );
        db.writer.write_blocking(&ops, true).expect("write");
        let cf = db.cf(CF_META).expect("cf");
        db.shared
            .db
            .put_cf(cf, KEY_FORMAT, 3u32.to_le_bytes())
            .expect("put");
        drop((sm, db));

        let db = RocksDb::open(dir.path(), RocksOptions::default()).expect("reopen");
        let format = db.shared.db.get_cf(db.cf(CF_META).unwrap(), KEY_FORMAT);
        assert_eq!(
            format.expect("get").as_deref(),
            Some(&4u32.to_le_bytes()[..])
        );
        let mut log = db.log_store::<KvConfig>(1).expect("log");
        assert_eq!(
            log.load_hard_state().await.expect("hard state"),
            HardState {
                term: Term(5),
                voted_for: Some(NodeId(2)),
                uuid: raft_core::NodeUuid::NONE,
            }
        );
        let read = log.read(LogIndex(1), LogIndex(2)).await.expect("read");
        assert_eq!(
            read[0].payload,
            EntryPayload::Membership(membership.clone())
        );
        assert_eq!(read[1].payload, EntryPayload::command(command));
        let mut sm: Sm = RocksStateMachine::open(&db, 1, Ignore).expect("sm");
        assert_eq!(sm.applied().await.expect("applied"), LogId::new(1, 2));
        let snapshot = sm
            .current_snapshot()
            .await
            .expect("meta")
            .expect("a snapshot");
        assert_eq!(snapshot.membership, membership);
        assert!(snapshot.membership.uuids.is_empty());
        assert_eq!((snapshot.id, snapshot.size), (meta.id, meta.size));
    }

    /// `scan_prefix` sees the stored keys with this batch's writes laid
    /// over them, and the session sweep built on it removes exactly the
    /// expired sessions, stored or staged.
    #[tokio::test]
    async fn a_batch_scans_stored_keys_under_its_own_writes_and_sweeps_idle_sessions() {
        use raft_core::session::{self, Admission, SessionLimits, SessionTag};

        use crate::RocksSessions;

        let dir = tempfile::tempdir().expect("tempdir");
        let db = RocksDb::open(dir.path(), RocksOptions::default()).expect("open");
        let stored = ["p/a", "p/b", "p/c", "q/a"].map(|k| Op::Put {
            cf: CF_SM,
            key: data_key(7, k.as_bytes()),
            value: k.as_bytes().to_vec(),
        });
        db.writer.write(stored.into()).await.expect("write");
        let mut view = WriteView {
            db: &db,
            group: 7,
            pending: BTreeMap::new(),
            error: None,
        };
        view.delete(b"p/b");
        view.put(b"p/a", b"new");
        view.put(b"p/d", b"staged");
        view.put(b"q/b", b"other prefix");
        let seen: Vec<(String, String)> = view
            .scan_prefix(b"p/")
            .into_iter()
            .map(|(k, v)| (String::from_utf8(k).unwrap(), String::from_utf8(v).unwrap()))
            .collect();
        let want = [("p/a", "new"), ("p/c", "p/c"), ("p/d", "staged")]
            .map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(seen, want);

        let limits = SessionLimits {
            idle_timeout_ms: 60_000,
            max_pending: 8,
        };
        let tag = |client_id| SessionTag {
            client_id,
            seq: 1,
            ack: 1,
        };
        let mut sessions = RocksSessions::new(&mut view);
        session::register::<KvResponse>(&mut sessions, 10, 1_000, limits);
        session::register::<KvResponse>(&mut sessions, 11, 50_000, limits);
        // Session 11 is used later; 10 idles past its timeout, and the next
        // command's sweep removes it.
        assert_eq!(
            session::admit::<KvResponse>(&mut sessions, &tag(11), 70_000),
            Admission::Apply
        );
        session::register::<KvResponse>(&mut sessions, 12, 120_000, limits);
        assert_eq!(
            session::admit::<KvResponse>(&mut sessions, &tag(10), 120_000),
            Admission::Refuse(session::SessionError::Unknown(10))
        );
        assert_eq!(
            view.scan_prefix(b"\xFFraft-session/s/").len(),
            2,
            "sessions 11 and 12 remain"
        );
        assert!(view.error.is_none());
    }

    type Sm = RocksStateMachine<KvConfig, Ignore>;

    fn open_sm(dir: &Path) -> (RocksDb, Sm) {
        let db = RocksDb::open(dir, RocksOptions::default()).expect("open");
        let sm = RocksStateMachine::open(&db, 1, Ignore).expect("sm");
        (db, sm)
    }

    /// Applies a blank entry at `at`, then builds a snapshot of what the
    /// state machine holds.
    async fn snapshot_after_blank(sm: &mut Sm, at: LogId) -> SnapshotMeta<KvConfig> {
        sm.apply(vec![Entry {
            log_id: at,
            payload: EntryPayload::Blank,
        }])
        .await
        .expect("apply");
        sm.build_snapshot().await.expect("build")
    }

    fn put(key: &str, value: Vec<u8>) -> Op {
        Op::Put {
            cf: CF_SM,
            key: data_key(1, key.as_bytes()),
            value,
        }
    }

    /// Streams `meta` from `from` into `to`'s receive file, 1 MiB at a time.
    async fn stream(from: &mut Sm, to: &mut Sm, meta: &SnapshotMeta<KvConfig>) {
        let mut offset = 0;
        loop {
            let c = from
                .read_snapshot_chunk(meta.id, offset, 1 << 20)
                .await
                .expect("read")
                .expect("readable");
            let n = c.data.len() as u64;
            to.write_snapshot_chunk(meta, offset, c.data)
                .await
                .expect("write");
            offset += n;
            if c.done {
                return;
            }
        }
    }

    /// A state machine in `dir` holding keys `k0`.. `k{n-1}`, each `len`
    /// bytes of its number, and a snapshot of it at 1-7.
    async fn holding(dir: &Path, n: usize, len: usize) -> (RocksDb, Sm, SnapshotMeta<KvConfig>) {
        let (db, mut sm) = open_sm(dir);
        let ops: Vec<Op> = (0..n)
            .map(|i| put(&format!("k{i}"), vec![i as u8; len]))
            .collect();
        db.writer.write_blocking(&ops, false).expect("data");
        let meta = snapshot_after_blank(&mut sm, LogId::new(1, 7)).await;
        (db, sm, meta)
    }

    /// A store of 600 keys of 20 KiB (three install files' worth) and
    /// its snapshot at index 7, and a follower store holding one old key,
    /// with the snapshot received but not installed.
    async fn received_large_snapshot(
        leader: &Path,
        follower: &Path,
    ) -> (Sm, SnapshotMeta<KvConfig>) {
        let (_db, mut a, meta) = holding(leader, 600, 20 << 10).await;
        assert!(
            meta.size > 2 * INSTALL_FILE_BYTES as u64,
            "three files or more"
        );
        let (db_b, mut b) = open_sm(follower);
        db_b.writer
            .write_blocking(&[put("old", b"state".to_vec())], true)
            .expect("old");
        stream(&mut a, &mut b, &meta).await;
        (b, meta)
    }

    /// The SST files in `sm`'s snapshot directory.
    fn sst_files_left(sm: &Sm) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(&sm.snapshot_dir)
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .filter(|n| n.to_string_lossy().contains(".sst"))
            .collect()
    }

    /// An install uses the SST files built while the chunks arrived: the
    /// received file is zeroed after the last chunk (a file read would find
    /// an empty snapshot), and the install still holds the snapshot.
    #[tokio::test]
    async fn an_install_ingests_what_was_built_while_receiving() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut sm, meta) = received_large_snapshot(a.path(), b.path()).await;
        let partial = sm.receive_file(meta.id);
        std::fs::write(&partial, vec![0u8; meta.size as usize]).expect("zero");
        sm.install_snapshot(&meta).await.expect("install");
        holds_the_snapshot(&sm);
        assert!(sst_files_left(&sm).is_empty(), "{:?}", sst_files_left(&sm));
    }

    /// A transfer that starts over at offset 0 halfway abandons the files
    /// built so far (deleted) and builds them again from the new chunks.
    #[tokio::test]
    async fn a_transfer_that_starts_over_builds_its_files_again() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_db, mut leader, meta) = holding(a.path(), 600, 20 << 10).await;
        let (_db_b, mut sm) = open_sm(b.path());
        for offset in (0..6).map(|i| i << 20) {
            let c = leader
                .read_snapshot_chunk(meta.id, offset, 1 << 20)
                .await
                .expect("read")
                .expect("readable");
            sm.write_snapshot_chunk(&meta, offset, c.data)
                .await
                .expect("write");
        }
        stream(&mut leader, &mut sm, &meta).await;
        sm.install_snapshot(&meta).await.expect("install");
        holds_the_snapshot(&sm);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sst_files_left(&sm).is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the abandoned transfer's files stay: {:?}",
                sst_files_left(&sm)
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// A node with no state (a new learner) takes the files in at the
    /// bottom level: with a range delete before them, they land in level 0
    /// over its tombstone, and RocksDB compacts the whole state once more.
    #[tokio::test]
    async fn a_new_learner_ingests_below_level_0() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (_db, mut leader, meta) = holding(a.path(), 50, 1 << 10).await;
        let (db_b, mut sm) = open_sm(b.path());
        stream(&mut leader, &mut sm, &meta).await;
        sm.install_snapshot(&meta).await.expect("install");
        for i in [0, 49] {
            let v = sm.get(format!("k{i}").as_bytes()).expect("get");
            assert_eq!(v, Some(vec![i as u8; 1 << 10]), "k{i}");
        }
        let shared = &db_b.shared;
        let cf = shared.cf(CF_SM).expect("cf");
        let level0 = shared
            .db
            .property_int_value_cf(cf, "rocksdb.num-files-at-level0")
            .expect("property");
        assert_eq!(level0, Some(0), "files in level 0");
    }

    fn holds_the_snapshot(sm: &Sm) {
        assert_eq!(sm.get(b"old").expect("get"), None, "the old state is gone");
        for i in [0, 299, 599] {
            let v = sm.get(format!("k{i}").as_bytes()).expect("get");
            assert_eq!(v, Some(vec![i as u8; 20 << 10]), "k{i}");
        }
    }

    #[tokio::test]
    async fn a_snapshot_larger_than_an_install_file_installs_whole() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut sm, meta) = received_large_snapshot(a.path(), b.path()).await;
        sm.install_snapshot(&meta).await.expect("install");
        holds_the_snapshot(&sm);
        assert_eq!(sm.applied().await.expect("applied"), meta.last_log_id);
        drop(sm);
        let (_, mut sm) = open_sm(b.path());
        holds_the_snapshot(&sm);
        assert_eq!(sm.current_snapshot().await.expect("meta"), Some(meta));
    }

    /// The install of `received_large_snapshot` up to its marker, as
    /// `install_snapshot` does it; the SST files built while receiving are
    /// dropped (deleted), as a crash loses them (the open removes what a
    /// crash leaves).
    async fn begin_install(sm: &mut Sm, meta: &SnapshotMeta<KvConfig>) {
        drop(sm.streamed_files(meta.id).await);
        rename_durably(&sm.receive_file(meta.id), &sm.snapshot_file(meta.id)).expect("rename");
        let marker = meta_op(1, TAG_INSTALLING, meta).expect("marker");
        sm.db
            .writer
            .write_blocking(&[marker], true)
            .expect("marker");
    }

    /// Opens the store in `dir` after a crash during the install of `meta`
    /// and checks that the install was finished: the snapshot's data and
    /// nothing else, its applied id, no marker, no SST file left behind.
    async fn finished_at_open(dir: &Path, meta: SnapshotMeta<KvConfig>) {
        let (db, mut sm) = open_sm(dir);
        holds_the_snapshot(&sm);
        assert_eq!(sm.applied().await.expect("applied"), meta.last_log_id);
        assert_eq!(sm.current_snapshot().await.expect("meta"), Some(meta));
        let marker: Option<SnapshotMeta<KvConfig>> =
            db.meta_get(1, TAG_INSTALLING).expect("marker");
        assert!(marker.is_none(), "the finished install left its marker");
        let left = sst_files_left(&sm);
        assert!(left.is_empty(), "SST files left: {left:?}");
    }

    /// A crash after the install marker, with the old data deleted and one
    /// key of the new written: opening finishes the install from the file.
    #[tokio::test]
    async fn an_install_a_crash_interrupted_is_finished_at_open() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut sm, meta) = received_large_snapshot(a.path(), b.path()).await;
        begin_install(&mut sm, &meta).await;
        let first = [
            Op::DeleteRange {
                cf: CF_SM,
                from: 1u64.to_be_bytes().to_vec(),
                to: 2u64.to_be_bytes().to_vec(),
            },
            put("k0", vec![0; 20 << 10]),
        ];
        sm.db.writer.write_blocking(&first, false).expect("batch");
        drop(sm);
        finished_at_open(b.path(), meta).await;
    }

    /// A crash after the SST files were written and one of them ingested,
    /// before the last batch: the next run deletes and ingests again, and
    /// the half-done run's files do not outlive the open.
    #[tokio::test]
    async fn an_install_a_crash_interrupted_after_ingesting_is_finished_at_open() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (mut sm, meta) = received_large_snapshot(a.path(), b.path()).await;
        begin_install(&mut sm, &meta).await;
        let files = write_sst_files(&sm.db, 1, &sm.snapshot_file(meta.id)).expect("sst");
        assert!(files.len() >= 3, "three files or more: {files:?}");
        ingest(&sm.db, 1, &files[..1]).expect("ingest");
        drop(sm);
        finished_at_open(b.path(), meta).await;
    }

    #[tokio::test]
    async fn reads_during_an_install_are_refused_not_half_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (_db, sm) = open_sm(dir.path());
        let reader = sm.reader();
        assert!(reader.get(b"k").expect("get").is_none());
        sm.installing.store(true, Ordering::Release);
        assert!(matches!(
            reader.get(b"k"),
            Err(RocksError::Installing { group: 1, .. })
        ));
    }
}
