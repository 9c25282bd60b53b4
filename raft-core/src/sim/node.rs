//! How a simulated node runs: inputs go through the same [`Executor`] the
//! driver uses; the log and state-machine operations it hands out run on
//! two per-node workers in virtual time (each in order, one at a time,
//! side by side when the executor is pipelined); sends go to the simulated
//! network.

use std::cmp::Reverse;

use crate::executor::{Done, Io, LogOp, SmOp, WriteError};
use crate::message::{InstallSnapshotRequest, Message, SnapshotMeta};
use crate::types::{Entry, NodeId};

use super::linearizability::OpOutput;
use super::monitor::Reach;
use super::{ArmedCrash, EventKind, Input, MembershipChange, OpState, Sim, SimApp};

impl<C: SimApp> Sim<C> {
    pub(super) fn step_event(&mut self) {
        let Some(Reverse((at, seq))) = self.queue.pop() else {
            return;
        };
        self.now = at;
        let Some(ev) = self.events.remove(&seq) else {
            return;
        };
        match ev {
            EventKind::Tick => {
                for i in 0..self.nodes.len() {
                    if self.nodes[i].x.is_some() && self.nodes[i].paused_until <= self.now {
                        self.nodes[i].inbox.push_back(Input::Tick);
                        self.process(i);
                    }
                }
                self.drive_clients();
                let t = self.opts.tick_ms;
                self.schedule(t, EventKind::Tick);
            }
            EventKind::Deliver { from, to, msg } => {
                if self.blocked.contains(&(from, to)) {
                    self.stats.messages_dropped += 1;
                    return;
                }
                let i = self.idx(to);
                if self.nodes[i].x.is_some() {
                    self.nodes[i].inbox.push_back(Input::Message { from, msg });
                    self.process(i);
                }
            }
            EventKind::Resume { node } => self.process(node),
            EventKind::LogDone { node, epoch }
            | EventKind::SmDone { node, epoch }
            | EventKind::BuildDone { node, epoch }
                if self.nodes[node].epoch != epoch || self.nodes[node].x.is_none() => {}
            EventKind::LogDone { node, .. } => {
                self.finish_log_op(node);
                self.after_storage(node);
            }
            EventKind::SmDone { node, .. } => {
                self.finish_sm_op(node);
                self.after_storage(node);
            }
            EventKind::BuildDone { node, .. } => {
                self.finish_build(node);
                self.after_storage(node);
            }
        }
    }

    /// After a storage operation completed: an armed crash fires before the
    /// replies that waited for it leave; otherwise the node carries on.
    fn after_storage(&mut self, i: usize) {
        let armed = self.nodes[i].armed_crash == Some(ArmedCrash::AfterPersist);
        let Some(x) = self.nodes[i].x.as_mut() else {
            return;
        };
        if armed {
            x.collect();
            if x.net_queued() > 0 {
                self.coverage.hit(Reach::CrashBetweenPersistAndReply);
            }
            let id = self.nodes[i].id;
            self.crash(id);
            return;
        }
        self.process(i);
    }

    /// Runs node `i` until it has nothing to do or (when not pipelined)
    /// waits on storage.
    pub(super) fn process(&mut self, i: usize) {
        loop {
            if self.nodes[i].x.is_none() || self.nodes[i].paused_until > self.now {
                return;
            }
            self.pump(i);
            let Some(x) = self.nodes[i].x.as_ref() else {
                return;
            };
            if !self.opts.pipelined && x.storage_busy() {
                return;
            }
            let Some(input) = self.nodes[i].inbox.pop_front() else {
                return;
            };
            self.feed(i, input);
        }
    }

