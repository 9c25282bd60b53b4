//! The randomized sweep: every seed builds a cluster, mixes every fault the
//! simulator has (partitions both ways and one way, crashes, power loss of
//! several nodes, lossy/duplicating/reordering links, slow disks, storage
//! errors, snapshots with small chunks, and on some seeds 3 -> 5 -> 3 voter
//! churn by joint consensus) under concurrent clients, then heals and
//! requires convergence within 10 election timeouts, a linearizable history
//! and every acknowledged write present.
//!
//! `SIM_SEEDS=N` runs N seeds (CI runs 1,000 in release mode); `SIM_SEED=S`
//! replays one.

mod common;

use std::collections::BTreeSet;

use common::*;
use raft_core::NodeId;
use raft_core::engine::rng::Rng;
use raft_core::sim::{MembershipChange, NetOptions, Sim};

/// One step of 3 -> 5 -> 3 voter churn on a 5-node cluster: add the next
/// missing node as a learner, promote the learners once all are in, or
/// shrink back to 3 of the current voters. Proposed only when the last
/// change has settled; a refusal (lost leadership) is fine.
fn churn(sim: &mut Sim, r: &mut Rng) {
    let Some(voters) = sim.settled_voters() else {
        return;
    };
    let Some(members) = sim.leader().and_then(|l| sim.engine(l)).map(|e| {
        e.membership()
            .nodes
            .keys()
            .copied()
            .collect::<BTreeSet<NodeId>>()
    }) else {
        return;
    };
    let change = if voters.len() <= 3 {
        match sim.ids().into_iter().find(|id| !members.contains(id)) {
            Some(missing) => MembershipChange::AddLearner(missing),
            None => MembershipChange::Voters(members),
        }
    } else {
        let mut v: Vec<NodeId> = voters.into_iter().collect();
        for i in (1..v.len()).rev() {
            v.swap(i, r.range(0, i as u64 + 1) as usize);
        }
        MembershipChange::Voters(v.into_iter().take(3).collect())
    };
    let _ = sim.change(change);
}

fn run_seed(seed: u64) {
    let mut r = Rng::new(seed ^ 0x5EED);
    let voter_churn = r.chance(0.3);
    let nodes = if !voter_churn && r.chance(0.5) { 3 } else { 5 };
    let mut o = opts(nodes, seed, "randomized_sweep");
    if r.chance(0.5) {
        o = with_snapshots(o, r.range(10, 40));
    }
    o.disk_latency_ms = (0, r.range(1, 6));
    let mut sim = if voter_churn {
        Sim::with_voters(o, &[NodeId(1), NodeId(2), NodeId(3)])
    } else {
        Sim::new(o)
    };
    sim.start_clients(r.range(2, 7) as usize, r.range(1, 4) as usize);
    let ids = sim.ids();
    let pick = |r: &mut Rng| ids[r.range(0, ids.len() as u64) as usize];
    for _ in 0..r.range(8, 16) {
        match r.range(0, if voter_churn { 13 } else { 10 }) {
            0 => {
                let a = pick(&mut r);
                sim.isolate(a);
            }
            1 => {
                let (a, b) = (pick(&mut r), pick(&mut r));
                if a != b {
                    sim.cut_one_way(a, b);
                }
            }
            2 => {
                let split = r.range(1, ids.len() as u64) as usize;
                sim.partition(&[ids[..split].to_vec(), ids[split..].to_vec()]);
            }
            3 => {
                if let Some(l) = sim.leader() {
                    sim.crash(l);
                }
            }
            4 => {
                // Power loss of several nodes at once.
                let k = r.range(1, ids.len() as u64 + 1) as usize;
                for id in ids.iter().take(k) {
                    sim.crash(*id);
                }
            }
            5 => sim.set_net(lossy()),
            6 => sim.set_net(NetOptions {
                min_delay_ms: 0,
                max_delay_ms: r.range(5, 100),
                ..NetOptions::default()
            }),
            7 => sim.opts.storage_error_rate = 0.005,
            8 => {
                // One slow, lossy link (a flaky NIC between two nodes).
                let (a, b) = (pick(&mut r), pick(&mut r));
                let slow = NetOptions {
                    min_delay_ms: r.range(10, 60),
                    max_delay_ms: r.range(60, 200),
                    request_loss: 0.2,
                    response_loss: 0.2,
                    duplicate: 0.1,
                };
                sim.set_link(a, b, slow);
            }
            10..=12 => churn(&mut sim, &mut r),
            _ => {
                sim.heal();
                sim.set_net(NetOptions::default());
                sim.clear_links();
                sim.opts.storage_error_rate = 0.0;
                let down: Vec<NodeId> = ids.iter().copied().filter(|id| !sim.is_up(*id)).collect();
                for id in down {
                    sim.restart(id);
                }
            }
        }
        sim.run_for(r.range(50, 600));
    }
    sim.opts.storage_error_rate = 0.0;
    heal_and_converge(&mut sim);
    sim.check_acknowledged_writes_present();
    sim.final_check();
}

#[test]
fn randomized_sweep() {
    let seeds = seeds_from("SIM_SEEDS", 200);
    let start = std::time::Instant::now();
    for &seed in &seeds {
        run_seed(seed);
    }
    println!(
        "randomized_sweep: {} seeds in {:.1}s",
        seeds.len(),
        start.elapsed().as_secs_f64()
    );
}
