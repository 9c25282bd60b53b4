//! A deterministic cluster simulator.
//!
//! N engines in one process on virtual time. The simulated network delays,
//! drops, duplicates and reorders messages and can partition links (both
//! ways or one way). Each node runs its engine through the same
//! [`Executor`] as the tokio driver: one input at
//! a time, the log and state-machine operations it hands out on two workers
//! that take (virtual) time, each in order. By default
//! ([`SimOptions::pipelined`]) the lanes proceed side by side and the node
//! keeps taking inputs meanwhile, as the driver does; otherwise one
//! operation runs at a time and inputs wait, as the old single-loop driver
//! did. A crash loses whatever storage operation was in progress (an append
//! may leave a prefix) and all volatile state; a restart recovers from what
//! was durable.
//!
//! A run is a function of its seed. After every step the simulator checks
//! Raft's safety properties and panics, naming the seed, if one breaks:
//! - Election Safety: at most one leader per term;
//! - Log Matching: an entry id determines its predecessor and payload;
//! - Leader Completeness: a new leader holds every committed entry;
//! - State Machine Safety: no two nodes apply different entries at an index;
//! - terms never go backwards (even across restarts); commit and applied
//!   never go backwards within a run of a node; committed entries never change;
//! - a node never grants two different candidates its vote in one term.
//!
//! Client operations (put, get via ReadIndex, compare-and-set) are recorded
//! and checked for linearizability with [`linearizability::check`].
//!
//! This file holds the cluster, its queries and the event loop; `faults.rs`
//! the faults a test injects, `clients.rs` the simulated clients,
//! `safety.rs` the checks above, `node.rs` one node's executor and storage
//! model, `monitor.rs` the properties followed across the whole run.

mod app;
mod clients;
mod faults;
pub mod linearizability;
mod monitor;
mod node;
mod safety;

/// The seeded generator the simulator draws from, for tests and tools that
/// want their own runs to be a function of a seed too.
pub use crate::engine::rng::Rng;
pub use app::SimApp;
pub use monitor::{Coverage, Reach};

/// The `p` quantile (0.0 to 1.0) of `sorted` (ascending): the value below
/// which a fraction `p` of them lie, by the nearest-rank rule; `None` if
/// there are none. The one percentile helper of the workspace's benches
/// and tools.
///
/// ```
/// let latencies = [3, 5, 8, 13, 21, 34, 55, 89, 144, 233];
/// assert_eq!(raft_core::sim::quantile(&latencies, 0.5), Some(34));
/// assert_eq!(raft_core::sim::quantile(&latencies, 0.99), Some(233));
/// assert_eq!(raft_core::sim::quantile::<u32>(&[], 0.5), None);
/// ```
pub fn quantile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1));
    sorted.get(i).copied()
}

use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};

use crate::config::Config;
use crate::engine::{Engine, ProposeError, RecoveredState};
use crate::executor::{Callers, Executor, LogOp, Mode, SmOp};
use crate::memory::kv::KvConfig;
use crate::message::{Message, SnapshotMeta};
use crate::types::{
    Entry, EntryPayload, HardState, LogId, LogIndex, Membership, NodeId, NodeUuid, Term, TypeConfig,
};

use self::linearizability::{OpKind, OpOutput, Operation};

/// The simulator's callers: client operations by number; requests are
/// answered with messages, never through a handle.
pub(crate) enum SimCallers {}

impl Callers for SimCallers {
    type Write = usize;
    type Read = usize;
    /// The node that sent the request.
    type Rpc = NodeId;
}

/// How the simulated network behaves on every link.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// Least virtual time a message takes.
    pub min_delay_ms: u64,
    /// Most virtual time a message takes.
    pub max_delay_ms: u64,
    /// Probability a request is dropped.
    pub request_loss: f64,
    /// Probability a response is dropped.
    pub response_loss: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
}

impl Default for NetOptions {
    fn default() -> Self {
        NetOptions {
            min_delay_ms: 1,
            max_delay_ms: 5,
            request_loss: 0.0,
            response_loss: 0.0,
            duplicate: 0.0,
        }
    }
}

