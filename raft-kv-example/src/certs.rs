//! `raft-kv certs`: a development CA, each node's certificates, and the
//! first admin token, issued into a cluster's TLS directory.
//!
//! Files, all in the one directory: `ca.pem` and `ca-key.pem` (the CA),
//! `node-<id>.pem` and `node-<id>-key.pem` (node to node, QUIC),
//! `node-<id>-http.pem` and `node-<id>-http-key.pem` (the client API,
//! HTTPS, for the addresses clients dial), `admin.token` (the first admin
//! token, mode 0600: the operator's) and `admin.token.sha256` (its hash:
//! what the nodes read). Private keys and the token are readable by their
//! owner only. What exists is kept, so running it again after adding
//! nodes to the file issues only theirs, from the same CA.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use raft_core::NodeId;
use raft_transport_quic::tls::{DevCerts, TlsError, client_api_cert_file};
use thiserror::Error;

use crate::auth::{BOOTSTRAP_HASH_FILE, BOOTSTRAP_TOKEN_FILE};
use crate::cluster_file::ClusterFile;
use crate::token::{BOOTSTRAP_NAME, Token, TokenError};

/// Why certificates or the token could not be issued.
#[derive(Debug, Error)]
pub enum CertsError {
    /// Making, reading or writing a certificate failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The token could not be made or read back.
    #[error("{path}: {source}")]
    Token {
        /// The token file.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: TokenError,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
}

/// What [`issue`] did.
#[derive(Debug)]
pub struct Issued {
    /// The directory.
    pub dir: PathBuf,
    /// Whether the CA was made now (else the one there was used).
    pub new_ca: bool,
    /// Nodes given a node certificate now.
    pub nodes: Vec<NodeId>,
    /// Nodes given a client API certificate now.
    pub client_api: Vec<NodeId>,
    /// Whether `admin.token` was written now.
    pub new_token: bool,
}

impl fmt::Display for Issued {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "issued {} node certificate(s) and {} client API (HTTPS) certificate(s) from {} into {}",
            self.nodes.len(),
            self.client_api.len(),
            match self.new_ca {
                true => "a new CA",
                false => "the existing CA",
            },
            self.dir.display()
        )?;
        if self.new_token {
            write!(
                f,
                "\nwrote the first admin token to {} (keep it secret)",
                self.dir.join(BOOTSTRAP_TOKEN_FILE).display()
            )?;
        }
        Ok(())
    }
}

/// Issues into `dir` what the nodes of `file` lack (see the module's
/// documentation).
pub fn issue(file: &ClusterFile, dir: &Path) -> Result<Issued, CertsError> {
    let new_ca = !(dir.join("ca.pem").exists() && dir.join("ca-key.pem").exists());
    let lacking: Vec<NodeId> = file
        .nodes
        .keys()
        .copied()
        .filter(|id| new_ca || !dir.join(format!("node-{id}.pem")).exists())
        .collect();
    let mut certs = match new_ca {
        true => DevCerts::generate(lacking.iter().copied())?,
        false => {
            let mut certs = DevCerts::load_ca(dir)?;
            certs.issue(lacking.iter().copied())?;
            certs
        }
    };
    for (id, node) in &file.nodes {
        if new_ca || !dir.join(client_api_cert_file(*id)).exists() {
            certs.issue_client_api(*id, &client_api_names(node.http_addr))?;
        }
    }
    certs.write_to(dir)?;

    let token_path = dir.join(BOOTSTRAP_TOKEN_FILE);
    let bad_token = |source| CertsError::Token {
        path: token_path.clone(),
        source,
    };
    let new_token = !token_path.exists();
    let token = match new_token {
        true => {
            let token = Token::generate(BOOTSTRAP_NAME).map_err(bad_token)?;
            write_secret(&token_path, token.expose())?;
            token
        }
        false => {
            let text = std::fs::read_to_string(&token_path).map_err(|source| CertsError::File {
                path: token_path.clone(),
                source,
            })?;
            Token::parse(&text).map_err(bad_token)?
        }
    };
    let hash_path = dir.join(BOOTSTRAP_HASH_FILE);
    if new_token || !hash_path.exists() {
        std::fs::write(&hash_path, format!("{}\n", token.hash().to_hex())).map_err(|source| {
            CertsError::File {
                path: hash_path,
                source,
            }
        })?;
    }
    Ok(Issued {
        dir: dir.to_path_buf(),
        new_ca,
        nodes: certs.nodes.keys().copied().collect(),
        client_api: certs.client_api.keys().copied().collect(),
        new_token,
    })
}

/// The names a node's client API certificate carries: the address in its
/// `http_addr` (unless it is a wildcard), and the loopback names, for
/// clients on the same host.
pub fn client_api_names(http_addr: SocketAddr) -> Vec<String> {
    let mut names = Vec::new();
    if !http_addr.ip().is_unspecified() {
        names.push(http_addr.ip().to_string());
    }
    for n in ["localhost", "127.0.0.1", "::1"] {
        if !names.iter().any(|x| x == n) {
            names.push(n.to_string());
        }
    }
    names
}

/// Writes `text` and a newline to a new file readable by its owner only;
/// refuses to replace a file.
pub fn write_secret(path: &Path, text: &str) -> Result<(), CertsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertsError::File {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    writeln!(f, "{text}").map_err(io)
}
