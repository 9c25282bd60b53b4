//! The RocksDB state-machine helper: atomic apply with the applied id,
//! restart without replay, snapshots streamed in chunks and installed
//! atomically.

mod common;

use common::KvLogic;
use raft_core::memory::{KvCommand, KvConfig, KvResponse};
use raft_core::{Entry, EntryPayload, LogId, Membership, NodeId, SnapshotMeta, StateMachine};
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

/// Streams snapshot `meta` from `from` to `to` in `chunk`-byte chunks;
/// returns how many.
async fn stream(from: &mut Sm, to: &mut Sm, meta: &SnapshotMeta<KvConfig>, chunk: usize) -> u64 {
    let mut offset = 0;
    let mut chunks = 0;
    loop {
        let c = from
            .read_snapshot_chunk(meta.id, offset, chunk)
            .await
            .expect("read")
            .expect("current");
        to.write_snapshot_chunk(meta, offset, c.data.clone())
            .await
            .expect("write chunk");
        offset += c.data.len() as u64;
        chunks += 1;
        if c.done {
            return chunks;
        }
    }
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
    let chunks = stream(&mut a, &mut b, &meta, 1024).await;
    assert!(chunks > 50, "a 100 KiB snapshot went in {chunks} chunks");
    drop(b);
    let mut b = open(b_dir.path());
    assert_eq!(
        get(&b, "old").as_deref(),
        Some("state"),
        "a received but uninstalled snapshot changes nothing"
    );
    assert_eq!(b.applied().await.expect("applied"), LogId::new(1, 1));
    // The engine forgets a transfer across a restart (the leader starts
    // over at offset 0), so the restart removed the partial file.
    assert!(
        b.install_snapshot(&meta).await.is_err(),
        "a partial transfer was kept across a restart"
    );
    let streamed: u64 = {
        stream(&mut a, &mut b, &meta, 4096).await;
        std::fs::metadata(
            b_dir
                .path()
                .join(format!("snapshots/1/{}.partial", meta.id)),
        )
        .expect("received file")
        .len()
    };
    assert_eq!(
        meta.size, streamed,
        "the meta's size is what a follower receives"
    );
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

#[tokio::test]
async fn opening_removes_what_crashes_and_abandoned_transfers_left_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = open(dir.path());
    sm.apply(vec![put(1, "k", "v")]).await.expect("apply");
    let meta = sm.build_snapshot().await.expect("snapshot");
    drop(sm);
    let snaps = dir.path().join("snapshots/1");
    let current = snaps.join(format!("{}.snap", meta.id));
    let stray = [
        format!("{}.snap", meta.id + 1), // renamed into place, never recorded
        format!("{}.tmp", meta.id + 1),  // a build cut short
        "77.partial".to_string(),        // an abandoned transfer
    ];
    for name in &stray {
        std::fs::write(snaps.join(name), b"junk").expect("write");
    }
    let mut sm = open(dir.path());
    for name in &stray {
        assert!(!snaps.join(name).exists(), "{name} was left behind");
    }
    assert!(current.exists(), "the current snapshot was removed");
    let chunk = sm
        .read_snapshot_chunk(meta.id, 0, 1 << 20)
        .await
        .expect("read")
        .expect("current");
    assert!(chunk.done);
    assert_eq!(chunk.data.len() as u64, meta.size);
}

#[tokio::test]
async fn a_transfer_that_starts_removes_an_abandoned_ones_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut sm = open(dir.path());
    let meta = |id| SnapshotMeta {
        last_log_id: LogId::new(1, id),
        membership: Membership::default(),
        id,
        size: 8,
    };
    let partial = |id: u64| dir.path().join(format!("snapshots/1/{id}.partial"));
    sm.write_snapshot_chunk(&meta(5), 0, vec![1; 4])
        .await
        .expect("chunk");
    assert!(partial(5).exists());
    // The leader changed mid-transfer: another snapshot starts.
    sm.write_snapshot_chunk(&meta(9), 0, vec![2; 4])
        .await
        .expect("chunk");
    assert!(!partial(5).exists(), "the abandoned transfer's file stayed");
    assert!(partial(9).exists());
}

