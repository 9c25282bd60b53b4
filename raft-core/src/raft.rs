//! The tokio driver: one task owns one [`Engine`], carries out its actions
//! against the [`LogStore`], [`StateMachine`] and [`Network`], and serves
//! the [`Raft`] handle.
//!
//! The loop is deliberately sequential: take a batch of inputs, feed them to
//! the engine, carry out the resulting actions in order (awaiting storage),
//! repeat. While a storage action is awaited, new proposals queue in the
//! channel and go into the next log append together: that is the batching.
//! Network sends are handed to spawned RPC tasks and never block the loop.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::config::Config;
use crate::engine::{Action, Engine, ProposeError, ReadId, RecoveredState, Role};
use crate::error::{InitializeError, MembershipError, NotLeader, RecoveryError, StepError};
use crate::message::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    Message, TimeoutNowRequest, VoteRequest, VoteResponse,
};
use crate::network::{Network, NetworkError, NetworkFactory};
use crate::state_machine::StateMachine;
use crate::storage::{LogStore, StorageError};
use crate::types::{LogId, LogIndex, Membership, NodeId, Term, TypeConfig};

/// Errors from the [`Raft`] handle.
#[derive(Debug, Error, Clone)]
pub enum RaftError<N> {
    /// This node does not lead; retry on `leader_id` (at `leader_node`).
    #[error(transparent)]
    NotLeader(#[from] NotLeader<N>),
    #[error("a leadership transfer is in progress; retry shortly")]
    TransferInProgress,
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
    tx: mpsc::UnboundedSender<Input<C>>,
    metrics: watch::Receiver<RaftMetrics<C::Node>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
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
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            ^ id.0;
        let start = Instant::now();
        let engine = Engine::new(id, config, seed, 0, state)?;
        info!(node = %id, term = %engine.term(), last_log = %engine.last_log_id(), applied = %applied, "raft node recovered");
        let (tx, rx) = mpsc::unbounded_channel();
        let (metrics_tx, metrics_rx) = watch::channel(metrics_of(&engine, applied.index, None));
        let driver = Driver {
            engine,
            log_store,
            state_machine,
            network,
            peers: HashMap::new(),
            tx: tx.downgrade(),
            rx,
            start,
            applied: applied.index,
            writes: BTreeMap::new(),
            reads: HashMap::new(),
            waiting_reads: Vec::new(),
            next_read: 0,
            rpc_reply: None,
            initialize_reply: None,
            metrics: metrics_tx,
        };
        let task = tokio::spawn(driver.run().instrument(info_span!("raft", node = %id)));
        Ok(Raft {
            inner: Arc::new(Inner {
                id,
                learner_max_lag,
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
    pub async fn client_write(
        &self,
        command: C::Command,
    ) -> Result<(LogId, C::Response), RaftError<C::Node>> {
        self.call(|reply| Input::Write { command, reply }).await
    }

    /// ReadIndex (thesis §6.4): confirms with a quorum that this node still
    /// leads, then waits until the state machine has applied everything
    /// committed when the read began. Reading the state machine after this
    /// returns is linearizable. Concurrent calls share one quorum round.
    pub async fn ensure_linearizable(&self) -> Result<LogIndex, RaftError<C::Node>> {
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
        let change = MembershipChange::AddLearner(id, node);
        let (log_id, _) = self
            .call(|reply| Input::Membership { change, reply })
            .await?;
        let lag = self.inner.learner_max_lag;
        // Only a leader tracks the learner; elsewhere it is not known to
        // have anything.
        let behind = |m: &RaftMetrics<C::Node>| match m.replication.get(&id) {
            Some(matched) if m.role == Role::Leader => m.last_log_index.0.saturating_sub(matched.0),
            _ => m.last_log_index.0,
        };
        let mut metrics = self.metrics();
        let caught_up = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| {
                m.role == Role::Leader && m.replication.contains_key(&id) && behind(m) <= lag
            }),
        )
        .await;
        match caught_up {
            Ok(Ok(_)) => Ok(log_id),
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => Err(RaftError::LearnerBehind {
                id,
                behind: behind(&self.metrics().borrow()),
            }),
        }
    }

    /// Removes learner `id` from the cluster; resolves once that is applied.
    pub async fn remove_learner(&self, id: NodeId) -> Result<LogId, RaftError<C::Node>> {
        let change = MembershipChange::RemoveLearner(id);
        let (log_id, _) = self
            .call(|reply| Input::Membership { change, reply })
            .await?;
        Ok(log_id)
    }

    /// Makes `voters` the voting members by joint consensus (see
    /// [`Engine::change_membership`]): promotes learners, removes voters.
    /// Resolves once the final configuration is committed. If this node
    /// loses leadership meanwhile, the next leader finishes the change;
    /// wrap the call in a timeout if the caller cannot wait.
    pub async fn change_membership(
        &self,
        voters: BTreeSet<NodeId>,
    ) -> Result<(), RaftError<C::Node>> {
        let change = MembershipChange::Voters(voters.clone());
        let (joint, _) = self
            .call(|reply| Input::Membership { change, reply })
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
    /// with `Shutdown`.
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
    }
}

struct Driver<C: TypeConfig, L, S, F: NetworkFactory<C>> {
    engine: Engine<C>,
    log_store: L,
    state_machine: S,
    network: F,
    peers: HashMap<NodeId, (C::Node, Arc<F::Network>)>,
    /// For RPC tasks to hand responses back; weak so the loop ends when every
    /// handle is dropped.
    tx: mpsc::WeakUnboundedSender<Input<C>>,
    rx: mpsc::UnboundedReceiver<Input<C>>,
    start: Instant,
    applied: LogIndex,
    writes: BTreeMap<LogIndex, (LogId, WriteReply<C>)>,
    reads: HashMap<ReadId, Reply<LogIndex, C::Node>>,
    waiting_reads: Vec<(LogIndex, Reply<LogIndex, C::Node>)>,
    next_read: ReadId,
    /// The reply for the RPC being handled; its `Respond` action fills it.
    rpc_reply: Option<Reply<Message<C>, C::Node>>,
    initialize_reply: Option<Reply<(), C::Node>>,
    metrics: watch::Sender<RaftMetrics<C::Node>>,
}

/// Most inputs folded into one engine round (and so one log append).
const BATCH: usize = 1024;

impl<C, L, S, F> Driver<C, L, S, F>
where
    C: TypeConfig,
    L: LogStore<C>,
    S: StateMachine<C>,
    F: NetworkFactory<C>,
{
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    async fn run(mut self) {
        loop {
            let deadline = self.start + Duration::from_millis(self.engine.next_deadline());
            let first = tokio::select! {
                input = self.rx.recv() => match input {
                    Some(i) => Some(i),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => None,
            };
            let now = self.now_ms();
            self.engine.tick(now);
            let mut stop = false;
            let mut result = Ok(());
            if let Some(input) = first {
                // Each input runs its actions before the next, so an RPC's
                // response (and only it) fills `rpc_reply`; client writes
                // and reads are folded into one round.
                let mut next = Some(input);
                let mut n = 0;
                while let Some(input) = next.take() {
                    n += 1;
                    match input {
                        Input::Shutdown => {
                            stop = true;
                            break;
                        }
                        input @ (Input::Rpc { .. } | Input::Initialize { .. }) => {
                            result = self.flush().await;
                            if result.is_err() {
                                break;
                            }
                            self.handle(input);
                            result = self.flush().await;
                        }
                        input => self.handle(input),
                    }
                    if result.is_err() || n >= BATCH {
                        break;
                    }
                    next = self.rx.try_recv().ok();
                }
            }
            if !stop && result.is_ok() {
                result = self.flush().await;
            }
            if let Err(e) = result {
                self.fail_stop(e);
                return;
            }
            self.publish(None);
            if stop {
                break;
            }
        }
        info!(node = %self.engine.id(), "raft node shut down");
    }

    /// Answers `reply` when the proposed entry is applied (or at once if it
    /// was refused).
    fn await_entry(
        &mut self,
        proposed: Result<LogId, ProposeError<C::Node>>,
        reply: WriteReply<C>,
    ) {
        match proposed {
            Ok(log_id) => {
                self.writes.insert(log_id.index, (log_id, reply));
            }
            Err(e) => {
                let _ = reply.send(Err(match e {
                    ProposeError::NotLeader(nl) => RaftError::NotLeader(nl),
                    ProposeError::TransferInProgress => RaftError::TransferInProgress,
                    ProposeError::Membership(m) => RaftError::Membership(m),
                }));
            }
        }
    }

    fn handle(&mut self, input: Input<C>) {
        match input {
            Input::Write { command, reply } => {
                let proposed = self.engine.propose(command);
                self.await_entry(proposed, reply);
            }
            Input::Membership { change, reply } => {
                let proposed = match change {
                    MembershipChange::AddLearner(id, node) => self.engine.add_learner(id, node),
                    MembershipChange::RemoveLearner(id) => self.engine.remove_learner(id),
                    MembershipChange::Voters(voters) => self.engine.change_membership(voters),
                };
                self.await_entry(proposed, reply);
            }
            Input::Read { reply } => {
                let id = self.next_read;
                self.next_read += 1;
                match self.engine.read_index(id) {
                    Ok(()) => {
                        self.reads.insert(id, reply);
                    }
                    Err(nl) => {
                        let _ = reply.send(Err(RaftError::NotLeader(nl)));
                    }
                }
            }
            Input::Rpc { from, msg, reply } => {
                let kind = msg.kind();
                match self.engine.step(from, msg) {
                    Ok(()) => self.rpc_reply = Some(reply),
                    Err(e) => {
                        warn!(peer = %from, kind, error = %e, "refused message");
                        let _ = reply.send(Err(RaftError::Refused(e)));
                    }
                }
            }
            Input::Peer { from, msg } => {
                let kind = msg.kind();
                if let Err(e) = self.engine.step(from, msg) {
                    warn!(peer = %from, kind, error = %e, "refused response");
                }
            }
            Input::Initialize { members, reply } => {
                match self.engine.initialize(Membership::new_voters(members)) {
                    Ok(()) => self.initialize_reply = Some(reply),
                    Err(e) => {
                        let _ = reply.send(Err(RaftError::Initialize(e)));
                    }
                }
            }
            Input::Transfer { to, reply } => {
                let r = self
                    .engine
                    .transfer_leader(to)
                    .map_err(RaftError::NotLeader);
                let _ = reply.send(r);
            }
            Input::Shutdown => {}
        }
    }

    /// Carries out the engine's actions in order until it has none left.
    async fn flush(&mut self) -> Result<(), StorageError> {
        loop {
            let actions = self.engine.take_actions();
            if actions.is_empty() {
                break;
            }
            for action in actions {
                self.execute(action).await?;
            }
        }
        if let Some(reply) = self.initialize_reply.take() {
            let _ = reply.send(Ok(()));
        }
        Ok(())
    }

    async fn execute(&mut self, action: Action<C>) -> Result<(), StorageError> {
        match action {
            Action::SaveHardState(hs) => self.log_store.save_hard_state(hs).await?,
            Action::AppendLog { entries } => {
                let Some(last) = entries.last().map(|e| e.log_id) else {
                    return Ok(());
                };
                self.log_store.append(entries).await?;
                self.engine.log_persisted(last);
            }
            Action::TruncateLog { from } => self.log_store.truncate(from).await?,
            Action::PurgeLog { upto } => self.log_store.purge(upto).await?,
            Action::Send { to, msg } => self.send(to, msg),
            Action::Respond { msg, .. } => {
                if let Some(reply) = self.rpc_reply.take() {
                    let _ = reply.send(Ok(msg));
                }
            }
            Action::Apply { entries } => self.apply(entries).await?,
            Action::BuildSnapshot => {
                let span = info_span!("build_snapshot", applied = %self.applied);
                let meta = self.state_machine.build_snapshot().instrument(span).await?;
                self.engine.snapshot_built(meta);
            }
            Action::SendSnapshotChunk {
                to,
                term,
                meta,
                offset,
            } => {
                let max = self.engine.config().snapshot_chunk_bytes;
                if let Some(chunk) = self
                    .state_machine
                    .read_snapshot_chunk(meta.id, offset, max)
                    .await?
                {
                    let req = InstallSnapshotRequest {
                        term,
                        leader_id: self.engine.id(),
                        meta,
                        offset,
                        data: chunk.data,
                        done: chunk.done,
                    };
                    self.send(to, Message::InstallSnapshot(req));
                }
            }
            Action::WriteSnapshotChunk { meta, offset, data } => {
                self.state_machine
                    .write_snapshot_chunk(&meta, offset, data)
                    .await?
            }
            Action::InstallSnapshot { meta } => {
                let span = info_span!("install_snapshot", snapshot = %meta.last_log_id);
                self.state_machine
                    .install_snapshot(&meta)
                    .instrument(span)
                    .await?;
                self.applied = meta.last_log_id.index;
                // Proposals covered by the snapshot: we cannot tell whether
                // they made it.
                let rest = self.writes.split_off(&self.applied.next());
                for (_, (_, reply)) in std::mem::replace(&mut self.writes, rest) {
                    let _ = reply.send(Err(RaftError::OutcomeUnknown));
                }
                self.serve_reads();
            }
            Action::ReadReady { ids, index } => {
                for id in ids {
                    if let Some(reply) = self.reads.remove(&id) {
                        self.waiting_reads.push((index, reply));
                    }
                }
                self.serve_reads();
            }
            Action::ReadFailed { ids, leader_id } => {
                let nl = NotLeader {
                    leader_id,
                    leader_node: leader_id
                        .and_then(|l| self.engine.membership().nodes.get(&l).cloned()),
                };
                for id in ids {
                    if let Some(reply) = self.reads.remove(&id) {
                        let _ = reply.send(Err(RaftError::NotLeader(nl.clone())));
                    }
                }
            }
        }
        Ok(())
    }

    async fn apply(&mut self, entries: Vec<crate::types::Entry<C>>) -> Result<(), StorageError> {
        let ids: Vec<LogId> = entries.iter().map(|e| e.log_id).collect();
        let responses = self.state_machine.apply(entries).await?;
        if responses.len() != ids.len() {
            return Err(StorageError::Corrupt {
                location: "state machine".into(),
                detail: format!("{} responses for {} entries", responses.len(), ids.len()),
            });
        }
        for (id, resp) in ids.into_iter().zip(responses) {
            self.applied = id.index;
            if let Some((proposed, reply)) = self.writes.remove(&id.index) {
                let r = if proposed == id {
                    Ok((id, resp))
                } else {
                    Err(RaftError::ProposalDropped)
                };
                let _ = reply.send(r);
            }
        }
        self.serve_reads();
        Ok(())
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let waiting = std::mem::take(&mut self.waiting_reads);
        for (index, reply) in waiting {
            if index <= applied {
                let _ = reply.send(Ok(index));
            } else {
                self.waiting_reads.push((index, reply));
            }
        }
    }

    /// Hands a message to a spawned RPC task; the response comes back
    /// through the input channel.
    fn send(&mut self, to: NodeId, msg: Message<C>) {
        let Some(node) = self.engine.membership().nodes.get(&to).cloned() else {
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
        let Some(tx) = self.tx.upgrade() else { return };
        let timeout = Duration::from_millis(match msg {
            Message::InstallSnapshot(_) => self.engine.config().election_timeout_max_ms * 20,
            _ => self.engine.config().election_timeout_min_ms,
        });
        tokio::spawn(async move {
            let kind = msg.kind();
            let result = tokio::time::timeout(timeout, call_peer(&*client, msg)).await;
            match result {
                Ok(Ok(Some(resp))) => {
                    let _ = tx.send(Input::Peer {
                        from: to,
                        msg: resp,
                    });
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => debug!(peer = %to, kind, error = %e, "rpc failed"),
                Err(_) => debug!(peer = %to, kind, "rpc timed out"),
            }
        });
    }

    fn fail_stop(&mut self, e: StorageError) {
        let msg = e.to_string();
        error!(node = %self.engine.id(), error = %msg, "storage error; stopping this node");
        for (_, (_, reply)) in std::mem::take(&mut self.writes) {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        for (_, reply) in self.reads.drain() {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        for (_, reply) in self.waiting_reads.drain(..) {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        if let Some(reply) = self.rpc_reply.take() {
            let _ = reply.send(Err(RaftError::Fatal(msg.clone())));
        }
        self.publish(Some(msg));
    }

    fn publish(&mut self, fatal: Option<String>) {
        let m = metrics_of(&self.engine, self.applied, fatal);
        self.metrics.send_if_modified(|old| {
            if *old != m {
                if old.role != m.role || old.leader_id != m.leader_id {
                    info!(node = %m.id, term = %m.term, role = ?m.role, leader = ?m.leader_id, "role changed");
                }
                *old = m;
                true
            } else {
                false
            }
        });
    }
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
