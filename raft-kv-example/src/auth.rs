//! Who may do what on the client API: bearer tokens ([`crate::token`]),
//! their records in the replicated state, and the role each request needs.
//!
//! **Where tokens live.** Each token is one record in the state machine,
//! under a key no client key can take (`0xFF` starts no UTF-8 string), so
//! it is replicated like the data: created and revoked by log entries
//! (`Command::CreateToken`, `Command::RevokeToken`), carried in snapshots
//! and backups, and checked on every node against what that node has
//! applied. A revocation stops the token on each node as soon as the node
//! applies it: within a heartbeat or two on a live node, and no restart.
//! A record holds the token's role and SHA-256, never the token.
//!
//! **The first token.** `raft-kv certs` writes `admin.token` (the token,
//! for the operator) and `admin.token.sha256` (its hash, for the nodes)
//! into the TLS directory. A node that finds the hash accepts that token
//! as [`BOOTSTRAP_NAME`] with the admin role for as long as the replicated
//! state holds no record of that name: revoking `admin` (a tombstone
//! record) ends it on every node, and creating `admin` anew replaces it.

use std::path::Path;

use axum::http::{HeaderValue, Method};
use raft_storage_rocksdb::{RocksError, RocksReader, WriteView};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use tracing::warn;

use crate::token::{BOOTSTRAP_NAME, Role, Token, TokenHash, check_name};

/// The prefix of every token record.
const TOKEN_PREFIX: &[u8] = b"\xFFraft-kv/token/";

/// The file in the TLS directory holding the bootstrap token's hash.
pub const BOOTSTRAP_HASH_FILE: &str = "admin.token.sha256";
/// The file in the TLS directory holding the bootstrap token (mode 0600).
pub const BOOTSTRAP_TOKEN_FILE: &str = "admin.token";

/// One token's record in the replicated state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenRecord {
    /// The token works.
    Live {
        /// What it may do.
        role: Role,
        /// The SHA-256 of the whole token.
        hash: TokenHash,
    },
    /// Revoked: no token of this name works until one is created anew.
    Revoked,
}

fn record_key(name: &str) -> Vec<u8> {
    let mut k = TOKEN_PREFIX.to_vec();
    k.extend_from_slice(name.as_bytes());
    k
}

fn decode_record(name: &str, bytes: &[u8]) -> Result<TokenRecord, String> {
    raft_core::codec::decode(bytes).map_err(|e| format!("token record `{name}`: {e}"))
}

fn read_record(view: &mut WriteView<'_>, name: &str) -> Option<TokenRecord> {
    let bytes = view.get(&record_key(name))?;
    match decode_record(name, &bytes) {
        Ok(r) => Some(r),
        Err(detail) => {
            let e = view.corrupt(detail);
            view.fail(e);
            None
        }
    }
}

fn write_record(view: &mut WriteView<'_>, name: &str, record: TokenRecord) {
    match raft_core::codec::encode(&record) {
        Ok(bytes) => view.put(&record_key(name), &bytes),
        Err(e) => {
            let e = view.corrupt(format!("encoding token record `{name}`: {e}"));
            view.fail(e);
        }
    }
}

/// Applies `CreateToken`: records `name` with `role` and `hash` unless a
/// live token of that name exists. Whether it was created.
pub fn apply_create(view: &mut WriteView<'_>, name: &str, role: Role, hash: TokenHash) -> bool {
    if check_name(name).is_err() {
        return false;
    }
    if let Some(TokenRecord::Live { .. }) = read_record(view, name) {
        return false;
    }
    write_record(view, name, TokenRecord::Live { role, hash });
    true
}

/// Applies `RevokeToken`: leaves a tombstone for `name`. Whether a live
/// token of that name was recorded (the bootstrap token, which has no
/// record until it is revoked, counts as live).
pub fn apply_revoke(view: &mut WriteView<'_>, name: &str) -> bool {
    if check_name(name).is_err() {
        return false;
    }
    let was = match read_record(view, name) {
        Some(TokenRecord::Live { .. }) => true,
        Some(TokenRecord::Revoked) => false,
        None => name == BOOTSTRAP_NAME,
    };
    write_record(view, name, TokenRecord::Revoked);
    was
}

/// Why a request was not let through.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token, or one this node does not accept (malformed, unknown,
    /// wrong, revoked): 401, and the answer never says which.
    Unauthenticated,
    /// A valid token whose role is short of `needed`: 403.
    Forbidden {
        /// The role the request needs.
        needed: Role,
        /// The token's role.
        has: Role,
    },
    /// The records could not be read now (a snapshot install is replacing
    /// them): 503.
    Unavailable(String),
}

/// The node's gatekeeper.
pub struct Auth {
    enabled: bool,
    reader: RocksReader,
    bootstrap: Option<TokenHash>,
}