    fn feed(&mut self, i: usize, input: Input<C>) {
        let now = self.now;
        let before = self.monitor_input(i, &input);
        // The term a message may move the receiver to: not a pre-vote's,
        // which is only hypothetical.
        let msg_term = match &input {
            Input::Message { msg, .. } => match msg {
                Message::Vote(v) if v.pre_vote => None,
                Message::VoteResponse(v) if v.pre_vote && v.granted => None,
                m => Some(m.term()),
            },
            _ => None,
        };
        if let Input::Read { op } = &input
            && self.nodes[i].engine().is_some_and(|e| e.is_leader())
        {
            self.read_floor.insert(*op, self.max_commit());
        }
        let x = self.nodes[i].x.as_mut().expect("live node");
        x.tick(now);
        match input {
            Input::Tick => {}
            Input::Campaign => x.engine_mut().campaign_now(),
            Input::Message { from, msg } => {
                if let Message::AppendEntriesResponse(r) = &msg
                    && !r.success
                {
                    self.stats.append_rejections += 1;
                }
                // Requests carry their sender as the reply handle, as the
                // driver's carry a channel back to the caller.
                let held = x.held_appends();
                let stepped = x.step(from, msg, Some(from));
                if x.held_appends() > held {
                    self.coverage.hit(Reach::ReorderedAppendHeld);
                }
                if let Err((e, _)) = stepped {
                    let id = self.nodes[i].id;
                    self.fail(format!(
                        "node {id} refused a message from an honest peer: {e}"
                    ));
                }
            }
            Input::Propose { op, cmd } => x.propose(cmd, op),
            Input::Membership(change) => {
                let e = x.engine_mut();
                let r = match change {
                    MembershipChange::AddLearner(id) => e.add_learner(id, C::node(id)),
                    MembershipChange::RemoveLearner(id) => e.remove_learner(id),
                    MembershipChange::Voters(v) => e.change_membership(v),
                    MembershipChange::Demote(id) if !e.membership().nodes.contains_key(&id) => {
                        e.add_learner(id, C::node(id))
                    }
                    MembershipChange::Demote(id) => e.demote_voter(id),
                };
                self.change_result = Some(r);
            }
            Input::Transfer(to) => {
                let _ = x.engine_mut().transfer_leader(to);
            }
            Input::Read { op } => x.read(op),
        }
        self.monitor_step(i, before, msg_term);
        self.pump(i);
    }

    /// Takes what node `i`'s executor hands out: storage operations to the
    /// workers, sends to the network, answers to the clients; then checks
    /// the node's state.
    fn pump(&mut self, i: usize) {
        let Some(x) = self.nodes[i].x.as_mut() else {
            return;
        };
        let io = x.poll_io();
        let done = x.take_done();
        self.check_node(i);
        for io in io {
            match io {
                Io::Log(op) => {
                    self.nodes[i].log_worker.push_back(op);
                    self.nodes[i].log_handed += 1;
                    self.start_log_op(i);
                }
                Io::ReplyAfterLog { to, msg } => {
                    let n = &mut self.nodes[i];
                    if n.log_done_count >= n.log_handed {
                        self.emit(i, to, msg);
                    } else {
                        n.log_replies.push_back((n.log_handed, to, msg));
                    }
                }
                Io::Sm(op) => {
                    self.nodes[i].sm_worker.push_back(op);
                    self.start_sm_op(i);
                }
                Io::Send { to, msg } | Io::Reply { to, msg } => self.emit(i, to, msg),
            }
            if self.nodes[i].x.is_none() {
                return; // crashed mid-append
            }
        }
        for d in done {
            self.answer(i, d);
        }
    }

    /// Puts a message of node `i` on the network, checked first.
    fn emit(&mut self, i: usize, to: NodeId, msg: Message<C>) {
        let id = self.nodes[i].id;
        self.monitor_send(i, to, &msg);
        if let Message::VoteResponse(v) = &msg
            && v.granted
            && !v.pre_vote
            && let Some(prev) = self.votes.insert((id, v.voter_uuid, v.term), to)
            && prev != to
        {
            self.fail(format!(
                "node {id} (identity {}) voted for both {prev} and {to} in term {}",
                v.voter_uuid, v.term
            ));
        }
        self.send(id, to, msg);
    }

    /// A write applied by node `i`'s state-machine worker, answered as the
    /// driver's worker answers it.
    fn answer_write(&mut self, op: usize, resp: C::Response) {
        self.finish_op(op, OpState::Ok(self.now, C::output(resp)));
    }

    fn answer(&mut self, i: usize, done: Done<C, super::SimCallers>) {
        match done {
            Done::Write(op, WriteError::NotLeader(nl)) => {
                self.finish_op(op, OpState::Failed);
                self.redirect(op, nl.leader_id);
            }
            Done::Write(op, WriteError::Unknown) => self.finish_op(op, OpState::Unknown),
            Done::Write(op, _) => self.finish_op(op, OpState::Failed),
            Done::Read(op, Ok(index)) => {
                let floor = self.read_floor.remove(&op).unwrap_or_default();
                if index < floor {
                    let id = self.nodes[i].id;
                    self.fail(format!(
                        "node {id} served read {op} at index {index}, but {floor} was committed when the read arrived"
                    ));
                }
                let v = C::read(&self.nodes[i].sm, &self.ops[op].key);
                self.finish_op(op, OpState::Ok(self.now, OpOutput::Get(v)));
            }
            Done::Read(op, Err(nl)) => {
                self.finish_op(op, OpState::Failed);
                self.redirect(op, nl.leader_id);
            }
            Done::Refused { from, error, .. } => {
                let id = self.nodes[i].id;
                self.fail(format!(
                    "node {id} refused a held append from an honest peer {from}: {error}"
                ));
            }
        }
    }

