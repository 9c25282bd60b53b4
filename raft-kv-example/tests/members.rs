//! Membership over HTTP on real QUIC and RocksDB: a node joins with
//! `--join`, is promoted, takes over leadership, the old leader is removed,
//! and the new node restarts from its data dir without `--join`.

mod common;

use std::time::Duration;

use common::{Cluster, free_addr};
use raft_core::NodeId;
use raft_kv_example::client::{Client, ClientError};
use raft_kv_example::http::Status;
use raft_kv_example::{ClusterFile, Node};
use reqwest::StatusCode;
use serde_json::json;

fn api_code(e: ClientError) -> (StatusCode, String) {
    match e {
        ClientError::Api { status, code, .. } => (status, code),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Polls a node's status until `ok` holds (every view of the cluster
/// trails the leader's by a round trip).
async fn wait_status(c: &Client, what: &str, ok: impl Fn(&Status) -> bool) {
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let s = c.status().await.expect("status");
        if ok(&s) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never saw {what}; last status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_joins_is_promoted_takes_over_and_the_old_leader_is_removed() {
    let mut cluster = Cluster::start(3, "").await;
    let old_leader = cluster.leader().await;
    let follower = cluster.follower().await;
    let c = cluster.client_waiting(follower, Duration::from_secs(60));
    for i in 0..50 {
        c.put(&format!("k{i}"), b"v").await.expect("put");
    }

    // Node 4's own file (its addresses; same directory, so same certs/).
    let (raft4, http4) = (free_addr(), free_addr());
    let path = cluster.path().join("join.toml");
    std::fs::write(
        &path,
        format!("[[node]]\nid = 4\nraft_addr = \"{raft4}\"\nhttp_addr = \"{http4}\"\n"),
    )
    .expect("write join file");
    let join_file = ClusterFile::load(&path).expect("join file");
    // Node 4's certificates, from the cluster's CA.
    raft_kv_example::certs::issue(&join_file, &join_file.tls_dir).expect("certs for node 4");

    // Joining through a follower: the add is redirected to the leader.
    let four = Node::start_with(&join_file, NodeId(4), Some(&cluster.endpoint(follower)))
        .await
        .expect("node 4 joins");
    // The follower sees the new configuration once it has appended it.
    wait_status(&c, "node 4 listed as a learner", |s| {
        s.voters == [1, 2, 3] && s.learners == [4]
    })
    .await;
    let c4 = cluster.client_at(&format!("https://{http4}"));
    common::wait_applied(&c4, "k49", "learner never applied k49").await;
    assert_eq!(c4.status().await.expect("status").role, "learner");

    // Refusals are typed and leave the cluster as it was.
    let (status, code) = api_code(c.promote_member(9).await.expect_err("unknown"));
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "unknown_member")
    );
    let (status, code) = api_code(
        c.add_member(4, &raft4.to_string(), &http4.to_string())
            .await
            .expect_err("dup"),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "already_member")
    );
    let (status, code) = api_code(
        c.add_member(5, "nowhere", "127.0.0.1:1")
            .await
            .expect_err("bad addr"),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "bad_request")
    );

    let promoted = c.promote_member(4).await.expect("promote");
    assert_eq!(promoted, json!({"voters": [1, 2, 3, 4], "learners": []}));
    // Node 4 votes once it has appended the final configuration, which
    // may be just after the leader committed it.
    wait_status(&c4, "node 4 a follower", |s| s.role == "follower").await;

    c.transfer_leader(4).await.expect("transfer to 4");
    wait_status(&c4, "node 4 leading", |s| s.role == "leader").await;

    // Remove the old leader, through a node that is not the leader.
    let removed = c
        .remove_member(old_leader.0)
        .await
        .expect("remove old leader");
    let remaining: Vec<u64> = [1, 2, 3, 4]
        .into_iter()
        .filter(|id| *id != old_leader.0)
        .collect();
    assert_eq!(removed["voters"], json!(remaining));
    cluster.stop_node(old_leader).await;

    c4.put("after", b"removal")
        .await
        .expect("put after removal");
    assert_eq!(c4.get("k7", false).await.expect("get"), Some(b"v".to_vec()));

    // Restarted without --join, node 4 recovers as a voter from its data dir.
    four.stop().await;
    let any = remaining
        .iter()
        .copied()
        .find(|id| *id != 4)
        .map(NodeId)
        .expect("a survivor");
    let cs = cluster.client(any);
    let four = Node::start_with(&join_file, NodeId(4), None)
        .await
        .expect("restart 4");
    cs.put("while", b"restarted").await.expect("put");
    common::wait_applied(&c4, "while", "restarted node 4 never caught up").await;
    wait_status(&c4, "node 4 recovered as a voter", |s| {
        s.voters == remaining
    })
    .await;
    four.stop().await;
    cluster.shutdown().await;
}

