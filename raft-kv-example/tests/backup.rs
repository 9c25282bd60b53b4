//! `raft-kv snapshot save` and `restore`: a backup taken from a running
//! 3-node cluster seeds a new 3-node cluster (other addresses, empty data
//! directories) that holds every key as it was, and takes writes.

mod common;

use common::Cluster;
use raft_core::NodeId;
use raft_kv_example::server::{ServeError, restore};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_restored_from_a_saved_backup_reads_every_key_back() {
    let old = Cluster::start(3, "[raft]\nsnapshot_every = 100\n").await;
    // Saved through a follower: the client finds the leader.
    let c = old.client(old.follower().await);
    for i in 0..300 {
        c.put(&format!("k{i}"), format!("v{i}").as_bytes())
            .await
            .expect("put");
    }
    // Overwritten and deleted keys come back as they ended.
    for i in 0..50 {
        c.put(&format!("k{i}"), b"overwritten").await.expect("put");
    }
    for i in 50..60 {
        assert!(c.delete(&format!("k{i}")).await.expect("delete").deleted);
    }
    // Outside the cluster's directory, which goes with it.
    let keep = tempfile::tempdir().expect("tempdir");
    let backup = keep.path().join("backup.bin");
    let saved = c.save_snapshot(&backup).await.expect("save");
    assert!(saved.bytes > 0 && saved.index >= 360, "{saved:?}");
    assert_eq!(
        std::fs::metadata(&backup).expect("backup file").len(),
        saved.bytes
    );
    // Written after the save: not in the backup.
    c.put("after", b"save").await.expect("put");
    old.shutdown().await;

    let mut new = Cluster::prepare(3, "").await;
    for id in [1, 2, 3].map(NodeId) {
        let at = restore(&new.file, id, &backup).await.expect("restore");
        assert_eq!(at.index.0, saved.index);
    }
    // A restore never overwrites a node that has data.
    assert!(matches!(
        restore(&new.file, NodeId(1), &backup).await,
        Err(ServeError::NotEmpty { .. })
    ));
    for id in [1, 2, 3].map(NodeId) {
        new.start_node(id).await;
    }
    let l = new.leader().await;
    let c = new.client(l);
    for i in 0..300 {
        let want = match i {
            0..50 => Some(b"overwritten".to_vec()),
            50..60 => None,
            _ => Some(format!("v{i}").into_bytes()),
        };
        assert_eq!(
            c.get(&format!("k{i}"), false).await.expect("get"),
            want,
            "k{i}"
        );
    }
    assert_eq!(c.get("after", false).await.expect("get"), None);
    c.put("new", b"cluster")
        .await
        .expect("the new cluster takes writes");
    let status = c.status().await.expect("status");
    assert_eq!(status.voters, vec![1, 2, 3]);
    assert!(status.commit_index > saved.index);
    for id in [1, 2, 3].map(NodeId) {
        let c = new.client(id);
        common::wait_applied(&c, "new", "a restored node never caught up").await;
        assert_eq!(
            c.get("k100", true).await.expect("stale get"),
            Some(b"v100".to_vec()),
            "node {id}"
        );
    }
    new.shutdown().await;
}

/// A damaged backup is refused whole, before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_backup_is_refused_and_leaves_the_node_empty() {
    let old = Cluster::start(3, "").await;
    let c = old.client(old.leader().await);
    c.put("k", b"v").await.expect("put");
    // Outside the cluster's directory, which goes with it.
    let keep = tempfile::tempdir().expect("tempdir");
    let backup = keep.path().join("backup.bin");
    c.save_snapshot(&backup).await.expect("save");
    old.shutdown().await;
    let mut bytes = std::fs::read(&backup).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    let flipped = backup.with_extension("flipped");
    std::fs::write(&flipped, &bytes).expect("write");
    let truncated = backup.with_extension("short");
    std::fs::write(&truncated, &bytes[..bytes.len() - 7]).expect("write");

    let new = Cluster::prepare(3, "").await;
    for file in [&flipped, &truncated] {
        let e = restore(&new.file, NodeId(1), file)
            .await
            .expect_err("refused");
        assert!(e.to_string().contains("checksum"), "{e}");
    }
    assert!(matches!(
        restore(&new.file, NodeId(1), &new.path().join("missing.bin")).await,
        Err(ServeError::Storage(_))
    ));
    // The refusals wrote nothing: the node is still empty, and takes the
    // good backup.
    restore(&new.file, NodeId(1), &backup)
        .await
        .expect("the intact backup restores");
}
