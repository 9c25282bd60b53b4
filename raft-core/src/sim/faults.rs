//! Faults the simulator injects: partitions, lossy links, crashes at
//! chosen points, slow disks, pauses, restarts and wipes.

use super::*;

impl<C: SimApp> Sim<C> {
    /// Cuts every link between `a` and `b`, both ways.
    pub fn cut(&mut self, a: NodeId, b: NodeId) {
        self.blocked.insert((a, b));
        self.blocked.insert((b, a));
    }

    /// Cuts the link from `a` to `b` only.
    pub fn cut_one_way(&mut self, from: NodeId, to: NodeId) {
        self.blocked.insert((from, to));
    }

    /// Cuts `id` off from everyone.
    pub fn isolate(&mut self, id: NodeId) {
        for other in self.ids() {
            if other != id {
                self.cut(id, other);
            }
        }
    }

    /// Splits the cluster: nodes in different groups cannot talk.
    pub fn partition(&mut self, groups: &[Vec<NodeId>]) {
        for (i, g) in groups.iter().enumerate() {
            for h in groups.iter().skip(i + 1) {
                for a in g {
                    for b in h {
                        self.cut(*a, *b);
                    }
                }
            }
        }
    }

    /// Restores every link.
    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    /// Sets how every link behaves (links with their own settings keep them).
    pub fn set_net(&mut self, net: NetOptions) {
        self.opts.net = net;
    }

    /// Sets how the link from `from` to `to` behaves (delay, loss,
    /// duplication), overriding [`Sim::set_net`] for it.
    pub fn set_link(&mut self, from: NodeId, to: NodeId, net: NetOptions) {
        self.links.insert((from, to), net);
    }

    /// Drops every per-link setting.
    pub fn clear_links(&mut self) {
        self.links.clear();
    }

    /// Crashes a node: in-progress storage actions and volatile state are lost.
    pub fn crash(&mut self, id: NodeId) {
        let i = self.idx(id);
        let Some(e) = self.nodes[i].engine() else {
            return;
        };
        self.stats.crashes += 1;
        if e.voted_for().is_some_and(|v| v != id) {
            self.coverage.hit(Reach::CrashAfterVoteGranted);
        }
        self.lose_in_flight_write(i);
        let n = &mut self.nodes[i];
        n.armed_crash = None;
        n.paused_until = 0;
        n.x = None;
        n.epoch += 1;
        n.inbox.clear();
        n.log_worker.clear();
        n.log_busy = false;
        n.log_handed = 0;
        n.log_done_count = 0;
        n.log_replies.clear();
        n.sm_worker.clear();
        n.sm_busy = false;
        n.building = None;
        n.staging.clear();
        n.sm = C::State::default();
        // Writes and reads the node was working on: their outcome is unknown.
        for op in 0..self.ops.len() {
            if self.ops[op].state == OpState::Pending && self.ops[op].node == i {
                self.finish_op(op, OpState::Unknown);
            }
        }
    }

    /// Crashes `id` as soon as its current (or next) storage action
    /// completes, before the replies that depend on it go out.
    pub fn crash_after_persist(&mut self, id: NodeId) {
        self.arm_crash(id, ArmedCrash::AfterPersist);
    }

    /// Crashes `id` in the middle of its next log append of several
    /// entries, leaving a random prefix of them on disk.
    pub fn crash_mid_append(&mut self, id: NodeId) {
        self.arm_crash(id, ArmedCrash::MidAppend);
    }

    pub(super) fn arm_crash(&mut self, id: NodeId, when: ArmedCrash) {
        let i = self.idx(id);
        if self.nodes[i].x.is_some() {
            self.nodes[i].armed_crash = Some(when);
        }
    }

    /// Cancels every crash armed by [`Sim::crash_after_persist`] or
    /// [`Sim::crash_mid_append`] that has
    /// not fired yet.
    pub fn disarm_crashes(&mut self) {
        for n in &mut self.nodes {
            n.armed_crash = None;
        }
    }

    /// Gives node `id` its own storage latency (a slow disk), or back the
    /// common one with `None`.
    pub fn set_disk_latency(&mut self, id: NodeId, ms: Option<(u64, u64)>) {
        let i = self.idx(id);
        self.nodes[i].disk_latency_ms = ms;
    }

    /// Pauses node `id` for `ms` (SIGSTOP, a long GC pause, a starved CPU):
    /// it handles nothing and fires no timer; what arrives meanwhile waits,
    /// in order, for it to resume.
    pub fn pause(&mut self, id: NodeId, ms: u64) {
        let i = self.idx(id);
        if self.nodes[i].x.is_none() {
            return;
        }
        self.nodes[i].paused_until = self.now + ms;
        self.schedule(ms, EventKind::Resume { node: i });
    }

    /// Makes `id` start an election at once (skipping pre-vote), as an
    /// operator's or a transfer's forced campaign would.
    pub fn force_election(&mut self, id: NodeId) {
        let i = self.idx(id);
        if self.nodes[i].x.is_some() {
            self.nodes[i].inbox.push_back(Input::Campaign);
            self.process(i);
        }
    }

    /// Restarts a crashed node from its disk.
    pub fn restart(&mut self, id: NodeId) {
        let i = self.idx(id);
        if self.nodes[i].x.is_some() {
            return;
        }
        let seed = self.rng.next_u64();
        let n = &mut self.nodes[i];
        n.failed = false;
        let (snapshot, sm) = match &n.disk.snapshot {
            Some((meta, data)) => {
                let sm = C::decode(data)
                    .unwrap_or_else(|e| panic!("snapshot of node {id} undecodable: {e}"));
                (Some(meta.clone()), sm)
            }
            None => (None, C::State::default()),
        };
        let state = RecoveredState {
            hard_state: n.disk.hard_state,
            log_base: n.disk.base,
            entries: n.disk.entries.clone(),
            snapshot,
            applied: C::applied(&sm),
        };
        n.sm = sm;
        // What was not durable may be forgotten; what was, never.
        n.term_seen = n.disk.hard_state.term;
        n.commit_seen = C::applied(&n.sm).index;
        n.applied_seen = C::applied(&n.sm).index;
        n.was_leader = false;
        let applied = C::applied(&n.sm).index;
        let engine = Engine::new(id, self.opts.config.clone(), seed, self.now, state)
            .unwrap_or_else(|e| self.fail(format!("node {id} cannot recover its own disk: {e}")));
        self.nodes[i].membership_seen = engine.membership().clone();
        self.nodes[i].x = Some(Executor::new(engine, applied, mode_of(&self.opts)));
        self.process(i);
    }

    /// Crashes `id` and replaces its storage with an empty one (a disk
    /// wiped or swapped), then starts it again under its old id: it has
    /// lost its vote and every entry it acknowledged, and draws a new
    /// identity ([`crate::NodeUuid`]).
    pub fn wipe(&mut self, id: NodeId) {
        self.crash(id);
        let i = self.idx(id);
        let old = std::mem::take(&mut self.nodes[i].disk);
        self.nodes[i].wiped_disks.push(old);
        self.stats.wipes += 1;
        self.restart(id);
    }

    /// Crash and restart in one step.
    pub fn power_cycle(&mut self, id: NodeId) {
        self.crash(id);
        self.restart(id);
    }
}
