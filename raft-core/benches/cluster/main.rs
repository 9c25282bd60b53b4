//! Committed writes per second and latency of a 3-node in-process cluster
//! (in-memory storage and network), next to a 1-node cluster measured in the
//! same run as the baseline: the ratio is the cost of replication itself.
//!
//! `cargo bench -p raft-core` (BENCH_SECS=N per cell, default 2;
//! BENCH_PAYLOADS=64,4096 and BENCH_WRITERS=1,64,256,1024 pick cells;
//! RUST_LOG=info logs the nodes' role changes to stderr). A
//! cell in which no write completes for 10 s prints every node's view and
//! exits with status 2.
//!
//! With `--features openraft-baseline` (what `cargo xtask bench core` runs)
//! each cell also runs the same client loop against a 3-node openraft
//! cluster (`baseline.rs`) and prints our 3-node rate over theirs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use raft_core::memory::{KvCommand, KvConfig, MemLogStore, MemRouter, MemStateMachine};
use raft_core::{Config, NodeId, Raft, Role};

#[cfg(feature = "openraft-baseline")]
mod baseline;

struct Measured {
    writes_per_sec: f64,
    p50_us: u64,
    p99_us: u64,
    errors: u64,
}

/// One client's handle on a cluster under test: ours or, with the
/// `openraft-baseline` feature, openraft's.
pub trait Writer: Clone + Send + Sync + 'static {
    /// Writes `key = value` through the node this client believes leads;
    /// on failure, looks for the new leader before answering.
    fn write(
        &mut self,
        key: String,
        value: String,
    ) -> impl Future<Output = Result<(), WriteFailed>> + Send;
    /// What each node believes, printed when the cluster stalls.
    fn views(&self) -> Vec<String>;
    fn shutdown(self) -> impl Future<Output = ()> + Send;
}

/// A write that did not commit (leadership moved under load).
pub struct WriteFailed;

#[derive(Clone)]
struct OurWriter {
    nodes: Vec<Raft<KvConfig>>,
    leader: Raft<KvConfig>,
}

impl Writer for OurWriter {
    async fn write(&mut self, key: String, value: String) -> Result<(), WriteFailed> {
        match self
            .leader
            .client_write(KvCommand::Put { key, value })
            .await
        {
            Ok(_) => Ok(()),
            Err(_) => {
                if let Some(l) = self
                    .nodes
                    .iter()
                    .find(|r| r.metrics().borrow().role == Role::Leader)
                {
                    self.leader = l.clone();
                }
                Err(WriteFailed)
            }
        }
    }

    fn views(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|r| format!("{:?}", *r.metrics().borrow()))
            .collect()
    }

    async fn shutdown(self) {
        for r in self.nodes {
            r.shutdown().await;
        }
    }
}

async fn cluster(n: u64) -> OurWriter {
    let router = MemRouter::<KvConfig>::new();
    let members: BTreeMap<NodeId, String> =
        (1..=n).map(|i| (NodeId(i), format!("node-{i}"))).collect();
    let mut nodes = Vec::new();
    for id in members.keys() {
        let raft = Raft::start(
            *id,
            Config::default(),
            MemLogStore::new(),
            MemStateMachine::new(),
            router.factory(*id),
        )
        .await
        .expect("start");
        router.register(*id, raft.clone());
        nodes.push(raft);
    }
    for r in &nodes {
        r.initialize(members.clone()).await.expect("initialize");
    }
    loop {
        if let Some(l) = nodes
            .iter()
            .find(|r| r.metrics().borrow().role == Role::Leader)
        {
            let leader = l.clone();
            return OurWriter { nodes, leader };
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Fails the run loudly if no write completes for `STALL` while writers
/// are running: a benchmark that hangs is a liveness bug, and what each
/// node believed at that moment is the first clue.
const STALL: Duration = Duration::from_secs(10);

/// Runs until aborted, which `run` does once its writers have finished.
fn watchdog<W: Writer>(client: W, done: Arc<AtomicU64>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = (done.load(Ordering::Relaxed), Instant::now());
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let now = done.load(Ordering::Relaxed);
            if now != last.0 {
                last = (now, Instant::now());
            } else if last.1.elapsed() > STALL {
                eprintln!("no write completed for {STALL:?} ({now} so far); each node's view:");
                for v in client.views() {
                    eprintln!("  {v}");
                }
                std::process::exit(2);
            }
        }
    })
}

