//! Membership changes on the simulator: learners, joint consensus, removing
//! the leader, removed nodes that keep running, one change at a time, and
//! recovery of the configuration after restarts. Each scenario runs several
//! seeds; a failure prints its seed and the replay command.

mod common;

use std::collections::BTreeSet;

use common::*;
use raft_core::engine::ProposeError;
use raft_core::sim::Rng;
use raft_core::sim::{MembershipChange, Sim};
use raft_core::{MembershipError, NodeId};

fn set(ids: &[u64]) -> BTreeSet<NodeId> {
    ids.iter().map(|i| NodeId(*i)).collect()
}

/// Retries `change` (through leader changes and refusals while an earlier
/// change settles) until the leader's final configuration has `voters` and
/// `learners`, within `max_ms`.
fn drive(
    sim: &mut Sim,
    change: MembershipChange,
    voters: &BTreeSet<NodeId>,
    learners: &BTreeSet<NodeId>,
    max_ms: u64,
) {
    let deadline = sim.now() + max_ms;
    let done = |s: &Sim| {
        s.settled_voters().as_ref() == Some(voters)
            && s.leader()
                .and_then(|l| s.engine(l))
                .is_some_and(|e| e.membership().learner_ids() == *learners)
    };
    while !done(sim) {
        sim.expect(sim.now() < deadline, || {
            format!(
                "membership never became voters {voters:?} learners {learners:?}:{}",
                sim.describe()
            )
        });
        if sim.settled_voters().is_some() {
            let _ = sim.change(change.clone());
        }
        sim.run_until(2 * ET, |s| done(s));
    }
}

#[test]
fn add_promote_remove_and_replace_voters_while_leaders_crash_and_the_network_partitions() {
    for seed in seeds(10) {
        let mut sim = Sim::with_voters(
            opts(5, seed, "add_promote_remove_and_replace_voters"),
            &[NodeId(1), NodeId(2), NodeId(3)],
        );
        let mut r = Rng::new(seed);
        sim.start_clients(3, 2);
        wait_leader(&mut sim);
        let steps = [
            (
                MembershipChange::AddLearner(NodeId(4)),
                set(&[1, 2, 3]),
                set(&[4]),
            ),
            (
                MembershipChange::Voters(set(&[1, 2, 3, 4])),
                set(&[1, 2, 3, 4]),
                set(&[]),
            ),
            (
                MembershipChange::AddLearner(NodeId(5)),
                set(&[1, 2, 3, 4]),
                set(&[5]),
            ),
            // Replace 1 by 5 in one joint change.
            (
                MembershipChange::Voters(set(&[2, 3, 4, 5])),
                set(&[2, 3, 4, 5]),
                set(&[]),
            ),
            (
                MembershipChange::Voters(set(&[2, 4, 5])),
                set(&[2, 4, 5]),
                set(&[]),
            ),
            // Demote 4: it stays, as a learner.
            (MembershipChange::Demote(NodeId(4)), set(&[2, 5]), set(&[4])),
            // And back.
            (
                MembershipChange::Voters(set(&[2, 4, 5])),
                set(&[2, 4, 5]),
                set(&[]),
            ),
        ];
        for (change, voters, learners) in steps {
            // Propose, then disturb the cluster while the change is in flight.
            let _ = sim.change(change.clone());
            sim.run_for(r.range(0, 40));
            match r.range(0, 3) {
                0 => {
                    if let Some(l) = sim.leader() {
                        sim.crash(l);
                    }
                }
                1 => {
                    if let Some(l) = sim.leader() {
                        sim.isolate(l);
                    }
                }
                _ => {
                    let ids = sim.ids();
                    let split = r.range(1, ids.len() as u64) as usize;
                    sim.partition(&[ids[..split].to_vec(), ids[split..].to_vec()]);
                }
            }
            sim.run_for(r.range(100, 2 * ET));
            sim.heal();
            for id in sim.ids() {
                sim.restart(id);
            }
            drive(&mut sim, change, &voters, &learners, 30 * ET);
        }
        heal_and_converge(&mut sim);
        sim.check_acknowledged_writes_present();
        sim.final_check();
    }
}