#[tokio::test]
async fn a_snapshot_begun_holds_the_state_at_its_start_while_applies_go_on() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(a_dir.path());
    let entries: Vec<_> = (1..=300)
        .map(|i| put(i, &format!("k{i}"), &format!("{i:0>100}")))
        .collect();
    a.apply(entries).await.expect("apply");
    let build = a.begin_snapshot().await.expect("begin");
    // The driver goes on applying while the file is written.
    a.apply(vec![put(301, "k1", "changed"), put(302, "new", "x")])
        .await
        .expect("apply during the build");
    let meta = build.await.expect("build");
    assert_eq!(meta.last_log_id, LogId::new(1, 300));
    assert_eq!(
        a.current_snapshot().await.expect("current"),
        None,
        "not current before snapshot_built"
    );
    a.snapshot_built(&meta).await.expect("built");
    assert_eq!(
        a.current_snapshot().await.expect("current").map(|m| m.id),
        Some(meta.id)
    );
    assert_eq!(
        get(&a, "k1").as_deref(),
        Some("changed"),
        "live state moved on"
    );

    let mut b = open(b_dir.path());
    stream(&mut a, &mut b, &meta, 4096).await;
    b.install_snapshot(&meta).await.expect("install");
    assert_eq!(
        get(&b, "k1"),
        Some(format!("{:0>100}", 1)),
        "as of the start"
    );
    assert_eq!(get(&b, "new"), None, "a later apply is not in it");
    assert_eq!(get(&b, "k300"), Some(format!("{:0>100}", 300)));

    // The meta made current survives a restart.
    drop(a);
    let mut a = open(a_dir.path());
    assert_eq!(
        a.current_snapshot().await.expect("current").map(|m| m.id),
        Some(meta.id)
    );
    assert_eq!(a.applied().await.expect("applied"), LogId::new(1, 302));
}

#[tokio::test]
async fn a_transfer_reads_the_snapshot_the_last_build_replaced_but_no_older_one() {
    let a_dir = tempfile::tempdir().expect("tempdir");
    let b_dir = tempfile::tempdir().expect("tempdir");
    let mut a = open(a_dir.path());
    let mut builds = Vec::new();
    for i in 1..=3 {
        a.apply(vec![put(i, &format!("k{i}"), "v")])
            .await
            .expect("apply");
        builds.push(a.build_snapshot().await.expect("snapshot"));
    }
    let readable = async |a: &mut Sm, id: u64| {
        a.read_snapshot_chunk(id, 0, 16)
            .await
            .expect("read")
            .is_some()
    };
    let [first, second, third] = [0, 1, 2].map(|i| builds[i].id);
    assert!(readable(&mut a, third).await, "the current snapshot");
    assert!(
        readable(&mut a, second).await,
        "the one the last build replaced: a transfer may be reading it"
    );
    assert!(!readable(&mut a, first).await, "two builds ago: freed");
    let files = |dir: &std::path::Path| {
        let mut names: Vec<String> = std::fs::read_dir(dir.join("snapshots/1"))
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    assert_eq!(files(a_dir.path()).len(), 2, "{:?}", files(a_dir.path()));

    // The kept one is whole: a follower installs it.
    let mut b = open(b_dir.path());
    stream(&mut a, &mut b, &builds[1], 8).await;
    b.install_snapshot(&builds[1]).await.expect("install");
    assert_eq!(get(&b, "k2").as_deref(), Some("v"));
    assert_eq!(get(&b, "k3"), None);

    // No transfer outlives a restart: only the current snapshot stays.
    drop(a);
    let mut a = open(a_dir.path());
    assert!(!readable(&mut a, second).await);
    assert_eq!(files(a_dir.path()).len(), 1, "{:?}", files(a_dir.path()));
}

/// One store holds several groups: a group's snapshot holds its own keys,
/// none of the groups after or before it in key order, and the groups an
/// install does not name keep theirs.
#[tokio::test]
async fn a_snapshot_holds_its_own_group_only() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let db = RocksDb::open(a_dir.path(), RocksOptions::default()).expect("open");
    let mut groups: Vec<Sm> = (1..=3)
        .map(|g| RocksStateMachine::open(&db, g, KvLogic).expect("sm"))
        .collect();
    for (g, sm) in groups.iter_mut().enumerate() {
        let entries = (1..=50)
            .map(|i| put(i, &format!("k{i}"), &format!("group {} {i}", g + 1)))
            .chain([put(51, &format!("only-in-{}", g + 1), "x")])
            .collect();
        sm.apply(entries).await.expect("apply");
    }
    let meta = groups[1].build_snapshot().await.expect("snapshot");

    let db_b = RocksDb::open(b_dir.path(), RocksOptions::default()).expect("open");
    let mut b2 = RocksStateMachine::open(&db_b, 2, KvLogic).expect("sm");
    let mut b3 = RocksStateMachine::open(&db_b, 3, KvLogic).expect("sm");
    b3.apply(vec![put(1, "kept", "3")]).await.expect("apply");
    stream(&mut groups[1], &mut b2, &meta, 4096).await;
    b2.install_snapshot(&meta).await.expect("install");

    assert_eq!(get(&b2, "k7").as_deref(), Some("group 2 7"));
    assert_eq!(get(&b2, "only-in-2").as_deref(), Some("x"));
    for other in ["only-in-1", "only-in-3"] {
        assert_eq!(get(&b2, other), None, "{other} is another group's");
    }
    assert_eq!(get(&b3, "kept").as_deref(), Some("3"), "group 3 untouched");
    assert_eq!(get(&b3, "k7"), None);
}
