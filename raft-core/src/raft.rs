//! The tokio driver: one task owns one [`Engine`] inside the shared
//! [`Executor`] and serves the [`Raft`] handle; two workers carry out what
//! the executor hands out, each in order: the log worker against the
//! [`LogStore`] (merging appends that queued up into one call: group
//! commit), the state-machine worker against the [`StateMachine`]. The
//! driver polls its RPCs itself: a request is written when the batch that
//! made it ends, and its response wakes the driver directly, with no task
//! per message in between.
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

/// Errors from the [`Raft`] handle.
#[derive(Debug, Error, Clone)]
pub enum RaftError<N> {
    /// This node does not lead; retry on `leader_id` (at `leader_node`).
    #[error(transparent)]
    NotLeader(#[from] NotLeader<N>),
    #[error("a leadership transfer is in progress; retry shortly")]
    TransferInProgress,
    /// The node already holds `Config::max_pending_writes` writes (or
    /// `Config::max_pending_reads` reads) and is configured to fail fast
    /// (`WhenFull::FailFast`); nothing was started.
    #[error(
        "this node already holds {pending} pending requests of this kind (writes or reads); retry shortly"
    )]
    Overloaded { pending: usize },
    /// A membership change was refused; nothing was proposed.
    #[error("membership change refused: {0}")]
    Membership(#[from] MembershipError),
    /// The learner was added but did not catch up in time; it stays a
    /// learner and keeps receiving the log.
    #[error("learner {id} was added but is still {behind} entries behind")]
    LearnerBehind { id: NodeId, behind: u64 },
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
    #[error("cannot initialize: {0}")]
    Initialize(#[from] InitializeError),
    /// Storage failed; the node stopped (fail-stop) and must be restarted.
    #[error("node stopped after a storage error: {0}")]
    Fatal(String),
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
    #[error("invalid config: {0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("reading storage: {0}")]
    Storage(#[from] StorageError),
    #[error("recovered state is inconsistent: {0}")]
    Recovery(#[from] RecoveryError),
}

/// A point-in-time view of a node, published on every change.
#[derive(Clone, Debug, PartialEq)]
pub struct RaftMetrics<N> {
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
    pub role: Role,
    pub term: Term,
    pub leader_id: Option<NodeId>,
    pub commit_index: LogIndex,
    /// Highest index the state machine has applied.
    pub applied_index: LogIndex,
    pub last_log_index: LogIndex,
    pub snapshot: Option<LogId>,
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

/// How many entries `id` is behind this node's log, as far as `m` tells:
/// only a leader tracks it; elsewhere it is not known to have anything.
fn behind<N>(m: &RaftMetrics<N>, id: NodeId) -> u64 {
    match m.replication.get(&id) {
        Some(matched) if m.role == Role::Leader => m.last_log_index.0.saturating_sub(matched.0),
        _ => m.last_log_index.0,
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
        let start = Instant::now();
        let engine = Engine::new(id, config, seed, 0, state)?;
        info!(node = %id, term = %engine.term(), last_log = %engine.last_log_id(), applied = %applied, "raft node recovered");
        let (tx, rx) = mpsc::unbounded_channel();
        let (metrics_tx, metrics_rx) = watch::channel(metrics_of(&engine, applied.index, None));
        let (report_tx, reports) = mpsc::unbounded_channel();
        let (log_tx, log_rx) = mpsc::unbounded_channel();
        let (sm_tx, sm_rx) = mpsc::unbounded_channel();
        let chunk_bytes = engine.config().snapshot_chunk_bytes;
        let workers = vec![
            tokio::spawn(
                log_worker(log_store, log_rx, report_tx.clone())
                    .instrument(info_span!("raft_log", node = %id)),
            ),
            tokio::spawn(
                sm_worker(id, chunk_bytes, state_machine, sm_rx, report_tx)
                    .instrument(info_span!("raft_sm", node = %id)),
            ),
        ];
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

    /// Adds `id` (reached at `node`) as a learner, then waits until it is
    /// within `Config::learner_max_lag` entries of this leader's log. If it
    /// is still further behind after `timeout`, returns `LearnerBehind`:
    /// the learner stays added and keeps catching up.
    pub async fn add_learner(
        &self,
        id: NodeId,
        node: C::Node,
        timeout: Duration,
    ) -> Result<LogId, RaftError<C::Node>> {
        let deadline = Instant::now() + timeout;
        let log_id = self
            .propose_membership(MembershipChange::AddLearner(id, node))
            .await?;
        let lag = self.inner.learner_max_lag;
        let mut metrics = self.metrics();
        let caught_up = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| {
                m.role == Role::Leader && m.replication.contains_key(&id) && behind(m, id) <= lag
            }),
        )
        .await;
        match caught_up {
            Ok(Ok(_)) => Ok(log_id),
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => Err(self.learner_behind(id)),
        }
    }

    /// Waits until learner `id` is within `Config::learner_max_lag`
    /// entries of this leader's log. `LearnerBehind` if it is not after
    /// `timeout`; `NotLeader` if this node stops leading meanwhile.
    /// [`Raft::change_membership`] does this for every learner it
    /// promotes; call it first to bound that wait separately.
    pub async fn wait_caught_up(
        &self,
        id: NodeId,
        timeout: Duration,
    ) -> Result<(), RaftError<C::Node>> {
        match tokio::time::timeout(timeout, self.caught_up(id)).await {
            Ok(r) => r,
            Err(_) => Err(self.learner_behind(id)),
        }
    }

    /// `LearnerBehind` for `id`, with how far behind it is now.
    fn learner_behind(&self, id: NodeId) -> RaftError<C::Node> {
        RaftError::LearnerBehind {
            id,
            behind: behind(&self.metrics().borrow(), id),
        }
    }

    async fn caught_up(&self, id: NodeId) -> Result<(), RaftError<C::Node>> {
        let lag = self.inner.learner_max_lag;
        let mut metrics = self.metrics();
        let seen = metrics
            .wait_for(|m| {
                m.fatal.is_some()
                    || m.role != Role::Leader
                    || m.replication.contains_key(&id) && behind(m, id) <= lag
            })
            .await
            .map_err(|_| self.stopped_error())?;
        if let Some(e) = &seen.fatal {
            return Err(RaftError::Fatal(e.clone()));
        }
        if seen.role != Role::Leader {
            let leader_id = seen.leader_id;
            let leader_node = leader_id.and_then(|l| seen.membership.nodes.get(&l).cloned());
            return Err(RaftError::NotLeader(NotLeader {
                leader_id,
                leader_node,
            }));
        }
        Ok(())
    }

    /// Removes learner `id` from the cluster; resolves once that is applied.
    /// Like every membership call, it first waits for a change in progress
    /// to settle rather than failing with `MembershipError::InProgress`.
    pub async fn remove_learner(&self, id: NodeId) -> Result<LogId, RaftError<C::Node>> {
        self.propose_membership(MembershipChange::RemoveLearner(id))
            .await
    }

    /// Makes `voters` the voting members by joint consensus (see
    /// [`Engine::change_membership`]): promotes learners, removes voters.
    /// Resolves once the final configuration is committed.
    ///
    /// It first waits until every learner it promotes is caught up (see
    /// [`Raft::wait_caught_up`]): the new configuration's majority may
    /// need that node, and a node still catching up (a learner applying
    /// the log after a large snapshot) held every write until it did (seen
    /// in `cargo xtask bench join`: ten seconds without a commit). If another
    /// change is in progress, this first waits for it to settle (see
    /// `propose_membership`); if this node loses leadership meanwhile, the
    /// next leader finishes the change. Wrap the call in a timeout if the
    /// caller cannot wait.
    pub async fn change_membership(
        &self,
        voters: BTreeSet<NodeId>,
    ) -> Result<(), RaftError<C::Node>> {
        // Known learners only: anything else is the engine's to refuse.
        let promoted: Vec<NodeId> = {
            let m = self.metrics();
            let m = m.borrow();
            voters
                .iter()
                .copied()
                .filter(|id| m.membership.is_learner(*id))
                .collect()
        };
        for id in promoted {
            self.caught_up(id).await?;
        }
        let joint = self
            .propose_membership(MembershipChange::Voters(voters.clone()))
            .await?;
        let mut metrics = self.metrics();
        let done = metrics
            .wait_for(|m| {
                let final_config =
                    m.membership.configs.len() == 1 && m.membership.configs[0] == voters;
                m.fatal.is_some()
                    || final_config
                        && m.membership_log_id.index > joint.index
                        && m.commit_index >= m.membership_log_id.index
            })
            .await
            .map_err(|_| self.stopped_error())?;
        match &done.fatal {
            Some(e) => Err(RaftError::Fatal(e.clone())),
            None => Ok(()),
        }
    }

    /// Proposes `change` once no other change is in progress, and resolves
    /// when the proposed entry is applied.
    ///
    /// The engine allows one change at a time and refuses another while the
    /// last configuration is joint or uncommitted. Both settle by themselves
    /// (a joint configuration is followed by its final one; a fresh leader's
    /// inherited configuration becomes committed with its first entry), so
    /// instead of handing the caller a refusal it could only retry, this
    /// waits while this node stays leader and tries again. Losing leadership
    /// ends the wait with `NotLeader`.
    async fn propose_membership(
        &self,
        change: MembershipChange<C::Node>,
    ) -> Result<LogId, RaftError<C::Node>> {
        loop {
            let change = change.clone();
            match self.call(|reply| Input::Membership { change, reply }).await {
                Ok((log_id, _)) => return Ok(log_id),
                Err(RaftError::Membership(MembershipError::InProgress { index })) => {
                    let mut metrics = self.metrics();
                    metrics
                        .wait_for(|m| {
                            let settled = !m.membership.is_joint()
                                && m.commit_index >= m.membership_log_id.index;
                            m.fatal.is_some()
                                || m.role != Role::Leader
                                || m.membership_log_id.index != index
                                || settled
                        })
                        .await
                        .map_err(|_| self.stopped_error())?;
                }
                Err(e) => return Err(e),
            }
        }
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

fn metrics_of<C: TypeConfig>(
    e: &Engine<C>,
    applied: LogIndex,
    fatal: Option<String>,
) -> RaftMetrics<C::Node> {
    RaftMetrics {
        id: e.id(),
        uuid: e.uuid(),
        recognized: e.recognized(),
        unrecognized: e.unrecognized_peers(),
        role: e.role(),
        term: e.term(),
        leader_id: e.leader_id(),
        commit_index: e.commit_index(),
        applied_index: applied,
        last_log_index: e.last_log_id().index,
        snapshot: e.snapshot_meta().map(|s| s.last_log_id),
        membership: e.membership().clone(),
        membership_log_id: e.membership_log_id(),
        replication: e.matched(),
        fatal,
        elections: e.elections(),
        leader_changes: u64::from(e.leader_id().is_some()),
        snapshots_sent: e.snapshots_sent(),
        snapshots_installed: e.snapshots_installed(),
        snapshot_bytes_delivered: e.snapshot_deliveries().0,
        snapshot_delivery_millis: e.snapshot_deliveries().1,
    }
}

/// Sets `m` to what `e` and `applied` say now; whether anything changed.
/// The pattern names every field, so a new one cannot be left stale.
fn update_metrics<C: TypeConfig>(
    m: &mut RaftMetrics<C::Node>,
    e: &Engine<C>,
    applied: LogIndex,
    fatal: Option<String>,
) -> bool {
    let RaftMetrics {
        id: _,
        uuid: _,
        recognized,
        unrecognized,
        role,
        term,
        leader_id,
        commit_index,
        applied_index,
        last_log_index,
        snapshot,
        membership,
        membership_log_id,
        replication,
        fatal: stopped,
        elections,
        leader_changes,
        snapshots_sent,
        snapshots_installed,
        snapshot_bytes_delivered,
        snapshot_delivery_millis,
    } = m;
    let mut changed = false;
    macro_rules! set {
        ($field:ident, $value:expr) => {{
            let value = $value;
            if *$field != value {
                *$field = value;
                changed = true;
            }
        }};
    }
    set!(role, e.role());
    set!(term, e.term());
    set!(recognized, e.recognized());
    set!(unrecognized, e.unrecognized_peers());
    // Before `leader_id` takes the new value. Counted as published: a
    // leader that came and went within one driver turn is not seen.
    if e.leader_id().is_some() && *leader_id != e.leader_id() {
        *leader_changes += 1;
    }
    set!(leader_id, e.leader_id());
    set!(commit_index, e.commit_index());
    set!(applied_index, applied);
    set!(last_log_index, e.last_log_id().index);
    set!(snapshot, e.snapshot_meta().map(|s| s.last_log_id));
    set!(membership_log_id, e.membership_log_id());
    set!(stopped, fatal);
    set!(elections, e.elections());
    set!(snapshots_sent, e.snapshots_sent());
    set!(snapshots_installed, e.snapshots_installed());
    set!(snapshot_bytes_delivered, e.snapshot_deliveries().0);
    set!(snapshot_delivery_millis, e.snapshot_deliveries().1);
    if *membership != *e.membership() {
        *membership = e.membership().clone();
        changed = true;
    }
    if replication
        .keys()
        .copied()
        .eq(e.each_matched().map(|(id, _)| id))
    {
        for ((_, now), was) in e.each_matched().zip(replication.values_mut()) {
            changed |= *was != now;
            *was = now;
        }
    } else {
        *replication = e.each_matched().collect();
        changed = true;
    }
    changed
}

/// The driver's callers: one-shot reply channels.
struct DriverCallers<C>(std::marker::PhantomData<C>);

impl<C: TypeConfig> Callers for DriverCallers<C> {
    type Write = WriteReply<C>;
    type Read = Reply<LogIndex, C::Node>;
    type Rpc = RpcReply<C>;
}

/// How a run of log operations ended.
enum LogDone<C: TypeConfig> {
    /// This many operations are durable.
    Durable(usize),
    /// The next operation, a read, read these entries.
    Read(Vec<Entry<C>>),
}

/// What the log worker is handed, in order: operations on the `LogStore`,
/// and replies to send once the operations before them are durable.
enum LogItem<C: TypeConfig> {
    Op(LogOp<C>),
    Reply(RpcReply<C>, Message<C>),
}

type RpcReply<C> = Reply<Message<C>, <C as TypeConfig>::Node>;

/// What the storage workers report back to the driver's loop.
enum Report<C: TypeConfig> {
    /// The oldest log operations in flight are done, in order.
    Log(Vec<LogDone<C>>),
    /// The oldest applies in flight are done: the number of entries of
    /// each (their writes are answered).
    Applied(Vec<usize>),
    SnapshotBuilt(SnapshotMeta<C>),
    ChunkRead(NodeId, Option<Message<C>>),
    ChunkWritten,
    Installed(SnapshotMeta<C>),
    Failed(StorageError),
}

/// What one step of the driver's loop takes in.
enum Event<C: TypeConfig> {
    Input(Input<C>),
    Report(Report<C>),
    /// A peer's response to an RPC of ours.
    Answer(NodeId, Message<C>),
}

/// One RPC in flight: the peer's response, if it gave one.
type RpcCall<C> = Pin<Box<dyn Future<Output = Option<(NodeId, Message<C>)>> + Send>>;

struct Driver<C: TypeConfig, F: NetworkFactory<C>> {
    x: Executor<C, DriverCallers<C>>,
    network: F,
    peers: HashMap<NodeId, (C::Node, Arc<F::Network>)>,
    /// RPCs in flight, polled by the driver's own task.
    rpcs: FuturesUnordered<RpcCall<C>>,
    /// Responses collected while starting new RPCs, handled next batch.
    answered: VecDeque<(NodeId, Message<C>)>,
    rx: mpsc::UnboundedReceiver<Input<C>>,
    reports: mpsc::UnboundedReceiver<Report<C>>,
    log_tx: mpsc::UnboundedSender<LogItem<C>>,
    sm_tx: mpsc::UnboundedSender<SmOpOf<C>>,
    workers: Vec<JoinHandle<()>>,
    start: Instant,
    initialize_reply: Option<Reply<(), C::Node>>,
    metrics: watch::Sender<RaftMetrics<C::Node>>,
}

const BATCH: usize = 1024;

/// A driver turn this long, or a wake-up this late, is logged: every timer
/// of the node (heartbeats, elections) waits on it, so a node whose
/// runtime is starved or whose turn blocks looks dead to its peers.
const SLOW_TURN: Duration = Duration::from_millis(50);

impl<C, F> Driver<C, F>
where
    C: TypeConfig,
    F: NetworkFactory<C>,
{
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn run(mut self) {
        // When a slow turn or late wake-up was last logged: once a second.
        let mut warned: Option<Instant> = None;
        loop {
            let deadline = self.start + Duration::from_millis(self.x.engine().next_deadline());
            // Storage reports first: they unblock replies and commits; then
            // peers' answers, then new inputs.
            let first = match self.answered.pop_front() {
                Some((from, msg)) => Some(Event::Answer(from, msg)),
                None => tokio::select! {
                    biased;
                    report = self.reports.recv() => match report {
                        Some(r) => Some(Event::Report(r)),
                        None => break,
                    },
                    // A failed call (`Some(None)`) still ends the wait: a
                    // refuted pattern would stop this select polling the
                    // other calls.
                    answer = self.rpcs.next(), if !self.rpcs.is_empty() => {
                        answer.flatten().map(|(from, msg)| Event::Answer(from, msg))
                    }
                    input = self.rx.recv() => match input {
                        Some(i) => Some(Event::Input(i)),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => None,
                },
            };
            let woke = Instant::now();
            // Time moves first, timers fire last: what queued up while this
            // task waited (a pause, a busy runtime) counts before a timer
            // judges its absence.
            let now = self.now_ms();
            self.x.engine_mut().advance_clock(now);
            let mut stop = false;
            let mut next = first;
            let mut n = 0;
            while let Some(event) = next.take() {
                n += 1;
                match event {
                    Event::Input(Input::Shutdown) => {
                        stop = true;
                        break;
                    }
                    Event::Input(input) => self.handle(input),
                    Event::Answer(from, msg) => self.answer(from, msg),
                    Event::Report(report) => {
                        if let Err(e) = self.report(report) {
                            self.fail_stop(e);
                            return self.stop_workers().await;
                        }
                    }
                }
                if n >= BATCH {
                    break;
                }
                next = match self.reports.try_recv() {
                    Ok(r) => Some(Event::Report(r)),
                    Err(_) => match self.answered.pop_front() {
                        Some((from, msg)) => Some(Event::Answer(from, msg)),
                        None => self.rx.try_recv().ok().map(Event::Input),
                    },
                };
            }
            self.x.tick(now);
            self.pump();
            self.start_rpcs().await;
            self.publish(None);
            let (late, took) = (woke.saturating_duration_since(deadline), woke.elapsed());
            if (late >= SLOW_TURN || took >= SLOW_TURN)
                && warned.is_none_or(|w| w.elapsed() >= Duration::from_secs(1))
            {
                warned = Some(Instant::now());
                warn!(
                    node = %self.x.engine().id(),
                    late_ms = late.as_millis() as u64,
                    took_ms = took.as_millis() as u64,
                    events = n,
                    "driver turn slow or late: peers may miss this node's heartbeats"
                );
            }
            if stop {
                break;
            }
        }
        let id = self.x.engine().id();
        self.stop_workers().await;
        info!(node = %id, "raft node shut down");
    }

    /// Polls the RPCs in flight once, so the requests `pump` just queued
    /// are written now rather than when the loop next sleeps; answers that
    /// are already in wait for the next batch.
    async fn start_rpcs(&mut self) {
        let (rpcs, answered) = (&mut self.rpcs, &mut self.answered);
        std::future::poll_fn(|cx| {
            while let Poll::Ready(Some(answer)) = rpcs.poll_next_unpin(cx) {
                answered.extend(answer);
            }
            Poll::Ready(())
        })
        .await
    }

    /// Closes the workers' queues and waits for them to finish what they
    /// were handed, so a restart on the same storage never races them.
    async fn stop_workers(self) {
        let Driver {
            log_tx,
            sm_tx,
            workers,
            ..
        } = self;
        drop((log_tx, sm_tx));
        for w in workers {
            let _ = w.await;
        }
    }

    fn handle(&mut self, input: Input<C>) {
        match input {
            Input::Write { command, reply } => self.x.propose(command, reply),
            Input::Membership { change, reply } => {
                let e = self.x.engine_mut();
                let proposed = match change {
                    MembershipChange::AddLearner(id, node) => e.add_learner(id, node),
                    MembershipChange::RemoveLearner(id) => e.remove_learner(id),
                    MembershipChange::Voters(voters) => e.change_membership(voters),
                };
                self.x.await_entry(proposed, reply);
            }
            Input::Read { reply } => self.x.read(reply),
            Input::Rpc { from, msg, reply } => {
                let kind = msg.kind();
                if let Err((e, reply)) = self.x.step(from, msg, Some(reply)) {
                    warn!(peer = %from, kind, error = %e, "refused message");
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(RaftError::Refused(e)));
                    }
                }
            }
            Input::Peer { from, msg } => self.answer(from, msg),
            Input::Initialize { members, reply } => {
                match self
                    .x
                    .engine_mut()
                    .initialize(Membership::new_voters(members))
                {
                    Ok(()) => self.initialize_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Initialize(e)));
                    }
                }
            }
            Input::Transfer { to, reply } => {
                let r = self
                    .x
                    .engine_mut()
                    .transfer_leader(to)
                    .map_err(RaftError::NotLeader);
                let _ = reply.send(r);
            }
            Input::Shutdown => {}
        }
    }

    /// Steps a peer's message that needs no reply (a response, TimeoutNow).
    fn answer(&mut self, from: NodeId, msg: Message<C>) {
        let kind = msg.kind();
        if let Err((e, _)) = self.x.step(from, msg, None) {
            warn!(peer = %from, kind, error = %e, "refused response");
        }
    }

    /// Hands a storage worker's report to the executor.
    fn report(&mut self, report: Report<C>) -> Result<(), StorageError> {
        match report {
            Report::Log(done) => {
                for d in done {
                    match d {
                        LogDone::Durable(n) => (0..n).for_each(|_| self.x.log_done()),
                        LogDone::Read(entries) => self.x.log_read(entries),
                    }
                }
            }
            Report::Applied(counts) => {
                for n in counts {
                    if let Err((got, want)) = self.x.applied_batch(n) {
                        return Err(StorageError::Corrupt {
                            location: "state machine".into(),
                            detail: format!("{got} responses for {want} entries"),
                        });
                    }
                }
            }
            Report::SnapshotBuilt(meta) => self.x.snapshot_built(meta),
            Report::ChunkRead(to, msg) => self.x.snapshot_chunk_read(to, msg),
            Report::ChunkWritten => self.x.snapshot_chunk_written(),
            Report::Installed(meta) => self.x.snapshot_installed(&meta),
            Report::Failed(e) => return Err(e),
        }
        Ok(())
    }

    /// Hands out what the executor has ready and answers callers.
    fn pump(&mut self) {
        for io in self.x.poll_io() {
            match io {
                Io::Log(op) => {
                    let _ = self.log_tx.send(LogItem::Op(op));
                }
                Io::Sm(op) => {
                    let _ = self.sm_tx.send(op);
                }
                Io::Send { to, msg } => self.send(to, msg),
                Io::Reply { to, msg } => {
                    let _ = to.send(Ok(msg));
                }
                Io::ReplyAfterLog { to, msg } => {
                    let _ = self.log_tx.send(LogItem::Reply(to, msg));
                }
            }
        }
        for done in self.x.take_done() {
            match done {
                Done::Write(reply, e) => {
                    let _ = reply.send(Err(RaftError::from(e)));
                }
                Done::Read(reply, r) => {
                    let _ = reply.send(r.map_err(RaftError::NotLeader));
                }
                Done::Refused { from, reply, error } => {
                    warn!(peer = %from, kind = "append", error = %error, "refused message");
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(RaftError::Refused(error)));
                    }
                }
            }
        }
        if self.x.log_idle()
            && let Some(reply) = self.initialize_reply.take()
        {
            let _ = reply.send(Ok(()));
        }
    }

    fn send(&mut self, to: NodeId, msg: Message<C>) {
        let Some(node) = self.x.engine().membership().nodes.get(&to).cloned() else {
            debug!(peer = %to, "no address for peer; dropping message");
            return;
        };
        let client = match self.peers.get(&to) {
            Some((addr, c)) if *addr == node => c.clone(),
            _ => {
                let c = Arc::new(self.network.connect(to, &node));
                self.peers.insert(to, (node, c.clone()));
                c
            }
        };
        // A late answer is still an answer (the engine drops stale ones by
        // term and round): the bound only reclaims calls to a peer that
        // never answers.
        let timeout = Duration::from_millis(self.x.engine().config().election_timeout_max_ms * 20);
        self.rpcs.push(Box::pin(async move {
            let kind = msg.kind();
            match tokio::time::timeout(timeout, call_peer(&*client, msg)).await {
                Ok(Ok(resp)) => resp.map(|resp| (to, resp)),
                Ok(Err(e)) => {
                    debug!(peer = %to, kind, error = %e, "rpc failed");
                    None
                }
                Err(_) => {
                    debug!(peer = %to, kind, "rpc timed out");
                    None
                }
            }
        }));
    }

    fn fail_stop(&mut self, e: StorageError) {
        let msg = e.to_string();
        error!(node = %self.x.engine().id(), error = %msg, "storage error; stopping this node");
        let (writes, reads) = self.x.fail_all();
        for reply in writes {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        for reply in reads {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        self.publish(Some(msg));
    }

    /// Brings the published metrics up to date in place: the loop calls
    /// this after every batch, so it allocates only when the membership or
    /// the set of replicated peers changed.
    fn publish(&mut self, fatal: Option<String>) {
        let (e, applied) = (self.x.engine(), self.x.applied());
        self.metrics.send_if_modified(|m| {
            let was = (m.role, m.leader_id);
            let changed = update_metrics(m, e, applied, fatal);
            if (m.role, m.leader_id) != was {
                info!(node = %m.id, term = %m.term, role = ?m.role, leader = ?m.leader_id, "role changed");
            }
            changed
        });
    }
}

/// The log worker: carries out log operations in order, merging runs of
/// appends that queued up meanwhile into one `append` (group commit).
async fn log_worker<C: TypeConfig, L: LogStore<C>>(
    mut store: L,
    mut items: mpsc::UnboundedReceiver<LogItem<C>>,
    reports: mpsc::UnboundedSender<Report<C>>,
) {
    let mut batch = Vec::new();
    let mut replies = Vec::new();
    while let Some(item) = items.recv().await {
        let mut next = Some(item);
        while let Some(item) = next.take() {
            match item {
                LogItem::Op(op) => batch.push(op),
                LogItem::Reply(to, msg) => replies.push((to, msg)),
            }
            if batch.len() < BATCH {
                next = items.try_recv().ok();
            }
        }
        // A reply queued here waits for the operations before it; sending
        // every reply of the batch after all of its operations keeps the
        // group commit (later is always allowed).
        let done = match run_log_ops(&mut store, batch.drain(..)).await {
            Ok(done) => done,
            Err(e) => {
                let _ = reports.send(Report::Failed(e));
                return;
            }
        };
        for (to, msg) in replies.drain(..) {
            let _ = to.send(Ok(msg));
        }
        if !done.is_empty() && reports.send(Report::Log(done)).is_err() {
            return;
        }
    }
}

/// Runs `ops` in order, merging runs of appends; says how each ended.
async fn run_log_ops<C: TypeConfig, L: LogStore<C>>(
    store: &mut L,
    ops: impl Iterator<Item = LogOp<C>>,
) -> Result<Vec<LogDone<C>>, StorageError> {
    let mut appends: Vec<Entry<C>> = Vec::new();
    let mut done = Vec::new();
    let mut durable = 0;
    for op in ops {
        if let LogOp::Append(entries) = op {
            appends.extend(entries);
            durable += 1;
            continue;
        }
        if !appends.is_empty() {
            store.append(std::mem::take(&mut appends)).await?;
        }
        match op {
            LogOp::SaveHardState(hs) => store.save_hard_state(hs).await?,
            LogOp::Truncate { from } => store.truncate(from).await?,
            LogOp::Purge { upto } => store.purge(upto).await?,
            LogOp::Read { from, to } => {
                let entries = store.read(from, to).await?;
                if durable > 0 {
                    done.push(LogDone::Durable(std::mem::take(&mut durable)));
                }
                done.push(LogDone::Read(entries));
                continue;
            }
            LogOp::Append(_) => unreachable!("appends are merged above"),
        }
        durable += 1;
    }
    if !appends.is_empty() {
        store.append(appends).await?;
    }
    if durable > 0 {
        done.push(LogDone::Durable(durable));
    }
    Ok(done)
}

type SmOpOf<C> = SmOp<C, WriteReply<C>>;

/// The state-machine worker: carries out state-machine operations in order,
/// merging runs of applies that queued up meanwhile into one `apply`, and
/// answering each applied write itself.
async fn sm_worker<C: TypeConfig, S: StateMachine<C>>(
    id: NodeId,
    chunk_bytes: usize,
    mut sm: S,
    mut ops: mpsc::UnboundedReceiver<SmOpOf<C>>,
    reports: mpsc::UnboundedSender<Report<C>>,
) {
    let mut held = None;
    // A snapshot being finished beside the applies (`begin_snapshot`).
    let mut building: Option<SnapshotBuild<C>> = None;
    loop {
        let next = match (building.as_mut(), held.take()) {
            (None, Some(op)) => Next::Op(op),
            (None, None) => match ops.recv().await {
                Some(op) => Next::Op(op),
                None => break,
            },
            // While a build runs only applies may pass it; anything else
            // (another build, a chunk, an install) waits for it.
            (Some(_), Some(op @ SmOp::Apply { .. })) => Next::Op(op),
            (Some(build), Some(op)) => {
                held = Some(op);
                Next::Built(build.await)
            }
            (Some(build), None) => tokio::select! {
                built = build => Next::Built(built),
                op = ops.recv() => match op {
                    Some(op) => Next::Op(op),
                    None => break,
                },
            },
        };
        let op = match next {
            Next::Op(op) => op,
            Next::Built(built) => {
                building = None;
                let result = match built {
                    Ok(meta) => sm
                        .snapshot_built(&meta)
                        .await
                        .map(|()| Report::SnapshotBuilt(meta)),
                    Err(e) => Err(e),
                };
                if !send_report(&reports, result) {
                    break;
                }
                continue;
            }
        };
        let result = match op {
            SmOp::BuildSnapshot => {
                let begun = sm
                    .begin_snapshot()
                    .instrument(info_span!("begin_snapshot"))
                    .await;
                match begun {
                    Ok(build) => {
                        let span = info_span!("build_snapshot");
                        building = Some(Box::pin(build.instrument(span)));
                        continue;
                    }
                    Err(e) => Err(e),
                }
            }
            SmOp::Apply {
                mut entries,
                mut writes,
            } => {
                let mut counts = vec![entries.len()];
                while counts.len() < BATCH {
                    match ops.try_recv() {
                        Ok(SmOp::Apply {
                            entries: more,
                            writes: w,
                        }) => {
                            counts.push(more.len());
                            entries.extend(more);
                            writes.extend(w);
                        }
                        Ok(other) => {
                            held = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                apply_and_answer(&mut sm, entries, writes)
                    .await
                    .map(|()| Report::Applied(counts))
            }
            SmOp::ReadSnapshotChunk {
                to,
                term,
                meta,
                offset,
            } => sm
                .read_snapshot_chunk(meta.id, offset, chunk_bytes)
                .await
                .map(|chunk| {
                    let msg = chunk.map(|chunk| {
                        Message::InstallSnapshot(InstallSnapshotRequest::chunk(
                            term, id, meta, offset, chunk.data, chunk.done,
                        ))
                    });
                    Report::ChunkRead(to, msg)
                }),
            SmOp::WriteSnapshotChunk { meta, offset, data } => sm
                .write_snapshot_chunk(&meta, offset, data)
                .await
                .map(|()| Report::ChunkWritten),
            SmOp::InstallSnapshot { meta } => {
                let span = info_span!("install_snapshot", snapshot = %meta.last_log_id);
                sm.install_snapshot(&meta)
                    .instrument(span)
                    .await
                    .map(|()| Report::Installed(meta))
            }
        };
        if !send_report(&reports, result) {
            break;
        }
    }
    // A build in flight is finished, never dropped, when the worker stops:
    // a storage engine's build can go on holding the store (RocksDB's
    // writes its file on a blocking thread) after its future is dropped,
    // and whoever reopens the store once `Raft::shutdown` returns must
    // find it released.
    if let Some(build) = building
        && let Err(e) = build.await
    {
        warn!(node = %id, error = %e, "snapshot build in flight at shutdown failed");
    }
}

/// What the state-machine worker does next.
enum Next<C: TypeConfig> {
    Op(SmOpOf<C>),
    Built(Result<SnapshotMeta<C>, StorageError>),
}

/// Reports `result` to the driver; false when the worker must stop (the
/// operation failed, or the driver is gone).
fn send_report<C: TypeConfig>(
    reports: &mpsc::UnboundedSender<Report<C>>,
    result: Result<Report<C>, StorageError>,
) -> bool {
    let report = result.unwrap_or_else(Report::Failed);
    let failed = matches!(report, Report::Failed(_));
    reports.send(report).is_ok() && !failed
}

/// Applies `entries` and answers each write at its entry's position. A state
/// machine that gives the wrong number of responses has broken its
/// contract: nobody is answered and the node stops.
async fn apply_and_answer<C: TypeConfig, S: StateMachine<C>>(
    sm: &mut S,
    entries: Vec<Entry<C>>,
    writes: Vec<Option<WriteReply<C>>>,
) -> Result<(), StorageError> {
    let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
    let responses = sm.apply(entries).await?;
    if responses.len() != ids.len() {
        return Err(StorageError::Corrupt {
            location: "state machine".into(),
            detail: format!("{} responses for {} entries", responses.len(), ids.len()),
        });
    }
    for ((id, response), write) in ids.into_iter().zip(responses).zip(writes) {
        if let Some(write) = write {
            let _ = write.send(Ok((id, response)));
        }
    }
    Ok(())
}

async fn call_peer<C: TypeConfig, N: Network<C>>(
    client: &N,
    msg: Message<C>,
) -> Result<Option<Message<C>>, NetworkError> {
    Ok(Some(match msg {
        Message::AppendEntries(r) => {
            Message::AppendEntriesResponse(client.append_entries(r).await?)
        }
        Message::Vote(r) => Message::VoteResponse(client.vote(r).await?),
        Message::InstallSnapshot(r) => {
            Message::InstallSnapshotResponse(client.install_snapshot(r).await?)
        }
        Message::TimeoutNow(r) => {
            client.timeout_now(r).await?;
            return Ok(None);
        }
        // Responses are never sent as requests.
        _ => return Ok(None),
    }))
}
