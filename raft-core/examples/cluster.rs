//! A 3-node cluster in one process (in-memory storage, in-process network):
//! elects a leader, writes and reads, kills the leader, times the new
//! election, checks every acknowledged write survived, restarts the old
//! leader and watches it catch up.
//!
//! Run it with `cargo xtask demo` or `cargo run -p raft-core --example cluster`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use raft_core::memory::{KvCommand, KvConfig, MemLogStore, MemRouter, MemStateMachine};
use raft_core::{Config, NodeId, Raft, Role};

const WRITES: usize = 2_000;

struct Node {
    raft: Raft<KvConfig>,
    log: MemLogStore<KvConfig>,
    sm: MemStateMachine,
}

async fn start(
    router: &MemRouter<KvConfig>,
    id: NodeId,
    log: MemLogStore<KvConfig>,
    sm: MemStateMachine,
) -> Node {
    let raft = Raft::start(
        id,
        Config::default(),
        log.clone(),
        sm.clone(),
        router.factory(id),
    )
    .await
    .expect("start");
    router.register(id, raft.clone());
    Node { raft, log, sm }
}

async fn leader(nodes: &BTreeMap<NodeId, Node>) -> NodeId {
    loop {
        for (id, n) in nodes {
            if n.raft.metrics().borrow().role == Role::Leader {
                return *id;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn bar(done: usize, total: usize) {
    let width = 40;
    let filled = done * width / total;
    print!(
        "\r  writing [{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(width - filled)
    );
    let _ = std::io::stdout().flush();
}

#[tokio::main]
async fn main() {
    let router = MemRouter::<KvConfig>::new();
    let members: BTreeMap<NodeId, String> =
        (1..=3).map(|i| (NodeId(i), format!("node-{i}"))).collect();
    let mut nodes = BTreeMap::new();
    for id in members.keys() {
        nodes.insert(
            *id,
            start(&router, *id, MemLogStore::new(), MemStateMachine::new()).await,
        );
    }
    let t0 = Instant::now();
    for n in nodes.values() {
        n.raft
            .initialize(members.clone())
            .await
            .expect("initialize");
    }
    let first = leader(&nodes).await;
    let first_election = t0.elapsed();
    println!("3-node cluster up; node {first} elected leader in {first_election:.0?}");

    // Writes, with a progress bar.
    let t = Instant::now();
    for i in 0..WRITES {
        let cmd = KvCommand::Put {
            key: format!("key-{i}"),
            value: format!("value-{i}"),
        };
        nodes[&first].raft.client_write(cmd).await.expect("write");
        if i % 50 == 49 || i + 1 == WRITES {
            bar(i + 1, WRITES);
        }
    }
    let write_time = t.elapsed();
    println!(
        "\n  {WRITES} acknowledged writes in {write_time:.1?} ({:.0} writes/s, one at a time)",
        WRITES as f64 / write_time.as_secs_f64()
    );
    nodes[&first]
        .raft
        .ensure_linearizable()
        .await
        .expect("read");
    assert_eq!(nodes[&first].sm.get("key-7").as_deref(), Some("value-7"));

    // Kill the leader.
    println!("killing leader node {first}");
    router.unregister(first);
    let old = nodes.remove(&first).expect("leader");
    old.raft.shutdown().await;
    let t = Instant::now();
    let second = leader(&nodes).await;
    let failover = t.elapsed();
    println!("  node {second} took over in {failover:.0?}");

    // Every acknowledged write is still there, read linearizably.
    let read_index = nodes[&second]
        .raft
        .ensure_linearizable()
        .await
        .expect("read");
    let missing = (0..WRITES)
        .filter(|i| nodes[&second].sm.get(&format!("key-{i}")) != Some(format!("value-{i}")))
        .count();
    println!(
        "  linearizable read at index {read_index}: {} of {WRITES} acknowledged writes present",
        WRITES - missing
    );
    assert_eq!(missing, 0, "acknowledged writes lost");
    for i in 0..100 {
        let cmd = KvCommand::Put {
            key: format!("after-{i}"),
            value: "x".into(),
        };
        nodes[&second]
            .raft
            .client_write(cmd)
            .await
            .expect("write after failover");
    }

    // Restart the old leader from its storage; it catches up.
    println!("restarting node {first}");
    let t = Instant::now();
    let back = start(&router, first, old.log, old.sm).await;
    let target = nodes[&second].raft.metrics().borrow().commit_index;
    let mut m = back.raft.metrics();
    m.wait_for(|m| m.applied_index >= target)
        .await
        .expect("catch up");
    let catch_up = t.elapsed();
    println!(
        "  node {first} caught up to index {target} in {catch_up:.0?} (now a {:?})",
        m.borrow().role
    );
    nodes.insert(first, back);

    println!();
    println!("  {:<32} {:>12}", "step", "result");
    println!(
        "  {:<32} {:>12}",
        "first election",
        format!("{first_election:.0?}")
    );
    println!("  {:<32} {:>12}", "acknowledged writes", WRITES + 100);
    println!(
        "  {:<32} {:>12}",
        "failover (new leader elected)",
        format!("{failover:.0?}")
    );
    println!("  {:<32} {:>12}", "writes lost", missing);
    println!(
        "  {:<32} {:>12}",
        "old leader caught up",
        format!("{catch_up:.0?}")
    );
    for n in nodes.values() {
        n.raft.shutdown().await;
    }
}
