//! The client library of the HTTP API, usable without the server:
//!
//! ```toml
//! raft-kv-example = { version = "…", default-features = false, features = ["client"] }
//! ```
//!
//! builds only this module and [`crate::api`] (no RocksDB, no QUIC).
//!
//! A [`Client`] is given one or more nodes' endpoints. It finds the leader
//! (following the `307` redirects of followers) and sends it writes and
//! linearizable reads directly afterwards; it retries what is safe to
//! retry, with exponential backoff and jitter, for up to
//! [`ClientOptions::retry_for`]: refusals that mean "not applied" (`503`,
//! no connection), and, because it writes in a client session
//! ([`raft_core`'s sessions](https://docs.rs/raft-core), `POST /v1/sessions`),
//! writes whose outcome was unknown (`504`, a lost connection): the retry
//! carries the same session and sequence, so the cluster applies the write
//! at most once and answers a retry with the first answer. A write it
//! reports `Ok` was applied exactly once. Errors are typed
//! ([`ClientError`]); [`ClientError::OutcomeUnknown`] is left only when the
//! cluster stayed unreachable for the whole retry time after a try that
//! may have reached it, or the session expired meanwhile.
//!
//! `Client` is `Send + Sync`: share one (in an `Arc`) between tasks; its
//! writes then share one session.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use reqwest::header::LOCATION;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use thiserror::Error;

pub use crate::api::{CasAnswer, Deleted, Status, Written};
use crate::token::{Role, Token};

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// A request that is not retried (status, membership) did not
    /// complete: no connection, a timeout, a bad body.
    #[error("request to {url} failed: {source}")]
    Http {
        /// The URL asked.
        url: String,
        #[source]
        /// reqwest's error.
        source: reqwest::Error,
    },
    /// The server refused the request (`{"error", "message"}`): it was not
    /// applied.
    #[error("{status}: {code}: {message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error's machine-readable code.
        code: String,
        /// Its explanation.
        message: String,
    },
    /// No node answered definitely within the retry time, and no try got
    /// far enough to have applied anything.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The write may or may not have been applied: a try may have reached
    /// the leader, and retrying could not settle it (the cluster stayed
    /// unreachable, or the session expired meanwhile).
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    /// An endpoint is not an `https://host:port` or `http://host:port` URL.
    #[error("invalid endpoint `{0}`: expected https://host:port (or http://host:port)")]
    Endpoint(String),
    /// The CA certificate or the token could not be used.
    #[error("{0}")]
    Credentials(String),
    /// A local file could not be written.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        #[source]
        /// The operating system's error.
        source: std::io::Error,
    },
}

/// What [`Client::save_snapshot`] saved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SavedSnapshot {
    /// The backup's size in bytes.
    pub bytes: u64,
    /// The last log index it holds the state of.
    pub index: u64,
    /// That entry's term.
    pub term: u64,
}

/// How a [`Client`] times and retries its requests.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The longest one HTTP request may take.
    pub request_timeout: Duration,
    /// How long one call keeps retrying before it gives up.
    pub retry_for: Duration,
    /// The first backoff between retries; it doubles up to `backoff_max`,
    /// and each wait is drawn uniformly below it (full jitter).
    pub backoff_min: Duration,
    /// The largest backoff.
    pub backoff_max: Duration,
    /// Write in a client session, so that retried writes apply once. Off,
    /// a write whose outcome is unknown is not retried.
    pub exactly_once: bool,
    /// The CA (PEM) that `https://` nodes' certificates must chain to: the
    /// cluster's `ca.pem`. `None`: the system's trusted roots.
    pub ca_pem: Option<Vec<u8>>,
    /// The bearer token sent with every request (`Authorization: Bearer`).
    pub token: Option<Token>,
}

impl ClientOptions {
    /// These options with the CA certificate in `path` (PEM).
    pub fn with_ca_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let pem = std::fs::read(path)
            .map_err(|e| ClientError::Credentials(format!("CA file {}: {e}", path.display())))?;
        Ok(ClientOptions {
            ca_pem: Some(pem),
            ..self
        })
    }

    /// These options with the token in `path` (as `raft-kv certs` and
    /// `raft-kv token create` write it).
    pub fn with_token_file(self, path: impl AsRef<std::path::Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| ClientError::Credentials(format!("token file {}: {e}", path.display())))?;
        let token = Token::parse(&text)
            .map_err(|e| ClientError::Credentials(format!("token file {}: {e}", path.display())))?;
        Ok(ClientOptions {
            token: Some(token),
            ..self
        })
    }
}

