//! The tokio driver end to end: real `Raft` handles over the in-process
//! network with in-memory storage. These check behaviour, never timing:
//! every wait is a condition with a generous limit.

use std::collections::BTreeMap;
use std::time::Duration;

use raft_core::engine::ElectionCause;
use raft_core::memory::{KvCommand, KvConfig, KvResponse, MemLogStore, MemRouter, MemStateMachine};
use raft_core::{Config, LogIndex, NodeId, Raft, RaftError, RaftMetrics, Role};

const WAIT: Duration = Duration::from_secs(20);

struct Node {
    raft: Raft<KvConfig>,
    log: MemLogStore<KvConfig>,
    sm: MemStateMachine,
}

struct Cluster {
    router: MemRouter<KvConfig>,
    nodes: BTreeMap<NodeId, Node>,
    config: Config,
}

impl Cluster {
    async fn new(n: u64, config: Config) -> Cluster {
        let router = MemRouter::new();
        let mut c = Cluster {
            router,
            nodes: BTreeMap::new(),
            config,
        };
        let members: BTreeMap<NodeId, String> =
            (1..=n).map(|i| (NodeId(i), format!("node-{i}"))).collect();
        for i in 1..=n {
            c.start(NodeId(i), MemLogStore::new(), MemStateMachine::new())
                .await;
        }
        for node in c.nodes.values() {
            node.raft
                .initialize(members.clone())
                .await
                .expect("initialize");
        }
        c
    }

    async fn start(&mut self, id: NodeId, log: MemLogStore<KvConfig>, sm: MemStateMachine) {
        let raft = Raft::start(
            id,
            self.config.clone(),
            log.clone(),
            sm.clone(),
            self.router.factory(id),
        )
        .await
        .expect("start");
        self.router.register(id, raft.clone());
        self.nodes.insert(id, Node { raft, log, sm });
    }

    /// A 3-node cluster whose followers are stopped, its leader's id, and
    /// the stopped nodes (for `restart_all`).
    async fn without_quorum(config: Config) -> (Cluster, NodeId, Vec<(NodeId, Node)>) {
        let mut c = Cluster::new(3, config).await;
        let leader = c.leader().await;
        let followers: Vec<NodeId> = c.nodes.keys().copied().filter(|id| *id != leader).collect();
        let mut stopped = Vec::new();
        for id in followers {
            stopped.push((id, c.stop(id).await));
        }
        (c, leader, stopped)
    }

    async fn restart_all(&mut self, stopped: Vec<(NodeId, Node)>) {
        for (id, node) in stopped {
            self.start(id, node.log, node.sm).await;
        }
    }

    async fn stop(&mut self, id: NodeId) -> Node {
        self.router.unregister(id);
        let node = self.nodes.remove(&id).expect("running");
        node.raft.shutdown().await;
        node
    }

