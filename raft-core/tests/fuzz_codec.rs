//! Mutation fuzzing of the wire and disk codec's decoding: valid encodings
//! of every message kind, log entries, hard states and snapshot metadata,
//! damaged the ways bytes get damaged (bits flipped, bytes overwritten,
//! inserted, deleted, truncated, spliced from another value, length
//! prefixes blown up), must decode to a value or a typed error: never a
//! panic, never an allocation past the codec's cap.
//!
//! Run by `raft_core::fuzz`: deterministic per seed (`FUZZ_SEED`, default
//! 1); `FUZZ_ITERS` damaged inputs (default 20,000) or `FUZZ_SECS` to run
//! for a time. A failure prints the seed and iteration; every input that
//! ever failed is kept under `tests/fuzz_regressions/` (one hex line per
//! input) and replayed first.

use std::collections::BTreeMap;

use raft_core::codec;
use raft_core::fuzz::{self, Target};
use raft_core::memory::{KvCommand, KvConfig};
use raft_core::{
    AppendEntriesRequest, AppendEntriesResponse, ConflictHint, Entry, EntryPayload, HardState,
    InstallSnapshotRequest, InstallSnapshotResponse, LogId, LogIndex, Membership, Message, NodeId,
    NodeUuid, SnapshotMeta, Term, TimeoutNowRequest, VoteRequest, VoteResponse,
};

type C = KvConfig;

/// Decodes its bytes as one type; whether they made a value.
type Decoder = fn(&[u8]) -> bool;

fn membership() -> Membership<String> {
    let mut m = Membership::new_voters(
        (1..=3)
            .map(|i| (NodeId(i), format!("10.0.0.{i}:7000")))
            .collect::<BTreeMap<_, _>>(),
    );
    m.configs.push([1, 2].map(NodeId).into());
    m.uuids.insert(NodeId(2), NodeUuid(0x1234_5678_9abc_def0));
    m
}

fn meta() -> SnapshotMeta<C> {
    SnapshotMeta {
        last_log_id: LogId::new(4, 900),
        membership: membership(),
        id: 17,
        size: 1 << 20,
    }
}

fn entries() -> Vec<Entry<C>> {
    vec![
        Entry {
            log_id: LogId::new(3, 10),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: LogId::new(3, 11),
            payload: EntryPayload::command(KvCommand::Put {
                key: "k".into(),
                value: "v".repeat(40),
            }),
        },
        Entry {
            log_id: LogId::new(3, 12),
            payload: EntryPayload::command(KvCommand::Cas {
                key: "c".into(),
                expected: None,
                new: Some("n".into()),
            }),
        },
        Entry {
            log_id: LogId::new(3, 13),
            payload: EntryPayload::Membership(membership()),
        },
    ]
}

/// Valid encodings of every kind of value the codec decodes from peers
/// or disk, each with the decoder that reads it.
fn corpus() -> Vec<(Vec<u8>, Decoder)> {
    fn msg(bytes: &[u8]) -> bool {
        codec::decode::<Message<C>>(bytes).is_ok()
    }
    fn entry(bytes: &[u8]) -> bool {
        codec::decode::<Entry<C>>(bytes).is_ok()
    }
    fn hard(bytes: &[u8]) -> bool {
        codec::decode::<HardState>(bytes).is_ok()
    }
    fn snapshot_meta(bytes: &[u8]) -> bool {
        codec::decode::<SnapshotMeta<C>>(bytes).is_ok()
    }
    let messages: Vec<Message<C>> = vec![
        Message::AppendEntries(AppendEntriesRequest {
            term: Term(3),
            leader_id: NodeId(1),
            prev_log_id: LogId::new(3, 9),
            entries: entries(),
            leader_commit: LogIndex(9),
            round: 77,
            keep_from: LogIndex(5),
        }),
        Message::AppendEntriesResponse(AppendEntriesResponse {
            term: Term(3),
            success: false,
            index: LogIndex(12),
            conflict: Some(ConflictHint {
                term: Some(Term(2)),
                index: LogIndex(7),
            }),
            round: 77,
            uuid: NodeUuid(9),
        }),
        Message::Vote(VoteRequest {
            term: Term(5),
            candidate_id: NodeId(2),
            last_log_id: LogId::new(4, 20),
            pre_vote: true,
            transfer: false,
            candidate_uuid: NodeUuid(u128::MAX),
        }),
        Message::VoteResponse(VoteResponse {
            term: Term(5),
            granted: true,
            pre_vote: true,
            voter_uuid: NodeUuid(3),
        }),
        Message::InstallSnapshot(InstallSnapshotRequest::chunk(
            Term(4),
            NodeId(1),
            meta(),
            65536,
            (0..200u8).collect(),
            false,
        )),
        Message::InstallSnapshotResponse(InstallSnapshotResponse {
            term: Term(4),
            snapshot_id: 17,
            next_offset: 65736,
            done: false,
            uuid: NodeUuid(5),
        }),
        Message::TimeoutNow(TimeoutNowRequest {
            term: Term(6),
            leader_id: NodeId(1),
        }),
    ];
    let mut out: Vec<(Vec<u8>, Decoder)> = messages
        .iter()
        .map(|m| (codec::encode(m).expect("encode"), msg as Decoder))
        .collect();
    for e in entries() {
        out.push((codec::encode(&e).expect("encode"), entry));
    }
    let hs = HardState {
        term: Term(8),
        voted_for: Some(NodeId(2)),
        uuid: NodeUuid(42),
    };
    out.push((codec::encode(&hs).expect("encode"), hard));
    out.push((codec::encode(&meta()).expect("encode"), snapshot_meta));
    out
}

#[test]
fn damaged_encodings_decode_to_a_value_or_an_error_never_a_panic() {
    let corpus = corpus();
    let targets: Vec<Target> = corpus
        .iter()
        .map(|(bytes, decode)| Target::new("codec", bytes.clone(), decode))
        .collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    fuzz::run_test("codec", &targets, &dir, 20_000);
}

/// The corpus is what it claims: each value decodes whole with its
/// decoder, and loses that once a byte is cut off.
#[test]
fn the_corpus_decodes_whole_and_not_when_cut() {
    for (bytes, decode) in corpus() {
        assert!(decode(&bytes), "corpus value does not decode: {bytes:02x?}");
        assert!(!decode(&bytes[..bytes.len() - 1]), "a cut value decodes");
    }
}
