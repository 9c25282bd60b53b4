//! Mutual TLS for the cluster: every node presents a certificate signed by
//! the cluster CA whose DNS name is `node-<id>.raft`, and checks its peer's.
//! There is no plain-text or skip-verification mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use raft_core::NodeId;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use thiserror::Error;

/// Why certificates could not be made, loaded or used.
#[derive(Debug, Error)]
pub enum TlsError {
    /// Making a certificate or key failed.
    #[error("generating certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate or key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: no usable {what} in PEM file")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was looked for (a certificate, a private key).
        what: &'static str,
    },
    /// rustls refused the certificates or keys.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The peer-certificate verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
}

/// The DNS name a node's certificate carries and peers dial it by.
pub fn node_name(id: NodeId) -> String {
    format!("node-{id}.raft")
}

/// The node id in a certificate's DNS names, if it names exactly one node.
pub fn node_id_of(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let mut ids = san.value.general_names.iter().filter_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => d
            .strip_prefix("node-")?
            .strip_suffix(".raft")?
            .parse::<u64>()
            .ok()
            .map(NodeId),
        _ => None,
    });
    let id = ids.next()?;
    ids.next().is_none().then_some(id)
}

/// A development CA and one certificate per node, as PEM.
pub struct DevCerts {
    /// The CA's certificate.
    pub ca_pem: String,
    /// The CA's private key: kept (in `ca-key.pem`) so that nodes added
    /// later get certificates from the same CA.
    pub ca_key_pem: String,
    /// Per node: certificate PEM and private key PEM.
    pub nodes: BTreeMap<NodeId, (String, String)>,
    /// Per node: the certificate and key of its client API (HTTPS), whose
    /// names are the addresses clients dial.
    pub client_api: BTreeMap<NodeId, (String, String)>,
}

/// The development CA's parameters; the same every time, so a CA loaded
/// back from its key issues certificates that chain to its certificate.
fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "raft development cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(ca_params)
}

impl DevCerts {
    /// Generates a fresh CA and a certificate for each of `ids`.
    pub fn generate(ids: impl IntoIterator<Item = NodeId>) -> Result<DevCerts, TlsError> {
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params()?.self_signed(&ca_key)?;
        let mut certs = DevCerts {
            ca_pem: ca_cert.pem(),
            ca_key_pem: ca_key.serialize_pem(),
            nodes: BTreeMap::new(),
            client_api: BTreeMap::new(),
        };
        certs.issue(ids)?;
        Ok(certs)
    }

    /// Loads the CA that [`DevCerts::write_to`] left in `dir` (no node
    /// certificates), to issue more with [`DevCerts::issue`].
    pub fn load_ca(dir: &Path) -> Result<DevCerts, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| TlsError::Io { path, source })
        };
        Ok(DevCerts {
            ca_pem: read("ca.pem")?,
            ca_key_pem: read("ca-key.pem")?,
            nodes: BTreeMap::new(),
            client_api: BTreeMap::new(),
        })
    }

    /// Issues a certificate from this CA for each of `ids`.
    pub fn issue(&mut self, ids: impl IntoIterator<Item = NodeId>) -> Result<(), TlsError> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        for id in ids {
            let mut p = CertificateParams::new(vec![node_name(id)])?;
            p.distinguished_name.push(DnType::CommonName, node_name(id));
            let key = KeyPair::generate()?;
            let cert = p.signed_by(&key, &issuer)?;
            self.nodes.insert(id, (cert.pem(), key.serialize_pem()));
        }
        Ok(())
    }

    /// Issues node `id`'s client-API (HTTPS server) certificate from this
    /// CA, for `names`: IP addresses (as text) become IP names, anything
    /// else a DNS name. Clients check the name they dial against these.
    pub fn issue_client_api(&mut self, id: NodeId, names: &[String]) -> Result<(), TlsError> {
        let ca_key = KeyPair::from_pem(&self.ca_key_pem)?;
        let issuer = Issuer::new(ca_params()?, ca_key);
        let mut p = CertificateParams::new(names.to_vec())?;
        p.distinguished_name
            .push(DnType::CommonName, format!("raft-kv node {id} client API"));
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        self.client_api
            .insert(id, (cert.pem(), key.serialize_pem()));
        Ok(())
    }

    /// Writes `ca.pem`, `ca-key.pem`, `node-<id>.pem` and `node-<id>-key.pem`,
    /// and `node-<id>-http.pem` and `node-<id>-http-key.pem` for the client
    /// API certificates issued, into `dir` (keys readable by the owner only).
    pub fn write_to(&self, dir: &Path) -> Result<(), TlsError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &self.ca_pem).map_err(io(&ca))?;
        let ca_key = dir.join("ca-key.pem");
        write_private(&ca_key, &self.ca_key_pem).map_err(io(&ca_key))?;
        for (id, (cert, key)) in &self.nodes {
            let c = dir.join(format!("node-{id}.pem"));
            std::fs::write(&c, cert).map_err(io(&c))?;
            let k = dir.join(format!("node-{id}-key.pem"));
            write_private(&k, key).map_err(io(&k))?;
        }
        for (id, (cert, key)) in &self.client_api {
            let c = dir.join(client_api_cert_file(*id));
            std::fs::write(&c, cert).map_err(io(&c))?;
            let k = dir.join(client_api_key_file(*id));
            write_private(&k, key).map_err(io(&k))?;
        }
        Ok(())
    }

    /// The identity of node `id`, in memory.
    pub fn identity(&self, id: NodeId) -> Result<TlsIdentity, TlsError> {
        let (cert, key) = self.nodes.get(&id).ok_or_else(|| TlsError::Pem {
            path: PathBuf::from(format!("<generated node {id}>")),
            what: "certificate for this node",
        })?;
        TlsIdentity::from_pem(
            id,
            self.ca_pem.as_bytes(),
            cert.as_bytes(),
            key.as_bytes(),
            Path::new("<generated>"),
        )
    }
}

