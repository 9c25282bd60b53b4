//! The RPCs nodes exchange (Figure 2 plus pre-vote, fast backtracking hints,
//! chunked snapshots and TimeoutNow).

use serde::{Deserialize, Serialize};

use crate::types::{Entry, LogId, LogIndex, Membership, NodeId, NodeUuid, Term, TypeConfig};

/// AppendEntries (§5.3); also the heartbeat when `entries` is empty.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct AppendEntriesRequest<C: TypeConfig> {
    /// The leader's term.
    pub term: Term,
    /// The leader, so followers can redirect clients.
    pub leader_id: NodeId,
    /// The entry immediately before `entries`; the follower must hold it.
    pub prev_log_id: LogId,
    /// Entries to store after `prev_log_id` (empty for a heartbeat).
    pub entries: Vec<Entry<C>>,
    /// The leader's commit index.
    pub leader_commit: LogIndex,
    /// The leader's heartbeat round, echoed back; confirms leadership for
    /// ReadIndex reads.
    pub round: u64,
    /// Where the leader's log begins: what it kept behind its snapshot for
    /// followers that lag. A follower purges no further, so that whichever
    /// node leads next still holds what those followers need, instead of
    /// sending each of them a snapshot.
    pub keep_from: LogIndex,
}

/// Where a follower's log diverges, so the leader skips a whole term per
/// round trip instead of one entry (the "fast backup" of §5.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConflictHint {
    /// The term of the follower's entry at `prev_log_id.index`, if it has one.
    pub term: Option<Term>,
    /// The follower's first index of `term`, or its last index + 1 when its
    /// log is too short.
    pub index: LogIndex,
}

/// A follower's answer to an [`AppendEntriesRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendEntriesResponse {
    /// The follower's term, for the leader to update itself.
    pub term: Term,
    /// The follower holds `prev_log_id` and stored the entries.
    pub success: bool,
    /// On success: the index of the last entry now known to match the
    /// leader's. On failure: the `prev_log_id.index` that was rejected.
    pub index: LogIndex,
    /// On a refusal, where the logs part, so the leader can skip back a
    /// term at a time.
    pub conflict: Option<ConflictHint>,
    /// The request's `round`, echoed.
    pub round: u64,
    /// The follower's identity: the leader counts the acknowledgement only
    /// if the membership recognizes it ([`Membership::recognizes`]).
    pub uuid: NodeUuid,
}

/// RequestVote (§5.2), or a pre-vote probe (thesis §9.6) that changes no
/// state on the receiver.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRequest {
    /// For a pre-vote, the term the candidate would campaign in.
    pub term: Term,
    /// The candidate asking for the vote.
    pub candidate_id: NodeId,
    /// The candidate's last entry, for the up-to-date check (§5.4.1).
    pub last_log_id: LogId,
    /// A pre-vote (thesis §9.6): asks whether a vote would be granted, changing no one's term.
    pub pre_vote: bool,
    /// Set when the campaign follows a leadership transfer, so receivers
    /// that still hear from the old leader vote anyway.
    pub transfer: bool,
    /// The candidate's identity: a voter refuses a candidate its
    /// membership does not recognize (its storage was wiped).
    pub candidate_uuid: NodeUuid,
}

/// A voter's answer to a [`VoteRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteResponse {
    /// The voter's term.
    pub term: Term,
    /// The vote (or pre-vote) is granted.
    pub granted: bool,
    /// The request was a pre-vote.
    pub pre_vote: bool,
    /// The voter's identity: a grant counts only if the candidate's
    /// membership recognizes it.
    pub voter_uuid: NodeUuid,
}

/// Describes one snapshot: the last entry it covers and the configuration as
/// of that entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct SnapshotMeta<C: TypeConfig> {
    /// The last entry the snapshot covers.
    pub last_log_id: LogId,
    /// The membership as of `last_log_id`.
    pub membership: Membership<C::Node>,
    /// Unique per snapshot built by the state machine; chunk reads name it.
    pub id: u64,
    /// Bytes of the snapshot's data, what a follower receives (an estimate
    /// is fine; 0 if unknown). The snapshot policy weighs the log written
    /// since the snapshot against it ([`crate::Config::snapshot_log_percent`]),
    /// so that a large state is not rewritten every `snapshot_every` entries.
    pub size: u64,
}

