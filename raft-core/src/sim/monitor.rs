//! The protocol monitor: every step of every simulated node is checked
//! against Raft's rules as the paper states them, independently of the
//! engine's own bookkeeping, and the dangerous states a run reaches are
//! counted.
//!
//! The end-to-end checkers (safety properties, linearizability) catch a bug
//! only once it has done visible damage, which may take a schedule the run
//! never finds. The monitor catches the broken rule at the step where it is
//! broken, using the simulator's ground truth (what each node's disk holds,
//! which votes were granted, what a leader committed):
//! - a term changes only by starting an election (term + 1, voting for
//!   oneself) or by hearing of a higher term (§5.1, thesis §9.6: a pre-vote
//!   changes nothing);
//! - a node sends nothing at a term it has not made durable, and grants a
//!   vote only once that vote is durable (Figure 2);
//! - a follower acknowledges entries only once they are on its disk;
//! - a leader becomes leader only with votes from a majority of every
//!   configuration in force (§5.2, §6), each from a voter the configuration
//!   recognizes: a node whose storage was wiped votes again, as a new
//!   identity, and its votes must not count;
//! - a leader commits only an entry of its own term (§5.4.2), and only once
//!   a majority of every configuration holds it on disk (§5.3, §6);
//! - a follower commits only what a leader committed (Figure 2, rule 5);
//! - a ReadIndex read is served at an index no lower than anything committed
//!   when the read reached the leader (thesis §6.4).
//!
//! [`Coverage`] counts the states in which known bugs do their damage, so a
//! weak schedule shows up as a state no seed reached.

use std::collections::BTreeSet;

use crate::engine::Role;
use crate::message::Message;
use crate::types::{LogId, LogIndex, Membership, NodeId, Term, TypeConfig};

use super::{Disk, Input, Sim, SimApp};

/// A dangerous state: a situation in which a classic Raft bug does harm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reach {
    /// Figure 8 (c): an entry of an earlier term sits on a majority of disks,
    /// uncommitted, under a newer leader.
    OldTermEntryOnMajority,
    /// §5.4.1: a candidate whose log is longer but older asks for a vote.
    LongerStaleLogAsksForVote,
    /// A candidate is elected while a node holds a longer log of an older
    /// term.
    ElectedOverLongerStaleLog,
    /// A follower whose log continues past the leader's new entries with
    /// conflicting ones hears a commit index beyond those entries.
    StaleSuffixHearsCommit,
    /// An AppendEntries from a stale term reaches a node.
    StaleTermAppendDelivered,
    /// AppendEntries whose previous index a follower holds with another term.
    PrevTermMismatch,
    /// A follower truncates conflicting entries.
    ConflictingEntriesTruncated,
    /// A read reaches a leader whose no-op has not committed while something
    /// newer than its commit index is committed.
    ReadBeforeNoopCommits,
    /// A read reaches a leader that a newer leader has already replaced.
    ReadAtDeposedLeader,
    /// An election is won while a joint configuration is in force.
    ElectionInJointConfig,
    /// A joint configuration's two majorities hold different indexes.
    JointMajoritiesDisagree,
    /// A snapshot at or behind the receiver's commit index arrives.
    SnapshotBehindCommitDelivered,
    /// A quorum of followers holds an entry the leader has not yet persisted.
    QuorumAckedBeforeLeaderPersisted,
    /// A node that granted its vote in its current term crashes.
    CrashAfterVoteGranted,
    /// A node crashes after a storage action completed, before its replies
    /// went out.
    CrashBetweenPersistAndReply,
    /// A candidate asks a node that already voted for another in that term.
    SecondCandidateInVotedTerm,
    /// A granted vote from an earlier campaign (or a pre-vote) reaches a
    /// candidate.
    LateVoteGrant,
    /// A grant from a voter whose storage was wiped (an identity the
    /// candidate's configuration does not recognize) reaches a candidate.
    WipedVoterGrant,
    /// A crash during a log append leaves part of it on disk.
    TornAppend,
    /// A leader reads entries evicted from its cache back from its log
    /// store for a lagging follower.
    EntriesReadBack,
    /// Entries are applied while a snapshot is being built from an earlier
    /// state, so the snapshot lands behind the applied index.
    AppliedDuringBuild,
    /// An AppendEntries arrives ahead of the one carrying the entries it
    /// follows and is held for them.
    ReorderedAppendHeld,
}

