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
//! This file holds the engine's state and dispatches its inputs (`step`,
//! `initialize`, `take_actions`); the rest is one `impl Engine` block per
//! Raft concept:
//!
//! - `election.rs`: elections, votes, pre-vote, leadership transfer, and
//!   the `become_*` role changes (§5.2, thesis §3.10, §9.6);
//! - `replication.rs`: proposals, AppendEntries on both sides, commit and
//!   apply (§5.3, §5.4);
//! - `read_index.rs`: linearizable reads (thesis §6.4);
//! - `snapshot.rs`: when to build and purge, and InstallSnapshot on both
//!   sides (§7);
//! - `membership.rs`: learners and joint consensus (§6);
//! - `history.rs`: the leadership changes this node saw, with their
//!   causes (observation only);
//! - `timers.rs`: the clock, election timeouts, and the leader's
//!   heartbeats, check-quorum (thesis §6.2) and retransmission;
//! - `recovery.rs`: starting from what storage recovered;
//! - `identity.rs`: node identities, so a wiped node cannot vote as its
//!   old self;
//! - `queries.rs` and `action.rs`: what the engine tells and asks its
//!   driver;
//! - `log.rs`, `progress.rs`, `quorum.rs`: the log cache, per-follower
//!   progress, and majority arithmetic those rules use.
//!
//! Messages are dispatched by kind, not by role: `step` sends each kind to
//! one handler, and the handler matches on the role where the rule differs
//! by role. `become_*` functions reset exactly the state each role owns.
//! Comments cite the extended Raft paper (§) and Ongaro's thesis where a
//! rule comes from.

mod action;
mod election;
mod history;
mod identity;
pub(crate) mod log;
mod membership;
pub(crate) mod progress;
mod queries;
pub(crate) mod quorum;
mod read_index;
mod recovery;
mod replication;
pub(crate) mod rng;
mod snapshot;
mod timers;

pub use self::action::{Action, ReadId, Role};
pub use self::history::{ElectionCause, LEADERSHIP_HISTORY, LeadershipChange};
pub use self::queries::{PeerProgress, PeerState};
pub use self::recovery::RecoveredState;

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
    /// Voters leaving the voting configuration that stay as learners
    /// ([`Engine::demote_voter`]): the final configuration keeps them. Only
    /// this leader knows; a leader that takes over a joint configuration
    /// removes them outright, and the caller adds them back as learners.
    demoting: BTreeSet<NodeId>,
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
    /// This node does not lead; nothing was proposed.
    #[error(transparent)]
    NotLeader(#[from] NotLeader<N>),
    /// Leadership is being handed over; nothing was proposed.
    #[error("a leadership transfer is in progress")]
    TransferInProgress,
    /// The membership change was refused; nothing was proposed.
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// One Raft node's consensus state. See the module docs for the contract.
///
/// Driving it by hand (what the `Raft` driver and the simulator do, in
/// full): a one-node cluster, with the storage a real driver would make
/// durable reduced to comments. A cluster of several is the same loop plus
/// `Send` actions delivered to the peers' `step`, and their `Respond`
/// actions delivered back.
///
/// ```
/// use std::collections::BTreeMap;
/// use raft_core::engine::{Action, Engine, RecoveredState};
/// use raft_core::memory::{KvCommand, KvConfig};
/// use raft_core::{Config, EntryPayload, Membership, NodeId};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // What storage recovered: nothing, a new node. Seed 7 draws its
/// // election timeouts; the clock starts at 0 ms.
/// let mut e: Engine<KvConfig> =
///     Engine::new(NodeId(1), Config::default(), 7, 0, RecoveredState::default())?;
/// e.initialize(Membership::new_voters(BTreeMap::from([(NodeId(1), "n1".to_string())])))?;
///
/// // Carries out the actions in order; returns the commands applied.
/// fn drive(e: &mut Engine<KvConfig>) -> Vec<KvCommand> {
///     let mut applied = Vec::new();
///     loop {
///         let actions = e.take_actions();
///         if actions.is_empty() {
///             return applied;
///         }
///         for action in actions {
///             match action {
///                 // Durable before the next action starts.
///                 Action::SaveHardState(_) => { /* write term and vote */ }
///                 Action::AppendLog { entries } => {
///                     /* append durably */
///                     let last = entries.last().expect("entries").log_id;
///                     e.log_persisted(last);
///                 }
///                 Action::Apply { entries } => {
///                     for entry in entries {
///                         if let EntryPayload::Command(c) = entry.payload {
///                             applied.push((*c).clone());
///                         }
///                     }
///                 }
///                 // No peers, no snapshots, no reads in this example.
///                 _ => {}
///             }
///         }
///     }
/// }
///
/// // Time passes until the election timeout fires and the node elects
/// // itself.
/// let mut now = 0;
/// while !e.is_leader() {
///     now += 10;
///     e.tick(now);
///     drive(&mut e);
/// }
/// let put = KvCommand::Put { key: "k".into(), value: "v".into() };
/// e.propose(put.clone())?;
/// assert_eq!(drive(&mut e), vec![put]);
/// assert_eq!(e.applied_index(), e.commit_index());
/// # Ok(()) }
/// ```
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
    /// The highest commit index a leader has announced to this node, which
    /// may be past this node's log: how far behind the cluster it is.
    leader_commit: LogIndex,
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
    /// The build in progress is awaited by a snapshot transfer, and the
    /// current snapshot came from such a build: it goes out as it is, so
    /// one transfer waits for one build at most (a rule that judged every
    /// snapshot by the log since would rebuild forever where writes during
    /// a build outweigh the share, seen in the slow-snapshot scenario).
    building_for_transfer: bool,
    snapshot_for_transfer: bool,
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
    /// Leadership changes as this node saw them.
    history: history::History,
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

    // --------------------------------------------------------------- dispatch

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
