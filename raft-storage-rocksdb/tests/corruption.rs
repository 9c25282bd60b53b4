//! Damaged directories: a newer format, a missing column family, a corrupt
//! record, and bit flips and truncation in every file of a closed store.
//! Every case must end in a typed error or in the intact log: never a panic,
//! never a log with entries silently missing.

mod common;

use std::path::{Path, PathBuf};

use common::KvLogic;
use raft_core::memory::{KvCommand, KvConfig};
use raft_core::{
    Entry, EntryPayload, HardState, LogId, LogIndex, LogStore, NodeId, StateMachine, Term,
};
use raft_storage_rocksdb::{RocksDb, RocksError, RocksLogStore, RocksOptions, RocksStateMachine};

const N: u64 = 3000;

fn entry(i: u64) -> Entry<KvConfig> {
    Entry {
        log_id: LogId::new(1 + i / 1000, i),
        payload: EntryPayload::command(KvCommand::Put {
            key: format!("k{i}"),
            value: format!("{:0>100}", i),
        }),
    }
}

fn small_memtables() -> RocksOptions {
    // Small memtables so the log spreads over several SST files and the WAL.
    RocksOptions {
        write_buffer_size: 64 << 10,
        ..RocksOptions::default()
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn build(dir: &Path) {
    rt().block_on(async {
        let db = RocksDb::open(dir, small_memtables()).expect("open");
        let mut s: RocksLogStore<KvConfig> = db.log_store(1).expect("store");
        for chunk in (1..=N).collect::<Vec<_>>().chunks(50) {
            s.append(chunk.iter().map(|i| entry(*i)).collect())
                .await
                .expect("append");
        }
        s.purge(LogId::new(1, 10)).await.expect("purge");
        s.save_hard_state(HardState {
            term: Term(4),
            voted_for: Some(NodeId(2)),
            uuid: Default::default(),
        })
        .await
        .expect("hs");
    });
}

/// Opens and reads everything; `Ok(true)` if the log is exactly what was
/// written, `Ok(false)` if it opened but differs (the failure we hunt).
fn verify(dir: &Path) -> Result<bool, String> {
    rt().block_on(async {
        let db = RocksDb::open(dir, RocksOptions::default()).map_err(|e| e.to_string())?;
        let mut s: RocksLogStore<KvConfig> = db.log_store(1).map_err(|e| e.to_string())?;
        let st = s.log_state().await.map_err(|e| e.to_string())?;
        let entries = s
            .read(st.last_purged.index.next(), st.last.index)
            .await
            .map_err(|e| e.to_string())?;
        let hs = s.load_hard_state().await.map_err(|e| e.to_string())?;
        let expected: Vec<Entry<KvConfig>> = (11..=N).map(entry).collect();
        Ok(st.last_purged == LogId::new(1, 10)
            && entries == expected
            && hs
                == HardState {
                    term: Term(4),
                    voted_for: Some(NodeId(2)),
                    uuid: Default::default(),
                })
    })
}

/// A named way of damaging a file's bytes.
type Damage = (String, Box<dyn Fn(&mut Vec<u8>)>);

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

#[test]
fn bit_flips_and_truncation_are_detected_or_harmless_never_silent() {
    let pristine = tempfile::tempdir().expect("tempdir");
    build(pristine.path());
    assert_eq!(
        verify(pristine.path()),
        Ok(true),
        "pristine store must verify"
    );
    let mut files: Vec<_> = std::fs::read_dir(pristine.path())
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let (mut detected, mut harmless, mut cases) = (0, 0, 0);
    let mut kinds = std::collections::BTreeSet::new();
    let mut harmless_files = std::collections::BTreeSet::new();
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string();
        let len = std::fs::metadata(file).expect("meta").len();
        if len == 0 {
            continue;
        }
        // Flip one bit at several offsets, then truncate to half.
        let mut damages: Vec<Damage> = Vec::new();
        for k in 0..6u64 {
            let off = ((len - 1) * k / 5) as usize;
            damages.push((
                format!("flip bit at {off}"),
                Box::new(move |b: &mut Vec<u8>| b[off] ^= 0x10),
            ));
        }
        damages.push((
            "truncate to half".into(),
            Box::new(|b: &mut Vec<u8>| b.truncate(b.len() / 2)),
        ));
        for (what, damage) in damages {
            let dir = tempfile::tempdir().expect("tempdir");
            copy_dir(pristine.path(), dir.path());
            let target = dir.path().join(&name);
            let mut bytes = std::fs::read(&target).expect("read");
            damage(&mut bytes);
            std::fs::write(&target, &bytes).expect("write");
            cases += 1;
            match verify(dir.path()) {
                Err(e) => {
                    detected += 1;
                    kinds.insert(format!(
                        "{name}: {}",
                        e.chars().take(100).collect::<String>()
                    ));
                }
                Ok(true) => {
                    harmless += 1;
                    harmless_files.insert(name.clone());
                }
                Ok(false) => {
                    panic!("{name}, {what}: store opened with a different log and no error")
                }
            }
        }
    }
    println!(
        "corruption: {cases} cases over {} files: {detected} detected with an error, {harmless} harmless",
        files.len()
    );
    println!("  harmless damage only in: {harmless_files:?}");
    for k in kinds.iter().take(12) {
        println!("  {k}");
    }
    assert!(detected > 0);
}

#[test]
fn newer_format_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(false);
        let db = rocksdb::DB::open_cf(&opts, dir.path(), ["log", "hard_state", "meta", "sm"])
            .expect("raw open");
        db.put_cf(
            db.cf_handle("meta").expect("meta"),
            b"format",
            99u32.to_le_bytes(),
        )
        .expect("put");
    }
    match RocksDb::open(dir.path(), RocksOptions::default()) {
        Err(RocksError::NewerFormat { found: 99, .. }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a directory from a newer format"),
    }
}