/// Everything a simulation run depends on.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// How many nodes.
    pub nodes: usize,
    /// The seed the whole run follows from.
    pub seed: u64,
    /// Every node's configuration.
    pub config: Config,
    /// The network's behaviour between every pair of nodes.
    pub net: NetOptions,
    /// Virtual time one storage action takes, uniformly in `[min, max]`.
    pub disk_latency_ms: (u64, u64),
    /// Virtual time one apply batch (or snapshot chunk read or write) takes
    /// on the state machine, uniformly in `[min, max]`.
    pub apply_latency_ms: (u64, u64),
    /// Virtual time a snapshot build or install takes per KiB of state, on
    /// top of one storage action's latency: a large state's snapshot takes
    /// long to write and to load, as RocksDB's does (0: no extra time).
    pub snapshot_ms_per_kib: u64,
    /// Probability that a storage action fails; the node then stops
    /// (fail-stop) as a real driver does on a storage error.
    pub storage_error_rate: f64,
    /// How often every node is ticked.
    pub tick_ms: u64,
    /// A client gives up on an operation after this long; its outcome is
    /// then unknown.
    pub op_timeout_ms: u64,
    /// The test name to print in the replay command.
    pub test_name: String,
    /// Whether a node keeps taking inputs while storage operations are in
    /// flight and runs its log and state-machine lanes side by side, as the
    /// driver does (the default); otherwise one operation at a time, inputs
    /// waiting, as a single loop does.
    pub pipelined: bool,
}

impl SimOptions {
    /// A run of `nodes` nodes from `seed`, snapshots off and a quiet network.
    pub fn new(nodes: usize, seed: u64) -> Self {
        SimOptions {
            nodes,
            seed,
            config: Config {
                snapshot_every: 0,
                ..Config::default()
            },
            net: NetOptions::default(),
            disk_latency_ms: (0, 1),
            apply_latency_ms: (0, 0),
            snapshot_ms_per_kib: 0,
            storage_error_rate: 0.0,
            tick_ms: 5,
            op_timeout_ms: 1_500,
            test_name: String::new(),
            pipelined: true,
        }
    }
}

/// The durable part of a node: what survives a crash.
#[derive(Clone, Debug)]
pub struct Disk<C: TypeConfig = KvConfig> {
    /// The saved term and vote.
    pub hard_state: HardState,
    /// The last purged entry.
    pub base: LogId,
    /// The entries after `base`.
    pub entries: Vec<Entry<C>>,
    /// The current snapshot's meta and bytes.
    pub snapshot: Option<(SnapshotMeta<C>, Vec<u8>)>,
    /// The snapshot the last build replaced, readable by a transfer until
    /// the next build or install (the `StateMachine` contract).
    pub previous_snapshot: Option<(SnapshotMeta<C>, Vec<u8>)>,
}

impl<C: TypeConfig> Default for Disk<C> {
    fn default() -> Self {
        Disk {
            hard_state: HardState::default(),
            base: LogId::ZERO,
            entries: Vec::new(),
            snapshot: None,
            previous_snapshot: None,
        }
    }
}

impl<C: TypeConfig> Disk<C> {
    /// The entries `from ..= to` the log holds.
    pub fn read(&self, from: LogIndex, to: LogIndex) -> Vec<Entry<C>> {
        let first = self.base.index.next();
        let start = from.max(first);
        let end = to.min(first.plus(self.entries.len() as u64).prev());
        if start > end {
            return Vec::new();
        }
        let s = (start.0 - first.0) as usize;
        let e = (end.0 - first.0) as usize;
        self.entries[s..=e].to_vec()
    }
}

enum Input<C: SimApp> {
    Message {
        from: NodeId,
        msg: Message<C>,
    },
    Tick,
    Propose {
        op: usize,
        cmd: C::Command,
    },
    Read {
        op: usize,
    },
    Membership(MembershipChange),
    Transfer(NodeId),
    /// Start an election now, skipping pre-vote.
    Campaign,
}

/// A crash armed to fire at a chosen moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArmedCrash {
    /// When the current (or next) storage action completes, before the
    /// actions after it run.
    AfterPersist,
    /// When the next append of several entries starts.
    MidAppend,
}

