//! What the executor hands its runtime, and what it answers callers with.

use super::*;

/// The handles a runtime uses to answer its callers.
pub trait Callers {
    /// Answers a client write.
    type Write;
    /// Answers a linearizable read.
    type Read;
    /// Answers a peer's request.
    type Rpc;
}

/// How operations of different lanes may overlap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// One operation at a time across the log and state machine.
    Serial,
    /// The log, the state machine and the network proceed side by side,
    /// each in order, waiting only for what they depend on.
    Pipelined,
}

/// Why a write did not (or may not have) happened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WriteError<N> {
    /// This node does not lead; nothing was proposed.
    #[error(transparent)]
    NotLeader(#[from] NotLeader<N>),
    /// Leadership is being handed over; nothing was proposed.
    #[error("a leadership transfer is in progress; retry shortly")]
    TransferInProgress,
    /// The membership change was refused; nothing was proposed.
    #[error("membership change refused: {0}")]
    Membership(#[from] MembershipError),
    /// Another entry was committed at the proposal's index (or a newer
    /// proposal took its index): it was definitely not applied.
    #[error("proposal was superseded by another leader's entry; it was not applied")]
    Dropped,
    /// It may or may not have been applied (a snapshot covered it).
    #[error("outcome of the proposal is unknown")]
    Unknown,
}

impl<N> From<ProposeError<N>> for WriteError<N> {
    fn from(e: ProposeError<N>) -> Self {
        match e {
            ProposeError::NotLeader(nl) => WriteError::NotLeader(nl),
            ProposeError::TransferInProgress => WriteError::TransferInProgress,
            ProposeError::Membership(m) => WriteError::Membership(m),
        }
    }
}

/// An answer for a caller.
pub enum Done<C: TypeConfig, K: Callers> {
    /// The write failed (or its outcome is unknown). Writes that succeed
    /// are answered by the state-machine worker ([`SmOp::Apply`]).
    Write(K::Write, WriteError<C::Node>),
    /// The read may be served: the state machine has applied its index.
    Read(K::Read, Result<LogIndex, NotLeader<C::Node>>),
    /// A request from `from` that was held back (see "Reordered appends")
    /// was refused when its turn came, as [`Executor::step`] refuses one
    /// at once.
    Refused {
        /// The sender.
        from: NodeId,
        /// The request's reply handle, if it came with one.
        reply: Option<K::Rpc>,
        /// Why it was refused.
        error: StepError,
    },
}

/// An operation on the `LogStore`, in the engine's order.
#[derive(Clone, Debug, PartialEq)]
pub enum LogOp<C: TypeConfig> {
    /// Make the term and vote durable.
    SaveHardState(HardState),
    /// Make these entries durable at the end of the log.
    Append(Vec<Entry<C>>),
    /// Durably delete the entries at `from` and after.
    Truncate {
        /// The first index deleted.
        from: LogIndex,
    },
    /// Durably delete the entries up to and including `upto`.
    Purge {
        /// The last entry deleted.
        upto: LogId,
    },
    /// Read the entries `from ..= to` (clipped to what the log holds) and
    /// report them with [`Executor::log_read`]. Needs no sync.
    Read {
        /// The first index to read.
        from: LogIndex,
        /// The last index to read.
        to: LogIndex,
    },
}

/// An operation on the `StateMachine`, in the engine's order. (The
/// state-machine actions of [`Action`], as their own type so a worker's
/// match is exhaustive.) `W` is the runtime's write handle
/// ([`Callers::Write`]).
#[derive(Clone, Debug, PartialEq)]
pub enum SmOp<C: TypeConfig, W> {
    /// Apply `entries` in order; then answer each write in `writes` (at the
    /// position of its entry) with `Ok((entry.log_id, response))`, and
    /// report how many responses the state machine gave with
    /// [`Executor::applied_batch`]. The worker answers the writes itself,
    /// so a client hears of its write one task hand-off sooner; if the
    /// state machine gave the wrong number of responses it answers none.
    Apply {
        /// The committed entries, following the last applied.
        entries: Vec<Entry<C>>,
        /// One slot per entry: the handle of the write that proposed it,
        /// where this node did and still waits.
        writes: Vec<Option<W>>,
    },
    /// Report with [`Executor::snapshot_built`].
    BuildSnapshot,
    /// Read up to `Config::snapshot_chunk_bytes` at `offset` of snapshot
    /// `meta.id` and make it an InstallSnapshot request to `to` in `term`;
    /// report with [`Executor::snapshot_chunk_read`].
    ReadSnapshotChunk {
        /// The follower.
        to: NodeId,
        /// The term to send the request in.
        term: Term,
        /// The snapshot.
        meta: SnapshotMeta<C>,
        /// Where in it the chunk starts.
        offset: u64,
    },
    /// Store a received chunk; report with
    /// [`Executor::snapshot_chunk_written`].
    WriteSnapshotChunk {
        /// The snapshot it belongs to.
        meta: SnapshotMeta<C>,
        /// Where in it the chunk starts.
        offset: u64,
        /// The chunk's bytes.
        data: Vec<u8>,
    },
    /// Replace the state machine with the received snapshot; report with
    /// [`Executor::snapshot_installed`].
    InstallSnapshot {
        /// The snapshot, whole and durable by now.
        meta: SnapshotMeta<C>,
    },
}

/// Work for the runtime. Log and state-machine operations are handed out in
/// order and must be carried out in that order, each reported done with
/// [`Executor::log_done`] or the state-machine reports; sends may go out at
/// once and need no report.
pub enum Io<C: TypeConfig, K: Callers> {
    /// The next operation of the log lane.
    Log(LogOp<C>),
    /// The next operation of the state-machine lane.
    Sm(SmOp<C, K::Write>),
    /// A message to a peer, to send at once.
    Send {
        /// The peer.
        to: NodeId,
        /// The message.
        msg: Message<C>,
    },
    /// The reply to a request that came with a handle (see
    /// [`Executor::step`]); requests stepped without one are answered with
    /// a plain `Send`.
    Reply {
        /// The request's reply handle.
        to: K::Rpc,
        /// The answer.
        msg: Message<C>,
    },
    /// A reply that may leave once every log operation handed out before it
    /// is durable (pipelined mode only). The runtime queues it behind them
    /// on its log lane and sends it when they are done, without waiting for
    /// the executor to hear of it: a follower's acknowledgement leaves one
    /// task hand-off sooner. Carrying it out is no report of its own.
    ReplyAfterLog {
        /// The request's reply handle.
        to: K::Rpc,
        /// The answer.
        msg: Message<C>,
    },
}
