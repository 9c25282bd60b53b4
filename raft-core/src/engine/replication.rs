//! Log replication (§5.3): the leader appends and sends, followers check
//! and append, the leader commits on a majority (§5.4.2) and applies.

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// Proposes a command. On the leader it is appended to the log and will
    /// be replicated at the next [`Engine::take_actions`]; the returned log id
    /// identifies it when it is applied.
    pub fn propose(&mut self, command: C::Command) -> Result<LogId, ProposeError<C::Node>> {
        self.propose_payload(EntryPayload::command(command))
    }

    pub(super) fn propose_payload(
        &mut self,
        payload: EntryPayload<C>,
    ) -> Result<LogId, ProposeError<C::Node>> {
        match &self.role {
            RoleState::Leader(l) if l.transfer.is_some() => Err(ProposeError::TransferInProgress),
            RoleState::Leader(_) => Ok(self.leader_append(payload)),
            _ => Err(ProposeError::NotLeader(self.not_leader())),
        }
    }

    /// Reports that an `AppendLog` ending at `last` is durable.
    pub fn log_persisted(&mut self, last: LogId) {
        if last.index > self.durable && self.log.matches(last) {
            self.durable = last.index;
            if self.is_leader() {
                self.maybe_commit();
            }
            self.evict_cached();
        }
    }

    /// Reports the entries a [`Action::ReadEntries`] for `peer` starting at
    /// `from` read back from the `LogStore`: they go out to `peer` as far as
    /// flow control allows, if it still needs them. Entries that are not
    /// this log's (purged or replaced since) are dropped.
    pub fn entries_read(&mut self, peer: NodeId, from: LogIndex, entries: Vec<Entry<C>>) {
        let (id, now) = (self.id, self.now);
        let Some(round) = self.role.leader().map(|l| l.round) else {
            return;
        };
        let header = self.append_header(round);
        let (max_n, max_bytes, max_inflight) = (
            self.config.max_entries_per_message,
            self.config.max_bytes_per_message,
            self.config.max_inflight,
        );
        let log = &self.log;
        // Only a prefix that continues `from` and agrees with this log.
        let valid = entries
            .iter()
            .enumerate()
            .take_while(|(i, e)| e.log_id.index == from.plus(*i as u64) && log.matches(e.log_id))
            .count();
        let prev_log_id = log.log_id_at(from.prev());
        let Some(l) = self.role.leader_mut() else {
            return;
        };
        let Some(p) = l.progress.get_mut(&peer) else {
            return;
        };
        if p.reading != Some(from) {
            return; // a read its progress moved on from; a newer one may be out
        }
        p.reading = None;
        let mut entries = entries;
        entries.truncate(valid);
        let mut rest = entries.into_iter();
        if p.next == from
            && let Some(mut prev_log_id) = prev_log_id
            && !matches!(p.state, ProgressState::Snapshot { .. })
        {
            while !rest.as_slice().is_empty() && p.can_send(max_inflight) {
                let probing = matches!(p.state, ProgressState::Probe { .. });
                let n = batch_len(rest.as_slice(), max_n, max_bytes);
                let batch: Vec<_> = rest.by_ref().take(n).collect();
                p.record_sent(prev_log_id.index.plus(batch.len() as u64), now);
                let next_prev = batch.last().map_or(prev_log_id, |e| e.log_id);
                self.actions.push(header.send(peer, prev_log_id, batch));
                prev_log_id = next_prev;
                if probing {
                    return;
                }
            }
        } else if valid == 0 {
            debug!(node = %id, peer = %peer, from = %from, "entries read back are no longer needed");
        }
        self.send_append(peer);
    }

    /// Drops cached entry payloads past [`Config::log_cache_bytes`]; only
    /// entries that are durable and handed to the state machine go.
    pub(super) fn evict_cached(&mut self) {
        let upto = self.durable.min(self.applied);
        self.log.evict(upto, self.config.log_cache_bytes);
    }

    pub(super) fn leader_append(&mut self, payload: EntryPayload<C>) -> LogId {
        let log_id = LogId {
            term: self.term,
            index: self.log.last_index().next(),
        };
        let is_membership = matches!(payload, EntryPayload::Membership(_));
        if let EntryPayload::Membership(m) = &payload {
            self.log_memberships.push((log_id, m.clone()));
        }
        self.log.push(Entry { log_id, payload });
        self.unflushed.get_or_insert(log_id.index);
        if is_membership {
            let keep = std::mem::take(&mut self.leader_mut().progress);
            let progress = self.peer_progress(log_id.index, &keep);
            self.leader_mut().progress = progress;
        }
        log_id
    }

    /// A leader that steps down must still persist what it appended.
    pub(super) fn flush_leader_entries(&mut self) {
        if let Some(from) = self.unflushed.take() {
            let entries = self
                .log
                .range(from, self.log.last_index())
                .cloned()
                .collect();
            self.actions.push(Action::AppendLog { entries });
        }
    }

    pub(super) fn replicate_all(&mut self) {
        let peers: Vec<NodeId> = self.leader().progress.keys().copied().collect();
        for peer in peers {
            self.send_append(peer);
        }
    }

    /// Sends `peer` what it is missing, as far as flow control allows.
    pub(super) fn send_append(&mut self, peer: NodeId) {
        loop {
            let last = self.log.last_index();
            let base = self.log.base().index;
            let (term, id, now) = (self.term, self.id, self.now);
            let (max_n, max_bytes, max_inflight) = (
                self.config.max_entries_per_message,
                self.config.max_bytes_per_message,
                self.config.max_inflight,
            );
            let (window, chunk) = (
                self.config.snapshot_window,
                self.config.snapshot_chunk_bytes,
            );
            // The snapshot this peer's next message needs, if any: looked up
            // before the leader's state is borrowed for writing, and cloned
            // only on that path (not for every AppendEntries).
            let mut refresh = false;
            let snapshot = match &self.role {
                RoleState::Leader(l) => match l.progress.get(&peer) {
                    Some(p) => match &p.state {
                        ProgressState::Snapshot { snapshot_id, .. } => {
                            match p.state.snapshot_chunk_due(window, chunk) {
                                Some(_) => self.sendable_snapshot(*snapshot_id),
                                None => return,
                            }
                        }
                        _ if p.next <= base => {
                            refresh = self.refresh_before_transfer();
                            self.snapshot.clone().filter(|_| !refresh)
                        }
                        _ => None,
                    },
                    None => return,
                },
                _ => return,
            };
            if refresh {
                // The peer stays where it is; its next probe after the
                // build starts the transfer with what it built (or with
                // what the build already under way builds).
                self.building_for_transfer = true;
                if !self.building_snapshot {
                    info!(node = %id, peer = %peer, "building a fresh snapshot to send");
                    self.start_snapshot_build();
                }
                return;
            }
            let Some(l) = self.role.leader_mut() else {
                return;
            };
            let round = l.round;
            let Some(p) = l.progress.get_mut(&peer) else {
                return;
            };
            if let Some(offset) = p.state.snapshot_chunk_due(window, chunk) {
                let Some(meta) = snapshot else {
                    p.become_probe(); // two builds replaced it; start again
                    continue;
                };
                if let ProgressState::Snapshot {
                    sent, active_at, ..
                } = &mut p.state
                {
                    *sent = offset.saturating_add(chunk as u64);
                    *active_at = now;
                }
                self.actions.push(Action::SendSnapshotChunk {
                    to: peer,
                    term,
                    meta,
                    offset,
                });
                continue; // the rest of the window
            }
            if p.next <= base {
                // The entries it needs were compacted away (§7).
                let Some(meta) = snapshot else {
                    warn!(node = %id, peer = %peer, "peer needs purged entries but no snapshot exists");
                    return;
                };
                info!(node = %id, peer = %peer, snapshot = %meta.last_log_id, "sending snapshot");
                self.snapshots_sent += 1;
                p.state = ProgressState::Snapshot {
                    snapshot_id: meta.id,
                    size: meta.size,
                    acked: 0,
                    sent: 0,
                    active_at: now,
                    started_at: now,
                };
                p.inflight.clear();
                continue; // its first window
            }
            let probing = matches!(p.state, ProgressState::Probe { .. });
            if p.reading == Some(p.next) || !p.can_send(max_inflight) || (!probing && p.next > last)
            {
                return;
            }
            let prev_index = p.next.prev();
            let Some(prev_log_id) = self.log.log_id_at(prev_index) else {
                return;
            };
            if p.next < self.log.cached_from() && p.next <= last {
                // Evicted from the cache: read them back, then send. Enough
                // for the room left in the window, not one message: each
                // read waits its turn behind the leader's own appends, so a
                // read per message fed a follower far behind more slowly
                // than clients wrote (seen in `cargo xtask bench join`: 2,000
                // of 5,000 entries/s, until it needed a snapshot). Bounded
                // by bytes too, as far as the cached entries' mean size
                // tells, so large values do not make a large read. And past
                // the cache's edge, up to the last entry: the edge moves on
                // while the read waits (the appends ahead of it evict as
                // they finish), so a read that stopped there left the
                // follower at the edge, fed exactly as fast as clients
                // wrote, a cache's worth behind for good (join bench:
                // 60,000-120,000 entries for minutes). Every entry up to
                // `last` is durable by the read's turn: it runs after every
                // earlier log action.
                let room = match p.state {
                    ProgressState::Probe { .. } => 1,
                    _ => max_inflight.saturating_sub(p.inflight.len()).max(1),
                };
                let n = match self.log.mean_cached_bytes() {
                    Some(mean) => (max_n * room)
                        .min(max_bytes.saturating_mul(room) / mean.max(1))
                        .max(max_n),
                    None => max_n, // no size to go by: one message's worth
                };
                let to = last.min(p.next.plus(n as u64 - 1));
                p.reading = Some(p.next);
                self.actions.push(Action::ReadEntries {
                    peer,
                    from: p.next,
                    to,
                });
                return;
            }
            let n = batch_len(self.log.range(p.next, last), max_n, max_bytes);
            let entries: Vec<_> = self.log.range(p.next, last).take(n).cloned().collect();
            p.record_sent(prev_index.plus(entries.len() as u64), now);
            let send = self.append_header(round).send(peer, prev_log_id, entries);
            self.actions.push(send);
            if probing {
                return;
            }
        }
    }

    /// A heartbeat round: an empty AppendEntries to every peer, numbered so
    /// the answers confirm leadership for ReadIndex.
    pub(super) fn broadcast_heartbeat(&mut self) {
        self.read_round_wanted = false;
        let now = self.now;
        let hb = self.config.heartbeat_interval_ms;
        let base = self.log.base();
        let l = self.leader_mut();
        l.round += 1;
        l.heartbeat_due = now + hb;
        let round = l.round;
        let mut sends = Vec::new();
        for (peer, p) in l.progress.iter_mut() {
            // In step: anchor on what it is known to hold. Probing: the
            // heartbeat doubles as the probe.
            let prev_index = match p.state {
                ProgressState::Replicate => p.matched,
                ProgressState::Probe { .. } => {
                    p.state = ProgressState::Probe { sent: true };
                    p.next.prev()
                }
                ProgressState::Snapshot { .. } => base.index,
            };
            sends.push((*peer, prev_index.max(base.index)));
        }
        let header = self.append_header(round);
        for (peer, prev_index) in sends {
            let prev_log_id = self.log.log_id_at(prev_index).unwrap_or(base);
            self.actions
                .push(header.send(peer, prev_log_id, Vec::new()));
        }
    }

    /// What every AppendEntries this leader sends now in heartbeat round
    /// `round` carries besides its entries.
    fn append_header(&self, round: u64) -> AppendHeader {
        AppendHeader {
            term: self.term,
            leader_id: self.id,
            leader_commit: self.commit,
            round,
            keep_from: self.log.first_index(),
        }
    }

    pub(super) fn on_append_entries(
        &mut self,
        from: NodeId,
        mut req: AppendEntriesRequest<C>,
    ) -> Result<(), StepError> {
        if req.leader_id != from {
            return Err(StepError::Malformed {
                from,
                kind: "append",
                reason: "leader_id differs from sender",
            });
        }
        validate_incoming(from, &req)?;
        self.accept_leader(from)?;
        self.leader_keeps_from = req.keep_from;
        self.leader_commit = self.leader_commit.max(req.leader_commit);
        let round = req.round;
        let respond =
            |this: &mut Self, success: bool, index: LogIndex, conflict: Option<ConflictHint>| {
                let msg = Message::AppendEntriesResponse(AppendEntriesResponse {
                    term: this.term,
                    success,
                    index,
                    conflict,
                    round,
                    uuid: this.uuid,
                });
                this.actions.push(Action::Respond { to: from, msg });
            };
        let base = self.log.base();
        if req.prev_log_id.index < base.index {
            // Everything up to our base is committed, so it matches the
            // leader's log: skip the part of the message that covers it.
            let skip = (base.index.0 - req.prev_log_id.index.0) as usize;
            if skip > req.entries.len() {
                respond(self, true, base.index, None);
                return Ok(());
            }
            if skip > 0 && req.entries[skip - 1].log_id != base {
                return Err(StepError::ConflictsWithCommitted {
                    from,
                    index: base.index,
                });
            }
            req.entries.drain(..skip);
            req.prev_log_id = base;
        }
        let prev = req.prev_log_id;
        let prev_matches = if mutant(Mutation::PrevLogTermUnchecked) {
            prev.index <= self.log.last_index()
        } else {
            self.log.matches(prev)
        };
        if !prev_matches {
            // §5.3 consistency check failed; hint where to resume.
            let conflict = if prev.index > self.log.last_index() {
                ConflictHint {
                    term: None,
                    index: self.log.last_index().next(),
                }
            } else {
                ConflictHint {
                    term: self.log.term_at(prev.index),
                    index: self.log.first_index_of_term_at(prev.index),
                }
            };
            if prev.index <= self.commit {
                return Err(StepError::ConflictsWithCommitted {
                    from,
                    index: prev.index,
                });
            }
            debug!(node = %self.id, leader = %from, prev = %prev, last = %self.log.last_index(), "append refused: previous entry missing");
            respond(self, false, prev.index, Some(conflict));
            return Ok(());
        }
        let last_new = prev.index.plus(req.entries.len() as u64);
        // Skip what we already hold; truncate at the first conflict (§5.3).
        let mut new_from = req.entries.len();
        for (i, e) in req.entries.iter().enumerate() {
            match self.log.term_at(e.log_id.index) {
                Some(t) if t == e.log_id.term || mutant(Mutation::ConflictingEntriesKept) => {
                    continue;
                }
                Some(_) => {
                    if e.log_id.index <= self.commit {
                        return Err(StepError::ConflictsWithCommitted {
                            from,
                            index: e.log_id.index,
                        });
                    }
                    self.truncate_log(e.log_id.index);
                    new_from = i;
                }
                None => new_from = i,
            }
            break;
        }
        let append_at = self.actions.len();
        if new_from < req.entries.len() {
            let entries: Vec<Entry<C>> = req.entries.drain(new_from..).collect();
            self.append_follower_entries(entries);
        }
        // Figure 2: commitIndex = min(leaderCommit, index of last new entry).
        let new_commit = if mutant(Mutation::FollowerCommitPastNewEntries) {
            req.leader_commit.min(self.log.last_index())
        } else {
            req.leader_commit.min(last_new)
        };
        if new_commit > self.commit {
            self.commit = new_commit;
            self.apply_committed();
        }
        respond(self, true, last_new, None);
        if mutant(Mutation::AckBeforePersist)
            && let Some(ack) = self.actions.pop()
        {
            self.actions.insert(append_at, ack);
        }
        Ok(())
    }

    /// A leader's message in our term: follow `from` and reset the election
    /// timer. Refuses a second leader in one term (Election Safety, §5.2).
    pub(super) fn accept_leader(&mut self, from: NodeId) -> Result<(), StepError> {
        let term = self.term;
        match self.role {
            RoleState::Leader(_) => return Err(StepError::TwoLeaders { from, term }),
            RoleState::Follower if self.leader_id.is_some_and(|l| l != from) => {
                return Err(StepError::TwoLeaders { from, term });
            }
            RoleState::Follower => {
                self.leader_id = Some(from);
                self.leader_contact = self.now;
                self.leader_known(from);
                self.reset_election_timer();
            }
            _ => self.become_follower(term, Some(from)),
        }
        Ok(())
    }

    pub(super) fn append_follower_entries(&mut self, entries: Vec<Entry<C>>) {
        for e in &entries {
            if let EntryPayload::Membership(m) = &e.payload {
                self.log_memberships.push((e.log_id, m.clone()));
            }
            self.log.push(e.clone());
        }
        self.actions.push(Action::AppendLog { entries });
    }

    pub(super) fn truncate_log(&mut self, from: LogIndex) {
        debug!(node = %self.id, from = %from, "truncating conflicting entries");
        self.log.truncate(from);
        self.log_memberships.retain(|(id, _)| id.index < from);
        self.durable = self.durable.min(from.prev());
        self.actions.push(Action::TruncateLog { from });
    }

    pub(super) fn purge_log(&mut self, upto: LogId) {
        self.log.purge(upto);
        while self
            .log_memberships
            .first()
            .is_some_and(|(id, _)| id.index <= upto.index)
        {
            self.base_membership = self.log_memberships.remove(0);
        }
    }

    pub(super) fn on_append_response(
        &mut self,
        from: NodeId,
        resp: AppendEntriesResponse,
    ) -> Result<(), StepError> {
        let last = self.log.last_index();
        let Some(l) = self.role.leader() else {
            return Ok(());
        };
        if !l.progress.contains_key(&from) {
            return Ok(());
        }
        if resp.success && resp.index > last {
            return Err(StepError::Malformed {
                from,
                kind: "append_resp",
                reason: "acknowledges past our log",
            });
        }
        self.answered_by(from, resp.uuid);
        let round = self.leader().round;
        let Some(l) = self.role.leader_mut() else {
            return Ok(());
        };
        let Some(p) = l.progress.get_mut(&from) else {
            return Ok(());
        };
        p.recent_active = true;
        p.last_heard = Some(self.now);
        p.acked_round = p.acked_round.max(resp.round);
        if resp.success {
            let advanced = p.on_match(resp.index, round);
            if advanced {
                p.advanced_at = self.now;
            }
            if matches!(p.state, ProgressState::Probe { .. }) {
                p.become_replicate();
            }
            if advanced {
                self.maybe_commit();
                if !self.is_leader() {
                    // Committing our own removal made us step down.
                    return Ok(());
                }
                if let Some((to, _)) = self.leader().transfer
                    && to == from
                {
                    self.maybe_send_timeout_now(from);
                }
            }
        } else {
            // Refused an entry at or below `matched` in a request sent
            // after `matched` was acknowledged. Within a term a follower
            // never drops what it acknowledged to the term's leader, so its
            // storage was wiped or rolled back. Trusting the old `matched`
            // would count entries it no longer holds toward commits, and
            // keep probing where it has nothing, so that it never caught
            // up. Start it over from the end of the log it now has.
            let lost = resp.index <= p.matched && resp.round > p.matched_round;
            if lost {
                error!(
                    peer = %from,
                    matched = %p.matched,
                    refused = %resp.index,
                    "follower lost entries it had acknowledged (storage wiped or rolled back?); \
                     replicating to it from its log's end"
                );
                p.matched = LogIndex(0);
                p.matched_round = round;
            }
            // A real rejection (not a reordered stale one): move back using
            // the follower's hint, skipping a whole term at a time. (A
            // rejection at exactly `matched` is left to the stall detector:
            // treating it as real stalled replication under heavy load,
            // see the closing note of the membership work.)
            if lost
                || (resp.index > p.matched && !matches!(p.state, ProgressState::Snapshot { .. }))
            {
                let next = match resp.conflict {
                    Some(ConflictHint {
                        term: Some(t),
                        index,
                    }) => self
                        .log
                        .last_index_of_term(t, resp.index)
                        .map(|i| i.next())
                        .unwrap_or(index),
                    Some(ConflictHint { term: None, index }) => index,
                    None => resp.index,
                };
                let Some(l) = self.role.leader_mut() else {
                    return Ok(());
                };
                let Some(p) = l.progress.get_mut(&from) else {
                    return Ok(());
                };
                p.become_probe();
                p.next = next.min(resp.index).max(p.matched.next());
                debug!(node = %self.id, peer = %from, refused = %resp.index, next = %p.next, "append refused; probing");
            }
        }
        self.send_append(from);
        Ok(())
    }

    /// Advances the commit index to what a quorum holds, counting replicas
    /// only for an entry of the current term (§5.4.2, Figure 8).
    pub(super) fn maybe_commit(&mut self) {
        let mut configs = self.membership().configs.clone();
        if mutant(Mutation::JointCommitNewMajorityOnly) {
            configs.truncate(1);
        }
        let me = self.id;
        let durable = if mutant(Mutation::LeaderCountsUnpersistedSelf) {
            self.log.last_index()
        } else {
            self.durable
        };
        let l = self.leader();
        let index = quorum::committed_index(&configs, |id| {
            if id == me {
                durable
            } else {
                l.progress
                    .get(&id)
                    .filter(|p| p.recognized)
                    .map(|p| p.matched)
                    .unwrap_or_default()
            }
        });
        if index > self.commit
            && (self.log.term_at(index) == Some(self.term)
                || mutant(Mutation::CommitOldTermByCounting))
        {
            self.commit = index;
            self.apply_committed();
            // §6: once C_old,new is committed, the leader moves on to C_new
            // (this also finishes a change a previous leader started).
            if self.membership().is_joint() && self.membership_log_id().index <= index {
                let joint = self.membership();
                let new_voters = joint.configs[0].clone();
                let mut learners = joint.learner_ids();
                if let Some(l) = self.role.leader() {
                    learners.extend(l.demoting.iter().copied());
                }
                let stays = |id: &NodeId| new_voters.contains(id) || learners.contains(id);
                let nodes = joint
                    .nodes
                    .iter()
                    .filter(|(id, _)| stays(id))
                    .map(|(id, n)| (*id, n.clone()))
                    .collect();
                let uuids = joint
                    .uuids
                    .iter()
                    .filter(|(id, _)| stays(id))
                    .map(|(id, u)| (*id, *u))
                    .collect();
                info!(node = %self.id, term = %self.term, voters = ?new_voters, "joint configuration committed; appending the new one");
                self.leader_append(EntryPayload::Membership(Membership {
                    configs: vec![new_voters],
                    nodes,
                    uuids,
                }));
            }
            // A leader that is not in the configuration it just committed
            // hands over by stepping down (§6).
            if self.membership_log_id().index <= index && !self.membership().is_voter(self.id) {
                info!(node = %self.id, term = %self.term, "removed from the configuration; stepping down");
                self.leader_lost(ElectionCause::Removed);
                self.become_follower(self.term, None);
            }
        }
    }

    pub(super) fn apply_committed(&mut self) {
        if self.commit <= self.applied {
            return;
        }
        let entries: Vec<Entry<C>> = self
            .log
            .range(self.applied.next(), self.commit)
            .cloned()
            .collect();
        self.applied = self.commit;
        self.applied_log_bytes += entries.iter().map(|e| e.size_hint() as u64).sum::<u64>();
        self.actions.push(Action::Apply { entries });
        self.evict_cached();
        if !self.building_snapshot && self.snapshot_due() {
            self.start_snapshot_build();
        }
    }
}

