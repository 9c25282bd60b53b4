//! The tokio driver: one task owns one [`Engine`] inside the shared
//! [`Executor`] and serves the [`Raft`] handle; two workers carry out what
//! the executor hands out, each in order: the log worker against the
//! [`LogStore`] (merging appends that queued up into one call: group
//! commit), the state-machine worker against the [`StateMachine`]. A
//! worker whose store [never blocks](LogStore::never_blocks) is a future
//! the driver's task polls beside its other waits; any other runs on a
//! task of its own. The driver polls its RPCs itself: a request is written
//! when the batch that made it ends, and its response wakes the driver
//! directly, with no task per message in between.
//!
//! The loop never awaits storage: while the log syncs and the state machine
//! applies, it keeps taking messages, proposals and reads, and the executor
//! decides what waits for what (a reply for the writes it depends on, an
//! apply for the entries' durability). Storage reports are read before new
//! inputs, and queued inputs before timers fire.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::{Config, WhenFull};
use crate::engine::{Engine, RecoveredState, Role};
use crate::error::{InitializeError, MembershipError, NotLeader, RecoveryError, StepError};
use crate::executor::{Callers, Done, Executor, Io, LogOp, Mode, SmOp, WriteError};
use crate::message::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    Message, SnapshotMeta, TimeoutNowRequest, VoteRequest, VoteResponse,
};
use crate::network::{Network, NetworkError, NetworkFactory};
use crate::state_machine::{SnapshotBuild, StateMachine};
use crate::storage::{LogStore, StorageError};
use crate::types::{Entry, LogId, LogIndex, Membership, NodeId, NodeUuid, Term, TypeConfig};

mod driver;
mod membership;
mod workers;

use self::driver::*;
use self::workers::*;

