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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_quic_replicate_restart_fail_over_and_snapshot() {
    let certs = DevCerts::generate((1..=3).map(NodeId)).expect("certs");
    let mut nodes = cluster(&certs, 3).await;
    let l = leader(&nodes).await;

    // 10,000 replicated writes from 50 concurrent writers.
    let raft = nodes[&l].raft.clone();
    let mut tasks = Vec::new();
    for w in 0..50 {
        let raft = raft.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200 {
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
    let last = put(&nodes, "after".into(), "bulk".into()).await;
    for n in nodes.values() {
        wait_applied(n, last).await;
        assert_eq!(n.sm.get("w49-199"), Some(format!("{:0>100}", 199)));
    }

    // A follower restarts on the same address and catches up.
    let f = *nodes.keys().find(|id| **id != l).expect("follower");
    let (log, sm, addr) = stop(&mut nodes, f).await;
    let idx = put(&nodes, "while-down".into(), "x".into()).await;
    let back = start(&certs, f, addr, log, sm).await;
    wait_applied(&back, idx).await;
    nodes.insert(f, back);

    // The leader dies; another takes over.
    let l = leader(&nodes).await;
    let (_, _, dead_addr) = stop(&mut nodes, l).await;
    let new = leader(&nodes).await;
    assert_ne!(new, l);
    let idx = put(&nodes, "failover".into(), "y".into()).await;
    assert_eq!(
        nodes[&new].sm.get("w7-199"),
        Some(format!("{:0>100}", 199)),
        "acknowledged writes survive failover"
    );

    // The dead node comes back with wiped storage: only a snapshot (far
    // larger than the 64 KiB frame limit, sent in 16 KiB chunks) can
    // bring it back.
    let snap = nodes[&new].raft.metrics().borrow().snapshot;
    assert!(snap.is_some(), "the leader has a snapshot");
    let back = start(
        &certs,
        l,
        dead_addr,
        MemLogStore::new(),
        MemStateMachine::new(),
    )
    .await;
    wait_applied(&back, idx).await;
    assert!(
        back.raft.metrics().borrow().snapshot.is_some(),
        "caught up by snapshot"
    );
    assert_eq!(back.sm.get("failover").as_deref(), Some("y"));
    let size = back.sm.snapshot_of_store().encode().expect("encode").len();
    assert!(
        size > 10 * (64 << 10),
        "snapshot of {size} bytes should exceed the frame limit many times"
    );
    nodes.insert(l, back);
    for n in nodes.values() {
        n.raft.shutdown().await;
        n.transport.close().await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_peers_are_refused_and_the_cluster_keeps_replicating() {
    // Node 9 holds a valid cluster certificate but speaks garbage.
    let certs = DevCerts::generate([1, 2, 3, 9].map(NodeId)).expect("certs");
    let nodes = cluster(&certs, 3).await;
    let l = leader(&nodes).await;
    put(&nodes, "k".into(), "before".into()).await;
    let (target, addr) = (l, nodes[&l].addr);
    let conn = raw_conn(&certs, NodeId(9), target, addr)
        .await
        .expect("mTLS connection");

    let mut tried = Vec::new();
    // Garbage bytes.
    tried.push((
        "garbage",
        exchange(&conn, b"\x00\x00\x00\x05hello", true).await,
    ));
    // An oversized length prefix: refused before allocating 4 GiB.
    tried.push((
        "oversized length prefix",
        exchange(&conn, &u32::MAX.to_be_bytes(), true).await,
    ));
    // A truncated frame.
    tried.push((
        "truncated frame",
        exchange(&conn, b"\x00\x00\x01\x00abc", true).await,
    ));
    // A message of the wrong type: a response sent as a request.
    let wrong = raft_core::codec::encode(&(
        NodeId(9),
        raft_core::Message::<KvConfig>::VoteResponse(raft_core::VoteResponse {
            term: raft_core::Term(1),
            granted: true,
            pre_vote: false,
            voter_uuid: raft_core::NodeUuid(9),
        }),
    ))
    .expect("encode");
    let mut framed = (wrong.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&wrong);
    tried.push(("wrong message type", exchange(&conn, &framed, true).await));
    // A stream that never finishes.
    tried.push((
        "unfinished stream",
        exchange(&conn, b"\x00\x00\x10\x00", false).await,
    ));
    // A flood of streams.
    let mut flood = Vec::new();
    for _ in 0..2_000 {
        match tokio::time::timeout(Duration::from_millis(200), conn.open_bi()).await {
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
    for (what, r) in &tried {
        println!("{what}: {r:?}");
        assert!(
            !matches!(r, Ok(v) if !v.is_empty()),
            "{what} got an answer: {r:?}"
        );
    }
    drop(flood);

    // An impersonator: node 9's certificate, claiming to be node 1.
    let vote = raft_core::VoteRequest {
        term: raft_core::Term(1_000),
        candidate_id: NodeId(1),
        last_log_id: raft_core::LogId::new(1_000, 1_000),
        pre_vote: false,
        transfer: true,
        candidate_uuid: raft_core::NodeUuid(1),
    };
    let bytes = raft_core::codec::encode(&(NodeId(1), raft_core::Message::<KvConfig>::Vote(vote)))
        .expect("encode");
    let mut framed = (bytes.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(&bytes);
    let answer = exchange(&conn, &framed, true)
        .await
        .expect("an error answer");
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.contains("certificate names node 9"),
        "impersonation not refused: {text}"
    );

    // A certificate from another CA is refused at the handshake.
    let rogue = DevCerts::generate([NodeId(1)]).expect("rogue certs");
    let r = raw_conn(&rogue, NodeId(1), target, addr).await;
    assert!(r.is_err(), "a certificate from another CA was accepted");
    println!("other CA: {:?}", r.err());

    // Through all of it the cluster kept its leader and keeps replicating.
    let term_before = nodes[&l].raft.metrics().borrow().term;
    let idx = put(&nodes, "k".into(), "after".into()).await;
    for n in nodes.values() {
        wait_applied(n, idx).await;
        assert_eq!(n.sm.get("k").as_deref(), Some("after"));
    }
    assert_eq!(
        nodes[&l].raft.metrics().borrow().term,
        term_before,
        "the impersonated vote moved no term"
    );
    for n in nodes.values() {
        n.raft.shutdown().await;
        n.transport.close().await;
    }
}
