use super::*;
use crate::config::Config;
use crate::engine::RecoveredState;
use crate::memory::kv::KvConfig;
use crate::message::{AppendEntriesRequest, AppendEntriesResponse};
use crate::types::{EntryPayload, NodeUuid};

/// Handles are plain numbers: which request a reply answers.
struct Ids;
impl Callers for Ids {
    type Write = u32;
    type Read = u32;
    type Rpc = u32;
}

/// A follower that started before (its identity is saved), so its
/// first log operation is the one a test causes.
fn follower() -> Executor<KvConfig, Ids> {
    let state = RecoveredState {
        hard_state: HardState {
            uuid: NodeUuid(2),
            ..HardState::default()
        },
        ..RecoveredState::default()
    };
    let engine = Engine::new(NodeId(2), Config::default(), 2, 0, state).expect("valid config");
    Executor::new(engine, LogIndex(0), Mode::Pipelined)
}

fn append(prev: u64, entries: u64, round: u64) -> Message<KvConfig> {
    Message::AppendEntries(AppendEntriesRequest {
        term: Term(1),
        leader_id: NodeId(1),
        prev_log_id: LogId::new(if prev == 0 { 0 } else { 1 }, prev),
        entries: (prev + 1..=prev + entries)
            .map(|i| Entry {
                log_id: LogId::new(1, i),
                payload: EntryPayload::Blank,
            })
            .collect(),
        leader_commit: LogIndex(0),
        round,
        keep_from: LogIndex(0),
    })
}

/// The AppendEntries answers among `io`: (handle, answer, after the
/// log?).
fn append_answers(io: Vec<Io<KvConfig, Ids>>) -> Vec<(u32, AppendEntriesResponse, bool)> {
    io.into_iter()
        .filter_map(|io| match io {
            Io::Reply {
                to,
                msg: Message::AppendEntriesResponse(r),
            } => Some((to, r, false)),
            Io::ReplyAfterLog {
                to,
                msg: Message::AppendEntriesResponse(r),
            } => Some((to, r, true)),
            _ => None,
        })
        .collect()
}

/// The replies among `io`: (handle, acknowledged index, after the log?).
fn replies(io: Vec<Io<KvConfig, Ids>>) -> Vec<(u32, u64, bool)> {
    append_answers(io)
        .into_iter()
        .map(|(to, r, after)| (to, r.index.0, after))
        .collect()
}

#[test]
fn a_heartbeat_answer_does_not_wait_behind_an_append_it_does_not_acknowledge() {
    let mut x = follower();
    // Entries 1-3 arrive; their acknowledgement rides behind the term's
    // save and the append.
    x.step(NodeId(1), append(0, 3, 1), Some(1)).ok().unwrap();
    assert_eq!(replies(x.poll_io()), vec![(1, 3, true)]);
    x.log_done(); // the term and vote are durable; the append is not
    // A heartbeat anchored at what the leader knows we hold (nothing
    // yet): answered at once, the append still syncing.
    x.step(NodeId(1), append(0, 0, 2), Some(2)).ok().unwrap();
    assert_eq!(replies(x.poll_io()), vec![(2, 0, false)]);
    // One anchored past what is durable acknowledges the append: it
    // waits for it.
    x.step(NodeId(1), append(3, 0, 3), Some(3)).ok().unwrap();
    assert_eq!(replies(x.poll_io()), vec![(3, 3, true)]);
    x.log_done();
    assert_eq!(x.engine().durable_index(), LogIndex(3));
    x.step(NodeId(1), append(3, 0, 4), Some(4)).ok().unwrap();
    assert_eq!(replies(x.poll_io()), vec![(4, 3, false)]);
}

/// The AppendEntries answers among `io`: (handle, index, success).
fn answers(io: Vec<Io<KvConfig, Ids>>) -> Vec<(u32, u64, bool)> {
    append_answers(io)
        .into_iter()
        .map(|(to, r, _)| (to, r.index.0, r.success))
        .collect()
}

/// A follower that knows node 1 leads term 1, with the term saved.
fn led_follower() -> Executor<KvConfig, Ids> {
    let mut x = follower();
    x.step(NodeId(1), append(0, 0, 1), Some(1)).ok().unwrap();
    assert_eq!(answers(x.poll_io()), vec![(1, 0, true)]);
    x.log_done();
    x
}

