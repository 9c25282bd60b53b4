//! Leader election (§5.2), pre-vote and check-quorum (thesis §9.6), leadership
//! transfer (thesis §3.10), and the role changes they lead to.

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// Asks the leader to hand leadership to `to` (thesis §3.10): proposals
    /// pause, `to` is brought up to date and told to campaign at once. If it
    /// has not taken over within an election timeout, this node resumes.
    pub fn transfer_leader(&mut self, to: NodeId) -> Result<(), NotLeader<C::Node>> {
        let until = self.now + self.config.election_timeout_min_ms;
        let Some(l) = self.role.leader_mut() else {
            return Err(self.not_leader());
        };
        if to == self.id || !l.progress.get(&to).is_some_and(|p| p.voter) {
            return Ok(());
        }
        l.transfer = Some((to, until));
        info!(node = %self.id, term = %self.term, target = %to, "transferring leadership");
        self.maybe_send_timeout_now(to);
        Ok(())
    }

    /// Starts an election at once, skipping pre-vote (etcd's `Campaign`):
    /// for scripted tests and operators. Does nothing on a leader or on a
    /// node that does not vote.
    pub fn campaign_now(&mut self) {
        if !self.is_leader() {
            self.campaign(CampaignKind::Election);
        }
    }

    pub(super) fn campaign(&mut self, kind: CampaignKind) {
        self.reset_election_timer();
        if !self.membership().is_voter(self.id) || !self.check_recognized() {
            return;
        }
        let Some(next_term) = self.term.next() else {
            warn!(node = %self.id, "term space exhausted; refusing to campaign");
            return;
        };
        self.leader_lost(match kind {
            CampaignKind::Transfer => ElectionCause::Transfer,
            CampaignKind::PreVote | CampaignKind::Election => ElectionCause::Timeout,
        });
        let (term, pre_vote) = match kind {
            CampaignKind::PreVote => {
                debug!(node = %self.id, term = %next_term, "pre-vote campaign");
                self.role = RoleState::PreCandidate(VoteTally::default());
                if mutant(Mutation::PreVoteBumpsTerm) {
                    self.term = next_term;
                    self.voted_for = None;
                    self.save_hard_state();
                }
                (next_term, true)
            }
            CampaignKind::Election | CampaignKind::Transfer => {
                self.flush_leader_entries();
                self.term = next_term;
                self.voted_for = Some(self.id);
                self.leader_id = None;
                self.role = RoleState::Candidate(VoteTally::default());
                self.save_hard_state();
                self.elections += 1;
                info!(node = %self.id, term = %self.term, "election started");
                (next_term, false)
            }
        };
        let req = VoteRequest {
            term,
            candidate_id: self.id,
            last_log_id: self.log.last_log_id(),
            pre_vote,
            transfer: kind == CampaignKind::Transfer,
            candidate_uuid: self.uuid,
        };
        for peer in self.membership().voter_ids() {
            if peer != self.id {
                self.actions.push(Action::Send {
                    to: peer,
                    msg: Message::Vote(req.clone()),
                });
            }
        }
        self.record_vote(self.id, true);
    }

    pub(super) fn on_vote_request(
        &mut self,
        from: NodeId,
        req: VoteRequest,
    ) -> Result<(), StepError> {
        if req.candidate_id != from {
            return Err(StepError::Malformed {
                from,
                kind: "vote",
                reason: "candidate_id differs from sender",
            });
        }
        let respond = |this: &mut Self, granted: bool, term: Term| {
            let msg = Message::VoteResponse(VoteResponse {
                term,
                granted,
                pre_vote: req.pre_vote,
                voter_uuid: this.uuid,
            });
            this.actions.push(Action::Respond { to: from, msg });
        };
        if req.term < self.term {
            respond(self, false, self.term);
            return Ok(());
        }
        // The refusal changes no state here (no term is adopted), so a
        // wiped node cannot disturb the cluster either.
        if !self.identities_allow_vote(from, &req) && !mutant(Mutation::WipedVoterCounted) {
            respond(self, false, self.term);
            return Ok(());
        }
        // Thesis §4.2.3: while we hear from a leader, ignore campaigns, so a
        // node that was partitioned away (or removed) cannot depose it.
        if self.in_lease() && !req.transfer && (req.term > self.term || req.pre_vote) {
            debug!(node = %self.id, candidate = %from, "vote refused: leader lease");
            respond(self, false, self.term);
            return Ok(());
        }
        let up_to_date = if mutant(Mutation::ElectionComparesIndexOnly) {
            req.last_log_id.index >= self.log.last_log_id().index
        } else {
            req.last_log_id >= self.log.last_log_id()
        };
        if req.pre_vote {
            // A pre-vote changes nothing here; grant if a real vote could be.
            let grant = req.term > self.term && up_to_date;
            respond(self, grant, if grant { req.term } else { self.term });
            return Ok(());
        }
        if req.term > self.term {
            self.become_follower(req.term, None);
        }
        let can_vote = (self.voted_for.is_none_or(|v| v == from)
            || mutant(Mutation::VoteGrantedTwiceInTerm))
            && self.leader_id.is_none_or(|l| l == from);
        let grant = can_vote && up_to_date;
        if grant && self.voted_for.is_none() {
            // §5.2: at most one vote per term, durable before the reply.
            self.voted_for = Some(from);
            if !mutant(Mutation::VoteNotPersisted) {
                self.save_hard_state();
            }
        }
        if grant {
            self.reset_election_timer();
        }
        debug!(node = %self.id, term = %self.term, candidate = %from, grant, "vote");
        respond(self, grant, self.term);
        Ok(())
    }

    pub(super) fn on_vote_response(&mut self, from: NodeId, resp: VoteResponse) {
        let rejected_higher = !resp.granted && resp.term > self.term;
        if rejected_higher || (!resp.pre_vote && resp.term > self.term) {
            self.become_follower(resp.term, None);
            return;
        }
        // Only answers to the campaign under way count. A grant names the
        // term it was asked for; a refusal of a real vote carries our term
        // (the voter adopted it before refusing), so one of an earlier term,
        // or a pre-vote answer reaching a candidate, is late. (A pre-vote
        // refusal carries the voter's own term and cannot be told apart
        // from one of an earlier pre-vote round at the same term.)
        let current = match &self.role {
            RoleState::PreCandidate(_) => {
                resp.pre_vote && (!resp.granted || self.term.next() == Some(resp.term))
            }
            RoleState::Candidate(_) => !resp.pre_vote && resp.term == self.term,
            _ => false,
        };
        if !current && !mutant(Mutation::StaleVoteCounted) {
            return;
        }
        // A grant from a voter whose storage was wiped is no vote: the
        // node before the wipe may have given its vote in this term away.
        let granted = resp.granted
            && (self.membership().recognizes(from, resp.voter_uuid)
                || mutant(Mutation::WipedVoterCounted));
        self.record_vote(from, granted);
    }

    pub(super) fn record_vote(&mut self, from: NodeId, granted: bool) {
        let mut configs = self.membership().configs.clone();
        if mutant(Mutation::JointElectionNewMajorityOnly) {
            configs.truncate(1);
        }
        let tally = match &mut self.role {
            RoleState::PreCandidate(t) | RoleState::Candidate(t) => t,
            _ => return,
        };
        if granted {
            tally.granted.insert(from);
        } else {
            tally.rejected.insert(from);
        }
        let won = quorum::has_quorum(&configs, |id| tally.granted.contains(&id));
        let lost = quorum::quorum_impossible(&configs, |id| tally.rejected.contains(&id));
        let pre = matches!(self.role, RoleState::PreCandidate(_));
        if won && pre {
            self.campaign(CampaignKind::Election);
        } else if won {
            self.become_leader();
        } else if lost {
            debug!(node = %self.id, term = %self.term, pre, "campaign lost");
            self.become_follower(self.term, None);
        }
    }

    pub(super) fn on_timeout_now(&mut self, from: NodeId, _req: TimeoutNowRequest) {
        if self.leader_id == Some(from) && self.membership().is_voter(self.id) {
            info!(node = %self.id, term = %self.term, "told to campaign by the leader");
            self.campaign(CampaignKind::Transfer);
        }
    }

    pub(super) fn in_lease(&self) -> bool {
        self.config.check_quorum
            && match &self.role {
                RoleState::Leader(_) => true,
                _ => {
                    self.leader_id.is_some()
                        && self.now < self.leader_contact + self.config.election_timeout_min_ms
                }
            }
    }

    pub(super) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.flush_leader_entries();
        if let Some(l) = self.role.leader_mut() {
            let ids: Vec<ReadId> = l.pending_reads.drain(..).map(|r| r.id).collect();
            if !ids.is_empty() {
                self.actions.push(Action::ReadFailed {
                    ids,
                    leader_id: leader,
                });
            }
        }
        let was = self.role();
        if term > self.term && leader.is_none() {
            self.leader_lost(ElectionCause::HigherTerm);
        }
        if term > self.term {
            self.term = term;
            self.voted_for = None;
            if !mutant(Mutation::TermNotPersisted) {
                self.save_hard_state();
            }
        }
        self.role = RoleState::Follower;
        self.leader_id = leader;
        if let Some(l) = leader {
            self.leader_contact = self.now;
            self.leader_known(l);
        }
        self.reset_election_timer();
        if was != Role::Follower && was != Role::Learner {
            info!(node = %self.id, term = %self.term, leader = ?leader, from = ?was, "became follower");
        }
    }

    pub(super) fn become_leader(&mut self) {
        let last = self.log.last_index();
        let progress = self.peer_progress(last.next(), &BTreeMap::new());
        self.role = RoleState::Leader(Box::new(LeaderState {
            progress,
            round: 0,
            pending_reads: Vec::new(),
            heartbeat_due: self.now,
            check_quorum_due: self.now + self.config.election_timeout_min_ms,
            noop_index: last.next(),
            transfer: None,
            demoting: BTreeSet::new(),
        }));
        self.leader_id = Some(self.id);
        self.leader_known(self.id);
        info!(node = %self.id, term = %self.term, last_log = %self.log.last_log_id(), "became leader");
        // §8: a no-op from this term lets the leader learn, through the
        // Figure 8 rule, which earlier entries are committed.
        self.leader_append(EntryPayload::Blank);
    }

    /// Progress trackers for every member but this node, keeping existing
    /// ones.
    pub(super) fn peer_progress(
        &self,
        next: LogIndex,
        keep: &BTreeMap<NodeId, Progress>,
    ) -> BTreeMap<NodeId, Progress> {
        let m = self.membership();
        m.nodes
            .keys()
            .chain(m.voter_ids().iter())
            .filter(|id| **id != self.id)
            .map(|id| {
                let voter = m.is_voter(*id);
                let mut p = keep
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| Progress::new(next, voter));
                p.voter = voter;
                p.recognized = m.recognizes(*id, p.uuid);
                (*id, p)
            })
            .collect()
    }

    pub(super) fn reset_election_timer(&mut self) {
        let c = &self.config;
        self.election_due = self.now
            + self
                .rng
                .range(c.election_timeout_min_ms, c.election_timeout_max_ms);
    }

    pub(super) fn save_hard_state(&mut self) {
        self.actions.push(Action::SaveHardState(HardState {
            term: self.term,
            voted_for: self.voted_for,
            uuid: self.uuid,
        }));
    }

    pub(super) fn maybe_send_timeout_now(&mut self, to: NodeId) {
        let last = self.log.last_index();
        let (term, id) = (self.term, self.id);
        let l = self.leader();
        if l.progress.get(&to).is_some_and(|p| p.matched == last) {
            let msg = Message::TimeoutNow(TimeoutNowRequest {
                term,
                leader_id: id,
            });
            self.actions.push(Action::Send { to, msg });
        } else {
            self.send_append(to);
        }
    }
}