/// An HTTP client as `options` say: the token on every request, servers
/// checked against the CA, redirects left to the caller. Public for tests
/// that speak raw HTTP to a secured cluster.
#[doc(hidden)]
pub fn http_builder(options: &ClientOptions) -> Result<reqwest::ClientBuilder, ClientError> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &options.token {
        let mut value =
            reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|e| ClientError::Credentials(format!("token: {e}")))?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(headers)
        .tls_backend_preconfigured(tls_config(options.ca_pem.as_deref())?))
}

/// The TLS settings of the client: rustls on ring (the provider the rest
/// of the workspace uses), checking servers against `ca_pem` if given,
/// else against the system's roots.
fn tls_config(ca_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, ClientError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let bad = |e: &dyn std::fmt::Display| ClientError::Credentials(format!("TLS: {e}"));
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?;
    let config = match ca_pem {
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
            if roots.is_empty() {
                return Err(ClientError::Credentials(
                    "the CA file holds no certificate".into(),
                ));
            }
            builder.with_root_certificates(roots)
        }
        // A machine without system roots can still reach plain-HTTP
        // nodes; an `https://` one then fails its handshake, saying why.
        None => match rustls_platform_verifier::Verifier::new(provider.clone()) {
            Ok(v) => builder
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(v)),
            Err(_) => builder.with_root_certificates(rustls::RootCertStore::empty()),
        },
    };
    Ok(config.with_no_client_auth())
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            request_timeout: Duration::from_secs(10),
            retry_for: Duration::from_secs(30),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(1),
            exactly_once: true,
            ca_pem: None,
            token: None,
        }
    }
}

/// A client of a raft-kv cluster.
pub struct Client {
    http: reqwest::Client,
    endpoints: Vec<String>,
    options: ClientOptions,
    state: Mutex<State>,
}

struct State {
    /// The leader's endpoint, as the last redirect or answer said.
    leader: Option<String>,
    /// Where to try next when no leader is known.
    next_endpoint: usize,
    session: Option<Session>,
    rng: u64,
}

/// This client's session: its id, the next sequence and the sequences
/// sent but not yet answered (the lowest is the acknowledgement).
struct Session {
    client_id: u64,
    next_seq: u64,
    unanswered: BTreeSet<u64>,
}

/// The definite answer to a call.
struct Sent {
    status: StatusCode,
    bytes: Vec<u8>,
    /// `Replayed: true`: a retry answered from the session.
    replayed: bool,
    /// An earlier try may have been applied.
    maybe_applied: bool,
}

/// How a call may be retried.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// A read or a write in a session: any failure may be retried.
    Always,
    /// A write outside a session: only failures that mean "not applied".
    IfNotApplied,
    /// Membership changes and status: redirects and 503 only.
    Never,
}

/// What one try answered.
enum Answer {
    Done(StatusCode, Vec<u8>, bool),
    /// Not applied; try again (503, connection refused).
    NotApplied(String),
    /// Maybe applied (504, lost connection).
    Unknown(String),
}

impl Client {
    /// A client of the cluster that the node at `endpoint`
    /// (`http://host:port`) belongs to, with default options.
    pub fn new(endpoint: &str) -> Result<Client, ClientError> {
        Client::with_options(&[endpoint], ClientOptions::default())
    }

    /// Like [`Client::new`], each request allowed up to `timeout`.
    pub fn with_timeout(endpoint: &str, timeout: Duration) -> Result<Client, ClientError> {
        let options = ClientOptions {
            request_timeout: timeout,
            ..ClientOptions::default()
        };
        Client::with_options(&[endpoint], options)
    }

