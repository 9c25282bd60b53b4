//! Backups: one group's state machine as one self-checking file, for
//! seeding a new cluster (`RocksReader::export`, `RocksStateMachine::restore`).
//!
//! Format: the magic `RAFTBKP1`, a `u32 LE` length and the workspace-codec
//! encoding of the last applied log id and the membership as of it, the
//! data in the snapshot file format (length-prefixed pairs ending with a
//! zero length), then a `u32 LE` CRC-32 of everything before it. The data
//! section is a snapshot file as it is, so a restore installs it through
//! the snapshot install path (bounded memory, redo-logged).

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use raft_core::{LogId, Membership, StorageError, TypeConfig};
use serde::{Deserialize, Serialize};

use crate::codec;
use crate::state_machine::{Applied, TAG_APPLIED, io, write_pairs};
use crate::{CF_META, RocksDb, RocksError};

const MAGIC: &[u8; 8] = b"RAFTBKP1";
/// The largest header accepted (the membership of a few thousand members).
const MAX_HEADER: usize = 16 << 20;

/// What a backup says about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct BackupHeader<C: TypeConfig> {
    /// The last entry applied to the state it holds.
    pub last_log_id: LogId,
    /// The membership of the cluster it was taken from, as of that entry.
    pub membership: Membership<C::Node>,
}

/// A writer that keeps a CRC-32 of what passes through.
struct Crc<W> {
    inner: W,
    crc: crc32fast::Hasher,
}

impl<W: Write> Write for Crc<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes group `group`'s data as of one point in time to `path` (a
/// temporary file, synced, then renamed); returns its header. Blocking.
pub(crate) fn export<C: TypeConfig>(
    db: &RocksDb,
    group: u64,
    path: &Path,
) -> Result<BackupHeader<C>, StorageError> {
    let snap = db.shared.db.snapshot();
    let key = codec::meta_key(group, TAG_APPLIED);
    let applied: Option<Applied<C>> = snap
        .get_cf(db.cf(CF_META)?, &key)
        .map_err(|e| db.shared.db_err(e))?
        .map(|v| codec::open_record(&key, &v))
        .transpose()
        .map_err(|detail| RocksError::CorruptMeta {
            path: db.shared.path.clone(),
            detail: format!("applied state: {detail}"),
        })?;
    let header = BackupHeader::<C> {
        last_log_id: applied.as_ref().map_or(LogId::ZERO, |a| a.log_id),
        membership: applied.map(|a| a.membership).unwrap_or_default(),
    };
    let encoded = raft_core::codec::encode(&header).map_err(|e| StorageError::Corrupt {
        location: "backup header".into(),
        detail: e.to_string(),
    })?;
    let tmp = path.with_extension("tmp");
    let writing = |e| io(format!("writing {}", tmp.display()))(e);
    let file = File::create(&tmp).map_err(io(format!("creating {}", tmp.display())))?;
    let mut w = Crc {
        inner: BufWriter::new(file),
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(MAGIC).map_err(writing)?;
    w.write_all(&(encoded.len() as u32).to_le_bytes())
        .map_err(writing)?;
    w.write_all(&encoded).map_err(writing)?;
    write_pairs(db, &snap, group, &mut w, &tmp)?;
    let crc = w.crc.finalize();
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes()).map_err(writing)?;
    let file = inner
        .into_inner()
        .map_err(|e| io(format!("flushing {}", tmp.display()))(e.into_error()))?;
    file.sync_all()
        .map_err(io(format!("syncing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(io(format!("renaming {}", tmp.display())))?;
    Ok(header)
}

/// Checks the backup at `path` whole (magic, header, checksum) and copies
/// its data section to `data` (a snapshot file); returns its header and
/// the data's size. Blocking.
pub(crate) fn unpack<C: TypeConfig>(
    path: &Path,
    data: &Path,
) -> Result<(BackupHeader<C>, u64), StorageError> {
    let corrupt = |detail: String| StorageError::Corrupt {
        location: path.display().to_string(),
        detail,
    };
    let open = || -> Result<(BufReader<File>, u64), StorageError> {
        let f = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let len = f
            .metadata()
            .map_err(io(format!("stat {}", path.display())))?
            .len();
        Ok((BufReader::new(f), len))
    };
    let (mut r, len) = open()?;
    if len < (MAGIC.len() + 4 + 4 + 4) as u64 {
        return Err(corrupt(format!("{len} bytes is too short for a backup")));
    }
    let body = len - 4;
    // First pass: the checksum, before anything is believed.
    let mut crc = crc32fast::Hasher::new();
    let mut left = body;
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..n])
            .map_err(io(format!("reading {}", path.display())))?;
        crc.update(&buf[..n]);
        left -= n as u64;
    }
    let mut trailer = [0u8; 4];
    r.read_exact(&mut trailer)
        .map_err(io(format!("reading {}", path.display())))?;
    if crc.finalize() != u32::from_le_bytes(trailer) {
        return Err(corrupt(
            "checksum mismatch: the file is damaged or truncated".into(),
        ));
    }
    // Second pass: header, then the data section copied out.
    let (mut r, _) = open()?;
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(io(format!("reading {}", path.display())))?;
    if &magic != MAGIC {
        return Err(corrupt("not a raft backup (bad magic)".into()));
    }
    let mut n = [0u8; 4];
    r.read_exact(&mut n)
        .map_err(io(format!("reading {}", path.display())))?;
    let n = u32::from_le_bytes(n) as usize;
    if n > MAX_HEADER || (MAGIC.len() + 4 + n) as u64 > body {
        return Err(corrupt(format!("header of {n} bytes")));
    }
    let mut header = vec![0u8; n];
    r.read_exact(&mut header)
        .map_err(io(format!("reading {}", path.display())))?;
    let header: BackupHeader<C> =
        raft_core::codec::decode(&header).map_err(|e| corrupt(format!("header: {e}")))?;
    let size = body - (MAGIC.len() + 4 + n) as u64;
    let out = File::create(data).map_err(io(format!("creating {}", data.display())))?;
    let mut w = BufWriter::new(out);
    let copied = std::io::copy(&mut (&mut r).take(size), &mut w)
        .map_err(io(format!("writing {}", data.display())))?;
    if copied != size {
        return Err(corrupt(format!(
            "data section ends after {copied} of {size} bytes"
        )));
    }
    w.into_inner()
        .map_err(|e| io(format!("flushing {}", data.display()))(e.into_error()))?
        .sync_all()
        .map_err(io(format!("syncing {}", data.display())))?;
    Ok((header, size))
}
