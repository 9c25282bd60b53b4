//! A real cluster over QUIC on 127.0.0.1, and hostile peers speaking raw
//! QUIC to it. In-memory storage; behaviour is asserted, never timing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use raft_core::memory::{KvCommand, KvConfig, MemLogStore, MemStateMachine};
use raft_core::{Config, LogIndex, NodeId, Raft, Role};
use raft_transport_quic::tls::{DevCerts, node_name};
use raft_transport_quic::{QuicConfig, QuicTransport};

const WAIT: Duration = Duration::from_secs(30);

struct Node {
    raft: Raft<KvConfig>,
    transport: QuicTransport,
    log: MemLogStore<KvConfig>,
    sm: MemStateMachine,
    addr: SocketAddr,
}

fn quic_config(bind: SocketAddr) -> QuicConfig {
    QuicConfig {
        bind,
        max_frame_bytes: 64 << 10,
        rpc_timeout: Duration::from_millis(500),
        ..QuicConfig::default()
    }
}

fn raft_config() -> Config {
    // Chunks well under the frame limit; snapshots far larger than a frame.
    Config {
        snapshot_every: 2_000,
        purge_keep: 100,
        snapshot_chunk_bytes: 16 << 10,
        ..Config::default()
    }
}

async fn start(
    certs: &DevCerts,
    id: NodeId,
    bind: SocketAddr,
    log: MemLogStore<KvConfig>,
    sm: MemStateMachine,
) -> Node {
    // A restarted node rebinds its old port, which the closed endpoint's
    // driver releases shortly after the last handle goes.
    let deadline = tokio::time::Instant::now() + WAIT;
    let transport = loop {
        match QuicTransport::bind(quic_config(bind), certs.identity(id).expect("identity")) {
            Ok(t) => break t,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "bind: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let addr = transport.local_addr().expect("addr");
    let raft = Raft::start(
        id,
        raft_config(),
        log.clone(),
        sm.clone(),
        transport.network_factory(),
    )
    .await
    .expect("start");
    transport.serve(raft.clone());
    Node {
        raft,
        transport,
        log,
        sm,
        addr,
    }
}

async fn cluster(certs: &DevCerts, n: u64) -> BTreeMap<NodeId, Node> {
    let mut nodes = BTreeMap::new();
    for i in 1..=n {
        let any = SocketAddr::from(([127, 0, 0, 1], 0));
        nodes.insert(
            NodeId(i),
            start(
                certs,
                NodeId(i),
                any,
                MemLogStore::new(),
                MemStateMachine::new(),
            )
            .await,
        );
    }
    let members: BTreeMap<NodeId, String> = nodes
        .iter()
        .map(|(id, n)| (*id, n.addr.to_string()))
        .collect();
    for n in nodes.values() {
        n.raft
            .initialize(members.clone())
            .await
            .expect("initialize");
    }
    nodes
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

async fn put(nodes: &BTreeMap<NodeId, Node>, k: String, v: String) -> LogIndex {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let l = leader(nodes).await;
        match nodes[&l]
            .raft
            .client_write(KvCommand::Put {
                key: k.clone(),
                value: v.clone(),
            })
            .await
        {
            Ok((id, _)) => return id.index,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "put failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stops a node and releases its socket; returns its storage and address.
async fn stop(
    nodes: &mut BTreeMap<NodeId, Node>,
    id: NodeId,
) -> (MemLogStore<KvConfig>, MemStateMachine, SocketAddr) {
    let n = nodes.remove(&id).expect("running");
    n.raft.shutdown().await;
    n.transport.close().await;
    (n.log, n.sm, n.addr)
}

async fn wait_applied(n: &Node, index: LogIndex) {
    let mut m = n.raft.metrics();
    tokio::time::timeout(WAIT, m.wait_for(|m| m.applied_index >= index))
        .await
        .expect("caught up")
        .expect("metrics");
}

/// `writers` tasks each writing `per_writer` 100-byte values through the
/// leader; returns the index of a write made after all of them.
async fn bulk(nodes: &BTreeMap<NodeId, Node>, writers: usize, per_writer: usize) -> LogIndex {
    let raft = nodes[&leader(nodes).await].raft.clone();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                let cmd = KvCommand::Put {
                    key: format!("w{w}-{i}"),
                    value: format!("{i:0>100}"),
                };
                raft.client_write(cmd).await.expect("write over quic");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    put(nodes, "after".into(), "bulk".into()).await
}

async fn shutdown(nodes: BTreeMap<NodeId, Node>) {
    for n in nodes.values() {
        n.raft.shutdown().await;
        n.transport.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_replicate_to_every_node() {
    let certs = DevCerts::generate((1..=3).map(NodeId)).expect("certs");
    let nodes = cluster(&certs, 3).await;
    // 10,000 replicated writes from 50 concurrent writers.
    let last = bulk(&nodes, 50, 200).await;
    for n in nodes.values() {
        wait_applied(n, last).await;
        assert_eq!(n.sm.get("w49-199"), Some(format!("{:0>100}", 199)));
    }
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_restarted_on_its_address_catches_up() {
    let certs = DevCerts::generate((1..=3).map(NodeId)).expect("certs");
    let mut nodes = cluster(&certs, 3).await;
    bulk(&nodes, 10, 20).await;
    let l = leader(&nodes).await;
    let f = *nodes.keys().find(|id| **id != l).expect("follower");
    let (log, sm, addr) = stop(&mut nodes, f).await;
    let idx = put(&nodes, "while-down".into(), "x".into()).await;
    let back = start(&certs, f, addr, log, sm).await;
    wait_applied(&back, idx).await;
    assert_eq!(back.sm.get("while-down").as_deref(), Some("x"));
    nodes.insert(f, back);
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_keeps_every_acknowledged_write() {
    let certs = DevCerts::generate((1..=3).map(NodeId)).expect("certs");
    let mut nodes = cluster(&certs, 3).await;
    bulk(&nodes, 10, 20).await;
    let l = leader(&nodes).await;
    stop(&mut nodes, l).await;
    let new = leader(&nodes).await;
    assert_ne!(new, l);
    let idx = put(&nodes, "failover".into(), "y".into()).await;
    for n in nodes.values() {
        wait_applied(n, idx).await;
        assert_eq!(
            n.sm.get("w7-19"),
            Some(format!("{:0>100}", 19)),
            "acknowledged writes survive failover"
        );
    }
    shutdown(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_node_catches_up_by_a_snapshot_many_frames_long() {
    let certs = DevCerts::generate((1..=3).map(NodeId)).expect("certs");
    let mut nodes = cluster(&certs, 3).await;
    // 7,000 writes of ~110 bytes: past `snapshot_every` (2,000), so the
    // leader builds a snapshot and purges the log behind it, and the
    // snapshot is over ten 64 KiB frames.
    bulk(&nodes, 50, 140).await;
    let l = leader(&nodes).await;
    let f = *nodes.keys().find(|id| **id != l).expect("follower");
    let (_, _, addr) = stop(&mut nodes, f).await;
    let idx = put(&nodes, "while-wiped".into(), "z".into()).await;
    let snap = nodes[&l].raft.metrics().borrow().snapshot;
    assert!(snap.is_some(), "the leader has a snapshot");
    // Back with wiped storage: only a snapshot (far larger than the 64 KiB
    // frame limit, sent in 16 KiB chunks) can bring it back.
    let back = start(&certs, f, addr, MemLogStore::new(), MemStateMachine::new()).await;
    wait_applied(&back, idx).await;
    assert!(
        back.raft.metrics().borrow().snapshot.is_some(),
        "caught up by snapshot"
    );
    assert_eq!(back.sm.get("while-wiped").as_deref(), Some("z"));
    let size = back.sm.snapshot_of_store().encode().expect("encode").len();
    assert!(
        size > 10 * (64 << 10),
        "snapshot of {size} bytes should exceed the frame limit many times"
    );
    nodes.insert(f, back);
    shutdown(nodes).await;
}

/// A raw QUIC connection to `addr` as the holder of `certs`' node `as_id`.
async fn raw_conn(
    certs: &DevCerts,
    as_id: NodeId,
    target: NodeId,
    addr: SocketAddr,
) -> Result<quinn::Connection, String> {
    let t = QuicTransport::bind(
        quic_config(SocketAddr::from(([127, 0, 0, 1], 0))),
        certs.identity(as_id).expect("id"),
    )
    .expect("bind");
    let c = t
        .endpoint()
        .connect(addr, &node_name(target))
        .map_err(|e| e.to_string())?;
    let conn = c.await.map_err(|e| e.to_string())?;
    // Keep the endpoint alive as long as the connection.
    std::mem::forget(t);
    Ok(conn)
}

async fn exchange(conn: &quinn::Connection, bytes: &[u8], finish: bool) -> Result<Vec<u8>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(bytes).await.map_err(|e| e.to_string())?;
    if finish {
        send.finish().map_err(|e| e.to_string())?;
    }
    let r = tokio::time::timeout(Duration::from_secs(3), recv.read_to_end(1 << 20)).await;
    match r {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer".into()),
    }
}

/// A 3-node cluster holding one write, and node 9, a holder of a valid
/// cluster certificate that speaks garbage, connected to its leader.
struct Hostile {
    nodes: BTreeMap<NodeId, Node>,
    leader: NodeId,
    conn: quinn::Connection,
}

async fn hostile() -> Hostile {
    let certs = DevCerts::generate([1, 2, 3, 9].map(NodeId)).expect("certs");
    let nodes = cluster(&certs, 3).await;
    let leader = leader(&nodes).await;
    put(&nodes, "k".into(), "before".into()).await;
    let conn = raw_conn(&certs, NodeId(9), leader, nodes[&leader].addr)
        .await
        .expect("mTLS connection");
    Hostile {
        nodes,
        leader,
        conn,
    }
}

impl Hostile {
    /// Sends `bytes` on a new stream (finished or not) and asserts that
    /// they got no answer and the cluster still replicates.
    async fn gets_no_answer(self, what: &str, bytes: &[u8], finish: bool) {
        let r = exchange(&self.conn, bytes, finish).await;
        println!("{what}: {r:?}");
        assert!(
            !matches!(&r, Ok(v) if !v.is_empty()),
            "{what} got an answer: {r:?}"
        );
        self.still_replicates().await;
    }

    /// Asserts that the cluster still replicates a write to every node,
    /// then shuts it down.
    async fn still_replicates(self) {
        let idx = put(&self.nodes, "k".into(), "after".into()).await;
        for n in self.nodes.values() {
            wait_applied(n, idx).await;
            assert_eq!(n.sm.get("k").as_deref(), Some("after"));
        }
        shutdown(self.nodes).await;
    }
}

/// `msg` from `from` (naming no cluster) as one length-prefixed frame of
/// the wire codec.
fn framed(from: NodeId, msg: raft_core::Message<KvConfig>) -> Vec<u8> {
    let bytes = raft_core::codec::encode(&(from, 0u64, msg)).expect("encode");
    let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    framed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_no_answer() {
    let garbage = b"\x00\x00\x00\x05hello";
    hostile()
        .await
        .gets_no_answer("garbage", garbage, true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length_prefix_is_refused_before_allocating() {
    // 4 GiB announced: refused from the prefix alone.
    let prefix = u32::MAX.to_be_bytes();
    hostile()
        .await
        .gets_no_answer("oversized length prefix", &prefix, true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame_gets_no_answer() {
    let truncated = b"\x00\x00\x01\x00abc";
    hostile()
        .await
        .gets_no_answer("truncated frame", truncated, true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_sent_as_a_request_gets_no_answer() {
    let wrong = framed(
        NodeId(9),
        raft_core::Message::VoteResponse(raft_core::VoteResponse {
            term: raft_core::Term(1),
            granted: true,
            pre_vote: false,
            voter_uuid: raft_core::NodeUuid(9),
        }),
    );
    hostile()
        .await
        .gets_no_answer("wrong message type", &wrong, true)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_stream_gets_no_answer() {
    let unfinished = b"\x00\x00\x10\x00";
    hostile()
        .await
        .gets_no_answer("unfinished stream", unfinished, false)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_flood_stops_at_the_stream_limit() {
    let h = hostile().await;
    let mut flood = Vec::new();
    for _ in 0..2_000 {
        match tokio::time::timeout(Duration::from_millis(200), h.conn.open_bi()).await {
            Ok(Ok((mut s, _r))) => {
                let _ = s.write_all(b"\x00\x00\x00\x01").await;
                flood.push(s);
            }
            _ => break,
        }
    }
    println!(
        "flood: {} streams opened before the peer's limit held",
        flood.len()
    );
    assert!(
        flood.len() <= 256 + 8,
        "stream limit not enforced: {}",
        flood.len()
    );
    drop(flood);
    h.still_replicates().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impersonator_is_refused_by_its_certificate() {
    let h = hostile().await;
    // Node 9's certificate, claiming to be node 1 and asking for a vote
    // far in the future.
    let vote = framed(
        NodeId(1),
        raft_core::Message::Vote(raft_core::VoteRequest {
            term: raft_core::Term(1_000),
            candidate_id: NodeId(1),
            last_log_id: raft_core::LogId::new(1_000, 1_000),
            pre_vote: false,
            transfer: true,
            candidate_uuid: raft_core::NodeUuid(1),
        }),
    );
    let term_before = h.nodes[&h.leader].raft.metrics().borrow().term;
    let answer = exchange(&h.conn, &vote, true)
        .await
        .expect("an error answer");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("certificate names node 9"),
        "impersonation not refused: {text}"
    );
    let term_after = h.nodes[&h.leader].raft.metrics().borrow().term;
    assert!(
        term_after < raft_core::Term(1_000),
        "the impersonated vote moved the term to {term_after}"
    );
    assert_eq!(
        term_after, term_before,
        "the impersonated vote moved a term"
    );
    h.still_replicates().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_fails_the_handshake() {
    let h = hostile().await;
    let rogue = DevCerts::generate([NodeId(1)]).expect("rogue certs");
    let r = raw_conn(&rogue, NodeId(1), h.leader, h.nodes[&h.leader].addr).await;
    println!("other CA: {:?}", r.as_ref().err());
    assert!(r.is_err(), "a certificate from another CA was accepted");
    h.still_replicates().await;
}

/// Snapshot chunks go on a connection of their own, from an endpoint (and
/// a thread) set up at the first chunk: node 1 serves, node 2 dials it. A
/// vote opens one connection, the first chunk a second one, the next chunk
/// reuses it; once node 2's networks are dropped, both connections close
/// (the bulk endpoint with the last of them) well within the idle
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_chunks_travel_on_a_connection_of_their_own() {
    use raft_core::{InstallSnapshotRequest, LogId, Membership, Network, NetworkFactory};
    let certs = DevCerts::generate([1, 2].map(NodeId)).expect("certs");
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = start(
        &certs,
        NodeId(1),
        any,
        MemLogStore::new(),
        MemStateMachine::new(),
    )
    .await;
    let client = QuicTransport::bind(quic_config(any), certs.identity(NodeId(2)).expect("id"))
        .expect("bind");
    let mut factory = client.network_factory::<KvConfig>();
    let net = factory.connect(NodeId(1), &server.addr.to_string());
    let connections = || server.transport.endpoint().open_connections();
    let vote = raft_core::VoteRequest {
        term: raft_core::Term(1),
        candidate_id: NodeId(2),
        last_log_id: LogId::new(0, 0),
        pre_vote: true,
        transfer: false,
        candidate_uuid: Default::default(),
    };
    net.vote(vote).await.expect("vote answered");
    assert_eq!(connections(), 1, "the vote's connection");
    let meta = raft_core::SnapshotMeta {
        last_log_id: LogId::new(1, 5),
        membership: Membership::default(),
        id: 5,
        size: 8,
    };
    for offset in [0, 4] {
        let chunk = InstallSnapshotRequest::chunk(
            raft_core::Term(1),
            NodeId(2),
            meta.clone(),
            offset,
            vec![7; 4],
            offset == 4,
        );
        // Answered or refused by the node: either way it was delivered.
        let _ = net.install_snapshot(chunk).await;
        assert_eq!(connections(), 2, "the vote's and the chunks' connections");
    }
    drop((net, factory));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while connections() != 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} connections outlived their networks",
            connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.close().await;
    server.raft.shutdown().await;
    server.transport.close().await;
}
