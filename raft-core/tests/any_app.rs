//! The test kits run an application that is not the built-in key-value
//! store: byte-string registers with their own commands and answers, nodes
//! addressed by socket address. The simulator puts it through crashes,
//! partitions, snapshots and lossy links with the same safety and
//! linearizability checks as `KvConfig`; the `LogStore` conformance suite
//! runs the memory store with its entries; the memory backends run it
//! under the real driver.
//!
//! A failure prints its seed; `SIM_SEED=S cargo test -p raft-core --release
//! --test any_app` replays it.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use raft_core::log_store_suite::{self, LogStoreHarness};
use raft_core::memory::{MemApp, MemLogStore};
use raft_core::sim::linearizability::{OpKind, OpOutput};
use raft_core::sim::{NetOptions, Sim, SimApp, SimOptions};
use raft_core::{Config, Entry, EntryPayload, LogId, Membership, NodeId, TypeConfig};

/// Registers named and valued by bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Registers;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
enum Command {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>),
    Swap {
        register: Vec<u8>,
        from: Option<Vec<u8>>,
        to: Option<Vec<u8>>,
    },
}

#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Nothing,
    Cleared { was_set: bool },
    Swapped { done: bool, now: Option<Vec<u8>> },
}

impl TypeConfig for Registers {
    type Command = Command;
    type Response = Answer;
    type Node = SocketAddr;
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct State {
    registers: BTreeMap<Vec<u8>, Vec<u8>>,
    applied: LogId,
    membership: Membership<SocketAddr>,
}

fn text(bytes: Option<Vec<u8>>) -> Option<String> {
    bytes.map(|b| String::from_utf8(b).expect("the simulator's values are text"))
}

impl MemApp for Registers {
    type State = State;

    fn apply(state: &mut State, entry: Entry<Registers>) -> Answer {
        state.applied = entry.log_id;
        match entry.payload {
            EntryPayload::Blank => Answer::Nothing,
            EntryPayload::Membership(m) => {
                state.membership = m;
                Answer::Nothing
            }
            EntryPayload::Command(c) => match (*c).clone() {
                Command::Set(r, v) => {
                    state.registers.insert(r, v);
                    Answer::Nothing
                }
                Command::Clear(r) => Answer::Cleared {
                    was_set: state.registers.remove(&r).is_some(),
                },
                Command::Swap { register, from, to } => {
                    let now = state.registers.get(&register).cloned();
                    if now != from {
                        return Answer::Swapped { done: false, now };
                    }
                    match &to {
                        Some(v) => state.registers.insert(register, v.clone()),
                        None => state.registers.remove(&register),
                    };
                    Answer::Swapped {
                        done: true,
                        now: to,
                    }
                }
            },
        }
    }

    fn applied(state: &State) -> LogId {
        state.applied
    }

    fn membership(state: &State) -> Membership<SocketAddr> {
        state.membership.clone()
    }

    fn encode(state: &State) -> Result<Vec<u8>, String> {
        raft_core::codec::encode(state).map_err(|e| e.to_string())
    }

    fn decode(bytes: &[u8]) -> Result<State, String> {
        raft_core::codec::decode(bytes).map_err(|e| e.to_string())
    }
}

impl SimApp for Registers {
    fn node(id: NodeId) -> SocketAddr {
        ([10, 0, 0, id.0 as u8], 7000).into()
    }

    fn command(key: &str, op: &OpKind) -> Option<Command> {
        let r = key.as_bytes().to_vec();
        let bytes = |v: &Option<String>| v.as_ref().map(|v| v.as_bytes().to_vec());
        match op {
            OpKind::Put(v) => Some(Command::Set(r, v.as_bytes().to_vec())),
            OpKind::Delete => Some(Command::Clear(r)),
            OpKind::Cas { expected, new } => Some(Command::Swap {
                register: r,
                from: bytes(expected),
                to: bytes(new),
            }),
            OpKind::Get => None,
        }
    }

    fn output(answer: Answer) -> OpOutput {
        match answer {
            Answer::Nothing => OpOutput::Put,
            Answer::Cleared { was_set } => OpOutput::Deleted(was_set),
            Answer::Swapped { done, now } => OpOutput::Cas {
                succeeded: done,
                current: text(now),
            },
        }
    }

    fn read(state: &State, key: &str) -> Option<String> {
        text(state.registers.get(key.as_bytes()).cloned())
    }

