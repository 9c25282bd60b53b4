//! Scenarios scripted message by message against bare engines (no
//! simulator randomness), where the exact interleaving is the point: the
//! extended Raft paper's Figure 8, and a vote that must survive a crash.

mod common;

use common::script::{C, Script, put};
use raft_core::{LogId, LogIndex, Message, NodeId};

fn append_to(msg: &Message<C>, index: u64) -> bool {
    matches!(msg, Message::AppendEntries(r) if r.entries.iter().any(|e| e.log_id.index == LogIndex(index)))
}

#[test]
fn leader_never_commits_previous_term_entry_by_counting_replicas() {
    let [s1, s2, s3, s4, s5] = [1, 2, 3, 4, 5].map(NodeId);
    let mut s = Script::new(5);

    // S1 leads term 1; its no-op (index 2) reaches everyone.
    s.elect(s1, |_, _, _| false);
    assert_eq!(s.engines[&s1].commit_index(), LogIndex(2));

    // (a) S1 appends A at index 3 and replicates it to S2 only.
    s.propose(s1, put("A"), |from, to, _| from == s1 && to != s2);
    assert_eq!(s.engines[&s2].last_log_id(), LogId::new(1, 3));

    // (b) S1 crashes; S5 wins term 2 with S3 and S4 and appends B at index 3,
    // which nobody receives.
    s.crash(s1);
    s.elect(s5, |from, to, msg| {
        from == s5 && matches!(msg, Message::AppendEntries(_)) || to == s1
    });
    assert_eq!(s.engines[&s5].last_log_id().index, LogIndex(3));
    let b = s.engines[&s5].last_log_id();
    s.crash(s5);

    // (c) S1 restarts and wins with S2 and S3, then replicates A (term 1) to
    // S3 but not its own no-op at index 4: A is on a majority.
    s.restart(s1);
    let cut = |_: NodeId, to: NodeId, msg: &Message<C>| to == s5 || append_to(msg, 4);
    s.elect(s1, cut);
    s.heartbeat(s1, cut); // S3 rejects the probe, hints where its log ends
    s.heartbeat(s1, cut);
    assert!(
        s.engines[&s3].log_holds(LogId::new(1, 3)),
        "A must have reached S3 for the scenario"
    );
    assert!(
        s.engines[&s1].commit_index() < LogIndex(3),
        "Figure 8: S1 committed an entry of an earlier term by counting replicas"
    );

    // (d) S1 crashes again; S5 returns and, having a newer last term than S2
    // and S3, wins and overwrites index 3 with B. That is only safe because
    // A was never committed.
    s.crash(s1);
    s.restart(s5);
    s.elect(s5, |_, to, _| to == s1);
    s.deliver(|_, to, _| to == s1);
    for id in [s2, s3, s4, s5] {
        assert_eq!(s.engines[&id].log_id_at(LogIndex(3)), Some(b), "node {id}");
    }
    assert_eq!(s.committed.get(&LogIndex(3)), Some(&b));
}

#[test]
fn vote_survives_a_crash_so_a_node_never_votes_twice_in_a_term() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    // S1 campaigns in term 1; only S3 hears it, and S3 grants its vote.
    s.engines.get_mut(&s1).unwrap().campaign_now();
    s.flush(s1);
    let granted = |s: &Script, voter: NodeId| {
        s.queue.iter().any(|(from, _, m)| {
            *from == voter && matches!(m, Message::VoteResponse(v) if v.granted)
        })
    };
    let batch = std::mem::take(&mut s.queue);
    for (from, to, msg) in batch {
        if to == s3 {
            s.engines.get_mut(&to).unwrap().step(from, msg).unwrap();
            s.flush(to);
        }
    }
    assert!(granted(&s, s3), "S3 should grant S1 in term 1");
    s.queue.clear();

    // S3 loses power and comes back from its disk.
    s.crash(s3);
    s.restart(s3);

    // S2, still in term 0, campaigns in term 1 too. S3 already voted in term 1.
    s.engines.get_mut(&s2).unwrap().campaign_now();
    s.flush(s2);
    assert_eq!(s.engines[&s2].term().0, 1);
    let batch = std::mem::take(&mut s.queue);
    for (from, to, msg) in batch {
        if to == s3 {
            s.engines.get_mut(&to).unwrap().step(from, msg).unwrap();
            s.flush(to);
        }
    }
    assert!(
        !granted(&s, s3),
        "S3 voted twice in term 1: its vote was not durable before it replied"
    );
}

#[test]
fn late_vote_rejections_from_an_earlier_campaign_do_not_end_the_current_one() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    // S1 campaigns in term 1; both refusals are held back in the network.
    s.engines.get_mut(&s1).unwrap().campaign_now();
    s.flush(s1);
    s.queue.clear();
    let refusal = |term: u64, pre_vote: bool| {
        Message::VoteResponse(raft_core::VoteResponse {
            term: raft_core::Term(term),
            granted: false,
            pre_vote,
            voter_uuid: raft_core::NodeUuid(1),
        })
    };
    // S1 campaigns again, in term 2.
    s.engines.get_mut(&s1).unwrap().campaign_now();
    s.flush(s1);
    assert_eq!(s.engines[&s1].term().0, 2);
    // The refusals of term 1 (and a stray pre-vote refusal) arrive now.
    let e = s.engines.get_mut(&s1).unwrap();
    e.step(s2, refusal(1, false)).unwrap();
    e.step(s3, refusal(1, false)).unwrap();
    e.step(s3, refusal(1, true)).unwrap();
    assert_eq!(
        e.role(),
        raft_core::Role::Candidate,
        "answers to an earlier campaign ended the current one"
    );
    // The current campaign's answers still decide it.
    s.deliver(|_, _, _| false);
    assert!(s.engines[&s1].is_leader());
}
