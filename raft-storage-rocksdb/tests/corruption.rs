//! Damaged directories: a newer format, a missing column family, a corrupt
//! record, and bit flips and truncation in every file of a closed store.
//! Every case must end in a typed error or in the intact log: never a panic,
//! never a log with entries silently missing.

use std::path::Path;

use raft_core::memory::{KvCommand, KvConfig};
use raft_core::{Entry, EntryPayload, HardState, LogId, LogIndex, LogStore, NodeId, Term};
use raft_storage_rocksdb::{RocksDb, RocksError, RocksLogStore, RocksOptions};

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