    /// A client of the cluster whose nodes include `endpoints`. Stale
    /// reads and [`Client::status`] go to the first.
    pub fn with_options(endpoints: &[&str], options: ClientOptions) -> Result<Client, ClientError> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_string())
            .collect();
        if let Some(bad) = endpoints
            .iter()
            .find(|e| !e.starts_with("https://") && !e.starts_with("http://"))
        {
            return Err(ClientError::Endpoint(bad.clone()));
        }
        if endpoints.is_empty() {
            return Err(ClientError::Endpoint(String::new()));
        }
        let http = http_builder(&options)?
            .timeout(options.request_timeout)
            .build()
            .map_err(|source| ClientError::Http {
                url: endpoints[0].clone(),
                source,
            })?;
        let rng = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            | 1;
        Ok(Client {
            http,
            endpoints,
            options,
            state: Mutex::new(State {
                leader: None,
                next_endpoint: 0,
                session: None,
                rng,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it leaves plain data behind: keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a request for the leader goes now.
    fn leader_endpoint(&self) -> String {
        let s = self.state();
        s.leader
            .clone()
            .unwrap_or_else(|| self.endpoints[s.next_endpoint % self.endpoints.len()].clone())
    }

    /// Forgets the leader after a failure, so the next try asks another
    /// node.
    fn lost(&self, endpoint: &str) {
        let mut s = self.state();
        if s.leader.as_deref() == Some(endpoint) {
            s.leader = None;
        }
        s.next_endpoint = s.next_endpoint.wrapping_add(1);
    }

    /// A random wait below the `attempt`th backoff.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .options
            .backoff_min
            .saturating_mul(1 << attempt.min(16))
            .min(self.options.backoff_max);
        let mut s = self.state();
        // xorshift64: jitter needs no better randomness.
        s.rng ^= s.rng << 13;
        s.rng ^= s.rng >> 7;
        s.rng ^= s.rng << 17;
        cap.mul_f64((s.rng >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// One try at `endpoint`, following up to a few redirects.
    async fn try_once(
        &self,
        mut endpoint: String,
        method: &Method,
        path: &str,
        body: &Option<Vec<u8>>,
        headers: &[(&str, String)],
    ) -> Answer {
        for _ in 0..4 {
            let url = format!("{endpoint}{path}");
            let mut req = self.http.request(method.clone(), &url);
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            if let Some(b) = body {
                req = req.body(b.clone());
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) if e.is_connect() => {
                    self.lost(&endpoint);
                    return Answer::NotApplied(format!("{url}: {}", causes(&e)));
                }
                Err(e) => {
                    self.lost(&endpoint);
                    return Answer::Unknown(format!("{url}: {}", causes(&e)));
                }
            };
            let status = resp.status();
            let replayed = resp.headers().get("replayed").is_some_and(|v| v == "true");
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(origin);
            let bytes = match resp.bytes().await {
                Ok(b) => b.to_vec(),
                Err(e) => {
                    return Answer::Unknown(format!("{url}: reading the answer: {}", causes(&e)));
                }
            };
            match status {
                StatusCode::TEMPORARY_REDIRECT | StatusCode::PERMANENT_REDIRECT => {
                    let Some(leader) = location else {
                        return Answer::Done(status, bytes, false);
                    };
                    self.state().leader = Some(leader.clone());
                    endpoint = leader;
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    self.lost(&endpoint);
                    return Answer::NotApplied(format!("{url}: {}", api_error(status, &bytes)));
                }
                StatusCode::GATEWAY_TIMEOUT if api_code(&bytes) == "outcome_unknown" => {
                    return Answer::Unknown(format!("{url}: {}", api_error(status, &bytes)));
                }
                _ => {
                    if method != Method::GET || !path.contains("consistency=stale") {
                        self.state().leader = Some(endpoint);
                    }
                    return Answer::Done(status, bytes, replayed);
                }
            }
        }
        Answer::NotApplied("too many redirects".into())
    }

    /// Sends a request to the leader (or to `fixed`), retrying as `retry`
    /// allows until an answer is definite or `retry_for` passes. `headers`
    /// is asked anew before each try.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        retry: Retry,
        fixed: Option<&str>,
        headers: &(dyn Fn() -> Vec<(&'static str, String)> + Sync),
    ) -> Result<Sent, ClientError> {
        let deadline = tokio::time::Instant::now() + self.options.retry_for;
        let mut maybe_applied = false;
        let mut attempt = 0;
        loop {
            let endpoint = fixed.map_or_else(|| self.leader_endpoint(), str::to_string);
            let why = match self
                .try_once(endpoint, &method, path, &body, &headers())
                .await
            {
                Answer::Done(status, bytes, replayed) => {
                    return Ok(Sent {
                        status,
                        bytes,
                        replayed,
                        maybe_applied,
                    });
                }
                Answer::NotApplied(why) => why,
                Answer::Unknown(why) => {
                    maybe_applied = true;
                    if retry != Retry::Always {
                        return Err(ClientError::OutcomeUnknown(why));
                    }
                    why
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(match maybe_applied {
                    true => ClientError::OutcomeUnknown(why),
                    false => ClientError::Unavailable(why),
                });
            }
            tokio::time::sleep(self.backoff(attempt)).await;
            attempt += 1;
        }
    }

    /// Opens this client's session if it has none; its id.
    async fn session(&self) -> Result<u64, ClientError> {
        if let Some(s) = &self.state().session {
            return Ok(s.client_id);
        }
        // Opening twice (two tasks at once, or a retried open that had
        // committed) leaves an unused session, which expires.
        let sent = self
            .send(
                Method::POST,
                "/v1/sessions",
                None,
                Retry::Always,
                None,
                &Vec::new,
            )
            .await?;
        let opened: Value = decode(sent.status, &sent.bytes)?;
        let client_id = opened["client_id"]
            .as_u64()
            .ok_or_else(|| bad_response(sent.status, "no client_id"))?;
        let mut s = self.state();
        Ok(s.session
            .get_or_insert(Session {
                client_id,
                next_seq: 1,
                unanswered: BTreeSet::new(),
            })
            .client_id)
    }

    /// A write: in the session (retried until definite) or, without
    /// `exactly_once`, once.
    async fn write<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(T, bool), ClientError> {
        if !self.options.exactly_once {
            let sent = self
                .send(method, path, body, Retry::IfNotApplied, None, &Vec::new)
                .await?;
            return Ok((decode(sent.status, &sent.bytes)?, false));
        }
        // A write refused because its session expired before any try could
        // have applied it is safe to redo in a new session, once.
        for round in 0..2 {
            let client_id = self.session().await?;
            let seq = {
                let mut s = self.state();
                let Some(session) = s.session.as_mut().filter(|s| s.client_id == client_id) else {
                    continue;
                };
                let seq = session.next_seq;
                session.next_seq += 1;
                session.unanswered.insert(seq);
                seq
            };
            let headers = || {
                let ack = self
                    .state()
                    .session
                    .as_ref()
                    .filter(|s| s.client_id == client_id)
                    .and_then(|s| s.unanswered.first().copied())
                    .unwrap_or(seq);
                vec![
                    ("client-id", client_id.to_string()),
                    ("client-seq", seq.to_string()),
                    ("client-ack", ack.to_string()),
                ]
            };
            let sent = self
                .send(
                    method.clone(),
                    path,
                    body.clone(),
                    Retry::Always,
                    None,
                    &headers,
                )
                .await;
            // Answered or given up on, the sequence is not retried again:
            // its answer may be forgotten.
            if let Some(s) = self.state().session.as_mut() {
                s.unanswered.remove(&seq);
            }
            let sent = sent?;
            if sent.status == StatusCode::GONE && api_code(&sent.bytes) == "session_unknown" {
                if sent.maybe_applied {
                    break;
                }
                if round == 1 {
                    return Err(api_error(sent.status, &sent.bytes));
                }
                let mut s = self.state();
                if s.session.as_ref().is_some_and(|s| s.client_id == client_id) {
                    s.session = None;
                }
                continue;
            }
            return Ok((decode(sent.status, &sent.bytes)?, sent.replayed));
        }
        Err(ClientError::OutcomeUnknown(
            "the client session expired while the write was retried, after a try that may have been applied".into(),
        ))
    }

    /// `PUT /v1/kv/{key}`.
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<Written, ClientError> {
        let (mut w, replayed): (Written, bool) = self
            .write(Method::PUT, &kv_path(key), Some(value.to_vec()))
            .await?;
        w.replayed = replayed;
        Ok(w)
    }

    /// `GET /v1/kv/{key}`: the value, or `None` if the key is absent.
    /// Linearizable (from the leader) unless `stale`, which asks the first
    /// endpoint for its local copy.
    pub async fn get(&self, key: &str, stale: bool) -> Result<Option<Vec<u8>>, ClientError> {
        let mut path = kv_path(key);
        let fixed = stale.then(|| {
            path.push_str("?consistency=stale");
            self.endpoints[0].as_str()
        });
        let sent = self
            .send(Method::GET, &path, None, Retry::Always, fixed, &Vec::new)
            .await?;
        match sent.status {
            StatusCode::OK => Ok(Some(sent.bytes)),
            StatusCode::NOT_FOUND if api_code(&sent.bytes) == "key_not_found" => Ok(None),
            status => Err(api_error(status, &sent.bytes)),
        }
    }

    /// `DELETE /v1/kv/{key}`.
    pub async fn delete(&self, key: &str) -> Result<Deleted, ClientError> {
        let (mut d, replayed): (Deleted, bool) =
            self.write(Method::DELETE, &kv_path(key), None).await?;
        d.replayed = replayed;
        Ok(d)
    }

    /// `POST /v1/cas/{key}`: sets `key` to `new` (`None` deletes it) if it
    /// holds `expected` (`None`: is absent).
    pub async fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<CasAnswer, ClientError> {
        let body = serde_json::json!({ "expected": expected, "new": new }).to_string();
        let path = format!("/v1/cas/{}", encode_key(key));
        let (mut c, replayed): (CasAnswer, bool) = self
            .write(Method::POST, &path, Some(body.into_bytes()))
            .await?;
        c.replayed = replayed;
        Ok(c)
    }

    async fn admin(&self, method: Method, path: &str, body: Value) -> Result<Value, ClientError> {
        let body = (!body.is_null()).then(|| body.to_string().into_bytes());
        let sent = self
            .send(method, path, body, Retry::Never, None, &Vec::new)
            .await?;
        decode(sent.status, &sent.bytes)
    }

    /// `POST /v1/tokens`: records `token` (its name, `role` and hash; the
    /// token itself is not sent) on the cluster.
    pub async fn create_token(&self, token: &Token, role: Role) -> Result<Value, ClientError> {
        let body = serde_json::json!({
            "name": token.name(),
            "role": role,
            "hash": token.hash().to_hex(),
        });
        self.admin(Method::POST, "/v1/tokens", body).await
    }

    /// `DELETE /v1/tokens/{name}`: revokes the token `name` on every node.
    pub async fn revoke_token(&self, name: &str) -> Result<Value, ClientError> {
        let path = format!("/v1/tokens/{}", encode_key(name));
        self.admin(Method::DELETE, &path, Value::Null).await
    }

    /// `GET /v1/tokens`: every token's name and role.
    pub async fn list_tokens(&self) -> Result<Value, ClientError> {
        self.admin(Method::GET, "/v1/tokens", Value::Null).await
    }

    /// `POST /v1/members`: adds node `id` as a learner.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: &str,
        http_addr: &str,
    ) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "id": id, "raft_addr": raft_addr, "http_addr": http_addr });
        self.admin(Method::POST, "/v1/members", body).await
    }

    /// `POST /v1/members/{id}/promote`.
    pub async fn promote_member(&self, id: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/members/{id}/promote");
        self.admin(Method::POST, &path, Value::Null).await
    }

    /// `POST /v1/members/{id}/demote`.
    pub async fn demote_member(&self, id: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/members/{id}/demote");
        self.admin(Method::POST, &path, Value::Null).await
    }

    /// `DELETE /v1/members/{id}`.
    pub async fn remove_member(&self, id: u64) -> Result<Value, ClientError> {
        let path = format!("/v1/members/{id}");
        self.admin(Method::DELETE, &path, Value::Null).await
    }

    /// `POST /v1/leader/transfer`.
    pub async fn transfer_leader(&self, to: u64) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "to": to });
        self.admin(Method::POST, "/v1/leader/transfer", body).await
    }

    /// `GET /v1/snapshot`: a backup of the cluster's state from the
    /// leader, holding every write acknowledged before the call, streamed
    /// to `path` (through `path` + `.tmp`, synced, then renamed, so `path`
    /// is whole or absent). Seed a new cluster from it with `raft-kv
    /// snapshot restore`.
    pub async fn save_snapshot(
        &self,
        path: &std::path::Path,
    ) -> Result<SavedSnapshot, ClientError> {
        use tokio::io::AsyncWriteExt;
        let http = http_builder(&self.options)?
            .connect_timeout(self.options.request_timeout)
            .read_timeout(self.options.request_timeout)
            .build()
            .map_err(|source| ClientError::Http {
                url: self.endpoints[0].clone(),
                source,
            })?;
        let deadline = tokio::time::Instant::now() + self.options.retry_for;
        let mut attempt = 0;
        let mut redirected = 0;
        let mut resp = loop {
            let url = format!("{}/v1/snapshot", self.leader_endpoint());
            let why = match http.get(&url).send().await {
                Ok(r) if r.status() == StatusCode::OK => break r,
                Ok(r) if r.status().is_redirection() => {
                    let leader = r
                        .headers()
                        .get(LOCATION)
                        .and_then(|l| l.to_str().ok())
                        .and_then(origin);
                    let found = leader.is_some();
                    self.state().leader = leader;
                    // Straight to the leader, a few times; then as any
                    // other failure (no Location, or nodes that disagree).
                    redirected += 1;
                    if found && redirected <= 4 {
                        continue;
                    }
                    format!("{url}: redirected without reaching the leader")
                }
                Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    self.lost(&url);
                    format!("{url}: 503")
                }
                Ok(r) => {
                    let status = r.status();
                    let body = r.bytes().await.unwrap_or_default();
                    return Err(api_error(status, &body));
                }
                Err(e) => {
                    self.lost(&self.leader_endpoint());
                    format!("{url}: {}", causes(&e))
                }
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Unavailable(why));
            }
            tokio::time::sleep(self.backoff(attempt)).await;
            attempt += 1;
        };
        let number = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (index, term) = (number("snapshot-index"), number("snapshot-term"));
        let tmp = path.with_extension("tmp");
        let io_err = |e: std::io::Error| ClientError::File {
            path: tmp.display().to_string(),
            source: e,
        };
        let mut file = tokio::fs::File::create(&tmp).await.map_err(io_err)?;
        let mut bytes = 0u64;
        loop {
            let chunk = resp.chunk().await.map_err(|source| ClientError::Http {
                url: "/v1/snapshot".into(),
                source,
            })?;
            let Some(chunk) = chunk else { break };
            file.write_all(&chunk).await.map_err(io_err)?;
            bytes += chunk.len() as u64;
        }
        file.sync_all().await.map_err(io_err)?;
        tokio::fs::rename(&tmp, path).await.map_err(io_err)?;
        Ok(SavedSnapshot { bytes, index, term })
    }

    /// `GET /v1/status` of the first endpoint (not redirected).
    pub async fn status(&self) -> Result<Status, ClientError> {
        let url = format!("{}/v1/status", self.endpoints[0]);
        let http_err = |source| ClientError::Http {
            url: url.clone(),
            source,
        };
        let resp = self.http.get(&url).send().await.map_err(http_err)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(http_err)?;
        decode(status, &bytes)
    }
}

