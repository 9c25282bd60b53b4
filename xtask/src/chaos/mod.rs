//! `cargo xtask chaos`: a Jepsen-style run against real `raft-kv` processes.
//!
//! Client threads issue writes, linearizable reads and compare-and-sets on a
//! few keys (rotated every few seconds so each key's history stays small
//! enough to check exactly) plus write-once keys, while a nemesis injects
//! faults on a seeded schedule: `kill` (SIGKILL, then restart), `pause`
//! (SIGSTOP longer than an election timeout, then SIGCONT) and `partition`
//! (iptables rules inside a private network namespace: an isolated leader, a
//! majority/minority split, or a one-way cut) and `membership` (a new node
//! joins with `--join` and is promoted, or a voter, sometimes the leader, is
//! removed and its process stopped). Every operation is recorded
//! as invoked and then ok, failed (surely not applied) or unknown. After the
//! faults heal, each key is read once more and every acknowledged write-once
//! key must be readable; the history is checked for linearizability per key.
//! An HTML report (latency over time with the fault windows shaded, the op
//! and fault tables, the verdict) is written next to the cluster's logs.
//! With `--large-state` the run also carries a state many snapshots deep
//! (see [`large`]).

mod large;
mod session;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use raft_core::sim::Rng;
use raft_core::sim::linearizability::{self, OpKind, OpOutput, Operation};

use crate::cluster::LocalCluster;
use crate::http::{Credentials, Http, Outcome};

/// The faults a run may inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    Kill,
    Pause,
    Partition,
    Membership,
    Wipe,
}

impl Fault {
    fn parse(s: &str) -> Result<Fault> {
        Ok(match s {
            "kill" => Fault::Kill,
            "pause" => Fault::Pause,
            "partition" => Fault::Partition,
            "membership" => Fault::Membership,
            "wipe" => Fault::Wipe,
            other => bail!("unknown fault `{other}` (kill, pause, partition, membership, wipe)"),
        })
    }
}

#[derive(Clone)]
pub struct Options {
    pub nodes: u64,
    pub duration: Duration,
    pub faults: Vec<Fault>,
    pub seed: u64,
    pub clients: usize,
    /// Reads with `?consistency=stale`: deliberately not linearizable, to
    /// show that the checker catches what it should.
    pub stale_reads: bool,
    /// A state well above `snapshot_every` entries and snapshots every
    /// second or two ([`large`]).
    pub large_state: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            nodes: 5,
            duration: Duration::from_secs(60),
            faults: vec![Fault::Kill, Fault::Pause, Fault::Partition],
            seed: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(1),
            clients: 8,
            stale_reads: false,
            large_state: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--nodes" => o.nodes = value()?.parse().context("--nodes")?,
                "--duration" => o.duration = parse_duration(value()?)?,
                "--faults" => {
                    o.faults = value()?
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(Fault::parse)
                        .collect::<Result<_>>()?
                }
                "--seed" => o.seed = value()?.parse().context("--seed")?,
                "--clients" => o.clients = value()?.parse().context("--clients")?,
                "--stale-reads" => o.stale_reads = true,
                "--large-state" => o.large_state = true,
                other => bail!(
                    "unknown option `{other}`; usage: cargo xtask chaos [--nodes 5] [--duration 60s] \
                     [--faults kill,pause,partition] [--seed S] [--clients 8] [--stale-reads] \
                     [--large-state]"
                ),
            }
        }
        if !(3..=9).contains(&o.nodes) {
            bail!("--nodes must be 3..=9");
        }
        o.faults.sort();
        o.faults.dedup();
        Ok(o)
    }

    fn args(&self) -> Vec<String> {
        let faults: Vec<&str> = self
            .faults
            .iter()
            .map(|f| match f {
                Fault::Kill => "kill",
                Fault::Pause => "pause",
                Fault::Partition => "partition",
                Fault::Membership => "membership",
                Fault::Wipe => "wipe",
            })
            .collect();
        let mut args = vec![
            "--nodes".into(),
            self.nodes.to_string(),
            "--duration".into(),
            format!("{}ms", self.duration.as_millis()),
            "--faults".into(),
            faults.join(","),
            "--seed".into(),
            self.seed.to_string(),
            "--clients".into(),
            self.clients.to_string(),
        ];
        if self.stale_reads {
            args.push("--stale-reads".into());
        }
        if self.large_state {
            args.push("--large-state".into());
        }
        args
    }
}

/// `60s`, `500ms`, `2m` or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n.parse().with_context(|| format!("bad duration `{s}`"))?;
    Ok(match unit {
        "" | "s" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        "m" => Duration::from_secs(60 * n),
        _ => bail!("bad duration unit in `{s}` (ms, s, m)"),
    })
}

const NETNS_ENV: &str = "RAFT_CHAOS_NETNS";

