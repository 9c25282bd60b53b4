//! Counters and latency histograms for `GET /metrics` (Prometheus text
//! format), and the wrappers that feed them: a [`LogStore`] that times every
//! synced write, and a [`NetworkFactory`] that counts failed RPCs per peer.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use raft_core::{
    AppendEntriesRequest, AppendEntriesResponse, Entry, HardState, InstallSnapshotRequest,
    InstallSnapshotResponse, LogId, LogIndex, LogState, LogStore, Network, NetworkError,
    NetworkFactory, NodeId, RaftMetrics, Role, StorageError, TimeoutNowRequest, VoteRequest,
    VoteResponse,
};

use crate::types::{Kv, NodeAddr};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A cumulative latency histogram.
#[derive(Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Histogram {
    /// Records one request that started at `started`.
    pub fn observe(&self, started: Instant) {
        let elapsed = started.elapsed();
        let secs = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_ns
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in BUCKETS.iter().zip(&self.counts) {
            cumulative += n.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}\n{name}_count {count}",
            self.sum_ns.load(Relaxed) as f64 / 1e9
        );
    }
}

/// Everything `/metrics` reports besides the Raft metrics themselves.
#[derive(Default)]
pub struct Metrics {
    /// Writes proposed.
    pub proposals: AtomicU64,
    /// Writes that failed.
    pub proposals_failed: AtomicU64,
    /// Linearizable reads started.
    pub reads: AtomicU64,
    /// Reads that failed.
    pub reads_failed: AtomicU64,
    /// Times this node became a candidate (a real election, after pre-vote).
    /// `LogStore::append`, which returns once the entries are synced.
    pub append: Histogram,
    /// `LogStore::save_hard_state` (term and vote, synced).
    pub hard_state_sync: Histogram,
    rpc_errors: Mutex<BTreeMap<(NodeId, &'static str), u64>>,
    /// Bytes the configuration budgets for caches (RocksDB's block cache
    /// and memtables, the Raft log cache); set at start.
    pub memory_budget: AtomicU64,
}

impl Metrics {
    fn rpc_error(&self, peer: NodeId, rpc: &'static str) {
        if let Ok(mut m) = self.rpc_errors.lock() {
            *m.entry((peer, rpc)).or_default() += 1;
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, raft: &RaftMetrics<NodeAddr>) -> String {
        let mut out = String::with_capacity(4096);
        let mut gauge = |name: &str, help: &str, kind: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        gauge("raft_term", "Current term.", "gauge", raft.term.0);
        gauge(
            "raft_kv_memory_budget_bytes",
            "Memory the configuration budgets for caches: RocksDB block cache and memtables, and the Raft log cache.",
            "gauge",
            self.memory_budget.load(Relaxed),
        );
        gauge(
            "raft_commit_index",
            "Highest log index known to be committed.",
            "gauge",
            raft.commit_index.0,
        );
        gauge(
            "raft_applied_index",
            "Highest log index applied to the state machine.",
            "gauge",
            raft.applied_index.0,
        );
        gauge(
            "raft_last_log_index",
            "Index of the last entry in the local log.",
            "gauge",
            raft.last_log_index.0,
        );
        gauge(
            "raft_is_leader",
            "1 if this node leads.",
            "gauge",
            u64::from(raft.role == Role::Leader),
        );
        let c = |a: &AtomicU64| a.load(Relaxed);
        gauge(
            "raft_proposals_total",
            "Writes proposed through this node.",
            "counter",
            c(&self.proposals),
        );
        gauge(
            "raft_proposals_failed_total",
            "Proposals that failed or timed out.",
            "counter",
            c(&self.proposals_failed),
        );
        gauge(
            "raft_linearizable_reads_total",
            "Linearizable reads served.",
            "counter",
            c(&self.reads),
        );
        gauge(
            "raft_linearizable_reads_failed_total",
            "Linearizable reads that failed.",
            "counter",
            c(&self.reads_failed),
        );
        gauge(
            "raft_elections_total",
            "Elections this node started.",
            "counter",
            raft.elections,
        );
        gauge(
            "raft_leader_changes_total",
            "Times this node saw a new leader.",
            "counter",
            raft.leader_changes,
        );
        gauge(
            "raft_snapshots_sent_total",
            "Snapshot transfers this node started as leader (restarts count again).",
            "counter",
            raft.snapshots_sent,
        );
        gauge(
            "raft_snapshots_installed_total",
            "Snapshots this node received and installed.",
            "counter",
            raft.snapshots_installed,
        );
        gauge(
            "raft_snapshot_delivered_bytes_total",
            "Bytes of the snapshots this node delivered as leader (installed by the follower).",
            "counter",
            raft.snapshot_bytes_delivered,
        );
        gauge(
            "raft_snapshot_delivery_milliseconds_total",
            "Time those deliveries took, first chunk to install.",
            "counter",
            raft.snapshot_delivery_millis,
        );
        let roles = ["follower", "precandidate", "candidate", "leader", "learner"];
        let _ = writeln!(
            out,
            "# HELP raft_role The node's role (1 for the current one).\n# TYPE raft_role gauge"
        );
        for r in roles {
            let _ = writeln!(
                out,
                "raft_role{{role=\"{r}\"}} {}",
                u64::from(role_name(raft.role) == r)
            );
        }
        self.append.render(
            &mut out,
            "raft_log_append_seconds",
            "Latency of a synced log append (includes the WAL fsync).",
        );
        self.hard_state_sync.render(
            &mut out,
            "raft_hard_state_sync_seconds",
            "Latency of a synced term/vote save.",
        );
        let _ = writeln!(
            out,
            "# HELP raft_rpc_errors_total Failed RPCs to a peer, by kind.\n# TYPE raft_rpc_errors_total counter"
        );
        if let Ok(m) = self.rpc_errors.lock() {
            for ((peer, rpc), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "raft_rpc_errors_total{{peer=\"{peer}\",rpc=\"{rpc}\"}} {n}"
                );
            }
        }
        out
    }
}

/// The name the status API and `/metrics` use for a role.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::Follower => "follower",
        Role::PreCandidate => "precandidate",
        Role::Candidate => "candidate",
        Role::Leader => "leader",
        Role::Learner => "learner",
    }
}

