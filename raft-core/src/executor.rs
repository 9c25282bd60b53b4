//! The executor: the one piece of code that carries out the engine's
//! actions, sans IO.
//!
//! It owns the [`Engine`] and everything around it that a runtime would
//! otherwise repeat: which action may start when, the writes and reads
//! callers are waiting for, what the state machine has applied, the writes a
//! snapshot covered, and who gets which answer. A runtime (the simulator;
//! the tokio driver next) feeds it inputs, carries out the [`Io`] it hands
//! out, and reports each one done; callers' answers come back as [`Done`],
//! except a successful write's, which the state-machine worker gives as it
//! applies the entry ([`SmOp::Apply`]).
//!
//! # Lanes
//! Actions go to three FIFO lanes: **log** (hard state, append, truncate,
//! purge, and reading evicted entries back: the `LogStore`), **state machine** (apply, snapshots: the
//! `StateMachine`) and **net** (sends and replies). Within a lane, order is
//! kept and a runtime runs the lane's operations one after another. Across
//! lanes an operation waits only for what it depends on:
//! - a reply waits for every earlier log operation (a vote or an
//!   acknowledgement is durable before it leaves, Figure 2), except an
//!   acknowledgement of nothing past what is already durable (the answer to
//!   a heartbeat, anchored at what the leader knows we hold): it waits only
//!   for earlier hard-state saves and truncations, as a request does. A
//!   stalled disk then delays a follower's new acknowledgements but not its
//!   heartbeat answers, so the leader's check-quorum and reads still see it;
//! - a request waits for earlier hard-state saves and truncations (a
//!   candidate's term and vote are durable before it asks), but not for the
//!   leader's own appends, which may sync while followers receive the same
//!   entries (thesis §10.2.1; the engine counts itself only once
//!   [`Engine::log_persisted`] says so);
//! - an apply waits for every earlier log operation (nothing is applied that
//!   a restart would not find in the log);
//! - a log operation waits for an earlier snapshot install (the log is never
//!   purged past what the state machine holds).
//!
//! # Reordered appends
//! Transports may reorder messages (each QUIC stream is ordered, the
//! streams among themselves are not), and a leader pipelines up to
//! `Config::max_inflight` AppendEntries per follower. A follower that
//! stepped a request before the one carrying the entries it follows would
//! refuse it (§5.3), and the refusal sends the leader back to probing and
//! resending the whole window: under load, on loopback QUIC, followers
//! refused thousands of requests a minute this way, and a follower past the
//! leader's log cache was fed one message per round trip, no faster than
//! clients wrote, so it never caught up (`cargo xtask bench join`). So a
//! request from this term's leader whose previous entry is past the end of
//! the log is held (at most `max_inflight` of them) and stepped once the
//! log reaches it; one that does not fit, or that waited half the minimum
//! election timeout while the log stood still too (its predecessor is
//! lost, not late), is stepped as it is and refused as before. Holding a
//! message is only delaying it, which Raft allows of any message. Counting
//! the wait from arrival alone refused appends whose predecessors were
//! still arriving: a learner catching up on a busy two-core machine
//! received a window of 512-entry appends more slowly than 75 ms, refused
//! about 120 of them in 20 s, and each refusal sent the leader back to
//! probing, so the learner fell from 3,000 to 30,000-68,000 entries behind
//! (`cargo xtask bench join`, debug logs).
//!
//! In [`Mode::Serial`] every operation waits for every earlier log and
//! state-machine operation instead: the engine's original contract, one
//! action at a time.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::engine::{Action, Engine, ProposeError, ReadId, Role};
use crate::error::{MembershipError, NotLeader, StepError};
use crate::message::{AppendEntriesRequest, Message, SnapshotMeta};
use crate::types::{Entry, HardState, LogId, LogIndex, NodeId, Term, TypeConfig};

mod io;

pub use self::io::{Callers, Done, Io, LogOp, Mode, SmOp, WriteError};

