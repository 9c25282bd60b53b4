//! Simulated clients: proposals, reads and membership changes, with every
//! operation recorded for the linearizability checker.

use super::*;

impl<C: SimApp> Sim<C> {
    /// Starts `n` clients issuing puts, gets and compare-and-sets on `keys`
    /// keys until [`Sim::stop_clients`].
    pub fn start_clients(&mut self, n: usize, keys: usize) {
        self.keys = (0..keys).map(|k| format!("k{k}")).collect();
        while self.clients.len() < n {
            let target = self.rng.range(0, self.nodes.len() as u64) as usize;
            self.clients.push(Client {
                target,
                current: None,
                next_at: self.now,
                seq: 0,
            });
        }
        self.clients_running = true;
    }

    /// Stops the background clients; operations in flight finish or time out.
    pub fn stop_clients(&mut self) {
        self.clients_running = false;
    }

    /// Proposes a put on whichever node leads now; returns the op number.
    pub fn propose_put(&mut self, key: &str, value: &str) -> Option<usize> {
        let leader = self.leader()?;
        self.propose_put_on(leader, key, value)
    }

    /// Proposes a put on node `id` (which may or may not lead).
    pub fn propose_put_on(&mut self, id: NodeId, key: &str, value: &str) -> Option<usize> {
        let i = self.idx(id);
        self.nodes[i].engine()?;
        let kind = OpKind::Put(value.to_string());
        let cmd = C::command(key, &kind)?;
        let op = self.new_op(usize::MAX, i, key.to_string(), kind);
        self.nodes[i].inbox.push_back(Input::Propose { op, cmd });
        self.process(i);
        Some(op)
    }

    /// Asks the current leader for a membership change and returns the
    /// engine's answer (the proposed entry, or why it was refused). The
    /// change is only proposed: run the simulation for it to commit.
    pub fn change(&mut self, change: MembershipChange) -> Result<LogId, ProposeError<C::Node>> {
        let no_leader = || {
            ProposeError::NotLeader(crate::error::NotLeader {
                leader_id: None,
                leader_node: None,
            })
        };
        let Some(l) = self.leader() else {
            return Err(no_leader());
        };
        let i = self.idx(l);
        self.change_result = None;
        self.nodes[i].inbox.push_back(Input::Membership(change));
        self.process(i);
        self.run_until(1_000, |s| s.change_result.is_some());
        self.change_result
            .take()
            .unwrap_or_else(|| Err(no_leader()))
    }

    /// Asks the current leader to hand leadership to `to`.
    pub fn transfer_leader(&mut self, to: NodeId) {
        if let Some(l) = self.leader() {
            let i = self.idx(l);
            self.nodes[i].inbox.push_back(Input::Transfer(to));
            self.process(i);
        }
    }

    /// Writes that occur more than once in the leader's log. Every put and
    /// every CAS that sets a value carries a value unique to its client
    /// operation, so a repeat is a duplicated write.
    pub fn duplicated_commands(&self) -> Vec<C::Command> {
        let Some(e) = self.leader().and_then(|l| self.engine(l)) else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        e.log()
            .range(e.log().first_index(), e.log().last_index())
            .filter_map(|entry| match &entry.payload {
                EntryPayload::Command(c) if C::writes_unique_value(c) => Some(&**c),
                _ => None,
            })
            .filter(|c| !seen.insert(format!("{c:?}")))
            .cloned()
            .collect()
    }

    /// The leader's configuration, if it is final (not joint) and committed.
    pub fn settled_voters(&self) -> Option<BTreeSet<NodeId>> {
        let e = self.engine(self.leader()?)?;
        let m = e.membership();
        (!m.is_joint() && e.membership_log_id().index <= e.commit_index()).then(|| m.voter_ids())
    }

    /// Starts a linearizable read of `key` on node `id`; returns the op number.
    pub fn read_on(&mut self, id: NodeId, key: &str) -> Option<usize> {
        let i = self.idx(id);
        self.nodes[i].engine()?;
        let op = self.new_op(usize::MAX, i, key.to_string(), OpKind::Get);
        self.nodes[i].inbox.push_back(Input::Read { op });
        self.process(i);
        Some(op)
    }

    /// The value a successful read `op` returned.
    pub fn read_result(&self, op: usize) -> Option<Option<String>> {
        match &self.ops[op].state {
            OpState::Ok(_, OpOutput::Get(v)) => Some(v.clone()),
            _ => None,
        }
    }

    /// Whether op `op` is still waiting for an outcome.
    pub fn op_pending(&self, op: usize) -> bool {
        self.ops[op].state == OpState::Pending
    }

    /// Whether op `op` completed successfully.
    pub fn op_succeeded(&self, op: usize) -> bool {
        matches!(self.ops[op].state, OpState::Ok(..))
    }

