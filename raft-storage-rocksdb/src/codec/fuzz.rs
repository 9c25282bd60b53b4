//! Mutation fuzzing of every record the store reads back (issue 11), on
//! `raft_core::fuzz`. Two ways in: whole records damaged as a disk damages
//! them, which the checksum must refuse without a panic; and payloads
//! damaged with the checksum sealed over the damage, so that it reaches
//! the decoders, the current format's and each legacy fallback, as a bug
//! that wrote a bad record would. `FUZZ_SEED`, `FUZZ_ITERS`, `FUZZ_SECS`
//! as for the codec's fuzzer; kept inputs in
//! `tests/fuzz_regressions/` of this crate.

use std::collections::BTreeMap;

use raft_core::fuzz::{self, Target};
use raft_core::memory::{KvCommand, KvConfig, KvResponse};
use raft_core::session::{Session, SessionClock, SessionLimits};
use raft_core::{
    Entry, EntryPayload, HardState, LogId, Membership, NodeId, NodeUuid, SnapshotMeta, Term,
};
use serde::Serialize;

use super::{crc, log_key, open_record, seal_record};
use crate::legacy::Record;
use crate::state_machine::Applied;

type C = KvConfig;

fn membership() -> Membership<String> {
    let mut m = Membership::new_voters(
        (1..=3)
            .map(|i| (NodeId(i), format!("10.0.0.{i}:7000")))
            .collect::<BTreeMap<_, _>>(),
    );
    m.uuids.insert(NodeId(2), NodeUuid(77));
    m
}

fn key() -> Vec<u8> {
    log_key(1, 42)
}

/// Opens `bytes` as a whole record of type `T` under [`key`].
fn whole<T: Record>(bytes: &[u8]) -> bool {
    open_record::<T>(&key(), bytes).is_ok()
}

/// Seals `payload` as it is and opens it as a `T`: the damage reaches the
/// decoders.
fn resealed<T: Record>(payload: &[u8]) -> bool {
    let k = key();
    let mut rec = crc(&k, payload).to_le_bytes().to_vec();
    rec.extend_from_slice(payload);
    open_record::<T>(&k, &rec).is_ok()
}

fn payload<T: Serialize>(value: &T) -> Vec<u8> {
    raft_core::codec::encode(value).expect("encodes")
}

fn record<T: Serialize>(value: &T) -> Vec<u8> {
    seal_record(&key(), value).expect("seals")
}

#[test]
fn damaged_records_are_refused_or_decoded_never_a_panic() {
    let entries: Vec<Entry<C>> = vec![
        Entry {
            log_id: LogId::new(2, 42),
            payload: EntryPayload::Blank,
        },
        Entry {
            log_id: LogId::new(2, 42),
            payload: EntryPayload::command(KvCommand::Cas {
                key: "k".into(),
                expected: Some("a".into()),
                new: None,
            }),
        },
        Entry {
            log_id: LogId::new(2, 42),
            payload: EntryPayload::Membership(membership()),
        },
    ];
    let hard = HardState {
        term: Term(9),
        voted_for: Some(NodeId(3)),
        uuid: NodeUuid(5),
    };
    let meta = SnapshotMeta::<C> {
        last_log_id: LogId::new(2, 40),
        membership: membership(),
        id: 3,
        size: 1 << 30,
    };
    let applied = Applied::<C> {
        log_id: LogId::new(2, 41),
        membership: membership(),
    };
    let session = Session::<KvResponse> {
        limits: SessionLimits::default(),
        last_active_ms: 1_000,
        acked_below: 4,
        responses: BTreeMap::from([
            (4, (30, KvResponse::Put)),
            (
                5,
                (
                    31,
                    KvResponse::Cas {
                        succeeded: false,
                        current: Some("x".into()),
                    },
                ),
            ),
        ]),
    };
    let clock = SessionClock {
        now_ms: 5_000,
        swept_ms: 4_000,
    };
    let mut targets: Vec<Target> = Vec::new();
    for e in &entries {
        targets.push(Target::new("entry", record(e), &whole::<Entry<C>>));
        targets.push(Target::new(
            "entry payload",
            payload(e),
            &resealed::<Entry<C>>,
        ));
    }
    targets.push(Target::new(
        "hard state",
        record(&hard),
        &whole::<HardState>,
    ));
    targets.push(Target::new(
        "hard state payload",
        payload(&hard),
        &resealed::<HardState>,
    ));
    targets.push(Target::new(
        "purge point payload",
        payload(&LogId::new(2, 9)),
        &resealed::<LogId>,
    ));
    targets.push(Target::new(
        "snapshot meta payload",
        payload(&meta),
        &resealed::<SnapshotMeta<C>>,
    ));
    targets.push(Target::new(
        "applied payload",
        payload(&applied),
        &resealed::<Applied<C>>,
    ));
    targets.push(Target::new(
        "session payload",
        payload(&session),
        &resealed::<Session<KvResponse>>,
    ));
    targets.push(Target::new(
        "session clock payload",
        payload(&clock),
        &resealed::<SessionClock>,
    ));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    fuzz::run_test("record", &targets, &dir, 20_000);
}
