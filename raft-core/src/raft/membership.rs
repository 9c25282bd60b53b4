//! Membership changes through the [`Raft`] handle: learners, voters,
//! demotion, each waiting for what the caller needs to hold before it
//! returns.

use super::*;

impl<C: TypeConfig> Raft<C> {
    /// Adds `id` (reached at `node`) as a learner, then waits until it is
    /// within `Config::learner_max_lag` entries of this leader's commit
    /// index (entries still in flight to every follower do not count). If it
    /// is still further behind after `timeout`, returns `LearnerBehind`:
    /// the learner stays added and keeps catching up.
    pub async fn add_learner(
        &self,
        id: NodeId,
        node: C::Node,
        timeout: Duration,
    ) -> Result<LogId, RaftError<C::Node>> {
        let deadline = Instant::now() + timeout;
        let log_id = self
            .propose_membership(MembershipChange::AddLearner(id, node))
            .await?;
        let lag = self.inner.learner_max_lag;
        let mut metrics = self.metrics();
        let caught_up = tokio::time::timeout_at(
            deadline,
            metrics.wait_for(|m| {
                m.role == Role::Leader && m.replication.contains_key(&id) && behind(m, id) <= lag
            }),
        )
        .await;
        match caught_up {
            Ok(Ok(_)) => Ok(log_id),
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => Err(self.learner_behind(id)),
        }
    }

    /// Waits until learner `id` is within `Config::learner_max_lag`
    /// entries of this leader's commit index. `LearnerBehind` if it is not after
    /// `timeout`; `NotLeader` if this node stops leading meanwhile.
    /// [`Raft::change_membership`] does this for every learner it
    /// promotes; call it first to bound that wait separately.
    pub async fn wait_caught_up(
        &self,
        id: NodeId,
        timeout: Duration,
    ) -> Result<(), RaftError<C::Node>> {
        match tokio::time::timeout(timeout, self.caught_up(id)).await {
            Ok(r) => r,
            Err(_) => Err(self.learner_behind(id)),
        }
    }

    /// `LearnerBehind` for `id`, with how far behind it is now.
    fn learner_behind(&self, id: NodeId) -> RaftError<C::Node> {
        RaftError::LearnerBehind {
            id,
            behind: behind(&self.metrics().borrow(), id),
        }
    }

    async fn caught_up(&self, id: NodeId) -> Result<(), RaftError<C::Node>> {
        let lag = self.inner.learner_max_lag;
        let mut metrics = self.metrics();
        let seen = metrics
            .wait_for(|m| {
                m.fatal.is_some()
                    || m.role != Role::Leader
                    || m.replication.contains_key(&id) && behind(m, id) <= lag
            })
            .await
            .map_err(|_| self.stopped_error())?;
        if let Some(e) = &seen.fatal {
            return Err(RaftError::Fatal(e.clone()));
        }
        if seen.role != Role::Leader {
            let leader_id = seen.leader_id;
            let leader_node = leader_id.and_then(|l| seen.membership.nodes.get(&l).cloned());
            return Err(RaftError::NotLeader(NotLeader {
                leader_id,
                leader_node,
            }));
        }
        Ok(())
    }

    /// Removes learner `id` from the cluster; resolves once that is applied.
    /// Like every membership call, it first waits for a change in progress
    /// to settle rather than failing with `MembershipError::InProgress`.
    pub async fn remove_learner(&self, id: NodeId) -> Result<LogId, RaftError<C::Node>> {
        self.propose_membership(MembershipChange::RemoveLearner(id))
            .await
    }

