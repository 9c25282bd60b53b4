//! What the simulator needs of an application: its [`TypeConfig`], a state
//! machine it can run in memory, and a mapping between the application's
//! commands and the key-value register model the linearizability checker
//! judges histories by.

use crate::memory::MemApp;
use crate::memory::kv::{KvCommand, KvConfig, KvResponse, KvStore};
use crate::types::NodeId;

use super::linearizability::{OpKind, OpOutput};

/// An application the simulator can run: implement it (and [`MemApp`],
/// which says how its state applies and encodes) for your own
/// [`TypeConfig`](crate::TypeConfig) to put your commands, responses and state machine
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
pub trait SimApp: MemApp {
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
