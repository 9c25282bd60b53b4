//! The sans-IO Raft engine.
//!
//! [`Engine`] is a deterministic state machine. It reads no clock (time comes
//! in through [`Engine::tick`]), draws randomness only from the seed it was
//! given, and performs no IO: every input is a method call and every effect
//! is an [`Action`] the caller takes out with [`Engine::take_actions`].
//!
//! # The contract with whoever runs it
//! Actions must be carried out **in the order given**, each storage action
//! completing before the next action starts. That single rule is what makes
//! the engine safe: a vote or an append is durable before the response that
//! depends on it is sent, because the response comes later in the list.
//! The one exception the engine relies on being allowed is that `Send`
//! actions may be handed to a transport without waiting for them to arrive.
//! After an `AppendLog` completes, report it with [`Engine::log_persisted`];
//! after `BuildSnapshot`, with [`Engine::snapshot_built`].
//!
//! Roles follow etcd-io/raft's shape: one handler per message kind with the
//! role-specific part in a `match`, and `become_*` functions that reset
//! exactly the state each role owns. Comments cite the extended Raft paper
//! (§) and Ongaro's thesis where a rule comes from.

mod identity;
pub mod log;
pub mod progress;
pub mod quorum;
pub mod rng;

use std::collections::{BTreeMap, BTreeSet};

use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::error::{InitializeError, MembershipError, NotLeader, RecoveryError, StepError};
use crate::message::{
    AppendEntriesRequest, AppendEntriesResponse, ConflictHint, InstallSnapshotRequest,
    InstallSnapshotResponse, Message, SnapshotMeta, TimeoutNowRequest, VoteRequest, VoteResponse,
};
use crate::mutation::{Mutation, active as mutant};
use crate::types::{
    Entry, EntryPayload, HardState, LogId, LogIndex, Membership, NodeId, NodeUuid, Term, TypeConfig,
};

use self::log::RaftLog;
use self::progress::{Progress, ProgressState};
use self::rng::Rng;

/// Identifies one ReadIndex request; chosen by the caller.
pub type ReadId = u64;

/// An effect the engine asks its driver to carry out, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action<C: TypeConfig> {
    /// Make the term and vote durable.
    SaveHardState(HardState),
    /// Make these entries durable at the end of the log. Report completion
    /// with [`Engine::log_persisted`].
    AppendLog { entries: Vec<Entry<C>> },
    /// Durably delete every entry at `from` and after.
    TruncateLog { from: LogIndex },
    /// Durably delete every entry up to and including `upto`; if the log ends
    /// before it, the log becomes empty and continues after `upto`.
    PurgeLog { upto: LogId },
    /// Read the entries `from ..= to` back from the `LogStore` (after every
    /// earlier log action, so all of them are durable by then: the first
    /// were evicted from the engine's cache, see
    /// [`Config::log_cache_bytes`], and the range may run on past the
    /// cache's edge) and hand them to [`Engine::entries_read`] for `peer`.
    /// Nothing needs to be durable.
    ReadEntries {
        peer: NodeId,
        from: LogIndex,
        to: LogIndex,
    },
    /// Deliver a request (or one-way message) to a peer. May be handed to
    /// the transport without waiting.
    Send { to: NodeId, msg: Message<C> },
    /// Answer the request just stepped from `to`. Each request passed to
    /// [`Engine::step`] yields exactly one `Respond`, unless `step` errs.
    Respond { to: NodeId, msg: Message<C> },
    /// Apply these committed entries to the state machine, in order.
    Apply { entries: Vec<Entry<C>> },
    /// Build a snapshot of the state machine as applied so far; report it
    /// with [`Engine::snapshot_built`].
    BuildSnapshot,
    /// Read `max_len` bytes at `offset` of the snapshot `meta.id` and send
    /// them to `to` as an InstallSnapshot request in `term`.
    SendSnapshotChunk {
        to: NodeId,
        term: Term,
        meta: SnapshotMeta<C>,
        offset: u64,
    },
    /// Store a received chunk of an incoming snapshot (offset 0 starts over).
    WriteSnapshotChunk {
        meta: SnapshotMeta<C>,
        offset: u64,
        data: Vec<u8>,
    },
    /// Atomically replace the state machine with the received snapshot.
    InstallSnapshot { meta: SnapshotMeta<C> },
    /// These reads are confirmed; serve them once `index` is applied.
    ReadReady { ids: Vec<ReadId>, index: LogIndex },
    /// These reads cannot be confirmed: this node is no longer leader.
    ReadFailed {
        ids: Vec<ReadId>,
        leader_id: Option<NodeId>,
    },
}

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Follower,
    /// Probing with pre-votes whether an election could succeed.
    PreCandidate,
    Candidate,
    Leader,
    /// Receives the log but does not vote.
    Learner,
}

/// What a node recovered from its storage, handed to [`Engine::new`].
#[derive(Clone, Debug)]
pub struct RecoveredState<C: TypeConfig> {
    pub hard_state: HardState,
    /// The last purged entry of the `LogStore` (`LogId::ZERO` if none).
    pub log_base: LogId,
    /// Every entry after `log_base`, in order.
    pub entries: Vec<Entry<C>>,
    /// The newest durable snapshot, if any.
    pub snapshot: Option<SnapshotMeta<C>>,
    /// The state machine's last applied entry.
    pub applied: LogId,
}

impl<C: TypeConfig> Default for RecoveredState<C> {
    fn default() -> Self {
        RecoveredState {
            hard_state: HardState::default(),
            log_base: LogId::ZERO,
            entries: Vec::new(),
            snapshot: None,
            applied: LogId::ZERO,
        }
    }
}

#[derive(Debug, Default)]
struct VoteTally {
    granted: BTreeSet<NodeId>,
    rejected: BTreeSet<NodeId>,
}

#[derive(Debug)]
struct PendingRead {
    id: ReadId,
    /// The heartbeat round a quorum must answer to confirm leadership.
    round: u64,
    /// The commit index to wait for; `None` until this term's no-op commits.
    index: Option<LogIndex>,
}

#[derive(Debug)]
struct LeaderState {
    progress: BTreeMap<NodeId, Progress>,
    /// Heartbeat round counter, echoed by followers (for ReadIndex).
    round: u64,
    pending_reads: Vec<PendingRead>,
    heartbeat_due: u64,
    check_quorum_due: u64,
    /// The index of this term's no-op; reads wait until it commits (§8).
    noop_index: LogIndex,
    /// A leadership transfer under way: the target and when to give up.
    transfer: Option<(NodeId, u64)>,
}

#[derive(Debug)]
enum RoleState {
    Follower,
    PreCandidate(VoteTally),
    Candidate(VoteTally),
    Leader(Box<LeaderState>),
}

