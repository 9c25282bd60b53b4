//! What the engine tells whoever drives or watches it.

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// This node's id.
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
    /// The current term.
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
    /// Whom this node voted for in the current term.
    pub fn voted_for(&self) -> Option<NodeId> {
        self.voted_for
    }
    /// The role this node plays now.
    pub fn role(&self) -> Role {
        match &self.role {
            RoleState::Leader(_) => Role::Leader,
            RoleState::Candidate(_) => Role::Candidate,
            RoleState::PreCandidate(_) => Role::PreCandidate,
            RoleState::Follower if !self.membership().is_voter(self.id) => Role::Learner,
            RoleState::Follower => Role::Follower,
        }
    }
    /// Whether this node leads its term.
    pub fn is_leader(&self) -> bool {
        matches!(self.role, RoleState::Leader(_))
    }
    /// The leader this node knows of in the current term.
    pub fn leader_id(&self) -> Option<NodeId> {
        self.leader_id
    }
    /// Highest index known committed.
    pub fn commit_index(&self) -> LogIndex {
        self.commit
    }
    /// The cluster's commit index as far as this node knows it: its own on
    /// a leader; on others the highest a leader announced, which a node
    /// catching up has not reached yet (its own `commit_index` stops at
    /// the end of its log).
    pub fn leader_commit_index(&self) -> LogIndex {
        if self.is_leader() {
            self.commit
        } else {
            self.leader_commit.max(self.commit)
        }
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
    /// The last entry of the log (durable or not).
    pub fn last_log_id(&self) -> LogId {
        self.log.last_log_id()
    }
    /// The engine's view of the log: its cached entries and bounds.
    pub(crate) fn log(&self) -> &RaftLog<C> {
        &self.log
    }
    /// The term of the entry at `index`, if the log holds it; known also
    /// for the last purged entry and for entries evicted from the cache.
    pub fn term_at(&self, index: LogIndex) -> Option<Term> {
        self.log.term_at(index)
    }
    /// The id of the entry at `index`, as [`Engine::term_at`] knows it.
    pub fn log_id_at(&self, index: LogIndex) -> Option<LogId> {
        self.log.log_id_at(index)
    }
    /// Whether the log holds an entry with exactly this id (the last
    /// purged entry counts).
    pub fn log_holds(&self, id: LogId) -> bool {
        self.log.matches(id)
    }
    /// The last purged entry (`LogId::ZERO` if none): the log holds the
    /// entries after it.
    pub fn log_base(&self) -> LogId {
        self.log.base()
    }
    /// The entry at `index`, if its payload is in the engine's cache
    /// (`Config::log_cache_bytes`; older entries are read back from the
    /// `LogStore` when a follower needs them).
    pub fn cached_entry(&self, index: LogIndex) -> Option<&Entry<C>> {
        self.log.get(index)
    }
    /// The first index whose payload is cached (one past the last entry
    /// when none is).
    pub fn cached_from(&self) -> LogIndex {
        self.log.cached_from()
    }
    /// Bytes of payload in the cache (by `Entry::size_hint`).
    pub fn cached_bytes(&self) -> usize {
        self.log.cached_bytes()
    }
    /// The current snapshot, if there is one.
    pub fn snapshot_meta(&self) -> Option<&SnapshotMeta<C>> {
        self.snapshot.as_ref()
    }
    /// The configuration the engine runs with.
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
    /// Leader only: how it sends to each peer.
    pub fn each_progress(&self) -> impl Iterator<Item = (NodeId, PeerProgress)> + '_ {
        let progress = match &self.role {
            RoleState::Leader(l) => Some(l.progress.iter()),
            _ => None,
        };
        progress.into_iter().flatten().map(|(id, p)| {
            let state = match p.state {
                ProgressState::Probe { .. } => PeerState::Probe,
                ProgressState::Replicate => PeerState::Replicate,
                ProgressState::Snapshot { acked, size, .. } => PeerState::Snapshot { acked, size },
            };
            let progress = PeerProgress {
                matched: p.matched,
                next: p.next,
                inflight: p.inflight.len(),
                state,
                voter: p.voter,
                reachable: p
                    .last_heard
                    .is_some_and(|t| t + self.config.election_timeout_min_ms > self.now),
            };
            (*id, progress)
        })
    }

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
    /// The redirect to give a caller that needs the leader.
    pub fn not_leader(&self) -> NotLeader<C::Node> {
        NotLeader {
            leader_id: self.leader_id,
            leader_node: self
                .leader_id
                .and_then(|l| self.membership().nodes.get(&l).cloned()),
        }
    }
}

/// How a leader sends to one peer (etcd's progress states).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerProgress {
    /// The peer's highest index known to match the leader's log.
    pub matched: LogIndex,
    /// The next index to send it.
    pub next: LogIndex,
    /// AppendEntries in flight to it.
    pub inflight: usize,
    /// The state of its replication.
    pub state: PeerState,
    /// Whether it votes.
    pub voter: bool,
    /// Whether it answered within the last election timeout.
    pub reachable: bool,
}

/// The replication state of a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Where its log matches is being found: one message at a time.
    Probe,
    /// In step: entries go out optimistically, up to the in-flight window.
    Replicate,
    /// A snapshot is streaming to it.
    Snapshot {
        /// Bytes it acknowledged.
        acked: u64,
        /// The snapshot's size (0 if unknown).
        size: u64,
    },
}
