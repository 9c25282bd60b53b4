//! Counters and latency histograms for `GET /metrics` (the OpenMetrics
//! text format, which Prometheus scrapes, written by the `prometheus-client`
//! crate), and the wrappers that feed them: a [`LogStore`] that times every
//! synced write, and a [`NetworkFactory`] that counts failed RPCs per peer.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::{Registry, Unit};
use raft_core::{
    AppendEntriesRequest, AppendEntriesResponse, Entry, HardState, InstallSnapshotRequest,
    InstallSnapshotResponse, LogId, LogIndex, LogState, LogStore, Network, NetworkError,
    NetworkFactory, NodeId, RaftMetrics, Role, StorageError, TimeoutNowRequest, VoteRequest,
    VoteResponse,
};

use crate::types::{Kv, NodeAddr};

/// The content type of what [`Metrics::render`] writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// A latency histogram, in seconds.
#[derive(Clone, Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(prometheus_client::metrics::histogram::Histogram::new(
            BUCKETS,
        ))
    }
}

impl Histogram {
    /// Records one request that started at `started`.
    pub fn observe(&self, started: Instant) {
        self.0.observe(started.elapsed().as_secs_f64());
    }
}

/// The labels of a failed RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    peer: String,
    rpc: &'static str,
}

/// Everything `/metrics` reports besides the Raft metrics themselves.
#[derive(Default)]
pub struct Metrics {
    /// Writes proposed.
    pub proposals: Counter,
    /// Writes that failed.
    pub proposals_failed: Counter,
    /// Linearizable reads started.
    pub reads: Counter,
    /// Reads that failed.
    pub reads_failed: Counter,
    /// Requests refused for their token (401 and 403).
    pub auth_refused: Counter,
    /// `LogStore::append`, which returns once the entries are synced.
    pub append: Histogram,
    /// `LogStore::save_hard_state` (term and vote, synced).
    pub hard_state_sync: Histogram,
    rpc_errors: Family<RpcLabels, Counter>,
    /// Bytes the configuration budgets for caches (RocksDB's block cache
    /// and memtables, the Raft log cache); set at start.
    pub memory_budget: Gauge,
}

impl Metrics {
    fn rpc_error(&self, peer: NodeId, rpc: &'static str) {
        self.rpc_errors
            .get_or_create(&RpcLabels {
                peer: peer.to_string(),
                rpc,
            })
            .inc();
    }

    /// The OpenMetrics text exposition ([`CONTENT_TYPE`]): this node's
    /// counters and histograms, and `raft`, the Raft metrics of the moment.
    pub fn render(&self, raft: RaftMetrics<NodeAddr>) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(RaftCollector(raft)));
        r.register_with_unit(
            "raft_kv_memory_budget",
            "Memory the configuration budgets for caches: RocksDB block cache and memtables, and the Raft log cache.",
            Unit::Bytes,
            self.memory_budget.clone(),
        );
        let counters = [
            (
                "raft_proposals",
                "Writes proposed through this node.",
                &self.proposals,
            ),
            (
                "raft_proposals_failed",
                "Proposals that failed or timed out.",
                &self.proposals_failed,
            ),
            (
                "raft_linearizable_reads",
                "Linearizable reads served.",
                &self.reads,
            ),
            (
                "raft_linearizable_reads_failed",
                "Linearizable reads that failed.",
                &self.reads_failed,
            ),
            (
                "raft_kv_auth_refused",
                "Requests refused for a missing, invalid or insufficient token (401 and 403).",
                &self.auth_refused,
            ),
        ];
        for (name, help, counter) in counters {
            r.register(name, help, counter.clone());
        }
        r.register_with_unit(
            "raft_log_append",
            "Latency of a synced log append (includes the WAL fsync).",
            Unit::Seconds,
            self.append.0.clone(),
        );
        r.register_with_unit(
            "raft_hard_state_sync",
            "Latency of a synced term/vote save.",
            Unit::Seconds,
            self.hard_state_sync.0.clone(),
        );
        r.register(
            "raft_rpc_errors",
            "Failed RPCs to a peer, by kind.",
            self.rpc_errors.clone(),
        );
        let mut out = String::with_capacity(4096);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

/// The Raft metrics of one scrape, encoded as they are read.
#[derive(Debug)]
struct RaftCollector(RaftMetrics<NodeAddr>);

impl Collector for RaftCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = &self.0;
        let gauges = [
            ("raft_term", "Current term.", m.term.0),
            (
                "raft_commit_index",
                "Highest log index known to be committed.",
                m.commit_index.0,
            ),
            (
                "raft_applied_index",
                "Highest log index applied to the state machine.",
                m.applied_index.0,
            ),
            (
                "raft_last_log_index",
                "Index of the last entry in the local log.",
                m.last_log_index.0,
            ),
            (
                "raft_is_leader",
                "1 if this node leads.",
                u64::from(m.role == Role::Leader),
            ),
        ];
        for (name, help, value) in gauges {
            let g = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
            g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)?;
        }
        let counters = [
            (
                "raft_elections",
                "Elections this node started.",
                m.elections,
            ),
            (
                "raft_leader_changes",
                "Times this node saw a new leader.",
                m.leader_changes,
            ),
            (
                "raft_snapshots_sent",
                "Snapshot transfers this node started as leader (restarts count again).",
                m.snapshots_sent,
            ),
            (
                "raft_snapshots_installed",
                "Snapshots this node received and installed.",
                m.snapshots_installed,
            ),
            (
                "raft_snapshot_delivered_bytes",
                "Bytes of the snapshots this node delivered as leader (installed by the follower).",
                m.snapshot_bytes_delivered,
            ),
            (
                "raft_snapshot_delivery_milliseconds",
                "Time those deliveries took, first chunk to install.",
                m.snapshot_delivery_millis,
            ),
        ];
        for (name, help, value) in counters {
            let c = ConstCounter::new(value);
            c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)?;
        }
        let mut roles = encoder.encode_descriptor(
            "raft_role",
            "The node's role (1 for the current one).",
            None,
            MetricType::Gauge,
        )?;
        for r in ["follower", "precandidate", "candidate", "leader", "learner"] {
            let g = ConstGauge::new(i64::from(role_name(m.role) == r));
            g.encode(roles.encode_family(&[("role", r)])?)?;
        }
        Ok(())
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
