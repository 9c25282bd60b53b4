//! Shared helpers for the simulation tests.
#![allow(dead_code)]

pub mod script;

use raft_core::sim::{NetOptions, Sim, SimOptions};
use raft_core::{Config, NodeId};

/// The largest election timeout of the default config: "within N election
/// timeouts" bounds are multiples of this.
pub const ET: u64 = 300;

/// The seeds a scenario runs: `SIM_SEED=S` replays exactly one;
/// `SCENARIO_SEEDS=N` overrides how many each scenario runs.
pub fn seeds(default: u64) -> Vec<u64> {
    seeds_from("SCENARIO_SEEDS", default)
}

/// Like [`seeds`], with the count taken from the environment variable `knob`.
pub fn seeds_from(knob: &str, default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SIM_SEED") {
        return vec![s.parse().expect("SIM_SEED is a u64")];
    }
    let n = std::env::var(knob)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    (1..=n).collect()
}

pub fn opts(nodes: usize, seed: u64, name: &str) -> SimOptions {
    let mut o = SimOptions::new(nodes, seed);
    o.test_name = name.to_string();
    o
}

pub fn with_snapshots(mut o: SimOptions, every: u64) -> SimOptions {
    o.config = Config {
        snapshot_every: every,
        purge_keep: 5,
        snapshot_chunk_bytes: 64,
        ..o.config
    };
    o
}

pub fn lossy() -> NetOptions {
    NetOptions {
        min_delay_ms: 0,
        max_delay_ms: 27,
        request_loss: 0.1,
        response_loss: 0.1,
        duplicate: 0.05,
    }
}

/// Runs until a leader exists (at most 10 election timeouts) and returns it.
pub fn wait_leader(sim: &mut Sim) -> NodeId {
    sim.run_until(10 * ET, |s| s.leader().is_some());
    let l = sim.leader();
    sim.expect(l.is_some(), || {
        "no leader within 10 election timeouts".into()
    });
    l.unwrap_or_default()
}

/// Runs until the leader has recorded every member's identity and
/// committed the record (at most 10 election timeouts), so that no entry
/// of the leader's own is in flight when a test cuts the network. Returns
/// the leader.
pub fn wait_identities_recorded(sim: &mut Sim) -> NodeId {
    let recorded = |s: &Sim| {
        s.leader().and_then(|l| s.engine(l)).is_some_and(|e| {
            let m = e.membership();
            m.nodes.keys().all(|id| m.uuids.contains_key(id))
                && e.membership_log_id().index <= e.commit_index()
        })
    };
    sim.run_until(10 * ET, recorded);
    sim.expect(recorded(sim), || {
        "member identities not recorded within 10 election timeouts".into()
    });
    sim.leader().unwrap_or_default()
}

/// Heals everything, restarts every node, and requires convergence within
/// 10 election timeouts.
pub fn heal_and_converge(sim: &mut Sim) {
    sim.heal();
    sim.set_net(NetOptions::default());
    sim.clear_links();
    sim.disarm_crashes();
    for id in sim.ids() {
        sim.restart(id);
    }
    sim.stop_clients();
    let t = sim.converge(10 * ET);
    sim.expect(t.is_some(), || {
        format!(
            "cluster did not converge within 10 election timeouts after healing:{}",
            sim.describe()
        )
    });
}

/// Puts a value and requires it to be acknowledged.
pub fn must_put(sim: &mut Sim, key: &str, value: &str) {
    let ok = sim.put(key, value, 10 * ET);
    sim.expect(ok, || format!("put {key}={value} was not acknowledged"));
}

/// Every live node has `key = value` in its state machine.
pub fn all_have(sim: &Sim, key: &str, value: &str) -> bool {
    sim.ids()
        .into_iter()
        .filter(|id| sim.is_up(*id))
        .all(|id| sim.state_machine(id).get(key).map(String::as_str) == Some(value))
}

pub fn others(sim: &Sim, but: NodeId) -> Vec<NodeId> {
    sim.ids().into_iter().filter(|id| *id != but).collect()
}

pub fn term_of(sim: &Sim, id: NodeId) -> u64 {
    sim.engine(id).map(|e| e.term().0).unwrap_or(0)
}