    /// Makes `voters` the voting members by joint consensus (see
    /// [`Engine::change_membership`]): promotes learners, removes voters.
    /// Resolves once the final configuration is committed.
    ///
    /// It first waits until every learner it promotes is caught up (see
    /// [`Raft::wait_caught_up`]): the new configuration's majority may
    /// need that node, and a node still catching up (a learner applying
    /// the log after a large snapshot) held every write until it did (seen
    /// in `cargo xtask bench join`: ten seconds without a commit). If another
    /// change is in progress, this first waits for it to settle (see
    /// `propose_membership`); if this node loses leadership meanwhile, the
    /// next leader finishes the change. Wrap the call in a timeout if the
    /// caller cannot wait.
    pub async fn change_membership(
        &self,
        voters: BTreeSet<NodeId>,
    ) -> Result<(), RaftError<C::Node>> {
        // Known learners only: anything else is the engine's to refuse.
        let promoted: Vec<NodeId> = {
            let m = self.metrics();
            let m = m.borrow();
            voters
                .iter()
                .copied()
                .filter(|id| m.membership.is_learner(*id))
                .collect()
        };
        for id in promoted {
            self.caught_up(id).await?;
        }
        let joint = self
            .propose_membership(MembershipChange::Voters(voters.clone()))
            .await?;
        self.final_configuration(joint, Some(&voters)).await?;
        Ok(())
    }

    /// Moves voter `id` to the learners by joint consensus
    /// ([`Engine::demote_voter`]): it stops voting and counting toward
    /// commit but keeps its data and goes on receiving the log, ready to
    /// be promoted again. Resolves once the final configuration is
    /// committed. If leadership changed during the change and the next
    /// leader removed `id` outright, this adds it back as a learner (from
    /// this node, if it leads again; else `NotLeader`).
    pub async fn demote_voter(&self, id: NodeId) -> Result<(), RaftError<C::Node>> {
        let node = self.metrics().borrow().membership.nodes.get(&id).cloned();
        let joint = self
            .propose_membership(MembershipChange::Demote(id))
            .await?;
        let done = self.final_configuration(joint, None).await?;
        match node {
            Some(node) if !done.membership.nodes.contains_key(&id) => {
                self.propose_membership(MembershipChange::AddLearner(id, node))
                    .await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Waits until the configuration that follows the joint one at `joint`
    /// (with `voters`, if given) is committed; the metrics then.
    async fn final_configuration(
        &self,
        joint: LogId,
        voters: Option<&BTreeSet<NodeId>>,
    ) -> Result<RaftMetrics<C::Node>, RaftError<C::Node>> {
        let mut metrics = self.metrics();
        let done = metrics
            .wait_for(|m| {
                let final_config = m.membership.configs.len() == 1
                    && voters.is_none_or(|v| m.membership.configs[0] == *v);
                m.fatal.is_some()
                    || final_config
                        && m.membership_log_id.index > joint.index
                        && m.commit_index >= m.membership_log_id.index
            })
            .await
            .map_err(|_| self.stopped_error())?
            .clone();
        match done.fatal {
            Some(e) => Err(RaftError::Fatal(e)),
            None => Ok(done),
        }
    }

    /// Proposes `change` once no other change is in progress, and resolves
    /// when the proposed entry is applied.
    ///
    /// The engine allows one change at a time and refuses another while the
    /// last configuration is joint or uncommitted. Both settle by themselves
    /// (a joint configuration is followed by its final one; a fresh leader's
    /// inherited configuration becomes committed with its first entry), so
    /// instead of handing the caller a refusal it could only retry, this
    /// waits while this node stays leader and tries again. Losing leadership
    /// ends the wait with `NotLeader`.
    async fn propose_membership(
        &self,
        change: MembershipChange<C::Node>,
    ) -> Result<LogId, RaftError<C::Node>> {
        loop {
            let change = change.clone();
            match self.call(|reply| Input::Membership { change, reply }).await {
                Ok((log_id, _)) => return Ok(log_id),
                Err(RaftError::Membership(MembershipError::InProgress { index })) => {
                    let mut metrics = self.metrics();
                    metrics
                        .wait_for(|m| {
                            let settled = !m.membership.is_joint()
                                && m.commit_index >= m.membership_log_id.index;
                            m.fatal.is_some()
                                || m.role != Role::Leader
                                || m.membership_log_id.index != index
                                || settled
                        })
                        .await
                        .map_err(|_| self.stopped_error())?;
                }
                Err(e) => return Err(e),
            }
        }
    }
}
