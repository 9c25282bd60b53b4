//! `cargo xtask demo`: a 3-node cluster of real processes, writes and reads,
//! the leader killed, a new election timed, every acknowledged write checked,
//! the old leader restarted and caught up, a failed node replaced by a new
//! one (join, promote, remove), then everything stopped.

use std::io::Write;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use raft_kv_example::client::{Client, ClientOptions};
use raft_kv_example::token::Token;

use crate::cluster::LocalCluster;
use crate::http::{Answer, Outcome};

const WRITES: usize = 500;
const WRITES_WHILE_DOWN: usize = 200;

/// `--pace SECS`: how long the demo pauses before each step, so that a
/// person watching the dashboard sees each one happen (default 0).
pub fn parse_pace(args: &[String]) -> Result<Duration> {
    match args {
        [] => Ok(Duration::ZERO),
        [flag, secs] if flag == "--pace" => Ok(Duration::from_secs_f64(
            secs.parse().context("--pace takes seconds")?,
        )),
        _ => bail!("usage: cargo xtask demo [--pace SECS]"),
    }
}

pub fn run(root: &Path, pace: Duration) -> Result<()> {
    let began = Instant::now();
    let dir = root.join("target").join("xtask").join("demo");
    let mut c = LocalCluster::create(root, dir, 3, 7100, "")?;
    println!("cluster file, certificates and data: {}", c.dir.display());
    c.start_all()?;
    let t = Instant::now();
    let first = c.wait_leader(&c.ids(), Duration::from_secs(15))?;
    let first_election = t.elapsed();
    println!(
        "3 nodes up; node {first} leads (elected in {})",
        ms(first_election)
    );
    // A node that is never the one killed or replaced first.
    let watched = c.ids().into_iter().find(|id| *id != first).unwrap_or(first);
    println!(
        "watch it live: {} (run with --pace 3 to slow the demo down)",
        c.dashboard_url(watched)
    );
    let step = || {
        if !pace.is_zero() {
            sleep(pace);
        }
    };
    step();

    let mut rows: Vec<(String, String)> = vec![("first election".into(), ms(first_election))];
    let mut acked = Vec::new();
    let t = Instant::now();
    write_keys(&c, first, 0..WRITES, &mut acked, "writing")?;
    let rate = WRITES as f64 / t.elapsed().as_secs_f64();
    rows.push((
        format!("{WRITES} sequential writes"),
        format!("{:.0} writes/s", rate),
    ));
    verify(&c, first, &acked, "reading back (linearizable)")?;

    step();
    println!("\nkilling the leader, node {first}, with SIGKILL");
    c.kill(first)?;
    let killed = Instant::now();
    let survivors: Vec<u64> = c.ids().into_iter().filter(|id| *id != first).collect();
    let second = c.wait_leader(&survivors, Duration::from_secs(15))?;
    let failover = killed.elapsed();
    println!("node {second} leads after {}", ms(failover));
    rows.push(("failover: kill to new leader".into(), ms(failover)));

    verify(
        &c,
        second,
        &acked,
        "every acknowledged write after failover",
    )?;
    write_keys(
        &c,
        second,
        WRITES..WRITES + WRITES_WHILE_DOWN,
        &mut acked,
        "writing while node down",
    )?;

    step();
    println!("\nrestarting node {first}");
    c.start(first)?;
    let restarted = Instant::now();
    let target = c.http.status(&c.endpoint(second))?.commit_index;
    wait_applied(&c, first, target, "follower")?;
    let catch_up = restarted.elapsed();
    println!(
        "node {first} caught up to index {target} in {}",
        ms(catch_up)
    );
    rows.push((
        format!("restart and catch-up of node {first}"),
        ms(catch_up),
    ));
    let missing = acked
        .iter()
        .filter(|k| c.http.get(&c.endpoint(first), k, true) != Outcome::Ok(Some(value_of(k))))
        .count();
    if missing > 0 {
        bail!("node {first} lacks {missing} acknowledged writes after catching up");
    }
    println!(
        "node {first} serves all {} keys from its own state machine",
        acked.len()
    );

    step();
    println!(
        "\nreplacing node {first}: it fails for good, node 4 joins, is promoted, node {first} is removed"
    );
    let slow = c.http_with_timeout(Duration::from_secs(60));
    c.kill(first)?;
    c.add_spare(4)?;
    let joined = Instant::now();
    c.start_joining(4, &c.endpoint(second))?;
    let target = c.http.status(&c.endpoint(second))?.commit_index;
    wait_applied(&c, 4, target, "learner")?;
    let join_time = joined.elapsed();
    println!(
        "node 4 joined as a learner and caught up in {}",
        ms(join_time)
    );
    let t = Instant::now();
    expect_ok(
        slow.call(
            "POST",
            &format!("{}/v1/members/4/promote", c.endpoint(second)),
            Some(&[][..]),
        ),
        "promoting node 4",
    )?;
    let promote_time = t.elapsed();
    let t = Instant::now();
    expect_ok(
        slow.call(
            "DELETE",
            &format!("{}/v1/members/{first}", c.endpoint(second)),
            None,
        ),
        "removing the failed node",
    )?;
    let remove_time = t.elapsed();
    c.forget(first)?;
    let voters = c.http.status(&c.endpoint(second))?.voters;
    println!(
        "voters now {voters:?} (promoted in {}, removed in {})",
        ms(promote_time),
        ms(remove_time)
    );
    let missing = acked
        .iter()
        .filter(|k| c.http.get(&c.endpoint(4), k, true) != Outcome::Ok(Some(value_of(k))))
        .count();
    if missing > 0 {
        bail!("node 4 lacks {missing} acknowledged writes");
    }
    rows.push(("replace a node: join and catch-up".into(), ms(join_time)));
    rows.push((
        "replace a node: promote, remove old".into(),
        format!("{} + {}", ms(promote_time), ms(remove_time)),
    ));

    c.stop_all()?;
    rows.push(("acknowledged writes".into(), acked.len().to_string()));
    rows.push(("lost acknowledged writes".into(), "0".into()));
    rows.push((
        "demo wall time".into(),
        format!("{:.1} s", began.elapsed().as_secs_f64()),
    ));
    println!("\nall nodes stopped. summary:\n");
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!("  {:w$}  measured", "what");
    println!("  {:-<w$}  {:-<16}", "", "");
    for (k, v) in rows {
        println!("  {k:w$}  {v}");
    }
    println!("\nlogs: {}", c.dir.join("logs").display());
    Ok(())
}