impl Reach {
    /// Every dangerous state, in report order.
    pub const ALL: &'static [Reach] = &[
        Reach::OldTermEntryOnMajority,
        Reach::LongerStaleLogAsksForVote,
        Reach::ElectedOverLongerStaleLog,
        Reach::StaleSuffixHearsCommit,
        Reach::StaleTermAppendDelivered,
        Reach::PrevTermMismatch,
        Reach::ConflictingEntriesTruncated,
        Reach::ReadBeforeNoopCommits,
        Reach::ReadAtDeposedLeader,
        Reach::ElectionInJointConfig,
        Reach::JointMajoritiesDisagree,
        Reach::SnapshotBehindCommitDelivered,
        Reach::QuorumAckedBeforeLeaderPersisted,
        Reach::CrashAfterVoteGranted,
        Reach::CrashBetweenPersistAndReply,
        Reach::SecondCandidateInVotedTerm,
        Reach::LateVoteGrant,
        Reach::WipedVoterGrant,
        Reach::TornAppend,
        Reach::EntriesReadBack,
        Reach::AppliedDuringBuild,
        Reach::ReorderedAppendHeld,
    ];

    /// The state's name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Reach::OldTermEntryOnMajority => "old-term entry on a majority, uncommitted",
            Reach::LongerStaleLogAsksForVote => "longer stale log asks for a vote",
            Reach::ElectedOverLongerStaleLog => "shorter newer log elected over a longer one",
            Reach::StaleSuffixHearsCommit => "follower with a stale suffix hears a commit",
            Reach::StaleTermAppendDelivered => "append from a stale term delivered",
            Reach::PrevTermMismatch => "append whose prev entry has another term",
            Reach::ConflictingEntriesTruncated => "conflicting entries truncated",
            Reach::ReadBeforeNoopCommits => "read at a new leader behind the commit",
            Reach::ReadAtDeposedLeader => "read at a deposed leader",
            Reach::ElectionInJointConfig => "election under a joint configuration",
            Reach::JointMajoritiesDisagree => "joint majorities hold different indexes",
            Reach::SnapshotBehindCommitDelivered => "snapshot behind the commit delivered",
            Reach::QuorumAckedBeforeLeaderPersisted => "quorum acked before the leader persisted",
            Reach::CrashAfterVoteGranted => "crash after granting a vote",
            Reach::CrashBetweenPersistAndReply => "crash between persisting and replying",
            Reach::SecondCandidateInVotedTerm => "second candidate in a voted term",
            Reach::LateVoteGrant => "late vote grant reaches a candidate",
            Reach::WipedVoterGrant => "wiped voter's grant reaches a candidate",
            Reach::TornAppend => "torn append on crash",
            Reach::EntriesReadBack => "evicted entries read back for a follower",
            Reach::AppliedDuringBuild => "entries applied while a snapshot is built",
            Reach::ReorderedAppendHeld => "append ahead of its predecessor held for it",
        }
    }
}

/// How often a run reached each dangerous state.
#[derive(Clone, Debug, Default)]
pub struct Coverage {
    counts: [u64; Reach::ALL.len()],
}

impl Coverage {
    /// Records that a run reached `r`.
    pub fn hit(&mut self, r: Reach) {
        self.counts[r as usize] += 1;
    }
    /// How many times `r` was reached.
    pub fn count(&self, r: Reach) -> u64 {
        self.counts[r as usize]
    }
    /// The states reached at least once.
    pub fn reached(&self) -> BTreeSet<Reach> {
        Reach::ALL
            .iter()
            .copied()
            .filter(|r| self.count(*r) > 0)
            .collect()
    }
}