    pub(super) fn new_op(
        &mut self,
        client: usize,
        node: usize,
        key: String,
        kind: OpKind,
    ) -> usize {
        self.ops.push(OpRecord {
            client,
            node,
            key,
            kind,
            invoke: self.now,
            state: OpState::Pending,
        });
        self.ops.len() - 1
    }

    pub(super) fn finish_op(&mut self, op: usize, state: OpState) {
        let rec = &mut self.ops[op];
        let upgrade = matches!(rec.state, OpState::Pending)
            || (matches!(rec.state, OpState::Unknown)
                && matches!(state, OpState::Ok(..) | OpState::Failed));
        if !upgrade {
            return;
        }
        match (&rec.state, &state) {
            (OpState::Unknown, _) => self.stats.ops_unknown -= 1,
            (OpState::Pending, _) => {}
            _ => {}
        }
        match &state {
            OpState::Ok(..) => self.stats.ops_ok += 1,
            OpState::Failed => self.stats.ops_failed += 1,
            OpState::Unknown => self.stats.ops_unknown += 1,
            OpState::Pending => {}
        }
        rec.state = state;
        if rec.client != usize::MAX && self.clients[rec.client].current == Some(op) {
            let c = &mut self.clients[rec.client];
            c.current = None;
            c.next_at = self.now + 1;
        }
    }

    pub(super) fn drive_clients(&mut self) {
        let timeout = self.opts.op_timeout_ms;
        for c in 0..self.clients.len() {
            if let Some(op) = self.clients[c].current {
                if self.now >= self.ops[op].invoke + timeout {
                    self.finish_op(op, OpState::Unknown);
                    let n = self.nodes.len() as u64;
                    self.clients[c].target = self.rng.range(0, n) as usize;
                }
                continue;
            }
            if !self.clients_running || self.now < self.clients[c].next_at {
                continue;
            }
            let key = self.keys[self.rng.range(0, self.keys.len() as u64) as usize].clone();
            self.clients[c].seq += 1;
            let value = format!("c{c}-{}", self.clients[c].seq);
            let roll = self.rng.range(0, 10);
            let kind = match roll {
                0..=3 => OpKind::Put(value),
                4..=6 => OpKind::Get,
                _ => {
                    // CAS from the value this client last saw, or from absent.
                    let expected = if self.rng.chance(0.3) {
                        None
                    } else {
                        self.last_value(&key)
                    };
                    let new = if self.rng.chance(0.1) {
                        None
                    } else {
                        Some(value)
                    };
                    OpKind::Cas { expected, new }
                }
            };
            let input = C::command(&key, &kind);
            let target = self.clients[c].target;
            let op = self.new_op(c, target, key, kind);
            self.clients[c].current = Some(op);
            let input = match input {
                Some(cmd) => Input::Propose { op, cmd },
                None => Input::Read { op },
            };
            if self.nodes[target].x.is_none() {
                self.finish_op(op, OpState::Failed);
                self.clients[c].target = self.rng.range(0, self.nodes.len() as u64) as usize;
                continue;
            }
            self.nodes[target].inbox.push_back(input);
            self.process(target);
        }
    }

    pub(super) fn last_value(&self, key: &str) -> Option<String> {
        self.ops
            .iter()
            .rev()
            .filter(|o| o.key == key)
            .find_map(|o| match &o.state {
                OpState::Ok(_, OpOutput::Get(v)) => v.clone(),
                OpState::Ok(_, OpOutput::Cas { current, .. }) => current.clone(),
                _ => None,
            })
    }

    pub(super) fn redirect(&mut self, op: usize, hint: Option<NodeId>) {
        let client = self.ops[op].client;
        if client == usize::MAX {
            return;
        }
        let n = self.nodes.len() as u64;
        self.clients[client].target = match hint {
            Some(l) => self.idx(l),
            None => self.rng.range(0, n) as usize,
        };
    }

    /// The client history in checker form.
    pub fn history(&self) -> Vec<Operation> {
        self.ops
            .iter()
            .filter_map(|o| {
                let complete = match &o.state {
                    OpState::Ok(t, out) => Some((*t, out.clone())),
                    OpState::Unknown | OpState::Pending => None,
                    OpState::Failed => return None,
                };
                Some(Operation {
                    key: o.key.clone(),
                    kind: o.kind.clone(),
                    invoke: o.invoke,
                    complete,
                })
            })
            .collect()
    }

    /// Checks the recorded history for linearizability; panics with the seed.
    pub fn check_linearizable(&self) {
        if let Err(v) = linearizability::check(&self.history(), 2_000_000) {
            self.fail(format!(
                "history of key {} ({} ops) is not linearizable: {}",
                v.key, v.ops, v.detail
            ));
        }
    }
}