/// `scheme://authority` of a URL.
fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split('/').next()?;
    (!authority.is_empty()).then(|| format!("{scheme}://{authority}"))
}

/// `e` and its causes: reqwest's own message ("error sending request")
/// says nothing of a refused connection or an untrusted certificate.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn api_code(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_default()
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let field = |f: &str| v.get(f).and_then(Value::as_str).unwrap_or("").to_string();
    ClientError::Api {
        status,
        code: field("error"),
        message: field("message"),
    }
}

fn bad_response(status: StatusCode, message: impl Into<String>) -> ClientError {
    ClientError::Api {
        status,
        code: "bad_response".into(),
        message: message.into(),
    }
}

/// A success's JSON body as `T`; any other status as its API error.
fn decode<T: DeserializeOwned>(status: StatusCode, bytes: &[u8]) -> Result<T, ClientError> {
    if !status.is_success() {
        return Err(api_error(status, bytes));
    }
    serde_json::from_slice(bytes).map_err(|e| bad_response(status, e.to_string()))
}

fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", encode_key(key))
}

/// Percent-encodes everything but unreserved characters and `/`.
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_redirect_names_the_leader_by_its_origin() {
        assert_eq!(
            origin("http://127.0.0.1:8081/v1/kv/a/b?x=1").as_deref(),
            Some("http://127.0.0.1:8081")
        );
        assert_eq!(origin("/v1/kv/a"), None);
        assert_eq!(origin("http:///x"), None);
    }

    #[test]
    fn backoff_is_jittered_below_a_doubling_cap() {
        let c = Client::new("http://127.0.0.1:1").expect("client");
        for attempt in 0..20 {
            let cap = Duration::from_millis(50)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(1));
            let waits: Vec<Duration> = (0..50).map(|_| c.backoff(attempt)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "{attempt}: {waits:?}");
            assert!(
                waits.iter().any(|w| *w != waits[0]),
                "no jitter at {attempt}"
            );
        }
    }

    #[tokio::test]
    async fn an_unreachable_cluster_is_unavailable_not_unknown() {
        // Port 1 on localhost: connection refused, so nothing was sent.
        let options = ClientOptions {
            retry_for: Duration::from_millis(200),
            ..ClientOptions::default()
        };
        let c = Client::with_options(&["http://127.0.0.1:1"], options).expect("client");
        assert!(matches!(
            c.put("k", b"v").await,
            Err(ClientError::Unavailable(_))
        ));
        assert!(matches!(
            Client::new("ftp://x"),
            Err(ClientError::Endpoint(_))
        ));
    }
}