/// A node's state just before an input, for the checks of the step.
pub(super) struct Before {
    term: Term,
}

/// Whether `disk` holds `id` (durably in its log, or behind its purge point,
/// which only committed entries reach).
fn disk_holds<C: TypeConfig>(disk: &Disk<C>, id: LogId) -> bool {
    if id.index <= disk.base.index {
        return true;
    }
    let off = (id.index.0 - disk.base.index.0 - 1) as usize;
    disk.entries.get(off).is_some_and(|e| e.log_id == id)
}

fn disk_last<C: TypeConfig>(disk: &Disk<C>) -> LogIndex {
    disk.entries
        .last()
        .map(|e| e.log_id.index)
        .unwrap_or(disk.base.index)
}

/// The last index a node's disk holds, in its log or in an installed
/// snapshot (an install is durable before the purge of the log under it).
fn durable_through<C: TypeConfig>(disk: &Disk<C>) -> LogIndex {
    let snapshot = disk.snapshot.as_ref().map(|(m, _)| m.last_log_id.index);
    disk_last(disk).max(snapshot.unwrap_or_default())
}

fn majority(voters: &BTreeSet<NodeId>, yes: impl Fn(NodeId) -> bool) -> bool {
    voters.iter().filter(|v| yes(**v)).count() * 2 > voters.len()
}

impl<C: SimApp> Sim<C> {
    /// The run's dangerous-state counts.
    pub fn coverage(&self) -> &Coverage {
        &self.coverage
    }

    /// Before node `i` takes `input`: counts the dangerous states the input
    /// brings about and remembers what the step's checks need.
    pub(super) fn monitor_input(&mut self, i: usize, input: &Input<C>) -> Before {
        let e = self.nodes[i].engine().expect("live node");
        let before = Before { term: e.term() };
        let mut hits = Vec::new();
        match input {
            Input::Message { from, msg } => match msg {
                Message::Vote(req) => {
                    let mine = e.last_log_id();
                    if req.last_log_id.term < mine.term && req.last_log_id.index > mine.index {
                        hits.push(Reach::LongerStaleLogAsksForVote);
                    }
                    if !req.pre_vote
                        && req.term == e.term()
                        && e.voted_for().is_some_and(|v| v != req.candidate_id)
                    {
                        hits.push(Reach::SecondCandidateInVotedTerm);
                    }
                }
                Message::VoteResponse(resp) if resp.granted => {
                    // Which grant the engine would count now (see
                    // `on_vote_response`); any other reaching a campaigner is late.
                    let expected = match e.role() {
                        Role::PreCandidate if resp.pre_vote => e.term().next(),
                        Role::Candidate if !resp.pre_vote => Some(e.term()),
                        _ => None,
                    };
                    let campaigning = matches!(e.role(), Role::PreCandidate | Role::Candidate);
                    if campaigning && expected != Some(resp.term) {
                        hits.push(Reach::LateVoteGrant);
                    }
                    if campaigning && !e.membership().recognizes(*from, resp.voter_uuid) {
                        hits.push(Reach::WipedVoterGrant);
                    }
                }
                Message::AppendEntries(req) if req.term < e.term() => {
                    hits.push(Reach::StaleTermAppendDelivered)
                }
                Message::AppendEntries(req) => {
                    let log = e.log();
                    let prev = req.prev_log_id;
                    if prev.index > log.base().index
                        && log.term_at(prev.index).is_some_and(|t| t != prev.term)
                    {
                        hits.push(Reach::PrevTermMismatch);
                    }
                    if log.matches(prev) {
                        let last_new = prev.index.plus(req.entries.len() as u64);
                        let next = last_new.next();
                        if req.leader_commit >= next
                            && let Some(t) = log.term_at(next)
                            && self.committed.get(&next).is_some_and(|c| c.term != t)
                        {
                            hits.push(Reach::StaleSuffixHearsCommit);
                        }
                        if req.entries.iter().any(|x| {
                            log.term_at(x.log_id.index).is_some_and(|t| {
                                t != x.log_id.term && x.log_id.index > log.base().index
                            })
                        }) {
                            hits.push(Reach::ConflictingEntriesTruncated);
                        }
                    }
                }
                Message::InstallSnapshot(req) if req.meta.last_log_id.index <= e.commit_index() => {
                    hits.push(Reach::SnapshotBehindCommitDelivered)
                }
                _ => {}
            },
            Input::Read { .. } if e.is_leader() => {
                let behind = e.commit_index() < self.max_commit();
                let noop_committed = e.log().term_at(e.commit_index()) == Some(e.term());
                if behind && !noop_committed {
                    hits.push(Reach::ReadBeforeNoopCommits);
                }
                if self
                    .leaders
                    .keys()
                    .next_back()
                    .is_some_and(|t| *t > e.term())
                {
                    hits.push(Reach::ReadAtDeposedLeader);
                }
            }
            _ => {}
        }
        for h in hits {
            self.coverage.hit(h);
        }
        before
    }