    fn latency(&mut self, (lo, hi): (u64, u64)) -> u64 {
        self.rng.range(lo, hi + 1)
    }

    fn start_log_op(&mut self, i: usize) {
        let n = &self.nodes[i];
        if n.log_busy || n.log_worker.is_empty() {
            return;
        }
        let tear = n.armed_crash == Some(ArmedCrash::MidAppend)
            && matches!(n.log_worker.front(), Some(LogOp::Append(e)) if e.len() > 1);
        self.nodes[i].log_busy = true;
        if tear {
            let id = self.nodes[i].id;
            self.crash(id);
            return;
        }
        let lat = self.nodes[i]
            .disk_latency_ms
            .unwrap_or(self.opts.disk_latency_ms);
        let lat = self.latency(lat);
        let epoch = self.nodes[i].epoch;
        self.schedule(lat, EventKind::LogDone { node: i, epoch });
    }

    fn start_sm_op(&mut self, i: usize) {
        let n = &self.nodes[i];
        if n.sm_busy {
            return;
        }
        match n.sm_worker.front() {
            None => return,
            // While a build is written, only applies pass it (as in the
            // driver's state-machine worker).
            Some(SmOp::Apply { .. }) => {}
            Some(_) if n.building.is_some() => return,
            Some(SmOp::BuildSnapshot) => return self.begin_build(i),
            Some(_) => {}
        }
        let install = match n.sm_worker.front() {
            Some(SmOp::InstallSnapshot { meta }) => Some(meta.size),
            _ => None,
        };
        self.nodes[i].sm_busy = true;
        let lat = match install {
            Some(size) => {
                let disk = self.nodes[i]
                    .disk_latency_ms
                    .unwrap_or(self.opts.disk_latency_ms);
                self.latency(disk) + self.snapshot_ms(size)
            }
            None => self.latency(self.opts.apply_latency_ms),
        };
        let epoch = self.nodes[i].epoch;
        self.schedule(lat, EventKind::SmDone { node: i, epoch });
    }

    /// A crash in the middle of a log operation: an append may leave any
    /// prefix of its entries on disk and a truncation may or may not have
    /// happened (neither was acknowledged, so either is allowed).
    pub(super) fn lose_in_flight_write(&mut self, i: usize) {
        let n = &self.nodes[i];
        if !n.log_busy {
            return;
        }
        let tear = n.armed_crash == Some(ArmedCrash::MidAppend) || self.rng.chance(0.5);
        match n.log_worker.front() {
            Some(LogOp::Append(entries)) if entries.len() > 1 && tear => {
                let keep = self.rng.range(1, entries.len() as u64) as usize;
                let torn: Vec<Entry<C>> = entries[..keep].to_vec();
                self.nodes[i].disk.entries.extend(torn);
                self.coverage.hit(Reach::TornAppend);
            }
            Some(LogOp::Truncate { from }) if self.rng.chance(0.5) => {
                let from = *from;
                let d = &mut self.nodes[i].disk;
                let keep = from.0.saturating_sub(d.base.index.0 + 1) as usize;
                d.entries.truncate(keep);
            }
            _ => {}
        }
    }

    /// Whether a storage operation fails now (fail-stop: the node stops, as
    /// the driver does on a storage error).
    fn storage_fails(&mut self, i: usize) -> bool {
        if self.opts.storage_error_rate > 0.0 && self.rng.chance(self.opts.storage_error_rate) {
            let id = self.nodes[i].id;
            self.crash(id);
            self.nodes[i].failed = true;
            return true;
        }
        false
    }