    fn writes_unique_value(command: &Command) -> bool {
        matches!(
            command,
            Command::Set(..) | Command::Swap { to: Some(_), .. }
        )
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a u64")];
    }
    (1..=20).collect()
}

/// Clients on 3 and 5 nodes through leader crashes, a partition, lossy
/// links and snapshots (whose bytes are this application's encoding):
/// every run safe, every history linearizable, every acknowledged write
/// readable at the end.
#[test]
fn the_simulator_checks_an_application_of_its_own_types() {
    for nodes in [3usize, 5] {
        for seed in seeds() {
            let mut o = SimOptions::new(nodes, seed * 1000 + nodes as u64);
            o.test_name = "the_simulator_checks_an_application_of_its_own_types".into();
            o.config = Config {
                snapshot_every: 20,
                purge_keep: 5,
                snapshot_chunk_bytes: 64,
                ..o.config
            };
            let mut sim: Sim<Registers> = Sim::with_app(o);
            sim.start_clients(6, 3);
            for round in 0..8u64 {
                sim.run_for(300 + round * 41);
                if let Some(l) = sim.leader() {
                    sim.crash(l);
                    sim.run_for(400);
                    sim.restart(l);
                }
                if round == 3 {
                    let ids = sim.ids();
                    sim.partition(&[ids[..1].to_vec(), ids[1..].to_vec()]);
                    sim.set_net(NetOptions {
                        min_delay_ms: 0,
                        max_delay_ms: 20,
                        request_loss: 0.05,
                        response_loss: 0.05,
                        duplicate: 0.05,
                    });
                }
                if round == 5 {
                    sim.heal();
                    sim.set_net(NetOptions::default());
                }
            }
            sim.stop_clients();
            let converged = sim.converge(3_000);
            sim.expect(converged.is_some(), || {
                "no convergence after healing".into()
            });
            sim.expect(sim.acknowledged() > 20, || {
                format!("only {} operations acknowledged", sim.acknowledged())
            });
            sim.expect(
                sim.stats.snapshots_installed + sim.stats.crashes > 0,
                || "no fault exercised".into(),
            );
            sim.expect(sim.duplicated_commands().is_empty(), || {
                "a write was applied twice".into()
            });
            sim.check_acknowledged_writes_present();
            sim.final_check();
        }
    }
}

struct Harness;

#[async_trait]
impl LogStoreHarness for Harness {
    type Config = Registers;
    type Store = MemLogStore<Registers>;
    async fn fresh(&mut self) -> Self::Store {
        MemLogStore::new()
    }
    async fn reopen(&mut self, store: Self::Store) -> Self::Store {
        store
    }
    fn command(&self, term: u64, index: u64) -> Command {
        Command::Set(term.to_be_bytes().to_vec(), index.to_be_bytes().to_vec())
    }
    fn node(&self, id: u64) -> SocketAddr {
        Registers::node(NodeId(id))
    }
}

/// The conformance suite with this application's entries.
#[tokio::test]
async fn the_log_store_suite_runs_with_an_application_of_its_own_types() {
    log_store_suite::run(&mut Harness).await;
}

/// With the driver feature (the default).
#[cfg(feature = "driver")]
mod under_the_driver {
    use super::*;
    use raft_core::Raft;
    use raft_core::memory::{MemRouter, MemStateMachine};

    /// The memory backends under the real driver: a 3-node cluster of
    /// `MemLogStore<Registers>` and `MemStateMachine<Registers>` replicates
    /// this application's commands, answers with its answers, and every node
    /// ends with the same registers, snapshots included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_memory_backends_run_an_application_of_its_own_types() {
        let wait = std::time::Duration::from_secs(20);
        let router = MemRouter::<Registers>::new();
        let members: BTreeMap<NodeId, SocketAddr> = (1..=3)
            .map(|i| (NodeId(i), Registers::node(NodeId(i))))
            .collect();
        let config = Config {
            snapshot_every: 10,
            purge_keep: 2,
            ..Config::default()
        };
        let mut nodes = Vec::new();
        for id in members.keys() {
            let sm = MemStateMachine::<Registers>::new();
            let raft = Raft::start(
                *id,
                config.clone(),
                MemLogStore::new(),
                sm.clone(),
                router.factory(*id),
            )
            .await
            .expect("start");
            router.register(*id, raft.clone());
            nodes.push((raft, sm));
        }
        nodes[0].0.initialize(members).await.expect("initialize");
        let leader = nodes[0].0.wait_for_leader(wait).await.expect("a leader");
        let raft = nodes[(leader.0 - 1) as usize].0.clone();
        let mut last = LogId::ZERO;
        for i in 0..25u8 {
            let (id, answer) = raft
                .client_write(Command::Set(vec![i % 5], vec![i]))
                .await
                .expect("set");
            assert_eq!(answer, Answer::Nothing);
            last = id;
        }
        let (_, answer) = raft
            .client_write(Command::Swap {
                register: vec![0],
                from: Some(vec![20]),
                to: None,
            })
            .await
            .expect("swap");
        assert_eq!(
            answer,
            Answer::Swapped {
                done: true,
                now: None
            }
        );
        let (_, answer) = raft
            .client_write(Command::Clear(vec![0]))
            .await
            .expect("clear");
        assert_eq!(answer, Answer::Cleared { was_set: false });
        let want: BTreeMap<Vec<u8>, Vec<u8>> = (1..5u8).map(|k| (vec![k], vec![20 + k])).collect();
        for (raft, sm) in &nodes {
            let mut m = raft.metrics();
            tokio::time::timeout(wait, m.wait_for(|m| m.applied_index > last.index))
                .await
                .expect("every node applies every write")
                .expect("metrics");
            assert_eq!(sm.state().registers, want, "node {}", raft.id());
        }
        assert!(
            nodes
                .iter()
                .any(|(r, _)| r.metrics().borrow().snapshot.is_some()),
            "a snapshot was built of this application's state"
        );
        for (raft, _) in nodes {
            raft.shutdown().await;
        }
    }
}