/// What the executor remembers of a log operation in flight.
enum LogInflight {
    /// An append, with its last id.
    Append(Option<LogId>),
    /// A read-back of entries for `peer`, starting at `from`.
    Read {
        peer: NodeId,
        from: LogIndex,
    },
    Other,
}

enum Lane {
    Log,
    Sm,
    Net,
}

/// An action waiting for its turn, with what it waits for: the number of
/// completed log operations and state-machine operations it needs.
struct Queued<C: TypeConfig, K: Callers> {
    action: Action<C>,
    reply: Option<K::Rpc>,
    needs_log: u64,
    needs_sm: u64,
}

/// An AppendEntries request held until the log reaches its previous entry.
struct Held<C: TypeConfig, K: Callers> {
    from: NodeId,
    req: AppendEntriesRequest<C>,
    reply: Option<K::Rpc>,
    /// When it arrived (engine time).
    at: u64,
}

/// Counts of operations handed to a lane and completed by it.
#[derive(Default)]
struct Counter {
    issued: u64,
    done: u64,
}

/// Carries out one [`Engine`]'s actions; see the module docs.
pub struct Executor<C: TypeConfig, K: Callers> {
    engine: Engine<C>,
    mode: Mode,
    log_q: VecDeque<Queued<C, K>>,
    sm_q: VecDeque<Queued<C, K>>,
    net_q: VecDeque<Queued<C, K>>,
    /// Operations queued so far per lane (also counting those not issued).
    log_seq: u64,
    sm_seq: u64,
    /// Position (in `log_seq`) of the last hard-state save or truncation.
    last_hard_log: u64,
    /// Position (in `sm_seq`) of the last snapshot install.
    last_install_sm: u64,
    log: Counter,
    sm: Counter,
    /// Applies handed out and not yet reported: how many entries, and the
    /// index of the last.
    applying: VecDeque<(usize, LogIndex)>,
    /// Log operations handed out and not yet reported, in order.
    log_inflight: VecDeque<LogInflight>,
    /// What the state machine has applied (reported, not just handed out).
    applied: LogIndex,
    writes: BTreeMap<LogIndex, (LogId, K::Write)>,
    reads: HashMap<ReadId, K::Read>,
    next_read: ReadId,
    waiting_reads: Vec<(LogIndex, K::Read)>,
    io: Vec<Io<C, K>>,
    done: Vec<Done<C, K>>,
    /// Appends that arrived ahead of the entries they follow, in arrival
    /// order (see "Reordered appends").
    held: Vec<Held<C, K>>,
    /// How many appends were ever held.
    held_total: u64,
    /// The log's last index when last seen to move, and when (engine
    /// time): a held append expires only once the log stood still that
    /// long (see "Reordered appends").
    log_moved: (LogIndex, u64),
}

impl<C: TypeConfig, K: Callers> Executor<C, K> {
    /// Wraps `engine`, whose state machine has applied up to `applied`.
    pub fn new(engine: Engine<C>, applied: LogIndex, mode: Mode) -> Self {
        let mut x = Executor {
            engine,
            mode,
            log_q: VecDeque::new(),
            sm_q: VecDeque::new(),
            net_q: VecDeque::new(),
            log_seq: 0,
            sm_seq: 0,
            last_hard_log: 0,
            last_install_sm: 0,
            log: Counter::default(),
            sm: Counter::default(),
            applying: VecDeque::new(),
            log_inflight: VecDeque::new(),
            applied,
            writes: BTreeMap::new(),
            reads: HashMap::new(),
            next_read: 0,
            waiting_reads: Vec::new(),
            io: Vec::new(),
            done: Vec::new(),
            held: Vec::new(),
            held_total: 0,
            log_moved: (LogIndex(0), 0),
        };
        // Repair actions from recovery.
        x.collect();
        x
    }

    /// The engine inside.
    pub fn engine(&self) -> &Engine<C> {
        &self.engine
    }