/// Checks an incoming AppendEntries for internal consistency before any of
/// it touches the log.
pub(super) fn validate_incoming<C: TypeConfig>(
    from: NodeId,
    req: &AppendEntriesRequest<C>,
) -> Result<(), StepError> {
    let malformed = |reason| {
        Err(StepError::Malformed {
            from,
            kind: "append",
            reason,
        })
    };
    if req.prev_log_id.term > req.term {
        return malformed("prev_log_id from a future term");
    }
    let mut prev = req.prev_log_id;
    for e in &req.entries {
        if e.log_id.index != prev.index.next() {
            return malformed("entries are not contiguous after prev_log_id");
        }
        if e.log_id.term < prev.term || e.log_id.term > req.term {
            return malformed("entry terms out of order");
        }
        prev = e.log_id;
    }
    Ok(())
}

/// How many of `entries` (in order) go in one AppendEntries: at most
/// `max_n`, and no more than `max_bytes` by `size_hint` unless a single
/// entry is larger (one always goes, or a large entry would never be sent).
pub(super) fn batch_len<'a, C: TypeConfig + 'a>(
    entries: impl IntoIterator<Item = &'a Entry<C>>,
    max_n: usize,
    max_bytes: usize,
) -> usize {
    let mut n = 0;
    let mut bytes = 0;
    for e in entries {
        if n >= max_n || (n > 0 && bytes + e.size_hint() > max_bytes) {
            break;
        }
        bytes += e.size_hint();
        n += 1;
    }
    n
}

/// The fields a leader's AppendEntries share ([`Engine::append_header`]).
#[derive(Clone, Copy)]
struct AppendHeader {
    term: Term,
    leader_id: NodeId,
    leader_commit: LogIndex,
    round: u64,
    keep_from: LogIndex,
}

impl AppendHeader {
    /// Sends `entries` after `prev_log_id` to `to` under this header.
    fn send<C: TypeConfig>(
        self,
        to: NodeId,
        prev_log_id: LogId,
        entries: Vec<Entry<C>>,
    ) -> Action<C> {
        Action::Send {
            to,
            msg: Message::AppendEntries(AppendEntriesRequest {
                term: self.term,
                leader_id: self.leader_id,
                prev_log_id,
                entries,
                leader_commit: self.leader_commit,
                round: self.round,
                keep_from: self.keep_from,
            }),
        }
    }
}
