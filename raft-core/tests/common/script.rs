//! A hand-cranked cluster of bare engines: instant, durable storage and a
//! network that delivers only when told. For cases where the exact
//! interleaving of messages is the point.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use raft_core::memory::kv::{KvCommand, KvConfig};
use raft_core::{
    Action, Config, Engine, Entry, HardState, LogId, LogIndex, Membership, Message, NodeId,
    NodeUuid, RecoveredState,
};

pub type C = KvConfig;

/// A put of `v` to the one key the scripts write.
pub fn put(v: &str) -> KvCommand {
    KvCommand::Put {
        key: "k".into(),
        value: v.into(),
    }
}

/// Five engines with instant, durable storage and a hand-cranked network.
pub struct Script {
    pub engines: BTreeMap<NodeId, Engine<C>>,
    pub disks: BTreeMap<NodeId, (HardState, Vec<Entry<C>>)>,
    pub queue: Vec<(NodeId, NodeId, Message<C>)>,
    /// Every (index -> entry id) any node ever reported committed.
    pub committed: BTreeMap<LogIndex, LogId>,
    pub clock: u64,
    /// Every engine's configuration.
    pub cfg: Config,
    /// Snapshot chunks the engines asked to send: (from, to, offset, clock,
    /// snapshot id). Not carried out: these scripts test when they are
    /// asked for.
    pub snapshot_sends: Vec<(NodeId, NodeId, u64, u64, u64)>,
    /// Snapshot builds the engines asked for: (node, applied index then).
    /// Not carried out either: a test reports them with `snapshot_built`.
    pub snapshot_builds: Vec<(NodeId, LogIndex)>,
    /// Reads the engines declared ready: (node, read, index).
    pub reads_ready: Vec<(NodeId, raft_core::ReadId, LogIndex)>,
    /// Entries the engines asked to read back from their disks: (node, for
    /// peer, from, to). Carried out at once unless `hold_reads` is set.
    pub reads_back: Vec<(NodeId, NodeId, LogIndex, LogIndex)>,
    pub hold_reads: bool,
    /// Nodes whose log writes wait in `held` until [`Script::release`]:
    /// a slow disk, one write at a time.
    pub holding: BTreeSet<NodeId>,
    pub held: BTreeMap<NodeId, VecDeque<Action<C>>>,
}

pub fn config() -> Config {
    Config {
        pre_vote: false,
        check_quorum: false,
        max_entries_per_message: 1,
        max_inflight: 1,
        ..Config::default()
    }
}

impl Script {
    pub fn new(n: u64) -> Script {
        Script::with_config(n, config())
    }

    /// `n` voters whose identities (node `i` is `NodeUuid(i)`) the first
    /// configuration already records, so that no leader appends a record
    /// of them and the scripts' indexes are Raft's alone.
    pub fn with_config(n: u64, cfg: Config) -> Script {
        Script::build(n, cfg, true)
    }

    /// As [`Script::with_config`], the first configuration recording no
    /// identity: the first leader records them.
    pub fn unrecorded(n: u64, cfg: Config) -> Script {
        Script::build(n, cfg, false)
    }

    fn build(n: u64, cfg: Config, recorded: bool) -> Script {
        let members: BTreeMap<NodeId, String> =
            (1..=n).map(|i| (NodeId(i), format!("n{i}"))).collect();
        let mut first = Membership::new_voters(members);
        if recorded {
            first.uuids = (1..=n).map(|i| (NodeId(i), NodeUuid(i.into()))).collect();
        }
        let mut s = Script {
            engines: BTreeMap::new(),
            disks: BTreeMap::new(),
            queue: Vec::new(),
            committed: BTreeMap::new(),
            clock: 0,
            cfg: cfg.clone(),
            snapshot_sends: Vec::new(),
            snapshot_builds: Vec::new(),
            reads_ready: Vec::new(),
            reads_back: Vec::new(),
            hold_reads: false,
            holding: BTreeSet::new(),
            held: BTreeMap::new(),
        };
        for i in 1..=n {
            let id = NodeId(i);
            let hard_state = HardState {
                uuid: NodeUuid(i.into()),
                ..HardState::default()
            };
            let state = RecoveredState {
                hard_state,
                ..RecoveredState::default()
            };
            let mut e = Engine::new(id, cfg.clone(), i, 0, state).unwrap();
            e.initialize(first.clone()).unwrap();
            s.disks.insert(id, (hard_state, Vec::new()));
            s.engines.insert(id, e);
            s.flush(id);
        }
        s
    }

    /// Carries out a node's actions at once (storage is instant here).
    pub fn flush(&mut self, id: NodeId) {
        loop {
            let Some(e) = self.engines.get_mut(&id) else {
                return;
            };
            let actions = e.take_actions();
            if actions.is_empty() {
                break;
            }
            for a in actions {
                let disk = self.disks.get_mut(&id).unwrap();
                match a {
                    Action::SaveHardState(hs) => disk.0 = hs,
                    Action::AppendLog { .. } | Action::TruncateLog { .. }
                        if self.holding.contains(&id) =>
                    {
                        self.held.entry(id).or_default().push_back(a);
                    }
                    // A response waits for the log writes before it, as
                    // the executor has it (a follower acknowledges only
                    // what is durable).
                    Action::Respond { .. } if self.held.get(&id).is_some_and(|h| !h.is_empty()) => {
                        self.held.entry(id).or_default().push_back(a);
                    }
                    Action::AppendLog { entries } => {
                        let last = entries.last().unwrap().log_id;
                        disk.1.extend(entries);
                        self.engines.get_mut(&id).unwrap().log_persisted(last);
                    }
                    Action::TruncateLog { from } => disk.1.retain(|e| e.log_id.index < from),
                    Action::Send { to, msg } | Action::Respond { to, msg } => {
                        self.queue.push((id, to, msg))
                    }
                    Action::SendSnapshotChunk {
                        to, offset, meta, ..
                    } => self
                        .snapshot_sends
                        .push((id, to, offset, self.clock, meta.id)),
                    Action::ReadReady { ids, index } => {
                        for r in ids {
                            self.reads_ready.push((id, r, index));
                        }
                    }
                    Action::ReadEntries { peer, from, to } => {
                        self.reads_back.push((id, peer, from, to));
                        if self.hold_reads {
                            continue;
                        }
                        let entries = disk
                            .1
                            .iter()
                            .filter(|e| (from..=to).contains(&e.log_id.index))
                            .cloned()
                            .collect();
                        self.engines
                            .get_mut(&id)
                            .unwrap()
                            .entries_read(peer, from, entries);
                    }
                    Action::BuildSnapshot => {
                        let applied = self.engines[&id].applied_index();
                        self.snapshot_builds.push((id, applied));
                    }
                    _ => {}
                }
            }
        }
        self.record_commit(id);
    }

