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
    AppendLog {
        /// The entries, contiguous with the log's end.
        entries: Vec<Entry<C>>,
    },
    /// Durably delete every entry at `from` and after.
    TruncateLog {
        /// The first index deleted.
        from: LogIndex,
    },
    /// Durably delete every entry up to and including `upto`; if the log ends
    /// before it, the log becomes empty and continues after `upto`.
    PurgeLog {
        /// The last entry deleted.
        upto: LogId,
    },
    /// Read the entries `from ..= to` back from the `LogStore` (after every
    /// earlier log action, so all of them are durable by then: the first
    /// were evicted from the engine's cache, see
    /// [`Config::log_cache_bytes`], and the range may run on past the
    /// cache's edge) and hand them to [`Engine::entries_read`] for `peer`.
    /// Nothing needs to be durable.
    ReadEntries {
        /// The follower the entries are for.
        peer: NodeId,
        /// The first index to read.
        from: LogIndex,
        /// The last index to read.
        to: LogIndex,
    },
    /// Deliver a request (or one-way message) to a peer. May be handed to
    /// the transport without waiting.
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        msg: Message<C>,
    },
    /// Answer the request just stepped from `to`. Each request passed to
    /// [`Engine::step`] yields exactly one `Respond`, unless `step` errs.
    Respond {
        /// The peer whose request this answers.
        to: NodeId,
        /// The answer.
        msg: Message<C>,
    },
    /// Apply these committed entries to the state machine, in order.
    Apply {
        /// The entries, following the last applied.
        entries: Vec<Entry<C>>,
    },
    /// Build a snapshot of the state machine as applied so far; report it
    /// with [`Engine::snapshot_built`].
    BuildSnapshot,
    /// Read `max_len` bytes at `offset` of the snapshot `meta.id` and send
    /// them to `to` as an InstallSnapshot request in `term`.
    SendSnapshotChunk {
        /// The follower.
        to: NodeId,
        /// The term to send the request in.
        term: Term,
        /// The snapshot.
        meta: SnapshotMeta<C>,
        /// Where in it the chunk starts.
        offset: u64,
    },
    /// Store a received chunk of an incoming snapshot (offset 0 starts over).
    WriteSnapshotChunk {
        /// The snapshot it belongs to.
        meta: SnapshotMeta<C>,
        /// Where in it the chunk starts.
        offset: u64,
        /// The chunk's bytes.
        data: Vec<u8>,
    },
    /// Atomically replace the state machine with the received snapshot.
    InstallSnapshot {
        /// The snapshot, whole and durable by now.
        meta: SnapshotMeta<C>,
    },
    /// These reads are confirmed; serve them once `index` is applied.
    ReadReady {
        /// The reads.
        ids: Vec<ReadId>,
        /// The index the state machine must reach first.
        index: LogIndex,
    },
    /// These reads cannot be confirmed: this node is no longer leader.
    ReadFailed {
        /// The reads.
        ids: Vec<ReadId>,
        /// The leader this node knows of, for a redirect.
        leader_id: Option<NodeId>,
    },
}

/// The role a node plays in its current term.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one) and votes.
    Follower,
    /// Probing with pre-votes whether an election could succeed.
    PreCandidate,
    /// Campaigning for votes in a new term.
    Candidate,
    /// Leads its term.
    Leader,
    /// Receives the log but does not vote.
    Learner,
}