/// One chunk of a snapshot (§7, "InstallSnapshot RPC"). A leader keeps a
/// window of chunks in flight (`Config::snapshot_window`), so chunks may
/// arrive out of order; the follower writes them in order. `offset` 0 of a
/// new snapshot starts a new transfer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct InstallSnapshotRequest<C: TypeConfig> {
    /// The leader's term.
    pub term: Term,
    /// The leader.
    pub leader_id: NodeId,
    /// Which snapshot this chunk belongs to.
    pub meta: SnapshotMeta<C>,
    /// Where in the snapshot the chunk's bytes start.
    pub offset: u64,
    /// Encoded as one byte string, not a sequence of bytes: a 1 MiB chunk
    /// is a copy, not a million calls.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
    /// This chunk is the snapshot's last.
    pub done: bool,
    /// CRC-32 (IEEE) of `data`, computed where the chunk was read. A chunk
    /// that does not match is refused before anything is written, so a
    /// byte flipped between the sender's disk and ours is never installed.
    pub checksum: u32,
}

impl<C: TypeConfig> InstallSnapshotRequest<C> {
    /// A chunk of `data` at `offset`, with its checksum.
    pub fn chunk(
        term: Term,
        leader_id: NodeId,
        meta: SnapshotMeta<C>,
        offset: u64,
        data: Vec<u8>,
        done: bool,
    ) -> Self {
        let checksum = crc32fast::hash(&data);
        InstallSnapshotRequest {
            term,
            leader_id,
            meta,
            offset,
            data,
            done,
            checksum,
        }
    }

    /// Whether `data` matches `checksum`.
    pub fn intact(&self) -> bool {
        crc32fast::hash(&self.data) == self.checksum
    }
}

/// The receiver's answer to an [`InstallSnapshotRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstallSnapshotResponse {
    /// The receiver's term.
    pub term: Term,
    /// The id of the snapshot this answers.
    pub snapshot_id: u64,
    /// The offset the follower expects next; after the last chunk, the
    /// snapshot's length.
    pub next_offset: u64,
    /// The snapshot is installed.
    pub done: bool,
    /// The follower's identity, as in [`AppendEntriesResponse::uuid`].
    pub uuid: NodeUuid,
}

/// TimeoutNow (thesis §3.10): the leader asks the target to campaign at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeoutNowRequest {
    /// The leader's term.
    pub term: Term,
    /// The leader handing over.
    pub leader_id: NodeId,
}

/// Every message the engine consumes or produces.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum Message<C: TypeConfig> {
    /// Replicates entries, or says the leader is alive.
    AppendEntries(AppendEntriesRequest<C>),
    /// The answer to `AppendEntries`.
    AppendEntriesResponse(AppendEntriesResponse),
    /// Asks for a vote or pre-vote.
    Vote(VoteRequest),
    /// The answer to `Vote`.
    VoteResponse(VoteResponse),
    /// One chunk of a snapshot.
    InstallSnapshot(InstallSnapshotRequest<C>),
    /// The answer to `InstallSnapshot`.
    InstallSnapshotResponse(InstallSnapshotResponse),
    /// Tells a follower to campaign now (leadership transfer).
    TimeoutNow(TimeoutNowRequest),
}

impl<C: TypeConfig> Message<C> {
    /// The sender's term, carried on every message.
    pub fn term(&self) -> Term {
        match self {
            Message::AppendEntries(m) => m.term,
            Message::AppendEntriesResponse(m) => m.term,
            Message::Vote(m) => m.term,
            Message::VoteResponse(m) => m.term,
            Message::InstallSnapshot(m) => m.term,
            Message::InstallSnapshotResponse(m) => m.term,
            Message::TimeoutNow(m) => m.term,
        }
    }

    /// Whether this message is a request that expects exactly one response.
    /// (TimeoutNow is one-way.)
    pub fn is_request(&self) -> bool {
        matches!(
            self,
            Message::AppendEntries(_) | Message::Vote(_) | Message::InstallSnapshot(_)
        )
    }

    /// Short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::AppendEntries(_) => "append",
            Message::AppendEntriesResponse(_) => "append_resp",
            Message::Vote(m) if m.pre_vote => "pre_vote",
            Message::Vote(_) => "vote",
            Message::VoteResponse(_) => "vote_resp",
            Message::InstallSnapshot(_) => "snapshot",
            Message::InstallSnapshotResponse(_) => "snapshot_resp",
            Message::TimeoutNow(_) => "timeout_now",
        }
    }
}