    pub fn record_commit(&mut self, id: NodeId) {
        let e = &self.engines[&id];
        for i in 1..=e.commit_index().0 {
            let idx = LogIndex(i);
            // Purged behind a snapshot: checked when it was committed.
            let Some(log_id) = e.log_id_at(idx) else {
                continue;
            };
            let prev = *self.committed.entry(idx).or_insert(log_id);
            assert_eq!(
                prev, log_id,
                "committed entry at {idx} changed: {prev} then {log_id} (node {id})"
            );
        }
    }

    /// Completes the oldest `n` log writes held for `id`, in order, and
    /// sends the responses that waited for them.
    pub fn release(&mut self, id: NodeId, n: usize) {
        for _ in 0..n {
            let Some(a) = self.held.get_mut(&id).and_then(|q| q.pop_front()) else {
                return;
            };
            let disk = self.disks.get_mut(&id).unwrap();
            match a {
                Action::AppendLog { entries } => {
                    let last = entries.last().unwrap().log_id;
                    disk.1.extend(entries);
                    if let Some(e) = self.engines.get_mut(&id) {
                        e.log_persisted(last);
                    }
                }
                Action::TruncateLog { from } => disk.1.retain(|e| e.log_id.index < from),
                _ => unreachable!("only log writes and responses are held"),
            }
            while let Some(Action::Respond { .. }) = self.held.get(&id).and_then(|q| q.front()) {
                if let Some(Action::Respond { to, msg }) =
                    self.held.get_mut(&id).and_then(|q| q.pop_front())
                {
                    self.queue.push((id, to, msg));
                }
            }
        }
        self.flush(id);
    }

    /// Proposes `cmd` at `leader` and delivers what follows, dropping the
    /// messages `drop` picks.
    pub fn propose(
        &mut self,
        leader: NodeId,
        cmd: KvCommand,
        drop: impl Fn(NodeId, NodeId, &Message<C>) -> bool,
    ) {
        self.engines.get_mut(&leader).unwrap().propose(cmd).unwrap();
        self.flush(leader);
        self.deliver(drop);
    }

    /// Delivers queued messages (and what they cause) until none is left,
    /// dropping those `drop` picks.
    pub fn deliver(&mut self, drop: impl Fn(NodeId, NodeId, &Message<C>) -> bool) {
        while !self.queue.is_empty() {
            let batch = std::mem::take(&mut self.queue);
            for (from, to, msg) in batch {
                if drop(from, to, &msg) || !self.engines.contains_key(&to) {
                    continue;
                }
                self.engines.get_mut(&to).unwrap().step(from, msg).unwrap();
                self.flush(to);
            }
        }
    }

    pub fn crash(&mut self, id: NodeId) {
        self.engines.remove(&id);
        // Writes still held were never durable.
        self.held.remove(&id);
        self.queue.retain(|(from, _, _)| *from != id);
    }

    pub fn restart(&mut self, id: NodeId) {
        let (hs, entries) = self.disks[&id].clone();
        let state = RecoveredState {
            hard_state: hs,
            entries,
            ..RecoveredState::default()
        };
        self.engines.insert(
            id,
            Engine::new(id, self.cfg.clone(), id.0 + 100, 0, state).unwrap(),
        );
    }

    /// Replaces `id`'s storage with an empty one that holds only the
    /// identity `uuid` (a disk wiped or swapped, the node started again
    /// under its old id), and starts it.
    pub fn wipe(&mut self, id: NodeId, uuid: NodeUuid) {
        self.crash(id);
        let hard_state = HardState {
            uuid,
            ..HardState::default()
        };
        self.disks.insert(id, (hard_state, Vec::new()));
        self.restart(id);
    }

    /// Lets a heartbeat interval pass on `id` only, and delivers the result.
    pub fn heartbeat(
        &mut self,
        id: NodeId,
        drop: impl Fn(NodeId, NodeId, &Message<C>) -> bool + Copy,
    ) {
        self.clock += self.cfg.heartbeat_interval_ms;
        self.engines.get_mut(&id).unwrap().tick(self.clock);
        self.flush(id);
        self.deliver(drop);
    }

    /// Makes `id` campaign until it leads (or `tries` elections fail).
    pub fn elect(&mut self, id: NodeId, drop: impl Fn(NodeId, NodeId, &Message<C>) -> bool + Copy) {
        for _ in 0..5 {
            self.engines.get_mut(&id).unwrap().campaign_now();
            self.flush(id);
            self.deliver(drop);
            if self.engines[&id].is_leader() {
                return;
            }
        }
        panic!("node {id} could not be elected");
    }
}