/// A [`LogStore`] that times its synced writes.
pub struct MeteredLogStore<L> {
    /// The store measured.
    pub inner: L,
    /// Where its timings go.
    pub metrics: Arc<Metrics>,
}

#[async_trait]
impl<L: LogStore<Kv>> LogStore<Kv> for MeteredLogStore<L> {
    async fn log_state(&mut self) -> Result<LogState, StorageError> {
        self.inner.log_state().await
    }
    async fn read(&mut self, from: LogIndex, to: LogIndex) -> Result<Vec<Entry<Kv>>, StorageError> {
        self.inner.read(from, to).await
    }
    async fn append(&mut self, entries: Vec<Entry<Kv>>) -> Result<(), StorageError> {
        let started = Instant::now();
        let r = self.inner.append(entries).await;
        self.metrics.append.observe(started);
        r
    }
    async fn truncate(&mut self, from: LogIndex) -> Result<(), StorageError> {
        self.inner.truncate(from).await
    }
    async fn purge(&mut self, upto: LogId) -> Result<(), StorageError> {
        self.inner.purge(upto).await
    }
    async fn save_hard_state(&mut self, hard_state: HardState) -> Result<(), StorageError> {
        let started = Instant::now();
        let r = self.inner.save_hard_state(hard_state).await;
        self.metrics.hard_state_sync.observe(started);
        r
    }
    async fn load_hard_state(&mut self) -> Result<HardState, StorageError> {
        self.inner.load_hard_state().await
    }
    fn never_blocks(&self) -> bool {
        self.inner.never_blocks()
    }
}

/// A [`NetworkFactory`] whose clients count failed RPCs per peer.
pub struct MeteredNetworkFactory<F> {
    /// The factory measured.
    pub inner: F,
    /// Where its clients' timings go.
    pub metrics: Arc<Metrics>,
}

impl<F: NetworkFactory<Kv>> NetworkFactory<Kv> for MeteredNetworkFactory<F> {
    type Network = MeteredNetwork<F::Network>;
    fn connect(&mut self, target: NodeId, node: &NodeAddr) -> Self::Network {
        MeteredNetwork {
            inner: self.inner.connect(target, node),
            peer: target,
            metrics: self.metrics.clone(),
        }
    }
}

/// A peer client whose RPCs are timed.
pub struct MeteredNetwork<N> {
    inner: N,
    peer: NodeId,
    metrics: Arc<Metrics>,
}

impl<N> MeteredNetwork<N> {
    fn count<T>(&self, rpc: &'static str, r: Result<T, NetworkError>) -> Result<T, NetworkError> {
        if r.is_err() {
            self.metrics.rpc_error(self.peer, rpc);
        }
        r
    }
}

#[async_trait]
impl<N: Network<Kv>> Network<Kv> for MeteredNetwork<N> {
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<Kv>,
    ) -> Result<AppendEntriesResponse, NetworkError> {
        self.count("append_entries", self.inner.append_entries(req).await)
    }
    async fn vote(&self, req: VoteRequest) -> Result<VoteResponse, NetworkError> {
        self.count("vote", self.inner.vote(req).await)
    }
    async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<Kv>,
    ) -> Result<InstallSnapshotResponse, NetworkError> {
        self.count("install_snapshot", self.inner.install_snapshot(req).await)
    }
    async fn timeout_now(&self, req: TimeoutNowRequest) -> Result<(), NetworkError> {
        self.count("timeout_now", self.inner.timeout_now(req).await)
    }
}
