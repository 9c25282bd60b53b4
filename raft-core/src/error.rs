//! Error types, one enum per layer.

use thiserror::Error;

use crate::types::{LogIndex, NodeId, Term};

/// Input the engine refused. The engine's state is unchanged by the refused
/// part of the message; the caller logs it and keeps serving.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StepError {
    #[error("malformed {kind} from node {from}: {reason}")]
    Malformed {
        from: NodeId,
        kind: &'static str,
        reason: &'static str,
    },
    #[error("node {from} sent entries that conflict with committed index {index}")]
    ConflictsWithCommitted { from: NodeId, index: LogIndex },
    #[error("node {from} claims leadership of term {term}, which already has a leader")]
    TwoLeaders { from: NodeId, term: Term },
    #[error("message from node {from}, which is this node")]
    FromSelf { from: NodeId },
}

/// The state handed to [`crate::Engine::new`] contradicts itself (corrupt or
/// mismatched storage). The node must not start.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RecoveryError {
    #[error("log entry {index} is out of sequence (expected index {expected})")]
    Gap { index: LogIndex, expected: LogIndex },
    #[error("log entry {index} has term {term}, lower than the entry before it")]
    TermRegression { index: LogIndex, term: Term },
    #[error("log entry {index} has term {term}, newer than the saved term {saved}")]
    TermFromFuture {
        index: LogIndex,
        term: Term,
        saved: Term,
    },
    #[error("state machine applied index {applied} but the log ends at {last}")]
    AppliedPastLog { applied: LogIndex, last: LogIndex },
    #[error("state machine applied {applied}, older than its own snapshot at {snapshot}")]
    AppliedBeforeSnapshot {
        applied: LogIndex,
        snapshot: LogIndex,
    },
    #[error(
        "state machine applied only up to {applied}, but the log starts at {first} and no snapshot covers the gap"
    )]
    AppliedBeforeLogStart { applied: LogIndex, first: LogIndex },
    #[error("state machine applied entry {applied} whose term differs from the log's")]
    AppliedMismatch { applied: LogIndex },
}

/// Why `initialize` refused to bootstrap this node.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum InitializeError {
    #[error(
        "node already has state (term {term}, last log index {last_index}); it recovers instead"
    )]
    NotPristine { term: Term, last_index: LogIndex },
    #[error("the initial membership has no voters")]
    NoVoters,
}

/// A request that must be served by the leader reached another node.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("not the leader; leader is {leader_id:?}")]
pub struct NotLeader<N> {
    pub leader_id: Option<NodeId>,
    pub leader_node: Option<N>,
}

/// Why a membership change was refused. Nothing was proposed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MembershipError {
    /// Only one change at a time (§4.3 of the thesis): the configuration
    /// at `index` is joint or not yet committed.
    #[error("a membership change is in progress (configuration at index {index} is not final yet)")]
    InProgress { index: LogIndex },
    #[error("the new configuration has no voters")]
    NoVoters,
    /// Replacing every voter at once would hand the cluster to nodes that
    /// never voted in it; change a few at a time.
    #[error("the new configuration keeps none of the current voters")]
    NoCurrentVoter,
    #[error("node {0} is not a member; add it as a learner first")]
    UnknownNode(NodeId),
    #[error("node {0} is already a member")]
    AlreadyMember(NodeId),
    #[error("node {0} votes; remove it with change_membership")]
    IsVoter(NodeId),
}
