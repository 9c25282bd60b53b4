//! Linearizable reads by ReadIndex (thesis §6.4).

use super::*;

impl<C: TypeConfig> Engine<C> {
    /// Starts a linearizable read (ReadIndex, thesis §6.4). When a quorum
    /// confirms this node is still leader, a `ReadReady` action names the
    /// index the state machine must reach before the read is served. Reads
    /// started before the next flush share one heartbeat round.
    pub fn read_index(&mut self, id: ReadId) -> Result<(), NotLeader<C::Node>> {
        let commit = self.commit;
        let Some(l) = self.role.leader_mut() else {
            return Err(self.not_leader());
        };
        let index =
            (commit >= l.noop_index || mutant(Mutation::ReadBeforeNoopCommits)).then_some(commit);
        l.pending_reads.push(PendingRead {
            id,
            round: l.round + 1,
            index,
        });
        self.read_round_wanted = true;
        Ok(())
    }

    pub(super) fn check_reads(&mut self) {
        let commit = self.commit;
        let me = self.id;
        let configs = self.membership().configs.clone();
        let Some(l) = self.role.leader_mut() else {
            return;
        };
        if commit >= l.noop_index {
            for r in l.pending_reads.iter_mut().filter(|r| r.index.is_none()) {
                r.index = Some(commit);
            }
        }
        let mut ready: Vec<(ReadId, LogIndex)> = Vec::new();
        let progress = &l.progress;
        l.pending_reads.retain(|r| {
            let confirmed = r.index.is_some()
                && (mutant(Mutation::ReadWithoutQuorumRound)
                    || quorum::has_quorum(&configs, |id| {
                        id == me
                            || progress
                                .get(&id)
                                .is_some_and(|p| p.recognized && p.acked_round >= r.round)
                    }));
            if confirmed {
                ready.push((r.id, r.index.unwrap_or_default()));
            }
            !confirmed
        });
        let mut i = 0;
        while i < ready.len() {
            let index = ready[i].1;
            let ids: Vec<ReadId> = ready[i..]
                .iter()
                .take_while(|r| r.1 == index)
                .map(|r| r.0)
                .collect();
            i += ids.len();
            self.actions.push(Action::ReadReady { ids, index });
        }
    }
}
