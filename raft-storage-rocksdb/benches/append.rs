//! Appended entries per second on RocksDB with 1, 16 and 256 concurrent
//! appenders (each its own Raft group in one shared database, every append
//! synced), next to the raw limit of the same disk measured in the same run:
//! a group-committing writer over a plain file, one `write` + `fdatasync` per
//! batch of whatever the same number of producers have waiting.
//!
//! `cargo bench -p raft-storage-rocksdb` (BENCH_SECS=N per cell, default 3).

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use raft_core::memory::{KvCommand, KvConfig};
use raft_core::{Entry, EntryPayload, LogId, LogStore};
use raft_storage_rocksdb::{RocksDb, RocksOptions};

fn entry(index: u64, payload: usize) -> Entry<KvConfig> {
    Entry {
        log_id: LogId::new(1, index),
        payload: EntryPayload::command(KvCommand::Put {
            key: "k".into(),
            value: "x".repeat(payload),
        }),
    }
}

/// Entries/s through `RocksLogStore::append`, one entry per call.
fn ours(dir: &std::path::Path, appenders: usize, payload: usize, secs: f64) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let db = RocksDb::open(dir, RocksOptions::default()).expect("open");
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let mut tasks = Vec::new();
        for g in 0..appenders {
            let mut store = db.log_store::<KvConfig>(g as u64 + 1).expect("store");
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    store
                        .append(vec![entry(n + 1, payload)])
                        .await
                        .expect("append");
                    n += 1;
                }
                n
            }));
        }
        let start = Instant::now();
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("task");
        }
        total as f64 / start.elapsed().as_secs_f64()
    })
}

/// Records/s through a raw group-committing writer: producers hand records
/// to one thread that writes all waiting records and fdatasyncs once.
fn raw(dir: &std::path::Path, producers: usize, payload: usize, secs: f64) -> f64 {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(dir.join("raw.log"))
        .expect("file");
    let (tx, rx) = mpsc::channel::<(Vec<u8>, mpsc::Sender<()>)>();
    let writer = std::thread::spawn(move || {
        let mut offset = 0u64;
        while let Ok(first) = rx.recv() {
            let mut group = vec![first];
            while let Ok(r) = rx.try_recv() {
                group.push(r);
            }
            let mut buf = Vec::new();
            for (rec, _) in &group {
                buf.extend_from_slice(rec);
            }
            file.write_all_at(&buf, offset).expect("write");
            offset += buf.len() as u64;
            file.sync_data().expect("fdatasync");
            for (_, done) in group {
                let _ = done.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let threads: Vec<_> = (0..producers)
        .map(|_| {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let rec = vec![7u8; payload + 32];
                let (done_tx, done_rx) = mpsc::channel();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    tx.send((rec.clone(), done_tx.clone())).expect("send");
                    done_rx.recv().expect("ack");
                    n += 1;
                }
                n
            })
        })
        .collect();
    drop(tx);
    let total: u64 = threads
        .into_iter()
        .map(|t| t.join().expect("producer"))
        .sum();
    let rate = total as f64 / start.elapsed().as_secs_f64();
    writer.join().expect("writer");
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    // Both measured in the same directory tree, so on the same disk.
    let base = std::env::var("BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir());
    println!(
        "rocksdb append vs raw group-committed fdatasync in {}, {secs}s per run, median of {reps} paired runs",
        base.display()
    );
    println!(
        "{:>8} {:>10} | {:>14} | {:>14} | {:>6}",
        "payload", "appenders", "rocksdb ent/s", "raw rec/s", "ratio"
    );
    for payload in [64usize, 4096] {
        for appenders in [1usize, 16, 256] {
            // Paired runs, back to back, so drift on a shared machine hits
            // both sides of each ratio alike.
            let (mut os, mut rs, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..reps {
                let d1 = tempfile::tempdir_in(&base).expect("tempdir");
                let d2 = tempfile::tempdir_in(&base).expect("tempdir");
                let r = raw(d2.path(), appenders, payload, secs);
                let o = ours(d1.path(), appenders, payload, secs);
                os.push(o);
                rs.push(r);
                ratios.push(o / r);
            }
            println!(
                "{:>8} {:>10} | {:>14.0} | {:>14.0} | {:>6.2}",
                payload,
                appenders,
                median(os),
                median(rs),
                median(ratios)
            );
            let _ = std::io::stdout().flush();
        }
    }
}