#[test]
fn removing_the_leader_hands_over_to_the_remaining_voters() {
    for seed in seeds(10) {
        let mut sim = Sim::new(opts(3, seed, "removing_the_leader_hands_over"));
        sim.start_clients(2, 2);
        let old = wait_leader(&mut sim);
        // A leader changes membership only once its term has committed.
        must_put(&mut sim, "before", "removal");
        let remaining: BTreeSet<NodeId> = others(&sim, old).into_iter().collect();
        let r = sim.change(MembershipChange::Voters(remaining.clone()));
        sim.expect(r.is_ok(), || format!("change refused: {r:?}"));
        sim.run_until(20 * ET, |s| s.settled_voters().as_ref() == Some(&remaining));
        sim.expect(sim.settled_voters().as_ref() == Some(&remaining), || {
            format!("the leader's removal never completed:{}", sim.describe())
        });
        let new = wait_leader(&mut sim);
        sim.expect(new != old, || format!("removed node {old} still leads"));
        // The old leader stays out: it never leads again while the rest run.
        sim.run_for(20 * ET);
        sim.expect(sim.leader() != Some(old), || {
            format!("removed node {old} took over again")
        });
        must_put(&mut sim, "after", "removal");
        sim.stop_clients();
        sim.run_until(10 * ET, |s| s.converged());
        sim.check_acknowledged_writes_present();
        sim.final_check();
    }
}

/// A leader that commits its own removal steps down; writes it took after
/// the new configuration's entry may still be committed by the next
/// leader, which never tells it. It answers them (outcome unknown) rather
/// than holding them forever.
#[test]
fn a_leader_that_removes_itself_answers_every_write_it_took() {
    for seed in seeds(10) {
        let mut sim = Sim::new(opts(3, seed, "a_leader_that_removes_itself_answers"));
        let old = wait_leader(&mut sim);
        must_put(&mut sim, "before", "removal");
        let remaining: BTreeSet<NodeId> = others(&sim, old).into_iter().collect();
        let r = sim.change(MembershipChange::Voters(remaining.clone()));
        sim.expect(r.is_ok(), || format!("change refused: {r:?}"));
        let mut took = Vec::new();
        for i in 0..(20 * ET) {
            if sim.leader() != Some(old) {
                break;
            }
            took.extend(sim.propose_put_on(old, &format!("k{}", i % 3), &format!("v{i}")));
            sim.run_for(1);
        }
        sim.expect(took.len() > 1, || "the leader took no writes".into());
        sim.run_until(20 * ET, |s| s.settled_voters().as_ref() == Some(&remaining));
        sim.run_until(10 * ET, |s| s.converged());
        sim.check_every_write_answered();
        sim.final_check();
    }
}

/// The nodes other than `cut_off` (isolated) make themselves the voters,
/// removing it; returns them.
fn remove_cut_off(sim: &mut Sim, cut_off: NodeId) -> BTreeSet<NodeId> {
    let remaining: BTreeSet<NodeId> = others(sim, cut_off).into_iter().collect();
    drive(
        sim,
        MembershipChange::Voters(remaining.clone()),
        &remaining,
        &BTreeSet::new(),
        20 * ET,
    );
    remaining
}

/// A leader cut off while it takes writes is removed by the others; it
/// never receives a configuration without it, so no leader will ever tell
/// it what became of those writes. They are answered (unknown) once it
/// campaigns, not held for ever.
#[test]
fn a_leader_removed_behind_a_partition_answers_every_write_it_took() {
    for seed in seeds(10) {
        let mut sim = Sim::new(opts(5, seed, "a_leader_removed_behind_a_partition"));
        let old = wait_leader(&mut sim);
        must_put(&mut sim, "before", "partition");
        sim.isolate(old);
        let mut took = Vec::new();
        for i in 0..5 {
            took.extend(sim.propose_put_on(old, &format!("k{i}"), "cut off"));
        }
        sim.expect(!took.is_empty(), || "the leader took no writes".into());
        remove_cut_off(&mut sim, old);
        sim.heal();
        sim.run_until(10 * ET, |s| s.converged());
        sim.run_for(4 * ET);
        sim.check_every_write_answered();
        sim.final_check();
    }
}

#[test]
fn a_removed_node_that_keeps_running_cannot_raise_the_clusters_term() {
    for seed in seeds(10) {
        let mut sim = Sim::new(opts(5, seed, "a_removed_node_cannot_raise_the_term"));
        let leader = wait_leader(&mut sim);
        let victim = others(&sim, leader)[0];
        // Cut the victim off first, so it never learns it was removed and
        // keeps campaigning as a voter of the old configuration.
        sim.isolate(victim);
        let remaining = remove_cut_off(&mut sim, victim);
        let l = wait_leader(&mut sim);
        let term = term_of(&sim, l);
        // Let it time out many times, then reconnect it.
        sim.run_for(10 * ET);
        sim.heal();
        sim.run_for(20 * ET);
        sim.expect(sim.leader() == Some(l), || {
            format!("the removed node disrupted the leader:{}", sim.describe())
        });
        for id in &remaining {
            sim.expect(term_of(&sim, *id) == term, || {
                format!(
                    "node {id}'s term moved from {term} to {} because of a removed node",
                    term_of(&sim, *id)
                )
            });
        }
        must_put(&mut sim, "k", "v");
    }
}

