//! Opening past a WAL tail that a power loss left with a hole.
//!
//! Apply batches are written without a sync (the entries they apply are
//! already durable in the log), so the WAL's tail holds several unsynced
//! batches at any time. A power loss may write that tail's pages out of
//! order: a later batch reaches the disk, an earlier one does not, and the
//! WAL has a hole followed by whole records. RocksDB's strict mode (the one
//! [`crate::RocksDb::open`] uses first) refuses such a WAL, and the node
//! would never start again; point-in-time mode opens it at the last whole
//! record before the hole, which is right for a torn unsynced tail but
//! would also silently drop synced, acknowledged records if the damage lay
//! in them (a disk fault).
//!
//! To tell the two apart, every batch carries two counters in the `meta`
//! column family (the writer thread maintains them):
//! - [`KEY_SYNCED`]: in each synced group the writer commits, its ordinal
//!   `n` (1, 2, …). The writer is one thread, so the values grow in WAL
//!   order and the last whole one is the newest synced group recovered.
//! - [`KEY_ACKED`]: in every batch, how many synced groups had been
//!   acknowledged (their sync returned) when it was written. A synced group
//!   is written only after the previous one returned, so group `n` carries
//!   `n - 1`.
//!
//! When the strict open finds damage, the WAL is replayed twice, read-only:
//! once skipping damaged records (every whole record, also those past the
//! hole) and once point-in-time (up to the hole). The point-in-time open is
//! taken only if
//! 1. whole records follow the damage (so it is a hole, not the last write
//!    torn or damaged: those stay refused, as in strict mode), and
//! 2. no whole record past the hole says that more synced groups were
//!    acknowledged than the point-in-time replay holds, i.e. nothing the
//!    hole swallowed had been acknowledged as durable.
//!
//! Otherwise the strict open's error is returned. A power loss cannot put
//! a hole in synced bytes, so the check is there for disk faults, and what
//! it cannot see is one: a synced group damaged after its sync returned
//! when no whole batch written after that return survived, or when a later
//! whole batch carries a lower count (the skipping replay reads the last
//! batch's count; a batch written in place can carry a count read a little
//! before the writer thread raised it).

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, DBRecoveryMode, Options};

use crate::{CF_META, COLUMN_FAMILIES, RocksError};

/// `meta` key: the ordinal of the synced group that wrote it.
pub(crate) const KEY_SYNCED: &[u8] = b"synced";
/// `meta` key: how many synced groups were acknowledged when it was written.
pub(crate) const KEY_ACKED: &[u8] = b"acked";

/// The value of counter `key` in `db`'s `meta` column family (0 if unset
/// or unreadable: a counter only ever makes recovery more cautious).
pub(crate) fn counter(db: &DB, key: &[u8]) -> u64 {
    db.cf_handle(CF_META)
        .and_then(|cf| db.get_cf(cf, key).ok().flatten())
        .and_then(|v| Some(u64::from_le_bytes(v.as_slice().try_into().ok()?)))
        .unwrap_or(0)
}

/// Every column family, each opened with `opts`: the strict open and the
/// replays below open the same set the same way.
pub(crate) fn descriptors(opts: &Options) -> Vec<ColumnFamilyDescriptor> {
    COLUMN_FAMILIES
        .iter()
        .map(|n| ColumnFamilyDescriptor::new(*n, opts.clone()))
        .collect()
}

/// What one read-only replay in `mode` recovered.
struct Replay {
    last_sequence: u64,
    synced: u64,
    acked: u64,
}

fn replay(opts: &Options, path: &Path, mode: DBRecoveryMode) -> Result<Replay, rocksdb::Error> {
    let mut opts = opts.clone();
    opts.set_wal_recovery_mode(mode);
    let db = DB::open_cf_descriptors_read_only(&opts, path, descriptors(&opts), false)?;
    Ok(Replay {
        last_sequence: db.latest_sequence_number(),
        synced: counter(&db, KEY_SYNCED),
        acked: counter(&db, KEY_ACKED),
    })
}

/// Opens the store at `path` point-in-time if the damage the strict open
/// reported (`strict`) is a hole in the WAL's unacknowledged tail (see the
/// module doc); otherwise returns `strict`.
pub(crate) fn open_past_torn_tail(
    opts: &Options,
    path: &Path,
    strict: rocksdb::Error,
) -> Result<DB, RocksError> {
    let refuse = |why: &str| {
        tracing::error!(path = %path.display(), error = %strict, "WAL damaged: {why}; not opening");
        Err(RocksError::Db {
            path: path.to_path_buf(),
            source: strict.clone(),
        })
    };
    // One replay at a time: each holds the WAL's contents in memtables.
    let (Ok(all), Ok(prefix)) = (
        replay(opts, path, DBRecoveryMode::SkipAnyCorruptedRecord),
        replay(opts, path, DBRecoveryMode::PointInTime),
    ) else {
        return refuse("it cannot be replayed even in part");
    };
    if all.last_sequence <= prefix.last_sequence {
        return refuse("no whole record follows the damage, so it may be the last synced write");
    }
    if all.acked > prefix.synced {
        return refuse(&format!(
            "records past it were written after synced group {} was acknowledged, \
             but only {} survive before it",
            all.acked, prefix.synced
        ));
    }
    let mut opts = opts.clone();
    opts.set_wal_recovery_mode(DBRecoveryMode::PointInTime);
    let db = DB::open_cf_descriptors(&opts, path, descriptors(&opts)).map_err(|source| {
        RocksError::Db {
            path: path.to_path_buf(),
            source,
        }
    })?;
    tracing::warn!(
        path = %path.display(),
        error = %strict,
        kept_through = prefix.last_sequence,
        dropped_through = all.last_sequence,
        "WAL had a hole in its unsynced tail (a power loss); opened at the last whole write \
         before it: only unacknowledged writes were dropped"
    );
    Ok(db)
}
