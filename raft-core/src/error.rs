//! Error types, one enum per layer.

use thiserror::Error;

use crate::types::{LogIndex, NodeId, Term};

/// Input the engine refused. The engine's state is unchanged by the refused
/// part of the message; the caller logs it and keeps serving.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StepError {
    /// The message contradicts itself (entries out of sequence, a term from
    /// the future): nothing in it was used.
    #[error("malformed {kind} from node {from}: {reason}")]
    Malformed {
        /// The sender.
        from: NodeId,
        /// The message kind (`"append"`, `"vote"`, ...).
        kind: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A leader asked this node to overwrite an entry it knows committed:
    /// the sender is faulty or hostile, since no honest leader can.
    #[error("node {from} sent entries that conflict with committed index {index}")]
    ConflictsWithCommitted {
        /// The sender.
        from: NodeId,
        /// The committed index it would have overwritten.
        index: LogIndex,
    },
    /// A second node claims leadership of a term that already has one
    /// (election safety would be broken by listening).
    #[error("node {from} claims leadership of term {term}, which already has a leader")]
    TwoLeaders {
        /// The sender.
        from: NodeId,
        /// The term it claims.
        term: Term,
    },
    /// The message names this node as its sender.
    #[error("message from node {from}, which is this node")]
    FromSelf {
        /// The id it came from (this node's own).
        from: NodeId,
    },
}

/// The state handed to [`crate::Engine::new`] contradicts itself (corrupt or
/// mismatched storage). The node must not start.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecoveryError {
    /// The log has a hole or an entry out of place.
    #[error("log entry {index} is out of sequence (expected index {expected})")]
    Gap {
        /// The entry's index.
        index: LogIndex,
        /// The index it should have had.
        expected: LogIndex,
    },
    /// Terms go backwards along the log.
    #[error("log entry {index} has term {term}, lower than the entry before it")]
    TermRegression {
        /// The entry's index.
        index: LogIndex,
        /// Its term.
        term: Term,
    },
    /// An entry is from a term later than the saved current term.
    #[error("log entry {index} has term {term}, newer than the saved term {saved}")]
    TermFromFuture {
        /// The entry's index.
        index: LogIndex,
        /// Its term.
        term: Term,
        /// The saved current term.
        saved: Term,
    },
    /// The state machine is ahead of the log and of any snapshot.
    #[error("state machine applied index {applied} but the log ends at {last}")]
    AppliedPastLog {
        /// The state machine's applied index.
        applied: LogIndex,
        /// The log's last index.
        last: LogIndex,
    },
    /// The state machine is behind the snapshot it says it holds.
    #[error("state machine applied {applied}, older than its own snapshot at {snapshot}")]
    AppliedBeforeSnapshot {
        /// The state machine's applied index.
        applied: LogIndex,
        /// The snapshot's last index.
        snapshot: LogIndex,
    },
    /// Entries between the state machine and the log were purged with no
    /// snapshot to cover them.
    #[error(
        "state machine applied only up to {applied}, but the log starts at {first} and no snapshot covers the gap"
    )]
    AppliedBeforeLogStart {
        /// The state machine's applied index.
        applied: LogIndex,
        /// The log's first index.
        first: LogIndex,
    },
    /// The state machine applied a different entry at this index than the
    /// log holds.
    #[error("state machine applied entry {applied} whose term differs from the log's")]
    AppliedMismatch {
        /// The index in question.
        applied: LogIndex,
    },
}

/// Why `initialize` refused to bootstrap this node.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InitializeError {
    /// The node has a term or a log already: it recovers instead.
    #[error(
        "node already has state (term {term}, last log index {last_index}); it recovers instead"
    )]
    NotPristine {
        /// The node's current term.
        term: Term,
        /// Its last log index.
        last_index: LogIndex,
    },
    /// The membership given names no voter.
    #[error("the initial membership has no voters")]
    NoVoters,
}

/// A request that must be served by the leader reached another node.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("not the leader; leader is {leader_id:?}")]
pub struct NotLeader<N> {
    /// The leader this node knows of, if any.
    pub leader_id: Option<NodeId>,
    /// Its address, if this node knows it.
    pub leader_node: Option<N>,
}

/// Why a membership change was refused. Nothing was proposed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MembershipError {
    /// Only one change at a time (§4.3 of the thesis): the configuration
    /// at `index` is joint or not yet committed.
    #[error("a membership change is in progress (configuration at index {index} is not final yet)")]
    InProgress {
        /// Where the configuration in effect was proposed.
        index: LogIndex,
    },
    /// The configuration asked for has no voter.
    #[error("the new configuration has no voters")]
    NoVoters,
    /// Replacing every voter at once would hand the cluster to nodes that
    /// never voted in it; change a few at a time.
    #[error("the new configuration keeps none of the current voters")]
    NoCurrentVoter,
    /// Voters must be members (learners) first.
    #[error("node {0} is not a member; add it as a learner first")]
    UnknownNode(NodeId),
    /// The node to add is a member already.
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    /// The learner to remove is a voter.
    #[error("node {0} votes; remove it with change_membership")]
    IsVoter(NodeId),
    /// The voter to demote is a learner already.
    #[error("node {0} is a learner, not a voter")]
    NotVoter(NodeId),
}
