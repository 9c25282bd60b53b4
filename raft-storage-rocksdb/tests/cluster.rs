//! A 3-node cluster in one process on real RocksDB directories, with nodes
//! (the leader among them) restarted from disk in the middle of the run.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

mod common;

use raft_core::memory::{KvCommand, KvConfig, MemRouter};
use raft_core::{Config, LogIndex, NodeId, Raft, Role};
use raft_storage_rocksdb::RocksReader;

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    raft: Raft<KvConfig>,
    sm: RocksReader,
    dir: PathBuf,
}

/// Everything (log, hard state, data, snapshots) lives in the node's
/// RocksDB directory: a restart keeps nothing else.
async fn start(router: &MemRouter<KvConfig>, id: NodeId, dir: PathBuf) -> Node {
    let config = Config {
        snapshot_every: 100,
        purge_keep: 20,
        ..Config::default()
    };
    let (raft, reader) = common::start_node(&dir, id, config, router).await;
    router.register(id, raft.clone());
    Node {
        raft,
        sm: reader,
        dir,
    }
}

fn get(n: &Node, k: &str) -> Option<String> {
    n.sm.get(k.as_bytes())
        .expect("get")
        .map(|v| String::from_utf8(v).expect("utf8"))
}

async fn leader(nodes: &BTreeMap<NodeId, Node>) -> NodeId {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some((id, _)) = nodes
            .iter()
            .find(|(_, n)| n.raft.metrics().borrow().role == Role::Leader)
        {
            return *id;
        }
        assert!(tokio::time::Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn put(nodes: &BTreeMap<NodeId, Node>, k: &str, v: &str) -> LogIndex {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let l = leader(nodes).await;
        match nodes[&l]
            .raft
            .client_write(KvCommand::Put {
                key: k.into(),
                value: v.into(),
            })
            .await
        {
            Ok((id, _)) => return id.index,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "put failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn restart(router: &MemRouter<KvConfig>, nodes: &mut BTreeMap<NodeId, Node>, id: NodeId) {
    router.unregister(id);
    let n = nodes.remove(&id).expect("running");
    n.raft.shutdown().await;
    drop(n.raft);
    drop(n.sm); // the last handle: closes the RocksDB directory
    let back = start(router, id, n.dir).await;
    nodes.insert(id, back);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cluster_on_rocksdb_survives_restarts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let router = MemRouter::<KvConfig>::new();
    let members: BTreeMap<NodeId, String> =
        (1..=3).map(|i| (NodeId(i), format!("node-{i}"))).collect();
    let mut nodes = BTreeMap::new();
    for id in members.keys() {
        let dir = tmp.path().join(format!("n{id}"));
        nodes.insert(*id, start(&router, *id, dir).await);
    }
    for n in nodes.values() {
        n.raft
            .initialize(members.clone())
            .await
            .expect("initialize");
    }
    for i in 0..150 {
        put(&nodes, &format!("k{}", i % 10), &format!("a{i}")).await;
    }
    // Restart a follower, then the leader, writing in between.
    let l = leader(&nodes).await;
    let f = *nodes.keys().find(|id| **id != l).expect("follower");
    restart(&router, &mut nodes, f).await;
    for i in 0..100 {
        put(&nodes, &format!("k{}", i % 10), &format!("b{i}")).await;
    }
    restart(&router, &mut nodes, l).await;
    let mut last = LogIndex(0);
    for i in 0..100 {
        last = put(&nodes, &format!("k{}", i % 10), &format!("c{i}")).await;
    }
    // Every node converges on the last acknowledged values.
    for (id, n) in &nodes {
        let mut m = n.raft.metrics();
        tokio::time::timeout(WAIT, m.wait_for(|m| m.applied_index >= last))
            .await
            .unwrap_or_else(|_| panic!("node {id} did not catch up"))
            .expect("metrics");
        for k in 0..10 {
            assert_eq!(
                get(n, &format!("k{k}")),
                Some(format!("c{}", 90 + k)),
                "node {id} key k{k}"
            );
        }
    }
    let snap = nodes[&leader(&nodes).await]
        .raft
        .metrics()
        .borrow()
        .snapshot;
    assert!(
        snap.is_some(),
        "snapshots were taken and the log purged on RocksDB"
    );
    for n in nodes.values() {
        n.raft.shutdown().await;
    }
}