/// Errors from the [`Raft`] handle.
#[derive(Debug, Error, Clone)]
pub enum RaftError<N> {
    /// This node does not lead; retry on `leader_id` (at `leader_node`).
    #[error(transparent)]
    NotLeader(#[from] NotLeader<N>),
    /// This node leads but is handing leadership over; nothing was
    /// proposed.
    #[error("a leadership transfer is in progress; retry shortly")]
    TransferInProgress,
    /// The node already holds `Config::max_pending_writes` writes (or
    /// `Config::max_pending_reads` reads) and is configured to fail fast
    /// (`WhenFull::FailFast`); nothing was started.
    #[error(
        "this node already holds {pending} pending requests of this kind (writes or reads); retry shortly"
    )]
    Overloaded {
        /// The configured limit that was reached.
        pending: usize,
    },
    /// A membership change was refused; nothing was proposed.
    #[error("membership change refused: {0}")]
    Membership(#[from] MembershipError),
    /// The learner was added but did not catch up in time; it stays a
    /// learner and keeps receiving the log.
    #[error("learner {id} was added but is still {behind} entries behind")]
    LearnerBehind {
        /// The learner.
        id: NodeId,
        /// How many entries it lacked when the wait ended.
        behind: u64,
    },
    /// The operation did not finish in time; it may still complete.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Another entry was committed at the proposal's index: the command was
    /// definitely not applied.
    #[error("proposal was superseded by another leader's entry; it was not applied")]
    ProposalDropped,
    /// The command may or may not have been applied (e.g. the node caught up
    /// by snapshot past its index).
    #[error("outcome of the proposal is unknown")]
    OutcomeUnknown,
    /// The engine refused a peer's message as malformed or hostile.
    #[error("message refused: {0}")]
    Refused(#[from] StepError),
    /// `initialize` was refused (the node already holds state, or the
    /// membership is unusable).
    #[error("cannot initialize: {0}")]
    Initialize(#[from] InitializeError),
    /// Storage failed; the node stopped (fail-stop) and must be restarted.
    #[error("node stopped after a storage error: {0}")]
    Fatal(String),
    /// The node was shut down (or its task ended) before answering.
    #[error("raft node is shut down")]
    Shutdown,
}

impl<N> From<WriteError<N>> for RaftError<N> {
    fn from(e: WriteError<N>) -> Self {
        match e {
            WriteError::NotLeader(nl) => RaftError::NotLeader(nl),
            WriteError::TransferInProgress => RaftError::TransferInProgress,
            WriteError::Membership(m) => RaftError::Membership(m),
            WriteError::Dropped => RaftError::ProposalDropped,
            WriteError::Unknown => RaftError::OutcomeUnknown,
        }
    }
}

/// Why a node could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The configuration was refused.
    #[error("invalid config: {0}")]
    Config(#[from] crate::config::ConfigError),
    /// Reading the recovered state from storage failed.
    #[error("reading storage: {0}")]
    Storage(#[from] StorageError),
    /// Storage held state that cannot be a Raft node's (a hole in the
    /// log, a term from the future).
    #[error("recovered state is inconsistent: {0}")]
    Recovery(#[from] RecoveryError),
}

/// A point-in-time view of a node, published on every change.
#[derive(Clone, Debug, PartialEq)]
pub struct RaftMetrics<N> {
    /// This node.
    pub id: NodeId,
    /// This node's identity ([`NodeUuid`]), drawn at its first start.
    pub uuid: NodeUuid,
    /// Whether the configuration recognizes this node as itself
    /// ([`Engine::recognized`]): `false` after its storage was wiped, until
    /// it is removed and added back. Such a node neither votes nor
    /// campaigns.
    pub recognized: bool,
    /// Leader only: members that answer under an identity the
    /// configuration does not recognize (their storage was wiped). Their
    /// votes and acknowledgements do not count.
    pub unrecognized: BTreeSet<NodeId>,
    /// The role this node plays now.
    pub role: Role,
    /// The current term.
    pub term: Term,
    /// The leader this node knows of in `term`, if any.
    pub leader_id: Option<NodeId>,
    /// Highest index known committed.
    pub commit_index: LogIndex,
    /// Highest index the state machine has applied.
    pub applied_index: LogIndex,
    /// The cluster's commit index as far as this node knows
    /// ([`Engine::leader_commit_index`]): `applied_index` this far behind
    /// it is how far the node lags.
    pub leader_commit_index: LogIndex,
    /// Index of the last entry in this node's log (durable or not).
    pub last_log_index: LogIndex,
    /// The last entry the current snapshot covers, if there is one.
    pub snapshot: Option<LogId>,
    /// The latest membership in the log (in effect once appended).
    pub membership: Membership<N>,
    /// The log entry that set `membership` (committed once `commit_index`
    /// reaches it).
    pub membership_log_id: LogId,
    /// Leader only: each peer's match index.
    pub replication: BTreeMap<NodeId, LogIndex>,
    /// Set when the node stopped after a storage error.
    pub fatal: Option<String>,
    /// Elections this node started since it started (pre-vote rounds not
    /// counted).
    pub elections: u64,
    /// Times this node saw a new leader since it started.
    pub leader_changes: u64,
    /// Snapshot transfers this node started as leader since it started
    /// (a transfer that starts over counts again).
    pub snapshots_sent: u64,
    /// Snapshots this node received and installed since it started.
    pub snapshots_installed: u64,
    /// Bytes of the snapshots this node delivered as leader since it
    /// started (the follower installed them).
    pub snapshot_bytes_delivered: u64,
    /// How long those deliveries took in all, first chunk to install.
    pub snapshot_delivery_millis: u64,
    /// Leader only: how it sends to each peer.
    pub progress: BTreeMap<NodeId, crate::engine::PeerProgress>,
    /// The last leadership changes this node saw, oldest first, with their
    /// causes and how long it was without a leader (at most
    /// [`crate::engine::LEADERSHIP_HISTORY`]).
    pub leadership: Vec<crate::engine::LeadershipChange>,
    /// Since when (milliseconds after `clock_origin`), and why, this node
    /// has known no leader; `None` while it knows one.
    pub leaderless_since: Option<(u64, crate::engine::ElectionCause)>,
    /// The wall-clock time of this node's millisecond 0: the times above
    /// count from it.
    pub clock_origin: std::time::SystemTime,
}

type Reply<T, N> = oneshot::Sender<Result<T, RaftError<N>>>;
type WriteReply<C> = Reply<(LogId, <C as TypeConfig>::Response), <C as TypeConfig>::Node>;

enum Input<C: TypeConfig> {
    Write {
        command: C::Command,
        reply: WriteReply<C>,
    },
    Read {
        reply: Reply<LogIndex, C::Node>,
    },
    Rpc {
        from: NodeId,
        msg: Message<C>,
        reply: Reply<Message<C>, C::Node>,
    },
    Peer {
        from: NodeId,
        msg: Message<C>,
    },
    Initialize {
        members: BTreeMap<NodeId, C::Node>,
        reply: Reply<(), C::Node>,
    },
    Transfer {
        to: NodeId,
        reply: Reply<(), C::Node>,
    },
    Membership {
        change: MembershipChange<C::Node>,
        reply: WriteReply<C>,
    },
    Shutdown,
}

#[derive(Clone)]
enum MembershipChange<N> {
    AddLearner(NodeId, N),
    RemoveLearner(NodeId),
    Voters(BTreeSet<NodeId>),
    Demote(NodeId),
}

/// The handle to one running Raft node. Cheap to clone.
///
/// ```
/// use std::collections::BTreeMap;
/// use raft_core::memory::{KvCommand, KvConfig, MemLogStore, MemRouter, MemStateMachine};
/// use raft_core::{Config, NodeId, Raft};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let router = MemRouter::<KvConfig>::new();
/// let sm = MemStateMachine::new();
/// let raft = Raft::start(NodeId(1), Config::default(), MemLogStore::new(), sm.clone(), router.factory(NodeId(1))).await?;
/// router.register(NodeId(1), raft.clone());
/// raft.initialize(BTreeMap::from([(NodeId(1), "node-1".to_string())])).await?;
/// raft.wait_for_leader(std::time::Duration::from_secs(5)).await;
/// raft.client_write(KvCommand::Put { key: "k".into(), value: "v".into() }).await?;
/// raft.ensure_linearizable().await?;
/// assert_eq!(sm.get("k").as_deref(), Some("v"));
/// raft.shutdown().await;
/// # Ok(()) }
/// ```
pub struct Raft<C: TypeConfig> {
    inner: Arc<Inner<C>>,
}

impl<C: TypeConfig> Clone for Raft<C> {
    fn clone(&self) -> Self {
        Raft {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<C: TypeConfig> {
    id: NodeId,
    learner_max_lag: u64,
    /// One permit per write the node may hold (back-pressure).
    write_permits: Arc<tokio::sync::Semaphore>,
    max_pending_writes: usize,
    /// One permit per linearizable read the node may hold.
    read_permits: Arc<tokio::sync::Semaphore>,
    max_pending_reads: usize,
    when_full: WhenFull,
    tx: mpsc::UnboundedSender<Input<C>>,
    metrics: watch::Receiver<RaftMetrics<C::Node>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// How many committed entries `id` lacks, as far as `m` tells: only a
/// leader tracks it; elsewhere it is not known to have anything.
///
/// Counted against the commit index, not the leader's last entry: the
/// entries no follower has acknowledged yet are lacked by every voter
/// alike, and there are always some while clients write (the writes of
/// one round trip: a few hundred at 256 writers, as many over a link of
/// 50 ms at 2,000 writes/s). Counted against the last entry, a learner as
/// current as the voters stayed more than `Config::learner_max_lag`
/// behind for as long as that held, and was never promoted.
fn behind<N>(m: &RaftMetrics<N>, id: NodeId) -> u64 {
    match m.replication.get(&id) {
        Some(matched) if m.role == Role::Leader => m.commit_index.0.saturating_sub(matched.0),
        _ => m.commit_index.0,
    }
}

impl<C: TypeConfig> Raft<C> {
    /// Recovers node `id` from its storage and starts it. A node with empty
    /// storage waits to be [`initialized`](Raft::initialize) or to hear from
    /// a leader.
    pub async fn start<L, S, F>(
        id: NodeId,
        config: Config,
        mut log_store: L,
        mut state_machine: S,
        network: F,
    ) -> Result<Raft<C>, StartError>
    where
        L: LogStore<C>,
        S: StateMachine<C>,
        F: NetworkFactory<C>,
    {
        let config = config.validate()?;
        let learner_max_lag = config.learner_max_lag;
        let (max_pending_writes, max_pending_reads, when_full) = (
            config.max_pending_writes,
            config.max_pending_reads,
            config.when_full,
        );
        let hard_state = log_store.load_hard_state().await?;
        let log_state = log_store.log_state().await?;
        let entries = log_store
            .read(log_state.last_purged.index.next(), log_state.last.index)
            .await?;
        let snapshot = state_machine.current_snapshot().await?;
        let applied = state_machine.applied().await?;
        let state = RecoveredState {
            hard_state,
            log_base: log_state.last_purged,
            entries,
            snapshot,
            applied,
        };
        // The seed draws election timeouts and, on a new store, the node's
        // identity: from the OS where it can, so that two nodes (or one
        // node before and after a wipe) never share one.
        let seed = getrandom::u64().unwrap_or_else(|_| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
                ^ id.0
        });
        let (start, clock_origin) = (Instant::now(), std::time::SystemTime::now());
        let engine = Engine::new(id, config, seed, 0, state)?;
        info!(node = %id, term = %engine.term(), last_log = %engine.last_log_id(), applied = %applied, "raft node recovered");
        let (tx, rx) = mpsc::unbounded_channel();
        let (metrics_tx, metrics_rx) =
            watch::channel(metrics_of(&engine, applied.index, None, clock_origin));
        let (report_tx, reports) = mpsc::unbounded_channel();
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        let (sm_tx, sm_rx) = mpsc::unbounded_channel();
        let chunk_bytes = engine.config().snapshot_chunk_bytes;
        // Workers of stores that never block run inside the driver's task
        // (no hand-off per operation); the others on tasks of their own.
        let (inline_log, inline_sm) = (log_store.never_blocks(), state_machine.never_blocks());
        let log_work = log_worker(log_store, log_rx, report_tx.clone())
            .instrument(info_span!("raft_log", node = %id));
        let sm_work = sm_worker(id, chunk_bytes, state_machine, sm_rx, report_tx)
            .instrument(info_span!("raft_sm", node = %id));
        let (lanes, mut workers) = (FuturesUnordered::<Lane>::new(), Vec::new());
        if inline_log {
            lanes.push(Box::pin(log_work));
        } else {
            workers.push(tokio::spawn(log_work));
        }
        if inline_sm {
            lanes.push(Box::pin(sm_work));
        } else {
            workers.push(tokio::spawn(sm_work));
        }
        let driver = Driver {
            x: Executor::new(engine, applied.index, Mode::Pipelined),
            network,
            peers: HashMap::new(),
            rpcs: FuturesUnordered::new(),
            answered: VecDeque::new(),
            rx,
            reports,
            log_tx,
            sm_tx,
            workers,
            lanes,
            start,
            initialize_reply: None,
            metrics: metrics_tx,
        };
        let task = tokio::spawn(driver.run().instrument(info_span!("raft", node = %id)));
        Ok(Raft {
            inner: Arc::new(Inner {
                id,
                learner_max_lag,
                write_permits: Arc::new(tokio::sync::Semaphore::new(max_pending_writes)),
                max_pending_writes,
                read_permits: Arc::new(tokio::sync::Semaphore::new(max_pending_reads)),
                max_pending_reads,
                when_full,
                tx,
                metrics: metrics_rx,
                task: std::sync::Mutex::new(Some(task)),
            }),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(Reply<T, C::Node>) -> Input<C>,
    ) -> Result<T, RaftError<C::Node>> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .tx
            .send(make(reply))
            .map_err(|_| self.stopped_error())?;
        rx.await.map_err(|_| self.stopped_error())?
    }

    fn stopped_error(&self) -> RaftError<C::Node> {
        match &self.inner.metrics.borrow().fatal {
            Some(e) => RaftError::Fatal(e.clone()),
            None => RaftError::Shutdown,
        }
    }

    /// Bootstraps a new cluster with `members` as its voters. Call it on
    /// every initial member with the same map (or on one of them). Returns
    /// once the configuration is durable.
    pub async fn initialize(
        &self,
        members: BTreeMap<NodeId, C::Node>,
    ) -> Result<(), RaftError<C::Node>> {
        self.call(|reply| Input::Initialize { members, reply })
            .await
    }

    /// Replicates `command` and resolves with the state machine's response
    /// once it is committed and applied. On a follower: `NotLeader`.
    ///
    /// If the leader loses leadership meanwhile, this resolves when the
    /// command's index is applied: with the response if the command made
    /// it, `ProposalDropped` if another entry took its place. Wrap it in a
    /// timeout if the caller cannot wait that long (the outcome is then
    /// unknown).
    ///
    /// At most `Config::max_pending_writes` writes are held at once; past
    /// that this waits for room, or with `WhenFull::FailFast` returns
    /// `Overloaded` without proposing anything.
    pub async fn client_write(
        &self,
        command: C::Command,
    ) -> Result<(LogId, C::Response), RaftError<C::Node>> {
        let _permit = self
            .permit(&self.inner.write_permits, self.inner.max_pending_writes)
            .await?;
        self.call(|reply| Input::Write { command, reply }).await
    }

    /// Room for one more write or read, as `Config::when_full` says.
    async fn permit<'a>(
        &self,
        permits: &'a tokio::sync::Semaphore,
        limit: usize,
    ) -> Result<tokio::sync::SemaphorePermit<'a>, RaftError<C::Node>> {
        match self.inner.when_full {
            WhenFull::Wait => permits.acquire().await.map_err(|_| self.stopped_error()),
            WhenFull::FailFast => permits
                .try_acquire()
                .map_err(|_| RaftError::Overloaded { pending: limit }),
        }
    }

    /// ReadIndex (thesis §6.4): confirms with a quorum that this node still
    /// leads, then waits until the state machine has applied everything
    /// committed when the read began. Reading the state machine after this
    /// returns is linearizable. Concurrent calls share one quorum round.
    ///
    /// At most `Config::max_pending_reads` reads are held at once; past
    /// that this waits for room, or with `WhenFull::FailFast` returns
    /// `Overloaded`.
    pub async fn ensure_linearizable(&self) -> Result<LogIndex, RaftError<C::Node>> {
        let _permit = self
            .permit(&self.inner.read_permits, self.inner.max_pending_reads)
            .await?;
        self.call(|reply| Input::Read { reply }).await
    }

    /// Hands leadership to `to` (thesis §3.10). Resolves when the request
    /// was started; watch [`Raft::metrics`] for the new leader.
    pub async fn transfer_leader(&self, to: NodeId) -> Result<(), RaftError<C::Node>> {
        self.call(|reply| Input::Transfer { to, reply }).await
    }

    /// Hands leadership to `to` and waits until this node sees it lead, or
    /// `timeout` passes (the transfer is abandoned by the engine after an
    /// election timeout; this returns `Timeout`).
    pub async fn transfer_leader_and_wait(
        &self,
        to: NodeId,
        timeout: Duration,
    ) -> Result<(), RaftError<C::Node>> {
        self.transfer_leader(to).await?;
        let mut metrics = self.metrics();
        match tokio::time::timeout(timeout, metrics.wait_for(|m| m.leader_id == Some(to))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => Err(RaftError::Timeout("the leadership transfer")),
        }
    }

    /// Whether this node is fit to serve (a load balancer's readiness
    /// check): it knows a leader, has not stopped, and has applied to
    /// within `Config::learner_max_lag` entries of the cluster's commit
    /// index as far as it knows it ([`RaftMetrics::leader_commit_index`]),
    /// the bound a leader uses to call a learner caught up. A node that is
    /// catching up (after a restart, or joining) is not ready until then.
    pub fn is_ready(&self) -> bool {
        let m = self.inner.metrics.borrow();
        m.fatal.is_none()
            && m.leader_id.is_some()
            && m.leader_commit_index.0.saturating_sub(m.applied_index.0)
                <= self.inner.learner_max_lag
    }

    /// A watch of this node's metrics.
    pub fn metrics(&self) -> watch::Receiver<RaftMetrics<C::Node>> {
        self.inner.metrics.clone()
    }

    /// Waits until some node is known to lead (or `timeout` passes).
    pub async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        let mut m = self.metrics();
        let wait = m.wait_for(|m| m.leader_id.is_some());
        tokio::time::timeout(timeout, wait)
            .await
            .ok()?
            .ok()
            .and_then(|m| m.leader_id)
    }

    /// Handles an AppendEntries RPC from `from` (called by the transport).
    pub async fn handle_append_entries(
        &self,
        from: NodeId,
        req: AppendEntriesRequest<C>,
    ) -> Result<AppendEntriesResponse, RaftError<C::Node>> {
        match self.rpc(from, Message::AppendEntries(req)).await? {
            Message::AppendEntriesResponse(r) => Ok(r),
            other => Err(RaftError::Fatal(format!(
                "engine answered append with {}",
                other.kind()
            ))),
        }
    }

    /// Handles a RequestVote or pre-vote RPC from `from`.
    pub async fn handle_vote(
        &self,
        from: NodeId,
        req: VoteRequest,
    ) -> Result<VoteResponse, RaftError<C::Node>> {
        match self.rpc(from, Message::Vote(req)).await? {
            Message::VoteResponse(r) => Ok(r),
            other => Err(RaftError::Fatal(format!(
                "engine answered vote with {}",
                other.kind()
            ))),
        }
    }

    /// Handles one InstallSnapshot chunk from `from`.
    pub async fn handle_install_snapshot(
        &self,
        from: NodeId,
        req: InstallSnapshotRequest<C>,
    ) -> Result<InstallSnapshotResponse, RaftError<C::Node>> {
        match self.rpc(from, Message::InstallSnapshot(req)).await? {
            Message::InstallSnapshotResponse(r) => Ok(r),
            other => Err(RaftError::Fatal(format!(
                "engine answered snapshot with {}",
                other.kind()
            ))),
        }
    }

    /// Handles a TimeoutNow from the leader (one-way).
    pub async fn handle_timeout_now(
        &self,
        from: NodeId,
        req: TimeoutNowRequest,
    ) -> Result<(), RaftError<C::Node>> {
        self.inner
            .tx
            .send(Input::Peer {
                from,
                msg: Message::TimeoutNow(req),
            })
            .map_err(|_| self.stopped_error())
    }

    async fn rpc(&self, from: NodeId, msg: Message<C>) -> Result<Message<C>, RaftError<C::Node>> {
        self.call(|reply| Input::Rpc { from, msg, reply }).await
    }

    /// Stops the node and waits for its task to finish. Pending calls fail
    /// with `Shutdown`. When this returns, the node has dropped its
    /// `LogStore` and `StateMachine`, and every future they returned has
    /// finished or been dropped; a snapshot build in flight is finished
    /// first (a storage engine may go on working, and holding its files,
    /// after a build's future is dropped), so the store can be reopened at
    /// once.
    pub async fn shutdown(&self) {
        let _ = self.inner.tx.send(Input::Shutdown);
        let task = self.inner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}
