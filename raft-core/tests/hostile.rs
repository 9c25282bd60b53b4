//! Hostile or corrupt input from a peer: a typed error or a logged refusal,
//! never a panic, never corrupted state.

use std::collections::BTreeMap;

use raft_core::memory::{KvCommand, KvConfig};
use raft_core::{
    Action, AppendEntriesRequest, AppendEntriesResponse, Config, Engine, Entry, EntryPayload,
    InstallSnapshotRequest, LogId, LogIndex, Membership, Message, NodeId, RecoveredState,
    SnapshotMeta, StepError, Term,
};

type C = KvConfig;

fn follower() -> Engine<C> {
    let members: BTreeMap<NodeId, String> = (1..=3).map(|i| (NodeId(i), format!("n{i}"))).collect();
    let mut e = Engine::new(
        NodeId(2),
        Config::default(),
        7,
        0,
        RecoveredState::default(),
    )
    .unwrap();
    e.initialize(Membership::new_voters(members)).unwrap();
    e.take_actions();
    e
}

fn put(term: u64, index: u64) -> Entry<C> {
    Entry {
        log_id: LogId::new(term, index),
        payload: EntryPayload::command(KvCommand::Put {
            key: "k".into(),
            value: index.to_string(),
        }),
    }
}

fn append(term: u64, prev: LogId, entries: Vec<Entry<C>>, commit: u64) -> Message<C> {
    Message::AppendEntries(AppendEntriesRequest {
        term: Term(term),
        leader_id: NodeId(1),
        prev_log_id: prev,
        entries,
        leader_commit: LogIndex(commit),
        round: 0,
        keep_from: LogIndex(0),
    })
}

fn responses(e: &mut Engine<C>) -> Vec<Message<C>> {
    e.take_actions()
        .into_iter()
        .filter_map(|a| match a {
            Action::Respond { msg, .. } => Some(msg),
            _ => None,
        })
        .collect()
}

#[test]
fn non_contiguous_entries_are_refused_and_change_nothing() {
    let mut e = follower();
    let bad = append(1, LogId::new(0, 1), vec![put(1, 2), put(1, 4)], 0);
    assert!(matches!(
        e.step(NodeId(1), bad),
        Err(StepError::Malformed { .. })
    ));
    assert_eq!(e.last_log_id(), LogId::new(0, 1));
    let backwards = append(2, LogId::new(0, 1), vec![put(2, 2), put(1, 3)], 0);
    assert!(matches!(
        e.step(NodeId(1), backwards),
        Err(StepError::Malformed { .. })
    ));
    let future = append(2, LogId::new(0, 1), vec![put(5, 2)], 0);
    assert!(matches!(
        e.step(NodeId(1), future),
        Err(StepError::Malformed { .. })
    ));
    assert_eq!(e.last_log_id(), LogId::new(0, 1));
}

#[test]
fn leader_commit_past_the_log_is_clamped_to_the_last_new_entry() {
    let mut e = follower();
    e.step(
        NodeId(1),
        append(1, LogId::new(0, 1), vec![put(1, 2)], u64::MAX),
    )
    .unwrap();
    assert_eq!(e.commit_index(), LogIndex(2));
}

#[test]
fn term_overflow_is_survived() {
    let mut e = follower();
    e.step(NodeId(1), append(u64::MAX, LogId::new(0, 1), vec![], 0))
        .unwrap();
    assert_eq!(e.term(), Term(u64::MAX));
    // The election timer fires; there is no next term to campaign in.
    e.tick(10_000);
    assert_eq!(e.term(), Term(u64::MAX));
    e.take_actions();
}

#[test]
fn duplicate_and_reordered_appends_are_idempotent() {
    let mut e = follower();
    let msg = append(
        1,
        LogId::new(0, 1),
        vec![put(1, 2), put(1, 3), put(1, 4)],
        0,
    );
    e.step(NodeId(1), msg.clone()).unwrap();
    e.take_actions();
    // An older, shorter message arrives late, then the same one again.
    e.step(NodeId(1), append(1, LogId::new(0, 1), vec![put(1, 2)], 0))
        .unwrap();
    e.step(NodeId(1), msg).unwrap();
    let actions = e.take_actions();
    assert!(
        !actions
            .iter()
            .any(|a| matches!(a, Action::TruncateLog { .. } | Action::AppendLog { .. })),
        "no truncation or rewrite: {actions:?}"
    );
    assert_eq!(e.last_log_id(), LogId::new(1, 4));
}

#[test]
fn entries_contradicting_the_committed_log_are_refused() {
    let mut e = follower();
    e.step(
        NodeId(1),
        append(1, LogId::new(0, 1), vec![put(1, 2), put(1, 3)], 3),
    )
    .unwrap();
    assert_eq!(e.commit_index(), LogIndex(3));
    e.take_actions();
    // A "leader" of term 2 tries to overwrite committed index 3.
    let hostile = append(2, LogId::new(1, 2), vec![put(2, 3)], 3);
    assert!(matches!(
        e.step(NodeId(1), hostile),
        Err(StepError::ConflictsWithCommitted { .. })
    ));
    assert_eq!(e.term_at(LogIndex(3)), Some(Term(1)));
}

