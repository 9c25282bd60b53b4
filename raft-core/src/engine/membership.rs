//! Membership changes: learners, and voter changes by joint consensus
//! (§6).

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// Proposes adding `id`, reached at `node`, as a learner: it receives
    /// the log and snapshots but neither votes nor counts toward commit.
    /// Promote it with [`Engine::change_membership`] once it has caught up.
    pub fn add_learner(
        &mut self,
        id: NodeId,
        node: C::Node,
    ) -> Result<LogId, ProposeError<C::Node>> {
        let mut next = self.membership_change_base()?;
        if next.nodes.contains_key(&id) || next.is_voter(id) {
            return Err(MembershipError::AlreadyMember(id).into());
        }
        next.nodes.insert(id, node);
        self.propose_payload(EntryPayload::Membership(next))
    }

    /// Proposes removing learner `id`.
    pub fn remove_learner(&mut self, id: NodeId) -> Result<LogId, ProposeError<C::Node>> {
        let mut next = self.membership_change_base()?;
        if next.is_voter(id) {
            return Err(MembershipError::IsVoter(id).into());
        }
        if next.nodes.remove(&id).is_none() {
            return Err(MembershipError::UnknownNode(id).into());
        }
        // Added back later, it is a new member: whatever identity it then
        // has is recorded afresh.
        next.uuids.remove(&id);
        self.propose_payload(EntryPayload::Membership(next))
    }

    /// Proposes `voters` as the new voting configuration by joint consensus
    /// (§6 of the Raft paper): first C_old,new, in which elections and
    /// commitment need majorities of both; once that commits, the leader
    /// appends C_new by itself. Each takes effect when appended. Voters not
    /// in `voters` leave the cluster; learners stay learners. Every new
    /// voter must already be a member (add it as a learner first). The
    /// returned id is the joint entry's.
    pub fn change_membership(
        &mut self,
        voters: BTreeSet<NodeId>,
    ) -> Result<LogId, ProposeError<C::Node>> {
        let current = self.membership_change_base()?;
        if voters.is_empty() {
            return Err(MembershipError::NoVoters.into());
        }
        if let Some(unknown) = voters.iter().find(|v| !current.nodes.contains_key(v)) {
            return Err(MembershipError::UnknownNode(*unknown).into());
        }
        let old = current.configs.first().cloned().unwrap_or_default();
        if voters.is_disjoint(&old) {
            return Err(MembershipError::NoCurrentVoter.into());
        }
        let joint = Membership {
            configs: vec![voters, old],
            ..current
        };
        self.propose_payload(EntryPayload::Membership(joint))
    }

    /// Proposes moving voter `id` to the learners by joint consensus: like
    /// [`Engine::change_membership`] without `id`, except that the final
    /// configuration this leader appends keeps `id` as a learner (it keeps
    /// its log and goes on receiving entries, but no longer votes or
    /// counts toward commit). If leadership changes before the joint
    /// configuration commits, the next leader finishes the change by
    /// removing `id` outright; add it back with [`Engine::add_learner`]
    /// (the driver's `Raft::demote_voter` does).
    pub fn demote_voter(&mut self, id: NodeId) -> Result<LogId, ProposeError<C::Node>> {
        let current = self.membership_change_base()?;
        if !current.is_voter(id) {
            return Err(match current.nodes.contains_key(&id) {
                true => MembershipError::NotVoter(id),
                false => MembershipError::UnknownNode(id),
            }
            .into());
        }
        let mut voters = current.configs.first().cloned().unwrap_or_default();
        voters.remove(&id);
        let log_id = self.change_membership(voters)?;
        if let Some(l) = self.role.leader_mut() {
            l.demoting.insert(id);
        }
        Ok(log_id)
    }

    /// The configuration a change starts from, if a change may start: this
    /// node leads and the last configuration is final (not joint, and
    /// committed).
    pub(super) fn membership_change_base(
        &self,
    ) -> Result<Membership<C::Node>, ProposeError<C::Node>> {
        if !self.is_leader() {
            return Err(self.not_leader().into());
        }
        let index = self.membership_log_id().index;
        if self.membership().is_joint() {
            return Err(MembershipError::InProgress { index }.into());
        }
        // One change at a time: nothing appended since the last committed
        // configuration may change voters or members. An entry that only
        // records identities ([`Self::record_identities`]) changes no
        // quorum, so a change may follow it before it commits.
        let commit = self.commit;
        let committed = self
            .log_memberships
            .iter()
            .rev()
            .find(|(id, _)| id.index <= commit)
            .unwrap_or(&self.base_membership);
        if let Some((pending, _)) = self.log_memberships.iter().find(|(id, m)| {
            id.index > commit && (m.configs != committed.1.configs || m.nodes != committed.1.nodes)
        }) {
            return Err(MembershipError::InProgress {
                index: pending.index,
            }
            .into());
        }
        Ok(self.membership().clone())
    }
}
