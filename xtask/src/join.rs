//! `cargo xtask bench join`: a node joins a loaded cluster under write load
//! (issue 13's run). Three nodes are loaded with `--keys` keys of
//! `--value-bytes` bytes, `--clients` writers then overwrite random keys for
//! `--phase` before a fourth node joins (`serve --join`, then promote), for
//! at least `--phase` after, and for one more `--phase` once it is
//! promoted; the report compares committed writes/s before the join,
//! during it, from it to the promotion, and after it with four voters
//! (what a fourth replica costs by itself, so what the join costs beyond
//! that shows), and counts elections, snapshot transfers, installs and
//! peak memory per node. The rate the snapshot moved at is
//! set next to the machine's raw rates measured in the same run, before the
//! load: a sequential write to the bench's disk, and loopback QUIC in the
//! transfer's shape (the transport bench's `RPC_BENCH=chunks` cell).
//!
//! Writers are keep-alive connections to the first leader, all driven from
//! one thread (`load.rs`); a redirect counts as a failed write, as a leader
//! change already fails the run.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::chaos::parse_duration;
use crate::cluster::LocalCluster;
use crate::http::{Http, Outcome};
use crate::load;

pub struct Options {
    keys: u64,
    value_bytes: usize,
    load_clients: usize,
    clients: usize,
    phase: Duration,
    /// Lines for the cluster file's `[raft]` table (`--raft 'key = value'`).
    raft: Vec<String>,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            keys: 300_000,
            value_bytes: 1024,
            load_clients: 128,
            clients: 256,
            phase: Duration::from_secs(20),
            raft: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--keys" => o.keys = value()?.parse().context("--keys")?,
                "--value-bytes" => o.value_bytes = value()?.parse().context("--value-bytes")?,
                "--load-clients" => o.load_clients = value()?.parse().context("--load-clients")?,
                "--clients" => o.clients = value()?.parse().context("--clients")?,
                "--phase" => o.phase = parse_duration(value()?)?,
                "--raft" => o.raft.push(value()?.clone()),
                other => bail!(
                    "unknown option `{other}`; usage: cargo xtask bench join [--keys 300000] [--value-bytes 1024] [--load-clients 128] [--clients 256] [--phase 20s] [--raft 'key = value']..."
                ),
            }
        }
        if o.keys == 0 || o.load_clients == 0 || o.clients == 0 {
            bail!("--keys, --load-clients and --clients must be positive");
        }
        Ok(o)
    }
}

/// Writes acknowledged per second since the writers started, and failures.
struct Tally {
    per_second: Vec<AtomicU64>,
    failed: AtomicU64,
    start: Instant,
}

impl Tally {
    fn new(seconds: usize) -> Tally {
        Tally {
            per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicU64::new(0),
            start: Instant::now(),
        }
    }

