//! What the simulator needs of an application: its [`TypeConfig`], a state
//! machine it can run in memory, and a mapping between the application's
//! commands and the key-value register model the linearizability checker
//! judges histories by.

use std::fmt;

use crate::memory::kv::{KvCommand, KvConfig, KvResponse, KvStore};
use crate::types::{Entry, LogId, Membership, NodeId, TypeConfig};

use super::linearizability::{OpKind, OpOutput};

/// An application the simulator can run: implement it for your own
/// [`TypeConfig`] to put your commands, responses and state machine
/// through the same faults, safety checks and linearizability check as
/// the built-in key-value store ([`KvConfig`], the default).
///
/// The simulator's clients speak a register per key (put, read,
/// compare-and-set, with values unique per operation); `command`,
/// `output` and `read` translate between that model and the
/// application. Any state machine that can hold a value per key can be
/// checked this way, whatever its command and response types look like.
///
/// ```
/// use raft_core::memory::KvConfig;
/// use raft_core::sim::{Sim, SimOptions};
/// // `KvConfig` implements `SimApp`; a test of your own `TypeConfig`
/// // (`raft-core/tests/any_app.rs` has one) names it the same way:
/// let mut sim: Sim<KvConfig> = Sim::with_app(SimOptions::new(3, 1));
/// sim.start_clients(2, 4);
/// sim.run_for(2_000);
/// sim.stop_clients();
/// sim.run_for(1_000);
/// sim.final_check();
/// ```
pub trait SimApp: TypeConfig {
    /// The state machine's whole state, held in memory by each simulated
    /// node. Two nodes that applied up to the same entry must hold equal
    /// states (State Machine Safety, checked at the end of a run).
    type State: Clone + Default + PartialEq + fmt::Debug;

    /// Applies one committed entry (blank and membership entries included:
    /// the state records the last applied id and the membership).
    fn apply(state: &mut Self::State, entry: Entry<Self>) -> Self::Response;

    /// The id of the last entry `state` applied (`LogId::ZERO` if none).
    fn applied(state: &Self::State) -> LogId;

    /// The membership as of the last applied entry.
    fn membership(state: &Self::State) -> Membership<Self::Node>;

    /// The snapshot bytes of `state`.
    fn encode(state: &Self::State) -> Vec<u8>;

    /// A state from [`SimApp::encode`]'s bytes.
    fn decode(bytes: &[u8]) -> Result<Self::State, String>;

    /// The address of node `id` in membership entries.
    fn node(id: NodeId) -> Self::Node;

    /// The command that performs `op` on `key`; `None` for a read, which
    /// the simulator serves through ReadIndex and [`SimApp::read`].
    fn command(key: &str, op: &OpKind) -> Option<Self::Command>;

    /// The register model's answer that `response` (to a command built by
    /// [`SimApp::command`]) stands for.
    fn output(response: Self::Response) -> OpOutput;

    /// The value `state` holds for `key`.
    fn read(state: &Self::State, key: &str) -> Option<String>;

    /// Whether `command` writes a value unique to its client operation
    /// (every put, and every compare-and-set that sets a value), so that
    /// finding it twice in a log is a duplicated write.
    fn writes_unique_value(command: &Self::Command) -> bool;
}

impl SimApp for KvConfig {
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

    fn encode(state: &KvStore) -> Vec<u8> {
        state.encode().expect("a key-value store always encodes")
    }

    fn decode(bytes: &[u8]) -> Result<KvStore, String> {
        KvStore::decode(bytes).map_err(|e| e.to_string())
    }

    fn node(id: NodeId) -> String {
        format!("node-{id}")
    }

    fn command(key: &str, op: &OpKind) -> Option<KvCommand> {
        let key = key.to_string();
        match op {
            OpKind::Put(value) => Some(KvCommand::Put {
                key,
                value: value.clone(),
            }),
            OpKind::Delete => Some(KvCommand::Delete { key }),
            OpKind::Cas { expected, new } => Some(KvCommand::Cas {
                key,
                expected: expected.clone(),
                new: new.clone(),
            }),
            OpKind::Get => None,
        }
    }

    fn output(response: KvResponse) -> OpOutput {
        match response {
            KvResponse::Put | KvResponse::None => OpOutput::Put,
            KvResponse::Deleted(d) => OpOutput::Deleted(d),
            KvResponse::Cas { succeeded, current } => OpOutput::Cas { succeeded, current },
        }
    }

    fn read(state: &KvStore, key: &str) -> Option<String> {
        state.get(key).cloned()
    }

    fn writes_unique_value(command: &KvCommand) -> bool {
        matches!(
            command,
            KvCommand::Put { .. } | KvCommand::Cas { new: Some(_), .. }
        )
    }
}
