//! Snapshots (§7): when to build one, how far the log may be purged behind
//! it, and sending and installing one chunk by chunk.

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// Reports that a `BuildSnapshot` produced `meta` (durable). Purges the
    /// log behind it, keeping `purge_keep` entries for slow followers, and
    /// on a leader whatever a live follower has not received yet (up to
    /// `purge_keep_max` entries behind the snapshot).
    pub fn snapshot_built(&mut self, meta: SnapshotMeta<C>) {
        self.building_snapshot = false;
        let for_transfer = std::mem::take(&mut self.building_for_transfer);
        let newer = self
            .snapshot
            .as_ref()
            .is_none_or(|s| meta.last_log_id.index > s.last_log_id.index);
        if !newer
            || !self.log.matches(meta.last_log_id) && meta.last_log_id.index > self.log.base().index
        {
            return;
        }
        info!(node = %self.id, snapshot = %meta.last_log_id, bytes = meta.size, "snapshot built");
        self.snapshot_for_transfer = for_transfer;
        // A snapshot of everything applied has no log behind it, whenever
        // it was asked for.
        self.log_bytes_at_snapshot = match meta.last_log_id.index >= self.applied {
            true => self.applied_log_bytes,
            false => self.log_bytes_at_build,
        };
        let snap = meta.last_log_id.index.0;
        let mut purge_to = LogIndex(snap.saturating_sub(self.config.purge_keep));
        // A follower keeps what its leader keeps for followers that lag
        // (never more than `keep_max` behind the snapshot): if it
        // leads next, it can still send them entries. Otherwise a leader
        // change turned every laggard into a snapshot transfer (seen in
        // `cargo xtask bench join`: the new leader, which had purged to
        // `purge_keep`, sent two 300 MB snapshots at once).
        let floor = LogIndex(snap.saturating_sub(self.keep_max(meta.size)));
        if !self.is_leader() && self.leader_keeps_from > LogIndex(0) {
            purge_to = purge_to.min(self.leader_keeps_from.prev().max(floor));
        }
        if let Some(l) = self.role.leader() {
            let live_since = self.live_since();
            let live_needs = l
                .progress
                .values()
                .filter(|p| p.heard_since(live_since))
                .map(|p| p.matched.max(floor));
            purge_to = live_needs.fold(purge_to, LogIndex::min);
        }
        self.previous_snapshot = self.snapshot.replace(meta);
        self.stretch_snapshot_thresholds();
        if purge_to > self.log.base().index
            && let Some(upto) = self.log.log_id_at(purge_to)
        {
            self.purge_log(upto);
            self.actions.push(Action::PurgeLog { upto });
        }
    }

    /// Asks the state machine for a snapshot of what is applied now.
    pub(super) fn start_snapshot_build(&mut self) {
        self.building_snapshot = true;
        self.log_bytes_at_build = self.applied_log_bytes;
        self.actions.push(Action::BuildSnapshot);
    }

    /// Whether a snapshot transfer about to start should wait for a fresh
    /// snapshot ([`Config::snapshot_refresh_percent`]): automatic snapshots
    /// are on, the log applied since the current one weighs more than that
    /// share of it, the current one was not itself built for a transfer,
    /// and no other transfer holds builds back.
    pub(super) fn refresh_before_transfer(&self) -> bool {
        let percent = self.config.snapshot_refresh_percent;
        let Some(s) = &self.snapshot else {
            return false;
        };
        let log_bytes = self.applied_log_bytes - self.log_bytes_at_snapshot;
        percent > 0
            && self.config.snapshot_every > 0
            && !self.snapshot_for_transfer
            && self.applied > s.last_log_id.index
            && u128::from(log_bytes) * 100 > u128::from(s.size) * u128::from(percent)
            && (self.building_snapshot || !self.deferred_for_transfer())
    }

    /// Draws this node's stretch of the snapshot thresholds until its next
    /// snapshot.
    pub(super) fn stretch_snapshot_thresholds(&mut self) {
        let jitter = self.config.snapshot_jitter_percent;
        self.snapshot_stretch = 100 + self.snapshot_rng.range(0, jitter + 1);
    }

    /// The snapshot policy: weighed by the log since the last snapshot
    /// ([`Self::snapshot_weighed`]), and deferred while a transfer runs
    /// ([`Self::deferred_for_transfer`]).
    pub(super) fn snapshot_due(&self) -> bool {
        self.snapshot_weighed() && !self.deferred_for_transfer()
    }

    /// The current snapshot or the one it replaced, if `id` is either: the
    /// snapshots a transfer may read from.
    pub(super) fn sendable_snapshot(&self, id: u64) -> Option<SnapshotMeta<C>> {
        [&self.snapshot, &self.previous_snapshot]
            .into_iter()
            .flatten()
            .find(|s| s.id == id)
            .cloned()
    }

    /// A leader does not build while a live follower (answered within an
    /// election timeout) receives a snapshot: the follower needs the log
    /// after that snapshot, not a newer one, and each build frees a
    /// snapshot file a transfer may still read (only the one before the
    /// current stays readable). Past `keep_max` entries since the snapshot
    /// the build goes ahead: the log must not grow without bound for a
    /// transfer that crawls.
    pub(super) fn deferred_for_transfer(&self) -> bool {
        let Some(l) = self.role.leader() else {
            return false;
        };
        let (since, size) = self
            .snapshot
            .as_ref()
            .map_or((0, 0), |s| (s.last_log_id.index.0, s.size));
        let live_since = self.live_since();
        self.applied.0.saturating_sub(since) < self.keep_max(size)
            && l.progress.values().any(|p| {
                matches!(p.state, ProgressState::Snapshot { .. }) && p.heard_since(live_since)
            })
    }

    /// Most entries kept behind a snapshot of `snapshot_bytes` for a live
    /// follower that lacks them: `purge_keep_max`, or as many as weigh
    /// twice the snapshot if that is more. Past that, sending a snapshot
    /// again is the cheaper path; short of it, entries are: a follower
    /// sent a snapshot instead also needs every entry written while that
    /// transfer ran. With a bound in entries alone, a learner that had just
    /// installed a 312 MB snapshot lacked 330,000 entries of 1 KiB when the
    /// leader's next build purged them, and was sent the whole state again
    /// (`cargo xtask bench join`).
    pub(super) fn keep_max(&self, snapshot_bytes: u64) -> u64 {
        let by_size = self.log.mean_cached_bytes().map_or(0, |mean| {
            snapshot_bytes.saturating_mul(2) / mean.max(1) as u64
        });
        self.config.purge_keep_max.max(by_size)
    }

    /// A follower is live, for what the log keeps for it, if it answered
    /// since then: within the last ten maximum election timeouts (3 s at
    /// the defaults). Not one election timeout: a learner busy installing a
    /// snapshot or catching up goes that long without a word, and a build
    /// finishing just then purged the entries it was being sent, so it was
    /// sent the whole state again (`cargo xtask bench join` with 1 GiB of
    /// state: 1,747 MB sent for a 1,042 MB state). What is kept for a live
    /// follower is bounded by `keep_max` either way.
    pub(super) fn live_since(&self) -> u64 {
        self.now
            .saturating_sub(self.config.election_timeout_max_ms.saturating_mul(10))
    }

    /// At least `snapshot_every` entries applied since the last snapshot,
    /// and a log at least `snapshot_log_percent` of its size (so the cost
    /// of writing the state out is spread over a log that weighs as much,
    /// however large the state grows), both stretched by this node's
    /// draw of `snapshot_jitter_percent`.
    pub(super) fn snapshot_weighed(&self) -> bool {
        let (since, size) = self
            .snapshot
            .as_ref()
            .map(|s| (s.last_log_id.index, s.size))
            .unwrap_or_default();
        let stretch = self.snapshot_stretch;
        let every = self.config.snapshot_every;
        let log_bytes = self.applied_log_bytes - self.log_bytes_at_snapshot;
        every > 0
            && u128::from(self.applied.0 - since.0.min(self.applied.0)) * 100
                >= u128::from(every) * u128::from(stretch)
            && u128::from(log_bytes) * 100 * 100
                >= u128::from(size)
                    * u128::from(self.config.snapshot_log_percent)
                    * u128::from(stretch)
    }

    pub(super) fn on_install_snapshot(
        &mut self,
        from: NodeId,
        req: InstallSnapshotRequest<C>,
    ) -> Result<(), StepError> {
        if req.leader_id != from {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "leader_id differs from sender",
            });
        }
        if !req.intact() {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "chunk does not match its checksum",
            });
        }
        self.accept_leader(from)?;
        let snap = req.meta.last_log_id;
        if snap.term > req.term {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "snapshot from a future term",
            });
        }
        let Some(end) = req.offset.checked_add(req.data.len() as u64) else {
            return Err(StepError::Malformed {
                from,
                kind: "snapshot",
                reason: "offset overflows",
            });
        };
        let (term, snapshot_id) = (self.term, req.meta.id);
        let respond = |this: &mut Self, next_offset: u64, done: bool| {
            let msg = Message::InstallSnapshotResponse(InstallSnapshotResponse {
                term,
                snapshot_id,
                next_offset,
                done,
                uuid: this.uuid,
            });
            this.actions.push(Action::Respond { to: from, msg });
        };
        if snap.index <= self.commit && !mutant(Mutation::SnapshotInstalledBehindCommit) {
            // We already hold everything it covers (committed entries match
            // the leader's), unless it contradicts our committed log.
            if let Some(t) = self.log.term_at(snap.index)
                && t != snap.term
            {
                return Err(StepError::ConflictsWithCommitted {
                    from,
                    index: snap.index,
                });
            }
            self.receiving = None;
            respond(self, end, true);
            return Ok(());
        }
        // The bytes of this transfer received so far are kept: a chunk of it
        // behind them (a duplicate, a retransmission whose original
        // arrived, a leader starting over at 0) is answered with where to
        // go on, never written. Another transfer (a newer snapshot, a new
        // leader) starts with its first chunk, or with any of its chunks if
        // this one wrote nothing yet or is an earlier leader's; a straggler
        // of a transfer the leader gave up never throws away what this
        // one received.
        let window = self.config.snapshot_window;
        let replace = match &self.receiving {
            None => true,
            Some(r) if r.from == from && r.term == term => {
                r.id != snapshot_id && (req.offset == 0 || r.next == 0)
            }
            Some(_) => true,
        };
        if replace {
            self.receiving = Some(Receiving {
                from,
                term,
                id: snapshot_id,
                next: 0,
                ahead: BTreeMap::new(),
            });
        }
        let r = self.receiving.as_mut().expect("set above");
        if r.id != snapshot_id {
            respond(self, 0, false);
            return Ok(());
        }
        if req.offset != r.next {
            // Chunks come a window at a time and may overtake each other:
            // one ahead of a gap is held (up to a window of them) until
            // the gap fills.
            if req.offset > r.next && r.ahead.len() < window {
                r.ahead.insert(req.offset, (req.data, req.done));
            }
            let next = r.next;
            respond(self, next, false);
            return Ok(());
        }
        // In order: write it, and the held chunks it joins up with.
        let meta = req.meta;
        let mut chunk = Some((req.offset, req.data, req.done));
        let mut done = false;
        while let Some((offset, data, last)) = chunk.take() {
            r.next = offset.saturating_add(data.len() as u64);
            self.actions.push(Action::WriteSnapshotChunk {
                meta: meta.clone(),
                offset,
                data,
            });
            done = last;
            if !done {
                chunk = r
                    .ahead
                    .remove(&r.next)
                    .map(|(data, last)| (r.next, data, last));
            }
        }
        let end = r.next;
        r.ahead.retain(|&offset, _| offset > end);
        if !done {
            respond(self, end, false);
            return Ok(());
        }
        // §7: install; keep the log after the snapshot if it agrees, else
        // discard it all.
        info!(node = %self.id, term = %self.term, snapshot = %snap, "installing snapshot");
        self.snapshots_installed += 1;
        self.receiving = None;
        self.actions
            .push(Action::InstallSnapshot { meta: meta.clone() });
        if !self.log.matches(snap) && !self.log.is_empty() {
            self.truncate_log(self.log.first_index());
        }
        self.purge_log(snap);
        self.base_membership = (snap, meta.membership.clone());
        self.log_memberships.retain(|(id, _)| id.index > snap.index);
        self.actions.push(Action::PurgeLog { upto: snap });
        self.durable = self.durable.max(snap.index).min(self.log.last_index());
        self.commit = self.commit.max(snap.index);
        self.applied = snap.index;
        self.log_bytes_at_snapshot = self.applied_log_bytes;
        self.snapshot = Some(meta);
        self.snapshot_for_transfer = false;
        self.previous_snapshot = None;
        self.stretch_snapshot_thresholds();
        respond(self, end, true);
        self.apply_committed();
        Ok(())
    }

    pub(super) fn on_snapshot_response(&mut self, from: NodeId, resp: InstallSnapshotResponse) {
        if !self.answered_by(from, resp.uuid) {
            return;
        }
        let (now, chunk) = (self.now, self.config.snapshot_chunk_bytes);
        let snapshot = self.sendable_snapshot(resp.snapshot_id);
        let Some(l) = self.role.leader_mut() else {
            return;
        };
        let round = l.round;
        let Some(p) = l.progress.get_mut(&from) else {
            return;
        };
        p.recent_active = true;
        p.last_heard = Some(now);
        let ProgressState::Snapshot {
            snapshot_id,
            acked,
            sent,
            active_at,
            started_at,
            ..
        } = &mut p.state
        else {
            return;
        };
        if *snapshot_id != resp.snapshot_id {
            return;
        }
        match snapshot {
            Some(meta) if resp.done => {
                let took = now.saturating_sub(*started_at);
                self.snapshot_bytes_delivered += meta.size;
                self.snapshot_delivery_ms += took;
                info!(peer = %from, snapshot = %meta.last_log_id, bytes = meta.size, ms = took, "snapshot delivered");
                p.on_match(meta.last_log_id.index, round);
                p.become_probe();
                self.maybe_commit();
            }
            Some(_) => {
                let next = resp.next_offset;
                if next > *acked {
                    // With one chunk out (stop-and-wait past the known
                    // size), this answers it, however long it was.
                    let one_out = *sent <= acked.saturating_add(chunk as u64);
                    *acked = next;
                    *sent = if one_out { next } else { (*sent).max(next) };
                    *active_at = now;
                } else if next == 0 && *acked > 0 {
                    // The follower holds nothing of this transfer any more
                    // (it restarted): start over.
                    *acked = 0;
                    *sent = 0;
                    *active_at = now;
                } else {
                    // Where it already was: an answer to a duplicate, or to
                    // a chunk that arrived ahead of a gap (held there). What
                    // is missing goes again only when the window stalls.
                    return;
                }
            }
            None => p.become_probe(),
        }
        self.send_append(from);
    }
}