/// A membership change a test asks the leader for.
#[derive(Clone, Debug)]
pub enum MembershipChange {
    /// Add a learner.
    AddLearner(NodeId),
    /// Remove a learner.
    RemoveLearner(NodeId),
    /// Make these the voters (joint consensus).
    Voters(BTreeSet<NodeId>),
    /// Move a voter to the learners (joint consensus); if an earlier try
    /// was finished by another leader, which removed it, add it back as a
    /// learner, as `Raft::demote_voter` does.
    Demote(NodeId),
}

struct Node<C: SimApp> {
    id: NodeId,
    /// The node's executor (and engine); `None` while it is down.
    x: Option<Executor<C, SimCallers>>,
    /// Bumped on every crash so completions of lost storage actions are ignored.
    epoch: u64,
    disk: Disk<C>,
    /// The disks this node had before each wipe ([`Sim::wipe`]): what its
    /// earlier identities acknowledged holding. A leader that heard an
    /// acknowledgement before the wipe may still count it.
    wiped_disks: Vec<Disk<C>>,
    sm: C::State,
    staging: Vec<u8>,
    inbox: VecDeque<Input<C>>,
    /// Log operations handed out, in order; the first runs when `log_busy`.
    log_worker: VecDeque<LogOp<C>>,
    log_busy: bool,
    /// Log operations handed out and completed since the last restart.
    log_handed: u64,
    log_done_count: u64,
    /// Replies waiting on the log lane: (log operations that must be done
    /// first, to, message).
    log_replies: VecDeque<(u64, NodeId, Message<C>)>,
    /// State-machine operations handed out, in order; likewise.
    sm_worker: VecDeque<SmOp<C, usize>>,
    sm_busy: bool,
    /// A snapshot being written beside the applies, as the driver runs
    /// `begin_snapshot`'s future: its view was taken when the build reached
    /// the head of the worker; until `BuildDone` only applies pass it.
    building: Option<(SnapshotMeta<C>, Vec<u8>)>,
    commit_seen: LogIndex,
    applied_seen: LogIndex,
    term_seen: Term,
    was_leader: bool,
    /// The configuration in force at the last check (the one a commit in
    /// the next step is counted under).
    membership_seen: Membership<C::Node>,
    /// Stopped by a storage error; stays down until restarted.
    failed: bool,
    /// A crash armed to fire at a moment that matters.
    armed_crash: Option<ArmedCrash>,
    /// This node's own storage latency, overriding `opts.disk_latency_ms`.
    disk_latency_ms: Option<(u64, u64)>,
    /// Paused (a stopped process, a starved CPU) until this time: it takes
    /// no input and fires no timer; messages queue up for it.
    paused_until: u64,
}

impl<C: SimApp> Node<C> {
    fn engine(&self) -> Option<&Engine<C>> {
        self.x.as_ref().map(Executor::engine)
    }
}

#[derive(Debug)]
enum EventKind<C: TypeConfig> {
    Deliver {
        from: NodeId,
        to: NodeId,
        msg: Message<C>,
    },
    Tick,
    /// The log operation at the head of a node's log worker is done.
    LogDone {
        node: usize,
        epoch: u64,
    },
    /// Likewise for its state-machine worker.
    SmDone {
        node: usize,
        epoch: u64,
    },
    /// The snapshot a node is building beside its applies is durable.
    BuildDone {
        node: usize,
        epoch: u64,
    },
    /// A paused node resumes.
    Resume {
        node: usize,
    },
}

/// A client operation in the history, with its current outcome.
#[derive(Clone, Debug)]
struct OpRecord {
    client: usize,
    /// The node the operation was sent to.
    node: usize,
    key: String,
    kind: OpKind,
    invoke: u64,
    state: OpState,
}

#[derive(Clone, Debug, PartialEq)]
enum OpState {
    Pending,
    Ok(u64, OpOutput),
    /// Definitely did not take effect; left out of the history.
    Failed,
    Unknown,
}

struct Client {
    target: usize,
    current: Option<usize>,
    next_at: u64,
    seq: u64,
}