    /// After node `i` took an input: its term moved only as Raft allows.
    pub(super) fn monitor_step(&self, i: usize, before: Before, msg_term: Option<Term>) {
        let n = &self.nodes[i];
        let e = n.engine().expect("live node");
        let term = e.term();
        if term == before.term || Some(term) == msg_term {
            return;
        }
        let campaigned = before.term.next() == Some(term) && e.voted_for() == Some(n.id);
        if !campaigned {
            self.fail(format!(
                "node {} moved from term {} to {term} as {:?} (voted for {:?}) without an election or a higher-term message",
                n.id,
                before.term,
                e.role(),
                e.voted_for()
            ));
        }
    }

    /// Before node `i` sends `msg` to `to`: what the message depends on is
    /// durable.
    pub(super) fn monitor_send(&self, i: usize, to: NodeId, msg: &Message<C>) {
        let n = &self.nodes[i];
        let hs = n.disk.hard_state;
        let pre_vote = matches!(msg, Message::Vote(v) if v.pre_vote)
            || matches!(msg, Message::VoteResponse(v) if v.pre_vote);
        if !pre_vote && msg.term() > hs.term {
            self.fail(format!(
                "node {} sent {} at term {} but its durable term is {}",
                n.id,
                msg.kind(),
                msg.term(),
                hs.term
            ));
        }
        match msg {
            // A grant in an earlier term than the durable one is safe to
            // send late: after a crash the node resumes past that term and
            // never votes in it again (a paused node catching up on its
            // inbox saves its vote, then a later term, then sends the
            // grant: sweep seed 914).
            Message::VoteResponse(v)
                if v.granted
                    && !v.pre_vote
                    && (hs.term < v.term || hs.term == v.term && hs.voted_for != Some(to)) =>
            {
                self.fail(format!(
                    "node {} granted {to} its vote in term {} before the vote was durable (disk: {hs:?})",
                    n.id, v.term
                ));
            }
            Message::AppendEntriesResponse(r)
                if r.success && durable_through(&n.disk) < r.index =>
            {
                self.fail(format!(
                    "node {} acknowledged entries up to {} but its disk ends at {}",
                    n.id,
                    r.index,
                    durable_through(&n.disk)
                ));
            }
            _ => {}
        }
    }