    /// The engine, for inputs the executor does not wrap (membership
    /// proposals, transfers, initialization); call [`Executor::collect`]
    /// after.
    pub fn engine_mut(&mut self) -> &mut Engine<C> {
        &mut self.engine
    }

    /// What the state machine has applied.
    pub fn applied(&self) -> LogIndex {
        self.applied
    }

    /// Whether nothing is queued or in flight.
    pub fn idle(&self) -> bool {
        self.log_q.is_empty()
            && self.sm_q.is_empty()
            && self.net_q.is_empty()
            && self.log.issued == self.log.done
            && self.sm.issued == self.sm.done
    }

    /// Whether every log operation handed out so far is durable and none is
    /// waiting.
    pub fn log_idle(&self) -> bool {
        self.log_q.is_empty() && self.log.issued == self.log.done
    }

    /// Sends and replies waiting for their turn.
    pub fn net_queued(&self) -> usize {
        self.net_q.len()
    }

    /// Whether a log or state-machine operation is in flight.
    pub fn storage_busy(&self) -> bool {
        self.log.issued > self.log.done || self.sm.issued > self.sm.done
    }

    // ------------------------------------------------------------- inputs

    /// Fires the engine's timers at `now` (milliseconds), then hands out what
    /// that produced through [`Executor::poll_io`].
    pub fn tick(&mut self, now: u64) {
        self.engine.tick(now);
        self.release_held();
    }

    /// How many AppendEntries requests arrived ahead of the entries they
    /// follow and were held for them (see "Reordered appends").
    pub fn held_appends(&self) -> u64 {
        self.held_total
    }

    /// Proposes a command; `reply` is answered once it is applied (or
    /// cannot be).
    pub fn propose(&mut self, command: C::Command, reply: K::Write) {
        let proposed = self.engine.propose(command);
        self.await_entry(proposed, reply);
    }

    /// Waits for the entry `proposed` (from the engine's membership or
    /// propose calls) to be applied, answering `reply`.
    pub fn await_entry(&mut self, proposed: Result<LogId, ProposeError<C::Node>>, reply: K::Write) {
        match proposed {
            Ok(log_id) => {
                // A proposal that took the index of an earlier one (a new
                // term reused it) means the earlier entry was truncated.
                if let Some((_, old)) = self.writes.insert(log_id.index, (log_id, reply)) {
                    self.done.push(Done::Write(old, WriteError::Dropped));
                }
            }
            Err(e) => self.done.push(Done::Write(reply, e.into())),
        }
    }

    /// Starts a linearizable read; `reply` is answered once the state
    /// machine may serve it.
    pub fn read(&mut self, reply: K::Read) {
        let id = self.next_read;
        self.next_read += 1;
        match self.engine.read_index(id) {
            Ok(()) => {
                self.reads.insert(id, reply);
            }
            Err(nl) => self.done.push(Done::Read(reply, Err(nl))),
        }
    }

    /// Steps a peer's message. A request's answer goes to `reply` if given
    /// (else it is sent back as a message). A refused message gives the
    /// handle back with the reason.
    #[allow(clippy::type_complexity)]
    pub fn step(
        &mut self,
        from: NodeId,
        msg: Message<C>,
        reply: Option<K::Rpc>,
    ) -> Result<(), (StepError, Option<K::Rpc>)> {
        let msg = match msg {
            Message::AppendEntries(req) if self.holds(from, &req) => {
                self.hold(from, req, reply);
                return Ok(());
            }
            msg => msg,
        };
        let appends = matches!(msg, Message::AppendEntries(_));
        self.step_now(from, msg, reply)?;
        if appends || !self.held.is_empty() {
            self.release_held();
        }
        Ok(())
    }

    fn step_now(
        &mut self,
        from: NodeId,
        msg: Message<C>,
        reply: Option<K::Rpc>,
    ) -> Result<(), (StepError, Option<K::Rpc>)> {
        let request = msg.is_request();
        if let Err(e) = self.engine.step(from, msg) {
            return Err((e, reply));
        }
        if request {
            // Exactly one Respond comes of it: tie the handle to it now.
            self.collect_with_reply(reply);
        }
        Ok(())
    }