#[test]
fn missing_column_family_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = rocksdb::DB::open_default(dir.path()).expect("raw create");
        db.put(b"x", b"y").expect("put");
    }
    match RocksDb::open(dir.path(), RocksOptions::default()) {
        Err(RocksError::MissingColumnFamily { name, .. }) => assert_eq!(name, "log"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened a directory without the log column family"),
    }
}

#[test]
fn corrupt_record_names_its_index_and_the_node_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    {
        let db = rocksdb::DB::open_cf(
            &rocksdb::Options::default(),
            dir.path(),
            ["log", "hard_state", "meta", "sm"],
        )
        .expect("raw open");
        let mut key = 1u64.to_be_bytes().to_vec();
        key.extend_from_slice(&1500u64.to_be_bytes());
        let mut v = db
            .get_cf(db.cf_handle("log").expect("log"), &key)
            .expect("get")
            .expect("present");
        let last = v.len() - 1;
        v[last] ^= 1;
        db.put_cf(db.cf_handle("log").expect("log"), &key, v)
            .expect("put");
    }
    let db = RocksDb::open(dir.path(), RocksOptions::default()).expect("open");
    match db.log_store::<KvConfig>(1) {
        Err(RocksError::CorruptEntry {
            index: 1500,
            group: 1,
            path,
            ..
        }) => assert_eq!(path, dir.path()),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a corrupt record went unnoticed"),
    }
}

#[test]
fn a_hole_in_the_log_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    build(dir.path());
    {
        let db = rocksdb::DB::open_cf(
            &rocksdb::Options::default(),
            dir.path(),
            ["log", "hard_state", "meta", "sm"],
        )
        .expect("raw open");
        let mut key = 1u64.to_be_bytes().to_vec();
        key.extend_from_slice(&2000u64.to_be_bytes());
        db.delete_cf(db.cf_handle("log").expect("log"), &key)
            .expect("delete");
    }
    let db = RocksDb::open(dir.path(), RocksOptions::default()).expect("open");
    match db.log_store::<KvConfig>(1) {
        Err(RocksError::Hole {
            expected: 2000,
            found: 2001,
            ..
        }) => {}
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a hole in the middle of the log went unnoticed"),
    }
    let _ = LogIndex(0);
}

/// Entry `i` of the WAL-hole tests: a 2 KiB value, so a few batches span
/// several of the WAL's 4 KiB pages and 32 KiB blocks.
fn big_put(i: u64) -> Entry<KvConfig> {
    Entry {
        log_id: LogId::new(1, i),
        payload: EntryPayload::command(KvCommand::Put {
            key: format!("k{i}"),
            value: format!("{i:0>2048}"),
        }),
    }
}

/// The store's live WAL (the newest `*.log`) and its length.
fn live_wal(dir: &Path) -> (PathBuf, usize) {
    let wal = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .max()
        .expect("a WAL");
    let len = std::fs::metadata(&wal).expect("meta").len() as usize;
    (wal, len)
}

