//! Vocabulary types: ids, terms, indices, log entries, membership.
//!
//! Terms, indices and node ids are distinct newtypes so that mixing a term
//! with an index is a compile error.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Identifies one member of the cluster. Chosen by the application; never 0
/// is not required, but ids must be unique and stable across restarts.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct NodeId(pub u64);

/// A Raft term (§5.1 of the Raft paper). Terms only ever grow.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Term(pub u64);

/// A position in the replicated log. Index 0 is "before the first entry".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct LogIndex(pub u64);

/// A node's identity: a random number drawn when its storage is first
/// used and kept with its hard state. [`NodeId`] names a seat in the
/// cluster; `NodeUuid` names the storage behind it. A node whose storage
/// was wiped comes back under its old id with a new uuid, and the cluster
/// (which records each member's uuid in its [`Membership`]) no longer counts
/// its votes or acknowledgements: it lost the promises it made (its vote,
/// the entries it acknowledged). `NodeUuid(0)` means "none yet".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct NodeUuid(pub u128);

impl NodeUuid {
    /// No identity: what a store written before identities existed holds.
    pub const NONE: NodeUuid = NodeUuid(0);

    /// Whether this is [`NodeUuid::NONE`].
    pub fn is_none(self) -> bool {
        self == NodeUuid::NONE
    }
}

impl fmt::Display for NodeUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl Term {
    /// The next term, or `None` if the term space is exhausted (a hostile
    /// peer can send `u64::MAX`; we refuse rather than wrap).
    pub fn next(self) -> Option<Term> {
        self.0.checked_add(1).map(Term)
    }
}

impl LogIndex {
    /// Before the first entry (entries start at 1).
    pub const ZERO: LogIndex = LogIndex(0);

    /// The index after this one.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0.saturating_add(1))
    }
    /// The index before this one (`ZERO` stays `ZERO`).
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }
    /// `n` indexes after this one.
    pub fn plus(self, n: u64) -> LogIndex {
        LogIndex(self.0.saturating_add(n))
    }
}

/// The identity of one log entry: the term it was created in and its index.
/// Two logs that contain an entry with the same `LogId` are identical up to
/// and including it (the Log Matching Property, §5.3).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LogId {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The entry's position in the log.
    pub index: LogIndex,
}

impl LogId {
    /// The id before the first entry.
    pub const ZERO: LogId = LogId {
        term: Term(0),
        index: LogIndex(0),
    };

    /// The id of the entry at `index` created in `term`.
    pub fn new(term: u64, index: u64) -> LogId {
        LogId {
            term: Term(term),
            index: LogIndex(index),
        }
    }
}

impl fmt::Display for LogId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.term.0, self.index.0)
    }
}

/// Orders log ids the way the election restriction compares logs (§5.4.1):
/// by last term, then by last index.
impl PartialOrd for LogId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for LogId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.term, self.index).cmp(&(other.term, other.index))
    }
}

/// The application's choice of types. Keep this small: a command, its
/// response and how a node is addressed.
///
/// ```
/// use raft_core::TypeConfig;
/// #[derive(Clone, Debug, PartialEq, Eq)]
/// struct MyApp;
/// impl TypeConfig for MyApp {
///     type Command = String;
///     type Response = usize;
///     type Node = String; // e.g. "10.0.0.1:7001"
/// }
/// ```
pub trait TypeConfig: Clone + fmt::Debug + PartialEq + Eq + Send + Sync + 'static {
    /// What clients propose; replicated in the log.
    type Command: Serialize
        + DeserializeOwned
        + Clone
        + fmt::Debug
        + PartialEq
        + Send
        + Sync
        + 'static;
    /// What the state machine answers for one applied command.
    type Response: Clone + fmt::Debug + Send + Sync + 'static;
    /// How to reach a node (an address); stored in membership entries.
    type Node: Serialize
        + DeserializeOwned
        + Clone
        + fmt::Debug
        + PartialEq
        + Eq
        + Send
        + Sync
        + 'static;

    /// Approximate encoded size of a command in bytes, used to cap the
    /// bytes per AppendEntries message. Override it for large commands.
    fn command_size(_command: &Self::Command) -> usize {
        std::mem::size_of::<Self::Command>()
    }
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub enum EntryPayload<C: TypeConfig> {
    /// The no-op a new leader appends at the start of its term (§8).
    Blank,
    /// An application command, shared: the leader's log cache, the
    /// `LogStore`, every AppendEntries that carries it and the apply hold
    /// one copy between them instead of one each. A state machine that
    /// wants it owned takes it with `Arc::unwrap_or_clone`. Encoded as the
    /// bare command: the `Arc` is not on the wire or on disk.
    Command(Arc<C::Command>),
    /// A cluster configuration; takes effect as soon as it is appended (§6).
    Membership(Membership<C::Node>),
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Entry<C: TypeConfig> {
    /// Where the entry sits, and which term's leader wrote it.
    pub log_id: LogId,
    /// What it carries.
    pub payload: EntryPayload<C>,
}

impl<C: TypeConfig> EntryPayload<C> {
    /// A command payload.
    pub fn command(command: C::Command) -> Self {
        EntryPayload::Command(Arc::new(command))
    }
}

impl<C: TypeConfig> Entry<C> {
    /// Bytes this entry adds to a replication message (approximate).
    pub fn size_hint(&self) -> usize {
        24 + match &self.payload {
            EntryPayload::Blank => 0,
            EntryPayload::Command(c) => C::command_size(c),
            EntryPayload::Membership(m) => 32 * m.nodes.len(),
        }
    }
}

/// The state that must survive a crash before a node answers a vote or an
/// append (Figure 2, "persistent state on all servers"): the current term and
/// who we voted for in it, and the node's identity.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// Whom this node voted for in `term`, if anyone.
    pub voted_for: Option<NodeId>,
    /// This node's identity, drawn at its first start ([`NodeUuid::NONE`]
    /// on a new store, or one written before identities existed).
    pub uuid: NodeUuid,
}

