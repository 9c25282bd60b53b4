//! `cargo xtask mutants`: how many known Raft bugs the randomized suites
//! catch.
//!
//! Builds raft-core's tests once with the `mutation-testing` feature, checks
//! that the randomized suites pass unmutated, then switches each catalogued
//! mutation on (`RAFT_MUTANT`) and runs the randomized sweep, then, if the
//! sweep missed it, the seeded scenario suites (without the scripted
//! Figure 8 test: scripted tests do not count). Prints caught / missed with
//! the suite and the seed that caught each one, and fails if any was missed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use raft_core::mutation::Mutation;

/// The randomized suites, in the order they are tried, with the tests to
/// leave out of each (scripted ones).
const SUITES: &[(&str, &[&str])] = &[
    ("sweep", &[]),
    ("scenarios", &["figure8_scripted"]),
    ("membership", &[]),
];

pub struct Options {
    /// Sweep seeds per mutation (`SIM_SEEDS`).
    seeds: u64,
    /// Only these mutations (by name); all when empty.
    only: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            seeds: 1_000,
            only: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--seeds" => {
                    o.seeds = it
                        .next()
                        .context("--seeds needs a number")?
                        .parse()
                        .context("--seeds needs a number")?
                }
                "--only" => o.only.extend(
                    it.next()
                        .context("--only needs mutation names")?
                        .split(',')
                        .map(String::from),
                ),
                "--list" => {
                    for m in Mutation::ALL {
                        println!("{}", m.name());
                    }
                    std::process::exit(0);
                }
                other => {
                    bail!("unknown option {other} (mutants [--seeds N] [--only a,b] [--list])")
                }
            }
        }
        for name in &o.only {
            if Mutation::from_name(name).is_none() {
                bail!("no mutation is named {name}; `cargo xtask mutants --list` lists them");
            }
        }
        Ok(o)
    }
}

/// What one suite run said.
enum Outcome {
    Passed,
    /// Failed; the seed it named and the first line of the violation.
    Caught {
        seed: Option<u64>,
        what: String,
    },
}

pub fn run(root: &Path, opts: Options) -> Result<()> {
    let bins = build(root)?;
    let mutations: Vec<Mutation> = Mutation::ALL
        .iter()
        .copied()
        .filter(|m| opts.only.is_empty() || opts.only.iter().any(|n| n == m.name()))
        .collect();

    println!("baseline: the randomized suites without a mutation");
    for (suite, skip) in SUITES {
        if let Outcome::Caught { seed, what } = run_suite(&bins, suite, skip, None, opts.seeds)? {
            bail!("the unmutated {suite} suite fails (seed {seed:?}): {what}");
        }
    }

    println!("\n| mutation | caught by | seed | time | first violation |\n|---|---|---:|---:|---|");
    let mut missed = Vec::new();
    for m in &mutations {
        let start = Instant::now();
        let mut caught = None;
        for (suite, skip) in SUITES {
            if let Outcome::Caught { seed, what } =
                run_suite(&bins, suite, skip, Some(*m), opts.seeds)?
            {
                caught = Some((*suite, seed, what));
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        match caught {
            Some((suite, seed, what)) => println!(
                "| {} | {suite} | {} | {secs:.1} s | {} |",
                m.name(),
                seed.map(|s| s.to_string()).unwrap_or_else(|| "?".into()),
                what.replace('|', "/")
            ),
            None => {
                println!("| {} | **missed** | | {secs:.1} s | |", m.name());
                missed.push(m.name());
            }
        }
    }
    println!(
        "\n{} of {} mutations caught by the randomized suites ({} sweep seeds each).",
        mutations.len() - missed.len(),
        mutations.len(),
        opts.seeds
    );
    if !missed.is_empty() {
        bail!("missed: {}", missed.join(", "));
    }
    Ok(())
}

/// Builds raft-core's test binaries with the mutation switches compiled in
/// and returns them by target name.
fn build(root: &Path) -> Result<Vec<(String, PathBuf)>> {
    let out = super::cargo()
        .current_dir(root)
        .args([
            "test",
            "-p",
            "raft-core",
            "--release",
            "--features",
            "mutation-testing",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("building raft-core's tests")?;
    if !out.status.success() {
        bail!(
            "building raft-core's tests with mutation-testing failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if SUITES.iter().any(|(s, _)| *s == name) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    for (s, _) in SUITES {
        if !bins.iter().any(|(n, _)| n == s) {
            bail!("cargo built no test binary named {s}");
        }
    }
    Ok(bins)
}

fn run_suite(
    bins: &[(String, PathBuf)],
    suite: &str,
    skip: &[&str],
    mutation: Option<Mutation>,
    seeds: u64,
) -> Result<Outcome> {
    let exe = &bins
        .iter()
        .find(|(n, _)| n == suite)
        .context("suite binary")?
        .1;
    let mut c = Command::new(exe);
    c.env("SIM_SEEDS", seeds.to_string())
        .env_remove("SIM_SEED")
        .env_remove("SCENARIO_SEEDS")
        .env("RUST_BACKTRACE", "0")
        .args(["--test-threads", "2"]);
    for s in skip {
        c.args(["--skip", s]);
    }
    match mutation {
        Some(m) => c.env("RAFT_MUTANT", m.name()),
        None => c.env_remove("RAFT_MUTANT"),
    };
    let out = c
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if out.status.success() {
        return Ok(Outcome::Passed);
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Outcome::Caught {
        seed: seed_of(&text),
        what: violation_of(&text),
    })
}

/// The seed a failing simulation names ("seed N: replay with ...").
fn seed_of(text: &str) -> Option<u64> {
    let at = text.find("seed ")?;
    text[at + 5..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The first line of the violation a failing simulation reports.
fn violation_of(text: &str) -> String {
    let line = text
        .lines()
        .find_map(|l| {
            l.split_once("simulation invariant violated at ")
                .map(|(_, r)| r)
        })
        .or_else(|| text.lines().find(|l| l.contains("panicked")))
        .unwrap_or("(no message)");
    let mut s: String = line.chars().take(140).collect();
    if s.len() < line.len() {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_and_violation_are_read_from_a_failing_simulation() {
        let text = "thread 'x' panicked at src/sim/mod.rs:1:1:\n\
            simulation invariant violated at t=12ms: two leaders in term 3: 1 and 2\n  \
            seed 417: replay with SIM_SEED=417 cargo test";
        assert_eq!(seed_of(text), Some(417));
        assert_eq!(violation_of(text), "t=12ms: two leaders in term 3: 1 and 2");
    }
}
