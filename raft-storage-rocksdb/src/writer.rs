//! The group-commit writer: one thread applies every waiting mutation in one
//! `WriteBatch` with one synced WAL write, then answers all of their callers.
//! Unsynced writes are done in place by their caller unless RocksDB would
//! delay them ([`Writer::write_unsynced`]).

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rocksdb::{WriteBatch, WriteOptions};
use tokio::sync::oneshot;

use crate::recovery::{KEY_ACKED, KEY_SYNCED};
use crate::{CF_META, RocksError, Shared};

/// One mutation of a batch.
pub enum Op {
    Put {
        cf: &'static str,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Delete {
        cf: &'static str,
        key: Vec<u8>,
    },
    DeleteRange {
        cf: &'static str,
        from: Vec<u8>,
        to: Vec<u8>,
    },
}

struct Request {
    ops: Vec<Op>,
    /// Whether the caller needs the write durable before the reply.
    sync: bool,
    reply: oneshot::Sender<Result<(), RocksError>>,
}

/// Most requests folded into one batch.
const MAX_GROUP: usize = 4096;

/// An in-place unsynced write that takes this long is reported: it held up
/// the caller's runtime thread (a node's driver, where the node runs one
/// worker thread) for close to half of the default 50 ms heartbeat interval.
const SLOW_IN_PLACE: Duration = Duration::from_millis(20);

/// At most one report of slow in-place writes per this interval.
const SLOW_REPORT_EVERY: Duration = Duration::from_secs(1);

struct Inner {
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    slow: Mutex<SlowWrites>,
}

/// Counts slow in-place writes so that a disk slow for minutes costs one
/// log line a second, not one per write.
#[derive(Default)]
struct SlowWrites {
    last_report: Option<Instant>,
    count: u64,
    worst: Duration,
}

impl SlowWrites {
    /// Records a write that took `took` at `now`; answers the count and the
    /// worst since the last report when one is due. The first slow write is
    /// reported at once; ones within a second of a report are counted into
    /// the next, which the next slow write after that second makes.
    fn record(&mut self, took: Duration, now: Instant) -> Option<(u64, Duration)> {
        self.count += 1;
        self.worst = self.worst.max(took);
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < SLOW_REPORT_EVERY)
        {
            return None;
        }
        self.last_report = Some(now);
        let report = (self.count, self.worst);
        (self.count, self.worst) = (0, Duration::ZERO);
        Some(report)
    }
}

/// Handle to the writer thread; the thread stops (and the database closes)
/// when the last handle is dropped.
#[derive(Clone)]
pub struct Writer {
    inner: Arc<Inner>,
    shared: Arc<Shared>,
}

impl Writer {
    pub fn start(shared: Arc<Shared>) -> Writer {
        let (tx, rx) = mpsc::channel::<Request>();
        let thread = std::thread::Builder::new()
            .name("rocks-writer".into())
            .spawn({
                let shared = shared.clone();
                move || run(shared, rx)
            })
            .ok();
        Writer {
            shared,
            inner: Arc::new(Inner {
                tx: Mutex::new(Some(tx)),
                thread: Mutex::new(thread),
                slow: Mutex::new(SlowWrites::default()),
            }),
        }
    }

    /// Applies `ops` atomically; durable (if sync is on) when it returns.
    pub async fn write(&self, ops: Vec<Op>) -> Result<(), RocksError> {
        self.submit(ops, true).await
    }

    /// Applies `ops` atomically without waiting for the WAL to reach the
    /// disk. The WAL is one ordered log, so the next synced write (from any
    /// caller) makes these durable too; a power loss before then loses them
    /// whole, never in part.
    ///
    /// An unsynced write only copies into the memtable and the WAL's page
    /// cache, so it is done in place: handing it to the writer thread and
    /// back cost two thread wake-ups, about 100 µs of every write's latency
    /// on a busy 2-core machine. In place only while RocksDB would not delay
    /// it (`no_slowdown`): a write that would wait for a flush or compaction
    /// goes to the writer thread, so a stall never blocks the caller's
    /// runtime. What `no_slowdown` does not cover: a write that joins
    /// RocksDB's write group behind a synced write waits for that fsync,
    /// usually well under a millisecond; waits of 20 ms or more are logged
    /// (at most a line a second, with their count and the worst).
    pub async fn write_unsynced(&self, ops: Vec<Op>) -> Result<(), RocksError> {
        let batch = batch_of(&self.shared, &ops)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        opts.set_no_slowdown(true);
        let started = Instant::now();
        let written = self.shared.db.write_opt(batch, &opts);
        let took = started.elapsed();
        if took >= SLOW_IN_PLACE {
            // Such waits are behind another caller's fsync in RocksDB's
            // write group: in issue 13's bench, 20-160 ms ones came just
            // before a node synced a 312 MB snapshot file, and each "driver
            // turn slow or late" came the same millisecond after one.
            let report = self
                .inner
                .slow
                .lock()
                .ok()
                .and_then(|mut s| s.record(took, started));
            if let Some((count, worst)) = report {
                tracing::warn!(
                    path = %self.shared.path.display(),
                    count,
                    worst_ms = worst.as_millis() as u64,
                    "unsynced writes blocked their caller's thread (count and worst since the last such line)"
                );
            }
        }
        match written {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => self.submit(ops, false).await,
            Err(source) => Err(self.shared.db_err(source)),
        }
    }