    /// Whether `req` is to be held: it carries entries from this term's
    /// leader, and its previous entry is past the end of our log.
    fn holds(&self, from: NodeId, req: &AppendEntriesRequest<C>) -> bool {
        let e = &self.engine;
        !req.entries.is_empty()
            && req.term == e.term()
            && e.leader_id() == Some(from)
            && matches!(e.role(), Role::Follower | Role::Learner)
            && req.prev_log_id.index > e.log().last_index()
    }

    fn hold(&mut self, from: NodeId, req: AppendEntriesRequest<C>, reply: Option<K::Rpc>) {
        self.held_total += 1;
        self.held.push(Held {
            from,
            req,
            reply,
            at: self.engine.now(),
        });
        if self.held.len() > self.engine.config().max_inflight.max(1) {
            // Full: the one furthest ahead waits longest anyway.
            let furthest = (0..self.held.len())
                .max_by_key(|&i| self.held[i].req.prev_log_id.index)
                .expect("not empty");
            let h = self.held.remove(furthest);
            self.step_held(h);
        }
    }

    /// Steps every held request whose turn came (the log reached its
    /// previous entry), that waited too long, or that is no longer to be
    /// held (a new term or leader): lowest previous index first, each
    /// possibly letting the next one in.
    fn release_held(&mut self) {
        let expiry = self.engine.config().election_timeout_min_ms / 2;
        let now = self.engine.now();
        loop {
            let last = self.engine.log().last_index();
            if last != self.log_moved.0 {
                self.log_moved = (last, now);
            }
            let moved_at = self.log_moved.1;
            let due = (0..self.held.len())
                .filter(|&i| {
                    let h = &self.held[i];
                    !self.holds(h.from, &h.req) || h.at.max(moved_at) + expiry <= now
                })
                .min_by_key(|&i| self.held[i].req.prev_log_id.index);
            let Some(i) = due else { return };
            let h = self.held.remove(i);
            self.step_held(h);
        }
    }

    fn step_held(&mut self, h: Held<C, K>) {
        let Held {
            from, req, reply, ..
        } = h;
        if let Err((error, reply)) = self.step_now(from, Message::AppendEntries(req), reply) {
            self.done.push(Done::Refused { from, reply, error });
        }
    }

    // --------------------------------------------------------- completions

    /// The oldest log operation handed out is done (durable). For a
    /// [`LogOp::Read`], report with [`Executor::log_read`] instead.
    pub fn log_done(&mut self) {
        self.log_finished(Vec::new());
    }

    /// The oldest log operation handed out, a [`LogOp::Read`], is done and
    /// read `entries`.
    pub fn log_read(&mut self, entries: Vec<Entry<C>>) {
        self.log_finished(entries);
    }

    /// The oldest log operation is done; `entries` is what it read, if it
    /// was a read (a read reported without them found nothing to send).
    fn log_finished(&mut self, entries: Vec<Entry<C>>) {
        self.log.done += 1;
        match self.log_inflight.pop_front() {
            Some(LogInflight::Append(Some(last))) => self.engine.log_persisted(last),
            Some(LogInflight::Read { peer, from }) => self.engine.entries_read(peer, from, entries),
            _ => {}
        }
    }

    /// The oldest apply handed out is done: the state machine gave
    /// `responses` responses (and the worker answered the op's writes).
    /// Returns an error if the count is off (the state machine broke its
    /// contract).
    pub fn applied_batch(&mut self, responses: usize) -> Result<(), (usize, usize)> {
        self.sm.done += 1;
        let (count, last) = self.applying.pop_front().unwrap_or_default();
        if count != responses {
            return Err((responses, count));
        }
        self.applied = self.applied.max(last);
        self.serve_reads();
        Ok(())
    }

