//! The safety checks run after every event: election safety, log
//! matching, leader completeness, state-machine safety, and durability of
//! what was acknowledged.

use super::*;

impl<C: SimApp> Sim<C> {
    pub(super) fn check_node(&mut self, i: usize) {
        let id = self.nodes[i].id;
        let e = self.nodes[i].engine().expect("live node");
        let (term, commit, is_leader) = (e.term(), e.commit_index(), e.is_leader());
        let n = &self.nodes[i];
        if term < n.term_seen {
            self.fail(format!(
                "node {id} term went back from {} to {term}",
                n.term_seen
            ));
        }
        if commit < n.commit_seen {
            self.fail(format!(
                "node {id} commit went back from {} to {commit}",
                n.commit_seen
            ));
        }
        // A leader's commit (also one that stepped down by committing its
        // own removal) is checked against the protocol and becomes the
        // ground truth; a follower may only commit what a leader did.
        let leader_commit = is_leader || (n.was_leader && term == n.term_seen);
        if commit > n.commit_seen && leader_commit {
            self.monitor_leader_commit(i, commit, &n.membership_seen);
        }
        let base = e.log().base().index;
        for idx in (n.commit_seen.0 + 1)..=commit.0 {
            let idx = LogIndex(idx);
            if idx <= base {
                continue;
            }
            let Some(log_id) = e.log().log_id_at(idx) else {
                self.fail(format!("node {id} committed {idx} beyond its log"));
            };
            match self.committed.get(&idx) {
                Some(c) if *c != log_id => self.fail(format!(
                    "node {id} committed {log_id} at {idx}, but {c} was committed there"
                )),
                Some(_) => {}
                None if leader_commit => {
                    self.committed.insert(idx, log_id);
                }
                None => self.fail(format!(
                    "follower {id} committed {log_id}, which no leader has committed"
                )),
            }
        }
        if is_leader && !n.was_leader {
            // Election Safety.
            if let Some(other) = self.leaders.insert(term, id)
                && other != id
            {
                self.fail(format!("two leaders in term {term}: {other} and {id}"));
            }
            self.stats.elections_won += 1;
            // Leader Completeness.
            for (idx, c) in self.committed.range(base.next()..) {
                if e.log().term_at(*idx) != Some(c.term) {
                    self.fail(format!(
                        "leader {id} of term {term} lacks committed entry {c}"
                    ));
                }
            }
            self.monitor_election(i);
        }
        if is_leader {
            self.monitor_leader_state(i);
        }
        let e = self.nodes[i].engine().expect("live node");
        let membership =
            (e.membership() != &self.nodes[i].membership_seen).then(|| e.membership().clone());
        let n = &mut self.nodes[i];
        if let Some(m) = membership {
            n.membership_seen = m;
        }
        n.term_seen = term;
        n.commit_seen = commit;
        n.was_leader = is_leader;
    }

    /// Log Matching: every entry id determines its predecessor's term and its
    /// payload, so equal ids mean equal prefixes.
    pub(super) fn check_entries(&mut self, i: usize, entries: &[Entry<C>]) {
        // Checked as the entries reach the disk: the predecessor is what the
        // disk holds before them.
        let disk = &self.nodes[i].disk;
        let mut prev_term = disk
            .entries
            .last()
            .map(|e| e.log_id)
            .unwrap_or(disk.base)
            .term;
        for entry in entries {
            let mut h = DefaultHasher::new();
            format!("{:?}", entry.payload).hash(&mut h);
            let fp = (prev_term, h.finish());
            if let Some(old) = self.entry_ids.insert(entry.log_id, fp)
                && old != fp
            {
                self.fail(format!("two different entries share id {}", entry.log_id));
            }
            prev_term = entry.log_id.term;
        }
    }

    /// After the run: checks the history and that every node holding a
    /// state machine agrees with the committed log.
    pub fn final_check(&mut self) {
        self.check_linearizable();
        // State Machine Safety, end to end: nodes that applied up to the
        // same entry hold the same data.
        let mut seen: BTreeMap<LogId, &C::State> = BTreeMap::new();
        for n in self.nodes.iter().filter(|n| n.x.is_some()) {
            let applied = C::applied(&n.sm);
            if let Some(other) = seen.insert(applied, &n.sm)
                && other != &n.sm
            {
                self.fail(format!(
                    "two nodes applied up to {applied} but hold different data"
                ));
            }
        }
    }

    /// Liveness of answers: once the cluster has converged (every log
    /// repaired, everything committed applied), no node still holds a
    /// write waiting for an outcome. Every write is answered in the end,
    /// even one whose entry was cut off and whose index nothing reuses.
    pub fn check_every_write_answered(&mut self) {
        for n in self.nodes.iter() {
            if let Some(x) = &n.x
                && x.pending_writes() > 0
            {
                self.fail(format!(
                    "node {} still holds {} unanswered writes after the cluster converged:{}",
                    n.id,
                    x.pending_writes(),
                    self.describe()
                ));
            }
        }
    }

    /// Fails the run (with its seed) unless `cond` holds.
    pub fn expect(&self, cond: bool, what: impl FnOnce() -> String) {
        if !cond {
            self.fail(what());
        }
    }

    /// Puts `key = value` through whichever node leads, retrying across
    /// leader changes, until acknowledged or `max_ms` pass.
    pub fn put(&mut self, key: &str, value: &str, max_ms: u64) -> bool {
        let deadline = self.now + max_ms;
        while self.now < deadline {
            let Some(op) = self.propose_put(key, value) else {
                self.run_for(10);
                continue;
            };
            let wait = self.opts.op_timeout_ms.min(deadline - self.now);
            self.run_until(wait, |s| s.ops[op].state != OpState::Pending);
            if self.op_succeeded(op) {
                return true;
            }
            if self.ops[op].state == OpState::Pending {
                self.finish_op(op, OpState::Unknown);
            }
        }
        false
    }

    /// Operations that completed successfully.
    pub fn acknowledged(&self) -> usize {
        self.ops
            .iter()
            .filter(|o| matches!(o.state, OpState::Ok(..)))
            .count()
    }

    /// Every acknowledged put whose value is the latest acknowledged write of
    /// its key must be what a linearizable read returns now; the caller
    /// should have converged first. Returns how many keys were checked.
    pub fn check_acknowledged_writes_present(&mut self) -> usize {
        let Some(l) = self.leader() else {
            self.fail("no leader to read from".into())
        };
        let sm = &self.nodes[self.idx(l)].sm;
        // Every key's final value must be one a linearization allows: the
        // linearizability check covers that; here we add a read at the end
        // of the history for every key so it is part of the check.
        let keys: Vec<String> = self.keys.clone();
        for k in &keys {
            let v = C::read(sm, k);
            let t = self.now;
            self.ops.push(OpRecord {
                client: usize::MAX,
                node: usize::MAX,
                key: k.clone(),
                kind: OpKind::Get,
                invoke: t,
                state: OpState::Ok(t, OpOutput::Get(v)),
            });
        }
        self.check_linearizable();
        keys.len()
    }
}
