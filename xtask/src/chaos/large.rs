//! `cargo xtask chaos --large-state`: the cluster holds many times the
//! entries `snapshot_every` covers and builds a snapshot every second or
//! two, so the faults land on snapshot builds, transfers and installs, not
//! only on log replication. Before the faults, [`KEYS`] keys of
//! [`VALUE_BYTES`] each are loaded; throughout the run writers overwrite
//! them with rising versions; after the faults heal every key must hold its
//! last acknowledged version or a version whose write's outcome was unknown
//! (such a write may take effect late), never an older acknowledged one,
//! one never written, or nothing.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use raft_core::sim::Rng;

use crate::http::{Credentials, Http, Outcome};

pub const KEYS: u64 = 10_000;
pub const VALUE_BYTES: usize = 1024;
/// Writers overwriting keys during the run; each owns the keys congruent
/// to its number, so a key's versions rise in the order they are invoked.
pub const WRITERS: u64 = 2;
const LOADERS: u64 = 16;

/// The cluster file's `[raft]` table for the mode: a snapshot after 1,000
/// entries once the log since the last one holds a tenth of its bytes
/// (about a megabyte here: every second or two under the writers), and at
/// most 2,000 entries kept for a follower behind, so a node killed, paused
/// or cut off for a few seconds comes back by snapshot.
pub const RAFT_TOML: &str = "[raft]\nsnapshot_every = 1000\nsnapshot_log_percent = 10\n\
                             purge_keep = 100\npurge_keep_max = 2000\n";

/// What was written to one key.
#[derive(Clone, Default)]
struct Versions {
    /// The highest acknowledged version (0: none yet).
    acked: u64,
    /// Versions whose outcome is unknown.
    unknown: Vec<u64>,
    /// The last version invoked.
    last: u64,
}

impl Versions {
    /// Whether the key may end holding `version`: the last acknowledged
    /// one, or one whose outcome is unknown (it may have taken effect
    /// after later writes were acknowledged).
    fn admits(&self, version: u64) -> bool {
        version == self.acked || self.unknown.contains(&version)
    }
}

#[derive(Default)]
pub struct LargeState {
    /// How the cluster is reached (its CA and admin token).
    creds: Credentials,
    keys: Mutex<Vec<Versions>>,
    pub writes_acked: AtomicU64,
    pub writes_unknown: AtomicU64,
}

fn key(i: u64) -> String {
    format!("big-{i:05}")
}

/// The version a value written by [`value`] carries; `None` for anything
/// else.
fn version_of(v: &str) -> Option<u64> {
    let version = v.split(':').next()?.parse().ok()?;
    (value(version) == v).then_some(version)
}

/// `version:` padded to [`VALUE_BYTES`].
fn value(version: u64) -> String {
    let mut v = format!("{version}:");
    v.extend(std::iter::repeat_n(
        '.',
        VALUE_BYTES.saturating_sub(v.len()),
    ));
    v
}

impl LargeState {
    pub fn new(creds: Credentials) -> LargeState {
        LargeState {
            creds,
            keys: Mutex::new(vec![Versions::default(); KEYS as usize]),
            ..LargeState::default()
        }
    }