    /// The write waiting for the entry `id`, for the apply that carries it.
    /// A write proposed at that index in another term lost its entry: it
    /// was definitely not applied, and is answered so now.
    fn take_write(&mut self, id: LogId) -> Option<K::Write> {
        let (proposed, reply) = self.writes.remove(&id.index)?;
        if proposed == id {
            Some(reply)
        } else {
            self.done.push(Done::Write(reply, WriteError::Dropped));
            None
        }
    }

    /// The oldest state-machine operation handed out, a snapshot build, is
    /// done.
    pub fn snapshot_built(&mut self, meta: SnapshotMeta<C>) {
        self.sm.done += 1;
        self.engine.snapshot_built(meta);
    }

    /// The oldest state-machine operation handed out, a chunk read, is done:
    /// `chunk` is the request to send, or `None` if that snapshot is gone.
    pub fn snapshot_chunk_read(&mut self, to: NodeId, chunk: Option<Message<C>>) {
        self.sm.done += 1;
        if let Some(msg) = chunk {
            self.io.push(Io::Send { to, msg });
        }
    }

    /// The oldest state-machine operation handed out, a chunk write, is done.
    pub fn snapshot_chunk_written(&mut self) {
        self.sm.done += 1;
    }

    /// The oldest state-machine operation handed out, an install, is done.
    pub fn snapshot_installed(&mut self, meta: &SnapshotMeta<C>) {
        self.sm.done += 1;
        self.applied = self.applied.max(meta.last_log_id.index);
        // Proposals the snapshot covers: whether they made it is unknown.
        let rest = self.writes.split_off(&self.applied.next());
        for (_, (_, reply)) in std::mem::replace(&mut self.writes, rest) {
            self.done.push(Done::Write(reply, WriteError::Unknown));
        }
        self.serve_reads();
    }

    /// The log is cut back to before `from` (a new leader's log differs
    /// there). Writes proposed at `from` or later lost their entries here,
    /// and nothing may ever take those indices again if no one writes, so
    /// they are answered now. Unknown, not dropped: another node may still
    /// hold such an entry and a later leader commit it.
    fn entries_cut_off(&mut self, from: LogIndex) {
        for (_, (_, reply)) in self.writes.split_off(&from) {
            self.done.push(Done::Write(reply, WriteError::Unknown));
        }
    }

    // ------------------------------------------------------------ outputs

    /// Takes the engine's new actions into the lanes. Call after any input
    /// made through [`Executor::engine_mut`]; the other inputs and reports
    /// do it themselves when their results are taken.
    pub fn collect(&mut self) {
        self.collect_with_reply(None);
    }

