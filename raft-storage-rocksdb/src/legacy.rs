//! Records as formats 1 to 3 wrote them, before member identities
//! (`Membership::uuids`, `HardState::uuid`). This build writes none of
//! them; a store opened from an older build keeps its old records until
//! they are overwritten or purged, and they are read through here.
//!
//! A record is decoded in the current format first. Only when that fails
//! (its checksum already verified) is it decoded as the older format and
//! converted; a record of neither format stays an error. Bincode is not
//! self-describing, but the older forms are the current ones without their
//! trailing identity fields, so a record of one format never decodes
//! whole as the other: one runs out of bytes, the other leaves some over.

use std::collections::{BTreeMap, BTreeSet};

use raft_core::{
    Entry, EntryPayload, HardState, LogId, Membership, NodeId, NodeUuid, SnapshotMeta, Term,
    TypeConfig,
};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// A value stored in a checksummed record, and how an older format wrote
/// it, if one did.
pub trait Record: DeserializeOwned {
    /// Decodes `payload` as an older format wrote it.
    fn legacy(_payload: &[u8]) -> Option<Self> {
        None
    }
}

impl Record for LogId {}

/// `Membership` before identities.
#[derive(Deserialize)]
pub struct MembershipV3<N> {
    configs: Vec<BTreeSet<NodeId>>,
    nodes: BTreeMap<NodeId, N>,
}

impl<N> From<MembershipV3<N>> for Membership<N> {
    fn from(m: MembershipV3<N>) -> Self {
        Membership {
            configs: m.configs,
            nodes: m.nodes,
            uuids: BTreeMap::new(),
        }
    }
}

#[derive(Deserialize)]
struct HardStateV3 {
    term: Term,
    voted_for: Option<NodeId>,
}

/// A hard state without an identity: the node draws one at its next start.
impl Record for HardState {
    fn legacy(payload: &[u8]) -> Option<Self> {
        let old: HardStateV3 = raft_core::codec::decode(payload).ok()?;
        Some(HardState {
            term: old.term,
            voted_for: old.voted_for,
            uuid: NodeUuid::NONE,
        })
    }
}

#[derive(Deserialize)]
#[serde(bound = "")]
enum PayloadV3<C: TypeConfig> {
    Blank,
    Command(C::Command),
    Membership(MembershipV3<C::Node>),
}

#[derive(Deserialize)]
#[serde(bound = "")]
struct EntryV3<C: TypeConfig> {
    log_id: LogId,
    payload: PayloadV3<C>,
}

impl<C: TypeConfig> Record for Entry<C> {
    fn legacy(payload: &[u8]) -> Option<Self> {
        let old: EntryV3<C> = raft_core::codec::decode(payload).ok()?;
        let payload = match old.payload {
            PayloadV3::Blank => EntryPayload::Blank,
            PayloadV3::Command(c) => EntryPayload::command(c),
            PayloadV3::Membership(m) => EntryPayload::Membership(m.into()),
        };
        Some(Entry {
            log_id: old.log_id,
            payload,
        })
    }
}

/// Snapshot meta of formats 2 and 3.
#[derive(Deserialize)]
#[serde(bound = "")]
struct SnapshotMetaV3<C: TypeConfig> {
    last_log_id: LogId,
    membership: MembershipV3<C::Node>,
    id: u64,
    size: u64,
}

impl<C: TypeConfig> Record for SnapshotMeta<C> {
    fn legacy(payload: &[u8]) -> Option<Self> {
        let old: SnapshotMetaV3<C> = raft_core::codec::decode(payload).ok()?;
        Some(SnapshotMeta {
            last_log_id: old.last_log_id,
            membership: old.membership.into(),
            id: old.id,
            size: old.size,
        })
    }
}

/// What format 1 stored as a snapshot's meta (no `size`; the caller takes
/// it from the snapshot's file).
#[derive(Deserialize)]
#[serde(bound = "")]
pub struct SnapshotMetaV1<C: TypeConfig> {
    pub last_log_id: LogId,
    pub membership: MembershipV3<C::Node>,
    pub id: u64,
}

impl<C: TypeConfig> Record for SnapshotMetaV1<C> {}
