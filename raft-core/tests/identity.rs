//! A node whose storage was wiped (or swapped) comes back under its old id
//! with nothing: not the vote it gave in its term, not the entries it
//! acknowledged. Counting it again as the member it was breaks Raft's two
//! promises: one leader per term, and no committed entry lost. Each node
//! has an identity ([`NodeUuid`]) kept with its hard state, the leader
//! records each member's in the configuration, and a member answering under
//! another identity counts toward nothing. These scripts show the two
//! failures (each fails with the identity checks taken out: see
//! `RAFT_MUTANT=wiped_voter_counted`) and the rest of the mechanism.

mod common;

use common::script::{C, Script, config, put};
use raft_core::{LogIndex, Message, NodeId, NodeUuid, Role};

/// The identity a wiped node comes back with.
const NEW: NodeUuid = NodeUuid(0xdead_beef);

#[test]
fn a_wiped_voter_cannot_elect_a_second_leader_in_its_term() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    // s1 wins term 1 with s2's vote; s3 hears none of it.
    let s3_out = |from: NodeId, to: NodeId, _: &Message<C>| from == s3 || to == s3;
    s.elect(s1, s3_out);
    assert_eq!(s.engines[&s1].term().0, 1);
    assert_eq!(s.engines[&s2].voted_for(), Some(s1));

    // s2's disk is wiped: it forgets its vote of term 1.
    s.wipe(s2, NEW);

    // s3 campaigns in term 1 too. s1 refuses (it voted for itself); the
    // new s2 has no vote to keep and grants. Counted, that grant makes s3
    // a second leader of term 1.
    let s1_out = |from: NodeId, to: NodeId, _: &Message<C>| from == s1 || to == s1;
    s.engines.get_mut(&s3).unwrap().campaign_now();
    s.flush(s3);
    assert_eq!(s.engines[&s3].term().0, 1);
    s.deliver(s1_out);
    assert!(
        !s.engines[&s3].is_leader(),
        "two leaders in term 1: s1, and s3 elected by the wiped s2"
    );
}

#[test]
fn a_wiped_voter_cannot_elect_a_leader_that_lacks_a_committed_entry() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    s.elect(s1, |_, _, _| false);
    // E commits on s1 and s2; s3 never receives it.
    let s3_out = |from: NodeId, to: NodeId, _: &Message<C>| from == s3 || to == s3;
    s.propose(s1, put("E"), s3_out);
    let e = s.engines[&s1].last_log_id();
    assert_eq!(s.engines[&s1].commit_index(), e.index, "E committed");
    assert!(!s.engines[&s3].log_holds(e));

    // s2 is wiped and s1 fails. Only s3 holds a log, and it lacks E.
    s.wipe(s2, NEW);
    s.crash(s1);
    s.engines.get_mut(&s3).unwrap().campaign_now();
    s.flush(s3);
    s.deliver(|_, _, _| false);
    assert!(
        !s.engines[&s3].is_leader(),
        "s3 leads without committed entry {e}: elected by the wiped s2"
    );
}

#[test]
fn a_leader_forgets_what_a_wiped_follower_acknowledged_and_counts_it_for_nothing() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    s.elect(s1, |_, _, _| false);
    s.propose(s1, put("a"), |_, _, _| false);
    let a = s.engines[&s1].last_log_id().index;
    assert_eq!(s.engines[&s1].matched()[&s2], a);

    // s2 comes back wiped; s3 goes down. s2 answers under its new identity.
    s.wipe(s2, NEW);
    s.crash(s3);
    s.heartbeat(s1, |_, _, _| false);
    let leader = &s.engines[&s1];
    assert!(
        leader.unrecognized_peers().contains(&s2),
        "the leader did not notice s2's new identity"
    );
    // It is sent the log again, from scratch, like a learner...
    assert_eq!(s.engines[&s2].last_log_id(), s.engines[&s1].last_log_id());
    // ...but its acknowledgements commit nothing: with s3 down, no
    // majority of the members the configuration knows holds `b`.
    s.propose(s1, put("b"), |_, _, _| false);
    let b = s.engines[&s1].last_log_id().index;
    assert!(s.engines[&s2].log_holds(s.engines[&s1].last_log_id()));
    assert_eq!(
        s.engines[&s1].commit_index(),
        a,
        "committed {b} counting the wiped s2"
    );
}

