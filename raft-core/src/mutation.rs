//! A catalogue of known Raft bugs, each one switch away, to measure what the
//! randomized test suites catch.
//!
//! Every [`Mutation`] names a rule of the protocol and the classic way to get
//! it wrong (from the Raft paper, Ongaro's thesis and published bug reports).
//! The engine consults [`active`] at the one place each rule lives. In a
//! normal build [`active`] is a constant `false` and the checks compile away;
//! with the `mutation-testing` feature, the environment variable
//! `RAFT_MUTANT=<name>` switches exactly one mutation on for the whole
//! process. `cargo xtask mutants` runs the randomized suites once per entry
//! and reports which seed caught it.

/// One known Raft bug, as a deliberate change to the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mutation {
    /// §5.4.2, Figure 8: a leader commits an entry of an earlier term by
    /// counting replicas.
    CommitOldTermByCounting,
    /// §5.4.1: the election restriction compares the last index only, so a
    /// longer but stale log can win.
    ElectionComparesIndexOnly,
    /// Figure 2, AppendEntries rule 5: a follower sets its commit index from
    /// `leaderCommit` and its own last index instead of the last new entry.
    FollowerCommitPastNewEntries,
    /// Figure 2, AppendEntries rule 1: a request from a stale term is
    /// processed instead of refused.
    StaleTermAppendAccepted,
    /// Thesis §9.6: a pre-vote campaign increments (and persists) the term.
    PreVoteBumpsTerm,
    /// Thesis §6.4: ReadIndex uses the commit index before the leader's
    /// no-op of its term has committed.
    ReadBeforeNoopCommits,
    /// Thesis §6.4: a read is served without a quorum confirming leadership.
    ReadWithoutQuorumRound,
    /// §6: in a joint configuration, commitment counts the new majority only.
    JointCommitNewMajorityOnly,
    /// §6: in a joint configuration, an election counts the new majority only.
    JointElectionNewMajorityOnly,
    /// §7: a follower installs a snapshot that is behind its commit index.
    SnapshotInstalledBehindCommit,
    /// Thesis §10.2.1: the leader counts itself toward a commit quorum before
    /// its own append is durable.
    LeaderCountsUnpersistedSelf,
    /// Figure 2: a granted vote is not made durable before the reply.
    VoteNotPersisted,
    /// Figure 2: a higher term learned from a message is not made durable.
    TermNotPersisted,
    /// §5.2: a node grants a second candidate its vote in the same term.
    VoteGrantedTwiceInTerm,
    /// Figure 2, AppendEntries rule 3: an existing entry that conflicts with
    /// a new one (same index, other term) is kept.
    ConflictingEntriesKept,
    /// Figure 2, AppendEntries rule 2: the consistency check compares the
    /// previous index only, not its term.
    PrevLogTermUnchecked,
    /// Figure 2 ("respond after storing"): a follower acknowledges entries
    /// before they are durable.
    AckBeforePersist,
    /// A vote granted to an earlier campaign (or a pre-vote) counts toward
    /// the current election.
    StaleVoteCounted,
    /// A node whose storage was wiped votes, and its votes count: it lost
    /// the vote it gave before the wipe, so it can elect a second leader
    /// in that term.
    WipedVoterCounted,
}

impl Mutation {
    /// Every catalogued mutation.
    pub const ALL: &'static [Mutation] = &[
        Mutation::CommitOldTermByCounting,
        Mutation::ElectionComparesIndexOnly,
        Mutation::FollowerCommitPastNewEntries,
        Mutation::StaleTermAppendAccepted,
        Mutation::PreVoteBumpsTerm,
        Mutation::ReadBeforeNoopCommits,
        Mutation::ReadWithoutQuorumRound,
        Mutation::JointCommitNewMajorityOnly,
        Mutation::JointElectionNewMajorityOnly,
        Mutation::SnapshotInstalledBehindCommit,
        Mutation::LeaderCountsUnpersistedSelf,
        Mutation::VoteNotPersisted,
        Mutation::TermNotPersisted,
        Mutation::VoteGrantedTwiceInTerm,
        Mutation::ConflictingEntriesKept,
        Mutation::PrevLogTermUnchecked,
        Mutation::AckBeforePersist,
        Mutation::StaleVoteCounted,
        Mutation::WipedVoterCounted,
    ];

    /// The name `RAFT_MUTANT` takes.
    pub fn name(self) -> &'static str {
        match self {
            Mutation::CommitOldTermByCounting => "commit_old_term_by_counting",
            Mutation::ElectionComparesIndexOnly => "election_compares_index_only",
            Mutation::FollowerCommitPastNewEntries => "follower_commit_past_new_entries",
            Mutation::StaleTermAppendAccepted => "stale_term_append_accepted",
            Mutation::PreVoteBumpsTerm => "pre_vote_bumps_term",
            Mutation::ReadBeforeNoopCommits => "read_before_noop_commits",
            Mutation::ReadWithoutQuorumRound => "read_without_quorum_round",
            Mutation::JointCommitNewMajorityOnly => "joint_commit_new_majority_only",
            Mutation::JointElectionNewMajorityOnly => "joint_election_new_majority_only",
            Mutation::SnapshotInstalledBehindCommit => "snapshot_installed_behind_commit",
            Mutation::LeaderCountsUnpersistedSelf => "leader_counts_unpersisted_self",
            Mutation::VoteNotPersisted => "vote_not_persisted",
            Mutation::TermNotPersisted => "term_not_persisted",
            Mutation::VoteGrantedTwiceInTerm => "vote_granted_twice_in_term",
            Mutation::ConflictingEntriesKept => "conflicting_entries_kept",
            Mutation::PrevLogTermUnchecked => "prev_log_term_unchecked",
            Mutation::AckBeforePersist => "ack_before_persist",
            Mutation::StaleVoteCounted => "stale_vote_counted",
            Mutation::WipedVoterCounted => "wiped_voter_counted",
        }
    }

    /// Looks a mutation up by [`Mutation::name`].
    pub fn from_name(name: &str) -> Option<Mutation> {
        Mutation::ALL.iter().copied().find(|m| m.name() == name)
    }
}

/// Whether `m` is the mutation switched on for this process. Always `false`
/// without the `mutation-testing` feature.
#[cfg(not(feature = "mutation-testing"))]
#[inline(always)]
pub fn active(_m: Mutation) -> bool {
    false
}

/// Whether `m` is the mutation switched on for this process (by
/// `RAFT_MUTANT`, read once).
#[cfg(feature = "mutation-testing")]
pub fn active(m: Mutation) -> bool {
    use std::sync::OnceLock;
    static ACTIVE: OnceLock<Option<Mutation>> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let name = std::env::var("RAFT_MUTANT").ok()?;
        let found = Mutation::from_name(&name);
        assert!(found.is_some(), "RAFT_MUTANT={name} names no mutation");
        found
    }) == Some(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_mutation_has_a_distinct_name_that_round_trips() {
        let names: std::collections::BTreeSet<_> = Mutation::ALL.iter().map(|m| m.name()).collect();
        assert_eq!(names.len(), Mutation::ALL.len());
        for m in Mutation::ALL {
            assert_eq!(Mutation::from_name(m.name()), Some(*m));
        }
    }
}
