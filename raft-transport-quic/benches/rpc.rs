//! Transport benchmark (not a test): two nodes over QUIC on 127.0.0.1, next
//! to a raw quinn echo measured in the same run on the same machine.
//!
//! - RPC round trips per second: empty AppendEntries (heartbeats) against a
//!   raw stream carrying as many bytes each way.
//! - Payload throughput: AppendEntries carrying 64 KiB of entries against a
//!   raw stream carrying 64 KiB out and a small reply back.
//! - Heartbeat latency (p50/p99) while a snapshot streams in chunks of the
//!   default size on the same connection.
//! - Raw snapshot-shaped throughput: streams of one default chunk each,
//!   `snapshot_window` of them in flight: the loopback rate a snapshot
//!   transfer could reach. `RPC_BENCH=chunks` measures only this, for
//!   `cargo xtask bench join`, which reports a transfer against it.
//!
//! The receiver is a real `Raft` node reached through `QuicTransport::serve`.
//! Heartbeats name a previous entry it lacks, so it refuses them after
//! decoding them and running them through its engine; every 64 KiB append
//! carries entries 1-16, which it appends once and then finds it holds, so
//! it acknowledges each at once: what is measured is the transport and the
//! request path, not storage. (Appends that named a previous entry it
//! lacks, as heartbeats do, are held now for the one that carries it, as
//! reordered ones would be: they measured that wait, about 200 ms.)
//!
//! `cargo bench -p raft-transport-quic` (BENCH_SECS=N per cell, default 3).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use raft_core::memory::{KvCommand, KvConfig, MemLogStore, MemStateMachine};
use raft_core::{
    AppendEntriesRequest, Config, Entry, EntryPayload, InstallSnapshotRequest, LogId, Membership,
    Network, NetworkFactory, NodeId, Raft, SnapshotMeta, Term,
};
use raft_transport_quic::tls::{DevCerts, node_name};
use raft_transport_quic::{QuicConfig, QuicTransport};

const LEADER: NodeId = NodeId(1);
const FOLLOWER: NodeId = NodeId(2);
const ECHO: NodeId = NodeId(3);

fn secs() -> Duration {
    Duration::from_secs(
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    )
}

fn config() -> QuicConfig {
    QuicConfig {
        bind: SocketAddr::from(([127, 0, 0, 1], 0)),
        max_frame_bytes: 4 << 20,
        ..QuicConfig::default()
    }
}

fn heartbeat() -> AppendEntriesRequest<KvConfig> {
    AppendEntriesRequest {
        term: Term(1),
        leader_id: LEADER,
        prev_log_id: LogId::new(1, 1_000_000),
        entries: Vec::new(),
        leader_commit: Default::default(),
        round: 0,
        keep_from: Default::default(),
    }
}

/// 16 entries of 4 KiB: 64 KiB of payload.
fn batch() -> AppendEntriesRequest<KvConfig> {
    let entries = (0..16)
        .map(|i| Entry {
            log_id: LogId::new(1, 1 + i),
            payload: EntryPayload::command(KvCommand::Put {
                key: format!("k{i}"),
                value: "v".repeat(4096 - 8),
            }),
        })
        .collect();
    AppendEntriesRequest {
        entries,
        prev_log_id: LogId::new(0, 0),
        ..heartbeat()
    }
}

/// Runs `op` on `concurrency` tasks for the cell's time; returns ops/s and
/// the sorted latencies in microseconds.
async fn drive<F, Fut>(concurrency: usize, op: F) -> (f64, Vec<u64>)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let dur = secs();
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let op = op.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while start.elapsed() < dur {
                    let t = Instant::now();
                    if op().await {
                        lat.push(t.elapsed().as_micros() as u64);
                    }
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all.sort_unstable();
    (all.len() as f64 / start.elapsed().as_secs_f64(), all)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    raft_core::sim::quantile(sorted, p).unwrap_or(0) as f64 / 1000.0
}

/// A raw quinn server that reads each stream to its end and answers with
/// `reply` bytes.
fn echo_server(transport: &QuicTransport, reply: usize) {
    let endpoint = transport.endpoint().clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        if recv.read_to_end(16 << 20).await.is_ok() {
                            let _ = send.write_all(&vec![0u8; reply]).await;
                            let _ = send.finish();
                        }
                    });
                }
            });
        }
    });
}

async fn echo_once(conn: &quinn::Connection, payload: &[u8]) -> bool {
    let Ok((mut send, mut recv)) = conn.open_bi().await else {
        return false;
    };
    if send.write_all(payload).await.is_err() || send.finish().is_err() {
        return false;
    }
    recv.read_to_end(16 << 20).await.is_ok()
}

