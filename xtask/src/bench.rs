//! `cargo xtask bench`: writes/s and linearizable reads/s with p50/p99
//! latency against a local 3-node `raft-kv` cluster, and the same workload
//! against a 3-member etcd cluster started on the same machine in the same
//! run (etcd's v3 JSON gateway), with our/etcd ratios.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::chaos::parse_duration;
use crate::cluster::LocalCluster;
use crate::http::Http;
use crate::load::{self, Endpoint, Request};

pub struct Options {
    pub clients: Vec<usize>,
    pub duration: Duration,
    pub value_bytes: usize,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            clients: vec![1, 16, 256],
            duration: Duration::from_secs(20),
            value_bytes: 64,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--clients" => {
                    o.clients = value()?
                        .split(',')
                        .map(|c| c.parse().context("--clients"))
                        .collect::<Result<_>>()?
                }
                "--duration" => o.duration = parse_duration(value()?)?,
                "--value-bytes" => o.value_bytes = value()?.parse().context("--value-bytes")?,
                other => bail!(
                    "unknown option `{other}`; usage: cargo xtask bench [--clients 1,16,256] [--duration 20s] [--value-bytes 64]"
                ),
            }
        }
        Ok(o)
    }
}

/// One measured cell.
#[derive(Clone, Copy, Default)]
struct Cell {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: usize,
}

/// A system under test: how to write and read one key, and which answers
/// count as done.
trait Target {
    fn endpoint(&self) -> &Endpoint;
    fn write(&self, key: &str, value: &str) -> Request;
    fn read(&self, key: &str) -> Request;
    /// Whether an answer with `status` is a completed operation.
    fn ok(&self, status: u16) -> bool;
}

struct RaftKv {
    leader: Endpoint,
}

impl Target for RaftKv {
    fn endpoint(&self) -> &Endpoint {
        &self.leader
    }
    fn write(&self, key: &str, value: &str) -> Request {
        load::raft_kv_put(&self.leader, key, value)
    }
    fn read(&self, key: &str) -> Request {
        Request::new("GET", &self.leader, &format!("/v1/kv/{key}"), None)
    }
    fn ok(&self, status: u16) -> bool {
        // A read of a key not yet written answers 404, linearizably.
        status == 200 || status == 404
    }
}

struct Etcd {
    endpoint: Endpoint,
}