/// Runs the chaos test; partitions need root, so without it they are
/// skipped with an explanation, and with it the whole run moves into a
/// private network namespace so the firewall rules touch nothing else.
pub fn run(root: &Path, mut opts: Options) -> Result<()> {
    if opts.faults.contains(&Fault::Partition) && std::env::var_os(NETNS_ENV).is_none() {
        match partition_support() {
            Ok(()) => {
                let exe = std::env::current_exe()?;
                let st = Command::new("unshare")
                    .arg("--net")
                    .arg("--")
                    .arg(exe)
                    .arg("chaos")
                    .args(opts.args())
                    .env(NETNS_ENV, "1")
                    .current_dir(root)
                    .status()
                    .context("running unshare")?;
                if !st.success() {
                    bail!("chaos run failed ({st})");
                }
                return Ok(());
            }
            Err(why) => {
                println!("chaos: skipping the partition fault: {why}");
                opts.faults.retain(|f| *f != Fault::Partition);
            }
        }
    }
    if std::env::var_os(NETNS_ENV).is_some() {
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()?;
        if !st.success() {
            bail!("bringing up lo in the chaos network namespace failed");
        }
    }
    Chaos::new(root, opts)?.run()
}

/// Why partitions cannot be injected here, if they cannot.
fn partition_support() -> Result<(), String> {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false);
    if !root {
        return Err(
            "network partitions need root (a private network namespace and iptables rules); \
                    run as root to include them"
                .into(),
        );
    }
    if crate::find_tool("iptables").is_none() {
        return Err("iptables is not installed (apt-get install -y iptables, or `cargo xtask doctor --install`)".into());
    }
    let probe = Command::new("unshare")
        .args(["--net", "--", "true"])
        .status();
    if !matches!(probe, Ok(s) if s.success()) {
        return Err("cannot create a network namespace here (unshare --net failed)".into());
    }
    Ok(())
}

#[derive(Clone, Debug)]
struct Record {
    key: String,
    kind: OpKind,
    /// Nanoseconds since the start of the run.
    invoke: u64,
    done: u64,
    status: OpStatus,
    /// Set when `status` is `Ok`.
    output: Option<OpOutput>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum OpStatus {
    Ok,
    /// Surely not applied.
    Fail,
    /// Maybe applied.
    Unknown,
}

struct Window {
    start: f64,
    end: f64,
    label: String,
}

struct Verdict {
    problems: Vec<String>,
    durable_checked: usize,
    /// What the clients' retries came to, for the report.
    retries: String,
    /// `--large-state` keys read back and found as written.
    large_checked: usize,
}

struct Chaos {
    opts: Options,
    /// The nemesis kills and restarts nodes through it; clients only use
    /// `endpoints`.
    cluster: Mutex<LocalCluster>,
    /// The members' HTTP endpoints (changes with the membership fault).
    endpoints: Mutex<Vec<String>>,
    /// The id the next joining node gets.
    next_id: std::sync::atomic::AtomicU64,
    start: Instant,
    history: Mutex<Vec<Record>>,
    /// Write-once keys acknowledged as written.
    durable: Mutex<Vec<(String, String)>>,
    windows: Mutex<Vec<Window>>,
    stop: AtomicBool,
    /// `--large-state`: the keys its writers overwrite.
    large: Option<large::LargeState>,
    /// How the cluster is reached (its CA and admin token).
    creds: Credentials,
    /// Unknown outcomes before and after the clients' retries.
    session_counts: session::Counts,
    /// Increments of [`COUNTER`] acknowledged (CAS succeeded).
    increments: std::sync::atomic::AtomicU64,
    /// When the clients were told to stop: retries of unknown writes go on
    /// for [`SETTLE`] after it.
    stopped_at: Mutex<Option<Instant>>,
}

/// The key clients increment (read, then CAS to the next number, retried
/// until definite): its final value must equal the increments
/// acknowledged, which a write applied twice or lost would break.
const COUNTER: &str = "counter";
/// How long a client keeps retrying an unknown write after the run ends.
const SETTLE: Duration = Duration::from_secs(30);

/// How long one generation of keys lives.
const KEY_GENERATION: Duration = Duration::from_secs(3);
const KEYS_PER_GENERATION: u64 = 3;
/// Search states allowed per key by the linearizability checker.
const CHECK_BUDGET: usize = 5_000_000;

impl Chaos {
    /// An HTTP client of the cluster whose requests may take `timeout`.
    fn http(&self, timeout: Duration) -> Http {
        Http::secured(timeout, self.creds.clone())
    }

    fn new(root: &Path, opts: Options) -> Result<Chaos> {
        let dir = root.join("target").join("xtask").join("chaos");
        let extra = if opts.large_state {
            large::RAFT_TOML
        } else {
            ""
        };
        let cluster = LocalCluster::create(root, dir, opts.nodes, 7200, extra)?;
        let creds = cluster.credentials()?;
        let endpoints = cluster
            .ids()
            .iter()
            .map(|id| cluster.endpoint(*id))
            .collect();
        Ok(Chaos {
            next_id: std::sync::atomic::AtomicU64::new(opts.nodes + 1),
            large: opts
                .large_state
                .then(|| large::LargeState::new(creds.clone())),
            creds,
            opts,
            cluster: Mutex::new(cluster),
            endpoints: Mutex::new(endpoints),
            start: Instant::now(),
            history: Mutex::new(Vec::new()),
            durable: Mutex::new(Vec::new()),
            windows: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            session_counts: session::Counts::default(),
            increments: std::sync::atomic::AtomicU64::new(0),
            stopped_at: Mutex::new(None),
        })
    }