    /// Writes the next version of key `i` through `endpoint` and records
    /// the outcome.
    fn write(&self, http: &Http, endpoint: &str, i: u64) -> Outcome<()> {
        let version = {
            let mut keys = self.keys.lock().expect("lock");
            keys[i as usize].last += 1;
            keys[i as usize].last
        };
        let out = http.put(endpoint, &key(i), &value(version));
        let mut keys = self.keys.lock().expect("lock");
        let k = &mut keys[i as usize];
        match &out {
            Outcome::Ok(()) => {
                k.acked = k.acked.max(version);
                self.writes_acked.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Unknown(_) => {
                k.unknown.push(version);
                self.writes_unknown.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Fail(_) => {}
        }
        out
    }

    /// Loads every key once, before the faults start.
    pub fn load(&self, endpoint: &str) -> Result<()> {
        let started = Instant::now();
        let deadline = started + Duration::from_secs(120);
        std::thread::scope(|s| {
            let loaders: Vec<_> = (0..LOADERS)
                .map(|t| {
                    s.spawn(move || -> Result<()> {
                        let http = Http::secured(Duration::from_secs(5), self.creds.clone());
                        for i in (t..KEYS).step_by(LOADERS as usize) {
                            while !matches!(self.write(&http, endpoint, i), Outcome::Ok(())) {
                                if Instant::now() > deadline {
                                    bail!("loading the large state: key {} not written", key(i));
                                }
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                        Ok(())
                    })
                })
                .collect();
            loaders
                .into_iter()
                .try_for_each(|l| l.join().unwrap_or_else(|_| bail!("a loader panicked")))
        })?;
        println!(
            "chaos: large state: {KEYS} keys x {VALUE_BYTES} B loaded in {:.1}s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Writer `w`: overwrites random keys of its own on random members
    /// until `stop`.
    pub fn writer(
        &self,
        w: u64,
        seed: u64,
        endpoint: impl Fn(&mut Rng) -> String,
        stop: &AtomicBool,
    ) {
        let http = Http::secured(Duration::from_secs(2), self.creds.clone());
        let mut rng = Rng::new(seed ^ (w + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
        let mine = KEYS / WRITERS;
        while !stop.load(Ordering::SeqCst) {
            let i = w + WRITERS * rng.range(0, mine);
            let ep = endpoint(&mut rng);
            if !matches!(self.write(&http, &ep, i), Outcome::Ok(())) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Reads every key back through `endpoint`; how many were checked.
    pub fn check(&self, endpoint: &str, problems: &mut Vec<String>) -> usize {
        let http = Http::secured(Duration::from_secs(5), self.creds.clone());
        let keys = self.keys.lock().expect("lock").clone();
        let mut wrong = 0;
        for (i, k) in keys.iter().enumerate() {
            let read = super::retry(|| http.get(endpoint, &key(i as u64), false));
            let version = match &read {
                Outcome::Ok(Some(v)) => version_of(v),
                _ => None,
            };
            let fine = version.is_some_and(|v| k.admits(v));
            if !fine {
                wrong += 1;
                if wrong <= 10 {
                    let shown = match &read {
                        Outcome::Ok(Some(v)) => format!("{:.24}...", v),
                        Outcome::Ok(None) => "absent".into(),
                        Outcome::Fail(e) | Outcome::Unknown(e) => format!("a failed read ({e})"),
                    };
                    problems.push(format!(
                        "large state: {} reads back as {shown}; last acknowledged version {}, unknown {:?}",
                        key(i as u64),
                        k.acked,
                        k.unknown
                    ));
                }
            }
        }
        if wrong > 10 {
            problems.push(format!("large state: ... {wrong} keys wrong in all"));
        }
        keys.len()
    }
}

/// Snapshot transfers started and installed, summed over `endpoints` (each
/// node counts since its last start).
pub fn snapshot_counts(http: &Http, endpoints: &[String]) -> (u64, u64) {
    let (mut sent, mut installed) = (0, 0);
    for ep in endpoints {
        if let Outcome::Ok(a) = http.call("GET", &format!("{ep}/metrics"), None) {
            for line in String::from_utf8_lossy(&a.body).lines() {
                let n = || {
                    line.rsplit(' ')
                        .next()
                        .and_then(|n| n.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                if line.starts_with("raft_snapshots_sent_total ") {
                    sent += n();
                } else if line.starts_with("raft_snapshots_installed_total ") {
                    installed += n();
                }
            }
        }
    }
    (sent, installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_value_names_its_version_and_nothing_else_passes_for_one() {
        assert_eq!(version_of(&value(7)), Some(7));
        assert_eq!(value(7).len(), VALUE_BYTES);
        assert_eq!(version_of("7:"), None, "cut short");
        assert_eq!(version_of(&value(7).replacen('.', "x", 1)), None);
        assert_eq!(version_of(""), None);
    }

    #[test]
    fn a_key_ends_on_its_last_acknowledged_version_or_an_unknown_one() {
        let k = Versions {
            acked: 5,
            unknown: vec![3, 7],
            last: 8,
        };
        assert!(k.admits(5));
        assert!(k.admits(3), "an unknown write may land late");
        assert!(k.admits(7));
        assert!(!k.admits(4), "an older acknowledged version: a lost write");
        assert!(!k.admits(6), "a failed write");
        assert!(!k.admits(9), "never written");
    }
}