/// A node whose data directory was wiped comes back under its old id. The
/// cluster recorded its old identity, so the node says it is not
/// recognized and the leader lists it as such: it follows the log but
/// neither votes nor counts toward commits. The operator removes it and
/// adds it back, and it is a voter again under its new identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wiped_node_counts_again_only_once_removed_and_added_back() {
    let mut cluster = Cluster::start(3, "").await;
    let leader = cluster.leader().await;
    let wiped = cluster.follower().await;
    let c = cluster.client_waiting(leader, Duration::from_secs(60));
    for i in 0..20 {
        c.put(&format!("k{i}"), b"v").await.expect("put");
    }
    let cw = cluster.client(wiped);
    let before = cw.status().await.expect("status").uuid;
    assert_eq!(before.len(), 32, "a uuid of 32 hex digits: {before:?}");

    let cluster_id = one_cluster_id(&cluster).await;
    cluster.stop_node(wiped).await;
    std::fs::remove_dir_all(cluster.data_dir(wiped)).expect("wipe the data dir");
    // Its file changed since the cluster was founded (a node 4 was listed
    // since): the id it would derive from it is not the cluster's, and it
    // must take the cluster's instead of refusing it.
    let mut four = cluster.file.nodes[&NodeId(3)].clone();
    four.id = NodeId(4);
    four.raft_addr = free_addr();
    four.http_addr = free_addr();
    cluster.file.nodes.insert(NodeId(4), four);
    cluster.start_node(wiped).await;
    let after = cw.status().await.expect("status").uuid;
    assert_ne!(after, before, "a wiped node draws a new identity");
    wait_status(&cw, "the wiped node not recognized", |s| !s.recognized).await;
    wait_status(&c, "the leader listing the wiped node", |s| {
        s.unrecognized == [wiped.0]
    })
    .await;
    // It still receives the log, like a learner.
    common::wait_applied(&cw, "k19", "the wiped node never received the log again").await;

    // The operator removes it and adds it back.
    let me = &cluster.file.nodes[&wiped];
    let (raft_addr, http_addr) = (me.raft_addr.to_string(), me.http_addr.to_string());
    c.remove_member(wiped.0).await.expect("remove");
    c.add_member(wiped.0, &raft_addr, &http_addr)
        .await
        .expect("add back");
    c.promote_member(wiped.0).await.expect("promote");
    wait_status(&cw, "the node recognized as a voter", |s| {
        s.recognized && s.voters == [1, 2, 3] && s.role == "follower"
    })
    .await;
    wait_status(&c, "the leader recognizing everyone", |s| {
        s.unrecognized.is_empty() && s.voters == [1, 2, 3]
    })
    .await;
    assert_eq!(cw.status().await.expect("status").uuid, after);
    c.put("after", b"re-added").await.expect("put");
    assert_eq!(one_cluster_id(&cluster).await, cluster_id);
    cluster.shutdown().await;
}

/// A node with no data whose file names only itself does not found a
/// cluster of its own unless told to (issue 16: an operator who forgot
/// `--join` got a second cluster): it refuses, naming `--join` and
/// `--bootstrap`; with `bootstrap` it founds a one-node cluster and serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_alone_in_its_file_founds_a_cluster_only_when_told_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("alone.toml");
    std::fs::write(
        &path,
        format!(
            "[[node]]\nid = 1\nraft_addr = \"{}\"\nhttp_addr = \"{}\"\n",
            free_addr(),
            free_addr()
        ),
    )
    .expect("write file");
    let file = ClusterFile::load(&path).expect("file");
    raft_kv_example::certs::issue(&file, &file.tls_dir).expect("certs");

    let refused = Node::start(&file, NodeId(1)).await.err().expect("refused");
    let text = refused.to_string();
    assert!(
        text.contains("--join") && text.contains("--bootstrap"),
        "{text}"
    );

    let node = Node::start_as(&file, NodeId(1), None, true)
        .await
        .expect("bootstraps when told to");
    let c = Client::with_options(
        &[&common::endpoint(&file, NodeId(1))],
        common::options(&file),
    )
    .expect("client");
    c.put("k", b"v")
        .await
        .expect("a one-node cluster takes writes");
    node.stop().await;

    // Its data now says what it is: a restart needs no flag.
    let node = Node::start(&file, NodeId(1)).await.expect("recovers");
    assert_eq!(c.get("k", false).await.expect("get"), Some(b"v".to_vec()));
    node.stop().await;
}