/// A cluster configuration: one voter set normally, two during a joint
/// consensus change (§6), plus the address of every member, voters and
/// learners alike. A node in `nodes` but in no voter set is a learner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership<N> {
    /// `[voters]`, or `[new_voters, old_voters]` while joint.
    pub configs: Vec<BTreeSet<NodeId>>,
    /// Every member's address, voters and learners alike.
    pub nodes: BTreeMap<NodeId, N>,
    /// The identity each member had when the leader first heard from it
    /// (keys are a subset of `nodes`). Votes and acknowledgements count
    /// only from a member that still has its recorded identity, or whose
    /// identity is not recorded yet; see [`Membership::recognizes`].
    pub uuids: BTreeMap<NodeId, NodeUuid>,
}

impl<N> Default for Membership<N> {
    fn default() -> Self {
        Membership {
            configs: Vec::new(),
            nodes: BTreeMap::new(),
            uuids: BTreeMap::new(),
        }
    }
}

impl<N> Membership<N> {
    /// Whether `id` speaking as `uuid` is the member this configuration
    /// knows: its identity is the recorded one, or none is recorded yet (a
    /// member the leader has not heard from since it joined, or a
    /// configuration written before identities existed). A member whose
    /// storage was wiped has a new identity and is not recognized: it lost
    /// its vote and the entries it acknowledged, so counting it again
    /// could elect two leaders in a term or lose a committed entry.
    pub fn recognizes(&self, id: NodeId, uuid: NodeUuid) -> bool {
        match self.uuids.get(&id) {
            Some(recorded) => *recorded == uuid,
            None => true,
        }
    }
}

impl<N: Clone> Membership<N> {
    /// A plain (non-joint) configuration in which every listed node votes.
    pub fn new_voters(nodes: BTreeMap<NodeId, N>) -> Self {
        let voters = nodes.keys().copied().collect();
        Membership {
            configs: vec![voters],
            nodes,
            uuids: BTreeMap::new(),
        }
    }

    /// Whether `id` votes in any of the configurations.
    pub fn is_voter(&self, id: NodeId) -> bool {
        self.configs.iter().any(|c| c.contains(&id))
    }

    /// Whether `id` is a member that receives the log but does not vote.
    pub fn is_learner(&self, id: NodeId) -> bool {
        self.nodes.contains_key(&id) && !self.is_voter(id)
    }

    /// Every voter of every configuration.
    pub fn voter_ids(&self) -> BTreeSet<NodeId> {
        self.configs.iter().flatten().copied().collect()
    }

    /// Members that receive the log but do not vote.
    pub fn learner_ids(&self) -> BTreeSet<NodeId> {
        let voters = self.voter_ids();
        self.nodes
            .keys()
            .filter(|id| !voters.contains(id))
            .copied()
            .collect()
    }

    /// Whether this is a joint configuration (old and new voters both
    /// decide, §6).
    pub fn is_joint(&self) -> bool {
        self.configs.len() > 1
    }
}