#[test]
fn an_append_ahead_of_its_predecessor_waits_for_it_instead_of_being_refused() {
    let mut x = led_follower();
    // The second and third of a window overtake the first.
    x.step(NodeId(1), append(4, 2, 1), Some(3)).ok().unwrap();
    x.step(NodeId(1), append(2, 2, 1), Some(2)).ok().unwrap();
    assert_eq!(answers(x.poll_io()), vec![], "held, not refused");
    assert_eq!(x.held_appends(), 2);
    x.step(NodeId(1), append(0, 2, 1), Some(1)).ok().unwrap();
    assert_eq!(
        answers(x.poll_io()),
        vec![(1, 2, true), (2, 4, true), (3, 6, true)]
    );
    assert_eq!(x.engine().log().last_index(), LogIndex(6));
}

#[test]
fn a_held_append_whose_predecessor_never_comes_is_refused_after_a_while() {
    let mut x = led_follower();
    x.step(NodeId(1), append(2, 2, 1), Some(2)).ok().unwrap();
    let wait = Config::default().election_timeout_min_ms / 2;
    x.tick(wait - 1);
    assert_eq!(answers(x.poll_io()), vec![]);
    x.tick(wait);
    // Refused as it would have been at once: the leader probes.
    assert_eq!(answers(x.poll_io()), vec![(2, 2, false)]);
}

#[test]
fn a_held_append_waits_while_its_predecessors_keep_arriving() {
    let mut x = led_follower();
    let wait = Config::default().election_timeout_min_ms / 2;
    // Entries 7-8 arrive first; 1-6 come in three appends, each a little
    // less than `wait` after the one before: slow, but the log moves.
    x.step(NodeId(1), append(6, 2, 1), Some(4)).ok().unwrap();
    let mut now = 0;
    let mut acks = Vec::new();
    for (i, prev) in [0, 2, 4].into_iter().enumerate() {
        now += wait - 1;
        x.tick(now);
        acks.extend(answers(x.poll_io()));
        x.step(NodeId(1), append(prev, 2, 1), Some(i as u32 + 1))
            .ok()
            .unwrap();
        acks.extend(answers(x.poll_io()));
    }
    // Held for nearly three times `wait` since it arrived, never refused.
    assert!(acks.iter().all(|a| a.2), "refused: {acks:?}");
    assert!(acks.contains(&(4, 8, true)), "{acks:?}");
    assert_eq!(x.engine().log().last_index(), LogIndex(8));
}

#[test]
fn appends_held_past_the_window_refuse_the_one_furthest_ahead() {
    let mut x = led_follower();
    let window = Config::default().max_inflight as u64;
    for i in 1..=window + 1 {
        x.step(NodeId(1), append(i * 2, 2, 1), Some(i as u32))
            .ok()
            .unwrap();
    }
    assert_eq!(
        answers(x.poll_io()),
        vec![(window as u32 + 1, (window + 1) * 2, false)]
    );
    // The rest still fill in once the first arrives.
    x.step(NodeId(1), append(0, 2, 1), Some(0)).ok().unwrap();
    let acks = answers(x.poll_io());
    assert_eq!(acks.len(), window as usize + 1);
    assert!(acks.iter().all(|a| a.2));
    assert_eq!(x.engine().log().last_index(), LogIndex((window + 1) * 2));
}

#[test]
fn a_held_append_from_a_deposed_leader_is_answered_in_the_new_term() {
    let mut x = led_follower();
    x.step(NodeId(1), append(2, 2, 1), Some(2)).ok().unwrap();
    // Node 3 leads term 2 now: the held request is stale, answered at
    // once (refused, in term 2).
    let mut hb = append(0, 0, 1);
    if let Message::AppendEntries(r) = &mut hb {
        r.term = Term(2);
        r.leader_id = NodeId(3);
    }
    x.step(NodeId(3), hb, Some(9)).ok().unwrap();
    let stale: Vec<_> = append_answers(x.poll_io())
        .into_iter()
        .filter(|(to, _, _)| *to == 2)
        .map(|(_, r, _)| (r.term, r.success))
        .collect();
    assert_eq!(stale, vec![(Term(2), false)]);
}

#[test]
fn a_heartbeat_answer_in_a_new_term_waits_for_the_term_to_be_durable() {
    let mut x = follower();
    x.step(NodeId(1), append(0, 0, 1), Some(1)).ok().unwrap();
    // Nothing to acknowledge, but the term it answers in is not saved
    // yet: the answer waits for that save.
    let io = x.poll_io();
    assert!(matches!(io[0], Io::Log(LogOp::SaveHardState(_))));
    assert_eq!(replies(io), vec![(1, 0, true)]);
}
