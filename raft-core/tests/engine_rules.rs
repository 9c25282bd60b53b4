//! One case per engine rule that `cargo mutants` (over `raft-core/src/engine`)
//! showed no other test pinned down: each test here fails on a mutant
//! that survived the unit tests, the scripted cases and the swarm sweep.
//! Bare engines, driven by hand ([`common::script::Script`]).

mod common;

use std::collections::BTreeMap;

use common::script::{C, Script, config, put};
use raft_core::memory::kv::KvCommand;
use raft_core::{Action, Entry, LogId, LogIndex, Message, VoteRequest};
use raft_core::{
    Config, Engine, HardState, InitializeError, Membership, MembershipError, NodeId, NodeUuid,
    RecoveredState, Role, SnapshotMeta, Term,
};

fn members(ids: &[u64]) -> BTreeMap<NodeId, String> {
    ids.iter().map(|i| (NodeId(*i), format!("n{i}"))).collect()
}

fn pristine(id: u64) -> Engine<C> {
    Engine::new(NodeId(id), config(), id, 0, RecoveredState::default()).unwrap()
}

/// A 3-node script (with `cfg`) in which s1 leads.
fn led_by_s1(cfg: Config) -> Script {
    let mut s = Script::with_config(3, cfg);
    s.elect(NodeId(1), |_, _, _| false);
    s
}

/// Proposes `cmd` at `leader` and delivers everything that follows.
fn commit(s: &mut Script, leader: NodeId, cmd: KvCommand) {
    s.propose(leader, cmd, |_, _, _| false);
}

/// `led_by_s1`, and node 4 (not running) added as a learner, committed.
fn with_learner_4() -> Script {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    s.engines
        .get_mut(&s1)
        .unwrap()
        .add_learner(NodeId(4), "n4".into())
        .unwrap();
    s.flush(s1);
    s.deliver(|_, _, _| false);
    s
}

#[test]
fn initialize_is_refused_once_the_node_has_a_log_or_a_term() {
    let mut e = pristine(1);
    e.initialize(Membership::new_voters(members(&[1, 2, 3])))
        .unwrap();
    assert!(
        matches!(
            e.initialize(Membership::new_voters(members(&[1, 2, 3]))),
            Err(InitializeError::NotPristine { .. })
        ),
        "a second initialize must be refused: the node has entry 1"
    );

    let voted = RecoveredState {
        hard_state: HardState {
            term: Term(3),
            voted_for: None,
            uuid: Default::default(),
        },
        ..RecoveredState::default()
    };
    let mut e = Engine::<C>::new(NodeId(1), config(), 1, 0, voted).unwrap();
    assert!(
        matches!(
            e.initialize(Membership::new_voters(members(&[1]))),
            Err(InitializeError::NotPristine { .. })
        ),
        "a node that has seen term 3 is not pristine even with an empty log"
    );
}

#[test]
fn a_lone_voter_campaigns_at_its_first_tick_and_a_cluster_member_waits() {
    let mut lone = pristine(1);
    lone.initialize(Membership::new_voters(members(&[1])))
        .unwrap();
    lone.take_actions();
    lone.tick(0);
    assert_ne!(
        lone.role(),
        Role::Follower,
        "a one-voter cluster must not wait an election timeout for itself"
    );

    let mut member = pristine(1);
    member
        .initialize(Membership::new_voters(members(&[1, 2, 3])))
        .unwrap();
    member.take_actions();
    member.tick(0);
    assert_eq!(member.role(), Role::Follower);
    assert!(
        member.next_deadline() >= config().election_timeout_min_ms,
        "a member of a 3-voter cluster campaigns only after an election timeout"
    );
}

#[test]
fn the_engine_reports_its_own_view() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    s.elect(s2, |_, _, _| false);
    for id in [s1, s2, s3] {
        let e = &s.engines[&id];
        assert_eq!(e.id(), id);
        assert_eq!(e.leader_id(), Some(s2), "node {id}");
        assert_eq!(
            e.role(),
            if id == s2 {
                Role::Leader
            } else {
                Role::Follower
            }
        );
        // The script's config, not the default one.
        assert_eq!(e.config().max_entries_per_message, 1);
    }
    assert_ne!(
        Config::default().max_entries_per_message,
        1,
        "the check above needs a non-default value"
    );
}

#[test]
fn a_node_outside_every_voter_set_is_a_learner() {
    let mut m = Membership::new_voters(members(&[1, 2, 3]));
    m.nodes.insert(NodeId(4), "n4".into());
    let mut learner = pristine(4);
    learner.initialize(m.clone()).unwrap();
    assert_eq!(learner.role(), Role::Learner);
    let mut voter = pristine(3);
    voter.initialize(m).unwrap();
    assert_eq!(voter.role(), Role::Follower);
}

#[test]
fn committed_entries_are_handed_to_the_state_machine_and_counted_as_applied() {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    let leader = s.engines.get_mut(&s1).unwrap();
    let id = leader.propose(put("v")).unwrap();
    s.flush(s1);
    s.deliver(|_, _, _| false);
    let leader = s.engines.get_mut(&s1).unwrap();
    assert_eq!(leader.commit_index(), id.index);
    // `flush` took the Apply action; the engine counts the entry handed out.
    assert_eq!(leader.applied_index(), id.index);
}

#[test]
fn a_built_snapshot_becomes_the_engines_snapshot() {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    let leader = s.engines.get_mut(&s1).unwrap();
    assert!(leader.snapshot_meta().is_none());
    let meta = snapshot_built_at_last_entry(leader, 7);
    assert_eq!(leader.snapshot_meta(), Some(&meta));
}

/// Reports to `e` a snapshot `id` of everything in its log; returns it.
fn snapshot_built_at_last_entry(e: &mut Engine<C>, id: u64) -> SnapshotMeta<C> {
    snapshot_of_size_built_at_last_entry(e, id, 0)
}

fn snapshot_of_size_built_at_last_entry(e: &mut Engine<C>, id: u64, size: u64) -> SnapshotMeta<C> {
    let last = e.last_log_id().index;
    snapshot_of_size_built_at(e, last, id, size)
}

/// Reports to `e` a snapshot `id` of `size` bytes of its log up to `at`.
fn snapshot_of_size_built_at(
    e: &mut Engine<C>,
    at: LogIndex,
    id: u64,
    size: u64,
) -> SnapshotMeta<C> {
    let meta = SnapshotMeta {
        last_log_id: e.log_id_at(at).expect("in the log"),
        membership: e.membership().clone(),
        id,
        size,
    };
    e.snapshot_built(meta.clone());
    meta
}

#[test]
fn a_leaders_next_deadline_is_its_next_heartbeat() {
    let [s1, s2] = [1, 2].map(NodeId);
    let mut s = led_by_s1(config());
    // A new leader's first heartbeat is due at once; after it, the next.
    s.heartbeat(s1, |_, _, _| false);
    let hb = config().heartbeat_interval_ms;
    let leader = &s.engines[&s1];
    assert!(
        leader.next_deadline() > s.clock && leader.next_deadline() <= s.clock + hb,
        "leader's next deadline {} is not its heartbeat (now {}, interval {hb})",
        leader.next_deadline(),
        s.clock
    );
    // Only the leader's clock moved in this script; a follower's is at 0.
    let follower = &s.engines[&s2];
    assert!(follower.next_deadline() >= config().election_timeout_min_ms);
}

#[test]
fn advancing_the_clock_fires_no_timer_but_the_next_tick_sees_the_time() {
    let mut e = pristine(1);
    e.initialize(Membership::new_voters(members(&[1, 2, 3])))
        .unwrap();
    e.take_actions();
    let late = config().election_timeout_max_ms * 10;
    e.advance_clock(late);
    assert!(e.take_actions().is_empty());
    assert_eq!(e.role(), Role::Follower);
    // The driver ticks with its own reading of the clock, which may be
    // older than what it advanced to: time never runs backwards.
    e.tick(0);
    assert_ne!(
        e.role(),
        Role::Follower,
        "the election timeout had passed at the advanced clock"
    );
}

#[test]
fn a_leadership_transfer_that_does_not_happen_ends_after_an_election_timeout() {
    let [s1, s2] = [1, 2].map(NodeId);
    let mut s = led_by_s1(config());
    // Not at time 0: the deadline is counted from now.
    s.heartbeat(s1, |_, _, _| false);
    let leader = s.engines.get_mut(&s1).unwrap();
    leader.transfer_leader(s2).unwrap();
    assert!(leader.propose(put("paused")).is_err());
    // s2 never hears of it.
    s.flush(s1);
    s.queue.retain(|(_, to, _)| *to != s2);
    s.clock += config().election_timeout_min_ms;
    let leader = s.engines.get_mut(&s1).unwrap();
    leader.tick(s.clock);
    assert!(leader.is_leader());
    assert!(
        leader.propose(put("resumed")).is_ok(),
        "proposals must resume once the transfer has timed out"
    );
}

fn membership_error<N: std::fmt::Debug>(
    r: Result<raft_core::LogId, raft_core::engine::ProposeError<N>>,
) -> MembershipError {
    match r {
        Err(raft_core::engine::ProposeError::Membership(e)) => e,
        Err(other) => panic!("expected a membership error, got {other:?}"),
        Ok(id) => panic!("expected a membership error, the change was proposed at {id}"),
    }
}

#[test]
fn a_member_cannot_be_added_twice_not_even_as_a_learner() {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    let leader = s.engines.get_mut(&s1).unwrap();
    leader.add_learner(NodeId(4), "n4".into()).unwrap();
    s.flush(s1);
    s.deliver(|_, _, _| false);
    let leader = s.engines.get_mut(&s1).unwrap();
    assert!(leader.membership().learner_ids().contains(&NodeId(4)));
    assert_eq!(
        membership_error(leader.add_learner(NodeId(4), "elsewhere".into())),
        MembershipError::AlreadyMember(NodeId(4))
    );
    assert_eq!(
        membership_error(leader.add_learner(NodeId(2), "n2".into())),
        MembershipError::AlreadyMember(NodeId(2))
    );
}

#[test]
fn a_learner_is_removed_by_a_configuration_without_it() {
    let s1 = NodeId(1);
    let mut s = with_learner_4();
    let leader = s.engines.get_mut(&s1).unwrap();
    let id = leader.remove_learner(NodeId(4)).unwrap();
    assert_eq!(leader.membership_log_id(), id);
    assert!(!leader.membership().nodes.contains_key(&NodeId(4)));
    assert_eq!(leader.membership().voter_ids().len(), 3);
    assert_eq!(
        membership_error(leader.remove_learner(NodeId(2))),
        MembershipError::InProgress { index: id.index },
        "the removal is not committed yet"
    );
}