    async fn leader(&self) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            for (id, n) in &self.nodes {
                if n.raft.metrics().borrow().role == Role::Leader {
                    return *id;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no leader within {WAIT:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn write(&self, key: &str, value: &str) -> (LogIndex, KvResponse) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let l = self.leader().await;
            let cmd = KvCommand::Put {
                key: key.into(),
                value: value.into(),
            };
            match self.nodes[&l].raft.client_write(cmd).await {
                Ok((id, resp)) => return (id.index, resp),
                Err(e) => assert!(tokio::time::Instant::now() < deadline, "write failed: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until node `id`'s own metrics satisfy `what` (another node's
    /// answer says nothing about when `id` hears of it).
    async fn wait_view(&self, id: NodeId, what: &str, f: impl Fn(&RaftMetrics<String>) -> bool) {
        let mut m = self.nodes[&id].raft.metrics();
        tokio::time::timeout(WAIT, m.wait_for(|m| f(m)))
            .await
            .unwrap_or_else(|_| panic!("node {id} never saw {what}"))
            .expect("metrics");
    }

    /// Stops a follower and waits until the leader no longer counts it as
    /// live (a leader keeps the log a live follower needs), then makes `n`
    /// writes (17 keys) without it: which node it was, what it left
    /// behind, and the last write's index.
    async fn write_without_a_follower(&mut self, n: usize) -> (NodeId, Node, LogIndex) {
        let leader = self.leader().await;
        let lagging = *self
            .nodes
            .keys()
            .find(|id| **id != leader)
            .expect("follower");
        let stopped = self.stop(lagging).await;
        let live_for = self.config.election_timeout_min_ms;
        tokio::time::sleep(Duration::from_millis(2 * live_for)).await;
        let mut last = LogIndex(0);
        for i in 0..n {
            last = self
                .write(&format!("k{}", i % 17), &format!("v{i}"))
                .await
                .0;
        }
        (lagging, stopped, last)
    }

    async fn wait_applied(&self, id: NodeId, index: LogIndex) {
        let mut m = self.nodes[&id].raft.metrics();
        tokio::time::timeout(WAIT, m.wait_for(|m| m.applied_index >= index))
            .await
            .unwrap_or_else(|_| panic!("node {id} did not apply {index}"))
            .expect("metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_elect_replicate_and_read_linearizably() {
    let c = Cluster::new(3, Config::default()).await;
    let leader = c.leader().await;
    let mut last = LogIndex(0);
    for i in 0..100 {
        let (idx, resp) = c.write(&format!("k{i}"), &format!("v{i}")).await;
        assert_eq!(resp, KvResponse::Put);
        assert!(idx > last, "indices increase");
        last = idx;
    }
    let read_index = c.nodes[&leader]
        .raft
        .ensure_linearizable()
        .await
        .expect("read");
    assert!(read_index >= last);
    assert_eq!(c.nodes[&leader].sm.get("k99").as_deref(), Some("v99"));
    for id in c.nodes.keys() {
        c.wait_applied(*id, last).await;
        assert_eq!(c.nodes[id].sm.get("k42").as_deref(), Some("v42"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_refuses_writes_and_reads_naming_the_leader() {
    let c = Cluster::new(3, Config::default()).await;
    let leader = c.leader().await;
    c.write("k", "v").await;
    let follower = *c
        .nodes
        .keys()
        .find(|id| **id != leader)
        .expect("a follower");
    let err = c.nodes[&follower]
        .raft
        .client_write(KvCommand::Put {
            key: "k".into(),
            value: "x".into(),
        })
        .await
        .expect_err("follower must refuse");
    match err {
        RaftError::NotLeader(nl) => {
            assert_eq!(nl.leader_id, Some(leader));
            assert_eq!(nl.leader_node, Some(format!("node-{leader}")));
        }
        other => panic!("expected NotLeader, got {other}"),
    }
    assert!(matches!(
        c.nodes[&follower].raft.ensure_linearizable().await,
        Err(RaftError::NotLeader(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_keeps_acknowledged_writes() {
    let mut c = Cluster::new(3, Config::default()).await;
    for i in 0..20 {
        c.write(&format!("k{i}"), "before").await;
    }
    let old = c.leader().await;
    let m = c.nodes[&old].raft.metrics().borrow().clone();
    assert!(m.elections >= 1, "the leader started no election: {m:?}");
    assert!(
        m.leader_changes >= 1,
        "the leader never saw a leader: {m:?}"
    );
    let before: BTreeMap<NodeId, u64> = c
        .nodes
        .iter()
        .map(|(id, n)| (*id, n.raft.metrics().borrow().leader_changes))
        .collect();
    let stopped = c.stop(old).await;
    let new = c.leader().await;
    assert_ne!(new, old);
    let (idx, _) = c.write("after", "failover").await;
    for (id, n) in &c.nodes {
        let m = n.raft.metrics().borrow().clone();
        assert!(
            m.leader_changes > before[id],
            "node {id} counted no leader change: {m:?}"
        );
    }
    for i in 0..20 {
        assert_eq!(
            c.nodes[&new].sm.get(&format!("k{i}")).as_deref(),
            Some("before")
        );
    }
    // The old leader restarts from its storage and catches up.
    c.start(old, stopped.log, stopped.sm).await;
    c.wait_applied(old, idx).await;
    assert_eq!(c.nodes[&old].sm.get("after").as_deref(), Some("failover"));
}

/// A deposed leader's pending writes whose entries the new leader's log
/// replaces are answered (outcome unknown) when the log is truncated, even
/// if no later entry ever takes their indices: the core bench once hung
/// with all 1,024 writers waiting on writes the new leader had cut off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_cut_off_by_a_new_leaders_log_are_answered() {
    let c = Cluster::new(3, Config::default()).await;
    let (idx, _) = c.write("k", "v").await;
    let old = c.leader().await;
    for id in c.nodes.keys() {
        c.wait_applied(*id, idx).await;
    }
    c.router.isolate(old);
    let pending: Vec<_> = (0..3)
        .map(|i| {
            let raft = c.nodes[&old].raft.clone();
            tokio::spawn(async move {
                raft.client_write(KvCommand::Put {
                    key: format!("cut-{i}"),
                    value: "x".into(),
                })
                .await
            })
        })
        .collect();
    // The others elect a leader, which commits only its no-op: one entry,
    // so two of the old leader's three pending entries have no rival.
    let others: Vec<NodeId> = c.nodes.keys().copied().filter(|id| *id != old).collect();
    let new = loop {
        if let Some(id) = others
            .iter()
            .find(|id| c.nodes[id].raft.metrics().borrow().role == Role::Leader)
        {
            break *id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    c.wait_view(new, "its no-op committed", |m| m.commit_index > idx)
        .await;
    c.router.heal();
    for p in pending {
        let r = tokio::time::timeout(WAIT, p)
            .await
            .expect("a write cut off by the new leader's log is answered")
            .expect("task");
        assert!(
            matches!(
                r,
                Err(RaftError::OutcomeUnknown | RaftError::ProposalDropped)
            ),
            "{r:?}"
        );
    }
    for i in 0..3 {
        assert_eq!(c.nodes[&new].sm.get(&format!("cut-{i}")), None);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_by_snapshot() {
    let config = Config {
        snapshot_every: 50,
        purge_keep: 10,
        snapshot_chunk_bytes: 256,
        ..Config::default()
    };
    let mut c = Cluster::new(3, config).await;
    let (lagging, stopped, last) = c.write_without_a_follower(300).await;
    let leader = c.leader().await;
    let m = c.nodes[&leader].raft.metrics().borrow().clone();
    assert!(m.snapshot.is_some(), "leader built a snapshot");
    // Restart the follower with fresh (wiped) storage: only a snapshot can
    // bring it back.
    let _ = stopped;
    c.start(lagging, MemLogStore::new(), MemStateMachine::new())
        .await;
    c.wait_applied(lagging, last).await;
    let m = c.nodes[&lagging].raft.metrics().borrow().clone();
    assert!(m.snapshot.is_some(), "follower installed a snapshot");
    assert_eq!(m.snapshots_installed, 1, "one snapshot brought it back");
    // (Transfers started while the follower was down count too: each
    // build replaced the snapshot one of them was sending.)
    let sent = c.nodes[&leader].raft.metrics().borrow().snapshots_sent;
    assert!(sent >= 1, "the leader counted no transfer");
    assert_eq!(
        c.nodes[&lagging].sm.get("k16").as_deref(),
        c.nodes[&leader].sm.get("k16").as_deref()
    );
}

/// With no entry cache at all, a follower that was down while the log grew
/// is repaired from entries the leader reads back from its `LogStore` (no
/// snapshot exists to send instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_follower_catches_up_from_entries_read_back_from_the_log_store() {
    let config = Config {
        snapshot_every: 0,
        log_cache_bytes: 0,
        max_entries_per_message: 16,
        ..Config::default()
    };
    let mut c = Cluster::new(3, config).await;
    let (lagging, stopped, last) = c.write_without_a_follower(300).await;
    c.start(lagging, stopped.log, stopped.sm).await;
    c.wait_applied(lagging, last).await;
    let leader = c.leader().await;
    assert!(c.nodes[&lagging].raft.metrics().borrow().snapshot.is_none());
    for k in 0..17 {
        let k = format!("k{k}");
        assert_eq!(c.nodes[&lagging].sm.get(&k), c.nodes[&leader].sm.get(&k));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_batched_and_all_acknowledged() {
    let c = Cluster::new(3, Config::default()).await;
    let leader = c.leader().await;
    let raft = c.nodes[&leader].raft.clone();
    let mut tasks = Vec::new();
    for w in 0..64 {
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..20 {
                let cmd = KvCommand::Put {
                    key: format!("w{w}"),
                    value: format!("{i}"),
                };
                raft.client_write(cmd).await.expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    for w in 0..64 {
        assert_eq!(
            c.nodes[&leader].sm.get(&format!("w{w}")).as_deref(),
            Some("19")
        );
    }
    // 64 writers x 20 writes + the no-op and the configuration.
    let m = raft.metrics().borrow().clone();
    assert!(m.last_log_index >= LogIndex(64 * 20 + 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_transfer_hands_over_to_the_target() {
    let c = Cluster::new(3, Config::default()).await;
    let leader = c.leader().await;
    c.write("k", "v").await;
    let target = *c.nodes.keys().find(|id| **id != leader).expect("follower");
    c.nodes[&leader]
        .raft
        .transfer_leader(target)
        .await
        .expect("transfer starts");
    let mut m = c.nodes[&target].raft.metrics();
    tokio::time::timeout(WAIT, m.wait_for(|m| m.role == Role::Leader))
        .await
        .expect("target leads")
        .expect("metrics");
    c.write("k2", "v2").await;

    // Each node's leadership history: the first leader (the node had just
    // started), then the target, which was told to campaign; the others
    // saw its higher term first (the old leader may step down on the
    // target's vote request or on its first append).
    for (id, n) in &c.nodes {
        let m = n.raft.metrics().borrow().clone();
        let seen: Vec<_> = m.leadership.iter().map(|l| (l.leader, l.cause)).collect();
        let cause = match *id == target {
            true => ElectionCause::Transfer,
            false => ElectionCause::HigherTerm,
        };
        assert_eq!(
            seen,
            [(leader, ElectionCause::Start), (target, cause)],
            "node {id}: {:?}",
            m.leadership
        );
        let last = m.leadership.last().expect("a change");
        assert_eq!(last.term, m.term);
        assert!(last.known_at_ms >= last.lost_at_ms);
        assert_eq!(m.leaderless_since, None, "node {id} knows its leader");
    }
    let m = c.nodes[&target].raft.metrics().borrow().clone();
    let peers: Vec<NodeId> = m.progress.keys().copied().collect();
    assert_eq!(
        peers.len(),
        2,
        "the new leader tracks both peers: {:?}",
        m.progress
    );
    assert!(
        m.progress
            .values()
            .all(|p| p.voter && p.matched <= m.last_log_index)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initialize_twice_is_refused_with_a_typed_error() {
    let c = Cluster::new(1, Config::default()).await;
    c.leader().await;
    let members = BTreeMap::from([(NodeId(1), "node-1".to_string())]);
    let err = c.nodes[&NodeId(1)]
        .raft
        .initialize(members)
        .await
        .expect_err("already initialized");
    assert!(matches!(err, RaftError::Initialize(_)), "{err}");
}

#[test]
fn invalid_config_is_a_typed_error_at_start() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let bad = Config {
            heartbeat_interval_ms: 500,
            ..Config::default()
        };
        let router = MemRouter::<KvConfig>::new();
        let r = Raft::start(
            NodeId(1),
            bad,
            MemLogStore::new(),
            MemStateMachine::new(),
            router.factory(NodeId(1)),
        )
        .await;
        assert!(matches!(r, Err(raft_core::StartError::Config(_))));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_added_as_learner_promoted_led_and_the_old_leader_removed() {
    let mut c = Cluster::new(3, Config::default()).await;
    for i in 0..50 {
        c.write(&format!("k{i}"), "v").await;
    }
    // Nodes 4 and 5 start empty and uninitialized: they only learn of the
    // cluster when the leader adds them.
    for id in [4, 5] {
        c.start(NodeId(id), MemLogStore::new(), MemStateMachine::new())
            .await;
    }
    let leader = c.leader().await;
    let raft = c.nodes[&leader].raft.clone();
    // Two changes at once: the engine takes one at a time, so the second
    // waits in the handle until the first is committed, then goes ahead.
    let (four, five) = tokio::join!(
        raft.add_learner(NodeId(4), "node-4".into(), WAIT),
        raft.add_learner(NodeId(5), "node-5".into(), WAIT),
    );
    four.expect("learner 4 catches up");
    five.expect("learner 5 catches up");
    let learners = raft.metrics().borrow().membership.learner_ids();
    assert_eq!(learners, [4, 5].map(NodeId).into());
    let m = c.nodes[&NodeId(4)].raft.metrics().borrow().clone();
    assert_eq!(m.role, Role::Learner);
    // "Caught up" means within `learner_max_lag`; it goes on to apply all.
    let commit = raft.metrics().borrow().commit_index;
    c.wait_applied(NodeId(4), commit).await;
    assert_eq!(c.nodes[&NodeId(4)].sm.get("k49").as_deref(), Some("v"));

    // A second change while none is running is fine; bad ones are refused.
    let refused = raft.change_membership([NodeId(9)].into()).await;
    assert!(
        matches!(
            refused,
            Err(RaftError::Membership(
                raft_core::MembershipError::UnknownNode(NodeId(9))
            ))
        ),
        "{refused:?}"
    );
    raft.change_membership([1, 2, 3, 4].map(NodeId).into())
        .await
        .expect("promote 4");
    c.wait_view(NodeId(4), "itself promoted to voter", |m| {
        m.role == Role::Follower && m.membership.voter_ids().contains(&NodeId(4))
    })
    .await;

    raft.transfer_leader_and_wait(NodeId(4), WAIT)
        .await
        .expect("4 takes over");
    let four = c.nodes[&NodeId(4)].raft.clone();
    // A new leader knows its configuration is committed only once its
    // first entry commits; a change asked for before that waits for it
    // (the handle retries the engine's "in progress" refusal) instead of
    // failing.
    let remaining: std::collections::BTreeSet<NodeId> = [1, 2, 3, 4]
        .map(NodeId)
        .into_iter()
        .filter(|id| *id != leader)
        .collect();
    four.change_membership(remaining.clone())
        .await
        .expect("remove the old leader");
    let (idx, _) = c.write("after", "removal").await;
    for id in &remaining {
        c.wait_applied(*id, idx).await;
        let m = c.nodes[id].raft.metrics().borrow().clone();
        assert_eq!(m.membership.voter_ids(), remaining);
    }
    assert_ne!(c.leader().await, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_that_is_behind_is_promoted_only_once_it_has_caught_up() {
    let mut c = Cluster::new(3, Config::default()).await;
    c.start(NodeId(4), MemLogStore::new(), MemStateMachine::new())
        .await;
    let leader = c.leader().await;
    let raft = c.nodes[&leader].raft.clone();
    raft.add_learner(NodeId(4), "node-4".into(), WAIT)
        .await
        .expect("learner 4 catches up");
    // Cut off, it falls behind.
    c.router.isolate(NodeId(4));
    let lag = Config::default().learner_max_lag;
    for i in 0..lag + 50 {
        c.write(&format!("k{i}"), "v").await;
    }
    let four: std::collections::BTreeSet<NodeId> = [1, 2, 3, 4].map(NodeId).into();
    // The joint configuration could commit without it (three of four),
    // but its majority would then wait for node 4 at every later write.
    let early = tokio::time::timeout(
        Duration::from_millis(500),
        raft.change_membership(four.clone()),
    )
    .await;
    assert!(
        early.is_err(),
        "promoted a learner {lag}+ entries behind: {early:?}"
    );
    let m = raft.metrics().borrow().clone();
    assert!(
        !m.membership.is_joint() && !m.membership.is_voter(NodeId(4)),
        "a change was proposed while node 4 was behind: {:?}",
        m.membership
    );
    let behind = raft
        .wait_caught_up(NodeId(4), Duration::from_millis(100))
        .await;
    assert!(
        matches!(behind, Err(RaftError::LearnerBehind { id: NodeId(4), .. })),
        "{behind:?}"
    );
    c.router.heal();
    raft.change_membership(four)
        .await
        .expect("promoted once caught up");
    assert!(raft.metrics().borrow().membership.is_voter(NodeId(4)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_max_pending_fail_fast_when_configured_and_room_comes_back() {
    let config = Config {
        max_pending_writes: 1,
        when_full: raft_core::WhenFull::FailFast,
        check_quorum: false,
        ..Config::default()
    };
    // Without a quorum the first write stays pending, holding the only slot.
    let (mut c, leader, stopped) = Cluster::without_quorum(config).await;
    let raft = c.nodes[&leader].raft.clone();
    let before = raft.metrics().borrow().last_log_index;
    let first = tokio::spawn({
        let raft = raft.clone();
        async move {
            raft.client_write(KvCommand::Put {
                key: "a".into(),
                value: "1".into(),
            })
            .await
        }
    });
    c.wait_view(leader, "the first write in its log", |m| {
        m.last_log_index > before
    })
    .await;
    let second = tokio::time::timeout(
        WAIT,
        raft.client_write(KvCommand::Put {
            key: "b".into(),
            value: "2".into(),
        }),
    )
    .await
    .expect("a write past the limit must fail fast, not wait");
    assert!(
        matches!(second, Err(RaftError::Overloaded { pending: 1 })),
        "{second:?}"
    );
    // The quorum returns: the first write completes and frees its slot.
    c.restart_all(stopped).await;
    first.await.expect("task").expect("first write commits");
    raft.client_write(KvCommand::Put {
        key: "b".into(),
        value: "2".into(),
    })
    .await
    .expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_past_max_pending_fail_fast_when_configured_and_room_comes_back() {
    let config = Config {
        max_pending_reads: 1,
        when_full: raft_core::WhenFull::FailFast,
        check_quorum: false,
        ..Config::default()
    };
    // Without a quorum the first read's round never completes: it holds
    // the only slot.
    let (mut c, leader, stopped) = Cluster::without_quorum(config).await;
    let raft = c.nodes[&leader].raft.clone();
    let first = raft.ensure_linearizable();
    tokio::pin!(first);
    // Poll it once: it takes its slot and hands the read to the node.
    tokio::select! {
        biased;
        r = &mut first => panic!("a read completed without a quorum: {r:?}"),
        _ = std::future::ready(()) => {}
    }
    let second = tokio::time::timeout(WAIT, raft.ensure_linearizable())
        .await
        .expect("a read past the limit must fail fast, not wait");
    assert!(
        matches!(second, Err(RaftError::Overloaded { pending: 1 })),
        "{second:?}"
    );
    c.restart_all(stopped).await;
    tokio::time::timeout(WAIT, first)
        .await
        .expect("the first read completes once the quorum is back")
        .expect("first read");
    raft.ensure_linearizable().await.expect("room again");
}

/// A `MemStateMachine` whose snapshot builds wait for `gate` before they
/// finish, and say whether one was dropped unfinished (`abandoned`): a
/// storage engine's build (RocksDB's writes its file on a blocking thread)
/// goes on holding the store after its future is dropped.
#[derive(Clone)]
struct GatedBuilds {
    inner: MemStateMachine,
    begun: std::sync::Arc<tokio::sync::Notify>,
    gate: tokio::sync::watch::Receiver<bool>,
    abandoned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Marks its build abandoned unless disarmed by the build's end.
struct Unfinished(Option<std::sync::Arc<std::sync::atomic::AtomicBool>>);

impl Unfinished {
    fn finished(mut self) {
        self.0 = None;
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(flag) = self.0.take() {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[async_trait::async_trait]
impl raft_core::StateMachine<KvConfig> for GatedBuilds {
    async fn applied(&mut self) -> Result<raft_core::LogId, raft_core::StorageError> {
        self.inner.applied().await
    }
    async fn apply(
        &mut self,
        entries: Vec<raft_core::Entry<KvConfig>>,
    ) -> Result<Vec<KvResponse>, raft_core::StorageError> {
        self.inner.apply(entries).await
    }
    async fn build_snapshot(
        &mut self,
    ) -> Result<raft_core::SnapshotMeta<KvConfig>, raft_core::StorageError> {
        self.inner.build_snapshot().await
    }
    async fn begin_snapshot(
        &mut self,
    ) -> Result<raft_core::SnapshotBuild<KvConfig>, raft_core::StorageError> {
        let build = self.inner.begin_snapshot().await?;
        let mut gate = self.gate.clone();
        let guard = Unfinished(Some(self.abandoned.clone()));
        self.begun.notify_one();
        Ok(Box::pin(async move {
            let _ = gate.wait_for(|open| *open).await;
            let built = build.await;
            guard.finished();
            built
        }))
    }
    async fn current_snapshot(
        &mut self,
    ) -> Result<Option<raft_core::SnapshotMeta<KvConfig>>, raft_core::StorageError> {
        self.inner.current_snapshot().await
    }
    async fn read_snapshot_chunk(
        &mut self,
        snapshot_id: u64,
        offset: u64,
        max_len: usize,
    ) -> Result<Option<raft_core::SnapshotChunk>, raft_core::StorageError> {
        self.inner
            .read_snapshot_chunk(snapshot_id, offset, max_len)
            .await
    }
    async fn write_snapshot_chunk(
        &mut self,
        meta: &raft_core::SnapshotMeta<KvConfig>,
        offset: u64,
        data: Vec<u8>,
    ) -> Result<(), raft_core::StorageError> {
        self.inner.write_snapshot_chunk(meta, offset, data).await
    }
    async fn install_snapshot(
        &mut self,
        meta: &raft_core::SnapshotMeta<KvConfig>,
    ) -> Result<(), raft_core::StorageError> {
        self.inner.install_snapshot(meta).await
    }
}

/// `shutdown` returns only once the storage is released: a snapshot build
/// in flight is finished, not dropped, so whoever reopens the store next
/// (a restart in the same process) does not find it still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_a_snapshot_build_in_flight() {
    let (open, gate) = tokio::sync::watch::channel(false);
    let sm = GatedBuilds {
        inner: MemStateMachine::new(),
        begun: Default::default(),
        gate,
        abandoned: Default::default(),
    };
    let config = Config {
        snapshot_every: 5,
        ..Config::default()
    };
    let router = MemRouter::<KvConfig>::new();
    let id = NodeId(1);
    let raft = Raft::start(
        id,
        config,
        MemLogStore::new(),
        sm.clone(),
        router.factory(id),
    )
    .await
    .expect("start");
    raft.initialize(BTreeMap::from([(id, "node-1".to_string())]))
        .await
        .expect("initialize");
    let begun = sm.begun.notified();
    tokio::pin!(begun);
    for i in 0..10 {
        let cmd = KvCommand::Put {
            key: format!("k{i}"),
            value: "v".into(),
        };
        let deadline = tokio::time::Instant::now() + WAIT;
        while let Err(e) = raft.client_write(cmd.clone()).await {
            assert!(tokio::time::Instant::now() < deadline, "write failed: {e}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    tokio::time::timeout(WAIT, begun)
        .await
        .expect("a snapshot build begun");
    let stopping = raft.clone();
    let mut shutdown = tokio::spawn(async move { stopping.shutdown().await });
    // Opened once shutdown has returned (it must not have) or has had time
    // to; either way the build can then finish, and shutdown with it.
    let returned = tokio::select! {
        r = &mut shutdown => Some(r),
        _ = tokio::time::sleep(Duration::from_millis(200)) => None,
    };
    open.send(true).expect("gate");
    match returned {
        Some(r) => r.expect("shutdown task"),
        None => tokio::time::timeout(WAIT, shutdown)
            .await
            .expect("shutdown returned once the build could finish")
            .expect("shutdown task"),
    }
    assert!(
        !sm.abandoned.load(std::sync::atomic::Ordering::SeqCst),
        "shutdown dropped a snapshot build in flight"
    );
}

/// A follower whose storage was wiped comes back under its old id with an
/// empty log: the leader must not go on trusting the entries it had
/// acknowledged, but start it over from what it now holds, so it catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_lost_its_log_is_caught_up_from_what_it_holds() {
    let mut c = Cluster::new(3, Config::default()).await;
    for i in 0..50 {
        c.write(&format!("k{}", i % 7), &format!("a{i}")).await;
    }
    let leader = c.leader().await;
    let follower = *c.nodes.keys().find(|id| **id != leader).expect("follower");
    let before = c.write("k0", "before the wipe").await.0;
    c.wait_applied(follower, before).await;
    c.stop(follower).await;
    c.start(follower, MemLogStore::new(), MemStateMachine::new())
        .await;
    let mut last = LogIndex(0);
    for i in 0..20 {
        last = c.write(&format!("k{}", i % 7), &format!("b{i}")).await.0;
    }
    c.wait_applied(follower, last).await;
    assert_eq!(
        c.nodes[&follower].sm.get("k0"),
        c.nodes[&leader].sm.get("k0"),
        "the wiped follower holds the cluster's state again"
    );
}

/// Three nodes on `SlowAppends` disks that wait as `wait` says and on the
/// state machines `sm` makes, initialized through the first one (whose
/// answer comes once the configuration is durable); each node with its
/// log store and state machine.
async fn three_on_slow_disks<S: raft_core::StateMachine<KvConfig> + Clone>(
    config: Config,
    wait: Wait,
    sm: impl Fn() -> S,
) -> Vec<(Raft<KvConfig>, SlowAppends, S)> {
    let router = MemRouter::<KvConfig>::new();
    let members: BTreeMap<NodeId, String> =
        (1..=3).map(|i| (NodeId(i), format!("node-{i}"))).collect();
    let mut nodes = Vec::new();
    for id in members.keys() {
        let log = SlowAppends {
            inner: MemLogStore::new(),
            wait,
        };
        let sm = sm();
        let raft = Raft::start(
            *id,
            config.clone(),
            log.clone(),
            sm.clone(),
            router.factory(*id),
        )
        .await
        .expect("start");
        router.register(*id, raft.clone());
        nodes.push((raft, log, sm));
    }
    tokio::time::timeout(WAIT, nodes[0].0.initialize(members))
        .await
        .expect("initialize answered")
        .expect("initialize");
    nodes
}

/// The driver runs the workers of stores that never block inside its own
/// task and the others on tasks of their own; the memory stores take the
/// first way, so this cluster takes the second for both lanes (the log
/// store blocks, the state machine keeps the default answer): every
/// write is acknowledged once, and every node ends with the same log and
/// state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stores_that_may_block_are_run_on_worker_tasks_of_their_own() {
    let (open, gate) = tokio::sync::watch::channel(true);
    drop(open);
    let nodes = three_on_slow_disks(
        Config::default(),
        Wait::Block(Duration::from_millis(1)),
        || GatedBuilds {
            inner: MemStateMachine::new(),
            begun: Default::default(),
            gate: gate.clone(),
            abandoned: Default::default(),
        },
    )
    .await;
    for (_, log, sm) in &nodes {
        assert!(!raft_core::LogStore::never_blocks(log));
        assert!(!raft_core::StateMachine::never_blocks(sm));
    }
    let leader = tokio::time::timeout(WAIT, nodes[0].0.wait_for_leader(WAIT))
        .await
        .ok()
        .flatten()
        .expect("a leader");
    let raft = nodes[(leader.0 - 1) as usize].0.clone();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            let mut last = LogIndex(0);
            for i in 0..20 {
                let cmd = KvCommand::Put {
                    key: format!("w{w}"),
                    value: format!("{i}"),
                };
                last = raft.client_write(cmd).await.expect("write").0.index;
            }
            last
        }));
    }
    let mut last = LogIndex(0);
    for t in tasks {
        let wrote = tokio::time::timeout(WAIT, t)
            .await
            .expect("writes answered");
        last = last.max(wrote.expect("writer"));
    }
    for (raft, log, sm) in &nodes {
        let mut m = raft.metrics();
        tokio::time::timeout(WAIT, m.wait_for(|m| m.applied_index >= last))
            .await
            .expect("every node applies every write")
            .expect("metrics");
        for w in 0..16 {
            assert_eq!(sm.inner.get(&format!("w{w}")).as_deref(), Some("19"));
        }
        let mut log = log.clone();
        let entries = raft_core::LogStore::read(&mut log, LogIndex(1), last)
            .await
            .expect("read");
        assert_eq!(entries.len() as u64, last.0, "node {} log", raft.id());
    }
    for (raft, ..) in nodes {
        raft.shutdown().await;
    }
}

/// How a slow disk's appends wait.
#[derive(Clone, Copy)]
enum Wait {
    /// Blocking the thread, as a plain `fsync` does: such a store keeps the
    /// default answer to `never_blocks`, and its worker has a task of its
    /// own.
    Block(Duration),
    /// Awaiting the runtime's time without blocking: the store never
    /// blocks, and its worker runs inside the driver's task.
    Await(Duration),
}

/// A `MemLogStore` whose every append takes a while, waiting as `wait`
/// says.
#[derive(Clone)]
struct SlowAppends {
    inner: MemLogStore<KvConfig>,
    wait: Wait,
}

#[async_trait::async_trait]
impl raft_core::LogStore<KvConfig> for SlowAppends {
    async fn log_state(&mut self) -> Result<raft_core::LogState, raft_core::StorageError> {
        self.inner.log_state().await
    }
    async fn read(
        &mut self,
        from: LogIndex,
        to: LogIndex,
    ) -> Result<Vec<raft_core::Entry<KvConfig>>, raft_core::StorageError> {
        self.inner.read(from, to).await
    }
    async fn append(
        &mut self,
        entries: Vec<raft_core::Entry<KvConfig>>,
    ) -> Result<(), raft_core::StorageError> {
        match self.wait {
            Wait::Block(d) => std::thread::sleep(d),
            Wait::Await(d) => tokio::time::sleep(d).await,
        }
        self.inner.append(entries).await
    }
    async fn truncate(&mut self, from: LogIndex) -> Result<(), raft_core::StorageError> {
        self.inner.truncate(from).await
    }
    async fn purge(&mut self, upto: raft_core::LogId) -> Result<(), raft_core::StorageError> {
        self.inner.purge(upto).await
    }
    async fn save_hard_state(
        &mut self,
        hard_state: raft_core::HardState,
    ) -> Result<(), raft_core::StorageError> {
        self.inner.save_hard_state(hard_state).await
    }
    async fn load_hard_state(&mut self) -> Result<raft_core::HardState, raft_core::StorageError> {
        self.inner.load_hard_state().await
    }
    fn never_blocks(&self) -> bool {
        matches!(self.wait, Wait::Await(_))
    }
}

/// A log worker that runs inside the driver's task is polled beside the
/// driver's other waits, never awaited alone: with every append taking
/// three maximum election timeouts, heartbeats still go out and are
/// answered, so the first leader keeps its term through every write.
/// Virtual time (`start_paused`): the delays cost nothing and the run is
/// the same every time.
#[tokio::test(start_paused = true)]
async fn appends_slower_than_an_election_timeout_do_not_hold_up_heartbeats() {
    let config = Config::default();
    let delay = Duration::from_millis(3 * config.election_timeout_max_ms);
    let nodes: Vec<Raft<KvConfig>> =
        three_on_slow_disks(config, Wait::Await(delay), MemStateMachine::new)
            .await
            .into_iter()
            .map(|(raft, ..)| raft)
            .collect();
    let leader = nodes[0].wait_for_leader(WAIT).await.expect("a leader");
    let raft = nodes[(leader.0 - 1) as usize].clone();
    let before: Vec<_> = nodes.iter().map(|r| r.metrics().borrow().clone()).collect();
    for i in 0..10 {
        let cmd = KvCommand::Put {
            key: format!("k{i}"),
            value: "v".into(),
        };
        tokio::time::timeout(WAIT, raft.client_write(cmd))
            .await
            .expect("write answered")
            .expect("write committed under the first leader");
    }
    no_election_since(&nodes, before, "while appends were slow");
    for r in nodes {
        r.shutdown().await;
    }
}

/// Asserts that no node's term, leader or election count moved since
/// `before` (each node's metrics then).
fn no_election_since(nodes: &[Raft<KvConfig>], before: Vec<RaftMetrics<String>>, when: &str) {
    for (r, was) in nodes.iter().zip(before) {
        let now = r.metrics().borrow().clone();
        assert_eq!(
            (now.term, now.leader_id, now.elections),
            (was.term, was.leader_id, was.elections),
            "node {} saw an election {when}",
            r.id()
        );
    }
}

/// Answers to one node's RPCs that arrive inside a window are held back
/// until the window's end, as a peer link does behind a stalled runtime
/// (or a node's own runtime does when it is busy elsewhere): every answer
/// of the window then lands at once.
#[derive(Clone, Default)]
struct HeldAnswers {
    /// Whose answers, from when, and until when.
    hold: std::sync::Arc<
        std::sync::Mutex<Option<(NodeId, tokio::time::Instant, tokio::time::Instant)>>,
    >,
}

impl HeldAnswers {
    fn set(&self, from: NodeId, until: tokio::time::Instant) {
        *self.hold.lock().expect("hold") = Some((from, tokio::time::Instant::now(), until));
    }

    /// Waits, if an answer to `from` arriving now is held.
    async fn deliver(&self, from: NodeId) {
        let now = tokio::time::Instant::now();
        let hold = *self.hold.lock().expect("hold");
        if let Some((who, start, until)) = hold
            && who == from
            && (start..until).contains(&now)
        {
            tokio::time::sleep_until(until).await;
        }
    }

    /// Nodes 1 to `n` on `router`, each calling its peers through this
    /// hold, not initialized; node `i` is at index `i - 1`.
    async fn start(
        &self,
        router: &MemRouter<KvConfig>,
        config: &Config,
        n: u64,
    ) -> Vec<Raft<KvConfig>> {
        let mut nodes = Vec::new();
        for i in 1..=n {
            let id = NodeId(i);
            let raft = Raft::start(
                id,
                config.clone(),
                MemLogStore::new(),
                MemStateMachine::new(),
                self.factory(router, id),
            )
            .await
            .expect("start");
            router.register(id, raft.clone());
            nodes.push(raft);
        }
        nodes
    }

    fn factory(&self, router: &MemRouter<KvConfig>, from: NodeId) -> HeldFactory {
        HeldFactory {
            inner: router.factory(from),
            held: self.clone(),
            from,
        }
    }
}

struct HeldFactory {
    inner: raft_core::memory::MemNetworkFactory<KvConfig>,
    held: HeldAnswers,
    from: NodeId,
}

impl raft_core::NetworkFactory<KvConfig> for HeldFactory {
    type Network = HeldNetwork;
    fn connect(&mut self, target: NodeId, node: &String) -> HeldNetwork {
        HeldNetwork {
            inner: self.inner.connect(target, node),
            held: self.held.clone(),
            from: self.from,
        }
    }
}

struct HeldNetwork {
    inner: raft_core::memory::MemNetwork<KvConfig>,
    held: HeldAnswers,
    from: NodeId,
}

impl HeldNetwork {
    /// `call`'s answer, once its hold (if any) is over.
    async fn held<T>(&self, call: impl std::future::Future<Output = T>) -> T {
        let answer = call.await;
        self.held.deliver(self.from).await;
        answer
    }
}

#[async_trait::async_trait]
impl raft_core::Network<KvConfig> for HeldNetwork {
    async fn append_entries(
        &self,
        req: raft_core::AppendEntriesRequest<KvConfig>,
    ) -> Result<raft_core::AppendEntriesResponse, raft_core::NetworkError> {
        self.held(self.inner.append_entries(req)).await
    }
    async fn vote(
        &self,
        req: raft_core::VoteRequest,
    ) -> Result<raft_core::VoteResponse, raft_core::NetworkError> {
        self.held(self.inner.vote(req)).await
    }
    async fn install_snapshot(
        &self,
        req: raft_core::InstallSnapshotRequest<KvConfig>,
    ) -> Result<raft_core::InstallSnapshotResponse, raft_core::NetworkError> {
        self.held(self.inner.install_snapshot(req)).await
    }
    async fn timeout_now(
        &self,
        req: raft_core::TimeoutNowRequest,
    ) -> Result<(), raft_core::NetworkError> {
        self.inner.timeout_now(req).await
    }
}

/// A learner as current as the voters is caught up while the leader holds
/// writes no follower has acknowledged yet. Under load, or over a link of
/// some latency, there always are some; counted against the learner, they
/// kept it more than `learner_max_lag` behind for as long as clients
/// wrote, and it was never promoted. Here every answer to the leader is
/// held (for less than an election timeout) while it appends twice
/// `learner_max_lag` writes and sends them to everyone. Virtual time.
#[tokio::test(start_paused = true)]
async fn a_learner_as_current_as_the_voters_is_caught_up_while_writes_are_in_flight() {
    let config = Config::default();
    let router = MemRouter::<KvConfig>::new();
    let held = HeldAnswers::default();
    let nodes = held.start(&router, &config, 4).await;
    let voters: BTreeMap<NodeId, String> =
        (1..=3).map(|i| (NodeId(i), format!("node-{i}"))).collect();
    nodes[0].initialize(voters).await.expect("initialize");
    let leader = nodes[0].wait_for_leader(WAIT).await.expect("a leader");
    let raft = nodes[(leader.0 - 1) as usize].clone();
    raft.add_learner(NodeId(4), "node-4".into(), WAIT)
        .await
        .expect("learner 4 catches up");
    let mut m = raft.metrics();
    let settled = m
        .wait_for(|m| {
            m.commit_index == m.last_log_index
                && m.replication.get(&NodeId(4)) == Some(&m.last_log_index)
        })
        .await
        .expect("metrics")
        .commit_index;

    let hold = Duration::from_millis(config.election_timeout_min_ms / 2);
    held.set(leader, tokio::time::Instant::now() + hold);
    let n = 2 * config.learner_max_lag;
    let writes: Vec<_> = (0..n)
        .map(|i| {
            let raft = raft.clone();
            tokio::spawn(async move {
                let cmd = KvCommand::Put {
                    key: format!("k{i}"),
                    value: "v".into(),
                };
                raft.client_write(cmd).await
            })
        })
        .collect();
    let m = m
        .wait_for(|m| m.last_log_index.0 >= settled.0 + n)
        .await
        .expect("metrics")
        .clone();
    assert_eq!(m.commit_index, settled, "nothing is acknowledged yet");
    assert_eq!(m.replication.get(&NodeId(4)), Some(&settled));
    raft.wait_caught_up(NodeId(4), hold / 4)
        .await
        .expect("as current as the voters: caught up");

    for w in writes {
        w.await.expect("writer").expect("the write commits");
    }
    for r in nodes {
        r.shutdown().await;
    }
}

/// Check-quorum judges a leader by the answers it has, and every answer
/// that is in when the check fires counts, however many came at once: four
/// voters (the leader needs two followers heard in each window), and every
/// follower's answer in one whole check-quorum window held back to the
/// window's last instant, when the leader's check fires too. The leader
/// keeps its term. (Seen in `cargo xtask bench join`: a leader's turn came
/// 60 ms late, and it stepped down with its followers' answers waiting,
/// unread, in its queue.) Virtual time: the run is the same every time.
#[tokio::test(start_paused = true)]
async fn answers_that_arrive_with_the_check_quorum_deadline_count() {
    let config = Config::default();
    let window = Duration::from_millis(config.election_timeout_min_ms);
    let router = MemRouter::<KvConfig>::new();
    let held = HeldAnswers::default();
    let members: BTreeMap<NodeId, String> =
        (1..=4).map(|i| (NodeId(i), format!("node-{i}"))).collect();
    let nodes = held.start(&router, &config, 4).await;
    nodes[0].initialize(members).await.expect("initialize");
    // Every node hears of the leader at the instant it is elected (the
    // network takes no time), and its first check-quorum window starts
    // then.
    let leader = nodes[0].wait_for_leader(WAIT).await.expect("a leader");
    let elected = tokio::time::Instant::now();
    let raft = nodes[(leader.0 - 1) as usize].clone();
    assert_eq!(raft.metrics().borrow().role, Role::Leader);
    let before: Vec<_> = nodes.iter().map(|r| r.metrics().borrow().clone()).collect();
    // The first window passes as usual; from within it to the second
    // check, the followers' answers are held back until that check.
    tokio::time::sleep_until(elected + window * 5 / 6).await;
    held.set(leader, elected + 2 * window);
    tokio::time::sleep_until(elected + 4 * window).await;
    no_election_since(&nodes, before, "with its answers held to the check");
    for r in nodes {
        r.shutdown().await;
    }
}