    fn record(&self, ok: bool) {
        if !ok {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let s = self.start.elapsed().as_secs() as usize;
        if let Some(slot) = self.per_second.get(s) {
            slot.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Mean writes/s over whole seconds `from..to` since the start.
    fn rate(&self, from: Duration, to: Duration) -> f64 {
        let (a, b) = (from.as_secs() as usize, to.as_secs() as usize);
        let n: u64 = self.per_second[a..b.min(self.per_second.len())]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        n as f64 / (b - a).max(1) as f64
    }
}

/// Counters of one node's `/metrics`, and its peak resident memory.
#[derive(Default, Debug)]
struct NodeReport {
    elections: u64,
    snapshots_sent: u64,
    snapshots_installed: u64,
    /// Snapshot bytes delivered as leader, and how long that took.
    snapshot_bytes: u64,
    snapshot_millis: u64,
    /// What the node's configuration budgets for caches, in MiB.
    budget_mib: u64,
    peak_rss_mib: u64,
}

pub fn run(root: &Path, opts: Options) -> Result<()> {
    let dir = root.join("target").join("xtask").join("bench").join("join");
    let raft = match opts.raft.is_empty() {
        true => String::new(),
        false => format!("[raft]\n{}\n", opts.raft.join("\n")),
    };
    let mut c = LocalCluster::create(root, dir.clone(), 3, 7500, &raft)?;
    let disk_mb_s = disk_rate(&dir)?;
    let quic_mb_s = quic_rate(root)?;
    println!("bench join: raw disk {disk_mb_s:.0} MB/s, loopback QUIC {quic_mb_s:.0} MB/s");
    c.start_all()?;
    let leader = c.wait_leader(&c.ids(), Duration::from_secs(20))?;
    let ep = c.endpoint(leader);
    let value = "v".repeat(opts.value_bytes);
    println!(
        "bench join: loading {} keys of {} bytes with {} clients",
        opts.keys, opts.value_bytes, opts.load_clients
    );
    let t = Instant::now();
    let failed = AtomicU64::new(0);
    let leader_addr = load::Endpoint::parse(&ep, &c.credentials()?)?;
    let stride = opts.load_clients as u64;
    load::drive(
        &leader_addr,
        opts.load_clients,
        Duration::from_secs(10),
        // Client w loads keys w, w + stride, w + 2 stride, ...
        |w, i| {
            let k = w as u64 + (i - 1) * stride;
            (k < opts.keys).then(|| load::raft_kv_put(&leader_addr, &format!("key-{k}"), &value))
        },
        |_, status, _| {
            if status != Some(200) {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        },
    )?;
    let load = t.elapsed();
    println!(
        "bench join: loaded in {:.1} s ({:.0} writes/s, {} failed)",
        load.as_secs_f64(),
        opts.keys as f64 / load.as_secs_f64(),
        failed.load(Ordering::Relaxed)
    );
    let before = reports(&c);
    // Node 4 is defined now (not started) so that the sampler knows it.
    c.add_spare(4)?;
    let endpoints: Vec<(u64, String)> =
        c.ids().into_iter().map(|id| (id, c.endpoint(id))).collect();
    let sampler_http = c.http_with_timeout(Duration::from_millis(900));

    // Writers overwrite random keys until told to stop; node 4 joins after
    // one phase, and the run ends a phase after the join or once node 4 is
    // promoted, whichever is later (at most 10 phases).
    let stop = AtomicBool::new(false);
    let tally = Tally::new(opts.phase.as_secs() as usize * 13 + 60);
    type Joined = ((Duration, Option<Duration>), Vec<String>);
    let joined = std::thread::scope(|s| -> Result<Joined> {
        let writers = s.spawn(|| {
            let keys = RefCell::new(
                (0..opts.clients as u64)
                    .map(|w| 0x9E37_79B9_7F4A_7C15u64 ^ (w + 1))
                    .collect::<Vec<_>>(),
            );
            load::drive(
                &leader_addr,
                opts.clients,
                Duration::from_secs(10),
                |w, _| {
                    if stop.load(Ordering::Relaxed) {
                        return None;
                    }
                    let x = &mut keys.borrow_mut()[w];
                    *x ^= *x << 13;
                    *x ^= *x >> 7;
                    *x ^= *x << 17;
                    let key = format!("key-{}", *x % opts.keys);
                    Some(load::raft_kv_put(&leader_addr, &key, &value))
                },
                |_, status, _| tally.record(status == Some(200)),
            )
        });
        let sampler = s.spawn(|| sample_timeline(&sampler_http, &endpoints, &stop, &tally));
        let result = join_node_4(&mut c, &ep, &opts, &tally);
        stop.store(true, Ordering::Relaxed);
        let timeline = sampler.join().unwrap_or_default();
        match writers.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context("writers")),
            Err(_) => bail!("the writers' thread panicked"),
        }
        result.map(|r| (r, timeline))
    });
    let ((join_at, promoted_at), timeline) = joined?;
    let timeline_file = dir.join("timeline.txt");
    std::fs::write(&timeline_file, timeline.join("\n") + "\n")?;
    let end = tally.start.elapsed();
    let after = reports(&c);
    let final_leader = c.wait_leader(&c.ids(), Duration::from_secs(5)).ok();
    c.stop_all()?;

    let rate_before = tally.rate(Duration::from_secs(1), join_at);
    let join_end = promoted_at.unwrap_or(end).max(join_at + opts.phase);
    let rate_during = tally.rate(join_at, join_end.min(end));
    println!("\n| | value |\n|---|---:|");
    println!(
        "| state loaded | {} keys x {} B, {:.0} MB |",
        opts.keys,
        opts.value_bytes,
        (opts.keys * opts.value_bytes as u64) as f64 / 1e6
    );
    println!("| writes/s before the join | {rate_before:.0} |");
    println!(
        "| writes/s during the join | {rate_during:.0} ({:+.0}%) |",
        (rate_during / rate_before.max(1.0) - 1.0) * 100.0
    );
    if let Some(promoted) = promoted_at {
        // The second of the promotion itself is left out of the rate after
        // it.
        let from = promoted + Duration::from_secs(1);
        let after = tally.rate(from, end.max(from));
        // The join proper, to the promotion: the window above runs on past
        // it (a phase at least) and overlaps this one.
        let joining = tally.rate(join_at, promoted.max(join_at + Duration::from_secs(1)));
        println!(
            "| writes/s after, with 4 voters | {after:.0} ({:+.0}%) |",
            (after / rate_before.max(1.0) - 1.0) * 100.0
        );
        println!(
            "| writes/s from the join to the promotion | {joining:.0} ({:+.0}%; {:+.0}% against 4 voters) |",
            (joining / rate_before.max(1.0) - 1.0) * 100.0,
            (joining / after.max(1.0) - 1.0) * 100.0
        );
    }
    println!(
        "| node 4 promoted after | {} |",
        promoted_at.map_or("never".into(), |p| format!(
            "{:.1} s",
            (p - join_at).as_secs_f64()
        ))
    );
    println!(
        "| failed writes | {} |",
        tally.failed.load(Ordering::Relaxed)
    );
    println!(
        "| leader | node {leader} before, {} after |",
        final_leader.map_or("none".into(), |l| format!("node {l}"))
    );
    let (mut bytes, mut millis) = (0, 0);
    for (id, r) in &after {
        let b = before.get(id);
        // A node that restarted, or did not answer, reads 0.
        bytes += r
            .snapshot_bytes
            .saturating_sub(b.map_or(0, |b| b.snapshot_bytes));
        millis += r
            .snapshot_millis
            .saturating_sub(b.map_or(0, |b| b.snapshot_millis));
    }
    if bytes > 0 {
        let rate = bytes as f64 / 1e6 / (millis.max(1) as f64 / 1e3);
        let slower = disk_mb_s.min(quic_mb_s);
        println!(
            "| snapshot delivered | {:.0} MB in {:.1} s: {rate:.0} MB/s, {:.2}x the slower of raw disk ({disk_mb_s:.0} MB/s) and loopback QUIC ({quic_mb_s:.0} MB/s) |",
            bytes as f64 / 1e6,
            millis as f64 / 1e3,
            rate / slower.max(1.0)
        );
    }
    let mut elections = 0;
    for (id, r) in &after {
        let b = before.get(id).map_or(0, |b| b.elections);
        elections += r.elections - b.min(r.elections);
        // Saturating: a node that restarted, or did not answer, reads 0.
        let installs = r
            .snapshots_installed
            .saturating_sub(before.get(id).map_or(0, |b| b.snapshots_installed));
        let sent = r
            .snapshots_sent
            .saturating_sub(before.get(id).map_or(0, |b| b.snapshots_sent));
        // Issue 13's bound: twice the configured caches plus 256 MiB.
        let bound = 2 * r.budget_mib + 256;
        println!(
            "| node {id} | {installs} snapshots installed, {sent} transfers started, peak RSS {} MiB ({} the bound of 2 x {} MiB of caches + 256 = {bound} MiB) |",
            r.peak_rss_mib,
            if r.peak_rss_mib <= bound {
                "within"
            } else {
                "OVER"
            },
            r.budget_mib
        );
    }
    println!("| elections during the run | {elections} |");
    println!("\nlogs: {}", dir.join("logs").display());
    println!("timeline (per second): {}", timeline_file.display());
    let kept = keep_run(root, &dir)?;
    println!(
        "kept (the next run starts afresh in {}): {}",
        dir.display(),
        kept.display()
    );
    Ok(())
}

/// Copies a run's logs and timeline (small; the data dirs are not) to
/// `target/xtask/bench/join-runs/<seconds since the epoch>`: the next run
/// wipes `dir`, and a run that went wrong (an election nobody expected)
/// used to lose its logs to the run after it.
fn keep_run(root: &Path, dir: &Path) -> Result<std::path::PathBuf> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let to = root
        .join("target")
        .join("xtask")
        .join("bench")
        .join("join-runs")
        .join(secs.to_string());
    std::fs::create_dir_all(&to).with_context(|| format!("creating {}", to.display()))?;
    std::fs::copy(dir.join("timeline.txt"), to.join("timeline.txt"))?;
    for entry in std::fs::read_dir(dir.join("logs"))? {
        let path = entry?.path();
        if let Some(name) = path.file_name().filter(|_| path.is_file()) {
            std::fs::copy(&path, to.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(to)
}

/// Starts node 4 with `--join`, waits a phase of load after that, and
/// promotes it (retrying while it is behind). Returns when it joined and
/// when it was promoted, as offsets from the tally's start.
fn join_node_4(
    c: &mut LocalCluster,
    ep: &str,
    opts: &Options,
    tally: &Tally,
) -> Result<(Duration, Option<Duration>)> {
    sleep(opts.phase);
    let join_at = tally.start.elapsed();
    println!("bench join: node 4 joins at {:.1} s", join_at.as_secs_f64());
    c.start_joining(4, ep)?;
    let http = c.http_with_timeout(Duration::from_secs(30));
    let deadline = Instant::now() + opts.phase * 10;
    let mut promoted = None;
    while Instant::now() < deadline {
        let url = format!("{ep}/v1/members/4/promote");
        match http.call("POST", &url, Some(&[][..])) {
            Outcome::Ok(a) if a.status == 200 => {
                promoted = Some(tally.start.elapsed());
                break;
            }
            _ => sleep(Duration::from_millis(500)),
        }
    }
    match promoted {
        Some(p) => println!("bench join: node 4 promoted at {:.1} s", p.as_secs_f64()),
        None => println!("bench join: node 4 not promoted"),
    }
    // A phase after the join at least, and a phase with four voters.
    let until = (join_at + opts.phase).max(promoted.map_or(Duration::ZERO, |p| p + opts.phase));
    if let Some(wait) = until.checked_sub(tally.start.elapsed()) {
        sleep(wait);
    }
    Ok((join_at, promoted))
}

/// Once a second until `stop`: the writes acknowledged in the second
/// before, and each node's role, term, and how far its log and its applied
/// index are behind the highest commit index seen (`-` where a node does
/// not answer).
/// Where a join's write rate goes shows here: which follower fell behind,
/// and when.
fn sample_timeline(
    http: &Http,
    endpoints: &[(u64, String)],
    stop: &AtomicBool,
    tally: &Tally,
) -> Vec<String> {
    let mut lines = vec![format!(
        "s\twrites\t{}",
        endpoints
            .iter()
            .map(|(id, _)| format!("node {id} (role term log-lag apply-lag)"))
            .collect::<Vec<_>>()
            .join("\t")
    )];
    let mut next = Duration::from_secs(1);
    while !stop.load(Ordering::Relaxed) {
        if let Some(wait) = next.checked_sub(tally.start.elapsed()) {
            sleep(wait);
        }
        let statuses: Vec<_> = endpoints
            .iter()
            .map(|(_, ep)| http.status(ep).ok())
            .collect();
        let commit = statuses
            .iter()
            .flatten()
            .map(|s| s.commit_index)
            .max()
            .unwrap_or(0);
        let second = next.as_secs() as usize - 1;
        let writes = tally
            .per_second
            .get(second)
            .map_or(0, |c| c.load(Ordering::Relaxed));
        let nodes: Vec<String> = statuses
            .iter()
            .map(|s| match s {
                Some(s) => format!(
                    "{} {} {} {}",
                    s.role,
                    s.term,
                    commit.saturating_sub(s.last_log_index),
                    commit.saturating_sub(s.applied_index)
                ),
                None => "-".into(),
            })
            .collect();
        lines.push(format!(
            "{}\t{writes}\t{}",
            next.as_secs(),
            nodes.join("\t")
        ));
        next += Duration::from_secs(1);
    }
    lines
}

fn reports(c: &LocalCluster) -> BTreeMap<u64, NodeReport> {
    let http = c.http_with_timeout(Duration::from_secs(5));
    c.ids()
        .into_iter()
        .map(|id| {
            let mut r = NodeReport::default();
            if let Ok(a) = http.send("GET", &format!("{}/metrics", c.endpoint(id)), None) {
                let text = String::from_utf8_lossy(&a.body);
                let counter = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                r.elections = counter("raft_elections_total");
                r.snapshots_sent = counter("raft_snapshots_sent_total");
                r.snapshots_installed = counter("raft_snapshots_installed_total");
                r.snapshot_bytes = counter("raft_snapshot_delivered_bytes_total");
                r.snapshot_millis = counter("raft_snapshot_delivery_milliseconds_total");
                r.budget_mib = counter("raft_kv_memory_budget_bytes") >> 20;
            }
            r.peak_rss_mib = c.pid(id).map_or(0, peak_rss_mib);
            (id, r)
        })
        .collect()
}

/// The disk's sequential write rate in MB/s: 512 MiB in 1 MiB writes to a
/// file in `dir`, synced, as a snapshot's file is written.
fn disk_rate(dir: &Path) -> Result<f64> {
    use std::io::Write;
    let path = dir.join("disk-probe");
    let chunk = vec![0x5Au8; 1 << 20];
    let t = Instant::now();
    let mut f = std::fs::File::create(&path).context("disk probe")?;
    for _ in 0..512 {
        f.write_all(&chunk).context("disk probe")?;
    }
    f.sync_all().context("disk probe")?;
    let rate = 512.0 * (1 << 20) as f64 / 1e6 / t.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(rate)
}

/// Loopback QUIC's rate in MB/s in a snapshot transfer's shape, from the
/// transport bench's `RPC_BENCH=chunks` cell.
fn quic_rate(root: &Path) -> Result<f64> {
    let out = crate::cargo()
        .current_dir(root)
        .args(["bench", "-q", "-p", "raft-transport-quic", "--bench", "rpc"])
        .env("RPC_BENCH", "chunks")
        .output()
        .context("running the transport bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("raw QUIC")?
                .rsplit_once(": ")?
                .1
                .strip_suffix(" MB/s")?
                .parse()
                .ok()
        })
        .with_context(|| {
            format!(
                "the transport bench printed no rate ({}):\n{text}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// A process's peak resident set (`VmHWM`), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb / 1024)
}
