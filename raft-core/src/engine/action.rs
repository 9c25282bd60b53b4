//! What the engine asks of its driver, and the roles it reports.

#[cfg(doc)]
use super::Engine;
#[cfg(doc)]
use crate::config::Config;
use crate::message::{Message, SnapshotMeta};
use crate::types::{Entry, HardState, LogId, LogIndex, NodeId, Term, TypeConfig};

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