#[test]
fn one_membership_change_at_a_time_even_between_learners() {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    let leader = s.engines.get_mut(&s1).unwrap();
    let first = leader.add_learner(NodeId(4), "n4".into()).unwrap();
    // Not committed yet (nothing delivered): a second change must wait.
    assert_eq!(
        membership_error(leader.add_learner(NodeId(5), "n5".into())),
        MembershipError::InProgress { index: first.index }
    );
    s.flush(s1);
    s.deliver(|_, _, _| false);
    let leader = s.engines.get_mut(&s1).unwrap();
    assert!(leader.commit_index() >= first.index);
    leader.add_learner(NodeId(5), "n5".into()).unwrap();
}

#[test]
fn a_snapshot_older_than_the_current_one_or_of_another_history_is_ignored() {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    for v in ["a", "b"] {
        commit(&mut s, s1, put(v));
    }
    let leader = s.engines.get_mut(&s1).unwrap();
    let last = leader.last_log_id();
    let meta = |id: LogId, n: u64, e: &Engine<C>| SnapshotMeta {
        last_log_id: id,
        membership: e.membership().clone(),
        id: n,
        size: 0,
    };
    let newest = meta(last, 1, leader);
    leader.snapshot_built(newest.clone());
    let older = meta(leader.log_id_at(LogIndex(2)).unwrap(), 2, leader);
    leader.snapshot_built(older);
    assert_eq!(
        leader.snapshot_meta(),
        Some(&newest),
        "an older snapshot replaced a newer one"
    );

    // A state machine reporting an entry this log does not hold (another
    // term at an index above the log's base) built from another history.
    let foreign = LogId::new(last.term.0 + 5, last.index.0 + 1);
    leader.snapshot_built(meta(foreign, 3, leader));
    assert_eq!(
        leader.snapshot_meta(),
        Some(&newest),
        "a foreign snapshot was taken"
    );
}

/// s1 leads; s3 is down while s1 commits three puts, silent for an
/// election timeout (so the leader no longer keeps the log for it), s1
/// builds snapshot 1 of its whole log, and s3 comes back behind it: it can
/// only catch up by snapshot. `cfg` should set `purge_keep` 0.
fn s3_back_behind_snapshot_1(cfg: Config) -> Script {
    s3_back_behind_snapshot_1_of_size(cfg, 0)
}

/// A follower's answer to a snapshot chunk: go on at `next_offset`. The
/// follower speaks under its identity `uuid`.
fn chunk_answer(term: Term, uuid: NodeUuid, snapshot_id: u64, next_offset: u64) -> Message<C> {
    Message::InstallSnapshotResponse(raft_core::InstallSnapshotResponse {
        term,
        snapshot_id,
        next_offset,
        done: false,
        uuid,
    })
}

/// As [`s3_back_behind_snapshot_1`], the snapshot's meta giving `size`.
fn s3_back_behind_snapshot_1_of_size(cfg: Config, size: u64) -> Script {
    s3_back_behind_snapshot_1_with_puts_after(cfg, size, 0)
}

/// As [`s3_back_behind_snapshot_1_of_size`], with `after` (at most three)
/// more puts committed past the snapshot, which covers the first three.
fn s3_back_behind_snapshot_1_with_puts_after(cfg: Config, size: u64, after: usize) -> Script {
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = led_by_s1(cfg.clone());
    s.crash(s3);
    for v in &["a", "b", "c", "d", "e", "f"][..3 + after] {
        commit(&mut s, s1, put(v));
    }
    // Down long enough that the leader keeps nothing for it: ten election
    // timeouts.
    let silent_from = s.clock;
    while s.clock <= silent_from + 10 * cfg.election_timeout_max_ms {
        s.heartbeat(s1, |_, _, _| false);
    }
    let leader = s.engines.get_mut(&s1).unwrap();
    let at = LogIndex(leader.last_log_id().index.0 - after as u64);
    snapshot_of_size_built_at(leader, at, 1, size);
    s.flush(s1);
    s.restart(s3);
    s
}

#[test]
fn a_snapshot_with_more_log_behind_it_than_its_share_is_rebuilt_before_it_is_sent() {
    let cfg = Config {
        purge_keep: 0,
        ..config()
    };
    let s1 = NodeId(1);
    let kept = |_: NodeId, _: NodeId, _: &raft_core::Message<C>| false;
    // Which snapshots went out (a transfer is a window of chunks).
    let sent_ids = |s: &Script| {
        let mut ids: Vec<u64> = s.snapshot_sends.iter().map(|x| x.4).collect();
        ids.dedup();
        ids
    };
    // Three puts weigh more than half of a 2-byte snapshot: s3 would get
    // the old state and then all of them. The leader builds first.
    let mut s = s3_back_behind_snapshot_1_with_puts_after(cfg.clone(), 2, 3);
    s.heartbeat(s1, kept);
    s.heartbeat(s1, kept);
    let applied = s.engines[&s1].applied_index();
    assert_eq!(
        s.snapshot_builds,
        [(s1, applied)],
        "a fresh build asked for"
    );
    assert!(sent_ids(&s).is_empty(), "the stale snapshot went out");
    // Asked once, however many probes come back while it builds; and
    // writes go on meanwhile.
    s.heartbeat(s1, kept);
    for v in ["g", "h", "i"] {
        commit(&mut s, s1, put(v));
    }
    assert_eq!(
        s.snapshot_builds.len(),
        1,
        "a second build for one transfer"
    );
    // The build ends at the index it was asked at, so the log since it
    // already outweighs the share again: it goes out all the same (a
    // transfer waits for one build, or writes faster than builds would
    // hold it back forever).
    snapshot_of_size_built_at(s.engines.get_mut(&s1).unwrap(), applied, 2, 2);
    s.heartbeat(s1, kept);
    s.heartbeat(s1, kept);
    assert_eq!(sent_ids(&s), [2], "the fresh snapshot, and only it");
    assert_eq!(s.snapshot_builds.len(), 1, "rebuilt again for one transfer");

    // A snapshot the log since weighs less than half of is sent as it is.
    let mut s = s3_back_behind_snapshot_1_with_puts_after(cfg.clone(), 1 << 20, 3);
    s.heartbeat(s1, kept);
    s.heartbeat(s1, kept);
    assert!(
        s.snapshot_builds.is_empty(),
        "rebuilt a fresh enough snapshot"
    );
    assert_eq!(sent_ids(&s), [1]);

    // And with the rule off, or automatic snapshots off, even a stale one.
    for off in [
        Config {
            snapshot_refresh_percent: 0,
            ..cfg.clone()
        },
        Config {
            snapshot_every: 0,
            ..cfg.clone()
        },
    ] {
        let mut s = s3_back_behind_snapshot_1_with_puts_after(off, 2, 3);
        s.heartbeat(s1, kept);
        s.heartbeat(s1, kept);
        assert!(s.snapshot_builds.is_empty(), "built with the rule off");
        assert_eq!(sent_ids(&s), [1]);
    }
}

#[test]
fn a_snapshot_streams_a_window_of_chunks_and_resends_only_what_was_not_acknowledged() {
    let cfg = Config {
        purge_keep: 0,
        snapshot_chunk_bytes: 100,
        snapshot_window: 3,
        ..config()
    };
    let [s1, s3] = [1, 3].map(NodeId);
    // Ten chunks' worth.
    let mut s = s3_back_behind_snapshot_1_of_size(cfg.clone(), 1_000);
    let kept = |_: NodeId, _: NodeId, _: &raft_core::Message<C>| false;
    s.heartbeat(s1, kept);
    s.heartbeat(s1, kept);
    let offsets = |s: &Script| s.snapshot_sends.iter().map(|x| x.2).collect::<Vec<_>>();
    assert_eq!(offsets(&s), [0, 100, 200], "a window of three chunks");
    let (term, uuid) = (s.engines[&s1].term(), s.engines[&s3].uuid());
    let answer = |next_offset| chunk_answer(term, uuid, 1, next_offset);
    let step = |s: &mut Script, next_offset| {
        s.engines
            .get_mut(&s1)
            .unwrap()
            .step(s3, answer(next_offset))
            .unwrap();
        s.flush(s1);
    };
    // The second chunk overtook the first: s3 holds it and still expects
    // 0, which moves nothing.
    step(&mut s, 0);
    assert_eq!(offsets(&s), [0, 100, 200]);
    // The first arrives: 200 bytes are written, two more chunks fit.
    step(&mut s, 200);
    assert_eq!(offsets(&s), [0, 100, 200, 300, 400]);
    // Nothing more is answered: after an election timeout the leader sends
    // again what s3 has not acknowledged, from 200, never from 0.
    let last_sent = s.snapshot_sends.last().unwrap().3;
    while s.clock + cfg.heartbeat_interval_ms < last_sent + cfg.election_timeout_min_ms {
        s.heartbeat(s1, kept);
        assert_eq!(s.snapshot_sends.len(), 5, "resent before a timeout");
    }
    for _ in 0..2 {
        s.heartbeat(s1, kept);
    }
    assert_eq!(
        offsets(&s)[5..],
        [200, 300, 400],
        "the unacknowledged window again"
    );
    // s3 lost the transfer (it restarted) and answers 0: start over.
    step(&mut s, 0);
    assert_eq!(
        offsets(&s)[8..],
        [0, 100, 200],
        "a transfer s3 no longer holds"
    );
}

#[test]
fn an_unanswered_snapshot_chunk_is_resent_after_an_election_timeout_not_before() {
    let cfg = Config {
        purge_keep: 0,
        ..config()
    };
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = s3_back_behind_snapshot_1(cfg.clone());
    let to_s3 = |s: &Script| s.snapshot_sends.iter().filter(|x| x.1 == s3).count();
    let chunk_lost = |_: NodeId, _: NodeId, _: &raft_core::Message<C>| false;
    s.heartbeat(s1, chunk_lost);
    s.heartbeat(s1, chunk_lost);
    assert_eq!(
        to_s3(&s),
        1,
        "the snapshot's first chunk: {:?}",
        s.snapshot_sends
    );
    let first_sent = s.snapshot_sends[0].3;
    // The chunk is never answered (the script does not carry it out).
    while s.clock + cfg.heartbeat_interval_ms < first_sent + cfg.election_timeout_min_ms {
        s.heartbeat(s1, chunk_lost);
        assert_eq!(
            to_s3(&s),
            1,
            "chunk resent at {} though sent at {first_sent}",
            s.clock
        );
    }
    for _ in 0..2 {
        s.heartbeat(s1, chunk_lost);
    }
    assert_eq!(to_s3(&s), 2, "the lost chunk was never resent");

    // It was only slow: both copies arrive. The follower writes the first
    // and answers the second with where to go on (the same offset). The
    // leader sends one next chunk, not one per answer, which would run two
    // streams of chunks for the rest of the transfer.
    let (term, uuid) = (s.engines[&s1].term(), s.engines[&s3].uuid());
    let answer = |next_offset| chunk_answer(term, uuid, 1, next_offset);
    let leader = s.engines.get_mut(&s1).unwrap();
    leader.step(s3, answer(64)).unwrap();
    leader.step(s3, answer(64)).unwrap();
    s.flush(s1);
    let offsets: Vec<u64> = s.snapshot_sends.iter().map(|x| x.2).collect();
    assert_eq!(offsets, [0, 0, 64], "one stream of chunks");
    // A stale answer (behind what was acknowledged) moves nothing either.
    let leader = s.engines.get_mut(&s1).unwrap();
    leader.step(s3, answer(32)).unwrap();
    s.flush(s1);
    assert_eq!(s.snapshot_sends.len(), 3, "a stale answer sent a chunk");
}