#[test]
fn membership_changes_are_one_at_a_time_and_invalid_ones_are_refused() {
    for seed in seeds(3) {
        let mut sim = Sim::with_voters(
            opts(5, seed, "membership_changes_are_one_at_a_time"),
            &[NodeId(1), NodeId(2), NodeId(3)],
        );
        wait_leader(&mut sim);
        // A leader changes membership only once its term has committed.
        must_put(&mut sim, "k", "v");
        let refused = |r: Result<_, ProposeError<String>>| match r {
            Err(ProposeError::Membership(e)) => Some(e),
            _ => None,
        };
        let r = sim.change(MembershipChange::Voters(BTreeSet::new()));
        sim.expect(
            refused(r.clone()) == Some(MembershipError::NoVoters),
            || format!("empty set: {r:?}"),
        );
        let r = sim.change(MembershipChange::Voters(set(&[1, 2, 3, 4])));
        sim.expect(
            refused(r.clone()) == Some(MembershipError::UnknownNode(NodeId(4))),
            || format!("unknown node: {r:?}"),
        );
        let r = sim.change(MembershipChange::RemoveLearner(NodeId(2)));
        sim.expect(
            refused(r.clone()) == Some(MembershipError::IsVoter(NodeId(2))),
            || format!("voter as learner: {r:?}"),
        );

        let first = sim.change(MembershipChange::AddLearner(NodeId(4)));
        sim.expect(first.is_ok(), || format!("add learner: {first:?}"));
        // Proposed but not committed yet: a second change must wait.
        let second = sim.change(MembershipChange::AddLearner(NodeId(5)));
        sim.expect(
            matches!(
                refused(second.clone()),
                Some(MembershipError::InProgress { .. })
            ),
            || format!("second change while the first is uncommitted: {second:?}"),
        );
        drive(
            &mut sim,
            MembershipChange::AddLearner(NodeId(5)),
            &set(&[1, 2, 3]),
            &set(&[4, 5]),
            20 * ET,
        );
        let r = sim.change(MembershipChange::AddLearner(NodeId(4)));
        sim.expect(
            refused(r.clone()) == Some(MembershipError::AlreadyMember(NodeId(4))),
            || format!("duplicate learner: {r:?}"),
        );
        // Only learners as the new voters: refused.
        let r = sim.change(MembershipChange::Voters(set(&[4, 5])));
        sim.expect(
            refused(r.clone()) == Some(MembershipError::NoCurrentVoter),
            || format!("learner-only set: {r:?}"),
        );
        // While the joint configuration is in force, nothing else may start.
        let joint = sim.change(MembershipChange::Voters(set(&[1, 2, 3, 4, 5])));
        sim.expect(joint.is_ok(), || format!("promote: {joint:?}"));
        let r = sim.change(MembershipChange::RemoveLearner(NodeId(4)));
        sim.expect(
            matches!(refused(r.clone()), Some(MembershipError::InProgress { .. })),
            || format!("during joint: {r:?}"),
        );
        sim.run_until(20 * ET, |s| {
            s.settled_voters() == Some(set(&[1, 2, 3, 4, 5]))
        });
        sim.expect(sim.settled_voters() == Some(set(&[1, 2, 3, 4, 5])), || {
            "promotion never completed".into()
        });
        // Learners do not vote or campaign: the five voters now elect.
        must_put(&mut sim, "k", "v");
    }
}

#[test]
fn membership_is_recovered_from_the_log_and_from_snapshots_after_restarts() {
    for seed in seeds(5) {
        for snapshots in [false, true] {
            let mut o = opts(5, seed, "membership_is_recovered_after_restarts");
            if snapshots {
                o = with_snapshots(o, 10);
            }
            let mut sim = Sim::with_voters(o, &[NodeId(1), NodeId(2), NodeId(3)]);
            wait_leader(&mut sim);
            drive(
                &mut sim,
                MembershipChange::AddLearner(NodeId(4)),
                &set(&[1, 2, 3]),
                &set(&[4]),
                20 * ET,
            );
            drive(
                &mut sim,
                MembershipChange::AddLearner(NodeId(5)),
                &set(&[1, 2, 3]),
                &set(&[4, 5]),
                20 * ET,
            );
            drive(
                &mut sim,
                MembershipChange::Voters(set(&[2, 3, 4, 5])),
                &set(&[2, 3, 4, 5]),
                &set(&[]),
                20 * ET,
            );
            for i in 0..30 {
                must_put(&mut sim, &format!("k{i}"), "v");
            }
            for id in sim.ids() {
                sim.crash(id);
            }
            for id in sim.ids() {
                sim.restart(id);
            }
            wait_leader(&mut sim);
            sim.run_until(10 * ET, |s| s.converged());
            for id in [2, 3, 4, 5].map(NodeId) {
                let m = sim.engine(id).map(|e| e.membership().clone());
                sim.expect(
                    m.as_ref().map(|m| m.voter_ids()) == Some(set(&[2, 3, 4, 5])),
                    || format!("node {id} recovered membership {m:?} (snapshots: {snapshots})"),
                );
            }
            sim.expect(sim.leader() != Some(NodeId(1)), || {
                "removed node 1 leads after restart".into()
            });
            must_put(&mut sim, "after", "restart");
            sim.final_check();
        }
    }
}