/// [`drive`] over raw echoes of `bytes` on `conn`.
async fn drive_echo(conn: &quinn::Connection, concurrency: usize, bytes: usize) -> (f64, Vec<u64>) {
    let (conn, payload) = (conn.clone(), vec![7u8; bytes]);
    drive(concurrency, move || {
        let (conn, payload) = (conn.clone(), payload.clone());
        async move { echo_once(&conn, &payload).await }
    })
    .await
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let certs = DevCerts::generate([LEADER, FOLLOWER, ECHO]).expect("certs");
    // The receiving node.
    let server =
        QuicTransport::bind(config(), certs.identity(FOLLOWER).expect("id")).expect("bind");
    let server_addr = server.local_addr().expect("addr");
    let raft: Raft<KvConfig> = Raft::start(
        FOLLOWER,
        Config::default(),
        MemLogStore::new(),
        MemStateMachine::new(),
        server.network_factory(),
    )
    .await
    .expect("start");
    server.serve(raft.clone());
    // The raw echo baseline, on its own endpoint.
    let echo = QuicTransport::bind(config(), certs.identity(ECHO).expect("id")).expect("bind");
    let echo_addr = echo.local_addr().expect("addr");
    // Answers like an append response: a couple of dozen bytes.
    echo_server(&echo, 24);
    // The sender.
    let client = QuicTransport::bind(config(), certs.identity(LEADER).expect("id")).expect("bind");
    let mut factory = client.network_factory::<KvConfig>();
    let net = Arc::new(factory.connect(FOLLOWER, &server_addr.to_string()));
    let echo_conn = client
        .endpoint()
        .connect(echo_addr, &node_name(ECHO))
        .expect("connect")
        .await
        .expect("handshake");

    let hb_bytes = raft_core::codec::encode(&heartbeat())
        .expect("encode")
        .len();
    let batch_bytes = raft_core::codec::encode(&batch()).expect("encode").len();
    println!(
        "raft-transport-quic bench: {} s per cell; heartbeat frame {hb_bytes} B, batch frame {batch_bytes} B",
        secs().as_secs()
    );

    // Raw QUIC in a snapshot transfer's shape.
    let defaults = Config::default();
    let (chunk, window) = (defaults.snapshot_chunk_bytes, defaults.snapshot_window);
    let (chunks, _) = drive_echo(&echo_conn, window, chunk).await;
    println!(
        "raw QUIC, {} KiB streams x {window} in flight: {:.1} MB/s",
        chunk >> 10,
        chunks * chunk as f64 / 1e6
    );
    if std::env::var("RPC_BENCH").is_ok_and(|v| v == "chunks") {
        raft.shutdown().await;
        return;
    }

    // Round trips: heartbeats vs small echoes.
    println!(
        "\n| what | concurrency | raft RPC/s | p50 ms | p99 ms | raw echo/s | p50 ms | p99 ms | ratio |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in [1, 64] {
        let n = net.clone();
        let (rpc, lat) = drive(c, move || {
            let n = n.clone();
            async move { n.append_entries(heartbeat()).await.is_ok() }
        })
        .await;
        let (raw, raw_lat) = drive_echo(&echo_conn, c, hb_bytes).await;
        println!(
            "| heartbeat round trip | {c} | {rpc:.0} | {:.3} | {:.3} | {raw:.0} | {:.3} | {:.3} | {:.2} |",
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            pct(&raw_lat, 0.5),
            pct(&raw_lat, 0.99),
            rpc / raw
        );
    }
    // Throughput: 64 KiB AppendEntries vs 64 KiB echoes.
    for c in [1, 8] {
        let n = net.clone();
        let (rpc, lat) = drive(c, move || {
            let n = n.clone();
            async move { n.append_entries(batch()).await.is_ok() }
        })
        .await;
        let (raw, raw_lat) = drive_echo(&echo_conn, c, batch_bytes).await;
        let mb = |ops: f64| ops * batch_bytes as f64 / 1e6;
        println!(
            "| 64 KiB AppendEntries, MB/s | {c} | {:.1} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.2} |",
            mb(rpc),
            pct(&lat, 0.5),
            pct(&lat, 0.99),
            mb(raw),
            pct(&raw_lat, 0.5),
            pct(&raw_lat, 0.99),
            rpc / raw
        );
    }

    // Heartbeat latency while a snapshot streams on the same connection.
    let streaming = Arc::new(AtomicBool::new(true));
    let snap_net = net.clone();
    let flag = streaming.clone();
    let streamer = tokio::spawn(async move {
        let meta = SnapshotMeta::<KvConfig> {
            last_log_id: LogId::new(1, 2_000_000),
            membership: Membership::new_voters(BTreeMap::from([(LEADER, "leader".to_string())])),
            id: 1,
            size: 0,
        };
        let chunk = vec![1u8; Config::default().snapshot_chunk_bytes];
        let (mut offset, mut bytes) = (0u64, 0u64);
        let start = Instant::now();
        while flag.load(Ordering::Relaxed) {
            // Start over every 64 MiB so the receiver's buffer stays small.
            if offset >= 64 << 20 {
                offset = 0;
            }
            let req = InstallSnapshotRequest::chunk(
                Term(1),
                LEADER,
                meta.clone(),
                offset,
                chunk.clone(),
                false,
            );
            match snap_net.install_snapshot(req).await {
                Ok(r) => {
                    offset = r.next_offset;
                    bytes += chunk.len() as u64;
                }
                Err(_) => offset = 0,
            }
        }
        bytes as f64 / start.elapsed().as_secs_f64() / 1e6
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut lat = Vec::new();
    let until = Instant::now() + secs();
    while Instant::now() < until {
        let t = Instant::now();
        if net.append_entries(heartbeat()).await.is_ok() {
            lat.push(t.elapsed().as_micros() as u64);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    streaming.store(false, Ordering::Relaxed);
    let snapshot_mb = streamer.await.unwrap_or(0.0);
    lat.sort_unstable();
    println!(
        "\nheartbeats every 5 ms while a snapshot streams ({} KiB chunks) at {snapshot_mb:.0} MB/s: {} samples, p50 {:.3} ms, p99 {:.3} ms (goal: p99 < 2 ms)",
        Config::default().snapshot_chunk_bytes >> 10,
        lat.len(),
        pct(&lat, 0.5),
        pct(&lat, 0.99)
    );
    raft.shutdown().await;
}