/// s1 leads s1-s3 with a snapshot (id 1) s3 needs: s3 was down while s1
/// committed three puts and built it at the last, and is back. Every
/// applied entry is due for a snapshot (`snapshot_every` 1, no weighing).
fn leader_starting_a_transfer_to_s3() -> Script {
    let cfg = Config {
        purge_keep: 0,
        snapshot_every: 1,
        snapshot_log_percent: 0,
        ..config()
    };
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = s3_back_behind_snapshot_1(cfg);
    // s3 answers a heartbeat, which shows it behind the purged log.
    s.heartbeat(s1, |_, _, _| false);
    s.heartbeat(s1, |_, _, _| false);
    assert_eq!(
        s.snapshot_sends
            .iter()
            .map(|x| (x.1, x.2, x.4))
            .collect::<Vec<_>>(),
        [(s3, 0, 1)],
        "the first chunk of snapshot 1 to s3"
    );
    s
}

#[test]
fn a_leader_builds_no_snapshot_while_a_live_follower_receives_one() {
    let s1 = NodeId(1);
    let mut s = leader_starting_a_transfer_to_s3();
    let builds = |s: &Script| s.snapshot_builds.iter().filter(|b| b.0 == s1).count();
    let before = builds(&s);
    // Writes go on with s2 while s3 (answering heartbeats) receives.
    for v in ["d", "e", "f"] {
        commit(&mut s, s1, put(v));
        s.heartbeat(s1, |_, _, _| false);
    }
    assert_eq!(
        builds(&s),
        before,
        "a build during the transfer would free the snapshot s3 is reading"
    );
    // s3 goes silent for ten election timeouts: the transfer no longer
    // holds snapshots back.
    s.crash(NodeId(3));
    let silent_from = s.clock;
    while s.clock <= silent_from + 10 * s.cfg.election_timeout_max_ms {
        s.heartbeat(s1, |_, _, _| false);
    }
    commit(&mut s, s1, put("g"));
    assert_eq!(
        builds(&s),
        before + 1,
        "the build waited for a dead transfer"
    );
}

#[test]
fn a_transfer_goes_on_across_one_build_and_starts_over_after_two() {
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = leader_starting_a_transfer_to_s3();
    let (term, uuid) = (s.engines[&s1].term(), s.engines[&s3].uuid());
    let answer = |snapshot_id, next_offset| chunk_answer(term, uuid, snapshot_id, next_offset);
    // A build that was already running when the transfer began finishes.
    commit(&mut s, s1, put("d"));
    let leader = s.engines.get_mut(&s1).unwrap();
    snapshot_built_at_last_entry(leader, 2);
    leader.step(s3, answer(1, 64)).unwrap();
    s.flush(s1);
    let last = |s: &Script| s.snapshot_sends.last().map(|x| (x.2, x.4));
    assert_eq!(last(&s), Some((64, 1)), "snapshot 1 goes on where s3 is");
    // A second build frees snapshot 1 (the state machine keeps only the
    // one before the current): the transfer starts over on the current.
    commit(&mut s, s1, put("e"));
    let leader = s.engines.get_mut(&s1).unwrap();
    snapshot_built_at_last_entry(leader, 3);
    leader.step(s3, answer(1, 128)).unwrap();
    s.flush(s1);
    s.heartbeat(s1, |_, _, _| false);
    assert_eq!(
        last(&s),
        Some((0, 3)),
        "the transfer starts over on snapshot 3"
    );
}

/// s3's disk is slow: it acknowledges each of four in-flight appends a
/// good part of an election timeout after the one before, so the oldest
/// unanswered one is soon older than an election timeout. A follower that
/// acknowledges is busy, not stuck: the leader sends none of those entries
/// again (it used to resend the whole window from `matched`, and a slow
/// follower under load drowned in duplicates).
#[test]
fn a_follower_that_acknowledges_slowly_is_not_sent_its_window_again() {
    let cfg = Config {
        max_inflight: 4,
        ..config()
    };
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = led_by_s1(cfg.clone());
    commit(&mut s, s1, put("a"));
    s.holding.insert(s3);
    // Every entry index delivered to s3, as the network carries it.
    let sent_to_s3 = std::cell::RefCell::new(Vec::new());
    let observe = |_: NodeId, to: NodeId, m: &Message<C>| {
        if let (true, Message::AppendEntries(r)) = (to == s3, m) {
            let mut sent = sent_to_s3.borrow_mut();
            sent.extend(r.entries.iter().map(|e| e.log_id.index));
        }
        false
    };
    for v in ["b", "c", "d", "e"] {
        s.propose(s1, put(v), observe);
    }
    let step = cfg.election_timeout_min_ms * 6 / 10;
    for _ in 0..4 {
        let until = s.clock + step;
        while s.clock < until {
            s.heartbeat(s1, observe);
        }
        s.release(s3, 1);
        s.deliver(observe);
    }
    let last = s.engines[&s1].last_log_id().index;
    assert_eq!(s.engines[&s1].matched()[&s3], last, "s3 caught up");
    let sent = sent_to_s3.borrow();
    let unique: std::collections::BTreeSet<_> = sent.iter().collect();
    assert_eq!(unique.len(), sent.len(), "entries sent twice: {sent:?}");
}

/// s3 answers (heartbeats) but receives no entries; s1 commits 10 puts
/// with s2 and builds a snapshot at the last one, `purge_keep` 0. Returns
/// s1's log base afterwards and s3's match index.
fn purge_with_a_live_follower_behind(purge_keep_max: u64) -> (LogIndex, LogIndex) {
    let (mut s, s3_matched) = leader_snapshots_with_a_live_follower_behind(purge_keep_max, 0);
    (
        s.engines.get_mut(&NodeId(1)).unwrap().log_base().index,
        s3_matched,
    )
}

/// The scene of [`purge_with_a_live_follower_behind`], the snapshot
/// weighing `snapshot_bytes`; returns it and s3's match index.
fn leader_snapshots_with_a_live_follower_behind(
    purge_keep_max: u64,
    snapshot_bytes: u64,
) -> (Script, LogIndex) {
    leader_snapshots_with_a_follower_behind(purge_keep_max, snapshot_bytes, 0)
}

/// As [`leader_snapshots_with_a_live_follower_behind`], s3 silent for
/// `quiet_ms` before the build.
fn leader_snapshots_with_a_follower_behind(
    purge_keep_max: u64,
    snapshot_bytes: u64,
    quiet_ms: u64,
) -> (Script, LogIndex) {
    let cfg = Config {
        purge_keep: 0,
        purge_keep_max,
        ..config()
    };
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = led_by_s1(cfg);
    let entries_to_s3 = move |_: NodeId, to: NodeId, m: &Message<C>| {
        to == s3 && matches!(m, Message::AppendEntries(r) if !r.entries.is_empty())
    };
    for i in 0..10 {
        s.propose(s1, put(&format!("v{i}")), entries_to_s3);
        s.heartbeat(s1, entries_to_s3);
    }
    if quiet_ms > 0 {
        s.crash(s3);
        let quiet_from = s.clock;
        while s.clock <= quiet_from + quiet_ms {
            s.heartbeat(s1, |_, _, _| false);
        }
    }
    let leader = s.engines.get_mut(&s1).unwrap();
    snapshot_of_size_built_at_last_entry(leader, 1, snapshot_bytes);
    let s3_matched = leader.matched()[&s3];
    (s, s3_matched)
}

/// A follower keeps what its leader keeps for a follower that lags: if it
/// leads next, it repairs that follower with entries. Purging to its own
/// `purge_keep`, it turned every laggard into a snapshot transfer at each
/// leader change (`cargo xtask bench join`: two 300 MB snapshots at once).
#[test]
fn a_follower_keeps_what_its_leader_keeps_for_a_follower_that_lags() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let (mut s, s3_matched) = leader_snapshots_with_a_live_follower_behind(100, 0);
    let leader_base = s.engines[&s1].log_base().index;
    assert!(leader_base <= s3_matched, "the leader kept what s3 needs");
    // The next heartbeat tells s2 where the leader's log begins.
    s.heartbeat(s1, |_, to, m| {
        to == s3 && matches!(m, Message::AppendEntries(r) if !r.entries.is_empty())
    });
    let follower = s.engines.get_mut(&s2).unwrap();
    snapshot_built_at_last_entry(follower, 1);
    assert_eq!(
        follower.log_base().index,
        leader_base,
        "s2 purged entries its leader keeps for s3"
    );
    // Past `purge_keep_max`, a follower purges as its leader would.
    let (mut s, _) = leader_snapshots_with_a_live_follower_behind(3, 0);
    s.heartbeat(s1, |_, _, _| false);
    let follower = s.engines.get_mut(&s2).unwrap();
    snapshot_built_at_last_entry(follower, 1);
    let last = follower.last_log_id().index;
    assert_eq!(follower.log_base().index, LogIndex(last.0 - 3));
}

#[test]
fn a_leader_keeps_the_entries_a_live_follower_still_needs_up_to_purge_keep_max() {
    let (base, s3_matched) = purge_with_a_live_follower_behind(100);
    assert!(
        s3_matched < LogIndex(5),
        "s3 was meant to lag: {s3_matched:?}"
    );
    assert_eq!(
        base, s3_matched,
        "the leader purged entries live s3 still needs, so it will need a snapshot"
    );
    let (base, _) = purge_with_a_live_follower_behind(3);
    assert_eq!(
        base,
        LogIndex(12 - 3),
        "past purge_keep_max entries, a snapshot is the cheaper path"
    );
}