    fn collect_with_reply(&mut self, mut reply: Option<K::Rpc>) {
        for action in self.engine.take_actions() {
            let lane = match &action {
                Action::SaveHardState(_)
                | Action::AppendLog { .. }
                | Action::PurgeLog { .. }
                | Action::ReadEntries { .. } => Lane::Log,
                Action::TruncateLog { from } => {
                    self.entries_cut_off(*from);
                    Lane::Log
                }
                Action::Apply { .. }
                | Action::BuildSnapshot
                | Action::SendSnapshotChunk { .. }
                | Action::WriteSnapshotChunk { .. }
                | Action::InstallSnapshot { .. } => Lane::Sm,
                Action::Send { .. } | Action::Respond { .. } => Lane::Net,
                Action::ReadReady { ids, index } => {
                    for id in ids {
                        if let Some(r) = self.reads.remove(id) {
                            self.waiting_reads.push((*index, r));
                        }
                    }
                    self.serve_reads();
                    continue;
                }
                Action::ReadFailed { ids, leader_id } => {
                    let nl = NotLeader {
                        leader_id: *leader_id,
                        leader_node: leader_id
                            .and_then(|l| self.engine.membership().nodes.get(&l).cloned()),
                    };
                    for id in ids {
                        if let Some(r) = self.reads.remove(id) {
                            self.done.push(Done::Read(r, Err(nl.clone())));
                        }
                    }
                    continue;
                }
            };
            let serial = self.mode == Mode::Serial;
            let (needs_log, needs_sm) = match (&lane, &action) {
                _ if serial => (self.log_seq, self.sm_seq),
                (Lane::Log, _) => (0, self.last_install_sm),
                (Lane::Sm, _) => (self.log_seq, 0),
                (Lane::Net, Action::Respond { msg, .. })
                    if acknowledges_only_durable(msg, self.engine.durable_index()) =>
                {
                    (self.last_hard_log, self.last_install_sm)
                }
                (Lane::Net, Action::Respond { .. }) => (self.log_seq, self.last_install_sm),
                (Lane::Net, _) => (self.last_hard_log, 0),
            };
            let reply = match &action {
                Action::Respond { .. } => reply.take(),
                _ => None,
            };
            let q = Queued {
                action,
                reply,
                needs_log,
                needs_sm,
            };
            match lane {
                Lane::Log => {
                    self.log_seq += 1;
                    if matches!(
                        q.action,
                        Action::SaveHardState(_) | Action::TruncateLog { .. }
                    ) {
                        self.last_hard_log = self.log_seq;
                    }
                    self.log_q.push_back(q);
                }
                Lane::Sm => {
                    self.sm_seq += 1;
                    if matches!(q.action, Action::InstallSnapshot { .. }) {
                        self.last_install_sm = self.sm_seq;
                    }
                    self.sm_q.push_back(q);
                }
                Lane::Net => self.net_q.push_back(q),
            }
        }
        let campaigning = matches!(self.engine.role(), Role::PreCandidate | Role::Candidate);
        if !self.writes.is_empty() && (self.engine.removed() || campaigning) {
            // Nothing will tell this node soon, maybe ever, whether the
            // writes it proposed past its commit index were committed, so
            // they are answered now. Unknown: the next leader may commit
            // them. Either it was removed from the cluster (a leader that
            // committed its own removal steps down), or it campaigns: it
            // lost contact with every leader for an election timeout. A
            // deposed leader that also missed the configuration that
            // removed it hears from no leader ever again (the sweep's churn
            // nemesis, seed 774); one cut off by a partition would hold its
            // callers for as long as the partition lasts.
            let after_commit = self.writes.split_off(&self.engine.commit_index().next());
            for (_, (_, reply)) in after_commit {
                self.done.push(Done::Write(reply, WriteError::Unknown));
            }
        }
    }

