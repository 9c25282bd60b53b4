//! A local cluster of in-process nodes on 127.0.0.1, over real QUIC and
//! RocksDB, for the HTTP API tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use raft_core::{NodeId, Role};
use raft_kv_example::client::{Client, ClientOptions};
use raft_kv_example::{ClusterFile, Node};

pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `c` with stale (local) reads until it holds `key`: the node has
/// applied that far. Panics with `what` after [`WAIT`].
pub async fn wait_applied(c: &raft_kv_example::client::Client, key: &str, what: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while c.get(key, true).await.expect("stale read").is_none() {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub file: ClusterFile,
    pub nodes: BTreeMap<NodeId, Node>,
}

/// A loopback address nothing uses now, for both QUIC (UDP) and HTTP
/// (TCP), and handed out once per process.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux) from a
/// counter, not by binding port 0: a port the kernel hands out can be
/// handed out again, to another test's probe or to a client connection's
/// local end, between this check and the node's bind (it failed a CI run
/// once with `AddrInUse`). Each process starts at its own offset, so test
/// binaries that run side by side rarely meet, and a port in use is
/// skipped.
pub fn free_addr() -> SocketAddr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id() % 1_000 * 12;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let a = addr(20_000 + ((start + n) % 12_000) as u16);
        if UdpSocket::bind(a).is_ok() && TcpListener::bind(a).is_ok() {
            return a;
        }
    }
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

impl Cluster {
    /// Writes a cluster file of `n` nodes (plus `extra` TOML), certificates,
    /// and starts every node.
    pub async fn start(n: u64, extra: &str) -> Cluster {
        let mut cluster = Cluster::prepare(n, extra).await;
        for id in 1..=n {
            cluster.start_node(NodeId(id)).await;
        }
        cluster
    }

    /// Like [`Cluster::start`] without starting the nodes.
    pub async fn prepare(n: u64, extra: &str) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut text = String::new();
        for id in 1..=n {
            text.push_str(&format!(
                "[[node]]\nid = {id}\nraft_addr = \"{}\"\nhttp_addr = \"{}\"\n\n",
                free_addr(),
                free_addr()
            ));
        }
        text.push_str(extra);
        let path = dir.path().join("cluster.toml");
        std::fs::write(&path, &text).expect("write cluster file");
        let file = ClusterFile::load(&path).expect("valid cluster file");
        raft_kv_example::certs::issue(&file, &file.tls_dir).expect("certs");
        Cluster {
            dir,
            file,
            nodes: BTreeMap::new(),
        }
    }

    pub async fn start_node(&mut self, id: NodeId) {
        let node = Node::start(&self.file, id).await.expect("node starts");
        self.nodes.insert(id, node);
    }

    pub async fn stop_node(&mut self, id: NodeId) {
        if let Some(node) = self.nodes.remove(&id) {
            node.stop().await;
        }
    }

    pub fn endpoint(&self, id: NodeId) -> String {
        endpoint(&self.file, id)
    }

    /// Client options with the cluster's CA and its admin token.
    pub fn options(&self) -> ClientOptions {
        options(&self.file)
    }

    /// A client of node `id`, as admin.
    pub fn client(&self, id: NodeId) -> Client {
        self.client_at(&self.endpoint(id))
    }

    /// A client of node `id`, as admin, whose requests may take up to
    /// `timeout` (membership changes wait for learners).
    pub fn client_waiting(&self, id: NodeId, timeout: Duration) -> Client {
        let options = ClientOptions {
            request_timeout: timeout,
            ..self.options()
        };
        Client::with_options(&[&self.endpoint(id)], options).expect("client")
    }

    /// A client of `endpoint`, as admin of this cluster.
    pub fn client_at(&self, endpoint: &str) -> Client {
        Client::with_options(&[endpoint], self.options()).expect("client")
    }

    /// Raw HTTP as admin: the cluster's CA, its admin token, no redirects
    /// followed.
    pub fn raw(&self) -> reqwest::Client {
        raft_kv_example::client::http_builder(&self.options())
            .expect("http client")
            .timeout(Duration::from_secs(30))
            .build()
            .expect("http client")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until one running node leads and every running node knows it.
    pub async fn leader(&self) -> NodeId {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let leaders: Vec<NodeId> = self
                .nodes
                .iter()
                .filter(|(_, n)| n.raft.metrics().borrow().role == Role::Leader)
                .map(|(id, _)| *id)
                .collect();
            if let [l] = leaders[..]
                && self
                    .nodes
                    .values()
                    .all(|n| n.raft.metrics().borrow().leader_id == Some(l))
            {
                return l;
            }
            assert!(tokio::time::Instant::now() < deadline, "no stable leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Some running node that does not lead.
    pub async fn follower(&self) -> NodeId {
        let l = self.leader().await;
        *self.nodes.keys().find(|id| **id != l).expect("a follower")
    }

    pub async fn shutdown(mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.stop_node(id).await;
        }
    }

    pub fn data_dir(&self, id: NodeId) -> PathBuf {
        self.file.nodes[&id].data_dir.clone()
    }
}

/// The API endpoint of node `id` of `file`.
pub fn endpoint(file: &ClusterFile, id: NodeId) -> String {
    format!(
        "{}://{}",
        file.client_api.scheme(),
        file.nodes[&id].http_addr
    )
}

/// Client options for the cluster of `file`: its CA, its admin token.
pub fn options(file: &ClusterFile) -> ClientOptions {
    let options = ClientOptions::default()
        .with_ca_file(file.tls_dir.join("ca.pem"))
        .expect("CA");
    options
        .with_token_file(
            file.tls_dir
                .join(raft_kv_example::auth::BOOTSTRAP_TOKEN_FILE),
        )
        .expect("admin token")
}

/// A TLS connector trusting the cluster CA of `file`, presenting
/// `client_cert` (certificate and key PEM) if given.
pub fn tls_connector(
    file: &ClusterFile,
    client_cert: Option<(&str, &str)>,
) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(file.tls_dir.join("ca.pem")).expect("CA");
    for c in CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.expect("CA PEM")).expect("CA");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<_> = CertificateDer::pem_slice_iter(cert.as_bytes())
                .map(|c| c.expect("cert"))
                .collect();
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// A TLS connection to node `id`'s client API, checked against the
/// cluster's CA, for tests that write raw bytes.
pub async fn tls_stream(
    file: &ClusterFile,
    id: NodeId,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = file.nodes[&id].http_addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    tls_connector(file, None)
        .connect(name, tcp)
        .await
        .expect("TLS handshake")
}
