//! The RocksDB state-machine helper: atomic apply with the applied id,
//! restart without replay, snapshots streamed in chunks and installed
//! atomically.

mod common;

use common::KvLogic;
use raft_core::memory::{KvCommand, KvConfig, KvResponse};
use raft_core::{Entry, EntryPayload, LogId, Membership, NodeId, StateMachine};
use raft_storage_rocksdb::{RocksDb, RocksOptions, RocksStateMachine};

type Sm = RocksStateMachine<KvConfig, KvLogic>;

fn put(index: u64, k: &str, v: &str) -> Entry<KvConfig> {
    Entry {
        log_id: LogId::new(1, index),
        payload: EntryPayload::command(KvCommand::Put {
            key: k.into(),
            value: v.into(),
        }),
    }
}

fn open(dir: &std::path::Path) -> Sm {
    let db = RocksDb::open(dir, RocksOptions::default()).expect("open");
    RocksStateMachine::open(&db, 1, KvLogic).expect("sm")
}

fn get(sm: &Sm, k: &str) -> Option<String> {
    sm.get(k.as_bytes())
        .expect("get")
        .map(|v| String::from_utf8(v).expect("utf8"))
}

#[tokio::test]
async fn apply_is_atomic_with_the_applied_id_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = open(dir.path());
    let members = Membership::new_voters([(NodeId(1), "a".to_string())].into());
    let entries = vec![
        Entry {
            log_id: LogId::new(1, 1),
            payload: EntryPayload::Membership(members.clone()),
        },
        put(2, "x", "1"),
        put(3, "x", "2"),
        Entry {
            log_id: LogId::new(1, 4),
            payload: EntryPayload::command(KvCommand::Cas {
                key: "x".into(),
                expected: Some("2".into()),
                new: Some("3".into()),
            }),
        },
    ];
    let r = sm.apply(entries).await.expect("apply");
    assert_eq!(
        r[3],
        KvResponse::Cas {
            succeeded: true,
            current: Some("3".into())
        },
        "reads see earlier writes of the batch"
    );
    drop(sm);
    let mut sm = open(dir.path());
    assert_eq!(
        sm.applied().await.expect("applied"),
        LogId::new(1, 4),
        "resumes after the last applied entry"
    );
    assert_eq!(get(&sm, "x").as_deref(), Some("3"));
}

#[tokio::test]
async fn snapshot_streams_in_chunks_and_installs_atomically() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(a_dir.path());
    let entries: Vec<_> = (1..=500)
        .map(|i| put(i, &format!("k{i}"), &format!("{i:0>200}")))
        .collect();
    a.apply(entries).await.expect("apply");
    let meta = a.build_snapshot().await.expect("snapshot");
    assert_eq!(meta.last_log_id, LogId::new(1, 500));

    let mut b = open(b_dir.path());
    b.apply(vec![put(1, "old", "state")]).await.expect("apply");
    // Stream it 1 KiB at a time, then "crash" before installing.
    let mut offset = 0;
    let mut chunks = 0;
    loop {
        let c = a
            .read_snapshot_chunk(meta.id, offset, 1024)
            .await
            .expect("read")
            .expect("current");
        b.write_snapshot_chunk(&meta, offset, c.data.clone())
            .await
            .expect("write chunk");
        offset += c.data.len() as u64;
        chunks += 1;
        if c.done {
            break;
        }
    }
    assert!(chunks > 50, "a 100 KiB snapshot went in {chunks} chunks");
    drop(b);
    let mut b = open(b_dir.path());
    assert_eq!(
        get(&b, "old").as_deref(),
        Some("state"),
        "a received but uninstalled snapshot changes nothing"
    );
    assert_eq!(b.applied().await.expect("applied"), LogId::new(1, 1));
    // Install (the received file survived the restart).
    b.install_snapshot(&meta).await.expect("install");
    assert_eq!(get(&b, "old"), None, "install replaces the old state");
    assert_eq!(get(&b, "k250"), Some(format!("{:0>200}", 250)));
    drop(b);
    let mut b = open(b_dir.path());
    assert_eq!(b.applied().await.expect("applied"), LogId::new(1, 500));
    assert_eq!(
        b.current_snapshot().await.expect("meta").map(|m| m.id),
        Some(meta.id)
    );
    assert!(
        a.read_snapshot_chunk(meta.id + 99, 0, 10)
            .await
            .expect("read")
            .is_none(),
        "unknown snapshot id"
    );
}
