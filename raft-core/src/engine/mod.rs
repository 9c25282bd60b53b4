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
//! # Where each rule lives
//! This file holds the engine's state, its queries and its inputs (`tick`,
//! `step`, `propose`, ...); each input hands over to the file of its Raft
//! concept, each an `impl Engine` block:
//!
//! - `election.rs`: elections, votes, pre-vote, check-quorum, leadership
//!   transfer, and the `become_*` role changes (§5.2, thesis §3.10, §9.6);
//! - `replication.rs`: proposals, AppendEntries on both sides, commit and
//!   apply (§5.3, §5.4);
//! - `read_index.rs`: linearizable reads (thesis §6.4);
//! - `snapshot.rs`: when to build and purge, and InstallSnapshot on both
//!   sides (§7);
//! - `membership.rs`: learners and joint consensus (§6);
//! - `log.rs`, `progress.rs`, `quorum.rs`: the log cache, per-follower
//!   progress, and majority arithmetic those rules use.
//!
//! Messages are dispatched by kind, not by role: `step` sends each kind to
//! one handler, and the handler matches on the role where the rule differs
//! by role. `become_*` functions reset exactly the state each role owns.
//! Comments cite the extended Raft paper (§) and Ongaro's thesis where a
//! rule comes from.

mod election;
mod identity;
pub mod log;
mod membership;
pub mod progress;
pub mod quorum;
mod read_index;
mod replication;
pub mod rng;
mod snapshot;

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

impl RoleState {
    /// The leader's state, borrowing only the role: the rest of the engine
    /// stays usable beside it.
    fn leader(&self) -> Option<&LeaderState> {
        match self {
            RoleState::Leader(l) => Some(l),
            _ => None,
        }
    }

    fn leader_mut(&mut self) -> Option<&mut LeaderState> {
        match self {
            RoleState::Leader(l) => Some(l),
            _ => None,
        }
    }
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
        let Some(l) = self.role.leader_mut() else {
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

    /// For paths only a leader reaches (callers checked the role).
    fn leader(&self) -> &LeaderState {
        self.role
            .leader()
            .expect("leader-only path reached in another role")
    }

    fn leader_mut(&mut self) -> &mut LeaderState {
        self.role
            .leader_mut()
            .expect("leader-only path reached in another role")
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