/// Past `purge_keep_max` entries, the leader still keeps what a live
/// follower lacks while it weighs less than twice the snapshot: sending the
/// state again would cost more, and the follower would then also lack
/// everything written during that transfer (`cargo xtask bench join`: a
/// learner that had just installed 312 MB lacked 330,000 entries, and was
/// sent the whole state again).
#[test]
fn a_leader_keeps_what_a_live_follower_lacks_while_it_weighs_less_than_the_snapshot_twice() {
    let s1 = NodeId(1);
    let (s, s3_matched) = leader_snapshots_with_a_live_follower_behind(3, 1 << 20);
    assert_eq!(
        s.engines[&s1].log_base().index,
        s3_matched,
        "a 1 MiB state outweighs a dozen small entries: they stay for s3"
    );
    // A snapshot lighter than the entries s3 lacks is the cheaper path.
    let (s, _) = leader_snapshots_with_a_live_follower_behind(3, 2);
    let last = s.engines[&s1].last_log_id().index;
    assert_eq!(s.engines[&s1].log_base().index, LogIndex(last.0 - 3));
}

/// A follower busy installing a snapshot or catching up can go an
/// election timeout without answering; purging what it is being sent then
/// cost a second transfer of the whole state (`cargo xtask bench join`, 1
/// GiB of state). Ten election timeouts of silence make it dead to the
/// purge.
#[test]
fn a_follower_silent_for_a_few_election_timeouts_still_has_its_entries_kept() {
    let s1 = NodeId(1);
    let timeout = config().election_timeout_max_ms;
    let (s, s3_matched) = leader_snapshots_with_a_follower_behind(100, 0, 2 * timeout);
    assert_eq!(s.engines[&s1].log_base().index, s3_matched);
    let (s, s3_matched) = leader_snapshots_with_a_follower_behind(100, 0, 11 * timeout);
    assert!(s.engines[&s1].log_base().index > s3_matched);
}

#[test]
fn a_restart_keeps_purge_keep_entries_behind_the_snapshot() {
    let (membership, entries) = voters_then_puts(12);
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(1),
            voted_for: None,
            uuid: Default::default(),
        },
        entries,
        snapshot: Some(SnapshotMeta {
            last_log_id: LogId::new(1, 10),
            membership,
            id: 1,
            size: 0,
        }),
        applied: LogId::new(1, 10),
        ..RecoveredState::default()
    };
    let cfg = Config {
        purge_keep: 4,
        ..config()
    };
    let mut e = Engine::new(NodeId(1), cfg, 1, 0, state).unwrap();
    assert_eq!(
        e.log_base().index,
        LogIndex(6),
        "a restart purged the slack a follower a little behind needs"
    );
    let purges: Vec<_> = e
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::PurgeLog { upto } => Some(upto.index),
            _ => None,
        })
        .collect();
    assert_eq!(purges, [LogIndex(6)]);
}

#[test]
fn a_transfer_to_itself_or_to_a_learner_changes_nothing() {
    let s1 = NodeId(1);
    let mut s = with_learner_4();
    let leader = s.engines.get_mut(&s1).unwrap();
    for to in [s1, NodeId(4)] {
        leader.transfer_leader(to).unwrap();
        assert!(
            leader.propose(put("still leading")).is_ok(),
            "a transfer to {to} paused proposals"
        );
    }
}

/// The stale-report guard of `log_persisted`: a write that completes for
/// entries the log no longer holds (a new leader replaced them meanwhile)
/// says nothing about what is durable now. Counting it would let a leader
/// count itself for entries that are not on its disk.
#[test]
fn a_completed_write_of_replaced_entries_does_not_count_as_durable() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let cfg = Config {
        max_entries_per_message: 64,
        max_inflight: 8,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    // s1 appends three entries of term 1; they reach s2 only, and neither
    // disk has finished writing them. s2's acknowledgements are lost.
    s.holding.extend([s1, s2]);
    for v in ["a", "b", "c"] {
        s.engines.get_mut(&s1).unwrap().propose(put(v)).unwrap();
    }
    s.flush(s1);
    s.deliver(|from, to, _| to == s3 || (from == s2 && to == s1));
    assert_eq!(s.engines[&s2].last_log_id(), LogId::new(1, 5));
    // s1 loses power (its writes were never durable) and comes back.
    s.crash(s1);
    s.holding.remove(&s1);
    s.restart(s1);
    // s3 wins term 2 with s1's vote; its no-op replaces s2's index 3.
    s.elect(s3, |_, _, _| false);
    assert_eq!(
        s.engines[&s2].log_id_at(LogIndex(3)),
        Some(LogId::new(2, 3))
    );
    // s2's first write (entries 1-3..1-5) completes only now.
    s.release(s2, 1);
    // s3 fails; s2 wins term 3 with s1's vote and appends its no-op (4),
    // which s1 acknowledges. s2's disk holds none of 2-3 and 3-4 yet.
    s.crash(s3);
    s.elect(s2, |_, _, _| false);
    assert_eq!(s.engines[&s2].last_log_id(), LogId::new(3, 4));
    assert!(
        s.engines[&s2].commit_index() < LogIndex(4),
        "s2 committed 3-4 counting itself, but its disk ends at {:?}",
        s.disks[&s2].1.last().map(|e| e.log_id)
    );
    // Once its writes complete, it commits.
    s.holding.remove(&s2);
    s.release(s2, usize::MAX);
    s.heartbeat(s2, |_, _, _| false);
    assert_eq!(s.engines[&s2].commit_index(), LogIndex(4));
}

fn vote_request(
    e: &Engine<C>,
    from: NodeId,
    term: u64,
    pre_vote: bool,
    transfer: bool,
) -> Message<C> {
    Message::Vote(VoteRequest {
        term: Term(term),
        candidate_id: from,
        last_log_id: e.last_log_id(),
        pre_vote,
        transfer,
        candidate_uuid: NodeUuid(from.0.into()),
    })
}

/// `req` from a candidate whose log ends at the initial configuration.
fn with_stale_log(mut req: Message<C>) -> Message<C> {
    if let Message::Vote(r) = &mut req {
        r.last_log_id = LogId::new(0, 1);
    }
    req
}

/// Steps `msg` into `id` and returns whether it granted the vote it answered.
fn granted(s: &mut Script, id: NodeId, from: NodeId, msg: Message<C>) -> bool {
    let e = s.engines.get_mut(&id).unwrap();
    e.step(from, msg).unwrap();
    e.take_actions()
        .iter()
        .any(|a| matches!(a, Action::Respond { msg: Message::VoteResponse(v), .. } if v.granted))
}

#[test]
fn a_follower_that_hears_from_its_leader_refuses_campaigns_but_not_transfers() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let cfg = Config {
        check_quorum: true,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    s.heartbeat(s1, |_, _, _| false);
    let term = s.engines[&s2].term().0;
    // A disruptive candidate (it was partitioned, or removed) asks s2, which
    // heard from s1 within the election timeout (thesis §4.2.3).
    let req = vote_request(&s.engines[&s2], s3, term + 1, false, false);
    assert!(
        !granted(&mut s, s2, s3, req),
        "vote granted against a live leader"
    );
    assert_eq!(
        s.engines[&s2].term().0,
        term,
        "a refused campaign moved the term"
    );
    let req = vote_request(&s.engines[&s2], s3, term, true, false);
    assert!(
        !granted(&mut s, s2, s3, req),
        "pre-vote granted against a live leader"
    );
    // The leader itself holds the lease too, however long since it last
    // heard from anyone (check-quorum, not the lease, decides that).
    s.engines.get_mut(&s1).unwrap().advance_clock(10_000);
    let req = vote_request(&s.engines[&s1], s3, term + 1, false, false);
    assert!(
        !granted(&mut s, s1, s3, req),
        "the leader voted against itself"
    );
    assert!(s.engines[&s1].is_leader());
    // A campaign that follows a leadership transfer is the leader's wish.
    let req = vote_request(&s.engines[&s2], s3, term + 1, false, true);
    assert!(granted(&mut s, s2, s3, req), "transfer vote refused");
}

#[test]
fn the_lease_ends_an_election_timeout_after_the_leader_was_last_heard() {
    let [s2, s3] = [2, 3].map(NodeId);
    let cfg = Config {
        check_quorum: true,
        ..config()
    };
    let mut s = led_by_s1(cfg.clone());
    // s2's clock was at 0 when it last heard from s1.
    let e = s.engines.get_mut(&s2).unwrap();
    e.advance_clock(cfg.election_timeout_min_ms);
    let term = e.term().0;
    let req = vote_request(&s.engines[&s2], s3, term + 1, false, false);
    assert!(
        granted(&mut s, s2, s3, req),
        "still refusing votes a full election timeout after the leader was heard"
    );
}

#[test]
fn leadership_transfer_succeeds_at_once_while_followers_hold_a_lease() {
    let [s1, s2] = [1, 2].map(NodeId);
    let cfg = Config {
        check_quorum: true,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    s.heartbeat(s1, |_, _, _| false);
    s.engines.get_mut(&s1).unwrap().transfer_leader(s2).unwrap();
    s.flush(s1);
    s.deliver(|_, _, _| false);
    assert!(
        s.engines[&s2].is_leader(),
        "the transfer target did not win"
    );
}

#[test]
fn a_pre_vote_is_granted_only_for_a_higher_term_and_an_up_to_date_log() {
    let [s2, s3] = [2, 3].map(NodeId);
    let mut s = led_by_s1(config());
    let term = s.engines[&s2].term().0;
    let stale = with_stale_log(vote_request(&s.engines[&s2], s3, term + 1, true, false));
    assert!(
        !granted(&mut s, s2, s3, stale),
        "pre-vote granted to a stale log"
    );
    let same_term = vote_request(&s.engines[&s2], s3, term, true, false);
    assert!(
        !granted(&mut s, s2, s3, same_term),
        "pre-vote granted without a higher term"
    );
    let good = vote_request(&s.engines[&s2], s3, term + 1, true, false);
    assert!(granted(&mut s, s2, s3, good));
}

#[test]
fn a_refused_vote_leaves_the_node_free_to_vote_in_that_term() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = led_by_s1(config());
    let term = s.engines[&s2].term().0 + 1;
    let stale = with_stale_log(vote_request(&s.engines[&s2], s3, term, false, false));
    assert!(!granted(&mut s, s2, s3, stale));
    assert_eq!(
        s.engines[&s2].voted_for(),
        None,
        "a refusal recorded a vote"
    );
    let good = vote_request(&s.engines[&s2], s1, term, false, false);
    assert!(granted(&mut s, s2, s1, good));
}

#[test]
fn a_follower_with_a_leader_in_this_term_votes_for_no_one_else() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = Script::new(3);
    // s1 wins with s2's vote; s3 never sees the campaign, only the leader.
    s.elect(s1, |from, to, msg| {
        from == s1 && to == s3 && matches!(msg, Message::Vote(_))
    });
    assert_eq!(s.engines[&s3].leader_id(), Some(s1));
    assert_eq!(s.engines[&s3].voted_for(), None);
    let term = s.engines[&s3].term().0;
    let req = vote_request(&s.engines[&s3], s2, term, false, false);
    assert!(
        !granted(&mut s, s3, s2, req),
        "voted against the leader it follows"
    );
}