#[test]
fn a_wiped_node_learns_it_is_not_recognized_and_neither_votes_nor_campaigns() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    s.elect(s1, |_, _, _| false);
    s.wipe(s2, NEW);
    assert!(s.engines[&s2].recognized(), "an empty log records nothing");
    s.heartbeat(s1, |_, _, _| false);
    let wiped = &s.engines[&s2];
    assert_eq!(wiped.membership().uuids[&s2], NodeUuid(2));
    assert!(!wiped.recognized());
    assert_eq!(wiped.role(), Role::Follower);

    // Left alone past any election timeout, it does not campaign.
    s.crash(s1);
    let later = s.clock + 10 * s.cfg.election_timeout_max_ms;
    s.engines.get_mut(&s2).unwrap().tick(later);
    s.flush(s2);
    assert!(
        !s.queue
            .iter()
            .any(|(from, _, m)| *from == s2 && matches!(m, Message::Vote(_))),
        "the wiped s2 campaigned"
    );
    // Nor does it grant a vote, even to a candidate it would otherwise
    // have to.
    s.queue.clear();
    s.engines.get_mut(&s3).unwrap().tick(later);
    s.flush(s3);
    s.deliver(|_, to, _| to == s1);
    assert!(!s.engines[&s3].is_leader());
    assert_eq!(s.engines[&s2].voted_for(), None);
}

#[test]
fn the_first_leader_records_every_members_identity_without_holding_up_a_change() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::unrecorded(3, config());
    s.engines.get_mut(&s1).unwrap().campaign_now();
    s.flush(s1);
    s.deliver(|_, _, _| false);
    assert!(s.engines[&s1].is_leader());
    // A change proposed at once is not refused for the record in flight.
    s.engines
        .get_mut(&s1)
        .unwrap()
        .add_learner(NodeId(4), "n4".into())
        .expect("a change right after the election");
    s.flush(s1);
    s.deliver(|_, _, _| false);
    s.heartbeat(s1, |_, _, _| false);
    let leader = &s.engines[&s1];
    let m = leader.membership();
    for id in [s1, s2, s3] {
        assert_eq!(m.uuids.get(&id), Some(&NodeUuid(id.0.into())), "node {id}");
    }
    assert!(m.nodes.contains_key(&NodeId(4)), "the learner was added");
    assert!(leader.membership_log_id().index <= leader.commit_index());
    for id in [s2, s3] {
        assert_eq!(s.engines[&id].membership(), m, "node {id}");
    }
}

#[test]
fn a_removed_member_added_back_is_recorded_afresh() {
    let [s1, s2] = [1, 2].map(NodeId);
    let mut s = Script::new(3);
    s.elect(s1, |_, _, _| false);
    s.wipe(s2, NEW);
    s.heartbeat(s1, |_, _, _| false);
    let change = |s: &mut Script, f: &dyn Fn(&mut raft_core::Engine<C>)| {
        f(s.engines.get_mut(&s1).unwrap());
        s.flush(s1);
        s.deliver(|_, _, _| false);
        s.heartbeat(s1, |_, _, _| false);
    };
    // The operator removes s2 and adds it back, as a learner first.
    let voters = |ids: &[u64]| ids.iter().map(|i| NodeId(*i)).collect();
    change(&mut s, &|e| {
        e.change_membership(voters(&[1, 3])).unwrap();
    });
    assert!(!s.engines[&s1].membership().uuids.contains_key(&s2));
    change(&mut s, &|e| {
        e.add_learner(s2, "n2".into()).unwrap();
    });
    change(&mut s, &|e| {
        e.change_membership(voters(&[1, 2, 3])).unwrap();
    });
    s.heartbeat(s1, |_, _, _| false);
    let leader = &s.engines[&s1];
    assert_eq!(leader.membership().uuids.get(&s2), Some(&NEW));
    assert!(leader.membership().is_voter(s2) && !leader.membership().is_joint());
    assert!(leader.unrecognized_peers().is_empty());
    assert!(s.engines[&s2].recognized());
    assert!(leader.commit_index() >= LogIndex(1));
}