/// The file of node `id`'s client-API certificate.
pub fn client_api_cert_file(id: NodeId) -> String {
    format!("node-{id}-http.pem")
}

/// The file of node `id`'s client-API private key.
pub fn client_api_key_file(id: NodeId) -> String {
    format!("node-{id}-http-key.pem")
}

/// The TLS configuration of node `id`'s client API (HTTPS), from `dir`:
/// its certificate and key ([`client_api_cert_file`], issued by
/// [`DevCerts::issue_client_api`]), TLS 1.2 and 1.3, HTTP/1.1. Clients
/// need no certificate; one that presents one must present one from the
/// cluster CA (`ca.pem`), or the handshake fails.
pub fn client_api_server_config(dir: &Path, id: NodeId) -> Result<rustls::ServerConfig, TlsError> {
    let read = |name: String| {
        let path = dir.join(name);
        std::fs::read(&path).map_err(|source| TlsError::Io { path, source })
    };
    let ca = read("ca.pem".into())?;
    let cert = read(client_api_cert_file(id))?;
    let key = read(client_api_key_file(id))?;
    let identity = TlsIdentity::from_pem(id, &ca, &cert, &key, dir)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        identity.roots()?,
        TlsIdentity::provider(),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut c = rustls::ServerConfig::builder_with_provider(TlsIdentity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain, identity.key)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// Writes a private key readable by its owner only.
fn write_private(path: &Path, pem: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(pem.as_bytes())
}

/// One node's CA, certificate and key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// The node this identity is.
    pub id: NodeId,
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        TlsIdentity {
            id: self.id,
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl TlsIdentity {
    /// Loads `ca.pem`, `node-<id>.pem` and `node-<id>-key.pem` from `dir`.
    pub fn load(dir: &Path, id: NodeId) -> Result<TlsIdentity, TlsError> {
        let read = |name: String| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| TlsError::Io {
                path: path.clone(),
                source,
            })
        };
        let ca = read("ca.pem".into())?;
        let cert = read(format!("node-{id}.pem"))?;
        let key = read(format!("node-{id}-key.pem"))?;
        TlsIdentity::from_pem(id, &ca, &cert, &key, dir)
    }

    /// An identity from PEM bytes: the CA, this node's certificate chain
    /// and its key. `dir` is named in errors.
    pub fn from_pem(
        id: NodeId,
        ca: &[u8],
        cert: &[u8],
        key: &[u8],
        origin: &Path,
    ) -> Result<TlsIdentity, TlsError> {
        let pem_err = |what| TlsError::Pem {
            path: origin.to_path_buf(),
            what,
        };
        let ca: Vec<_> = CertificateDer::pem_slice_iter(ca)
            .filter_map(Result::ok)
            .collect();
        let chain: Vec<_> = CertificateDer::pem_slice_iter(cert)
            .filter_map(Result::ok)
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|_| pem_err("private key"))?;
        if ca.is_empty() {
            return Err(pem_err("CA certificate"));
        }
        if chain.is_empty() {
            return Err(pem_err("node certificate"));
        }
        Ok(TlsIdentity { id, ca, chain, key })
    }

    fn roots(&self) -> Result<Arc<rustls::RootCertStore>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(Arc::new(roots))
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// Server side: requires a client certificate from the cluster CA.
    pub(crate) fn server_crypto(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots()?,
            Self::provider(),
        )
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut c = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }

    /// Client side: presents our certificate; the server's must come from
    /// the cluster CA and name the node we dial.
    pub(crate) fn client_crypto(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut c = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        c.alpn_protocols = vec![ALPN.to_vec()];
        Ok(c)
    }
}

/// The application protocol name, so a stray QUIC client is refused early.
///
/// `raft/2`: `SnapshotMeta` carries the snapshot's size; a `raft/1` peer
/// could not decode it, so the two refuse each other at the handshake.
/// `raft/3`: snapshot chunks carry a checksum.
/// `raft/4`: responses and vote requests carry the sender's identity
/// (`NodeUuid`), and a configuration the members' recorded identities.
/// `raft/5`: requests carry the sender's cluster id (`ClusterId`).
pub const ALPN: &[u8] = b"raft/5";