impl Auth {
    /// Checks tokens against `reader`'s records, and the bootstrap token
    /// of `tls_dir` if it holds [`BOOTSTRAP_HASH_FILE`]. With `enabled`
    /// false every request is let through.
    pub fn load(enabled: bool, reader: RocksReader, tls_dir: &Path) -> std::io::Result<Auth> {
        let path = tls_dir.join(BOOTSTRAP_HASH_FILE);
        let bootstrap = match std::fs::read_to_string(&path) {
            Ok(text) => Some(TokenHash::from_hex(&text).ok_or_else(|| {
                std::io::Error::other(format!(
                    "{}: not a SHA-256 in hex (64 digits)",
                    path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Auth {
            enabled,
            reader,
            bootstrap,
        })
    }

    /// Whether requests need a token.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether this node accepts a bootstrap token.
    pub fn has_bootstrap(&self) -> bool {
        self.bootstrap.is_some()
    }

    /// Lets a request with `authorization` (the header's value) through if
    /// its token has at least `needed`.
    pub fn check(&self, authorization: Option<&HeaderValue>, needed: Role) -> Result<(), Denied> {
        if !self.enabled {
            return Ok(());
        }
        let token = authorization
            .and_then(|v| Token::from_header(v.as_bytes()).ok())
            .ok_or(Denied::Unauthenticated)?;
        let has = self.role_of(&token)?.ok_or(Denied::Unauthenticated)?;
        match has >= needed {
            true => Ok(()),
            false => Err(Denied::Forbidden { needed, has }),
        }
    }

    /// The role of `token`, if this node accepts it. The presented hash is
    /// compared in constant time, and against a stand-in when there is no
    /// record, so an unknown name costs what a wrong secret costs.
    fn role_of(&self, token: &Token) -> Result<Option<Role>, Denied> {
        let presented = token.hash();
        let name = token.name();
        let stored = match self.record(name)? {
            Some(TokenRecord::Live { role, hash }) => Some((role, hash)),
            Some(TokenRecord::Revoked) => None,
            None if name == BOOTSTRAP_NAME => self.bootstrap.map(|h| (Role::Admin, h)),
            None => None,
        };
        let (role, hash) = stored.unwrap_or((Role::Read, TokenHash([0xA5; 32])));
        let equal = bool::from(presented.0.ct_eq(&hash.0));
        Ok((equal && stored.is_some()).then_some(role))
    }

    /// The record of `name` as this node has applied it.
    pub fn record(&self, name: &str) -> Result<Option<TokenRecord>, Denied> {
        match self.reader.get(&record_key(name)) {
            Ok(None) => Ok(None),
            Ok(Some(bytes)) => match decode_record(name, &bytes) {
                Ok(r) => Ok(Some(r)),
                Err(e) => {
                    // Refused, logged, and the node keeps serving.
                    warn!(error = %e, "corrupt token record; refusing the token");
                    Ok(Some(TokenRecord::Revoked))
                }
            },
            Err(e @ RocksError::Installing { .. }) => Err(Denied::Unavailable(e.to_string())),
            Err(e) => {
                warn!(error = %e, "reading a token record failed; refusing the token");
                Err(Denied::Unavailable(e.to_string()))
            }
        }
    }

    /// Every token record this node has applied, by name; the bootstrap
    /// token, while it has none, as a live admin token.
    pub fn list(&self) -> Result<Vec<(String, TokenRecord)>, Denied> {
        let rows = self
            .reader
            .scan_prefix(TOKEN_PREFIX)
            .map_err(|e| Denied::Unavailable(e.to_string()))?;
        let mut out: Vec<(String, TokenRecord)> = Vec::with_capacity(rows.len() + 1);
        for (key, bytes) in rows {
            let name = String::from_utf8_lossy(&key[TOKEN_PREFIX.len()..]).into_owned();
            let record = decode_record(&name, &bytes).unwrap_or(TokenRecord::Revoked);
            out.push((name, record));
        }
        if let Some(hash) = self.bootstrap
            && !out.iter().any(|(n, _)| n == BOOTSTRAP_NAME)
        {
            out.push((
                BOOTSTRAP_NAME.into(),
                TokenRecord::Live {
                    role: Role::Admin,
                    hash,
                },
            ));
            out.sort_by(|a, b| a.0.cmp(&b.0));
        }
        Ok(out)
    }
}

/// The role a request needs, by method and path; `None` for the paths
/// open to anyone: `/healthz` (a liveness probe that says nothing about
/// the data) and the dashboard's page (`/`, `/ui`: static, no data). Paths the API does not have need `read`, so that only a
/// client with a token learns which paths exist.
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    let reads = matches!(*method, Method::GET | Method::HEAD);
    let role = if matches!(path, "/healthz" | "/" | "/ui") {
        // The dashboard's page holds no data: it asks for a token and
        // reads `/v1/events` with it.
        return None;
    } else if path.starts_with("/v1/kv/") {
        if reads { Role::Read } else { Role::Write }
    } else if path.starts_with("/v1/cas/") || path == "/v1/sessions" {
        Role::Write
    } else if path == "/v1/snapshot"
        || path == "/v1/members"
        || path.starts_with("/v1/members/")
        || path.starts_with("/v1/leader/")
        || path == "/v1/tokens"
        || path.starts_with("/v1/tokens/")
    {
        Role::Admin
    } else {
        Role::Read
    };
    Some(role)
}
