//! The cluster file: the initial members and every tunable, in TOML.
//!
//! ```toml
//! [[node]]
//! id = 1
//! raft_addr = "127.0.0.1:7001"   # QUIC, node to node
//! http_addr = "127.0.0.1:8001"   # client API
//! data_dir = "data/1"            # optional; default data/<id>
//! # ...one [[node]] table per member
//!
//! [tls]
//! dir = "certs"                  # optional; default certs/ next to the file
//!
//! [client_api]                   # every key optional; defaults shown
//! tls = true                     # HTTPS with node-<id>-http.pem; false: plain HTTP (warned at start)
//! auth = true                    # bearer tokens on every request but /healthz; false: none (warned)
//!
//! [raft]                         # every key optional; defaults shown
//! election_timeout_ms = [150, 300]
//! heartbeat_ms = 50
//! snapshot_every = 10000         # entries applied between snapshots, at least
//! snapshot_log_percent = 100     # and a log of at least this % of the last snapshot's bytes
//! snapshot_jitter_percent = 50   # each node stretches both by a random 0-50%, so nodes build apart
//! purge_keep = 1000              # entries kept behind a snapshot
//! purge_keep_max = 100000        # and up to this many (or twice the snapshot's bytes) for a live follower behind
//! snapshot_refresh_percent = 20  # a transfer waits for a fresh snapshot if the log since weighs more (0: never)
//! snapshot_window = 8            # snapshot chunks in flight per follower
//! snapshot_chunk_bytes = 1048576 # bytes per snapshot chunk (at most 8 MiB)
//! max_inflight = 8               # AppendEntries in flight per follower
//! max_entries_per_message = 512
//!
//! [limits]                       # every key optional; defaults shown
//! max_key_bytes = 4096
//! max_value_bytes = 1048576
//! request_timeout_ms = 5000      # after this a proposal's outcome is unknown (504)
//! membership_timeout_ms = 30000  # membership requests (a learner may need a snapshot)
//! ```
//!
//! Relative paths are relative to the file. Any error names the file, the
//! line and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use raft_core::{Config, NodeId};
use serde::Deserialize;
use thiserror::Error;
use toml::Spanned;

/// The largest `snapshot_chunk_bytes` a cluster file may set: a chunk and
/// its request travel in one QUIC frame (`QuicConfig::max_frame_bytes`,
/// 16 MiB).
const MAX_SNAPSHOT_CHUNK_BYTES: usize = 8 << 20;

use crate::types::NodeAddr;

/// A parsed and validated cluster file.
#[derive(Clone, Debug)]
pub struct ClusterFile {
    /// Where it was read from.
    pub path: PathBuf,
    /// Every member, by id.
    pub nodes: BTreeMap<NodeId, NodeEntry>,
    /// Holds `ca.pem`, `node-<id>.pem`, `node-<id>-key.pem`.
    pub tls_dir: PathBuf,
    /// The engine settings (validated).
    pub raft: Config,
    /// Request size limits the HTTP API enforces.
    pub limits: Limits,
    /// How the client API is secured.
    pub client_api: ClientApi,
}

/// The `[client_api]` table: how clients reach a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientApi {
    /// Serve HTTPS (the certificate `raft-kv certs` issues for the node's
    /// `http_addr`); plain HTTP only when the file says `tls = false`.
    pub tls: bool,
    /// Require a bearer token ([`crate::auth`]) on every request but
    /// `/healthz`.
    pub auth: bool,
}

impl Default for ClientApi {
    fn default() -> Self {
        ClientApi {
            tls: true,
            auth: true,
        }
    }
}

impl ClientApi {
    /// `https` or `http`.
    pub fn scheme(&self) -> &'static str {
        match self.tls {
            true => "https",
            false => "http",
        }
    }
}

/// One `[[node]]` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeEntry {
    /// The node's id.
    pub id: NodeId,
    /// Where it listens for peers (QUIC).
    pub raft_addr: SocketAddr,
    /// Where it serves clients (HTTP).
    pub http_addr: SocketAddr,
    /// Where it keeps its data.
    pub data_dir: PathBuf,
}

impl NodeEntry {
    /// The address stored in membership entries.
    pub fn addr(&self) -> NodeAddr {
        NodeAddr {
            raft_addr: self.raft_addr.to_string(),
            http_addr: self.http_addr.to_string(),
        }
    }
}

/// Request limits of the HTTP API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Longest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// How long a write or linearizable read may take before the node
    /// answers 504 (outcome unknown).
    pub request_timeout: Duration,
    /// How long a membership request waits (a new learner may need a whole
    /// snapshot) before answering 504.
    pub membership_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: 4096,
            max_value_bytes: 1 << 20,
            request_timeout: Duration::from_secs(5),
            membership_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a cluster file was refused.