/// Counters a test can print or assert on.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Messages handed to the network.
    pub messages_sent: u64,
    /// Messages the network lost.
    pub messages_dropped: u64,
    /// Client operations that succeeded.
    pub ops_ok: u64,
    /// Client operations that definitely failed.
    pub ops_failed: u64,
    /// Client operations whose outcome is unknown (timed out).
    pub ops_unknown: u64,
    /// Node crashes injected.
    pub crashes: u64,
    /// Crashes that also wiped the node's storage ([`Sim::wipe`]).
    pub wipes: u64,
    /// Elections won.
    pub elections_won: u64,
    /// Snapshots installed by followers.
    pub snapshots_installed: u64,
    /// AppendEntries refused by followers.
    pub append_rejections: u64,
}

/// The simulated cluster.
pub struct Sim<C: SimApp = KvConfig> {
    /// What the run was started with.
    pub opts: SimOptions,
    rng: Rng,
    now: u64,
    seq: u64,
    queue: BinaryHeap<Reverse<(u64, u64)>>,
    events: HashMap<u64, EventKind<C>>,
    nodes: Vec<Node<C>>,
    blocked: HashSet<(NodeId, NodeId)>,
    /// Per-link overrides of `opts.net`.
    links: HashMap<(NodeId, NodeId), NetOptions>,
    // Safety bookkeeping.
    leaders: BTreeMap<Term, NodeId>,
    entry_ids: HashMap<LogId, (Term, u64)>,
    committed: BTreeMap<LogIndex, LogId>,
    /// Every vote granted: (voter, the voter's identity, term) ->
    /// candidate. A voter whose storage was wiped is a new identity, with
    /// votes of its own.
    votes: HashMap<(NodeId, NodeUuid, Term), NodeId>,
    // Clients.
    ops: Vec<OpRecord>,
    clients: Vec<Client>,
    keys: Vec<String>,
    clients_running: bool,
    /// The engine's answer to the last `Input::Membership`.
    change_result: Option<Result<LogId, ProposeError<C::Node>>>,
    /// For each read a leader took: the highest index committed anywhere
    /// when it did (thesis §6.4: the read must reflect at least that).
    read_floor: HashMap<usize, LogIndex>,
    coverage: Coverage,
    /// Counters of the run so far.
    pub stats: SimStats,
}

/// Pipelined nodes run the executor's lanes side by side; the others one
/// operation at a time, as a single-loop driver does.
fn mode_of(opts: &SimOptions) -> Mode {
    if opts.pipelined {
        Mode::Pipelined
    } else {
        Mode::Serial
    }
}

/// The built-in key-value store's constructors: `Sim::new(opts)` needs no
/// type annotation.
impl Sim {
    /// A cluster of `opts.nodes` pristine nodes, all initialized with the
    /// same membership.
    pub fn new(opts: SimOptions) -> Sim {
        Sim::with_app(opts)
    }

    /// A cluster of `opts.nodes` nodes of which only `voters` are
    /// initialized (as the voters); the others are pristine and join when
    /// added as learners.
    pub fn with_voters(opts: SimOptions, voters: &[NodeId]) -> Sim {
        Sim::with_app_voters(opts, voters)
    }

    /// A cluster of pristine nodes that nobody has initialized.
    pub fn uninitialized(opts: SimOptions) -> Sim {
        Sim::uninitialized_app(opts)
    }
}

impl<C: SimApp> Sim<C> {
    /// [`Sim::new`] for application `C`.
    pub fn with_app(opts: SimOptions) -> Self {
        let all: Vec<NodeId> = (1..=opts.nodes as u64).map(NodeId).collect();
        Self::with_app_voters(opts, &all)
    }

    /// [`Sim::with_voters`] for application `C`.
    pub fn with_app_voters(opts: SimOptions, voters: &[NodeId]) -> Self {
        let mut sim = Self::uninitialized_app(opts);
        let members: BTreeMap<NodeId, C::Node> =
            voters.iter().map(|id| (*id, C::node(*id))).collect();
        for i in 0..sim.nodes.len() {
            if !members.contains_key(&sim.nodes[i].id) {
                continue;
            }
            let m = Membership::new_voters(members.clone());
            if let Some(x) = sim.nodes[i].x.as_mut() {
                x.engine_mut()
                    .initialize(m)
                    .expect("pristine node initializes");
            }
            sim.process(i);
        }
        // Bootstrap completes (as `Raft::initialize` does) once the first
        // configuration is durable everywhere.
        sim.run_until(1_000, |s| {
            s.nodes
                .iter()
                .filter(|n| members.contains_key(&n.id))
                .all(|n| !n.disk.entries.is_empty())
        });
        sim
    }