/// The client loop, the same for every cluster: `writers` tasks, each
/// writing its own 64 keys in turn for `secs`.
async fn run<W: Writer>(client: W, writers: usize, payload: usize, secs: f64) -> Measured {
    let completed = Arc::new(AtomicU64::new(0));
    let dog = watchdog(client.clone(), completed.clone());
    let value = "x".repeat(payload);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut client = client.clone();
        let value = value.clone();
        let completed = completed.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut i = 0u64;
            while Instant::now() < deadline {
                let key = format!("w{w}-{}", i % 64);
                let t = Instant::now();
                let r = client.write(key, value.clone()).await;
                completed.fetch_add(1, Ordering::Relaxed);
                match r {
                    Ok(()) => lat.push(t.elapsed().as_micros() as u64),
                    // Counted, so a run with failovers is visible in the table.
                    Err(WriteFailed) => {
                        errors += 1;
                        tokio::task::yield_now().await;
                    }
                }
                i += 1;
            }
            (lat, errors)
        }));
    }
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("writer");
        lat.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    dog.abort();
    lat.sort_unstable();
    let pct = |p: f64| raft_core::sim::quantile(&lat, p).unwrap_or(0);
    client.shutdown().await;
    Measured {
        writes_per_sec: lat.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        errors,
    }
}

fn main() {
    // RUST_LOG=info shows elections and step-downs when a cell fails writes.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    // The nodes run on one runtime and the writers on another, as in
    // openraft's own benchmark (`--server-workers 2 --client-workers 1`):
    // 1,024 writer tasks sharing the nodes' workers would measure the
    // scheduler's fairness to them more than the Raft implementation.
    let workers = |n: usize, name: &str| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("runtime")
    };
    let server = workers(2, "bench-server");
    let client = workers(1, "bench-client");
    let measure = |c, writers, payload| client.block_on(run(c, writers, payload, secs));
    println!(
        "raft-core in-process cluster, {secs}s per cell, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let openraft = cfg!(feature = "openraft-baseline");
    if !openraft {
        println!("(openraft side by side: cargo xtask bench core)");
    }
    print!(
        "{:>8} {:>8} | {:>10} {:>7} {:>7} {:>5} | {:>10} {:>7} {:>7} | {:>5}",
        "payload",
        "writers",
        "3-node w/s",
        "p50 us",
        "p99 us",
        "fail",
        "1-node w/s",
        "p50 us",
        "p99 us",
        "repl"
    );
    if openraft {
        print!(
            " | {:>10} {:>7} {:>7} {:>5} | {:>6}",
            "openraft", "p50 us", "p99 us", "fail", "ratio"
        );
    }
    println!();
    // BENCH_PAYLOADS / BENCH_WRITERS (comma lists) pick cells.
    let list = |var: &str, default: &[usize]| -> Vec<usize> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| default.to_vec())
    };
    for payload in list("BENCH_PAYLOADS", &[64, 4096]) {
        for writers in list("BENCH_WRITERS", &[1, 64, 256, 1024]) {
            let three = measure(server.block_on(cluster(3)), writers, payload);
            let one = measure(server.block_on(cluster(1)), writers, payload);
            print!(
                "{:>8} {:>8} | {:>10.0} {:>7} {:>7} {:>5} | {:>10.0} {:>7} {:>7} | {:>5.2}",
                payload,
                writers,
                three.writes_per_sec,
                three.p50_us,
                three.p99_us,
                three.errors,
                one.writes_per_sec,
                one.p50_us,
                one.p99_us,
                three.writes_per_sec / one.writes_per_sec
            );
            #[cfg(feature = "openraft-baseline")]
            {
                let nodes = server.block_on(baseline::cluster(3));
                let theirs = client.block_on(run(
                    baseline::OpenraftWriter::new(nodes),
                    writers,
                    payload,
                    secs,
                ));
                print!(
                    " | {:>10.0} {:>7} {:>7} {:>5} | {:>5.2}x",
                    theirs.writes_per_sec,
                    theirs.p50_us,
                    theirs.p99_us,
                    theirs.errors,
                    three.writes_per_sec / theirs.writes_per_sec
                );
            }
            println!();
        }
    }
}
