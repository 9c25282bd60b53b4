//! Whole-node crash safety against real process death: the log and the
//! state machine die together.
//!
//! A child process (this test binary, re-invoked) runs a one-node `Raft`
//! whose log and state machine share one RocksDB directory, with a snapshot
//! every 40 entries and the log purged behind it. It first reads every key
//! back as a restarted node serves it (a linearizable read: leader again,
//! everything committed applied) and prints `KEY k v`, then `READY`, then
//! writes `k{i % KEYS} = v{i}` one after another, printing `ACK i` once
//! write `i` is applied. The parent kills it with SIGKILL a random moment
//! after `READY`, so kills land during unsynced apply batches, snapshot
//! builds and purges, and checks what the next child read back: every key
//! holds its last acknowledged write, or a later one whose outcome the kill
//! left unknown.
//!
//! `NODE_KILL_ROUNDS=N` sets the kill-loop count (default 40).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

mod common;

use raft_core::memory::{KvCommand, KvConfig, MemRouter};
use raft_core::sim::Rng;
use raft_core::{Config, NodeId};

const KEYS: u64 = 50;

fn key(k: u64) -> String {
    format!("k{k}")
}

/// The child: runs only when re-invoked by the parent below.
#[test]
fn node_crash_child_process() {
    let (Ok(dir), Ok(first)) = (
        std::env::var("NODE_CRASH_DIR"),
        std::env::var("NODE_CRASH_FIRST"),
    ) else {
        return;
    };
    let first: u64 = first.parse().expect("first");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let config = Config {
            snapshot_every: 40,
            purge_keep: 10,
            ..Config::default()
        };
        let id = NodeId(1);
        let router = MemRouter::<KvConfig>::new();
        let (raft, reader) = common::start_node(Path::new(&dir), id, config, &router).await;
        // Refused once the store is initialized: that is every round but
        // the first.
        let _ = raft
            .initialize(BTreeMap::from([(id, "n1".to_string())]))
            .await;
        while raft.ensure_linearizable().await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let out = std::io::stdout();
        {
            let mut o = out.lock();
            // A line of its own: libtest's `test ... ` has no newline.
            let _ = writeln!(o);
            for k in 0..KEYS {
                let v = reader.get(key(k).as_bytes()).expect("read back");
                let v = v.map_or("-".to_string(), |v| {
                    String::from_utf8_lossy(&v).into_owned()
                });
                let _ = writeln!(o, "KEY {k} {v}");
            }
            let _ = writeln!(o, "READY");
            let _ = o.flush();
        }
        for i in first.. {
            let cmd = KvCommand::Put {
                key: key(i % KEYS),
                value: format!("v{i}"),
            };
            raft.client_write(cmd).await.expect("a one-node write");
            let mut o = out.lock();
            let _ = writeln!(o, "ACK {i}");
            let _ = o.flush();
        }
    });
}

/// What one child printed.
#[derive(Default)]
struct Round {
    read_back: BTreeMap<u64, Option<u64>>,
    ready: bool,
    last_ack: Option<u64>,
}

/// Per key: the last acknowledged write, and later writes whose outcome a
/// kill left unknown.
#[derive(Clone, Default)]
struct Expect {
    acked: Option<u64>,
    unknown: Vec<u64>,
}

fn run_child(dir: &Path, first: u64, pace: &mut Rng) -> Round {
    let mut child = Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "node_crash_child_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("NODE_CRASH_DIR", dir)
        .env("NODE_CRASH_FIRST", first.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (ready_tx, ready_rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = Round::default();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some("KEY"), Some(k), Some(v)) => {
                    let v = v.strip_prefix('v').map(|n| n.parse().expect("value"));
                    r.read_back.insert(k.parse().expect("key"), v);
                }
                (Some("READY"), None, None) => {
                    r.ready = true;
                    let _ = ready_tx.send(());
                }
                (Some("ACK"), Some(i), None) => r.last_ack = Some(i.parse().expect("ack")),
                _ => {}
            }
        }
        r
    });
    let ready = ready_rx.recv_timeout(Duration::from_secs(60));
    if ready.is_ok() {
        // Mid-stride: applies, builds and purges are all under way.
        std::thread::sleep(Duration::from_millis(pace.range(5, 250)));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let round = reader.join().expect("reader");
    assert!(
        round.ready,
        "the node did not come back up and serve a read within 60 s"
    );
    round
}

#[test]
fn whole_node_kill_loop_never_loses_an_acknowledged_write() {
    let rounds: u64 = std::env::var("NODE_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut pace = Rng::new(0x5EED);
    let mut expect = vec![Expect::default(); KEYS as usize];
    let mut first = 1;
    let mut acked_writes = 0;
    // The last round only reads back what the one before it left.
    for round in 0..=rounds {
        let r = run_child(dir.path(), first, &mut pace);
        for k in 0..KEYS {
            let e = &expect[k as usize];
            let got = r.read_back.get(&k).copied().flatten();
            let fine = got == e.acked || got.is_some_and(|v| e.unknown.contains(&v));
            assert!(
                fine,
                "round {round}: key {k} reads back as write {got:?} after a kill; last \
                 acknowledged write {:?}, unknown outcomes {:?}",
                e.acked, e.unknown
            );
        }
        // Writes ran from `first` through `last_ack`, one at a time; the
        // one after was in flight (or never sent) when the kill came.
        let in_flight = r.last_ack.map_or(first, |a| a + 1);
        if let Some(last) = r.last_ack {
            acked_writes += last + 1 - first;
            for i in first..=last {
                let e = &mut expect[(i % KEYS) as usize];
                e.acked = Some(i);
                e.unknown.clear();
            }
        }
        expect[(in_flight % KEYS) as usize].unknown.push(in_flight);
        first = in_flight + 1;
    }
    println!("{rounds} whole-node kills, {acked_writes} acknowledged writes, none lost");
    assert!(
        acked_writes >= rounds,
        "the loop must write between kills to test anything ({acked_writes} writes)"
    );
}