#[test]
fn a_candidate_asked_for_its_own_term_stays_a_candidate() {
    let [s1, s2] = [1, 2].map(NodeId);
    let mut s = Script::new(3);
    s.engines.get_mut(&s1).unwrap().campaign_now();
    s.engines.get_mut(&s2).unwrap().campaign_now();
    let term = s.engines[&s1].term().0;
    assert_eq!(s.engines[&s2].term().0, term);
    let req = vote_request(&s.engines[&s1], s2, term, false, false);
    assert!(
        !granted(&mut s, s1, s2, req),
        "a candidate voted for a rival"
    );
    assert_eq!(s.engines[&s1].role(), Role::Candidate);
}

/// A vote answer from `from` (under the identity the scripts give it).
fn vote_response(from: NodeId, term: u64, granted: bool, pre_vote: bool) -> Message<C> {
    Message::VoteResponse(raft_core::VoteResponse {
        term: Term(term),
        granted,
        pre_vote,
        voter_uuid: NodeUuid(from.0.into()),
    })
}

/// A 3-node script with pre-vote on, in which s1 has just become a
/// pre-candidate (its pre-vote requests are dropped).
fn pre_candidate() -> (Script, u64) {
    let cfg = Config {
        pre_vote: true,
        ..config()
    };
    let mut s = Script::with_config(3, cfg.clone());
    let s1 = NodeId(1);
    s.engines
        .get_mut(&s1)
        .unwrap()
        .tick(cfg.election_timeout_max_ms * 2);
    s.flush(s1);
    s.queue.clear();
    assert_eq!(s.engines[&s1].role(), Role::PreCandidate);
    let term = s.engines[&s1].term().0;
    (s, term)
}

#[test]
fn a_pre_candidate_refused_by_a_majority_gives_up() {
    let (mut s, term) = pre_candidate();
    let e = s.engines.get_mut(&NodeId(1)).unwrap();
    e.step(NodeId(2), vote_response(NodeId(2), term, false, true))
        .unwrap();
    e.step(NodeId(3), vote_response(NodeId(3), term, false, true))
        .unwrap();
    assert_eq!(e.role(), Role::Follower);
    assert_eq!(e.term().0, term, "a pre-vote round moved the term");
}

#[test]
fn a_pre_candidate_refused_at_a_higher_term_adopts_it() {
    let (mut s, term) = pre_candidate();
    let e = s.engines.get_mut(&NodeId(1)).unwrap();
    e.step(NodeId(2), vote_response(NodeId(2), term + 3, false, true))
        .unwrap();
    assert_eq!(e.role(), Role::Follower);
    assert_eq!(e.term().0, term + 3);
}

#[test]
fn a_pre_candidate_counts_no_real_vote() {
    let (mut s, term) = pre_candidate();
    let e = s.engines.get_mut(&NodeId(1)).unwrap();
    // Refusals of a real vote in this term (from an election this node ran
    // in it before) are not answers to its pre-vote.
    e.step(NodeId(2), vote_response(NodeId(2), term, false, false))
        .unwrap();
    e.step(NodeId(3), vote_response(NodeId(3), term, false, false))
        .unwrap();
    assert_eq!(
        e.role(),
        Role::PreCandidate,
        "real-vote refusals counted against a pre-vote"
    );
}

#[test]
fn a_vote_request_of_an_earlier_term_is_refused_and_records_nothing() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    // s2 moves to a later term without voting in it (the candidate's log
    // is stale) and without a leader.
    let mut s = led_by_s1(config());
    let later = s.engines[&s2].term().0 + 2;
    let stale_log = with_stale_log(vote_request(&s.engines[&s2], s3, later, false, false));
    assert!(!granted(&mut s, s2, s3, stale_log));
    // A candidate of an earlier term, with a good log, asks now.
    let old = vote_request(&s.engines[&s2], s1, later - 1, false, false);
    assert!(
        !granted(&mut s, s2, s1, old),
        "vote granted to an earlier term"
    );
    assert_eq!(s.engines[&s2].voted_for(), None);
}

#[test]
fn only_the_leader_can_tell_a_node_to_campaign() {
    let [s2, s3] = [2, 3].map(NodeId);
    let mut s = led_by_s1(config());
    let term = s.engines[&s2].term();
    let e = s.engines.get_mut(&s2).unwrap();
    e.step(
        s3,
        Message::TimeoutNow(raft_core::TimeoutNowRequest {
            term,
            leader_id: s3,
        }),
    )
    .unwrap();
    assert_eq!(
        e.role(),
        Role::Follower,
        "campaigned on a non-leader's word"
    );
    assert_eq!(e.term(), term);
}

#[test]
fn reads_pending_at_a_leader_that_steps_down_fail_at_once() {
    let [s1, s2] = [1, 2].map(NodeId);
    let mut s = led_by_s1(config());
    let e = s.engines.get_mut(&s1).unwrap();
    e.read_index(7).unwrap();
    let term = e.term().0;
    // A higher term arrives before the read's quorum round completes.
    let req = vote_request(&s.engines[&s1], s2, term + 1, false, false);
    let e = s.engines.get_mut(&s1).unwrap();
    e.step(s2, req).unwrap();
    assert!(!e.is_leader());
    let failed: Vec<_> = e
        .take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::ReadFailed { ids, .. } => Some(ids),
            _ => None,
        })
        .collect();
    assert_eq!(failed, vec![vec![7]], "the pending read was not failed");
}

fn entry(term: u64, index: u64, payload: raft_core::EntryPayload<C>) -> raft_core::Entry<C> {
    raft_core::Entry {
        log_id: LogId::new(term, index),
        payload,
    }
}

fn put_entry(term: u64, index: u64) -> raft_core::Entry<C> {
    entry(term, index, raft_core::EntryPayload::command(put("v")))
}

fn append(term: u64, prev: LogId, entries: Vec<raft_core::Entry<C>>) -> Message<C> {
    Message::AppendEntries(raft_core::AppendEntriesRequest {
        term: Term(term),
        leader_id: NodeId(1),
        prev_log_id: prev,
        entries,
        leader_commit: LogIndex(0),
        round: 0,
        keep_from: LogIndex(0),
    })
}

fn append_response(e: &mut Engine<C>) -> raft_core::AppendEntriesResponse {
    e.take_actions()
        .into_iter()
        .find_map(|a| match a {
            Action::Respond {
                msg: Message::AppendEntriesResponse(r),
                ..
            } => Some(r),
            _ => None,
        })
        .expect("an AppendEntries response")
}

#[test]
fn append_entries_carry_as_many_entries_as_the_byte_limit_allows() {
    let s1 = NodeId(1);
    let size = put_entry(1, 1).size_hint();
    let cfg = Config {
        max_entries_per_message: 64,
        max_inflight: 8,
        max_bytes_per_message: 2 * size,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    for _ in 0..5 {
        s.engines.get_mut(&s1).unwrap().propose(put("v")).unwrap();
    }
    s.flush(s1);
    let sizes: Vec<usize> = s
        .queue
        .iter()
        .filter_map(|(_, _, m)| match m {
            Message::AppendEntries(r) if !r.entries.is_empty() => Some(r.entries.len()),
            _ => None,
        })
        .collect();
    assert!(!sizes.is_empty());
    assert!(
        sizes.iter().all(|n| *n <= 2),
        "over the byte limit: {sizes:?}"
    );
    assert!(sizes.contains(&2), "two entries fit the limit: {sizes:?}");
}

/// A follower restored from a snapshot at 1-5, in a 3-node cluster.
fn follower_from_snapshot() -> Engine<C> {
    let membership = Membership::new_voters(members(&[1, 2, 3]));
    let snap = SnapshotMeta {
        last_log_id: LogId::new(1, 5),
        membership,
        id: 1,
        size: 0,
    };
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(1),
            voted_for: None,
            uuid: Default::default(),
        },
        log_base: snap.last_log_id,
        entries: Vec::new(),
        snapshot: Some(snap),
        applied: LogId::new(1, 5),
    };
    Engine::new(NodeId(2), config(), 2, 0, state).unwrap()
}

#[test]
fn a_follower_skips_what_its_snapshot_covers_and_appends_the_rest() {
    let mut e = follower_from_snapshot();
    let entries = (4..=7).map(|i| put_entry(1, i)).collect();
    e.step(NodeId(1), append(1, LogId::new(1, 3), entries))
        .unwrap();
    assert_eq!(e.last_log_id(), LogId::new(1, 7));
    let r = append_response(&mut e);
    assert!(r.success);
    assert_eq!(r.index, LogIndex(7));
}

#[test]
fn entries_that_contradict_a_followers_snapshot_are_refused() {
    let mut e = follower_from_snapshot();
    // Index 5 is committed as 1-5; a leader claiming 2-5 there is lying.
    let entries = vec![put_entry(1, 4), put_entry(2, 5), put_entry(2, 6)];
    let r = e.step(NodeId(1), append(2, LogId::new(1, 3), entries));
    assert!(
        matches!(r, Err(raft_core::StepError::ConflictsWithCommitted { .. })),
        "{r:?}"
    );
    assert_eq!(e.last_log_id(), LogId::new(1, 5));
}

#[test]
fn a_rejection_at_the_last_index_hints_the_first_index_of_its_term() {
    let membership = Membership::new_voters(members(&[1, 2, 3]));
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(1),
            voted_for: None,
            uuid: Default::default(),
        },
        entries: vec![
            entry(0, 1, raft_core::EntryPayload::Membership(membership)),
            put_entry(1, 2),
            put_entry(1, 3),
            put_entry(1, 4),
        ],
        ..RecoveredState::default()
    };
    let mut e = Engine::<C>::new(NodeId(2), config(), 2, 0, state).unwrap();
    e.step(NodeId(1), append(2, LogId::new(2, 4), Vec::new()))
        .unwrap();
    let r = append_response(&mut e);
    assert!(!r.success);
    assert_eq!(
        r.conflict,
        Some(raft_core::ConflictHint {
            term: Some(Term(1)),
            index: LogIndex(2),
        }),
        "the leader should skip the whole of term 1 in one round trip"
    );
}

#[test]
fn a_second_leader_in_one_term_is_refused_by_leader_and_follower_alike() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = led_by_s1(config());
    let term = s.engines[&s1].term().0;
    let prev = s.engines[&s1].last_log_id();
    for id in [s1, s2] {
        let e = s.engines.get_mut(&id).unwrap();
        let mut msg = append(term, prev, Vec::new());
        if let Message::AppendEntries(r) = &mut msg {
            r.leader_id = s3;
        }
        let r = e.step(s3, msg);
        assert!(
            matches!(r, Err(raft_core::StepError::TwoLeaders { .. })),
            "node {id}: {r:?}"
        );
        assert_eq!(e.leader_id(), Some(s1), "node {id} followed the impostor");
    }
    assert!(s.engines[&s1].is_leader());
}