    /// A node that just became leader of `term` holds votes from a majority
    /// of every configuration in force.
    pub(super) fn monitor_election(&mut self, i: usize) {
        let n = &self.nodes[i];
        let e = n.engine().expect("live node");
        let (id, term) = (n.id, e.term());
        let m = e.membership();
        let voted = |v: NodeId| {
            if v == id {
                e.voted_for() == Some(id) && m.recognizes(id, e.uuid())
            } else {
                self.votes.iter().any(|((voter, uuid, t), c)| {
                    *voter == v && *t == term && *c == id && m.recognizes(v, *uuid)
                })
            }
        };
        if let Some(c) = m.configs.iter().find(|c| !majority(c, voted)) {
            self.fail(format!(
                "node {id} became leader of term {term} without votes from a majority of {c:?}"
            ));
        }
        let mut hits = Vec::new();
        if m.is_joint() {
            hits.push(Reach::ElectionInJointConfig);
        }
        let mine = e.last_log_id();
        let over_longer = self.nodes.iter().any(|o| {
            o.engine().is_some_and(|oe| {
                let l = oe.last_log_id();
                l.index > mine.index && l.term < mine.term
            })
        });
        if over_longer {
            hits.push(Reach::ElectedOverLongerStaleLog);
        }
        for h in hits {
            self.coverage.hit(h);
        }
    }

    /// Leader `i` advanced its commit index from `from` to `to` under
    /// `membership` (the configuration in force before the step): the entry
    /// is of its term and a majority of every configuration holds it on disk.
    pub(super) fn monitor_leader_commit(
        &self,
        i: usize,
        to: LogIndex,
        membership: &Membership<C::Node>,
    ) {
        let n = &self.nodes[i];
        let e = n.engine().expect("live node");
        let Some(id) = e.log().log_id_at(to) else {
            return; // behind the purge point: committed before
        };
        if id.term != e.term() {
            self.fail(format!(
                "leader {} of term {} committed {id}, an entry of an earlier term, by counting replicas",
                n.id,
                e.term()
            ));
        }
        // On the node's disk, or on the disk it had under an identity the
        // configuration still recognizes (acknowledged before a wipe the
        // leader has not heard of yet).
        let holds = |v: NodeId| {
            let node = &self.nodes[self.idx(v)];
            disk_holds(&node.disk, id)
                || node
                    .wiped_disks
                    .iter()
                    .any(|d| membership.recognizes(v, d.hard_state.uuid) && disk_holds(d, id))
        };
        if let Some(c) = membership.configs.iter().find(|c| !majority(c, holds)) {
            self.fail(format!(
                "leader {} committed {id} but only {:?} of {c:?} hold it on disk",
                n.id,
                c.iter().filter(|v| holds(**v)).collect::<Vec<_>>()
            ));
        }
    }

    /// Counts the leader-side dangerous states of leader `i`.
    pub(super) fn monitor_leader_state(&mut self, i: usize) {
        let n = &self.nodes[i];
        let e = n.engine().expect("live node");
        let m = e.membership();
        let matched = e.matched();
        let mut hits = Vec::new();
        // Figure 8 (c): an older-term entry after the commit point on a
        // majority of disks.
        let (commit, last) = (e.commit_index(), e.last_log_id().index);
        let first_old = e
            .log()
            .range(commit.next(), last)
            .find(|x| x.log_id.term < e.term())
            .map(|x| x.log_id);
        if let Some(old) = first_old {
            let holds = |v: NodeId| disk_holds(&self.nodes[self.idx(v)].disk, old);
            if m.configs.iter().all(|c| majority(c, holds)) {
                hits.push(Reach::OldTermEntryOnMajority);
            }
        }
        let at = |v: NodeId| {
            if v == n.id {
                disk_last(&n.disk)
            } else {
                matched.get(&v).copied().unwrap_or_default()
            }
        };
        if m.is_joint() {
            let per: Vec<LogIndex> = m
                .configs
                .iter()
                .map(|c| crate::engine::quorum::committed_index(std::slice::from_ref(c), at))
                .collect();
            if per.windows(2).any(|w| w[0] != w[1]) {
                hits.push(Reach::JointMajoritiesDisagree);
            }
        }
        let own = disk_last(&n.disk);
        let followers_hold = |v: NodeId| v != n.id && matched.get(&v).is_some_and(|x| *x > own);
        if m.configs.iter().all(|c| majority(c, followers_hold)) {
            hits.push(Reach::QuorumAckedBeforeLeaderPersisted);
        }
        for h in hits {
            self.coverage.hit(h);
        }
    }
}