    /// Applies `ops` atomically from the calling thread, synced if `sync`
    /// (and the store syncs at all). Blocks: for `spawn_blocking` work such
    /// as a snapshot install, never on the runtime.
    pub fn write_blocking(&self, ops: &[Op], sync: bool) -> Result<(), RocksError> {
        let batch = batch_of(&self.shared, ops)?;
        let mut opts = WriteOptions::default();
        opts.set_sync(sync && self.shared.sync);
        self.shared
            .db
            .write_opt(batch, &opts)
            .map_err(|e| self.shared.db_err(e))
    }

    async fn submit(&self, ops: Vec<Op>, sync: bool) -> Result<(), RocksError> {
        let (reply, rx) = oneshot::channel();
        let gone = || RocksError::WriterGone {
            path: self.shared.path.clone(),
        };
        {
            let tx = self.inner.tx.lock().map_err(|_| gone())?;
            tx.as_ref()
                .ok_or_else(gone)?
                .send(Request { ops, sync, reply })
                .map_err(|_| gone())?;
        }
        rx.await.map_err(|_| gone())?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

fn run(shared: Arc<Shared>, rx: mpsc::Receiver<Request>) {
    while let Ok(first) = rx.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        // One sync covers the whole group; skip it when no one needs it.
        let synced = shared.sync && group.iter().any(|r| r.sync);
        let mut opts = WriteOptions::default();
        opts.set_sync(synced);
        let mut batch = WriteBatch::default();
        let ordinal = shared.acked.load(Ordering::Acquire) + 1;
        let result = group
            .iter()
            .try_for_each(|req| add_ops(&mut batch, &shared, &req.ops))
            .and_then(|()| {
                let meta = shared.cf(CF_META)?;
                if synced {
                    batch.put_cf(meta, KEY_SYNCED, ordinal.to_le_bytes());
                }
                batch.put_cf(meta, KEY_ACKED, (ordinal - 1).to_le_bytes());
                shared
                    .db
                    .write_opt(batch, &opts)
                    .map_err(|e| shared.db_err(e))
            });
        if synced && result.is_ok() {
            shared.acked.store(ordinal, Ordering::Release);
        }
        for req in group {
            let r = match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(clone_err(e, &shared)),
            };
            let _ = req.reply.send(r);
        }
    }
}

/// `ops` as one batch written outside the writer thread, which records how
/// many synced groups were acknowledged before it (see `recovery`).
fn batch_of(shared: &Shared, ops: &[Op]) -> Result<WriteBatch, RocksError> {
    let mut batch = WriteBatch::default();
    add_ops(&mut batch, shared, ops)?;
    let acked = shared.acked.load(Ordering::Acquire);
    batch.put_cf(shared.cf(CF_META)?, KEY_ACKED, acked.to_le_bytes());
    Ok(batch)
}

fn add_ops(batch: &mut WriteBatch, shared: &Shared, ops: &[Op]) -> Result<(), RocksError> {
    for op in ops {
        let name = match op {
            Op::Put { cf, .. } | Op::Delete { cf, .. } | Op::DeleteRange { cf, .. } => *cf,
        };
        let cf = shared.cf(name)?;
        match op {
            Op::Put { key, value, .. } => batch.put_cf(cf, key, value),
            Op::Delete { key, .. } => batch.delete_cf(cf, key),
            Op::DeleteRange { from, to, .. } => batch.delete_range_cf(cf, from, to),
        }
    }
    Ok(())
}

fn clone_err(e: &RocksError, shared: &Shared) -> RocksError {
    match e {
        RocksError::Db { source, .. } => RocksError::Db {
            path: shared.path.clone(),
            source: source.clone(),
        },
        RocksError::MissingColumnFamily { name, .. } => RocksError::MissingColumnFamily {
            path: shared.path.clone(),
            name,
        },
        _ => RocksError::WriterGone {
            path: shared.path.clone(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_writes_are_reported_at_most_once_a_second_with_count_and_worst() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut slow = SlowWrites::default();
        // The first is reported at once.
        assert_eq!(slow.record(ms(25), t0), Some((1, ms(25))));
        // Within the second: counted, not reported.
        assert_eq!(slow.record(ms(90), t0 + ms(300)), None);
        assert_eq!(slow.record(ms(30), t0 + ms(999)), None);
        // The next after the second carries all three and the worst.
        assert_eq!(slow.record(ms(21), t0 + ms(1000)), Some((3, ms(90))));
        // And starts a new second from there.
        assert_eq!(slow.record(ms(40), t0 + ms(1500)), None);
        assert_eq!(slow.record(ms(22), t0 + ms(2100)), Some((2, ms(40))));
    }
}