    fn cluster(&self) -> std::sync::MutexGuard<'_, LocalCluster> {
        self.cluster.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The status of a node that says it leads, if one answers.
    fn leader_status(&self) -> Option<crate::http::Status> {
        self.cluster()
            .statuses()
            .into_values()
            .flatten()
            .find(|s| s.role == "leader")
    }

    fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn run(mut self) -> Result<()> {
        let o = &self.opts;
        println!(
            "chaos: {} nodes, {} clients, {:?}, faults {:?}, seed {} (replay: cargo xtask chaos {})",
            o.nodes,
            o.clients,
            o.duration,
            o.faults,
            o.seed,
            o.args().join(" ")
        );
        let leader = {
            let mut c = self.cluster();
            c.start_all()?;
            c.endpoint(c.wait_leader(&c.ids(), Duration::from_secs(20))?)
        };
        if let Some(large) = &self.large {
            large.load(&leader)?;
        }
        self.start = Instant::now();

        let outcome = std::thread::scope(|s| -> Result<()> {
            let me = &self;
            let mut clients: Vec<_> = (0..me.opts.clients)
                .map(|c| s.spawn(move || me.client(c)))
                .collect();
            if let Some(large) = &me.large {
                clients.extend((0..large::WRITERS).map(|w| {
                    s.spawn(move || large.writer(w, me.opts.seed, |rng| me.endpoint(rng), &me.stop))
                }));
            }
            let result = s
                .spawn(move || me.nemesis())
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("nemesis panicked")));
            *me.stopped_at.lock().expect("lock") = Some(Instant::now());
            me.stop.store(true, Ordering::SeqCst);
            for c in clients {
                let _ = c.join();
            }
            result
        });
        // Heal whatever the nemesis left (also after an error) before judging.
        let healed = self.heal_all();
        outcome?;
        healed?;
        {
            let c = self.cluster();
            c.wait_leader(&c.ids(), Duration::from_secs(30))
                .context("no leader after the faults healed")?;
        }
        let verdict = self.check();
        let report = self.report(&verdict)?;
        if let Some(large) = &self.large {
            let (sent, installed) = large::snapshot_counts(
                &self.http(Duration::from_secs(3)),
                &self.endpoints.lock().expect("lock"),
            );
            println!(
                "chaos: large state: {} overwrites acknowledged, {} unknown; snapshot transfers \
                 started {sent}, installed {installed} (counted since each node's last start)",
                large.writes_acked.load(Ordering::Relaxed),
                large.writes_unknown.load(Ordering::Relaxed),
            );
        }
        self.cluster().stop_all()?;
        println!("chaos: report: {}", report.display());
        if verdict.problems.is_empty() {
            println!(
                "chaos: PASS: history linearizable, all {} acknowledged write-once keys readable, \
                 counter matches its acknowledged increments{}",
                verdict.durable_checked,
                if self.large.is_some() {
                    format!(
                        ", all {} large-state keys hold an acknowledged or unknown-outcome version",
                        verdict.large_checked
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        } else {
            bail!(
                "chaos: FAIL (replay: cargo xtask chaos {}):\n  {}",
                self.opts.args().join(" "),
                verdict.problems.join("\n  ")
            )
        }
    }

    /// One client: random operations on random nodes until told to stop.
    /// Writes go in the client's session and are retried until definite.
    fn client(&self, id: usize) {
        let http = self.http(Duration::from_secs(2));
        let mut rng =
            Rng::new(self.opts.seed ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let endpoint = |rng: &mut Rng| self.endpoint(rng);
        let stopping = || self.stop.load(Ordering::SeqCst);
        let Some(mut sess) = session::Session::open(&http, &mut rng, endpoint, stopping) else {
            return;
        };
        let mut last_seen: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut seq = 0u64;
        while !self.stop.load(Ordering::SeqCst) {
            seq += 1;
            let ep = &self.endpoint(&mut rng);
            let generation = self.start.elapsed().as_millis() / KEY_GENERATION.as_millis();
            let key = format!("g{generation}-k{}", rng.range(0, KEYS_PER_GENERATION));
            let value = format!("c{id}-{seq}");
            match rng.range(0, 100) {
                0..10 => {
                    let key = format!("once-c{id}-{seq}");
                    let put = OpKind::Put(value.clone());
                    let (out, _) = self.write(&http, &mut rng, &mut sess, &key, put);
                    if out == OpStatus::Ok {
                        self.durable.lock().expect("lock").push((key, value));
                    }
                }
                10..40 => {
                    self.write(&http, &mut rng, &mut sess, &key, OpKind::Put(value.clone()));
                }
                40..75 => {
                    let mut seen = None;
                    self.op(&key, OpKind::Get, || {
                        http.get(ep, &key, self.opts.stale_reads).map(|v| {
                            seen = Some(v.clone());
                            OpOutput::Get(v)
                        })
                    });
                    if let Some(v) = seen {
                        last_seen.insert(key, v);
                    }
                }
                75..90 => {
                    let expected = last_seen.get(&key).cloned().flatten();
                    let kind = OpKind::Cas {
                        expected,
                        new: Some(value.clone()),
                    };
                    self.write(&http, &mut rng, &mut sess, &key, kind);
                }
                _ => self.increment(&http, &mut rng, &mut sess, ep),
            }
        }
    }

    /// Reads [`COUNTER`] and swaps in the next number, in the session.
    fn increment(&self, http: &Http, rng: &mut Rng, sess: &mut session::Session, ep: &str) {
        let mut seen = None;
        self.op(COUNTER, OpKind::Get, || {
            http.get(ep, COUNTER, false).map(|v| {
                seen = Some(v.clone());
                OpOutput::Get(v)
            })
        });
        let Some(current) = seen else { return };
        let next = current
            .as_deref()
            .map_or(Some(1), |v| v.parse::<u64>().ok().map(|n| n + 1));
        let Some(next) = next else { return };
        let kind = OpKind::Cas {
            expected: current,
            new: Some(next.to_string()),
        };
        let (status, output) = self.write(http, rng, sess, COUNTER, kind);
        if status == OpStatus::Ok
            && matches!(
                output,
                Some(OpOutput::Cas {
                    succeeded: true,
                    ..
                })
            )
        {
            self.increments.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A write (`Put` or `Cas`) in the session, retried until definite,
    /// recorded as one operation; its status and, if ok, its output.
    fn write(
        &self,
        http: &Http,
        rng: &mut Rng,
        sess: &mut session::Session,
        key: &str,
        kind: OpKind,
    ) -> (OpStatus, Option<OpOutput>) {
        let (method, path, body) = match &kind {
            OpKind::Put(v) => ("PUT", format!("/v1/kv/{key}"), v.clone().into_bytes()),
            OpKind::Cas { expected, new } => (
                "POST",
                format!("/v1/cas/{key}"),
                serde_json::json!({ "expected": expected, "new": new })
                    .to_string()
                    .into_bytes(),
            ),
            OpKind::Get | OpKind::Delete => unreachable!("clients write only puts and CASes"),
        };
        let headers = sess.next();
        let deadline = || self.stopped_at.lock().expect("lock").map(|t| t + SETTLE);
        let counts = &self.session_counts;
        let mut output = None;
        let status = self.op(key, kind, || {
            let out = session::until_definite(
                rng,
                |r| self.endpoint(r),
                deadline,
                counts,
                |ep| {
                    session::try_write(
                        http,
                        method,
                        &format!("{ep}{path}"),
                        &body,
                        &headers,
                        counts,
                    )
                },
            );
            if let Outcome::Ok(o) = &out {
                output = Some(o.clone());
            }
            out
        });
        (status, output)
    }

    /// A random member's endpoint.
    fn endpoint(&self, rng: &mut Rng) -> String {
        let eps = self.endpoints.lock().expect("lock");
        eps[rng.range(0, eps.len() as u64) as usize].clone()
    }

    /// Runs one operation and records it.
    fn op(&self, key: &str, kind: OpKind, call: impl FnOnce() -> Outcome<OpOutput>) -> OpStatus {
        let invoke = self.now();
        let (status, output) = match call() {
            Outcome::Ok(o) => (OpStatus::Ok, Some(o)),
            Outcome::Fail(_) => (OpStatus::Fail, None),
            Outcome::Unknown(_) => (OpStatus::Unknown, None),
        };
        self.history.lock().expect("lock").push(Record {
            key: key.to_string(),
            kind,
            invoke,
            done: self.now(),
            status,
            output,
        });
        status
    }

    /// Injects faults on a seeded schedule until the run's time is up.
    fn nemesis(&self) -> Result<()> {
        let mut rng = Rng::new(self.opts.seed);
        let end = self.opts.duration;
        loop {
            let quiet = Duration::from_millis(rng.range(1000, 2500));
            let hold = Duration::from_millis(rng.range(1000, 3500));
            if self.opts.faults.is_empty() || self.start.elapsed() + quiet + hold > end {
                sleep(end.saturating_sub(self.start.elapsed()));
                return Ok(());
            }
            sleep(quiet);
            let fault = self.opts.faults[rng.range(0, self.opts.faults.len() as u64) as usize];
            let ids = self.cluster().ids();
            let leader = self.leader_status().map(|s| s.id);
            let victim = match leader {
                Some(l) if rng.chance(0.5) => l,
                _ => ids[rng.range(0, ids.len() as u64) as usize],
            };
            let began = self.start.elapsed().as_secs_f64();
            let label = match fault {
                Fault::Kill => {
                    self.cluster().kill(victim)?;
                    sleep(hold);
                    self.cluster().start(victim)?;
                    format!("kill -9 node {victim}")
                }
                Fault::Pause => {
                    self.cluster().pause(victim)?;
                    sleep(hold);
                    self.cluster().resume(victim)?;
                    format!("pause node {victim}")
                }
                Fault::Membership => self.change_membership(&mut rng, victim)?,
                Fault::Wipe => self.wipe(&mut rng, victim)?,
                Fault::Partition => {
                    let (label, cuts) = self.partition_plan(&mut rng, leader.unwrap_or(victim));
                    for (from, to) in cuts {
                        self.cut(from, to)?;
                    }
                    sleep(hold);
                    firewall(&["-F", "OUTPUT"])?;
                    label
                }
            };
            let took = self.start.elapsed().as_secs_f64() - began;
            println!("chaos: {began:>6.1}s  {label} ({took:.1}s)");
            self.windows.lock().expect("lock").push(Window {
                start: began,
                end: self.start.elapsed().as_secs_f64(),
                label,
            });
        }
    }

    /// Grows the voters by one new node (joined as a learner, then
    /// promoted) or, above 3 voters, shrinks them by `victim` (removed,
    /// then its process stopped). Outcomes that are not clean successes
    /// are reported in the label; the cluster stays whatever it became.
    fn change_membership(&self, rng: &mut Rng, victim: u64) -> Result<String> {
        let http = self.http(Duration::from_secs(40));
        let ep = self.endpoint(rng);
        let voters = self.leader_status().map(|s| s.voters).unwrap_or_default();
        let shrink =
            voters.len() > self.opts.nodes as usize || (voters.len() > 3 && rng.chance(0.5));
        if shrink && voters.contains(&victim) {
            return Ok(
                match http.call("DELETE", &format!("{ep}/v1/members/{victim}"), None) {
                    Outcome::Ok(a) if a.status == 200 => {
                        let gone = self.cluster().endpoint(victim);
                        self.endpoints.lock().expect("lock").retain(|e| *e != gone);
                        self.cluster().forget(victim)?;
                        format!("remove node {victim}")
                    }
                    other => format!("remove node {victim}: not done ({})", describe(&other)),
                },
            );
        }
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        {
            let mut c = self.cluster();
            c.add_spare(id)?;
            c.start_joining(id, &ep)?;
        }
        let new_ep = self.cluster().endpoint(id);
        // `serve --join` answers on HTTP once it has been added.
        let added = retry_for(Duration::from_secs(30), || match http.status(&new_ep) {
            Ok(s) if s.role == "learner" => Outcome::Ok(()),
            Ok(s) => Outcome::Fail(s.role),
            Err(e) => Outcome::Fail(e.to_string()),
        });
        if added != Outcome::Ok(()) {
            // Never restart it without --join: it would bootstrap a cluster
            // of its own file's members.
            self.cluster().forget(id)?;
            return Ok(format!("add node {id}: not joined ({added:?})"));
        }
        Ok(
            match http.call(
                "POST",
                &format!("{ep}/v1/members/{id}/promote"),
                Some(&[][..]),
            ) {
                Outcome::Ok(a) if a.status == 200 => {
                    self.endpoints.lock().expect("lock").push(new_ep);
                    format!("add node {id} (join, promote)")
                }
                other => format!(
                    "add node {id}: joined, promotion not done ({})",
                    describe(&other)
                ),
            },
        )
    }

    /// Kills a voter from the cluster file (`victim` if it is one),
    /// deletes its data directory and starts it again: it rebuilds the
    /// file's first configuration, as a new node would, and comes back
    /// under its old id with a new identity. It must then say it is not
    /// recognized; the operator's path follows: remove it, add it back,
    /// promote it. Outcomes that are not clean successes are reported in
    /// the label.
    fn wipe(&self, rng: &mut Rng, victim: u64) -> Result<String> {
        let http = self.http(Duration::from_secs(40));
        let voters = self.leader_status().map(|s| s.voters).unwrap_or_default();
        let own = |id: &u64| *id <= self.opts.nodes && voters.contains(id);
        let victim = match voters.iter().copied().find(|_| own(&victim)) {
            Some(_) => victim,
            None => match voters.iter().copied().find(own) {
                Some(v) => v,
                None => return Ok("wipe: no voter from the cluster file to wipe".into()),
            },
        };
        let (node_ep, raft_addr, http_addr) = {
            let mut c = self.cluster();
            c.kill(victim)?;
            let dir = c.data_dir(victim);
            std::fs::remove_dir_all(&dir).with_context(|| format!("wiping {}", dir.display()))?;
            c.start(victim)?;
            let n = &c.nodes[&victim];
            (
                c.endpoint(victim),
                format!("127.0.0.1:{}", n.raft_port),
                format!("127.0.0.1:{}", n.http_port),
            )
        };
        let refused = retry_for(Duration::from_secs(30), || match http.status(&node_ep) {
            Ok(s) if !s.recognized => Outcome::Ok(()),
            Ok(s) => Outcome::Fail(format!("still recognized as a {}", s.role)),
            Err(e) => Outcome::Fail(e.to_string()),
        });
        if let Outcome::Fail(why) | Outcome::Unknown(why) = &refused {
            return Ok(format!(
                "wipe node {victim}: never reported itself unrecognized ({why})"
            ));
        }
        let ep = self.endpoint(rng);
        let step = |what: &str, method: &str, path: String, body: Option<&[u8]>| match retry_for(
            Duration::from_secs(20),
            || match http.call(method, &format!("{ep}{path}"), body) {
                Outcome::Ok(a) if a.status == 200 => Outcome::Ok(()),
                other => Outcome::Fail(format!("{what}: {}", describe(&other))),
            },
        ) {
            Outcome::Ok(()) => None,
            Outcome::Fail(e) | Outcome::Unknown(e) => Some(e),
        };
        let member = format!(
            r#"{{"id": {victim}, "raft_addr": "{raft_addr}", "http_addr": "{http_addr}"}}"#
        );
        let failed = step("remove", "DELETE", format!("/v1/members/{victim}"), None)
            .or_else(|| {
                step(
                    "add back",
                    "POST",
                    "/v1/members".into(),
                    Some(member.as_bytes()),
                )
            })
            .or_else(|| {
                step(
                    "promote",
                    "POST",
                    format!("/v1/members/{victim}/promote"),
                    Some(&[][..]),
                )
            });
        Ok(match failed {
            None => format!("wipe node {victim} (unrecognized; removed, added back, promoted)"),
            Some(e) => format!("wipe node {victim}: unrecognized; re-adding not done ({e})"),
        })
    }

    /// Which directed links to cut: an isolated leader, a random
    /// majority/minority split, or the leader deaf to everyone (one-way).
    fn partition_plan(&self, rng: &mut Rng, leader: u64) -> (String, Vec<(u64, u64)>) {
        let ids = self.cluster().ids();
        let both = |a: &[u64], b: &[u64]| {
            let mut cuts = Vec::new();
            for x in a {
                for y in b {
                    cuts.push((*x, *y));
                    cuts.push((*y, *x));
                }
            }
            cuts
        };
        let others: Vec<u64> = ids.iter().copied().filter(|id| *id != leader).collect();
        match rng.range(0, 3) {
            0 => (format!("isolate leader {leader}"), both(&[leader], &others)),
            1 => {
                let mut shuffled = ids.clone();
                for i in (1..shuffled.len()).rev() {
                    shuffled.swap(i, rng.range(0, i as u64 + 1) as usize);
                }
                let (minority, majority) = shuffled.split_at((ids.len() - 1) / 2);
                (
                    format!("partition {minority:?} | {majority:?}"),
                    both(minority, majority),
                )
            }
            _ => (
                format!("one-way: leader {leader} hears no one"),
                others.iter().map(|o| (*o, leader)).collect(),
            ),
        }
    }

    /// Drops every QUIC packet from node `from` to node `to`.
    fn cut(&self, from: u64, to: u64) -> Result<()> {
        let (sport, dport) = {
            let c = self.cluster();
            (c.nodes[&from].raft_port, c.nodes[&to].raft_port)
        };
        firewall(&[
            "-A",
            "OUTPUT",
            "-p",
            "udp",
            "--sport",
            &sport.to_string(),
            "--dport",
            &dport.to_string(),
            "-j",
            "DROP",
        ])
    }

    fn heal_all(&self) -> Result<()> {
        if self.opts.faults.contains(&Fault::Partition) {
            firewall(&["-F", "OUTPUT"])?;
        }
        let mut c = self.cluster();
        for id in c.ids() {
            if c.is_running(id) {
                let _ = c.resume(id);
            } else {
                c.start(id)?;
            }
        }
        Ok(())
    }

    /// Final reads, then the checks: linearizability per key and every
    /// acknowledged write-once key present.
    fn check(&self) -> Verdict {
        let http = self.http(Duration::from_secs(5));
        let mut problems = Vec::new();
        let keys: std::collections::BTreeSet<String> = self
            .history
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.key.starts_with('g'))
            .map(|r| r.key.clone())
            .collect();
        let ep = &self.endpoints.lock().expect("lock")[0].clone();
        for key in &keys {
            let out = self.op(key, OpKind::Get, || {
                retry(|| http.get(ep, key, false)).map(OpOutput::Get)
            });
            if out != OpStatus::Ok {
                problems.push(format!("final read of {key} failed after healing"));
            }
        }
        let durable = self.durable.lock().expect("lock").clone();
        let mut lost = 0;
        for (key, value) in &durable {
            match retry(|| http.get(ep, key, false)) {
                Outcome::Ok(Some(v)) if v == *value => {}
                other => {
                    lost += 1;
                    if lost <= 10 {
                        problems.push(format!(
                            "acknowledged write {key}={value} reads back as {other:?}"
                        ));
                    }
                }
            }
        }
        if lost > 10 {
            problems.push(format!("... {lost} acknowledged writes lost in all"));
        }
        let counter = self.check_counter(&http, ep, &mut problems);
        let large_checked = self
            .large
            .as_ref()
            .map_or(0, |large| large.check(ep, &mut problems));
        let ops: Vec<Operation> = self
            .history
            .lock()
            .expect("lock")
            .iter()
            // The counter is judged by its exact count: its one key holds
            // too many concurrent operations for the search.
            .filter(|r| r.status != OpStatus::Fail && r.key != COUNTER)
            .map(|r| Operation {
                key: r.key.clone(),
                kind: r.kind.clone(),
                invoke: r.invoke,
                complete: r.output.clone().map(|o| (r.done, o)),
            })
            .collect();
        if let Err(v) = linearizability::check(&ops, CHECK_BUDGET) {
            problems.push(format!(
                "not linearizable: key {} ({} ops): {}",
                v.key, v.ops, v.detail
            ));
        }
        let c = &self.session_counts;
        let retries = format!(
            "unknown outcomes: {} tries before retries, {} writes after retries \
             ({} retries answered from the session); counter: {counter} after {} \
             acknowledged increments",
            c.unknown_tries.load(Ordering::Relaxed),
            c.unknown_after_retries.load(Ordering::Relaxed),
            c.replayed.load(Ordering::Relaxed),
            self.increments.load(Ordering::Relaxed),
        );
        Verdict {
            problems,
            durable_checked: durable.len(),
            large_checked,
            retries,
        }
    }

    /// The counter's final value against the increments acknowledged: equal
    /// when no increment stayed unknown, else at most that many more.
    fn check_counter(&self, http: &Http, ep: &str, problems: &mut Vec<String>) -> u64 {
        let acked = self.increments.load(Ordering::Relaxed);
        let unknown = self
            .history
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.key == COUNTER && r.status == OpStatus::Unknown)
            .count() as u64;
        let value = match retry(|| http.get(ep, COUNTER, false)) {
            Outcome::Ok(v) => v.map_or(Some(0), |v| v.parse::<u64>().ok()),
            other => {
                problems.push(format!("final read of the counter failed: {other:?}"));
                return 0;
            }
        };
        match value {
            Some(n) if (acked..=acked + unknown).contains(&n) => {}
            Some(n) => problems.push(format!(
                "counter is {n}, but {acked} increments were acknowledged ({unknown} unknown)"
            )),
            None => problems.push("counter holds a non-number".into()),
        }
        value.unwrap_or(0)
    }

    fn report(&self, verdict: &Verdict) -> Result<PathBuf> {
        let history = self.history.lock().expect("lock");
        let windows = self.windows.lock().expect("lock");
        let path = self.cluster().dir.join("report.html");
        std::fs::write(
            &path,
            render_report(&self.opts, &history, &windows, verdict),
        )?;
        let mut counts: BTreeMap<(&str, OpStatus), usize> = BTreeMap::new();
        for r in history.iter() {
            *counts.entry((kind_name(&r.kind), r.status)).or_default() += 1;
        }
        println!(
            "chaos: {} operations, {} faults",
            history.len(),
            windows.len()
        );
        for kind in ["put", "get", "cas"] {
            let n = |s| counts.get(&(kind, s)).copied().unwrap_or(0);
            println!(
                "chaos:   {kind:<4} ok {:>6}  fail {:>5}  unknown {:>4}",
                n(OpStatus::Ok),
                n(OpStatus::Fail),
                n(OpStatus::Unknown)
            );
        }
        println!("chaos: {}", verdict.retries);
        Ok(path)
    }
}

/// Retries a final read for a few seconds (a node may still be electing).
fn retry<T>(f: impl FnMut() -> Outcome<T>) -> Outcome<T> {
    retry_for(Duration::from_secs(15), f)
}

fn retry_for<T>(limit: Duration, mut f: impl FnMut() -> Outcome<T>) -> Outcome<T> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Outcome::Ok(v) => return Outcome::Ok(v),
            other if Instant::now() > deadline => return other,
            _ => sleep(Duration::from_millis(100)),
        }
    }
}

