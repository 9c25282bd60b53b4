//! One node of the service: RocksDB storage, the QUIC transport, the Raft
//! driver and the HTTP API, started together and stopped together.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use raft_core::{
    HardState, LogId, LogStore, Membership, NodeId, NodeUuid, Raft, RaftError, StartError,
    StateMachine,
};
use raft_storage_rocksdb::{RocksDb, RocksError, RocksOptions, RocksStateMachine};
use raft_transport_quic::tls::{TlsError, TlsIdentity, client_api_server_config};
use raft_transport_quic::{ClusterId, QuicConfig, QuicTransport, TransportError};
use thiserror::Error;
use tracing::{info, warn};

use crate::auth::Auth;
use crate::client::{Client, ClientError, ClientOptions};
use crate::cluster_file::ClusterFile;
use crate::http::{AppState, router};
use crate::logic::KvLogic;
use crate::metrics::{MeteredLogStore, MeteredNetworkFactory, Metrics};
use crate::token::Token;
use crate::types::{Kv, NodeAddr};

/// The Raft group id of the service's one group in its RocksDB.
const GROUP: u64 = 1;

/// Why a node could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The node's id is not in the cluster file.
    #[error("node {0} is not listed in the cluster file")]
    UnknownNode(NodeId),
    /// The RocksDB store could not be opened or used.
    #[error("storage: {0}")]
    Rocks(#[from] RocksError),
    /// The state machine failed.
    #[error("state machine: {0}")]
    Storage(#[from] raft_core::StorageError),
    /// The certificates could not be loaded.
    #[error("TLS: {0} (run `raft-kv certs --config FILE` to create development certificates)")]
    Tls(#[from] TlsError),
    /// The QUIC transport could not start.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// Raft could not start.
    #[error("starting raft: {0}")]
    Start(#[from] StartError),
    /// Bootstrapping the cluster failed.
    #[error("bootstrapping the cluster: {0}")]
    Bootstrap(RaftError<NodeAddr>),
    /// The node has no data and its file names only itself: it neither
    /// joins a cluster nor founds one unless told which.
    #[error(
        "node {0} has no data and its cluster file names only itself: start it with --join <a member's HTTP endpoint> to join a running cluster, or with --bootstrap to found a one-node cluster"
    )]
    Alone(NodeId),
    /// Joining through another member failed.
    #[error("joining through {url}: {reason}")]
    Join {
        /// The member asked.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// A restore was asked for a node that has data already.
    #[error(
        "node {id} has data in {dir} already: a restore seeds a new cluster; give it an empty data directory"
    )]
    NotEmpty {
        /// The node.
        id: NodeId,
        /// Its data directory.
        dir: std::path::PathBuf,
    },
    /// A file in the data or TLS directory could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The dashboard's client of the leader could not be made.
    #[error("dashboard: {0}")]
    Dashboard(String),
    /// The HTTP API could not listen.
    #[error("HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// Seeds node `id` of the cluster in `file` from the backup at `backup`
/// (`raft-kv snapshot restore`, like etcd's snapshot restore): the node's
/// state machine gets the backup's data as its snapshot, with the file's
/// nodes as the voters, and its log starts after it, so it starts as if it
/// had taken that snapshot itself. Run it for every node of the new
/// cluster with the same backup and file; they then start (`serve`) as one
/// cluster with the old one's data. Refuses a node that has data already.
/// Returns the log id the new cluster starts after.
pub async fn restore(
    file: &ClusterFile,
    id: NodeId,
    backup: &std::path::Path,
) -> Result<LogId, ServeError> {
    let me = file.node(id).ok_or(ServeError::UnknownNode(id))?;
    let db = RocksDb::open(&me.data_dir, RocksOptions::default())?;
    let mut log = db.log_store::<Kv>(GROUP)?;
    let mut sm = RocksStateMachine::open(&db, GROUP, KvLogic)?;
    let state = log.log_state().await?;
    let hard = log.load_hard_state().await?;
    if state.last.index.0 != 0 || hard.term.0 != 0 || sm.applied().await? != LogId::ZERO {
        return Err(ServeError::NotEmpty {
            id,
            dir: me.data_dir.clone(),
        });
    }
    let membership = Membership {
        configs: vec![file.nodes.keys().copied().collect()],
        nodes: file.members(),
        uuids: Default::default(),
    };
    let meta = sm.restore(backup, membership).await?;
    log.save_hard_state(HardState {
        term: meta.last_log_id.term,
        voted_for: None,
        uuid: NodeUuid::NONE,
    })
    .await?;
    log.purge(meta.last_log_id).await?;
    // A new cluster: its founders' id, not the old one's.
    let cluster = founding_cluster_id(file)?;
    write_cluster_id(&me.data_dir, cluster).map_err(|source| ServeError::File {
        path: me.data_dir.join(CLUSTER_ID_FILE),
        source,
    })?;
    info!(node = %id, at = %meta.last_log_id, "restored from {}", backup.display());
    Ok(meta.last_log_id)
}

/// The file in a node's data directory that names its cluster (16 hex
/// digits).
const CLUSTER_ID_FILE: &str = "cluster.id";

/// The id of the cluster that the nodes of `file` found together: an
/// FNV-1a hash of the cluster CA's certificate and the founding members'
/// ids and addresses. Every founder computes the same one from the same
/// file and certificates; a cluster founded from other members, or with
/// another CA, gets another. Never 0.
pub fn founding_cluster_id(file: &ClusterFile) -> Result<u64, ServeError> {
    let ca_path = file.tls_dir.join("ca.pem");
    let ca = std::fs::read(&ca_path).map_err(|source| ServeError::File {
        path: ca_path.clone(),
        source,
    })?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&ca);
    for (id, n) in &file.nodes {
        eat(&id.0.to_be_bytes());
        eat(n.raft_addr.to_string().as_bytes());
        eat(&[0]);
    }
    Ok(h.max(1))
}