/// `POST /v1/members/{id}/demote`: a voter becomes a learner, keeps
/// receiving writes, and can be promoted back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_demoted_voter_is_a_learner_that_keeps_up_and_can_be_promoted_again() {
    let cluster = Cluster::start(3, "").await;
    let follower = cluster.follower().await;
    let c = cluster.client(follower);
    let answer = c.demote_member(follower.0).await.expect("demote");
    let voters: Vec<u64> = [1, 2, 3]
        .into_iter()
        .filter(|id| *id != follower.0)
        .collect();
    assert_eq!(answer["voters"], json!(voters));
    assert_eq!(answer["learners"], json!([follower.0]));
    wait_status(&c, "the follower a learner", |s| s.role == "learner").await;
    c.put("while", b"demoted").await.expect("put");
    common::wait_applied(&c, "while", "the learner stopped receiving the log").await;
    let (status, code) = api_code(c.demote_member(follower.0).await.expect_err("a learner"));
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_change")
    );
    c.promote_member(follower.0).await.expect("promote back");
    wait_status(&c, "the follower a voter again", |s| {
        s.voters == vec![1, 2, 3] && s.role == "follower"
    })
    .await;
    cluster.shutdown().await;
}

/// Waits until every node of `c` reports the same cluster id; that id.
async fn one_cluster_id(c: &Cluster) -> String {
    let clients: Vec<Client> = c.nodes.keys().map(|id| c.client(*id)).collect();
    let deadline = tokio::time::Instant::now() + common::WAIT;
    loop {
        let mut ids = Vec::new();
        for client in &clients {
            ids.push(client.status().await.expect("status").cluster_id);
        }
        if ids[0].len() == 16 && ids.iter().all(|id| *id == ids[0]) {
            return ids[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the nodes never agreed on a cluster id: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Each cluster gets an id when it is founded; a node of another cluster
/// (here: one whose data comes from a cluster founded elsewhere with the
/// same CA, started at a member's address) is refused by id, and takes
/// nothing from the cluster it reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_of_another_cluster_is_refused_by_id() {
    let mut a = Cluster::start(3, "").await;
    let mut b = Cluster::prepare(3, "").await;
    // The same CA for both: TLS alone would not tell them apart.
    for entry in std::fs::read_dir(&a.file.tls_dir).expect("certs") {
        let entry = entry.expect("cert");
        std::fs::copy(entry.path(), b.file.tls_dir.join(entry.file_name())).expect("copy");
    }
    for id in [1, 2, 3].map(NodeId) {
        b.start_node(id).await;
    }
    let cb = b.client(b.leader().await);
    cb.put("b", b"only").await.expect("put");

    // Each cluster's first leader records its id; the others adopt it from
    // its next request.
    let id_a = one_cluster_id(&a).await;
    let id_b = one_cluster_id(&b).await;
    assert_ne!(id_a, id_b);

    // Node 3 of A is replaced by node 3 of B: B's data at A's address.
    // (The put committed on a majority; node 3 may not have applied it.)
    let b3 = b.client(NodeId(3));
    common::wait_applied(&b3, "b", "B's node 3 never applied the put").await;
    b.stop_node(NodeId(3)).await;
    a.stop_node(NodeId(3)).await;
    let mut file = a.file.clone();
    file.nodes.get_mut(&NodeId(3)).expect("node 3").data_dir = b.data_dir(NodeId(3));
    let stranger = Node::start(&file, NodeId(3)).await.expect("starts");
    let ca = a.client(a.leader().await);
    ca.put("a", b"only")
        .await
        .expect("A commits with nodes 1 and 2");
    let deadline = tokio::time::Instant::now() + common::WAIT;
    while stranger.cluster().refused() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "A's leader was never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c3 = a.client_at(&format!("https://{}", stranger.http_addr));
    let s = c3.status().await.expect("status");
    assert_eq!(s.cluster_id, id_b);
    assert_ne!(s.leader_id, Some(a.leader().await.0), "{s:?}");
    assert_eq!(c3.get("a", true).await.expect("stale get"), None);
    assert_eq!(
        c3.get("b", true).await.expect("stale get"),
        Some(b"only".to_vec())
    );
    stranger.stop().await;
    a.shutdown().await;
    b.shutdown().await;
}