#[test]
fn leadership_transfer_under_load_loses_and_duplicates_no_acknowledged_write() {
    for seed in seeds(10) {
        let mut sim = Sim::new(opts(5, seed, "leadership_transfer_under_load"));
        let mut r = Rng::new(seed);
        sim.start_clients(4, 2);
        for _ in 0..5 {
            let l = wait_leader(&mut sim);
            let others = others(&sim, l);
            let to = others[r.range(0, others.len() as u64) as usize];
            // A transfer is abandoned after an election timeout if the
            // target is not caught up by then (the leader resumes), and the
            // election it starts may be won by another node; a client
            // retries. Within three attempts it must go through.
            for _ in 0..3 {
                sim.transfer_leader(to);
                sim.run_until(2 * ET, |s| s.leader() == Some(to));
                if sim.leader() == Some(to) {
                    break;
                }
                // Whoever leads now (the old leader resumed, or a third
                // node won the election the target started) is asked next.
                wait_leader(&mut sim);
            }
            sim.expect(sim.leader() == Some(to), || {
                format!(
                    "transfer {l} -> {to} did not complete in 3 attempts:{}",
                    sim.describe()
                )
            });
            sim.run_for(r.range(50, 300));
        }
        let dups = sim.duplicated_commands();
        sim.expect(dups.is_empty(), || {
            format!("commands written twice: {dups:?}")
        });
        heal_and_converge(&mut sim);
        sim.check_acknowledged_writes_present();
        sim.final_check();
    }
}

#[test]
fn a_demoted_voter_stays_a_learner_and_keeps_receiving_the_log() {
    for seed in seeds(10) {
        let mut sim = Sim::new(opts(3, seed, "a_demoted_voter_stays_a_learner"));
        sim.start_clients(2, 2);
        let leader = wait_leader(&mut sim);
        must_put(&mut sim, "before", "demotion");
        let demoted = *sim
            .ids()
            .iter()
            .find(|id| **id != leader)
            .expect("a follower");
        let others: BTreeSet<NodeId> = sim.ids().into_iter().filter(|id| *id != demoted).collect();
        let joint = sim
            .change(MembershipChange::Demote(demoted))
            .expect("the leader proposes the demotion");
        let learners = BTreeSet::from([demoted]);
        sim.run_until(10 * ET, |s| {
            s.settled_voters().as_ref() == Some(&others)
                && s.engine(leader)
                    .is_some_and(|e| e.membership().learner_ids() == learners)
        });
        sim.expect(sim.leader() == Some(leader), || {
            format!(
                "the demotion did not settle under leader {leader}:{}",
                sim.describe()
            )
        });
        // One change: it never left the cluster on the way (no removal and
        // re-adding), so every configuration from the joint one on names it.
        let e = sim.engine(leader).expect("leader");
        let cached = (joint.index.0..=e.last_log_id().index.0)
            .filter_map(|i| e.cached_entry(raft_core::LogIndex(i)));
        for entry in cached {
            if let raft_core::EntryPayload::Membership(m) = &entry.payload {
                sim.expect(m.nodes.contains_key(&demoted), || {
                    format!(
                        "configuration at {} dropped node {demoted}: {m:?}",
                        entry.log_id
                    )
                });
            }
        }
        must_put(&mut sim, "after", "demotion");
        heal_and_converge(&mut sim);
        let leader = sim.leader().expect("a leader");
        let last = sim.engine(leader).expect("leader").last_log_id();
        let e = sim.engine(demoted).expect("the demoted node runs");
        sim.expect(e.role() == raft_core::Role::Learner, || {
            format!("node {demoted} is {:?}, not a learner", e.role())
        });
        sim.expect(e.last_log_id() == last, || {
            format!("the learner stopped receiving the log:{}", sim.describe())
        });
        // Demoting it again is refused: it no longer votes.
        let r = sim.change(MembershipChange::Demote(demoted));
        sim.expect(
            matches!(
                r,
                Err(ProposeError::Membership(MembershipError::NotVoter(id))) if id == demoted
            ),
            || format!("demoting a learner answered {r:?}"),
        );
        sim.check_acknowledged_writes_present();
        sim.final_check();
    }
}