/// Writes a store whose log holds entries 1..=48 (appended, synced, in two
/// groups of 24) and, if `apply`, whose state machine applied them in 24
/// unsynced batches of two; returns the WAL's length before the second
/// group and after the last synced write.
fn synced_log_then_unsynced_applies(dir: &Path, apply: bool) -> (usize, usize) {
    rt().block_on(async {
        let db = RocksDb::open(dir, RocksOptions::default()).expect("open");
        let mut log: RocksLogStore<KvConfig> = db.log_store(1).expect("store");
        let entries: Vec<_> = (1..=48).map(big_put).collect();
        log.append(entries[..24].to_vec()).await.expect("append");
        let before_second = live_wal(dir).1;
        log.append(entries[24..].to_vec()).await.expect("append");
        let mut sm = RocksStateMachine::open(&db, 1, KvLogic).expect("sm");
        let synced = live_wal(dir).1;
        if !apply {
            return (before_second, synced);
        }
        for pair in entries.chunks(2) {
            sm.apply(pair.to_vec()).await.expect("apply");
        }
        assert!(
            live_wal(dir).1 > synced + 64 * 1024,
            "the applies went to the WAL"
        );
        (before_second, synced)
    })
}

/// A power loss can write the WAL's unsynced tail out of order: a page of
/// apply batches never reaches the disk while later ones do. That is a hole
/// followed by whole records, which the strict recovery mode refuses (the
/// node would never start again). Nothing in it was acknowledged, so the
/// store opens at the last whole batch before it: the log whole, the state
/// machine at an earlier applied id with exactly the data up to it.
#[test]
fn a_power_loss_hole_among_unsynced_apply_batches_opens_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, synced) = synced_log_then_unsynced_applies(dir.path(), true);
    let (wal, len) = live_wal(dir.path());
    let hole = synced.div_ceil(4096) * 4096 + 4096;
    assert!(
        hole + 4096 < len - 32 * 1024,
        "whole records follow the hole"
    );
    let mut bytes = std::fs::read(&wal).expect("read");
    bytes[hole..hole + 4096].fill(0);
    std::fs::write(&wal, &bytes).expect("write");

    for round in 0..2 {
        rt().block_on(async {
            let db = RocksDb::open(dir.path(), RocksOptions::default())
                .unwrap_or_else(|e| panic!("round {round}: a torn unsynced tail must open: {e}"));
            let mut log: RocksLogStore<KvConfig> = db.log_store(1).expect("store");
            let st = log.log_state().await.expect("state");
            assert_eq!(st.last, LogId::new(1, 48), "the synced log is whole");
            let read = log.read(LogIndex(1), LogIndex(48)).await.expect("read");
            assert_eq!(read, (1..=48).map(big_put).collect::<Vec<_>>());
            let mut sm = RocksStateMachine::open(&db, 1, KvLogic).expect("sm");
            let applied = sm.applied().await.expect("applied").index.0;
            assert!(applied < 48, "the batches from the hole on are gone");
            for i in 1..=48 {
                let v = sm.get(format!("k{i}").as_bytes()).expect("get");
                assert_eq!(
                    v.is_some(),
                    i <= applied,
                    "round {round}: key {i} against applied {applied}"
                );
            }
        });
    }
}

/// Flips a bit in the middle of the second synced group of a store built by
/// [`synced_log_then_unsynced_applies`] and expects the open to fail.
fn damage_in_the_second_synced_group_is_refused(apply: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (before_second, synced) = synced_log_then_unsynced_applies(dir.path(), apply);
    let (wal, _) = live_wal(dir.path());
    let mut bytes = std::fs::read(&wal).expect("read");
    bytes[(before_second + synced) / 2] ^= 0x10;
    std::fs::write(&wal, &bytes).expect("write");
    match RocksDb::open(dir.path(), RocksOptions::default()) {
        Err(RocksError::Db { source, .. }) => {
            assert_eq!(source.kind(), rocksdb::ErrorKind::Corruption, "{source}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("opened past a damaged synced group (apply batches after it: {apply})"),
    }
}

/// The same repair must not swallow acknowledged data: damage inside a
/// synced group that apply batches written after its sync returned survive
/// past is a disk fault, and the store refuses to open rather than resume
/// without those entries.
#[test]
fn damage_before_records_written_after_its_sync_returned_is_refused() {
    damage_in_the_second_synced_group_is_refused(true);
}

/// Damage in the last write, with nothing whole after it, may be a torn
/// unacknowledged write or a disk fault in an acknowledged one: nothing
/// tells them apart, so it stays refused as strict recovery refuses it.
#[test]
fn damage_in_the_last_synced_write_is_refused() {
    damage_in_the_second_synced_group_is_refused(false);
}