    /// Hands out every operation whose turn has come. Runtimes call this
    /// after feeding inputs or reporting completions.
    pub fn poll_io(&mut self) -> Vec<Io<C, K>> {
        self.collect();
        loop {
            let mut progressed = false;
            // In serial mode an operation also waits for those of its own
            // lane; pipelined lanes hand out in order without waiting.
            let serial = self.mode == Mode::Serial;
            while let Some(q) = self.log_q.front()
                && self.ready(q)
                && (!serial || self.log.issued == self.log.done)
            {
                let q = self.log_q.pop_front().expect("front exists");
                self.log.issued += 1;
                let (op, inflight) = match q.action {
                    Action::SaveHardState(hs) => (LogOp::SaveHardState(hs), LogInflight::Other),
                    Action::AppendLog { entries } => {
                        let last = entries.last().map(|e| e.log_id);
                        (LogOp::Append(entries), LogInflight::Append(last))
                    }
                    Action::TruncateLog { from } => (LogOp::Truncate { from }, LogInflight::Other),
                    Action::PurgeLog { upto } => (LogOp::Purge { upto }, LogInflight::Other),
                    Action::ReadEntries { peer, from, to } => {
                        (LogOp::Read { from, to }, LogInflight::Read { peer, from })
                    }
                    _ => unreachable!("log lane holds log actions"),
                };
                self.log_inflight.push_back(inflight);
                self.io.push(Io::Log(op));
                progressed = true;
            }
            while let Some(q) = self.sm_q.front()
                && self.ready(q)
                && (!serial || self.sm.issued == self.sm.done)
            {
                let q = self.sm_q.pop_front().expect("front exists");
                self.sm.issued += 1;
                let op = match q.action {
                    Action::Apply { entries } => {
                        let last = entries.last().map_or(self.applied, |e| e.log_id.index);
                        self.applying.push_back((entries.len(), last));
                        let writes = entries.iter().map(|e| self.take_write(e.log_id)).collect();
                        SmOp::Apply { entries, writes }
                    }
                    Action::BuildSnapshot => SmOp::BuildSnapshot,
                    Action::SendSnapshotChunk {
                        to,
                        term,
                        meta,
                        offset,
                    } => SmOp::ReadSnapshotChunk {
                        to,
                        term,
                        meta,
                        offset,
                    },
                    Action::WriteSnapshotChunk { meta, offset, data } => {
                        SmOp::WriteSnapshotChunk { meta, offset, data }
                    }
                    Action::InstallSnapshot { meta } => SmOp::InstallSnapshot { meta },
                    _ => unreachable!("state-machine lane holds state-machine actions"),
                };
                self.io.push(Io::Sm(op));
                progressed = true;
            }
            while let Some(q) = self.net_q.front() {
                // A reply waiting only for log operations already handed out
                // can ride the log lane behind them.
                let after_log = !self.ready(q)
                    && !serial
                    && q.reply.is_some()
                    && self.sm.done >= q.needs_sm
                    && self.log.issued >= q.needs_log;
                if !self.ready(q) && !after_log {
                    break;
                }
                let q = self.net_q.pop_front().expect("front exists");
                let io = match (q.action, q.reply) {
                    (Action::Respond { msg, .. }, Some(to)) if after_log => {
                        Io::ReplyAfterLog { to, msg }
                    }
                    (Action::Respond { msg, .. }, Some(to)) => Io::Reply { to, msg },
                    (Action::Respond { to, msg } | Action::Send { to, msg }, _) => {
                        Io::Send { to, msg }
                    }
                    _ => unreachable!("net lane holds sends"),
                };
                self.io.push(io);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
        std::mem::take(&mut self.io)
    }

    /// Answers for callers produced so far.
    pub fn take_done(&mut self) -> Vec<Done<C, K>> {
        std::mem::take(&mut self.done)
    }

    fn ready(&self, q: &Queued<C, K>) -> bool {
        self.log.done >= q.needs_log && self.sm.done >= q.needs_sm
    }

    fn serve_reads(&mut self) {
        let applied = self.applied;
        let waiting = std::mem::take(&mut self.waiting_reads);
        for (index, reply) in waiting {
            if index <= applied {
                self.done.push(Done::Read(reply, Ok(index)));
            } else {
                self.waiting_reads.push((index, reply));
            }
        }
    }

    /// How many writes wait for their entries to be applied (or dropped).
    pub fn pending_writes(&self) -> usize {
        self.writes.len()
    }

    /// Fails every caller still waiting (the node is stopping).
    pub fn fail_all(&mut self) -> (Vec<K::Write>, Vec<K::Read>) {
        let writes = std::mem::take(&mut self.writes)
            .into_values()
            .map(|(_, w)| w)
            .collect();
        let reads = self
            .reads
            .drain()
            .map(|(_, r)| r)
            .chain(self.waiting_reads.drain(..).map(|(_, r)| r))
            .collect();
        (writes, reads)
    }
}

/// Whether `msg` is an acknowledgement of entries at or below `durable`:
/// true of itself whenever it leaves, so it need not wait for the log
/// operations queued before it.
fn acknowledges_only_durable<C: TypeConfig>(msg: &Message<C>, durable: LogIndex) -> bool {
    matches!(msg, Message::AppendEntriesResponse(r) if r.success && r.index <= durable)
}

#[cfg(test)]
mod tests;