/// Reads `dir`'s cluster id, if one is recorded.
fn read_cluster_id(dir: &std::path::Path) -> Result<Option<u64>, ServeError> {
    let path = dir.join(CLUSTER_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16)
            .map(Some)
            .map_err(|_| ServeError::File {
                path,
                source: std::io::Error::other("not a cluster id (16 hex digits)"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ServeError::File { path, source }),
    }
}

/// Records `id` as `dir`'s cluster id, durably (a synced temporary file
/// renamed into place, then the directory synced).
fn write_cluster_id(dir: &std::path::Path, id: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!("{CLUSTER_ID_FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{id:016x}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(CLUSTER_ID_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The node's cluster id for the transport to check: the recorded one, or
/// none yet. A node with none adopts the id of the first request that
/// carries one, or, if it leads first, claims its founding id
/// ([`claim_when_leading`]): so founders, a node joining with `--join`, a
/// node whose data was wiped (restarted from a file that may have changed
/// since the cluster was founded) and a cluster of a build before cluster
/// ids all end up with the id of the cluster they are in.
fn cluster_id(dir: &std::path::Path) -> Result<Arc<ClusterId>, ServeError> {
    let id = read_cluster_id(dir)?.unwrap_or(0);
    let dir = dir.to_path_buf();
    Ok(Arc::new(ClusterId::new(id, move |id| {
        write_cluster_id(&dir, id)
    })))
}

/// Once this node leads while its cluster has no id yet, records `founding`
/// as the id; the others adopt it from its next request. Any leader with
/// the same file and CA derives the same id, so a leader that dies before
/// anyone adopted its id is succeeded by one that claims the same.
fn claim_when_leading(raft: Raft<Kv>, cluster: Arc<ClusterId>, founding: u64) {
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        loop {
            if cluster.get() != 0 {
                return;
            }
            if metrics.borrow_and_update().role == raft_core::Role::Leader {
                let c = cluster.clone();
                match tokio::task::spawn_blocking(move || c.claim(founding)).await {
                    Ok(Ok(_)) => return,
                    Ok(Err(e)) => warn!(error = %e, "could not record the cluster id; will retry"),
                    Err(_) => return,
                }
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}

/// A running node.
pub struct Node {
    /// The node's Raft handle.
    pub raft: Raft<Kv>,
    /// Where the HTTP API listens (useful when the file said port 0).
    pub http_addr: std::net::SocketAddr,
    transport: QuicTransport,
    http: tokio::task::JoinHandle<Result<(), std::io::Error>>,
    stop_http: tokio::sync::oneshot::Sender<()>,
    dashboard: crate::dashboard::DashboardHandle,
}

impl Node {
    /// The cluster this node belongs to, as its transport checks it.
    pub fn cluster(&self) -> &Arc<ClusterId> {
        self.transport.cluster()
    }

    /// Starts node `id` of `file`: recovers from its data dir, or on first
    /// start bootstraps the file's members as the initial voters.
    pub async fn start(file: &ClusterFile, id: NodeId) -> Result<Node, ServeError> {
        Node::start_with(file, id, None).await
    }

    /// Like [`Node::start`]; with `join` (any member's HTTP endpoint) a new
    /// node does not bootstrap but asks the cluster to add it as a learner,
    /// and returns once it has caught up (or is added but still behind).
    /// A node that already has state recovers and ignores `join`.
    pub async fn start_with(
        file: &ClusterFile,
        id: NodeId,
        join: Option<&str>,
    ) -> Result<Node, ServeError> {
        Node::start_as(file, id, join, false).await
    }

    /// Like [`Node::start_with`]. A node with no data whose file names only
    /// itself founds a one-node cluster only if `bootstrap` says so; without
    /// it (and without `join`) it refuses with [`ServeError::Alone`]: an
    /// operator who meant to add a node to a running cluster and forgot
    /// `--join` would otherwise get a second, separate cluster under the
    /// same name.
    pub async fn start_as(
        file: &ClusterFile,
        id: NodeId,
        join: Option<&str>,
        bootstrap: bool,
    ) -> Result<Node, ServeError> {
        Node::start_with_token(file, id, join, bootstrap, None).await
    }

    /// Like [`Node::start_as`]; a join authenticates with `token` (it needs
    /// the admin role), or without one with the TLS directory's
    /// `admin.token` if there is one.
    pub async fn start_with_token(
        file: &ClusterFile,
        id: NodeId,
        join: Option<&str>,
        bootstrap: bool,
        token: Option<Token>,
    ) -> Result<Node, ServeError> {
        let me = file.node(id).ok_or(ServeError::UnknownNode(id))?;
        let metrics = Arc::new(Metrics::default());

        let rocks = RocksOptions::default();
        let budget = rocks.memory_budget() + file.raft.log_cache_bytes;
        metrics
            .memory_budget
            .set(i64::try_from(budget).unwrap_or(i64::MAX));
        let db = RocksDb::open(&me.data_dir, rocks)?;
        let mut log = db.log_store::<Kv>(GROUP)?;
        let mut sm = RocksStateMachine::open(&db, GROUP, KvLogic)?;
        let pristine = log.log_state().await?.last.index.0 == 0
            && log.load_hard_state().await?.term.0 == 0
            && sm.applied().await? == LogId::ZERO;
        if pristine && join.is_none() && file.nodes.len() == 1 && !bootstrap {
            return Err(ServeError::Alone(id));
        }
        let founding = founding_cluster_id(file)?;
        let cluster = cluster_id(&me.data_dir)?;
        let log = MeteredLogStore {
            inner: log,
            metrics: metrics.clone(),
        };
        let reader = sm.reader();

        let identity = TlsIdentity::load(&file.tls_dir, id)?;
        let mut transport = QuicTransport::bind(
            QuicConfig {
                bind: me.raft_addr,
                ..QuicConfig::default()
            },
            identity,
        )?;
        transport.set_cluster(cluster.clone());
        let network = MeteredNetworkFactory {
            inner: transport.network_factory::<Kv>(),
            metrics: metrics.clone(),
        };
        let raft = Raft::start(id, file.raft.clone(), log, sm, network).await?;
        transport.serve(raft.clone());
        claim_when_leading(raft.clone(), cluster.clone(), founding);

        if pristine && join.is_none() {
            match raft.initialize(file.members()).await {
                Ok(()) => info!(node = %id, members = file.nodes.len(), "bootstrapped the cluster"),
                // A peer reached us first: we are part of the cluster already.
                Err(RaftError::Initialize(e)) => {
                    info!(node = %id, reason = %e, "not bootstrapping")
                }
                Err(e) => return Err(ServeError::Bootstrap(e)),
            }
        }

        let listener = tokio::net::TcpListener::bind(me.http_addr)
            .await
            .map_err(|source| ServeError::Http {
                addr: me.http_addr,
                source,
            })?;
        let http_addr = listener.local_addr().map_err(|source| ServeError::Http {
            addr: me.http_addr,
            source,
        })?;
        let api = file.client_api;
        let tls = match api.tls {
            true => Some(Arc::new(client_api_server_config(&file.tls_dir, id)?)),
            false => {
                warn!(node = %id, "the client API serves plain HTTP ([client_api] tls = false): tokens and data cross the network unencrypted");
                None
            }
        };
        if !api.auth {
            warn!(node = %id, "the client API asks for no token ([client_api] auth = false): anyone who reaches {http_addr} may read, write and change the cluster");
        }
        let auth = Auth::load(api.auth, reader.clone(), &file.tls_dir).map_err(|source| {
            ServeError::File {
                path: file.tls_dir.join(crate::auth::BOOTSTRAP_HASH_FILE),
                source,
            }
        })?;
        // A follower's dashboard asks the leader for its view, over the
        // client API, with the browser's token.
        let mut relay = ClientOptions::default();
        let ca = file.tls_dir.join("ca.pem");
        if api.tls && ca.exists() {
            relay = relay
                .with_ca_file(&ca)
                .map_err(|e| ServeError::Dashboard(e.to_string()))?;
        }
        let relay = crate::client::http_builder(&relay)
            .and_then(|b| {
                b.build().map_err(|source| ClientError::Http {
                    url: String::new(),
                    source,
                })
            })
            .map_err(|e| ServeError::Dashboard(e.to_string()))?;
        let (dashboard, dashboard_handle) =
            crate::dashboard::start(raft.clone(), cluster.clone(), relay, api.scheme());
        let app = router(AppState {
            dashboard,
            raft: raft.clone(),
            reader,
            limits: file.limits.clone(),
            metrics,
            scratch_dir: me.data_dir.clone(),
            cluster,
            auth: Arc::new(auth),
            scheme: api.scheme(),
        });
        let (stop_http, stopped) = tokio::sync::oneshot::channel::<()>();
        let http = tokio::spawn(crate::listener::serve(listener, tls, app, async move {
            let _ = stopped.await;
        }));
        info!(node = %id, raft = %me.raft_addr, http = %http_addr, scheme = api.scheme(), auth = api.auth, "serving");
        match join {
            Some(url) if pristine => join_cluster(url, me.addr(), id, file, token).await?,
            Some(_) => info!(node = %id, "already a member (state on disk); not joining again"),
            None => {}
        }
        Ok(Node {
            raft,
            http_addr,
            transport,
            http,
            stop_http,
            dashboard: dashboard_handle,
        })
    }

    /// Runs until `signal` resolves, then stops cleanly.
    pub async fn run_until(self, signal: impl Future<Output = ()>) {
        signal.await;
        self.stop().await;
    }

    /// Stops serving clients, then the Raft node, then the transport.
    pub async fn stop(self) {
        // Dashboard streams never end by themselves.
        self.dashboard.close();
        let _ = self.stop_http.send(());
        // In-flight requests get a moment to finish; a client that keeps its
        // connection open does not hold the shutdown hostage.
        if tokio::time::timeout(Duration::from_secs(2), self.http)
            .await
            .is_err()
        {
            warn!("HTTP connections still open at shutdown; closing them");
        }
        self.raft.shutdown().await;
        self.transport.close().await;
        info!("stopped");
    }
}

/// Asks the cluster at `url` to add this node as a learner, retrying while
/// it has no leader or another change is under way.
async fn join_cluster(
    url: &str,
    me: NodeAddr,
    id: NodeId,
    file: &ClusterFile,
    token: Option<Token>,
) -> Result<(), ServeError> {
    let fail = |reason: String| ServeError::Join {
        url: url.to_string(),
        reason,
    };
    let mut options = ClientOptions {
        request_timeout: file.limits.membership_timeout + Duration::from_secs(5),
        token,
        ..ClientOptions::default()
    };
    let ca = file.tls_dir.join("ca.pem");
    if ca.exists() {
        options = options.with_ca_file(&ca).map_err(|e| fail(e.to_string()))?;
    }
    let admin = file.tls_dir.join(crate::auth::BOOTSTRAP_TOKEN_FILE);
    if options.token.is_none() && admin.exists() {
        options = options
            .with_token_file(&admin)
            .map_err(|e| fail(e.to_string()))?;
    }
    let client = Client::with_options(&[url], options).map_err(|e| fail(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + file.limits.membership_timeout;
    loop {
        match client.add_member(id.0, &me.raft_addr, &me.http_addr).await {
            Ok(_) => {
                info!(node = %id, via = url, "joined the cluster as a learner");
                return Ok(());
            }
            Err(ClientError::Api { code, .. }) if code == "learner_behind" => {
                info!(node = %id, "added as a learner; still catching up");
                return Ok(());
            }
            Err(ClientError::Api { code, .. }) if code == "already_member" => {
                info!(node = %id, "already a member of the cluster");
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                warn!(node = %id, error = %e, "join not accepted yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(fail(e.to_string())),
        }
    }
}