impl Target for Etcd {
    fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
    fn write(&self, key: &str, value: &str) -> Request {
        let body = format!(r#"{{"key":"{}","value":"{}"}}"#, base64(key), base64(value));
        let body = ("application/json", body.as_bytes());
        Request::new("POST", &self.endpoint, "/v3/kv/put", Some(body))
    }
    fn read(&self, key: &str) -> Request {
        // Linearizable unless "serializable": true is asked for.
        let body = format!(r#"{{"key":"{}"}}"#, base64(key));
        let body = ("application/json", body.as_bytes());
        Request::new("POST", &self.endpoint, "/v3/kv/range", Some(body))
    }
    fn ok(&self, status: u16) -> bool {
        status == 200
    }
}

pub fn run(root: &Path, opts: Options) -> Result<()> {
    let dir = root.join("target").join("xtask").join("bench");
    let value = "v".repeat(opts.value_bytes);
    println!(
        "bench: {} s per cell, {}-byte values, clients {:?}; each client is one keep-alive connection, all driven from one thread",
        opts.duration.as_secs_f64(),
        opts.value_bytes,
        opts.clients
    );

    // The secure default (HTTPS, a token on every request), then the same
    // over plain HTTP: what TLS costs.
    let raft_kv = |name: &str, extra: &str| -> Result<Vec<[Cell; 2]>> {
        let mut c = LocalCluster::create(root, dir.join(name), 3, 7300, extra)?;
        c.start_all()?;
        let leader = c.wait_leader(&c.ids(), Duration::from_secs(20))?;
        let target = RaftKv {
            leader: Endpoint::parse(&c.endpoint(leader), &c.credentials()?)?,
        };
        let cells = measure(&target, &opts, &value, name)?;
        c.stop_all()?;
        Ok(cells)
    };
    let ours = raft_kv("raft-kv", "")?;
    let plain = raft_kv("plain", "[client_api]\ntls = false\n")?;

    let etcd = match EtcdCluster::start(&dir.join("etcd")) {
        Ok(mut e) => {
            let target = Etcd {
                endpoint: Endpoint::plain(socket_addr(&e.endpoint())?),
            };
            let cells = measure(&target, &opts, &value, "etcd")?;
            e.stop();
            Some(cells)
        }
        Err(e) => {
            println!("bench: etcd not measured: {e:#}");
            None
        }
    };

    println!(
        "\n| clients | op | raft-kv (HTTPS) ops/s | p50 ms | p99 ms | plain HTTP ops/s | TLS cost | etcd ops/s | p50 ms | p99 ms | HTTPS / etcd |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, clients) in opts.clients.iter().enumerate() {
        for (j, op) in ["write", "read"].iter().enumerate() {
            let o = ours[i][j];
            let p = plain[i][j];
            let cost = 100.0 * (1.0 - o.ops_per_sec / p.ops_per_sec.max(1e-9));
            let (e, ratio) = match &etcd {
                Some(cells) => {
                    let e = cells[i][j];
                    (
                        format!("{:.0} | {:.2} | {:.2}", e.ops_per_sec, e.p50_ms, e.p99_ms),
                        format!("{:.2}", o.ops_per_sec / e.ops_per_sec.max(1e-9)),
                    )
                }
                None => ("- | - | -".into(), "-".into()),
            };
            println!(
                "| {clients} | {op} | {:.0} | {:.2} | {:.2} | {:.0} | {cost:.0}% | {e} | {ratio} |",
                o.ops_per_sec, o.p50_ms, o.p99_ms, p.ops_per_sec
            );
        }
    }
    let errors: usize = ours.iter().chain(&plain).flatten().map(|c| c.errors).sum();
    if errors > 0 {
        println!("\nbench: {errors} raft-kv requests failed during the run");
    }
    Ok(())
}

/// `[write, read]` cells for each client count.
fn measure(target: &dyn Target, opts: &Options, value: &str, name: &str) -> Result<Vec<[Cell; 2]>> {
    opts.clients
        .iter()
        .map(|&clients| {
            let w = run_cell(target, clients, opts.duration, Some(value))?;
            let r = run_cell(target, clients, opts.duration, None)?;
            println!(
                "bench: {name:<8} {clients:>4} clients: {:>8.0} writes/s (p99 {:.2} ms, {} failed), {:>8.0} reads/s (p99 {:.2} ms, {} failed)",
                w.ops_per_sec, w.p99_ms, w.errors, r.ops_per_sec, r.p99_ms, r.errors
            );
            Ok([w, r])
        })
        .collect()
}

/// `clients` connections writing `write`'s value, or reading if `None`,
/// each to its own 1,000 keys.
fn run_cell(
    target: &dyn Target,
    clients: usize,
    duration: Duration,
    write: Option<&str>,
) -> Result<Cell> {
    let deadline = Instant::now() + duration;
    let request = |c: usize, i: u64| {
        let key = format!("bench-{c}-{}", i % 1000);
        (Instant::now() < deadline).then(|| match write {
            Some(v) => target.write(&key, v),
            None => target.read(&key),
        })
    };
    // Failed requests by status (`None`: no answer within the timeout, or
    // the connection failed).
    let (latencies_us, failed) = (RefCell::new(Vec::new()), RefCell::new(BTreeMap::new()));
    let answered = |_, status: Option<u16>, took: Duration| match status {
        Some(s) if target.ok(s) => latencies_us.borrow_mut().push(took.as_micros() as u32),
        other => *failed.borrow_mut().entry(other).or_insert(0usize) += 1,
    };
    let timeout = Duration::from_secs(10);
    load::drive(target.endpoint(), clients, timeout, request, answered)?;
    let mut all = latencies_us.into_inner();
    all.sort_unstable();
    let failed = failed.into_inner();
    if !failed.is_empty() {
        let what: Vec<String> = failed
            .iter()
            .map(|(s, n)| match s {
                Some(s) => format!("{n} x {s}"),
                None => format!("{n} x no answer"),
            })
            .collect();
        println!("bench: {clients} clients: failed: {}", what.join(", "));
    }
    Ok(Cell {
        ops_per_sec: all.len() as f64 / duration.as_secs_f64(),
        p50_ms: load::quantile_ms(&all, 0.50),
        p99_ms: load::quantile_ms(&all, 0.99),
        errors: failed.values().sum(),
    })
}

/// Three etcd members on 127.0.0.1 (client ports 23791-23793).
struct EtcdCluster {
    children: Vec<Child>,
}

impl EtcdCluster {
    fn start(dir: &Path) -> Result<EtcdCluster> {
        let etcd = crate::find_tool("etcd").context(
            "etcd is not installed (Debian: apt-get install -y etcd-server; `cargo xtask doctor --install --bench` does it as root)",
        )?;
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let peers: Vec<String> = (1..=3)
            .map(|i| format!("e{i}=http://127.0.0.1:2380{i}"))
            .collect();
        let mut children = Vec::new();
        for i in 1..=3 {
            let log = crate::cluster::append_file(&dir.join(format!("e{i}.log")))?;
            let child = Command::new(&etcd)
                .args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("e{i}")))
                .args(["--listen-client-urls", &format!("http://127.0.0.1:2379{i}")])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:2379{i}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:2380{i}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:2380{i}"),
                ])
                .args(["--initial-cluster", &peers.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    "xtask-bench",
                ])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting etcd")?;
            children.push(child);
        }
        let e = EtcdCluster { children };
        let http = Http::new(Duration::from_secs(2));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = matches!(
                http.send("POST", &format!("{}/v3/kv/put", e.endpoint()), Some(br#"{"key":"aw==","value":"dg=="}"#)),
                Ok(a) if a.status == 200
            );
            if ok {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!(
                    "etcd did not become ready in 30 s (logs in {})",
                    dir.display()
                );
            }
            sleep(Duration::from_millis(100));
        }
    }

    /// The first member; etcd forwards proposals to its leader internally.
    fn endpoint(&self) -> String {
        "http://127.0.0.1:23791".into()
    }

    fn stop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `http://host:port` as an address.
pub fn socket_addr(endpoint: &str) -> Result<SocketAddr> {
    let hostport = endpoint.trim_start_matches("http://");
    hostport
        .parse()
        .with_context(|| format!("endpoint {endpoint} is not http://ip:port"))
}

fn base64(s: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, byte)| n | (u32::from(*byte) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc_4648_vectors() {
        for (plain, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(super::base64(plain), encoded);
        }
    }
}