    /// [`Sim::uninitialized`] for application `C`.
    pub fn uninitialized_app(opts: SimOptions) -> Self {
        let mut rng = Rng::new(opts.seed);
        let nodes = (0..opts.nodes)
            .map(|i| {
                let id = NodeId(i as u64 + 1);
                let engine = Engine::new(
                    id,
                    opts.config.clone(),
                    rng.next_u64(),
                    0,
                    RecoveredState::default(),
                )
                .expect("empty state recovers");
                Node {
                    id,
                    x: Some(Executor::new(engine, LogIndex(0), mode_of(&opts))),
                    epoch: 0,
                    disk: Disk::default(),
                    wiped_disks: Vec::new(),
                    sm: C::State::default(),
                    staging: Vec::new(),
                    inbox: VecDeque::new(),
                    log_worker: VecDeque::new(),
                    log_handed: 0,
                    log_done_count: 0,
                    log_replies: VecDeque::new(),
                    log_busy: false,
                    sm_worker: VecDeque::new(),
                    sm_busy: false,
                    building: None,
                    commit_seen: LogIndex(0),
                    applied_seen: LogIndex(0),
                    term_seen: Term(0),
                    was_leader: false,
                    membership_seen: Membership::default(),
                    failed: false,
                    armed_crash: None,
                    disk_latency_ms: None,
                    paused_until: 0,
                }
            })
            .collect();
        let mut sim = Sim {
            rng,
            now: 0,
            seq: 0,
            queue: BinaryHeap::new(),
            events: HashMap::new(),
            nodes,
            blocked: HashSet::new(),
            links: HashMap::new(),
            leaders: BTreeMap::new(),
            entry_ids: HashMap::new(),
            committed: BTreeMap::new(),
            votes: HashMap::new(),
            ops: Vec::new(),
            clients: Vec::new(),
            keys: Vec::new(),
            clients_running: false,
            change_result: None,
            read_floor: HashMap::new(),
            coverage: Coverage::default(),
            stats: SimStats::default(),
            opts,
        };
        let t = sim.opts.tick_ms;
        sim.schedule(t, EventKind::Tick);
        sim
    }

    // ------------------------------------------------------------- queries

    /// Virtual time now, in milliseconds.
    pub fn now(&self) -> u64 {
        self.now
    }
    /// Every node's id.
    pub fn ids(&self) -> Vec<NodeId> {
        self.nodes.iter().map(|n| n.id).collect()
    }
    /// A node's engine, if the node is up.
    pub fn engine(&self, id: NodeId) -> Option<&Engine<C>> {
        self.nodes[self.idx(id)].engine()
    }
    /// Whether a node is up (not crashed).
    pub fn is_up(&self, id: NodeId) -> bool {
        self.nodes[self.idx(id)].x.is_some()
    }
    /// A node's durable state.
    pub fn disk(&self, id: NodeId) -> &Disk<C> {
        &self.nodes[self.idx(id)].disk
    }
    /// A node's state machine.
    pub fn state_machine(&self, id: NodeId) -> &C::State {
        &self.nodes[self.idx(id)].sm
    }
    /// Every live node that believes it leads, with its term.
    pub fn leaders(&self) -> Vec<(NodeId, Term)> {
        self.nodes
            .iter()
            .filter_map(|n| {
                n.engine()
                    .filter(|e| e.is_leader())
                    .map(|e| (n.id, e.term()))
            })
            .collect()
    }
    /// The leader of the highest term among live nodes, if one leads.
    pub fn leader(&self) -> Option<NodeId> {
        self.leaders()
            .into_iter()
            .max_by_key(|(_, t)| *t)
            .map(|(id, _)| id)
    }
    /// The highest commit index any node has reached.
    pub fn max_commit(&self) -> LogIndex {
        self.committed
            .keys()
            .next_back()
            .copied()
            .unwrap_or_default()
    }
    /// The entry id committed at `index`, as observed.
    pub fn committed_at(&self, index: LogIndex) -> Option<LogId> {
        self.committed.get(&index).copied()
    }

    fn idx(&self, id: NodeId) -> usize {
        (id.0 - 1) as usize
    }