#[test]
fn a_truncated_membership_entry_takes_its_configuration_with_it() {
    let three = Membership::new_voters(members(&[1, 2, 3]));
    let mut four = three.clone();
    four.nodes.insert(NodeId(4), "n4".into());
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(1),
            voted_for: None,
            uuid: Default::default(),
        },
        entries: vec![
            entry(0, 1, raft_core::EntryPayload::Membership(three.clone())),
            put_entry(1, 2),
            // An uncommitted change of the old leader: adds learner 4.
            entry(1, 3, raft_core::EntryPayload::Membership(four)),
        ],
        ..RecoveredState::default()
    };
    let mut e = Engine::<C>::new(NodeId(2), config(), 2, 0, state).unwrap();
    assert!(e.membership().nodes.contains_key(&NodeId(4)));
    // The new leader of term 2 replaces index 3.
    e.step(
        NodeId(1),
        append(2, LogId::new(1, 2), vec![put_entry(2, 3)]),
    )
    .unwrap();
    assert_eq!(e.last_log_id(), LogId::new(2, 3));
    assert_eq!(
        e.membership(),
        &three,
        "the truncated configuration is still in force"
    );
    assert_eq!(e.membership_log_id(), LogId::new(0, 1));
}

#[test]
fn a_transfer_hands_over_only_to_its_target() {
    let [s1, s2, s3] = [1, 2, 3].map(NodeId);
    let mut s = led_by_s1(config());
    s.engines.get_mut(&s1).unwrap().propose(put("x")).unwrap();
    s.flush(s1);
    // The target, s2, is cut off; s3 acknowledges the entry meanwhile.
    s.engines.get_mut(&s1).unwrap().transfer_leader(s2).unwrap();
    s.flush(s1);
    s.deliver(|from, to, _| from == s2 || to == s2);
    assert!(
        s.engines[&s1].is_leader(),
        "leadership went to {:?}",
        s.engines[&s3].role()
    );
    assert_eq!(s.engines[&s3].role(), Role::Follower);
}

#[test]
fn a_rejection_at_the_matched_index_does_not_stop_pipelining() {
    let [s1, s2] = [1, 2].map(NodeId);
    let cfg = Config {
        max_entries_per_message: 1,
        max_inflight: 8,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    commit(&mut s, s1, put("a"));
    let leader = s.engines.get_mut(&s1).unwrap();
    let matched = leader.matched()[&s2];
    let term = leader.term();
    // A reordered, stale rejection: s2 already acknowledged `matched`.
    leader
        .step(
            s2,
            Message::AppendEntriesResponse(raft_core::AppendEntriesResponse {
                term,
                success: false,
                index: matched,
                conflict: None,
                round: 0,
                uuid: NodeUuid(s2.0.into()),
            }),
        )
        .unwrap();
    s.flush(s1);
    s.queue.clear();
    for v in ["b", "c", "d"] {
        s.engines.get_mut(&s1).unwrap().propose(put(v)).unwrap();
    }
    s.flush(s1);
    let to_s2 = s
        .queue
        .iter()
        .filter(|(_, to, m)| {
            *to == s2 && matches!(m, Message::AppendEntries(r) if !r.entries.is_empty())
        })
        .count();
    assert_eq!(
        to_s2, 3,
        "replication to s2 fell back to one probe at a time"
    );
}

/// Commits `n` puts through s1, completing each requested snapshot build at
/// once with a snapshot of `size(leader, at)` bytes, and returns the indexes
/// s1 built at.
fn snapshot_builds(
    cfg: Config,
    n: usize,
    size: impl Fn(&Engine<C>, LogIndex) -> u64,
) -> Vec<LogIndex> {
    let s1 = NodeId(1);
    {
        let mut s = led_by_s1(cfg);
        let mut done = 0;
        for _ in 0..n {
            commit(&mut s, s1, put("v"));
            // Each requested build completes at once, at what was applied.
            while done < s.snapshot_builds.len() {
                let (id, at) = s.snapshot_builds[done];
                done += 1;
                let e = s.engines.get_mut(&id).unwrap();
                let meta = SnapshotMeta {
                    last_log_id: e.log_id_at(at).unwrap(),
                    membership: e.membership().clone(),
                    id: at.0,
                    size: size(e, at),
                };
                e.snapshot_built(meta);
            }
        }
        s.snapshot_builds
            .iter()
            .filter(|(id, _)| *id == s1)
            .map(|(_, at)| *at)
            .collect::<Vec<_>>()
    }
}

#[test]
fn snapshots_are_requested_every_snapshot_every_entries_and_never_when_off() {
    let builds = |cfg: Config, n: usize| snapshot_builds(cfg, n, |_, _| 0);
    let every_3 = Config {
        snapshot_every: 3,
        snapshot_jitter_percent: 0,
        ..config()
    };
    assert_eq!(
        builds(every_3, 8),
        vec![LogIndex(3), LogIndex(6), LogIndex(9)],
        "one snapshot per 3 applied entries (1 and 2 are the configuration and the no-op)"
    );
    let off = Config {
        snapshot_every: 0,
        ..config()
    };
    assert!(
        builds(off, 5).is_empty(),
        "snapshot_every = 0 turns snapshots off"
    );
}

/// Nodes apply the same log: with the thresholds stretched by each node's
/// own draw they build at different indexes, never before the configured
/// thresholds, and never much past them.
#[test]
fn nodes_build_their_snapshots_apart_but_within_the_jittered_thresholds() {
    let cfg = Config {
        snapshot_every: 4,
        snapshot_jitter_percent: 100,
        snapshot_log_percent: 0,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    let mut done = 0;
    for _ in 0..60 {
        commit(&mut s, NodeId(1), put("v"));
        while done < s.snapshot_builds.len() {
            let (id, at) = s.snapshot_builds[done];
            done += 1;
            let e = s.engines.get_mut(&id).unwrap();
            let meta = SnapshotMeta {
                last_log_id: e.log_id_at(at).unwrap(),
                membership: e.membership().clone(),
                id: at.0,
                size: 0,
            };
            e.snapshot_built(meta);
        }
    }
    let of = |n: u64| -> Vec<u64> {
        let b = s.snapshot_builds.iter().filter(|(id, _)| id.0 == n);
        b.map(|(_, at)| at.0).collect()
    };
    let (a, b, c) = (of(1), of(2), of(3));
    assert!(
        a != b || b != c,
        "all three built at the same indexes: {a:?}"
    );
    for builds in [&a, &b, &c] {
        for gap in builds.windows(2).map(|w| w[1] - w[0]) {
            assert!((4..=8).contains(&gap), "a gap of {gap} in {builds:?}");
        }
    }
}

#[test]
fn a_large_state_is_snapshotted_only_once_the_log_weighs_snapshot_log_percent_of_it() {
    // Every entry is a put of the same size; each snapshot weighs as much
    // as six of them (whatever was built at), so at 100% the next build
    // waits for six entries and at 50% for three, while `snapshot_every`
    // alone would build after every one.
    let six_puts = |e: &Engine<C>, _: LogIndex| {
        let last = e.last_log_id().index;
        6 * e.cached_entry(last).unwrap().size_hint() as u64
    };
    let cfg = |percent| Config {
        snapshot_jitter_percent: 0,
        snapshot_every: 1,
        snapshot_log_percent: percent,
        ..config()
    };
    let at = |v: &[u64]| v.iter().map(|&i| LogIndex(i)).collect::<Vec<_>>();
    // The first build (at the no-op, 2) has no snapshot to weigh against.
    assert_eq!(snapshot_builds(cfg(100), 14, six_puts), at(&[2, 8, 14]));
    assert_eq!(
        snapshot_builds(cfg(50), 14, six_puts),
        at(&[2, 5, 8, 11, 14])
    );
    // (3 is applied while the build at 2 is still running.)
    assert_eq!(
        snapshot_builds(cfg(0), 4, six_puts),
        at(&[2, 4, 5, 6]),
        "0 counts entries only"
    );
}

#[test]
fn the_new_configuration_keeps_new_voters_and_learners_and_a_removed_leader_steps_down() {
    let [s1, s2, s3, s4, s5] = [1, 2, 3, 4, 5].map(NodeId);
    let mut s = led_by_s1(config());
    for (id, v) in [(s4, "n4"), (s5, "n5")] {
        s.engines
            .get_mut(&s1)
            .unwrap()
            .add_learner(id, v.into())
            .unwrap();
        s.flush(s1);
        s.deliver(|_, _, _| false);
    }
    // s4 becomes a voter, s1 leaves, s5 stays a learner.
    let voters: std::collections::BTreeSet<NodeId> = [s2, s3, s4].into();
    s.engines
        .get_mut(&s1)
        .unwrap()
        .change_membership(voters.clone())
        .unwrap();
    s.flush(s1);
    s.deliver(|_, _, _| false);
    for _ in 0..3 {
        if s.engines.get(&s1).is_some_and(|e| e.is_leader()) {
            s.heartbeat(s1, |_, _, _| false);
        }
    }
    let m = s.engines[&s2].membership().clone();
    assert_eq!(m.configs, vec![voters], "C_new is in force");
    assert_eq!(
        m.nodes.keys().copied().collect::<Vec<_>>(),
        vec![s2, s3, s4, s5],
        "C_new names its voters and learners, and only them"
    );
    assert!(
        !s.engines[&s1].is_leader(),
        "a leader removed by C_new must step down once C_new commits"
    );
}

/// A log of voters 1, 2, 3 at 0-1 and puts at 1-2 ..= 1-`last`, and that
/// membership.
fn voters_then_puts(last: u64) -> (Membership<String>, Vec<Entry<C>>) {
    let membership = Membership::new_voters(members(&[1, 2, 3]));
    let config = raft_core::EntryPayload::Membership(membership.clone());
    let mut entries = vec![entry(0, 1, config)];
    entries.extend((2..=last).map(|i| put_entry(1, i)));
    (membership, entries)
}

/// A follower of term 2 whose log holds 1-2 ..= 1-7 (none committed).
fn follower_with_log() -> Engine<C> {
    let (_, entries) = voters_then_puts(7);
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(2),
            voted_for: None,
            uuid: Default::default(),
        },
        entries,
        ..RecoveredState::default()
    };
    Engine::new(NodeId(2), config(), 2, 0, state).unwrap()
}

fn chunk(e: &Engine<C>, last: LogId, id: u64, offset: u64, len: usize, done: bool) -> Message<C> {
    let meta = SnapshotMeta {
        last_log_id: last,
        membership: e.membership().clone(),
        id,
        size: 0,
    };
    Message::InstallSnapshot(raft_core::InstallSnapshotRequest::chunk(
        Term(2),
        NodeId(1),
        meta,
        offset,
        vec![7; len],
        done,
    ))
}