    /// Completes the log operation at the head of node `i`'s log worker.
    fn finish_log_op(&mut self, i: usize) {
        let id = self.nodes[i].id;
        if self.storage_fails(i) {
            return;
        }
        let n = &mut self.nodes[i];
        n.log_busy = false;
        let Some(op) = n.log_worker.pop_front() else {
            return;
        };
        let mut read = None;
        match op {
            LogOp::SaveHardState(hs) => {
                let old = n.disk.hard_state;
                if hs.term < old.term
                    || (hs.term == old.term
                        && old.voted_for.is_some()
                        && hs.voted_for != old.voted_for)
                {
                    self.fail(format!(
                        "node {id} overwrote hard state {old:?} with {hs:?}"
                    ));
                }
                n.disk.hard_state = hs;
            }
            LogOp::Append(entries) => {
                if let Some(first) = entries.first() {
                    let expect = n
                        .disk
                        .entries
                        .last()
                        .map(|e| e.log_id.index)
                        .unwrap_or(n.disk.base.index)
                        .next();
                    if first.log_id.index != expect {
                        self.fail(format!(
                            "node {id} appends at {} but its disk log continues at {expect}",
                            first.log_id.index
                        ));
                    }
                }
                self.check_entries(i, &entries);
                self.nodes[i].disk.entries.extend(entries);
            }
            LogOp::Truncate { from } => {
                let keep = from.0.saturating_sub(n.disk.base.index.0 + 1) as usize;
                n.disk.entries.truncate(keep);
            }
            LogOp::Purge { upto } => {
                let drop = (upto.index.0.saturating_sub(n.disk.base.index.0) as usize)
                    .min(n.disk.entries.len());
                n.disk.entries.drain(..drop);
                if upto.index > n.disk.base.index {
                    n.disk.base = upto;
                }
            }
            LogOp::Read { from, to } => {
                read = Some(n.disk.read(from, to));
                self.coverage.hit(Reach::EntriesReadBack);
            }
        }
        // Replies queued behind this operation leave now, before the
        // executor hears of it, as the driver's log worker sends them.
        let n = &mut self.nodes[i];
        n.log_done_count += 1;
        let done = n.log_done_count;
        while let Some((after, ..)) = self.nodes[i].log_replies.front()
            && *after <= done
        {
            let (_, to, msg) = self.nodes[i].log_replies.pop_front().expect("front exists");
            self.emit(i, to, msg);
        }
        if let Some(x) = self.nodes[i].x.as_mut() {
            match read {
                Some(entries) => x.log_read(entries),
                None => x.log_done(),
            }
        }
        self.start_log_op(i);
    }

    /// Completes the state-machine operation at the head of node `i`'s
    /// state-machine worker.
    fn finish_sm_op(&mut self, i: usize) {
        let id = self.nodes[i].id;
        if self.storage_fails(i) {
            return;
        }
        self.nodes[i].sm_busy = false;
        let Some(op) = self.nodes[i].sm_worker.pop_front() else {
            return;
        };
        match op {
            SmOp::Apply { entries, writes } => {
                let responses = self.apply(i, entries);
                let n = responses.len();
                for (resp, op) in responses.into_iter().zip(writes) {
                    if let Some(op) = op {
                        self.answer_write(op, resp);
                    }
                }
                if let Some(Err((got, want))) = self.nodes[i].x.as_mut().map(|x| x.applied_batch(n))
                {
                    self.fail(format!("node {id}: {got} responses for {want} entries"));
                }
            }
            SmOp::BuildSnapshot => unreachable!("builds begin in start_sm_op"),
            SmOp::ReadSnapshotChunk {
                to,
                term,
                meta,
                offset,
            } => {
                let chunk = self.opts.config.snapshot_chunk_bytes as u64;
                let n = &mut self.nodes[i];
                let readable = [&n.disk.snapshot, &n.disk.previous_snapshot];
                let msg = match readable
                    .into_iter()
                    .flatten()
                    .find(|(m, _)| m.id == meta.id)
                {
                    Some((_, data)) => {
                        let len = data.len() as u64;
                        let start = offset.min(len);
                        let end = (start + chunk).min(len);
                        Some(Message::InstallSnapshot(InstallSnapshotRequest::chunk(
                            term,
                            id,
                            meta,
                            offset,
                            data[start as usize..end as usize].to_vec(),
                            end == len,
                        )))
                    }
                    _ => None,
                };
                if let Some(x) = n.x.as_mut() {
                    x.snapshot_chunk_read(to, msg);
                }
            }
            SmOp::WriteSnapshotChunk { offset, data, .. } => {
                let st = &mut self.nodes[i].staging;
                if offset == 0 {
                    st.clear();
                }
                if offset as usize != st.len() {
                    let have = st.len();
                    self.fail(format!(
                        "node {id} asked to write snapshot chunk at {offset} after {have}"
                    ));
                }
                st.extend_from_slice(&data);
                if let Some(x) = self.nodes[i].x.as_mut() {
                    x.snapshot_chunk_written();
                }
            }
            SmOp::InstallSnapshot { meta } => {
                let data = std::mem::take(&mut self.nodes[i].staging);
                let sm = C::decode(&data).unwrap_or_else(|e| {
                    panic!("node {id}: received snapshot does not decode: {e}")
                });
                if C::applied(&sm) != meta.last_log_id {
                    self.fail(format!(
                        "node {id}: snapshot data is at {} but meta says {}",
                        C::applied(&sm),
                        meta.last_log_id
                    ));
                }
                if C::applied(&sm).index < self.nodes[i].applied_seen {
                    self.fail(format!(
                        "node {id}: installing a snapshot moved applied backwards"
                    ));
                }
                let n = &mut self.nodes[i];
                n.sm = sm;
                n.disk.snapshot = Some((meta.clone(), data));
                n.disk.previous_snapshot = None;
                n.applied_seen = meta.last_log_id.index;
                self.stats.snapshots_installed += 1;
                if let Some(x) = n.x.as_mut() {
                    x.snapshot_installed(&meta);
                }
            }
        }
        self.start_sm_op(i);
    }

