//! Local clusters of `raft-kv` processes on 127.0.0.1: create the cluster
//! file and certificates, start, kill, pause and stop nodes, find the leader.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::http::{Credentials, Http, Status};

/// One node of a local cluster.
pub struct LocalNode {
    pub raft_port: u16,
    pub http_port: u16,
    /// The node's own cluster file, for nodes added after the start (they
    /// join instead of bootstrapping); `None` for the initial members.
    config: Option<PathBuf>,
    child: Option<Child>,
}

impl LocalNode {
    fn new(base: u16, id: u64) -> LocalNode {
        LocalNode {
            raft_port: base + id as u16,
            http_port: base + 1000 + id as u16,
            config: None,
            child: None,
        }
    }
}

/// A cluster of `raft-kv` processes under one directory.
pub struct LocalCluster {
    pub dir: PathBuf,
    bin: PathBuf,
    /// Node `id` listens on raft port `base + id` and HTTP port `base + 1000 + id`.
    base: u16,
    pub nodes: BTreeMap<u64, LocalNode>,
    pub http: Http,
    /// Children are killed when the cluster is dropped (not for `cluster up`).
    kill_on_drop: bool,
    /// The TOML `create` added after the nodes (a `[raft]` table): a spare's
    /// file gets it too, so a joining node runs with the same settings.
    extra: String,
    /// `https`, or `http` where the file says `[client_api] tls = false`.
    scheme: &'static str,
}

/// What the cluster file's `[client_api]` table makes the API's scheme.
fn scheme_of(toml: &str) -> &'static str {
    let mut in_table = false;
    for line in toml.lines().map(str::trim) {
        if line.starts_with('[') {
            in_table = line == "[client_api]";
        } else if in_table && line.replace(' ', "") == "tls=false" {
            return "http";
        }
    }
    "https"
}

/// The `raft-kv` binary of this workspace's release build.
pub fn binary(root: &Path) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let target = if target.is_absolute() {
        target
    } else {
        root.join(target)
    };
    target.join("release").join("raft-kv")
}