/// Steps a chunk; returns the response's next offset and the offsets of
/// the chunk writes the engine asked for.
fn send_chunk(e: &mut Engine<C>, msg: Message<C>) -> (u64, Vec<u64>) {
    e.step(NodeId(1), msg).unwrap();
    let actions = e.take_actions();
    let writes = actions
        .iter()
        .filter_map(|a| match a {
            Action::WriteSnapshotChunk { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    let next = actions
        .iter()
        .find_map(|a| match a {
            Action::Respond {
                msg: Message::InstallSnapshotResponse(r),
                ..
            } => Some(r.next_offset),
            _ => None,
        })
        .expect("a response");
    (next, writes)
}

#[test]
fn snapshot_chunks_are_written_only_in_order_and_only_of_one_snapshot() {
    let mut e = follower_with_log();
    let at = LogId::new(2, 9);
    let first = chunk(&e, at, 1, 0, 10, false);
    assert_eq!(send_chunk(&mut e, first), (10, vec![0]));
    // A gap: offset 20 while 10 is expected. It is held, not written.
    let gap = chunk(&e, at, 1, 20, 10, false);
    assert_eq!(
        send_chunk(&mut e, gap),
        (10, vec![]),
        "a chunk past a gap was written"
    );
    // The gap fills: both go to the state machine, in order.
    let fill = chunk(&e, at, 1, 10, 10, false);
    assert_eq!(send_chunk(&mut e, fill), (30, vec![10, 20]));
    // A chunk of another snapshot cannot continue this one, nor (a
    // straggler of a transfer the leader gave up) end it.
    let other = chunk(&e, at, 2, 30, 10, false);
    assert_eq!(
        send_chunk(&mut e, other),
        (0, vec![]),
        "another snapshot's chunk continued this one"
    );
    let on = chunk(&e, at, 1, 30, 10, false);
    assert_eq!(
        send_chunk(&mut e, on),
        (40, vec![30]),
        "a straggler ended it"
    );
    // The other snapshot's first chunk starts its transfer.
    let first = chunk(&e, at, 2, 0, 10, false);
    assert_eq!(send_chunk(&mut e, first), (10, vec![0]));
}

#[test]
fn a_follower_holds_at_most_a_window_of_chunks_ahead_of_a_gap() {
    let mut e = follower_with_log();
    let window = config().snapshot_window as u64;
    let at = LogId::new(2, 9);
    // A window of chunks and one more (the last, ending the snapshot)
    // overtake the first.
    for i in 1..=window + 1 {
        let ahead = chunk(&e, at, 1, i * 10, 10, i == window + 1);
        assert_eq!(send_chunk(&mut e, ahead), (0, vec![]));
    }
    // The first: it and the window held behind it are written, in order.
    // The one past the window was not held, so nothing is installed yet.
    let first = chunk(&e, at, 1, 0, 10, false);
    let held: Vec<u64> = (0..=window).map(|i| i * 10).collect();
    assert_eq!(send_chunk(&mut e, first), ((window + 1) * 10, held));
    assert_eq!(e.snapshot_meta(), None, "installed without its last chunk");
    // The last chunk again (the leader's retransmission) ends it.
    let last = chunk(&e, at, 1, (window + 1) * 10, 10, true);
    assert_eq!(
        send_chunk(&mut e, last),
        ((window + 2) * 10, vec![(window + 1) * 10])
    );
    assert_eq!(e.snapshot_meta().map(|m| m.id), Some(1));
}

#[test]
fn a_duplicated_or_restarted_chunk_never_truncates_what_a_transfer_received() {
    let mut e = follower_with_log();
    let at = LogId::new(2, 9);
    for offset in [0, 10] {
        let c = chunk(&e, at, 1, offset, 10, false);
        assert_eq!(send_chunk(&mut e, c), (offset + 10, vec![offset]));
    }
    // The first chunk again (a duplicate, or the leader starting over):
    // the 20 bytes received stay, and the answer says to go on at 20.
    for offset in [0, 10] {
        let again = chunk(&e, at, 1, offset, 10, false);
        assert_eq!(
            send_chunk(&mut e, again),
            (20, vec![]),
            "chunk at {offset} was written again"
        );
    }
    let next = chunk(&e, at, 1, 20, 10, true);
    assert_eq!(
        send_chunk(&mut e, next),
        (30, vec![20]),
        "the transfer goes on"
    );
}

#[test]
fn an_installed_snapshot_keeps_the_log_after_it_only_if_the_log_agrees() {
    let mut agrees = follower_with_log();
    let last = chunk(&agrees, LogId::new(1, 5), 1, 0, 10, true);
    send_chunk(&mut agrees, last);
    assert_eq!(
        agrees.last_log_id(),
        LogId::new(1, 7),
        "an agreeing log was dropped"
    );

    let mut conflicts = follower_with_log();
    let mut last = chunk(&conflicts, LogId::new(2, 5), 1, 0, 10, true);
    // The snapshot's configuration (a learner joined before index 5)
    // replaces the configurations of the log it covers.
    let mut with_learner = conflicts.membership().clone();
    with_learner.nodes.insert(NodeId(4), "n4".into());
    if let Message::InstallSnapshot(r) = &mut last {
        r.meta.membership = with_learner.clone();
    }
    send_chunk(&mut conflicts, last);
    assert_eq!(
        conflicts.last_log_id(),
        LogId::new(2, 5),
        "entries after a snapshot they contradict were kept"
    );
    assert_eq!(conflicts.membership(), &with_learner);
}

#[test]
fn a_configuration_after_an_installed_snapshot_stays_in_force() {
    let three = Membership::new_voters(members(&[1, 2, 3]));
    let mut four = three.clone();
    four.nodes.insert(NodeId(4), "n4".into());
    let mut entries = vec![entry(
        0,
        1,
        raft_core::EntryPayload::Membership(three.clone()),
    )];
    entries.extend((2..=5).map(|i| put_entry(1, i)));
    entries.push(entry(
        1,
        6,
        raft_core::EntryPayload::Membership(four.clone()),
    ));
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(2),
            voted_for: None,
            uuid: Default::default(),
        },
        entries,
        ..RecoveredState::default()
    };
    let mut e = Engine::<C>::new(NodeId(2), config(), 2, 0, state).unwrap();
    let mut last = chunk(&e, LogId::new(1, 5), 1, 0, 10, true);
    if let Message::InstallSnapshot(r) = &mut last {
        r.meta.membership = three;
    }
    send_chunk(&mut e, last);
    assert_eq!(e.last_log_id(), LogId::new(1, 6));
    assert_eq!(e.membership(), &four, "the configuration at 6 was lost");
    assert_eq!(e.membership_log_id(), LogId::new(1, 6));
}

#[test]
fn a_snapshot_chunk_of_an_earlier_term_is_answered_with_the_current_term() {
    let mut e = follower_with_log();
    let mut stale = chunk(&e, LogId::new(1, 5), 1, 0, 10, true);
    if let Message::InstallSnapshot(r) = &mut stale {
        r.term = Term(1);
    }
    e.step(NodeId(1), stale).unwrap();
    let answered = e.take_actions().into_iter().find_map(|a| match a {
        Action::Respond {
            msg: Message::InstallSnapshotResponse(r),
            ..
        } => Some(r.term),
        _ => None,
    });
    assert_eq!(
        answered,
        Some(Term(2)),
        "a stale leader must learn the term"
    );
    assert_eq!(
        e.last_log_id(),
        LogId::new(1, 7),
        "a stale snapshot was taken"
    );
}

#[test]
fn a_read_is_confirmed_only_by_a_round_that_started_after_it_arrived() {
    let s1 = NodeId(1);
    let mut s = led_by_s1(config());
    s.heartbeat(s1, |_, _, _| false);
    // A heartbeat round goes out and the followers answer it...
    s.clock += config().heartbeat_interval_ms;
    s.engines.get_mut(&s1).unwrap().tick(s.clock);
    s.flush(s1);
    for (from, to, msg) in std::mem::take(&mut s.queue) {
        s.engines.get_mut(&to).unwrap().step(from, msg).unwrap();
        s.flush(to);
    }
    // ...but the answers are still on the wire when a read arrives.
    s.engines.get_mut(&s1).unwrap().read_index(9).unwrap();
    s.flush(s1);
    // Only those earlier answers arrive (the read's own round is lost).
    s.deliver(|from, _, _| from == s1);
    assert!(
        s.reads_ready.iter().all(|(_, r, _)| *r != 9),
        "a read was confirmed by answers sent before it arrived: {:?}",
        s.reads_ready
    );
    // Its own round confirms it.
    s.heartbeat(s1, |_, _, _| false);
    assert!(s.reads_ready.iter().any(|(n, r, _)| *n == s1 && *r == 9));
}

#[test]
fn purging_the_log_keeps_an_uncommitted_configuration_after_it_revocable() {
    let three = Membership::new_voters(members(&[1, 2, 3]));
    let mut four = three.clone();
    four.nodes.insert(NodeId(4), "n4".into());
    // Restored from a snapshot at 1-2 (configuration: three voters), then
    // 1-3 ..= 1-5 and an uncommitted change of the old leader at 6.
    let snap = SnapshotMeta {
        last_log_id: LogId::new(1, 2),
        membership: three.clone(),
        id: 1,
        size: 0,
    };
    let mut entries: Vec<_> = (3..=5).map(|i| put_entry(1, i)).collect();
    entries.push(entry(1, 6, raft_core::EntryPayload::Membership(four)));
    let state = RecoveredState {
        hard_state: HardState {
            term: Term(1),
            voted_for: None,
            uuid: Default::default(),
        },
        log_base: snap.last_log_id,
        entries,
        snapshot: Some(snap),
        applied: LogId::new(1, 2),
    };
    let cfg = Config {
        purge_keep: 0,
        ..config()
    };
    let mut e = Engine::<C>::new(NodeId(2), cfg, 2, 0, state).unwrap();
    e.snapshot_built(SnapshotMeta {
        last_log_id: LogId::new(1, 5),
        membership: three.clone(),
        id: 2,
        size: 0,
    });
    // A new leader replaces index 6: the change never happened.
    e.step(
        NodeId(1),
        append(2, LogId::new(1, 5), vec![put_entry(2, 6)]),
    )
    .unwrap();
    assert_eq!(e.last_log_id(), LogId::new(2, 6));
    assert_eq!(
        e.membership(),
        &three,
        "a replaced configuration is in force"
    );
}

/// Recovers node 2 from `state` (term 3 saved unless given).
fn recover(state: RecoveredState<C>) -> Result<Engine<C>, raft_core::RecoveryError> {
    Engine::new(NodeId(2), config(), 2, 0, state)
}

fn recovered(entries: Vec<raft_core::Entry<C>>) -> RecoveredState<C> {
    RecoveredState {
        hard_state: HardState {
            term: Term(3),
            voted_for: None,
            uuid: Default::default(),
        },
        entries,
        ..RecoveredState::default()
    }
}

#[test]
fn a_log_read_back_from_disk_that_breaks_the_log_rules_is_refused() {
    use raft_core::RecoveryError as R;
    let m = Membership::new_voters(members(&[1, 2, 3]));
    let first = || entry(0, 1, raft_core::EntryPayload::Membership(m.clone()));
    let good = recover(recovered(vec![first(), put_entry(1, 2), put_entry(3, 3)]));
    assert!(good.is_ok());
    let applied = |mut st: RecoveredState<C>, at: LogId| {
        st.applied = at;
        st
    };
    let mut purged = recovered(vec![put_entry(1, 5)]);
    purged.log_base = LogId::new(1, 4);
    type Case = (RecoveredState<C>, fn(&R) -> bool);
    let cases: Vec<Case> = vec![
        (recovered(vec![first(), put_entry(1, 3)]), |e| {
            matches!(e, R::Gap { .. })
        }),
        (
            recovered(vec![first(), put_entry(2, 2), put_entry(1, 3)]),
            |e| matches!(e, R::TermRegression { .. }),
        ),
        (recovered(vec![first(), put_entry(4, 2)]), |e| {
            matches!(e, R::TermFromFuture { .. })
        }),
        (
            applied(recovered(vec![first(), put_entry(1, 2)]), LogId::new(1, 3)),
            |e| matches!(e, R::AppliedPastLog { .. }),
        ),
        (
            applied(recovered(vec![first(), put_entry(1, 2)]), LogId::new(2, 2)),
            |e| matches!(e, R::AppliedMismatch { .. }),
        ),
        (purged, |e| matches!(e, R::AppliedBeforeLogStart { .. })),
    ];
    for (state, expected) in cases {
        let what = format!(
            "log {:?} after {:?}, applied {:?}",
            state.entries.iter().map(|e| e.log_id).collect::<Vec<_>>(),
            state.log_base,
            state.applied
        );
        match recover(state) {
            Err(e) if expected(&e) => {}
            other => panic!("{what}: {:?}", other.err()),
        }
    }
}

/// A cluster led by s1 with no entry cache (4 entries per message), after
/// `n` proposals that s3 did not receive.
fn s3_behind_an_empty_cache(n: usize) -> Script {
    s3_behind_a_cache(n, 0)
}

/// As [`s3_behind_an_empty_cache`], with a cache of `cache_bytes`.
fn s3_behind_a_cache(n: usize, cache_bytes: usize) -> Script {
    let [s1, s3] = [1, 3].map(NodeId);
    let cfg = Config {
        max_entries_per_message: 4,
        max_inflight: 8,
        log_cache_bytes: cache_bytes,
        ..config()
    };
    let mut s = led_by_s1(cfg);
    for i in 0..n {
        s.propose(s1, put(&format!("v{i}")), |_, to, _| to == s3);
    }
    s
}

/// Bounded memory: past `log_cache_bytes`, a leader drops the payloads of
/// entries that are durable and applied, and serves a follower that needs
/// them by reading them back from its log store, one message's worth at a
/// time, without waiting for a timeout.
#[test]
fn a_follower_behind_the_cache_gets_entries_read_back_from_the_store() {
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = s3_behind_an_empty_cache(20);
    let last = s.engines[&s1].last_log_id();
    assert_eq!(s.engines[&s1].commit_index(), last.index);
    let log = &s.engines[&s1];
    assert_eq!(
        (log.cached_from(), log.cached_bytes()),
        (last.index.next(), 0),
        "everything durable and applied left the cache"
    );
    assert!(log.term_at(LogIndex(2)).is_some(), "terms stay known");
    assert!(s.reads_back.is_empty());

    // s3 comes back: the stall detector finds it behind.
    for _ in 0..10 {
        s.heartbeat(s1, |_, _, _| false);
    }
    assert_eq!(s.engines[&s3].last_log_id(), last, "s3 caught up");
    assert_eq!(s.engines[&s3].commit_index(), last.index);
    let reads: Vec<_> = s.reads_back.iter().filter(|r| r.1 == s3).collect();
    assert!(!reads.is_empty(), "s3's entries were read back");
    for (_, _, from, to) in &reads {
        assert!(
            to.0 - from.0 < 4,
            "a read asks for one message's worth: {from}..={to}"
        );
    }
    assert!(
        s.reads_back.iter().all(|r| r.1 == s3),
        "only the lagging follower needed reads"
    );
}

/// A follower in step but far behind the cache gets a window's worth of
/// entries per read, not one message's: each read waits behind the
/// leader's own appends, and one message per read fed such a follower
/// more slowly than clients wrote.
#[test]
fn a_read_back_fills_the_window_for_a_follower_in_step() {
    let [s1, s3] = [1, 3].map(NodeId);
    // A cache of a few entries: enough to know their size.
    let mut s = s3_behind_a_cache(60, 120);
    let cached = s.engines[&s1].cached_bytes();
    assert!(cached > 0, "nothing cached to size entries by");
    for _ in 0..10 {
        s.heartbeat(s1, |_, _, _| false);
    }
    assert_eq!(s.engines[&s3].last_log_id(), s.engines[&s1].last_log_id());
    let spans: Vec<u64> = s
        .reads_back
        .iter()
        .filter(|r| r.1 == s3)
        .map(|r| r.3.0 - r.2.0 + 1)
        .collect();
    assert!(
        spans.iter().any(|n| *n > 4),
        "every read was one message's worth: {spans:?}"
    );
    assert!(
        spans.iter().all(|n| *n <= 4 * 8),
        "a read past the window: {spans:?}"
    );
}

/// A read-back runs past the cache's edge, up to the last entry (as far as
/// the window allows): the edge moves on while the read waits its turn
/// behind the leader's appends, so a read that stopped at it left the
/// follower at the edge, fed exactly as fast as clients wrote and never
/// catching up (`cargo xtask bench join`: a follower held a cache's worth,
/// 60,000-120,000 entries, behind for minutes).
#[test]
fn a_read_back_runs_past_the_cache_edge_to_the_last_entry() {
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = s3_behind_a_cache(0, 120);
    for (i, lost_to_s3) in (0..40).map(|i| (i, i >= 30)) {
        let leader = s.engines.get_mut(&s1).unwrap();
        leader.propose(put(&format!("v{i}"))).unwrap();
        s.flush(s1);
        s.deliver(|_, to, _| lost_to_s3 && to == s3);
    }
    s.hold_reads = true;
    for _ in 0..10 {
        s.heartbeat(s1, |_, _, _| false);
    }
    let last = s.engines[&s1].last_log_id().index;
    let edge = s.engines[&s1].cached_from();
    let reads: Vec<_> = s.reads_back.iter().filter(|r| r.1 == s3).collect();
    let [(_, _, from, to)] = reads[..] else {
        panic!("one read-back for s3: {reads:?}");
    };
    assert!(
        *from < edge && edge <= last,
        "s3 needs evicted entries and some are cached: from {from}, edge {edge}, last {last}"
    );
    assert_eq!(*to, last, "the read stopped short of the last entry");
}

/// Entries read back are checked against the leader's log before they go
/// out (a store that returns another log's entries is not believed; the
/// leader asks again), and a read-back nobody waits for any more is dropped.
#[test]
fn read_back_entries_go_out_only_if_they_match_and_are_awaited() {
    let [s1, s3] = [1, 3].map(NodeId);
    let mut s = s3_behind_an_empty_cache(6);
    // s3 is back; the leader's stall detector finds it behind and asks
    // for its entries (held here, to be answered by hand).
    s.hold_reads = true;
    for _ in 0..10 {
        s.heartbeat(s1, |_, _, _| false);
    }
    let [(_, _, from, to)] = s.reads_back[..] else {
        panic!("one read-back for s3: {:?}", s.reads_back);
    };
    let reads = |actions: &[Action<C>]| -> Vec<(LogIndex, LogIndex)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::ReadEntries { peer, from, to } if *peer == s3 => Some((*from, *to)),
                _ => None,
            })
            .collect()
    };
    let sends = |actions: &[Action<C>]| {
        actions
            .iter()
            .filter(|a| {
                matches!(a, Action::Send { to, msg: Message::AppendEntries(r) }
                    if *to == s3 && !r.entries.is_empty())
            })
            .count()
    };
    let genuine: Vec<Entry<C>> = s.disks[&s1]
        .1
        .iter()
        .filter(|e| (from..=to).contains(&e.log_id.index))
        .cloned()
        .collect();
    assert!(!genuine.is_empty());

    // The same indexes in another term: not this leader's log.
    let mut forged = genuine.clone();
    for e in &mut forged {
        e.log_id.term = Term(9);
    }
    let e1 = s.engines.get_mut(&s1).unwrap();
    e1.entries_read(s3, from, forged);
    let actions = e1.take_actions();
    assert_eq!(sends(&actions), 0, "foreign entries were sent");
    assert_eq!(reads(&actions), vec![(from, to)], "it asks again");

    e1.entries_read(s3, from, genuine.clone());
    let actions = e1.take_actions();
    assert_eq!(sends(&actions), 1, "the genuine entries go out");
    // Answered already: the same read arriving again is dropped.
    e1.entries_read(s3, from, genuine);
    let actions = e1.take_actions();
    assert_eq!((sends(&actions), reads(&actions)), (0, vec![]));
}

/// A follower whose entries are lost still hears, in every heartbeat, how
/// far the leader has committed: `leader_commit_index` says how far behind
/// the cluster it is (what a readiness check compares `applied` with),
/// while its own commit index stops at the end of its log.
#[test]
fn a_lagging_follower_knows_how_far_the_cluster_has_committed() {
    let (s1, s3) = (NodeId(1), NodeId(3));
    let mut s = led_by_s1(config());
    let lose_entries_to_s3 = |_: NodeId, to: NodeId, m: &Message<C>| {
        to == NodeId(3) && matches!(m, Message::AppendEntries(r) if !r.entries.is_empty())
    };
    for i in 0..5 {
        s.propose(s1, put(&format!("v{i}")), lose_entries_to_s3);
    }
    s.heartbeat(s1, lose_entries_to_s3);
    let committed = s.engines[&s1].commit_index();
    assert!(committed >= LogIndex(6), "the leader committed {committed}");
    assert_eq!(s.engines[&s1].leader_commit_index(), committed);
    let e3 = &s.engines[&s3];
    assert_eq!(e3.leader_commit_index(), committed);
    assert!(
        e3.commit_index() < committed,
        "s3 committed {} without the entries",
        e3.commit_index()
    );
}