fn describe(o: &Outcome<crate::http::Answer>) -> String {
    match o {
        Outcome::Ok(a) => format!("HTTP {}: {}", a.status, String::from_utf8_lossy(&a.body)),
        Outcome::Fail(e) => format!("failed: {e}"),
        Outcome::Unknown(e) => format!("unknown: {e}"),
    }
}

fn firewall(args: &[&str]) -> Result<()> {
    let iptables = crate::find_tool("iptables").context("iptables not found")?;
    let out = Command::new(iptables).args(args).output()?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn kind_name(k: &OpKind) -> &'static str {
    match k {
        OpKind::Put(_) | OpKind::Delete => "put",
        OpKind::Get => "get",
        OpKind::Cas { .. } => "cas",
    }
}

/// The HTML report: verdict, latency over time with fault windows shaded
/// (an inline SVG), and the op and fault tables.
fn render_report(
    opts: &Options,
    history: &[Record],
    windows: &[Window],
    verdict: &Verdict,
) -> String {
    let (w, h, left, bottom) = (1000.0, 360.0, 60.0, 30.0);
    let span = history
        .iter()
        .map(|r| r.done as f64 / 1e9)
        .fold(opts.duration.as_secs_f64(), f64::max)
        .max(1.0);
    let x = |t: f64| left + t / span * (w - left - 10.0);
    // Latency on a log scale from 0.1 ms to 10 s.
    let y = |ms: f64| {
        let l = ms.clamp(0.1, 10_000.0).log10(); // -1 ..= 4
        10.0 + (4.0 - l) / 5.0 * (h - bottom - 10.0)
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    for (i, win) in windows.iter().enumerate() {
        // Labels on four staggered rows so neighbours do not overprint.
        let _ = write!(
            svg,
            r##"<rect x="{:.1}" y="10" width="{:.1}" height="{:.1}" fill="#f4b183" opacity="0.35"><title>{}</title></rect><text x="{:.1}" y="{}" fill="#a04000">{}</text>"##,
            x(win.start),
            (x(win.end) - x(win.start)).max(1.0),
            h - bottom - 10.0,
            html(&win.label),
            x(win.start) + 2.0,
            22 + 12 * (i % 4),
            html(&win.label)
        );
    }
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0] {
        let _ = write!(
            svg,
            r##"<line x1="{left}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="4" y="{:.1}">{ms} ms</text>"##,
            w - 10.0,
            y(ms) + 4.0,
            y = y(ms)
        );
    }
    for t in (0..=span as u64).step_by(((span as u64) / 10).max(1) as usize) {
        let _ = write!(
            svg,
            r#"<text x="{:.1}" y="{}">{t}s</text>"#,
            x(t as f64) - 6.0,
            h - 10.0
        );
    }
    // One dot per operation would make a run of 400k operations a 20 MB
    // page; per pixel column and colour, the fastest, median and slowest
    // operation keep the shape of the latency distribution.
    let mut columns: BTreeMap<(i64, &str), Vec<f64>> = BTreeMap::new();
    for r in history {
        let color = match r.status {
            OpStatus::Ok => match kind_name(&r.kind) {
                "put" => "#1f77b4",
                "get" => "#2ca02c",
                _ => "#9467bd",
            },
            OpStatus::Fail => "#d62728",
            OpStatus::Unknown => "#ff7f0e",
        };
        let column = x(r.invoke as f64 / 1e9).round() as i64;
        let ms = (r.done.saturating_sub(r.invoke)) as f64 / 1e6;
        columns.entry((column, color)).or_default().push(ms);
    }
    for ((column, color), mut lat) in columns {
        lat.sort_by(f64::total_cmp);
        let mut picks = vec![lat[0], lat[lat.len() / 2], lat[lat.len() - 1]];
        picks.dedup();
        for ms in picks {
            let _ = write!(
                svg,
                r#"<circle cx="{column}" cy="{:.1}" r="1.2" fill="{color}"/>"#,
                y(ms)
            );
        }
    }
    svg.push_str("</svg>");

    let mut counts: BTreeMap<(&str, OpStatus), usize> = BTreeMap::new();
    for r in history {
        *counts.entry((kind_name(&r.kind), r.status)).or_default() += 1;
    }
    let mut ops =
        String::from("<table><tr><th>op</th><th>ok</th><th>fail</th><th>unknown</th></tr>");
    for kind in ["put", "get", "cas"] {
        let n = |s| counts.get(&(kind, s)).copied().unwrap_or(0);
        let _ = write!(
            ops,
            "<tr><td>{kind}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            n(OpStatus::Ok),
            n(OpStatus::Fail),
            n(OpStatus::Unknown)
        );
    }
    ops.push_str("</table>");
    let _ = write!(
        ops,
        "<p>Writes are made in client sessions and retried until definite; {}.</p>",
        html(&verdict.retries)
    );
    let mut faults = String::from("<table><tr><th>from</th><th>to</th><th>fault</th></tr>");
    for win in windows {
        let _ = write!(
            faults,
            "<tr><td>{:.1}s</td><td>{:.1}s</td><td>{}</td></tr>",
            win.start,
            win.end,
            html(&win.label)
        );
    }
    faults.push_str("</table>");
    let verdict_html = if verdict.problems.is_empty() {
        format!(
            r#"<p class="pass">PASS: the history is linearizable and all {} acknowledged write-once keys are readable.</p>"#,
            verdict.durable_checked
        )
    } else {
        let items: String = verdict
            .problems
            .iter()
            .map(|p| format!("<li>{}</li>", html(p)))
            .collect();
        format!(r#"<p class="fail">FAIL</p><ul>{items}</ul>"#)
    };
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>raft-kv chaos report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 10px;text-align:right}}.pass{{color:#1a7f37;font-weight:bold}}.fail{{color:#c00;font-weight:bold}}</style></head><body>
<h1>raft-kv chaos run</h1>
<p>{} nodes, {} clients, {:.0} s, faults {:?}, seed {}. Replay: <code>cargo xtask chaos {}</code></p>
{verdict_html}
<h2>Latency over time</h2><p>Each dot is one operation (blue put, green linearizable get, purple CAS, red failed, orange unknown); shaded: fault windows.</p>
{svg}
<h2>Operations</h2>{ops}
<h2>Faults</h2>{faults}
</body></html>
"#,
        opts.nodes,
        opts.clients,
        opts.duration.as_secs_f64(),
        opts.faults,
        opts.seed,
        html(&opts.args().join(" "))
    )
}

fn html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