/// Why a leader refused a proposal.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ProposeError<N> {
    #[error(transparent)]
    NotLeader(#[from] NotLeader<N>),
    #[error("a leadership transfer is in progress")]
    TransferInProgress,
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// One Raft node's consensus state. See the module docs for the contract.
pub struct Engine<C: TypeConfig> {
    id: NodeId,
    config: Config,
    rng: Rng,
    /// Draws the snapshot stretch; apart from `rng`, so elections draw the
    /// same timeouts whatever the snapshot policy does.
    snapshot_rng: Rng,
    /// This node's snapshot thresholds, in percent of the configured ones
    /// (`Config::snapshot_jitter_percent`).
    snapshot_stretch: u64,
    now: u64,

    /// This node's identity (kept with the hard state; see [`NodeUuid`]).
    uuid: NodeUuid,
    /// The configuration records another identity for this node: its
    /// storage was wiped or replaced. It neither votes nor campaigns until
    /// it is removed and added back. Logged once per change.
    unrecognized_logged: bool,

    // Persistent state (Figure 2).
    term: Term,
    voted_for: Option<NodeId>,
    log: RaftLog<C>,

    /// Highest index known durable in the local `LogStore`.
    durable: LogIndex,
    commit: LogIndex,
    /// Highest index handed to the state machine in an `Apply` action.
    applied: LogIndex,

    role: RoleState,
    leader_id: Option<NodeId>,
    election_due: u64,
    /// When we last heard from `leader_id` (for the lease check of thesis §4.2.3).
    leader_contact: u64,
    /// Follower: where the leader's log began when it last said
    /// (`AppendEntriesRequest::keep_from`); this node purges no further.
    /// 0 until a leader has said.
    leader_keeps_from: LogIndex,

    /// The configuration in force at `base_membership.0` (from a snapshot or
    /// a purged entry) and every membership entry in the log after it.
    base_membership: (LogId, Membership<C::Node>),
    log_memberships: Vec<(LogId, Membership<C::Node>)>,

    snapshot: Option<SnapshotMeta<C>>,
    /// The snapshot the last build replaced: a transfer that started on it
    /// goes on (the `StateMachine` keeps it readable until the next build
    /// or install) instead of starting over on the new one.
    previous_snapshot: Option<SnapshotMeta<C>>,
    building_snapshot: bool,
    /// Bytes of log (by `Entry::size_hint`) applied since this engine
    /// started, and that count where the current snapshot ends and where
    /// the build in progress will: the snapshot policy weighs the
    /// difference against the snapshot's size.
    applied_log_bytes: u64,
    log_bytes_at_snapshot: u64,
    log_bytes_at_build: u64,
    /// An incoming snapshot: who sends it (leader and term), its id and the
    /// next byte offset expected.
    receiving: Option<Receiving>,

    /// Leader: first index appended locally but not yet in an `AppendLog`.
    unflushed: Option<LogIndex>,
    /// Leader: a heartbeat round must go out at the next flush (for reads).
    read_round_wanted: bool,
    /// Elections (not pre-vote rounds) this engine started.
    elections: u64,
    /// Snapshot transfers this engine started as leader, and snapshots it
    /// installed as follower.
    snapshots_sent: u64,
    /// Bytes of the snapshots this node delivered as leader, and how long
    /// those transfers took (engine milliseconds, first chunk to install).
    snapshot_bytes_delivered: u64,
    snapshot_delivery_ms: u64,
    snapshots_installed: u64,

    actions: Vec<Action<C>>,
}

impl<C: TypeConfig> Engine<C> {
    /// Builds a node from what it recovered. `seed` drives every random
    /// choice (election timeouts); `now` is the current time in milliseconds
    /// on any monotonic clock. Repair actions (if storage must be reconciled
    /// with a newer snapshot) come out of the first [`Engine::take_actions`].
    pub fn new(
        id: NodeId,
        config: Config,
        seed: u64,
        now: u64,
        state: RecoveredState<C>,
    ) -> Result<Self, RecoveryError> {
        let RecoveredState {
            hard_state,
            log_base,
            entries,
            snapshot,
            applied,
        } = state;
        validate_entries(log_base, &entries, hard_state.term)?;
        let mut actions = Vec::new();
        let mut log = RaftLog::new(log_base, entries);

        let snap_id = snapshot
            .as_ref()
            .map(|s| s.last_log_id)
            .unwrap_or(LogId::ZERO);
        let base_membership = (
            snap_id,
            snapshot
                .as_ref()
                .map(|s| s.membership.clone())
                .unwrap_or_default(),
        );
        if snap_id.index > log.base().index {
            // The snapshot is newer than the log's purge point. If the log
            // agrees with it, keep it, purged as `snapshot_built` would
            // (`purge_keep` entries behind the snapshot stay, so a follower
            // a little behind is still repaired by entries after a
            // restart); otherwise the log was superseded (a crash between
            // installing a snapshot and cleaning the log).
            if log.matches(snap_id) {
                let keep_from = LogIndex(snap_id.index.0.saturating_sub(config.purge_keep));
                if keep_from > log.base().index
                    && let Some(upto) = log.log_id_at(keep_from)
                {
                    log.purge(upto);
                    actions.push(Action::PurgeLog { upto });
                }
            } else {
                if !log.is_empty() {
                    actions.push(Action::TruncateLog {
                        from: log.first_index(),
                    });
                }
                log = RaftLog::new(snap_id, Vec::new());
                actions.push(Action::PurgeLog { upto: snap_id });
            }
        }
        if applied.index < snap_id.index {
            return Err(RecoveryError::AppliedBeforeSnapshot {
                applied: applied.index,
                snapshot: snap_id.index,
            });
        }
        if applied.index < log.base().index {
            // The log was purged past what the state machine holds and no
            // snapshot covers the gap: those entries are gone.
            return Err(RecoveryError::AppliedBeforeLogStart {
                applied: applied.index,
                first: log.first_index(),
            });
        }
        if applied.index > log.last_index() {
            return Err(RecoveryError::AppliedPastLog {
                applied: applied.index,
                last: log.last_index(),
            });
        }
        if applied.index > snap_id.index && !log.matches(applied) {
            return Err(RecoveryError::AppliedMismatch {
                applied: applied.index,
            });
        }
        // What the log since the snapshot weighs, for the snapshot policy.
        let applied_log_bytes = log
            .range(snap_id.index.next(), applied.index)
            .map(|e| e.size_hint() as u64)
            .sum();
        let mut log_memberships = Vec::new();
        for e in log.range(LogIndex(0), log.last_index()) {
            if let EntryPayload::Membership(m) = &e.payload
                && e.log_id.index > base_membership.0.index
            {
                log_memberships.push((e.log_id, m.clone()));
            }
        }

        // A store that never held an identity (new, or written before
        // identities existed) gets one now, saved before anything else this
        // node does: every later write queues behind it.
        let mut uuid = hard_state.uuid;
        if uuid.is_none() {
            let mut r = Rng::new(seed ^ id.0.wrapping_mul(0x94D0_49BB_1331_11EB) ^ 0x1D);
            while uuid.is_none() {
                uuid = NodeUuid(u128::from(r.next_u64()) << 64 | u128::from(r.next_u64()));
            }
            actions.insert(0, Action::SaveHardState(HardState { uuid, ..hard_state }));
        }

        let mut engine = Engine {
            id,
            uuid,
            unrecognized_logged: false,
            rng: Rng::new(seed ^ id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            snapshot_rng: Rng::new(seed ^ id.0.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) ^ 0x5EED),
            snapshot_stretch: 100,
            now,
            term: hard_state.term,
            voted_for: hard_state.voted_for,
            durable: log.last_index(),
            commit: applied.index,
            applied: applied.index,
            log,
            role: RoleState::Follower,
            leader_id: None,
            election_due: 0,
            leader_contact: 0,
            leader_keeps_from: LogIndex(0),
            base_membership,
            log_memberships,
            snapshot,
            previous_snapshot: None,
            building_snapshot: false,
            applied_log_bytes,
            log_bytes_at_snapshot: 0,
            log_bytes_at_build: 0,
            receiving: None,
            unflushed: None,
            read_round_wanted: false,
            elections: 0,
            snapshots_sent: 0,
            snapshot_bytes_delivered: 0,
            snapshot_delivery_ms: 0,
            snapshots_installed: 0,
            actions,
            config,
        };
        engine.reset_election_timer();
        engine.stretch_snapshot_thresholds();
        engine.evict_cached();
        Ok(engine)
    }

    /// Bootstraps a pristine node with its first configuration, as entry 1 of
    /// term 0. Every node of a new cluster may be initialized with the same
    /// membership (the entries are identical), or only one of them.
    pub fn initialize(&mut self, membership: Membership<C::Node>) -> Result<(), InitializeError> {
        if self.term != Term(0) || self.log.last_index() != LogIndex(0) || self.snapshot.is_some() {
            return Err(InitializeError::NotPristine {
                term: self.term,
                last_index: self.log.last_index(),
            });
        }
        if membership.voter_ids().is_empty() {
            return Err(InitializeError::NoVoters);
        }
        let entry = Entry {
            log_id: LogId::new(0, 1),
            payload: EntryPayload::Membership(membership),
        };
        self.append_follower_entries(vec![entry]);
        let m = self.membership();
        if m.is_voter(self.id) && m.voter_ids().len() == 1 {
            self.election_due = self.now;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- queries

    pub fn id(&self) -> NodeId {
        self.id
    }
    /// Whether a committed configuration no longer holds this node (as
    /// voter or learner): no leader replicates to it any more, so it will
    /// not learn what happens to the entries after its commit index.
    pub fn removed(&self) -> bool {
        self.membership_log_id().index <= self.commit
            && !self.membership().nodes.contains_key(&self.id)
            && self.membership_log_id() != LogId::ZERO
    }
    pub fn term(&self) -> Term {
        self.term
    }
    /// Elections (not pre-vote rounds) this engine started since it was
    /// built.
    pub fn elections(&self) -> u64 {
        self.elections
    }
    /// Snapshot transfers this engine started as leader (from offset 0,
    /// restarts included) since it was built.
    pub fn snapshots_sent(&self) -> u64 {
        self.snapshots_sent
    }

    /// Bytes of the snapshots this node delivered (a follower installed
    /// them) as leader since it started, and the milliseconds those
    /// transfers took from their first chunk to the follower's install: the
    /// rate a snapshot moves at.
    pub fn snapshot_deliveries(&self) -> (u64, u64) {
        (self.snapshot_bytes_delivered, self.snapshot_delivery_ms)
    }
    /// Snapshots this engine received whole and installed since it was
    /// built.
    pub fn snapshots_installed(&self) -> u64 {
        self.snapshots_installed
    }
    pub fn voted_for(&self) -> Option<NodeId> {
        self.voted_for
    }
    pub fn role(&self) -> Role {
        match &self.role {
            RoleState::Leader(_) => Role::Leader,
            RoleState::Candidate(_) => Role::Candidate,
            RoleState::PreCandidate(_) => Role::PreCandidate,
            RoleState::Follower if !self.membership().is_voter(self.id) => Role::Learner,
            RoleState::Follower => Role::Follower,
        }
    }
    pub fn is_leader(&self) -> bool {
        matches!(self.role, RoleState::Leader(_))
    }
    pub fn leader_id(&self) -> Option<NodeId> {
        self.leader_id
    }
    pub fn commit_index(&self) -> LogIndex {
        self.commit
    }
    /// Highest index of this log known durable ([`Engine::log_persisted`],
    /// lowered by a truncation).
    pub fn durable_index(&self) -> LogIndex {
        self.durable
    }
    /// Highest index handed to the state machine.
    pub fn applied_index(&self) -> LogIndex {
        self.applied
    }
    pub fn last_log_id(&self) -> LogId {
        self.log.last_log_id()
    }
    pub fn log(&self) -> &RaftLog<C> {
        &self.log
    }
    pub fn snapshot_meta(&self) -> Option<&SnapshotMeta<C>> {
        self.snapshot.as_ref()
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    /// The configuration in force: the latest membership entry in the log,
    /// committed or not (§6), else the snapshot's.
    pub fn membership(&self) -> &Membership<C::Node> {
        self.log_memberships
            .last()
            .map(|(_, m)| m)
            .unwrap_or(&self.base_membership.1)
    }
    /// The log id of the entry that set [`Engine::membership`].
    pub fn membership_log_id(&self) -> LogId {
        self.log_memberships
            .last()
            .map(|(id, _)| *id)
            .unwrap_or(self.base_membership.0)
    }
    /// Leader only: each peer's match index.
    pub fn matched(&self) -> BTreeMap<NodeId, LogIndex> {
        self.each_matched().collect()
    }

    /// [`Engine::matched`] without allocating, in node id order.
    pub(crate) fn each_matched(&self) -> impl Iterator<Item = (NodeId, LogIndex)> + '_ {
        let progress = match &self.role {
            RoleState::Leader(l) => Some(l.progress.iter()),
            _ => None,
        };
        progress
            .into_iter()
            .flatten()
            .map(|(id, p)| (*id, p.matched))
    }
    /// The next time [`Engine::tick`] has work to do.
    pub fn next_deadline(&self) -> u64 {
        match &self.role {
            RoleState::Leader(l) => {
                let mut due = l.heartbeat_due.min(l.check_quorum_due);
                if let Some((_, until)) = l.transfer {
                    due = due.min(until);
                }
                due
            }
            _ => self.election_due,
        }
    }
    pub fn not_leader(&self) -> NotLeader<C::Node> {
        NotLeader {
            leader_id: self.leader_id,
            leader_node: self
                .leader_id
                .and_then(|l| self.membership().nodes.get(&l).cloned()),
        }
    }

    // ----------------------------------------------------------------- inputs

    /// Advances time to `now` (milliseconds) without firing timers. A
    /// driver that wakes after a pause calls this, steps what arrived
    /// meanwhile, and only then [`Engine::tick`]s, so replies that were
    /// waiting count before a timer judges their absence.
    pub fn advance_clock(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// The engine's time: the latest `advance_clock` or `tick`.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Advances time to `now` (milliseconds) and fires due timers: elections
    /// on followers and candidates; heartbeats, check-quorum and
    /// retransmission on leaders.
    pub fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        if self.is_leader() {
            self.tick_leader();
        } else if self.now >= self.election_due {
            let kind = if self.config.pre_vote {
                CampaignKind::PreVote
            } else {
                CampaignKind::Election
            };
            self.campaign(kind);
        }
    }

    fn tick_leader(&mut self) {
        let now = self.now;
        let stale_after = self.config.election_timeout_min_ms;
        let (id, term, check_quorum) = (self.id, self.term, self.config.check_quorum);
        let configs = self.membership().configs.clone();
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        if l.transfer.is_some_and(|(_, until)| now >= until) {
            info!(node = %id, term = %term, "leadership transfer timed out; resuming");
            l.transfer = None;
        }
        // Check-quorum (thesis §6.2): step down if a quorum has been silent
        // for an election timeout.
        if now >= l.check_quorum_due {
            let progress = &l.progress;
            let active = quorum::has_quorum(&configs, |p| {
                p == id
                    || progress
                        .get(&p)
                        .is_some_and(|p| p.recent_active && p.recognized)
            });
            for p in l.progress.values_mut() {
                p.recent_active = false;
            }
            l.check_quorum_due = now + stale_after;
            if check_quorum && !active {
                warn!(node = %id, term = %term, "lost contact with a quorum; stepping down");
                self.become_follower(term, None);
                return;
            }
        }
        // Retransmission: an unanswered snapshot chunk, or a replication
        // window stuck behind a lost message: its oldest message is
        // unanswered for an election timeout and nothing was acknowledged
        // in that time. A follower that acknowledges, however slowly, is
        // busy, not stuck: resending its whole window from `matched` would
        // only queue duplicates of what it has yet to read (seen in
        // `cargo xtask bench join`: a follower fed its 8 MiB window again
        // every 150 ms fell 20,000 entries behind, and the transport timed
        // out and cut a thousand of those streams).
        for (peer, p) in l.progress.iter_mut() {
            match &mut p.state {
                ProgressState::Replicate => {
                    if p.inflight
                        .front()
                        .is_some_and(|f| f.sent_at + stale_after <= now)
                        && p.advanced_at + stale_after <= now
                    {
                        debug!(node = %id, peer = %peer, "replication window stalled; probing");
                        p.become_probe();
                    }
                }
                ProgressState::Snapshot {
                    acked,
                    sent,
                    active_at,
                    ..
                } => {
                    // Nothing sent or acknowledged for an election timeout:
                    // send again what was not acknowledged.
                    if *sent > *acked && *active_at + stale_after <= now {
                        debug!(node = %id, peer = %peer, offset = *acked, "snapshot window stalled; resending");
                        *sent = *acked;
                    }
                }
                ProgressState::Probe { .. } => {}
            }
        }
        if now >= l.heartbeat_due {
            self.broadcast_heartbeat();
        }
        self.replicate_all();
    }

    /// Handles one message from `from`. Requests get exactly one `Respond`
    /// action. An `Err` means the message was refused as malformed or
    /// hostile; nothing it said was applied and no response is owed.
    pub fn step(&mut self, from: NodeId, msg: Message<C>) -> Result<(), StepError> {
        if from == self.id {
            return Err(StepError::FromSelf { from });
        }
        match msg {
            Message::Vote(req) => self.on_vote_request(from, req),
            Message::VoteResponse(resp) => {
                self.on_vote_response(from, resp);
                Ok(())
            }
            msg => {
                let term = msg.term();
                if term > self.term {
                    // §5.1: a higher term makes us a follower of it. A
                    // leader's message also tells us who leads.
                    let leader = matches!(
                        msg,
                        Message::AppendEntries(_)
                            | Message::InstallSnapshot(_)
                            | Message::TimeoutNow(_)
                    )
                    .then_some(from);
                    self.become_follower(term, leader);
                } else if term < self.term
                    && !(mutant(Mutation::StaleTermAppendAccepted)
                        && matches!(msg, Message::AppendEntries(_)))
                {
                    // Stale: answer requests so the sender learns our term.
                    self.reject_stale(from, &msg);
                    return Ok(());
                }
                match msg {
                    Message::AppendEntries(req) => self.on_append_entries(from, req),
                    Message::AppendEntriesResponse(resp) => self.on_append_response(from, resp),
                    Message::InstallSnapshot(req) => self.on_install_snapshot(from, req),
                    Message::InstallSnapshotResponse(resp) => {
                        self.on_snapshot_response(from, resp);
                        Ok(())
                    }
                    Message::TimeoutNow(req) => {
                        self.on_timeout_now(from, req);
                        Ok(())
                    }
                    Message::Vote(_) | Message::VoteResponse(_) => unreachable!("handled above"),
                }
            }
        }
    }

    /// Proposes a command. On the leader it is appended to the log and will
    /// be replicated at the next [`Engine::take_actions`]; the returned log id
    /// identifies it when it is applied.
    pub fn propose(&mut self, command: C::Command) -> Result<LogId, ProposeError<C::Node>> {
        self.propose_payload(EntryPayload::command(command))
    }

    fn propose_payload(
        &mut self,
        payload: EntryPayload<C>,
    ) -> Result<LogId, ProposeError<C::Node>> {
        match &self.role {
            RoleState::Leader(l) if l.transfer.is_some() => Err(ProposeError::TransferInProgress),
            RoleState::Leader(_) => Ok(self.leader_append(payload)),
            _ => Err(ProposeError::NotLeader(self.not_leader())),
        }
    }

    /// Proposes adding `id`, reached at `node`, as a learner: it receives
    /// the log and snapshots but neither votes nor counts toward commit.
    /// Promote it with [`Engine::change_membership`] once it has caught up.
    pub fn add_learner(
        &mut self,
        id: NodeId,
        node: C::Node,
    ) -> Result<LogId, ProposeError<C::Node>> {
        let mut next = self.membership_change_base()?;
        if next.nodes.contains_key(&id) || next.is_voter(id) {
            return Err(MembershipError::AlreadyMember(id).into());
        }
        next.nodes.insert(id, node);
        self.propose_payload(EntryPayload::Membership(next))
    }

    /// Proposes removing learner `id`.
    pub fn remove_learner(&mut self, id: NodeId) -> Result<LogId, ProposeError<C::Node>> {
        let mut next = self.membership_change_base()?;
        if next.is_voter(id) {
            return Err(MembershipError::IsVoter(id).into());
        }
        if next.nodes.remove(&id).is_none() {
            return Err(MembershipError::UnknownNode(id).into());
        }
        // Added back later, it is a new member: whatever identity it then
        // has is recorded afresh.
        next.uuids.remove(&id);
        self.propose_payload(EntryPayload::Membership(next))
    }

    /// Proposes `voters` as the new voting configuration by joint consensus
    /// (§6 of the Raft paper): first C_old,new, in which elections and
    /// commitment need majorities of both; once that commits, the leader
    /// appends C_new by itself. Each takes effect when appended. Voters not
    /// in `voters` leave the cluster; learners stay learners. Every new
    /// voter must already be a member (add it as a learner first). The
    /// returned id is the joint entry's.
    pub fn change_membership(
        &mut self,
        voters: BTreeSet<NodeId>,
    ) -> Result<LogId, ProposeError<C::Node>> {
        let current = self.membership_change_base()?;
        if voters.is_empty() {
            return Err(MembershipError::NoVoters.into());
        }
        if let Some(unknown) = voters.iter().find(|v| !current.nodes.contains_key(v)) {
            return Err(MembershipError::UnknownNode(*unknown).into());
        }
        let old = current.configs.first().cloned().unwrap_or_default();
        if voters.is_disjoint(&old) {
            return Err(MembershipError::NoCurrentVoter.into());
        }
        let joint = Membership {
            configs: vec![voters, old],
            ..current
        };
        self.propose_payload(EntryPayload::Membership(joint))
    }

    /// The configuration a change starts from, if a change may start: this
    /// node leads and the last configuration is final (not joint, and
    /// committed).
    fn membership_change_base(&self) -> Result<Membership<C::Node>, ProposeError<C::Node>> {
        if !self.is_leader() {
            return Err(self.not_leader().into());
        }
        let index = self.membership_log_id().index;
        if self.membership().is_joint() {
            return Err(MembershipError::InProgress { index }.into());
        }
        // One change at a time: nothing appended since the last committed
        // configuration may change voters or members. An entry that only
        // records identities ([`Self::record_identities`]) changes no
        // quorum, so a change may follow it before it commits.
        let commit = self.commit;
        let committed = self
            .log_memberships
            .iter()
            .rev()
            .find(|(id, _)| id.index <= commit)
            .unwrap_or(&self.base_membership);
        if let Some((pending, _)) = self.log_memberships.iter().find(|(id, m)| {
            id.index > commit && (m.configs != committed.1.configs || m.nodes != committed.1.nodes)
        }) {
            return Err(MembershipError::InProgress {
                index: pending.index,
            }
            .into());
        }
        Ok(self.membership().clone())
    }

    /// Starts a linearizable read (ReadIndex, thesis §6.4). When a quorum
    /// confirms this node is still leader, a `ReadReady` action names the
    /// index the state machine must reach before the read is served. Reads
    /// started before the next flush share one heartbeat round.
    pub fn read_index(&mut self, id: ReadId) -> Result<(), NotLeader<C::Node>> {
        let commit = self.commit;
        let RoleState::Leader(l) = &mut self.role else {
            return Err(self.not_leader());
        };
        let index =
            (commit >= l.noop_index || mutant(Mutation::ReadBeforeNoopCommits)).then_some(commit);
        l.pending_reads.push(PendingRead {
            id,
            round: l.round + 1,
            index,
        });
        self.read_round_wanted = true;
        Ok(())
    }

    /// Reports that an `AppendLog` ending at `last` is durable.
    pub fn log_persisted(&mut self, last: LogId) {
        if last.index > self.durable && self.log.matches(last) {
            self.durable = last.index;
            if self.is_leader() {
                self.maybe_commit();
            }
            self.evict_cached();
        }
    }

    /// Reports the entries a [`Action::ReadEntries`] for `peer` starting at
    /// `from` read back from the `LogStore`: they go out to `peer` as far as
    /// flow control allows, if it still needs them. Entries that are not
    /// this log's (purged or replaced since) are dropped.
    pub fn entries_read(&mut self, peer: NodeId, from: LogIndex, entries: Vec<Entry<C>>) {
        let (term, id, commit, now) = (self.term, self.id, self.commit, self.now);
        let keep_from = self.log.first_index();
        let (max_n, max_bytes, max_inflight) = (
            self.config.max_entries_per_message,
            self.config.max_bytes_per_message,
            self.config.max_inflight,
        );
        let log = &self.log;
        // Only a prefix that continues `from` and agrees with this log.
        let valid = entries
            .iter()
            .enumerate()
            .take_while(|(i, e)| e.log_id.index == from.plus(*i as u64) && log.matches(e.log_id))
            .count();
        let prev_log_id = log.log_id_at(from.prev());
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        let round = l.round;
        let Some(p) = l.progress.get_mut(&peer) else {
            return;
        };
        if p.reading != Some(from) {
            return; // a read its progress moved on from; a newer one may be out
        }
        p.reading = None;
        let mut entries = entries;
        entries.truncate(valid);
        let mut rest = entries.into_iter();
        if p.next == from
            && let Some(mut prev_log_id) = prev_log_id
            && !matches!(p.state, ProgressState::Snapshot { .. })
        {
            while !rest.as_slice().is_empty() && p.can_send(max_inflight) {
                let probing = matches!(p.state, ProgressState::Probe { .. });
                let n = batch_len(rest.as_slice(), max_n, max_bytes);
                let batch: Vec<_> = rest.by_ref().take(n).collect();
                p.record_sent(prev_log_id.index.plus(batch.len() as u64), now);
                let next_prev = batch.last().map_or(prev_log_id, |e| e.log_id);
                self.actions.push(Action::Send {
                    to: peer,
                    msg: Message::AppendEntries(AppendEntriesRequest {
                        term,
                        leader_id: id,
                        prev_log_id,
                        entries: batch,
                        leader_commit: commit,
                        round,
                        keep_from,
                    }),
                });
                prev_log_id = next_prev;
                if probing {
                    return;
                }
            }
        } else if valid == 0 {
            debug!(node = %id, peer = %peer, from = %from, "entries read back are no longer needed");
        }
        self.send_append(peer);
    }

    /// Drops cached entry payloads past [`Config::log_cache_bytes`]; only
    /// entries that are durable and handed to the state machine go.
    fn evict_cached(&mut self) {
        let upto = self.durable.min(self.applied);
        self.log.evict(upto, self.config.log_cache_bytes);
    }

    /// Reports that a `BuildSnapshot` produced `meta` (durable). Purges the
    /// log behind it, keeping `purge_keep` entries for slow followers, and
    /// on a leader whatever a live follower has not received yet (up to
    /// `purge_keep_max` entries behind the snapshot).
    pub fn snapshot_built(&mut self, meta: SnapshotMeta<C>) {
        self.building_snapshot = false;
        let newer = self
            .snapshot
            .as_ref()
            .is_none_or(|s| meta.last_log_id.index > s.last_log_id.index);
        if !newer
            || !self.log.matches(meta.last_log_id) && meta.last_log_id.index > self.log.base().index
        {
            return;
        }
        info!(node = %self.id, snapshot = %meta.last_log_id, bytes = meta.size, "snapshot built");
        self.log_bytes_at_snapshot = self.log_bytes_at_build;
        let snap = meta.last_log_id.index.0;
        let mut purge_to = LogIndex(snap.saturating_sub(self.config.purge_keep));
        // A follower keeps what its leader keeps for followers that lag
        // (never more than `keep_max` behind the snapshot): if it
        // leads next, it can still send them entries. Otherwise a leader
        // change turned every laggard into a snapshot transfer (seen in
        // `cargo xtask bench join`: the new leader, which had purged to
        // `purge_keep`, sent two 300 MB snapshots at once).
        let floor = LogIndex(snap.saturating_sub(self.keep_max(meta.size)));
        if !self.is_leader() && self.leader_keeps_from > LogIndex(0) {
            purge_to = purge_to.min(self.leader_keeps_from.prev().max(floor));
        }
        if let RoleState::Leader(l) = &self.role {
            let live_since = self.live_since();
            let live_needs = l
                .progress
                .values()
                .filter(|p| p.heard_since(live_since))
                .map(|p| p.matched.max(floor));
            purge_to = live_needs.fold(purge_to, LogIndex::min);
        }
        self.previous_snapshot = self.snapshot.replace(meta);
        self.stretch_snapshot_thresholds();
        if purge_to > self.log.base().index
            && let Some(upto) = self.log.log_id_at(purge_to)
        {
            self.purge_log(upto);
            self.actions.push(Action::PurgeLog { upto });
        }
    }

    /// Asks the leader to hand leadership to `to` (thesis §3.10): proposals
    /// pause, `to` is brought up to date and told to campaign at once. If it
    /// has not taken over within an election timeout, this node resumes.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), NotLeader<C::Node>> {
        let until = self.now + self.config.election_timeout_min_ms;
        let RoleState::Leader(l) = &mut self.role else {
            return Err(self.not_leader());
        };
        if to == self.id || !l.progress.get(&to).is_some_and(|p| p.voter) {
            return Ok(());
        }
        l.transfer = Some((to, until));
        info!(node = %self.id, term = %self.term, target = %to, "transferring leadership");
        self.maybe_send_timeout_now(to);
        Ok(())
    }

    /// Starts an election at once, skipping pre-vote (etcd's `Campaign`):
    /// for scripted tests and operators. Does nothing on a leader or on a
    /// node that does not vote.
    pub fn campaign_now(&mut self) {
        if !self.is_leader() {
            self.campaign(CampaignKind::Election);
        }
    }

    /// Hands out the actions produced since the last call, in the order they
    /// must be carried out.
    pub fn take_actions(&mut self) -> Vec<Action<C>> {
        if self.is_leader() {
            if self.read_round_wanted {
                self.broadcast_heartbeat();
            }
            if self.unflushed.is_some() {
                // Followers may receive entries before they are durable here
                // (thesis §10.2.1): the leader counts itself only once
                // `log_persisted` says so.
                self.replicate_all();
                self.flush_leader_entries();
            }
        }
        self.check_reads();
        std::mem::take(&mut self.actions)
    }

    // -------------------------------------------------------------- elections

    fn campaign(&mut self, kind: CampaignKind) {
        self.reset_election_timer();
        if !self.membership().is_voter(self.id) || !self.check_recognized() {
            return;
        }
        let Some(next_term) = self.term.next() else {
            warn!(node = %self.id, "term space exhausted; refusing to campaign");
            return;
        };
        let (term, pre_vote) = match kind {
            CampaignKind::PreVote => {
                debug!(node = %self.id, term = %next_term, "pre-vote campaign");
                self.role = RoleState::PreCandidate(VoteTally::default());
                if mutant(Mutation::PreVoteBumpsTerm) {
                    self.term = next_term;
                    self.voted_for = None;
                    self.save_hard_state();
                }
                (next_term, true)
            }
            CampaignKind::Election | CampaignKind::Transfer => {
                self.flush_leader_entries();
                self.term = next_term;
                self.voted_for = Some(self.id);
                self.leader_id = None;
                self.role = RoleState::Candidate(VoteTally::default());
                self.save_hard_state();
                self.elections += 1;
                info!(node = %self.id, term = %self.term, "election started");
                (next_term, false)
            }
        };
        let req = VoteRequest {
            term,
            candidate_id: self.id,
            last_log_id: self.log.last_log_id(),
            pre_vote,
            transfer: kind == CampaignKind::Transfer,
            candidate_uuid: self.uuid,
        };
        for peer in self.membership().voter_ids() {
            if peer != self.id {
                self.actions.push(Action::Send {
                    to: peer,
                    msg: Message::Vote(req.clone()),
                });
            }
        }
        self.record_vote(self.id, true);
    }

    fn on_vote_request(&mut self, from: NodeId, req: VoteRequest) -> Result<(), StepError> {
        if req.candidate_id != from {
            return Err(StepError::Malformed {
                from,
                kind: "vote",
                reason: "candidate_id differs from sender",
            });
        }
        let respond = |this: &mut Self, granted: bool, term: Term| {
            let msg = Message::VoteResponse(VoteResponse {
                term,
                granted,
                pre_vote: req.pre_vote,
                voter_uuid: this.uuid,
            });
            this.actions.push(Action::Respond { to: from, msg });
        };
        if req.term < self.term {
            respond(self, false, self.term);
            return Ok(());
        }
        // The refusal changes no state here (no term is adopted), so a
        // wiped node cannot disturb the cluster either.
        if !self.identities_allow_vote(from, &req) && !mutant(Mutation::WipedVoterCounted) {
            respond(self, false, self.term);
            return Ok(());
        }
        // Thesis §4.2.3: while we hear from a leader, ignore campaigns, so a
        // node that was partitioned away (or removed) cannot depose it.
        if self.in_lease() && !req.transfer && (req.term > self.term || req.pre_vote) {
            debug!(node = %self.id, candidate = %from, "vote refused: leader lease");
            respond(self, false, self.term);
            return Ok(());
        }
        let up_to_date = if mutant(Mutation::ElectionComparesIndexOnly) {
            req.last_log_id.index >= self.log.last_log_id().index
        } else {
            req.last_log_id >= self.log.last_log_id()
        };
        if req.pre_vote {
            // A pre-vote changes nothing here; grant if a real vote could be.
            let grant = req.term > self.term && up_to_date;
            respond(self, grant, if grant { req.term } else { self.term });
            return Ok(());
        }
        if req.term > self.term {
            self.become_follower(req.term, None);
        }
        let can_vote = (self.voted_for.is_none_or(|v| v == from)
            || mutant(Mutation::VoteGrantedTwiceInTerm))
            && self.leader_id.is_none_or(|l| l == from);
        let grant = can_vote && up_to_date;
        if grant && self.voted_for.is_none() {
            // §5.2: at most one vote per term, durable before the reply.
            self.voted_for = Some(from);
            if !mutant(Mutation::VoteNotPersisted) {
                self.save_hard_state();
            }
        }
        if grant {
            self.reset_election_timer();
        }
        debug!(node = %self.id, term = %self.term, candidate = %from, grant, "vote");
        respond(self, grant, self.term);
        Ok(())
    }

    fn on_vote_response(&mut self, from: NodeId, resp: VoteResponse) {
        let rejected_higher = !resp.granted && resp.term > self.term;
        if rejected_higher || (!resp.pre_vote && resp.term > self.term) {
            self.become_follower(resp.term, None);
            return;
        }
        // Only answers to the campaign under way count. A grant names the
        // term it was asked for; a refusal of a real vote carries our term
        // (the voter adopted it before refusing), so one of an earlier term,
        // or a pre-vote answer reaching a candidate, is late. (A pre-vote
        // refusal carries the voter's own term and cannot be told apart
        // from one of an earlier pre-vote round at the same term.)
        let current = match &self.role {
            RoleState::PreCandidate(_) => {
                resp.pre_vote && (!resp.granted || self.term.next() == Some(resp.term))
            }
            RoleState::Candidate(_) => !resp.pre_vote && resp.term == self.term,
            _ => false,
        };
        if !current && !mutant(Mutation::StaleVoteCounted) {
            return;
        }
        // A grant from a voter whose storage was wiped is no vote: the
        // node before the wipe may have given its vote in this term away.
        let granted = resp.granted
            && (self.membership().recognizes(from, resp.voter_uuid)
                || mutant(Mutation::WipedVoterCounted));
        self.record_vote(from, granted);
    }

    fn record_vote(&mut self, from: NodeId, granted: bool) {
        let mut configs = self.membership().configs.clone();
        if mutant(Mutation::JointElectionNewMajorityOnly) {
            configs.truncate(1);
        }
        let tally = match &mut self.role {
            RoleState::PreCandidate(t) | RoleState::Candidate(t) => t,
            _ => return,
        };
        if granted {
            tally.granted.insert(from);
        } else {
            tally.rejected.insert(from);
        }
        let won = quorum::has_quorum(&configs, |id| tally.granted.contains(&id));
        let lost = quorum::quorum_impossible(&configs, |id| tally.rejected.contains(&id));
        let pre = matches!(self.role, RoleState::PreCandidate(_));
        if won && pre {
            self.campaign(CampaignKind::Election);
        } else if won {
            self.become_leader();
        } else if lost {
            debug!(node = %self.id, term = %self.term, pre, "campaign lost");
            self.become_follower(self.term, None);
        }
    }

    fn on_timeout_now(&mut self, from: NodeId, _req: TimeoutNowRequest) {
        if self.leader_id == Some(from) && self.membership().is_voter(self.id) {
            info!(node = %self.id, term = %self.term, "told to campaign by the leader");
            self.campaign(CampaignKind::Transfer);
        }
    }

    fn in_lease(&self) -> bool {
        self.config.check_quorum
            && match &self.role {
                RoleState::Leader(_) => true,
                _ => {
                    self.leader_id.is_some()
                        && self.now < self.leader_contact + self.config.election_timeout_min_ms
                }
            }
    }

    // ---------------------------------------------------------- role changes

    fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.flush_leader_entries();
        if let RoleState::Leader(l) = &mut self.role {
            let ids: Vec<ReadId> = l.pending_reads.drain(..).map(|r| r.id).collect();
            if !ids.is_empty() {
                self.actions.push(Action::ReadFailed {
                    ids,
                    leader_id: leader,
                });
            }
        }
        let was = self.role();
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            if !mutant(Mutation::TermNotPersisted) {
                self.save_hard_state();
            }
        }
        self.role = RoleState::Follower;
        self.leader_id = leader;
        if leader.is_some() {
            self.leader_contact = self.now;
        }
        self.reset_election_timer();
        if was != Role::Follower && was != Role::Learner {
            info!(node = %self.id, term = %self.term, leader = ?leader, from = ?was, "became follower");
        }
    }

    fn become_leader(&mut self) {
        let last = self.log.last_index();
        let progress = self.peer_progress(last.next(), &BTreeMap::new());
        self.role = RoleState::Leader(Box::new(LeaderState {
            progress,
            round: 0,
            pending_reads: Vec::new(),
            heartbeat_due: self.now,
            check_quorum_due: self.now + self.config.election_timeout_min_ms,
            noop_index: last.next(),
            transfer: None,
        }));
        self.leader_id = Some(self.id);
        info!(node = %self.id, term = %self.term, last_log = %self.log.last_log_id(), "became leader");
        // §8: a no-op from this term lets the leader learn, through the
        // Figure 8 rule, which earlier entries are committed.
        self.leader_append(EntryPayload::Blank);
    }

    /// Progress trackers for every member but this node, keeping existing
    /// ones.
    fn peer_progress(
        &self,
        next: LogIndex,
        keep: &BTreeMap<NodeId, Progress>,
    ) -> BTreeMap<NodeId, Progress> {
        let m = self.membership();
        m.nodes
            .keys()
            .chain(m.voter_ids().iter())
            .filter(|id| **id != self.id)
            .map(|id| {
                let voter = m.is_voter(*id);
                let mut p = keep
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| Progress::new(next, voter));
                p.voter = voter;
                p.recognized = m.recognizes(*id, p.uuid);
                (*id, p)
            })
            .collect()
    }

    /// Draws this node's stretch of the snapshot thresholds until its next
    /// snapshot.
    fn stretch_snapshot_thresholds(&mut self) {
        let jitter = self.config.snapshot_jitter_percent;
        self.snapshot_stretch = 100 + self.snapshot_rng.range(0, jitter + 1);
    }

    fn reset_election_timer(&mut self) {
        let c = &self.config;
        self.election_due = self.now
            + self
                .rng
                .range(c.election_timeout_min_ms, c.election_timeout_max_ms);
    }

    fn save_hard_state(&mut self) {
        self.actions.push(Action::SaveHardState(HardState {
            term: self.term,
            voted_for: self.voted_for,
            uuid: self.uuid,
        }));
    }

    // ------------------------------------------------------------ replication

    fn leader_append(&mut self, payload: EntryPayload<C>) -> LogId {
        let log_id = LogId {
            term: self.term,
            index: self.log.last_index().next(),
        };
        let is_membership = matches!(payload, EntryPayload::Membership(_));
        if let EntryPayload::Membership(m) = &payload {
            self.log_memberships.push((log_id, m.clone()));
        }
        self.log.push(Entry { log_id, payload });
        self.unflushed.get_or_insert(log_id.index);
        if is_membership {
            let keep = std::mem::take(&mut self.leader_mut().progress);
            let progress = self.peer_progress(log_id.index, &keep);
            self.leader_mut().progress = progress;
        }
        log_id
    }

    /// A leader that steps down must still persist what it appended.
    fn flush_leader_entries(&mut self) {
        if let Some(from) = self.unflushed.take() {
            let entries = self
                .log
                .range(from, self.log.last_index())
                .cloned()
                .collect();
            self.actions.push(Action::AppendLog { entries });
        }
    }

    fn replicate_all(&mut self) {
        let peers: Vec<NodeId> = self.leader().progress.keys().copied().collect();
        for peer in peers {
            self.send_append(peer);
        }
    }

    /// Sends `peer` what it is missing, as far as flow control allows.
    fn send_append(&mut self, peer: NodeId) {
        loop {
            let last = self.log.last_index();
            let base = self.log.base().index;
            let (term, id, commit, now) = (self.term, self.id, self.commit, self.now);
            let (max_n, max_bytes, max_inflight) = (
                self.config.max_entries_per_message,
                self.config.max_bytes_per_message,
                self.config.max_inflight,
            );
            let (window, chunk) = (
                self.config.snapshot_window,
                self.config.snapshot_chunk_bytes,
            );
            // The snapshot this peer's next message needs, if any: looked up
            // before the leader's state is borrowed for writing, and cloned
            // only on that path (not for every AppendEntries).
            let snapshot = match &self.role {
                RoleState::Leader(l) => match l.progress.get(&peer) {
                    Some(p) => match &p.state {
                        ProgressState::Snapshot { snapshot_id, .. } => {
                            match p.state.snapshot_chunk_due(window, chunk) {
                                Some(_) => self.sendable_snapshot(*snapshot_id),
                                None => return,
                            }
                        }
                        _ if p.next <= base => self.snapshot.clone(),
                        _ => None,
                    },
                    None => return,
                },
                _ => return,
            };
            let RoleState::Leader(l) = &mut self.role else {
                return;
            };
            let round = l.round;
            let Some(p) = l.progress.get_mut(&peer) else {
                return;
            };
            if let Some(offset) = p.state.snapshot_chunk_due(window, chunk) {
                let Some(meta) = snapshot else {
                    p.become_probe(); // two builds replaced it; start again
                    continue;
                };
                if let ProgressState::Snapshot {
                    sent, active_at, ..
                } = &mut p.state
                {
                    *sent = offset.saturating_add(chunk as u64);
                    *active_at = now;
                }
                self.actions.push(Action::SendSnapshotChunk {
                    to: peer,
                    term,
                    meta,
                    offset,
                });
                continue; // the rest of the window
            }
            if p.next <= base {
                // The entries it needs were compacted away (§7).
                let Some(meta) = snapshot else {
                    warn!(node = %id, peer = %peer, "peer needs purged entries but no snapshot exists");
                    return;
                };
                info!(node = %id, peer = %peer, snapshot = %meta.last_log_id, "sending snapshot");
                self.snapshots_sent += 1;
                p.state = ProgressState::Snapshot {
                    snapshot_id: meta.id,
                    size: meta.size,
                    acked: 0,
                    sent: 0,
                    active_at: now,
                    started_at: now,
                };
                p.inflight.clear();
                continue; // its first window
            }
            let probing = matches!(p.state, ProgressState::Probe { .. });
            if p.reading == Some(p.next) || !p.can_send(max_inflight) || (!probing && p.next > last)
            {
                return;
            }
            let prev_index = p.next.prev();
            let Some(prev_log_id) = self.log.log_id_at(prev_index) else {
                return;
            };
            if p.next < self.log.cached_from() && p.next <= last {
                // Evicted from the cache: read them back, then send. Enough
                // for the room left in the window, not one message: each
                // read waits its turn behind the leader's own appends, so a
                // read per message fed a follower far behind more slowly
                // than clients wrote (seen in `cargo xtask bench join`: 2,000
                // of 5,000 entries/s, until it needed a snapshot). Bounded
                // by bytes too, as far as the cached entries' mean size
                // tells, so large values do not make a large read. And past
                // the cache's edge, up to the last entry: the edge moves on
                // while the read waits (the appends ahead of it evict as
                // they finish), so a read that stopped there left the
                // follower at the edge, fed exactly as fast as clients
                // wrote, a cache's worth behind for good (join bench:
                // 60,000-120,000 entries for minutes). Every entry up to
                // `last` is durable by the read's turn: it runs after every
                // earlier log action.
                let room = match p.state {
                    ProgressState::Probe { .. } => 1,
                    _ => max_inflight.saturating_sub(p.inflight.len()).max(1),
                };
                let n = match self.log.mean_cached_bytes() {
                    Some(mean) => (max_n * room)
                        .min(max_bytes.saturating_mul(room) / mean.max(1))
                        .max(max_n),
                    None => max_n, // no size to go by: one message's worth
                };
                let to = last.min(p.next.plus(n as u64 - 1));
                p.reading = Some(p.next);
                self.actions.push(Action::ReadEntries {
                    peer,
                    from: p.next,
                    to,
                });
                return;
            }
            let n = batch_len(self.log.range(p.next, last), max_n, max_bytes);
            let entries: Vec<_> = self.log.range(p.next, last).take(n).cloned().collect();
            p.record_sent(prev_index.plus(entries.len() as u64), now);
            let req = AppendEntriesRequest {
                term,
                leader_id: id,
                prev_log_id,
                entries,
                leader_commit: commit,
                round,
                keep_from: self.log.first_index(),
            };
            self.actions.push(Action::Send {
                to: peer,
                msg: Message::AppendEntries(req),
            });
            if probing {
                return;
            }
        }
    }

    /// A heartbeat round: an empty AppendEntries to every peer, numbered so
    /// the answers confirm leadership for ReadIndex.
    fn broadcast_heartbeat(&mut self) {
        self.read_round_wanted = false;
        let (term, id, commit) = (self.term, self.id, self.commit);
        let now = self.now;
        let hb = self.config.heartbeat_interval_ms;
        let base = self.log.base();
        let l = self.leader_mut();
        l.round += 1;
        l.heartbeat_due = now + hb;
        let round = l.round;
        let mut sends = Vec::new();
        for (peer, p) in l.progress.iter_mut() {
            // In step: anchor on what it is known to hold. Probing: the
            // heartbeat doubles as the probe.
            let prev_index = match p.state {
                ProgressState::Replicate => p.matched,
                ProgressState::Probe { .. } => {
                    p.state = ProgressState::Probe { sent: true };
                    p.next.prev()
                }
                ProgressState::Snapshot { .. } => base.index,
            };
            sends.push((*peer, prev_index.max(base.index)));
        }
        for (peer, prev_index) in sends {
            let prev_log_id = self.log.log_id_at(prev_index).unwrap_or(base);
            let req = AppendEntriesRequest {
                term,
                leader_id: id,
                prev_log_id,
                entries: Vec::new(),
                leader_commit: commit,
                round,
                keep_from: self.log.first_index(),
            };
            self.actions.push(Action::Send {
                to: peer,
                msg: Message::AppendEntries(req),
            });
        }
    }

    fn on_append_entries(
        &mut self,
        from: NodeId,
        mut req: AppendEntriesRequest<C>,
    ) -> Result<(), StepError> {
        if req.leader_id != from {
            return Err(StepError::Malformed {
                from,
                kind: "append",
                reason: "leader_id differs from sender",
            });
        }
        validate_incoming(from, &req)?;
        self.accept_leader(from)?;
        self.leader_keeps_from = req.keep_from;
        let round = req.round;
        let respond =
            |this: &mut Self, success: bool, index: LogIndex, conflict: Option<ConflictHint>| {
                let msg = Message::AppendEntriesResponse(AppendEntriesResponse {
                    term: this.term,
                    success,
                    index,
                    conflict,
                    round,
                    uuid: this.uuid,
                });
                this.actions.push(Action::Respond { to: from, msg });
            };
        let base = self.log.base();
        if req.prev_log_id.index < base.index {
            // Everything up to our base is committed, so it matches the
            // leader's log: skip the part of the message that covers it.
            let skip = (base.index.0 - req.prev_log_id.index.0) as usize;
            if skip > req.entries.len() {
                respond(self, true, base.index, None);
                return Ok(());
            }
            if skip > 0 && req.entries[skip - 1].log_id != base {
                return Err(StepError::ConflictsWithCommitted {
                    from,
                    index: base.index,
                });
            }
            req.entries.drain(..skip);
            req.prev_log_id = base;
        }
        let prev = req.prev_log_id;
        let prev_matches = if mutant(Mutation::PrevLogTermUnchecked) {
            prev.index <= self.log.last_index()
        } else {
            self.log.matches(prev)
        };
        if !prev_matches {
            // §5.3 consistency check failed; hint where to resume.
            let conflict = if prev.index > self.log.last_index() {
                ConflictHint {
                    term: None,
                    index: self.log.last_index().next(),
                }
            } else {
                ConflictHint {
                    term: self.log.term_at(prev.index),
                    index: self.log.first_index_of_term_at(prev.index),
                }
            };
            if prev.index <= self.commit {
                return Err(StepError::ConflictsWithCommitted {
                    from,
                    index: prev.index,
                });
            }
            debug!(node = %self.id, leader = %from, prev = %prev, last = %self.log.last_index(), "append refused: previous entry missing");
            respond(self, false, prev.index, Some(conflict));
            return Ok(());
        }
        let last_new = prev.index.plus(req.entries.len() as u64);
        // Skip what we already hold; truncate at the first conflict (§5.3).
        let mut new_from = req.entries.len();
        for (i, e) in req.entries.iter().enumerate() {
            match self.log.term_at(e.log_id.index) {
                Some(t) if t == e.log_id.term || mutant(Mutation::ConflictingEntriesKept) => {
                    continue;
                }
                Some(_) => {
                    if e.log_id.index <= self.commit {
                        return Err(StepError::ConflictsWithCommitted {
                            from,
                            index: e.log_id.index,
                        });
                    }
                    self.truncate_log(e.log_id.index);
                    new_from = i;
                }
                None => new_from = i,
            }
            break;
        }
        let append_at = self.actions.len();
        if new_from < req.entries.len() {
            let entries: Vec<Entry<C>> = req.entries.drain(new_from..).collect();
            self.append_follower_entries(entries);
        }
        // Figure 2: commitIndex = min(leaderCommit, index of last new entry).
        let new_commit = if mutant(Mutation::FollowerCommitPastNewEntries) {
            req.leader_commit.min(self.log.last_index())
        } else {
            req.leader_commit.min(last_new)
        };
        if new_commit > self.commit {
            self.commit = new_commit;
            self.apply_committed();
        }
        respond(self, true, last_new, None);
        if mutant(Mutation::AckBeforePersist)
            && let Some(ack) = self.actions.pop()
        {
            self.actions.insert(append_at, ack);
        }
        Ok(())
    }

    /// A leader's message in our term: follow `from` and reset the election
    /// timer. Refuses a second leader in one term (Election Safety, §5.2).
    fn accept_leader(&mut self, from: NodeId) -> Result<(), StepError> {
        let term = self.term;
        match self.role {
            RoleState::Leader(_) => return Err(StepError::TwoLeaders { from, term }),
            RoleState::Follower if self.leader_id.is_some_and(|l| l != from) => {
                return Err(StepError::TwoLeaders { from, term });
            }
            RoleState::Follower => {
                self.leader_id = Some(from);
                self.leader_contact = self.now;
                self.reset_election_timer();
            }
            _ => self.become_follower(term, Some(from)),
        }
        Ok(())
    }

    fn append_follower_entries(&mut self, entries: Vec<Entry<C>>) {
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                self.log_memberships.push((e.log_id, m.clone()));
            }
            self.log.push(e.clone());
        }
        self.actions.push(Action::AppendLog { entries });
    }

    fn truncate_log(&mut self, from: LogIndex) {
        debug!(node = %self.id, from = %from, "truncating conflicting entries");
        self.log.truncate(from);
        self.log_memberships.retain(|(id, _)| id.index < from);
        self.durable = self.durable.min(from.prev());
        self.actions.push(Action::TruncateLog { from });
    }

    fn purge_log(&mut self, upto: LogId) {
        self.log.purge(upto);
        while self
            .log_memberships
            .first()
            .is_some_and(|(id, _)| id.index <= upto.index)
        {
            self.base_membership = self.log_memberships.remove(0);
        }
    }

    fn on_append_response(
        &mut self,
        from: NodeId,
        resp: AppendEntriesResponse,
    ) -> Result<(), StepError> {
        let last = self.log.last_index();
        let RoleState::Leader(l) = &self.role else {
            return Ok(());
        };
        if !l.progress.contains_key(&from) {
            return Ok(());
        }
        if resp.success && resp.index > last {
            return Err(StepError::Malformed {
                from,
                kind: "append_resp",
                reason: "acknowledges past our log",
            });
        }
        self.answered_by(from, resp.uuid);
        let round = self.leader().round;
        let RoleState::Leader(l) = &mut self.role else {
            return Ok(());
        };
        let Some(p) = l.progress.get_mut(&from) else {
            return Ok(());
        };
        p.recent_active = true;
        p.last_heard = Some(self.now);
        p.acked_round = p.acked_round.max(resp.round);
        if resp.success {
            let advanced = p.on_match(resp.index, round);
            if advanced {
                p.advanced_at = self.now;
            }
            if matches!(p.state, ProgressState::Probe { .. }) {
                p.become_replicate();
            }
            if advanced {
                self.maybe_commit();
                if !self.is_leader() {
                    // Committing our own removal made us step down.
                    return Ok(());
                }
                if let Some((to, _)) = self.leader().transfer
                    && to == from
                {
                    self.maybe_send_timeout_now(from);
                }
            }
        } else {
            // Refused an entry at or below `matched` in a request sent
            // after `matched` was acknowledged. Within a term a follower
            // never drops what it acknowledged to the term's leader, so its
            // storage was wiped or rolled back. Trusting the old `matched`
            // would count entries it no longer holds toward commits, and
            // keep probing where it has nothing, so that it never caught
            // up. Start it over from the end of the log it now has.
            let lost = resp.index <= p.matched && resp.round > p.matched_round;
            if lost {
                error!(
                    peer = %from,
                    matched = %p.matched,
                    refused = %resp.index,
                    "follower lost entries it had acknowledged (storage wiped or rolled back?); \
                     replicating to it from its log's end"
                );
                p.matched = LogIndex(0);
                p.matched_round = round;
            }
            // A real rejection (not a reordered stale one): move back using
            // the follower's hint, skipping a whole term at a time. (A
            // rejection at exactly `matched` is left to the stall detector:
            // treating it as real stalled replication under heavy load,
            // see the closing note of the membership work.)
            if lost
                || (resp.index > p.matched && !matches!(p.state, ProgressState::Snapshot { .. }))
            {
                let next = match resp.conflict {
                    Some(ConflictHint {
                        term: Some(t),
                        index,
                    }) => self
                        .log
                        .last_index_of_term(t, resp.index)
                        .map(|i| i.next())
                        .unwrap_or(index),
                    Some(ConflictHint { term: None, index }) => index,
                    None => resp.index,
                };
                let RoleState::Leader(l) = &mut self.role else {
                    return Ok(());
                };
                let Some(p) = l.progress.get_mut(&from) else {
                    return Ok(());
                };
                p.become_probe();
                p.next = next.min(resp.index).max(p.matched.next());
                debug!(node = %self.id, peer = %from, refused = %resp.index, next = %p.next, "append refused; probing");
            }
        }
        self.send_append(from);
        Ok(())
    }

    /// Advances the commit index to what a quorum holds, counting replicas
    /// only for an entry of the current term (§5.4.2, Figure 8).
    fn maybe_commit(&mut self) {
        let mut configs = self.membership().configs.clone();
        if mutant(Mutation::JointCommitNewMajorityOnly) {
            configs.truncate(1);
        }
        let me = self.id;
        let durable = if mutant(Mutation::LeaderCountsUnpersistedSelf) {
            self.log.last_index()
        } else {
            self.durable
        };
        let l = self.leader();
        let index = quorum::committed_index(&configs, |id| {
            if id == me {
                durable
            } else {
                l.progress
                    .get(&id)
                    .filter(|p| p.recognized)
                    .map(|p| p.matched)
                    .unwrap_or_default()
            }
        });
        if index > self.commit
            && (self.log.term_at(index) == Some(self.term)
                || mutant(Mutation::CommitOldTermByCounting))
        {
            self.commit = index;
            self.apply_committed();
            // §6: once C_old,new is committed, the leader moves on to C_new
            // (this also finishes a change a previous leader started).
            if self.membership().is_joint() && self.membership_log_id().index <= index {
                let joint = self.membership();
                let new_voters = joint.configs[0].clone();
                let learners = joint.learner_ids();
                let stays = |id: &NodeId| new_voters.contains(id) || learners.contains(id);
                let nodes = joint
                    .nodes
                    .iter()
                    .filter(|(id, _)| stays(id))
                    .map(|(id, n)| (*id, n.clone()))
                    .collect();
                let uuids = joint
                    .uuids
                    .iter()
                    .filter(|(id, _)| stays(id))
                    .map(|(id, u)| (*id, *u))
                    .collect();
                info!(node = %self.id, term = %self.term, voters = ?new_voters, "joint configuration committed; appending the new one");
                self.leader_append(EntryPayload::Membership(Membership {
                    configs: vec![new_voters],
                    nodes,
                    uuids,
                }));
            }
            // A leader that is not in the configuration it just committed
            // hands over by stepping down (§6).
            if self.membership_log_id().index <= index && !self.membership().is_voter(self.id) {
                info!(node = %self.id, term = %self.term, "removed from the configuration; stepping down");
                self.become_follower(self.term, None);
            }
        }
    }

    fn apply_committed(&mut self) {
        if self.commit <= self.applied {
            return;
        }
        let entries: Vec<Entry<C>> = self
            .log
            .range(self.applied.next(), self.commit)
            .cloned()
            .collect();
        self.applied = self.commit;
        self.applied_log_bytes += entries.iter().map(|e| e.size_hint() as u64).sum::<u64>();
        self.actions.push(Action::Apply { entries });
        self.evict_cached();
        if !self.building_snapshot && self.snapshot_due() {
            self.building_snapshot = true;
            self.log_bytes_at_build = self.applied_log_bytes;
            self.actions.push(Action::BuildSnapshot);
        }
    }

    /// The snapshot policy: weighed by the log since the last snapshot
    /// ([`Self::snapshot_weighed`]), and deferred while a transfer runs
    /// ([`Self::deferred_for_transfer`]).
    fn snapshot_due(&self) -> bool {
        self.snapshot_weighed() && !self.deferred_for_transfer()
    }

    /// The current snapshot or the one it replaced, if `id` is either: the
    /// snapshots a transfer may read from.
    fn sendable_snapshot(&self, id: u64) -> Option<SnapshotMeta<C>> {
        [&self.snapshot, &self.previous_snapshot]
            .into_iter()
            .flatten()
            .find(|s| s.id == id)
            .cloned()
    }

    /// A leader does not build while a live follower (answered within an
    /// election timeout) receives a snapshot: the follower needs the log
    /// after that snapshot, not a newer one, and each build frees a
    /// snapshot file a transfer may still read (only the one before the
    /// current stays readable). Past `keep_max` entries since the snapshot
    /// the build goes ahead: the log must not grow without bound for a
    /// transfer that crawls.
    fn deferred_for_transfer(&self) -> bool {
        let RoleState::Leader(l) = &self.role else {
            return false;
        };
        let (since, size) = self
            .snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.last_log_id.index.0, s.size));
        let live_since = self.live_since();
        self.applied.0.saturating_sub(since) < self.keep_max(size)
            && l.progress.values().any(|p| {
                matches!(p.state, ProgressState::Snapshot { .. }) && p.heard_since(live_since)
            })
    }

    /// Most entries kept behind a snapshot of `snapshot_bytes` for a live
    /// follower that lacks them: `purge_keep_max`, or as many as weigh
    /// twice the snapshot if that is more. Past that, sending a snapshot
    /// again is the cheaper path; short of it, entries are: a follower
    /// sent a snapshot instead also needs every entry written while that
    /// transfer ran. With a bound in entries alone, a learner that had just
    /// installed a 312 MB snapshot lacked 330,000 entries of 1 KiB when the
    /// leader's next build purged them, and was sent the whole state again
    /// (`cargo xtask bench join`).
    fn keep_max(&self, snapshot_bytes: u64) -> u64 {
        let by_size = self.log.mean_cached_bytes().map_or(0, |mean| {
            snapshot_bytes.saturating_mul(2) / mean.max(1) as u64
        });
        self.config.purge_keep_max.max(by_size)
    }

    /// A follower is live, for what the log keeps for it, if it answered
    /// since then: within the last ten maximum election timeouts (3 s at
    /// the defaults). Not one election timeout: a learner busy installing a
    /// snapshot or catching up goes that long without a word, and a build
    /// finishing just then purged the entries it was being sent, so it was
    /// sent the whole state again (`cargo xtask bench join` with 1 GiB of
    /// state: 1,747 MB sent for a 1,042 MB state). What is kept for a live
    /// follower is bounded by `keep_max` either way.
    fn live_since(&self) -> u64 {
        self.now
            .saturating_sub(self.config.election_timeout_max_ms.saturating_mul(10))
    }

    /// At least `snapshot_every` entries applied since the last snapshot,
    /// and a log at least `snapshot_log_percent` of its size (so the cost
    /// of writing the state out is spread over a log that weighs as much,
    /// however large the state grows), both stretched by this node's
    /// draw of `snapshot_jitter_percent`.
    fn snapshot_weighed(&self) -> bool {
        let (since, size) = self
            .snapshot
            .as_ref()
            .map(|s| (s.last_log_id.index, s.size))
            .unwrap_or_default();
        let stretch = self.snapshot_stretch;
        let every = self.config.snapshot_every;
        let log_bytes = self.applied_log_bytes - self.log_bytes_at_snapshot;
        every > 0
            && u128::from(self.applied.0 - since.0.min(self.applied.0)) * 100
                >= u128::from(every) * u128::from(stretch)
            && u128::from(log_bytes) * 100 * 100
                >= u128::from(size)
                    * u128::from(self.config.snapshot_log_percent)
                    * u128::from(stretch)
    }

    fn maybe_send_timeout_now(&mut self, to: NodeId) {
        let last = self.log.last_index();
        let (term, id) = (self.term, self.id);
        let l = self.leader();
        if l.progress.get(&to).is_some_and(|p| p.matched == last) {
            let msg = Message::TimeoutNow(TimeoutNowRequest {
                term,
                leader_id: id,
            });
            self.actions.push(Action::Send { to, msg });
        } else {
            self.send_append(to);
        }
    }

    // ---------------------------------------------------------------- reads

    fn check_reads(&mut self) {
        let commit = self.commit;
        let me = self.id;
        let configs = self.membership().configs.clone();
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        if commit >= l.noop_index {
            for r in l.pending_reads.iter_mut().filter(|r| r.index.is_none()) {
                r.index = Some(commit);
            }
        }
        let mut ready: Vec<(ReadId, LogIndex)> = Vec::new();
        let progress = &l.progress;
        l.pending_reads.retain(|r| {
            let confirmed = r.index.is_some()
                && (mutant(Mutation::ReadWithoutQuorumRound)
                    || quorum::has_quorum(&configs, |id| {
                        id == me
                            || progress
                                .get(&id)
                                .is_some_and(|p| p.recognized && p.acked_round >= r.round)
                    }));
            if confirmed {
                ready.push((r.id, r.index.unwrap_or_default()));
            }
            !confirmed
        });
        let mut i = 0;
        while i < ready.len() {
            let index = ready[i].1;
            let ids: Vec<ReadId> = ready[i..]
                .iter()
                .take_while(|r| r.1 == index)
                .map(|r| r.0)
                .collect();
            i += ids.len();
            self.actions.push(Action::ReadReady { ids, index });
        }
    }

    // ------------------------------------------------------------- snapshots

    fn on_install_snapshot(
        &mut self,
        from: NodeId,
        req: InstallSnapshotRequest<C>,
    ) -> Result<(), StepError> {
        if req.leader_id != from {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "leader_id differs from sender",
            });
        }
        if !req.intact() {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "chunk does not match its checksum",
            });
        }
        self.accept_leader(from)?;
        let snap = req.meta.last_log_id;
        if snap.term > req.term {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "snapshot from a future term",
            });
        }
        let Some(end) = req.offset.checked_add(req.data.len() as u64) else {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "offset overflows",
            });
        };
        let (term, snapshot_id) = (self.term, req.meta.id);
        let respond = |this: &mut Self, next_offset: u64, done: bool| {
            let msg = Message::InstallSnapshotResponse(InstallSnapshotResponse {
                term,
                snapshot_id,
                next_offset,
                done,
                uuid: this.uuid,
            });
            this.actions.push(Action::Respond { to: from, msg });
        };
        if snap.index <= self.commit && !mutant(Mutation::SnapshotInstalledBehindCommit) {
            // We already hold everything it covers (committed entries match
            // the leader's), unless it contradicts our committed log.
            if let Some(t) = self.log.term_at(snap.index)
                && t != snap.term
            {
                return Err(StepError::ConflictsWithCommitted {
                    from,
                    index: snap.index,
                });
            }
            self.receiving = None;
            respond(self, end, true);
            return Ok(());
        }
        // The bytes of this transfer received so far are kept: a chunk of it
        // behind them (a duplicate, a retransmission whose original
        // arrived, a leader starting over at 0) is answered with where to
        // go on, never written. Another transfer (a newer snapshot, a new
        // leader) starts with its first chunk, or with any of its chunks if
        // this one wrote nothing yet or is an earlier leader's; a straggler
        // of a transfer the leader gave up never throws away what this
        // one received.
        let window = self.config.snapshot_window;
        let replace = match &self.receiving {
            None => true,
            Some(r) if r.from == from && r.term == term => {
                r.id != snapshot_id && (req.offset == 0 || r.next == 0)
            }
            Some(_) => true,
        };
        if replace {
            self.receiving = Some(Receiving {
                from,
                term,
                id: snapshot_id,
                next: 0,
                ahead: BTreeMap::new(),
            });
        }
        let r = self.receiving.as_mut().expect("set above");
        if r.id != snapshot_id {
            respond(self, 0, false);
            return Ok(());
        }
        if req.offset != r.next {
            // Chunks come a window at a time and may overtake each other:
            // one ahead of a gap is held (up to a window of them) until
            // the gap fills.
            if req.offset > r.next && r.ahead.len() < window {
                r.ahead.insert(req.offset, (req.data, req.done));
            }
            let next = r.next;
            respond(self, next, false);
            return Ok(());
        }
        // In order: write it, and the held chunks it joins up with.
        let meta = req.meta;
        let mut chunk = Some((req.offset, req.data, req.done));
        let mut done = false;
        while let Some((offset, data, last)) = chunk.take() {
            r.next = offset.saturating_add(data.len() as u64);
            self.actions.push(Action::WriteSnapshotChunk {
                meta: meta.clone(),
                offset,
                data,
            });
            done = last;
            if !done {
                chunk = r
                    .ahead
                    .remove(&r.next)
                    .map(|(data, last)| (r.next, data, last));
            }
        }
        let end = r.next;
        r.ahead.retain(|&offset, _| offset > end);
        if !done {
            respond(self, end, false);
            return Ok(());
        }
        // §7: install; keep the log after the snapshot if it agrees, else
        // discard it all.
        info!(node = %self.id, term = %self.term, snapshot = %snap, "installing snapshot");
        self.snapshots_installed += 1;
        self.receiving = None;
        self.actions
            .push(Action::InstallSnapshot { meta: meta.clone() });
        if !self.log.matches(snap) && !self.log.is_empty() {
            self.truncate_log(self.log.first_index());
        }
        self.purge_log(snap);
        self.base_membership = (snap, meta.membership.clone());
        self.log_memberships.retain(|(id, _)| id.index > snap.index);
        self.actions.push(Action::PurgeLog { upto: snap });
        self.durable = self.durable.max(snap.index).min(self.log.last_index());
        self.commit = self.commit.max(snap.index);
        self.applied = snap.index;
        self.log_bytes_at_snapshot = self.applied_log_bytes;
        self.snapshot = Some(meta);
        self.previous_snapshot = None;
        self.stretch_snapshot_thresholds();
        respond(self, end, true);
        self.apply_committed();
        Ok(())
    }

    fn on_snapshot_response(&mut self, from: NodeId, resp: InstallSnapshotResponse) {
        if !self.answered_by(from, resp.uuid) {
            return;
        }
        let (now, chunk) = (self.now, self.config.snapshot_chunk_bytes);
        let snapshot = self.sendable_snapshot(resp.snapshot_id);
        let RoleState::Leader(l) = &mut self.role else {
            return;
        };
        let round = l.round;
        let Some(p) = l.progress.get_mut(&from) else {
            return;
        };
        p.recent_active = true;
        p.last_heard = Some(now);
        let ProgressState::Snapshot {
            snapshot_id,
            acked,
            sent,
            active_at,
            started_at,
            ..
        } = &mut p.state
        else {
            return;
        };
        if *snapshot_id != resp.snapshot_id {
            return;
        }
        match snapshot {
            Some(meta) if resp.done => {
                let took = now.saturating_sub(*started_at);
                self.snapshot_bytes_delivered += meta.size;
                self.snapshot_delivery_ms += took;
                info!(peer = %from, snapshot = %meta.last_log_id, bytes = meta.size, ms = took, "snapshot delivered");
                p.on_match(meta.last_log_id.index, round);
                p.become_probe();
                self.maybe_commit();
            }
            Some(_) => {
                let next = resp.next_offset;
                if next > *acked {
                    // With one chunk out (stop-and-wait past the known
                    // size), this answers it, however long it was.
                    let one_out = *sent <= acked.saturating_add(chunk as u64);
                    *acked = next;
                    *sent = if one_out { next } else { (*sent).max(next) };
                    *active_at = now;
                } else if next == 0 && *acked > 0 {
                    // The follower holds nothing of this transfer any more
                    // (it restarted): start over.
                    *acked = 0;
                    *sent = 0;
                    *active_at = now;
                } else {
                    // Where it already was: an answer to a duplicate, or to
                    // a chunk that arrived ahead of a gap (held there). What
                    // is missing goes again only when the window stalls.
                    return;
                }
            }
            None => p.become_probe(),
        }
        self.send_append(from);
    }

    // -------------------------------------------------------------- helpers

    fn reject_stale(&mut self, from: NodeId, msg: &Message<C>) {
        let (term, uuid) = (self.term, self.uuid);
        let resp = match msg {
            Message::AppendEntries(req) => Message::AppendEntriesResponse(AppendEntriesResponse {
                term,
                success: false,
                index: req.prev_log_id.index,
                conflict: None,
                round: req.round,
                uuid,
            }),
            Message::InstallSnapshot(req) => {
                Message::InstallSnapshotResponse(InstallSnapshotResponse {
                    term,
                    snapshot_id: req.meta.id,
                    next_offset: 0,
                    done: false,
                    uuid,
                })
            }
            _ => return,
        };
        self.actions.push(Action::Respond {
            to: from,
            msg: resp,
        });
    }

    fn leader(&self) -> &LeaderState {
        match &self.role {
            RoleState::Leader(l) => l,
            _ => unreachable!("leader-only path reached in another role"),
        }
    }

    fn leader_mut(&mut self) -> &mut LeaderState {
        match &mut self.role {
            RoleState::Leader(l) => l,
            _ => unreachable!("leader-only path reached in another role"),
        }
    }
}

