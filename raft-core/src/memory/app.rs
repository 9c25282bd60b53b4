//! What an application gives the in-memory backends (and the simulator) to
//! run it: its state, held whole in memory, and how entries apply to it
//! and how it is written out as snapshot bytes.

use std::fmt;

use super::kv::{KvConfig, KvResponse, KvStore};
use crate::types::{Entry, LogId, Membership, TypeConfig};

/// An application whose state fits in memory: implement it for your own
/// [`TypeConfig`] to run [`MemStateMachine`](super::MemStateMachine) (and,
/// with [`SimApp`](crate::sim::SimApp), the simulator) on your own
/// commands and answers. [`KvConfig`] implements it with [`KvStore`].
pub trait MemApp: TypeConfig {
    /// The whole state. Two nodes that applied up to the same entry hold
    /// equal states.
    type State: Clone + Default + PartialEq + fmt::Debug + Send + Sync + 'static;

    /// Applies one committed entry; blank and membership entries included:
    /// the state records the last applied id and the membership.
    fn apply(state: &mut Self::State, entry: Entry<Self>) -> Self::Response;

    /// The id of the last entry `state` applied (`LogId::ZERO` if none).
    fn applied(state: &Self::State) -> LogId;

    /// The membership as of the last applied entry.
    fn membership(state: &Self::State) -> Membership<Self::Node>;

    /// The snapshot bytes of `state`.
    fn encode(state: &Self::State) -> Result<Vec<u8>, String>;

    /// A state from [`MemApp::encode`]'s bytes. The bytes come from a
    /// peer: a bad one is an error, never a panic.
    fn decode(bytes: &[u8]) -> Result<Self::State, String>;

    /// About how many bytes [`MemApp::encode`] would write (a snapshot's
    /// `size`, for the snapshot policy). The default encodes to find out;
    /// override it where a cheaper estimate exists.
    fn size_hint(state: &Self::State) -> u64 {
        Self::encode(state).map_or(0, |b| b.len() as u64)
    }
}

impl MemApp for KvConfig {
    type State = KvStore;

    fn apply(state: &mut KvStore, entry: Entry<KvConfig>) -> KvResponse {
        state.apply(entry)
    }

    fn applied(state: &KvStore) -> LogId {
        state.last_applied
    }

    fn membership(state: &KvStore) -> Membership<String> {
        state.membership.clone()
    }

    fn encode(state: &KvStore) -> Result<Vec<u8>, String> {
        state.encode().map_err(|e| e.to_string())
    }

    fn decode(bytes: &[u8]) -> Result<KvStore, String> {
        KvStore::decode(bytes).map_err(|e| e.to_string())
    }

    fn size_hint(state: &KvStore) -> u64 {
        state.approx_encoded_len()
    }
}