#[derive(Debug, Error)]
pub enum ClusterFileError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The file was read but is not a usable cluster file.
    #[error("{0}")]
    Invalid(Located),
}

/// An error at a place in the file.
#[derive(Debug)]
pub struct Located {
    /// The file.
    pub path: PathBuf,
    /// 1-based; `None` when the error concerns the whole file.
    pub line: Option<usize>,
    /// The field (or section) at fault.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for Located {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.path.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": `{}`: {}", self.field, self.message)
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    node: Vec<RawNode>,
    tls: Option<RawTls>,
    raft: Option<Spanned<RawRaft>>,
    limits: Option<RawLimits>,
    client_api: Option<RawClientApi>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientApi {
    tls: Option<bool>,
    auth: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: Spanned<u64>,
    raft_addr: Spanned<String>,
    http_addr: Spanned<String>,
    data_dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    dir: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRaft {
    election_timeout_ms: Option<[u64; 2]>,
    heartbeat_ms: Option<u64>,
    snapshot_every: Option<u64>,
    snapshot_log_percent: Option<u64>,
    snapshot_jitter_percent: Option<u64>,
    purge_keep: Option<u64>,
    purge_keep_max: Option<u64>,
    snapshot_refresh_percent: Option<u64>,
    snapshot_window: Option<usize>,
    snapshot_chunk_bytes: Option<usize>,
    max_inflight: Option<usize>,
    max_entries_per_message: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_key_bytes: Option<Spanned<u64>>,
    max_value_bytes: Option<Spanned<u64>>,
    request_timeout_ms: Option<Spanned<u64>>,
    membership_timeout_ms: Option<Spanned<u64>>,
}

impl ClusterFile {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<ClusterFile, ClusterFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ClusterFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        ClusterFile::parse(path, &text)
    }

    /// Parses `text` as if read from `path` (relative paths resolve against
    /// its directory).
    pub fn parse(path: &Path, text: &str) -> Result<ClusterFile, ClusterFileError> {
        let at = |span: Option<Range<usize>>, field: &str, message: String| {
            ClusterFileError::Invalid(Located {
                path: path.to_path_buf(),
                line: span.map(|s| line_of(text, s.start)),
                field: field.to_string(),
                message,
            })
        };
        let raw: RawFile =
            toml::from_str(text).map_err(|e| at(e.span(), "", e.message().trim().to_string()))?;
        let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
        let resolve = |p: &str| base.join(p);

        if raw.node.is_empty() {
            return Err(at(None, "node", "at least one [[node]] is required".into()));
        }
        let mut nodes = BTreeMap::new();
        for n in raw.node {
            let id = NodeId(*n.id.get_ref());
            if id.0 == 0 {
                return Err(at(Some(n.id.span()), "id", "node ids start at 1".into()));
            }
            let addr = |s: &Spanned<String>, field: &str| {
                s.get_ref().parse::<SocketAddr>().map_err(|e| {
                    at(
                        Some(s.span()),
                        field,
                        format!("`{}` is not an ip:port address: {e}", s.get_ref()),
                    )
                })
            };
            let entry = NodeEntry {
                id,
                raft_addr: addr(&n.raft_addr, "raft_addr")?,
                http_addr: addr(&n.http_addr, "http_addr")?,
                data_dir: resolve(n.data_dir.as_deref().unwrap_or(&format!("data/{id}"))),
            };
            if nodes.insert(id, entry).is_some() {
                return Err(at(
                    Some(n.id.span()),
                    "id",
                    format!("node {id} is listed twice"),
                ));
            }
        }
        let mut seen = BTreeMap::new();
        for n in nodes.values() {
            for a in [n.raft_addr, n.http_addr] {
                if let Some(other) = seen.insert(a, n.id) {
                    return Err(at(
                        None,
                        "node",
                        format!("address {a} is used by node {other} and node {}", n.id),
                    ));
                }
            }
        }

        let tls_dir = resolve(raw.tls.and_then(|t| t.dir).as_deref().unwrap_or("certs"));

        let mut raft = Config::default();
        if let Some(r) = raw.raft {
            let span = r.span();
            let r = r.into_inner();
            if let Some([min, max]) = r.election_timeout_ms {
                raft.election_timeout_min_ms = min;
                raft.election_timeout_max_ms = max;
            }
            raft.heartbeat_interval_ms = r.heartbeat_ms.unwrap_or(raft.heartbeat_interval_ms);
            raft.snapshot_every = r.snapshot_every.unwrap_or(raft.snapshot_every);
            raft.snapshot_log_percent = r.snapshot_log_percent.unwrap_or(raft.snapshot_log_percent);
            raft.snapshot_jitter_percent = r
                .snapshot_jitter_percent
                .unwrap_or(raft.snapshot_jitter_percent);
            raft.purge_keep = r.purge_keep.unwrap_or(raft.purge_keep);
            raft.purge_keep_max = r.purge_keep_max.unwrap_or(raft.purge_keep_max);
            raft.snapshot_refresh_percent = r
                .snapshot_refresh_percent
                .unwrap_or(raft.snapshot_refresh_percent);
            raft.snapshot_window = r.snapshot_window.unwrap_or(raft.snapshot_window);
            raft.snapshot_chunk_bytes = r.snapshot_chunk_bytes.unwrap_or(raft.snapshot_chunk_bytes);
            if raft.snapshot_chunk_bytes > MAX_SNAPSHOT_CHUNK_BYTES {
                return Err(at(
                    Some(span.clone()),
                    "raft",
                    format!(
                        "snapshot_chunk_bytes must be at most {MAX_SNAPSHOT_CHUNK_BYTES} (a chunk travels in one transport frame of 16 MiB)"
                    ),
                ));
            }
            raft.max_inflight = r.max_inflight.unwrap_or(raft.max_inflight);
            raft.max_entries_per_message = r
                .max_entries_per_message
                .unwrap_or(raft.max_entries_per_message);
            raft = raft
                .validate()
                .map_err(|e| at(Some(span), "raft", e.to_string()))?;
        }

        let mut limits = Limits::default();
        if let Some(l) = raw.limits {
            let positive = |v: &Spanned<u64>, field: &str| match *v.get_ref() {
                0 => Err(at(Some(v.span()), field, "must be > 0".into())),
                n => Ok(n),
            };
            if let Some(v) = &l.max_key_bytes {
                limits.max_key_bytes = positive(v, "max_key_bytes")? as usize;
            }
            if let Some(v) = &l.max_value_bytes {
                limits.max_value_bytes = positive(v, "max_value_bytes")? as usize;
            }
            if let Some(v) = &l.request_timeout_ms {
                limits.request_timeout = Duration::from_millis(positive(v, "request_timeout_ms")?);
            }
            if let Some(v) = &l.membership_timeout_ms {
                limits.membership_timeout =
                    Duration::from_millis(positive(v, "membership_timeout_ms")?);
            }
        }

        let defaults = ClientApi::default();
        let client_api = raw.client_api.map_or(defaults, |c| ClientApi {
            tls: c.tls.unwrap_or(defaults.tls),
            auth: c.auth.unwrap_or(defaults.auth),
        });

        Ok(ClusterFile {
            path: path.to_path_buf(),
            nodes,
            tls_dir,
            raft,
            limits,
            client_api,
        })
    }

    /// The entry of node `id`.
    pub fn node(&self, id: NodeId) -> Option<&NodeEntry> {
        self.nodes.get(&id)
    }

    /// The members as the initial membership.
    pub fn members(&self) -> BTreeMap<NodeId, NodeAddr> {
        self.nodes.iter().map(|(id, n)| (*id, n.addr())).collect()
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|b| **b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[node]]
id = 1
raft_addr = "127.0.0.1:7001"
http_addr = "127.0.0.1:8001"

[[node]]
id = 2
raft_addr = "127.0.0.1:7002"
http_addr = "127.0.0.1:8002"
data_dir = "/var/lib/kv2"

[raft]
election_timeout_ms = [300, 600]
"#;

    fn parse(text: &str) -> Result<ClusterFile, ClusterFileError> {
        ClusterFile::parse(Path::new("/etc/kv/cluster.toml"), text)
    }

    /// A file with every section and key set.
    const FULL: &str = r#"
[[node]]
id = 1
raft_addr = "127.0.0.1:7001"
http_addr = "[::1]:8001"
data_dir = "data/1"

[[node]]
id = 7
raft_addr = "10.0.0.7:7001"
http_addr = "10.0.0.7:8001"

[tls]
dir = "../certs"

[raft]
election_timeout_ms = [150, 300]
heartbeat_ms = 50
snapshot_every = 10000
snapshot_log_percent = 50
snapshot_jitter_percent = 10
purge_keep = 1000
purge_keep_max = 100000
snapshot_refresh_percent = 25
snapshot_window = 4
snapshot_chunk_bytes = 262144
max_inflight = 8
max_entries_per_message = 1024

[limits]
max_key_bytes = 1024
max_value_bytes = 1048576
request_timeout_ms = 5000
membership_timeout_ms = 30000

[client_api]
tls = true
auth = true
"#;

    /// Damaged cluster files (issue 11's fuzzing, on `raft_core::fuzz`):
    /// each is read as an operator's typo or a damaged disk would leave
    /// it, and must parse or be refused with a `ClusterFileError`, never
    /// panic. `FUZZ_SEED`, `FUZZ_ITERS`, `FUZZ_SECS` as for the other
    /// fuzzers; kept inputs in `tests/fuzz_regressions/`.
    #[test]
    fn damaged_cluster_files_parse_or_are_refused_never_a_panic() {
        use raft_core::fuzz::{self, Target};
        let file = |bytes: &[u8]| match std::str::from_utf8(bytes) {
            Ok(text) => parse(text).is_ok(),
            // What `ClusterFile::load` refuses before parsing.
            Err(_) => false,
        };
        let targets = [
            Target::new("cluster file", GOOD.as_bytes().to_vec(), &file),
            Target::new("cluster file", FULL.as_bytes().to_vec(), &file),
        ];
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
        fuzz::run_test("cluster file", &targets, &dir, 20_000);
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("must be refused").to_string()
    }

    #[test]
    fn defaults_resolve_relative_to_the_file() {
        let f = parse(GOOD).expect("valid");
        assert_eq!(f.nodes.len(), 2);
        assert_eq!(f.nodes[&NodeId(1)].data_dir, Path::new("/etc/kv/data/1"));
        assert_eq!(f.nodes[&NodeId(2)].data_dir, Path::new("/var/lib/kv2"));
        assert_eq!(f.tls_dir, Path::new("/etc/kv/certs"));
        assert_eq!(f.raft.election_timeout_min_ms, 300);
        assert_eq!(f.raft.heartbeat_interval_ms, 50);
        assert_eq!(f.limits, Limits::default());
        assert_eq!(f.client_api, ClientApi::default());
        assert!(f.client_api.tls && f.client_api.auth, "secure by default");
    }

    #[test]
    fn the_client_api_is_made_plain_only_when_the_file_says_so() {
        let f = parse(&format!("{GOOD}\n[client_api]\ntls = false\n")).expect("valid");
        assert_eq!(
            f.client_api,
            ClientApi {
                tls: false,
                auth: true
            }
        );
        assert_eq!(f.client_api.scheme(), "http");
        let e = error(&format!("{GOOD}\n[client_api]\ntls = \"no\"\n"));
        assert!(
            e.starts_with("/etc/kv/cluster.toml:17:") && e.contains("expected a boolean"),
            "{e}"
        );
    }

    #[test]
    fn snapshot_chunks_are_set_and_bounded_by_the_transport_frame() {
        let f = parse(&format!("{GOOD}snapshot_chunk_bytes = 1048576\n")).expect("valid");
        assert_eq!(f.raft.snapshot_chunk_bytes, 1 << 20);
        let e = error(&format!("{GOOD}snapshot_chunk_bytes = 16777216\n"));
        assert!(
            e.contains("snapshot_chunk_bytes must be at most 8388608"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_address_names_its_line_and_field() {
        let e = error(&GOOD.replace("127.0.0.1:8002", "localhost"));
        assert_eq!(
            e,
            "/etc/kv/cluster.toml:10: `http_addr`: `localhost` is not an ip:port address: invalid socket address syntax"
        );
    }

    #[test]
    fn a_duplicate_id_names_its_line() {
        let e = error(&GOOD.replace("id = 2", "id = 1"));
        assert!(
            e.starts_with("/etc/kv/cluster.toml:8: `id`: node 1 is listed twice"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_field_and_a_wrong_type_name_their_lines() {
        let e = error(&GOOD.replace("data_dir =", "datadir ="));
        assert!(e.starts_with("/etc/kv/cluster.toml:11:"), "{e}");
        assert!(e.contains("datadir"), "{e}");
        let e = error(&GOOD.replace("id = 2", "id = \"two\""));
        assert!(e.starts_with("/etc/kv/cluster.toml:8:"), "{e}");
    }

    #[test]
    fn invalid_raft_timings_are_refused() {
        let e = error(&GOOD.replace("[300, 600]", "[600, 300]"));
        assert!(e.starts_with("/etc/kv/cluster.toml:13: `raft`:"), "{e}");
    }

    #[test]
    fn zero_limits_and_missing_nodes_are_refused() {
        let e = error(&format!("{GOOD}\n[limits]\nmax_value_bytes = 0\n"));
        assert!(e.contains(":17: `max_value_bytes`: must be > 0"), "{e}");
        assert!(error("").contains("at least one [[node]]"));
    }
}