/// A snapshot transfer this node is receiving. Snapshot ids are unique per
/// state machine, so a transfer is one leader's (in one term) snapshot id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Receiving {
    from: NodeId,
    term: Term,
    id: u64,
    /// The offset written up to: the next chunk to write.
    next: u64,
    /// Chunks that arrived ahead of `next`, by offset: their bytes and
    /// whether they end the snapshot.
    ahead: BTreeMap<u64, (Vec<u8>, bool)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CampaignKind {
    PreVote,
    Election,
    Transfer,
}

/// Checks an incoming AppendEntries for internal consistency before any of
/// it touches the log.
fn validate_incoming<C: TypeConfig>(
    from: NodeId,
    req: &AppendEntriesRequest<C>,
) -> Result<(), StepError> {
    let malformed = |reason| {
        Err(StepError::Malformed {
            from,
            kind: "append",
            reason,
        })
    };
    if req.prev_log_id.term > req.term {
        return malformed("prev_log_id from a future term");
    }
    let mut prev = req.prev_log_id;
    for e in &req.entries {
        if e.log_id.index != prev.index.next() {
            return malformed("entries are not contiguous after prev_log_id");
        }
        if e.log_id.term < prev.term || e.log_id.term > req.term {
            return malformed("entry terms out of order");
        }
        prev = e.log_id;
    }
    Ok(())
}