    /// Panics with `what`, the seed and the command that replays it.
    pub fn fail(&self, what: String) -> ! {
        panic!(
            "simulation invariant violated at t={}ms: {what}\n  seed {seed}: replay with SIM_SEED={seed} cargo test -p raft-core --release {name}",
            self.now,
            seed = self.opts.seed,
            name = self.opts.test_name
        )
    }

    // ------------------------------------------------------------ running

    fn schedule(&mut self, after: u64, kind: EventKind<C>) {
        self.seq += 1;
        self.queue.push(Reverse((self.now + after, self.seq)));
        self.events.insert(self.seq, kind);
    }

    /// Runs until virtual time `now + ms`.
    pub fn run_for(&mut self, ms: u64) {
        let until = self.now + ms;
        self.run_until_time(until);
    }

    fn run_until_time(&mut self, until: u64) {
        while let Some(Reverse((at, _))) = self.queue.peek().copied() {
            if at > until {
                break;
            }
            self.step_event();
        }
        self.now = self.now.max(until);
    }

    /// Runs until `cond` holds or `max_ms` pass; returns the time it took.
    pub fn run_until(&mut self, max_ms: u64, mut cond: impl FnMut(&Self) -> bool) -> Option<u64> {
        let start = self.now;
        let until = self.now + max_ms;
        while !cond(self) {
            match self.queue.peek().copied() {
                Some(Reverse((at, _))) if at <= until => self.step_event(),
                _ => {
                    self.now = self.now.max(until);
                    return None;
                }
            }
        }
        Some(self.now - start)
    }

    /// Runs until one leader is in charge and every live node has applied
    /// everything it logged, within `max_ms`. Returns the time it took.
    pub fn converge(&mut self, max_ms: u64) -> Option<u64> {
        self.run_until(max_ms, |s| s.converged())
    }

    /// One line per node: role, term, log, commit, applied, queue lengths.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            match n.engine() {
                Some(e) => s.push_str(&format!(
                    "\n  node {}: {:?} term {} leader {:?} last {} base {} commit {} applied {} log ops {} sm ops {} inbox {} matched {:?}",
                    n.id,
                    e.role(),
                    e.term(),
                    e.leader_id(),
                    e.last_log_id(),
                    e.log().base(),
                    e.commit_index(),
                    C::applied(&n.sm),
                    n.log_worker.len(),
                    n.sm_worker.len(),
                    n.inbox.len(),
                    e.matched(),
                )),
                None => s.push_str(&format!("\n  node {}: down", n.id)),
            }
        }
        s
    }

    /// One leader for the highest term, and every live member's log, commit
    /// and state machine caught up with it.
    pub fn converged(&self) -> bool {
        let Some(l) = self.leader() else { return false };
        let le = self.engine(l).expect("leader is live");
        let last = le.last_log_id();
        if le.commit_index() != last.index || le.log().term_at(last.index) != Some(le.term()) {
            return false;
        }
        let members = &le.membership().nodes;
        self.nodes
            .iter()
            .filter(|n| members.contains_key(&n.id))
            .filter_map(|n| n.engine().map(|e| (n, e)))
            .all(|(n, e)| {
                e.term() == le.term()
                    && e.last_log_id() == last
                    && e.commit_index() == last.index
                    && C::applied(&n.sm).index == last.index
                    && n.x.as_ref().is_some_and(|x| x.idle())
            })
    }

    fn send(&mut self, from: NodeId, to: NodeId, msg: Message<C>) {
        self.stats.messages_sent += 1;
        let net = self
            .links
            .get(&(from, to))
            .unwrap_or(&self.opts.net)
            .clone();
        let loss = if msg.is_request() || matches!(msg, Message::TimeoutNow(_)) {
            net.request_loss
        } else {
            net.response_loss
        };
        if loss > 0.0 && self.rng.chance(loss) {
            self.stats.messages_dropped += 1;
            return;
        }
        let copies = if net.duplicate > 0.0 && self.rng.chance(net.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = self.rng.range(net.min_delay_ms, net.max_delay_ms + 1);
            self.schedule(
                delay,
                EventKind::Deliver {
                    from,
                    to,
                    msg: msg.clone(),
                },
            );
        }
    }
}