/// Waits (30 s at most) until node `id`, in `role`, has applied `target`.
fn wait_applied(c: &LocalCluster, id: u64, target: u64, role: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = c.http.status(&c.endpoint(id))
            && s.role == role
            && s.applied_index >= target
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("node {id} did not reach index {target} as a {role} in 30 s");
        }
        sleep(Duration::from_millis(10));
    }
}

fn expect_ok(o: Outcome<Answer>, what: &str) -> Result<()> {
    match o {
        Outcome::Ok(a) if a.status == 200 => Ok(()),
        Outcome::Ok(a) => bail!(
            "{what}: HTTP {}: {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ),
        Outcome::Fail(e) | Outcome::Unknown(e) => bail!("{what}: {e}"),
    }
}

fn value_of(key: &str) -> String {
    format!("value-of-{key}")
}

/// Writes keys `range` with the client library (`raft_kv_example::client`,
/// what applications use): it starts at `leader`, follows redirects and
/// retries through failures in its session, so each write it reports was
/// applied exactly once. Shows a progress bar; records each acknowledged
/// key.
fn write_keys(
    c: &LocalCluster,
    leader: u64,
    range: std::ops::Range<usize>,
    acked: &mut Vec<String>,
    what: &str,
) -> Result<()> {
    let mut endpoints = vec![c.endpoint(leader)];
    endpoints.extend(
        c.ids()
            .into_iter()
            .filter(|id| *id != leader)
            .map(|id| c.endpoint(id)),
    );
    let endpoints: Vec<&str> = endpoints.iter().map(String::as_str).collect();
    let creds = c.credentials()?;
    let options = ClientOptions {
        retry_for: Duration::from_secs(10),
        ca_pem: creds.ca_pem,
        token: creds.token.as_deref().map(Token::parse).transpose()?,
        ..ClientOptions::default()
    };
    let client = Client::with_options(&endpoints, options)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let total = range.len();
    for (done, i) in range.enumerate() {
        let key = format!("demo-{i:05}");
        rt.block_on(client.put(&key, value_of(&key).as_bytes()))
            .with_context(|| format!("writing {key}"))?;
        acked.push(key);
        progress(what, done + 1, total);
    }
    println!();
    Ok(())
}

fn verify(c: &LocalCluster, via: u64, acked: &[String], what: &str) -> Result<()> {
    for (n, key) in acked.iter().enumerate() {
        match c.http.get(&c.endpoint(via), key, false) {
            Outcome::Ok(Some(v)) if v == value_of(key) => {}
            other => bail!("{key}: expected {:?}, read {other:?}", value_of(key)),
        }
        progress(what, n + 1, acked.len());
    }
    println!();
    Ok(())
}

fn progress(what: &str, done: usize, total: usize) {
    const WIDTH: usize = 30;
    let filled = done * WIDTH / total.max(1);
    // Redraw only when the bar grows, so a log of the run stays short.
    if done != total && filled == (done - 1) * WIDTH / total.max(1) {
        return;
    }
    print!(
        "\r  {what:<40} [{}{}] {done}/{total}",
        "#".repeat(filled),
        " ".repeat(WIDTH - filled)
    );
    let _ = std::io::stdout().flush();
}

pub fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// Builds the `raft-kv` binary (release).
pub fn build(root: &Path) -> Result<()> {
    let st = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args([
            "build",
            "--release",
            "-p",
            "raft-kv-example",
            "--bin",
            "raft-kv",
        ])
        .status()
        .context("running cargo build")?;
    if !st.success() {
        bail!("building raft-kv failed");
    }
    Ok(())
}