fn validate_entries<C: TypeConfig>(
    base: LogId,
    entries: &[Entry<C>],
    saved: Term,
) -> Result<(), RecoveryError> {
    let mut prev = base;
    for e in entries {
        if e.log_id.index != prev.index.next() {
            return Err(RecoveryError::Gap {
                index: e.log_id.index,
                expected: prev.index.next(),
            });
        }
        if e.log_id.term < prev.term {
            return Err(RecoveryError::TermRegression {
                index: e.log_id.index,
                term: e.log_id.term,
            });
        }
        if e.log_id.term > saved {
            return Err(RecoveryError::TermFromFuture {
                index: e.log_id.index,
                term: e.log_id.term,
                saved,
            });
        }
        prev = e.log_id;
    }
    Ok(())
}

/// How many of `entries` (in order) go in one AppendEntries: at most
/// `max_n`, and no more than `max_bytes` by `size_hint` unless a single
/// entry is larger (one always goes, or a large entry would never be sent).
fn batch_len<'a, C: TypeConfig + 'a>(
    entries: impl IntoIterator<Item = &'a Entry<C>>,
    max_n: usize,
    max_bytes: usize,
) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for e in entries {
        if n >= max_n || (n > 0 && bytes + e.size_hint() > max_bytes) {
            break;
        }
        bytes += e.size_hint();
        n += 1;
    }
    n
}