impl LocalCluster {
    /// Wipes `dir` and writes a cluster file for `n` nodes with raft ports
    /// `base+1..` and HTTP ports `base+1001..`, plus `extra` TOML, and the
    /// development certificates.
    pub fn create(
        root: &Path,
        dir: PathBuf,
        n: u64,
        base: u16,
        extra: &str,
    ) -> Result<LocalCluster> {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        std::fs::create_dir_all(dir.join("logs"))?;
        let mut text = String::from("# Written by cargo xtask.\n");
        let mut nodes = BTreeMap::new();
        for id in 1..=n {
            let node = LocalNode::new(base, id);
            text.push_str(&format!(
                "[[node]]\nid = {id}\nraft_addr = \"127.0.0.1:{}\"\nhttp_addr = \"127.0.0.1:{}\"\n\n",
                node.raft_port, node.http_port
            ));
            nodes.insert(id, node);
        }
        text.push_str(extra);
        std::fs::write(dir.join("cluster.toml"), text)?;
        let mut cluster = LocalCluster::open(root, dir, base, nodes)?;
        cluster.extra = extra.to_string();
        cluster.scheme = scheme_of(extra);
        let out = Command::new(&cluster.bin)
            .args(["certs", "--config"])
            .arg(cluster.file())
            .output()
            .with_context(|| format!("running {}", cluster.bin.display()))?;
        if !out.status.success() {
            bail!(
                "raft-kv certs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        cluster.http = Http::secured(cluster.http.timeout(), cluster.credentials()?);
        Ok(cluster)
    }

    fn open(
        root: &Path,
        dir: PathBuf,
        base: u16,
        nodes: BTreeMap<u64, LocalNode>,
    ) -> Result<LocalCluster> {
        let bin = binary(root);
        if !bin.exists() {
            bail!(
                "{} is missing: build it with `cargo build --release -p raft-kv-example`",
                bin.display()
            );
        }
        Ok(LocalCluster {
            dir,
            bin,
            base,
            nodes,
            http: Http::new(Duration::from_secs(3)),
            kill_on_drop: true,
            extra: String::new(),
            scheme: "https",
        })
    }

    /// The directory `raft-kv certs` wrote into (the file's default).
    pub fn tls_dir(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// The CA and admin token of the cluster's TLS directory.
    pub fn credentials(&self) -> Result<Credentials> {
        Credentials::from_tls_dir(&self.tls_dir())
    }

    /// An HTTP client of this cluster (its CA, its admin token) whose
    /// requests may take up to `timeout`.
    pub fn http_with_timeout(&self, timeout: Duration) -> Http {
        self.http.with_timeout(timeout)
    }

    /// Node `id`'s dashboard, with the admin token in the URL's fragment
    /// (which a browser keeps to itself: the page reads it and forgets the
    /// URL).
    pub fn dashboard_url(&self, id: u64) -> String {
        match self.http.credentials().token.as_deref() {
            Some(t) => format!("{}/#token={t}", self.endpoint(id)),
            None => format!("{}/", self.endpoint(id)),
        }
    }

    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        self.scheme
    }

    /// Reattaches to a cluster that `cargo xtask cluster up` left running.
    pub fn attach(root: &Path, dir: PathBuf) -> Result<LocalCluster> {
        let text = std::fs::read_to_string(dir.join("cluster.toml"))
            .with_context(|| format!("no cluster in {}", dir.display()))?;
        let mut nodes = BTreeMap::new();
        let mut id = 0;
        let port = |line: &str| -> Option<u16> {
            line.rsplit(':').next()?.trim_end_matches('"').parse().ok()
        };
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("id = ") {
                id = v.parse()?;
                nodes.insert(
                    id,
                    LocalNode {
                        raft_port: 0,
                        http_port: 0,
                        config: None,
                        child: None,
                    },
                );
            } else if let (Some(n), true) = (nodes.get_mut(&id), line.starts_with("raft_addr")) {
                n.raft_port = port(line).context("raft_addr")?;
            } else if let (Some(n), true) = (nodes.get_mut(&id), line.starts_with("http_addr")) {
                n.http_port = port(line).context("http_addr")?;
            }
        }
        let base = nodes
            .iter()
            .next()
            .map(|(id, n)| n.raft_port.saturating_sub(*id as u16))
            .unwrap_or(0);
        let mut c = LocalCluster::open(root, dir, base, nodes)?;
        c.kill_on_drop = false;
        c.scheme = scheme_of(&text);
        c.http = Http::secured(c.http.timeout(), c.credentials()?);
        Ok(c)
    }

    pub fn file(&self) -> PathBuf {
        self.dir.join("cluster.toml")
    }

    /// Lets the processes outlive this value (for `cluster up`).
    pub fn detach(&mut self) {
        self.kill_on_drop = false;
    }

    pub fn endpoint(&self, id: u64) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.nodes[&id].http_port)
    }

    pub fn ids(&self) -> Vec<u64> {
        self.nodes.keys().copied().collect()
    }

    fn pid_file(&self, id: u64) -> PathBuf {
        self.dir.join(format!("node-{id}.pid"))
    }

    /// The process id of node `id`, if it was started (by us or `cluster up`).
    pub fn pid(&self, id: u64) -> Option<u32> {
        if let Some(c) = self.nodes.get(&id).and_then(|n| n.child.as_ref()) {
            return Some(c.id());
        }
        std::fs::read_to_string(self.pid_file(id))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Starts node `id` (logs go to `logs/node-<id>.log`, appended).
    pub fn start(&mut self, id: u64) -> Result<()> {
        self.spawn(id, None)
    }

    /// Starts node `id`, which has never run, asking the member at
    /// `via` (an HTTP endpoint) to add it as a learner.
    pub fn start_joining(&mut self, id: u64, via: &str) -> Result<()> {
        self.spawn(id, Some(via))
    }

    /// Every node of a local cluster shares this machine's cores: each gets
    /// its share of them, at least one. Three nodes on two cores then run
    /// one thread each, rather than six threads waking each other.
    /// `XTASK_WORKER_THREADS` overrides it, to measure what the share costs.
    fn threads_per_node(&self) -> usize {
        if let Some(n) = std::env::var("XTASK_WORKER_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|n| *n > 0)
        {
            return n;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / self.nodes.len().max(1)).max(1)
    }

    fn spawn(&mut self, id: u64, join: Option<&str>) -> Result<()> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("logs").join(format!("node-{id}.log")))?;
        let own = self.nodes.get(&id).and_then(|n| n.config.clone());
        // The shared file names every initial member; a one-node cluster's
        // names only this node, which founds a cluster only when told to.
        let alone =
            own.is_none() && self.nodes.values().filter(|n| n.config.is_none()).count() == 1;
        let config = own.unwrap_or_else(|| self.file());
        let mut cmd = Command::new(&self.bin);
        cmd.args(["serve", "--config"])
            .arg(config)
            .args(["--id", &id.to_string()]);
        match join {
            Some(via) => {
                cmd.args(["--join", via]);
            }
            None if alone => {
                cmd.arg("--bootstrap");
            }
            None => {}
        }
        cmd.args(["--worker-threads", &self.threads_per_node().to_string()]);
        let child = cmd
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting node {id}"))?;
        std::fs::write(self.pid_file(id), child.id().to_string())?;
        if let Some(n) = self.nodes.get_mut(&id) {
            n.child = Some(child);
        }
        Ok(())
    }

    pub fn start_all(&mut self) -> Result<()> {
        for id in self.ids() {
            self.start(id)?;
        }
        Ok(())
    }

    /// Prepares node `id` to join later: its own cluster file
    /// (`join-<id>.toml`, next to the cluster's, so it shares `certs/`) and a
    /// certificate from the cluster's CA.
    pub fn add_spare(&mut self, id: u64) -> Result<()> {
        let node = LocalNode {
            config: Some(self.dir.join(format!("join-{id}.toml"))),
            ..LocalNode::new(self.base, id)
        };
        let file = node.config.clone().context("spare has a file")?;
        std::fs::write(
            &file,
            format!(
                "# Written by cargo xtask: node {id} joins the cluster of cluster.toml.\n\
                 [[node]]\nid = {id}\nraft_addr = \"127.0.0.1:{}\"\nhttp_addr = \"127.0.0.1:{}\"\n\n{}",
                node.raft_port, node.http_port, self.extra
            ),
        )?;
        let out = Command::new(&self.bin)
            .args(["certs", "--config"])
            .arg(&file)
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "raft-kv certs for node {id} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.nodes.insert(id, node);
        Ok(())
    }

    /// Node `id`'s data directory (the cluster files' default,
    /// `data/<id>` beside them).
    pub fn data_dir(&self, id: u64) -> PathBuf {
        self.dir.join("data").join(id.to_string())
    }

    /// Kills node `id` and drops it from this cluster (it was removed).
    pub fn forget(&mut self, id: u64) -> Result<()> {
        self.kill(id)?;
        self.nodes.remove(&id);
        Ok(())
    }

    /// Whether node `id` is running (as far as we started it).
    pub fn is_running(&mut self, id: u64) -> bool {
        match self.nodes.get_mut(&id).and_then(|n| n.child.as_mut()) {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => self
                .pid(id)
                .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()),
        }
    }

    /// `kill -9`: the process gets no chance to flush anything.
    pub fn kill(&mut self, id: u64) -> Result<()> {
        if let Some(mut c) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
            let _ = c.kill();
            c.wait()?;
        }
        let _ = std::fs::remove_file(self.pid_file(id));
        Ok(())
    }

    fn signal(&self, id: u64, sig: &str) -> Result<()> {
        let pid = self
            .pid(id)
            .with_context(|| format!("node {id} is not running"))?;
        let st = Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()?;
        if !st.success() {
            bail!("kill {sig} {pid} failed");
        }
        Ok(())
    }

    /// SIGSTOP: the node freezes with its connections open.
    pub fn pause(&self, id: u64) -> Result<()> {
        self.signal(id, "-STOP")
    }

    pub fn resume(&self, id: u64) -> Result<()> {
        self.signal(id, "-CONT")
    }

    /// SIGTERM to every node, then waits (SIGKILL after 10 s).
    pub fn stop_all(&mut self) -> Result<()> {
        for id in self.ids() {
            let _ = self.signal(id, "-CONT");
            let _ = self.signal(id, "-TERM");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for id in self.ids() {
            while self.is_running(id) && Instant::now() < deadline {
                sleep(Duration::from_millis(20));
            }
            if self.is_running(id) {
                let _ = self.signal(id, "-KILL");
            }
            if let Some(mut c) = self.nodes.get_mut(&id).and_then(|n| n.child.take()) {
                let _ = c.wait();
            }
            let _ = std::fs::remove_file(self.pid_file(id));
        }
        Ok(())
    }

    /// Every node's status (`None` where it does not answer).
    pub fn statuses(&self) -> BTreeMap<u64, Option<Status>> {
        self.ids()
            .into_iter()
            .map(|id| (id, self.http.status(&self.endpoint(id)).ok()))
            .collect()
    }

    /// Waits until the answering nodes among `among` agree on one leader.
    pub fn wait_leader(&self, among: &[u64], timeout: Duration) -> Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen: Vec<Status> = among
                .iter()
                .filter_map(|id| self.http.status(&self.endpoint(*id)).ok())
                .collect();
            if let Some(l) = seen.iter().find(|s| s.role == "leader")
                && seen.len() * 2 > among.len()
                && seen.iter().all(|s| s.leader_id == Some(l.id))
            {
                return Ok(l.id);
            }
            if Instant::now() > deadline {
                bail!("no leader among nodes {among:?} after {timeout:?}");
            }
            sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        if self.kill_on_drop {
            for id in self.ids() {
                let _ = self.signal(id, "-CONT");
                let _ = self.kill(id);
            }
        }
    }
}

/// Appends to a file, creating it.
pub fn append_file(path: &Path) -> Result<File> {
    Ok(OpenOptions::new().create(true).append(true).open(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_client_api_table_makes_the_scheme_plain() {
        assert_eq!(scheme_of(""), "https");
        assert_eq!(scheme_of("[raft]\ntls = false\n"), "https");
        assert_eq!(scheme_of("[client_api]\nauth = false\n"), "https");
        assert_eq!(
            scheme_of("[raft]\nheartbeat_ms = 50\n\n[client_api]\ntls = false\n"),
            "http"
        );
    }
}