    /// Begins the build at the head of node `i`'s state-machine worker:
    /// the state is captured now, the snapshot becomes durable after a disk
    /// latency, and the applies queued behind it go on meanwhile.
    fn begin_build(&mut self, i: usize) {
        let data = match C::encode(&self.nodes[i].sm) {
            Ok(data) => data,
            Err(e) => self.fail(format!(
                "node {}: state does not encode: {e}",
                self.nodes[i].id
            )),
        };
        let n = &mut self.nodes[i];
        n.sm_worker.pop_front();
        self.seq += 1;
        let meta = SnapshotMeta {
            last_log_id: C::applied(&n.sm),
            membership: C::membership(&n.sm),
            id: self.seq,
            size: data.len() as u64,
        };
        let extra = self.snapshot_ms(meta.size);
        let n = &mut self.nodes[i];
        n.building = Some((meta, data));
        let lat = n.disk_latency_ms.unwrap_or(self.opts.disk_latency_ms);
        let lat = self.latency(lat) + extra;
        let epoch = self.nodes[i].epoch;
        self.schedule(lat, EventKind::BuildDone { node: i, epoch });
        self.start_sm_op(i);
    }

    /// The time a snapshot of `size` bytes takes to build or install
    /// beyond one storage action ([`SimOptions::snapshot_ms_per_kib`]).
    fn snapshot_ms(&self, size: u64) -> u64 {
        size.div_ceil(1024) * self.opts.snapshot_ms_per_kib
    }

    /// Node `i`'s snapshot build is durable: it becomes the current one.
    fn finish_build(&mut self, i: usize) {
        if self.storage_fails(i) {
            return;
        }
        let n = &mut self.nodes[i];
        let Some((meta, data)) = n.building.take() else {
            return;
        };
        if C::applied(&n.sm).index > meta.last_log_id.index {
            self.coverage.hit(Reach::AppliedDuringBuild);
        }
        let n = &mut self.nodes[i];
        n.disk.previous_snapshot = n.disk.snapshot.replace((meta.clone(), data));
        if let Some(x) = n.x.as_mut() {
            x.snapshot_built(meta);
        }
        self.start_sm_op(i);
    }

    /// Applies committed entries to node `i`'s state machine, checking that
    /// every node applies the same entry at each index.
    fn apply(&mut self, i: usize, entries: Vec<Entry<C>>) -> Vec<C::Response> {
        let id = self.nodes[i].id;
        let mut out = Vec::with_capacity(entries.len());
        for e in entries {
            let idx = e.log_id.index;
            let prev = C::applied(&self.nodes[i].sm).index;
            if idx != prev.next() {
                self.fail(format!("node {id} applies {idx} after {prev}"));
            }
            match self.committed.get(&idx) {
                Some(c) if *c != e.log_id => self.fail(format!(
                    "node {id} applies {} at index {idx} where {c} was committed",
                    e.log_id
                )),
                Some(_) => {}
                None => self.fail(format!(
                    "node {id} applies {} at index {idx}, which no leader committed",
                    e.log_id
                )),
            }
            out.push(C::apply(&mut self.nodes[i].sm, e));
            self.nodes[i].applied_seen = idx;
        }
        out
    }
}