#[test]
fn snapshot_contradicting_the_committed_log_is_refused() {
    let mut e = follower();
    e.step(
        NodeId(1),
        append(1, LogId::new(0, 1), vec![put(1, 2), put(1, 3)], 3),
    )
    .unwrap();
    e.take_actions();
    let meta = SnapshotMeta::<C> {
        last_log_id: LogId::new(3, 3),
        membership: Membership::default(),
        id: 1,
        size: 0,
    };
    let req = InstallSnapshotRequest::chunk(Term(3), NodeId(1), meta, 0, vec![1], true);
    assert!(matches!(
        e.step(NodeId(1), Message::InstallSnapshot(req)),
        Err(StepError::ConflictsWithCommitted { .. })
    ));
    let meta = SnapshotMeta::<C> {
        last_log_id: LogId::new(3, 9),
        membership: Membership::default(),
        id: 2,
        size: 0,
    };
    let overflow =
        InstallSnapshotRequest::chunk(Term(3), NodeId(1), meta, u64::MAX, vec![1], false);
    assert!(matches!(
        e.step(NodeId(1), Message::InstallSnapshot(overflow)),
        Err(StepError::Malformed { .. })
    ));
}

#[test]
fn acknowledgement_past_the_leaders_log_is_refused() {
    let members: BTreeMap<NodeId, String> = (1..=3).map(|i| (NodeId(i), format!("n{i}"))).collect();
    let mut e = Engine::<C>::new(
        NodeId(1),
        Config::default(),
        1,
        0,
        RecoveredState::default(),
    )
    .unwrap();
    e.initialize(Membership::new_voters(members)).unwrap();
    e.campaign_now();
    e.take_actions();
    let vote = Message::VoteResponse(raft_core::VoteResponse {
        term: e.term(),
        granted: true,
        pre_vote: false,
        voter_uuid: raft_core::NodeUuid(2),
    });
    e.step(NodeId(2), vote).unwrap();
    assert!(e.is_leader());
    e.take_actions();
    let bogus = Message::AppendEntriesResponse(AppendEntriesResponse {
        term: e.term(),
        success: true,
        index: LogIndex(1_000_000),
        conflict: None,
        round: 0,
        uuid: raft_core::NodeUuid(2),
    });
    assert!(matches!(
        e.step(NodeId(2), bogus.clone()),
        Err(StepError::Malformed { .. })
    ));
    assert_eq!(
        e.matched().get(&NodeId(2)),
        Some(&LogIndex(0)),
        "the bogus ack moved nothing"
    );
    assert_eq!(e.commit_index(), LogIndex(0));
    // From a node that is not a member: ignored.
    assert!(e.step(NodeId(9), bogus.clone()).is_ok());
    assert!(matches!(
        e.step(NodeId(1), bogus),
        Err(StepError::FromSelf { .. })
    ));
}

#[test]
fn a_second_leader_in_the_same_term_is_refused() {
    let mut e = follower();
    e.step(NodeId(1), append(1, LogId::new(0, 1), vec![], 0))
        .unwrap();
    let mut other = append(1, LogId::new(0, 1), vec![], 0);
    if let Message::AppendEntries(r) = &mut other {
        r.leader_id = NodeId(3);
    }
    assert!(matches!(
        e.step(NodeId(3), other),
        Err(StepError::TwoLeaders { .. })
    ));
    assert_eq!(e.leader_id(), Some(NodeId(1)));
    assert!(!responses(&mut e).is_empty());
}

#[test]
fn a_snapshot_chunk_that_does_not_match_its_checksum_is_refused_unwritten() {
    let mut e = follower();
    let meta = SnapshotMeta::<C> {
        last_log_id: LogId::new(1, 9),
        membership: e.membership().clone(),
        id: 1,
        size: 0,
    };
    let mut req = InstallSnapshotRequest::chunk(Term(1), NodeId(1), meta, 0, vec![1, 2, 3], false);
    req.data[1] ^= 0x40;
    assert!(matches!(
        e.step(NodeId(1), Message::InstallSnapshot(req.clone())),
        Err(StepError::Malformed { .. })
    ));
    assert!(
        !e.take_actions().iter().any(|a| matches!(
            a,
            Action::WriteSnapshotChunk { .. } | Action::Respond { .. }
        )),
        "a corrupt chunk was written or answered"
    );
    req.data[1] ^= 0x40;
    e.step(NodeId(1), Message::InstallSnapshot(req)).unwrap();
    assert!(
        e.take_actions()
            .iter()
            .any(|a| matches!(a, Action::WriteSnapshotChunk { offset: 0, .. })),
        "the intact chunk was not written"
    );
}
