//! The engine's clock and what fires on it: election timeouts, and the
//! leader's heartbeats, check-quorum and retransmission.

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// Advances time to `now` (milliseconds) without firing timers. A
    /// driver that wakes after a pause calls this, steps what arrived
    /// meanwhile, and only then [`Engine::tick`]s, so replies that were
    /// waiting count before a timer judges their absence.
    pub fn advance_clock(&mut self, now: u64) {
        self.now = self.now.max(now);
    }

    /// The engine's time: the latest `advance_clock` or `tick`.
    pub fn now(&self) -> u64 {
        self.now
    }

    /// Advances time to `now` (milliseconds) and fires due timers: elections
    /// on followers and candidates; heartbeats, check-quorum and
    /// retransmission on leaders.
    pub fn tick(&mut self, now: u64) {
        self.now = self.now.max(now);
        if self.is_leader() {
            self.tick_leader();
        } else if self.now >= self.election_due {
            let kind = if self.config.pre_vote {
                CampaignKind::PreVote
            } else {
                CampaignKind::Election
            };
            self.campaign(kind);
        }
    }

    /// The next time [`Engine::tick`] has work to do.
    pub fn next_deadline(&self) -> u64 {
        match &self.role {
            RoleState::Leader(l) => {
                let mut due = l.heartbeat_due.min(l.check_quorum_due);
                if let Some((_, until)) = l.transfer {
                    due = due.min(until);
                }
                due
            }
            _ => self.election_due,
        }
    }

    /// The leader's timers: a transfer that timed out, check-quorum
    /// (thesis §6.2), retransmission of stalled windows, heartbeats.
    pub(super) fn tick_leader(&mut self) {
        let now = self.now;
        let stale_after = self.config.election_timeout_min_ms;
        let (id, term, check_quorum) = (self.id, self.term, self.config.check_quorum);
        let configs = self.membership().configs.clone();
        let Some(l) = self.role.leader_mut() else {
            return;
        };
        if l.transfer.is_some_and(|(_, until)| now >= until) {
            info!(node = %id, term = %term, "leadership transfer timed out; resuming");
            l.transfer = None;
        }
        // Check-quorum (thesis §6.2): step down if a quorum has been silent
        // for an election timeout.
        if now >= l.check_quorum_due {
            let progress = &l.progress;
            let active = quorum::has_quorum(&configs, |p| {
                p == id
                    || progress
                        .get(&p)
                        .is_some_and(|p| p.recent_active && p.recognized)
            });
            for p in l.progress.values_mut() {
                p.recent_active = false;
            }
            l.check_quorum_due = now + stale_after;
            if check_quorum && !active {
                warn!(node = %id, term = %term, "lost contact with a quorum; stepping down");
                self.leader_lost(ElectionCause::CheckQuorum);
                self.become_follower(term, None);
                return;
            }
        }
        // Retransmission: an unanswered snapshot chunk, or a replication
        // window stuck behind a lost message: its oldest message is
        // unanswered for an election timeout and nothing was acknowledged
        // in that time. A follower that acknowledges, however slowly, is
        // busy, not stuck: resending its whole window from `matched` would
        // only queue duplicates of what it has yet to read (seen in
        // `cargo xtask bench join`: a follower fed its 8 MiB window again
        // every 150 ms fell 20,000 entries behind, and the transport timed
        // out and cut a thousand of those streams).
        for (peer, p) in l.progress.iter_mut() {
            match &mut p.state {
                ProgressState::Replicate => {
                    if p.inflight
                        .front()
                        .is_some_and(|f| f.sent_at + stale_after <= now)
                        && p.advanced_at + stale_after <= now
                    {
                        debug!(node = %id, peer = %peer, "replication window stalled; probing");
                        p.become_probe();
                    }
                }
                ProgressState::Snapshot {
                    acked,
                    sent,
                    active_at,
                    ..
                } => {
                    // Nothing sent or acknowledged for an election timeout:
                    // send again what was not acknowledged.
                    if *sent > *acked && *active_at + stale_after <= now {
                        debug!(node = %id, peer = %peer, offset = *acked, "snapshot window stalled; resending");
                        *sent = *acked;
                    }
                }
                ProgressState::Probe { .. } => {}
            }
        }
        if now >= l.heartbeat_due {
            self.broadcast_heartbeat();
        }
        self.replicate_all();
    }
}
