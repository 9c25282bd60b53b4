//! The client API over HTTP/1.1 (over TLS by default: [`crate::listener`]).
//!
//! | method and path | answer |
//! |---|---|
//! | `PUT /v1/kv/{key}` (body: the raw value) | 200 `{"index": N}` once committed and applied |
//! | `GET /v1/kv/{key}[?consistency=stale]` | 200 with the raw value, or 404; linearizable (ReadIndex) unless `stale` |
//! | `DELETE /v1/kv/{key}` | 200 `{"index": N, "deleted": bool}` |
//! | `POST /v1/cas/{key}` `{"expected": s\|null, "new": s\|null}` | 200 `{"succeeded": bool, "current": s\|null}` |
//! | `POST /v1/sessions` | opens a client session: 200 `{"client_id": N}` |
//! | `GET /v1/snapshot` | the leader's state as one backup file (`raft-kv snapshot save`), with `Snapshot-Index` and `Snapshot-Term` headers |
//! | `GET /v1/status` | the node's role, term, leader, indices and members |
//! | `GET /metrics` | Prometheus text |
//! | `POST /v1/members` `{"id", "raft_addr", "http_addr"}` | adds a learner; 200 `{"index"}` once caught up, 504 if it is still behind (it stays) |
//! | `POST /v1/members/{id}/promote` | makes learner `id` a voter (joint consensus) once it is caught up; 200 once final, 504 `learner_behind` if it does not catch up in time |
//! | `POST /v1/members/{id}/demote` | makes voter `id` a learner (joint consensus); 200 once final |
//! | `DELETE /v1/members/{id}` | removes a voter (joint consensus) or a learner; 200 once final |
//! | `POST /v1/leader/transfer` `{"to": id}` | 200 once `id` leads, 504 if it did not take over in time |
//! | `POST /v1/tokens` `{"name", "role", "hash"}` | records a bearer token by its SHA-256 (the client makes the token); 200 `{"name", "role", "index"}`, 409 `token_exists` |
//! | `DELETE /v1/tokens/{name}` | revokes a token on every node: 200 `{"name", "revoked", "index"}` |
//! | `GET /v1/tokens` | every token's name and role (`revoked` ones too) |
//!
//! **Who may call what** ([`crate::auth`]). Every request but `GET
//! /healthz` carries `Authorization: Bearer <token>`. Roles: `read` (GETs
//! of keys, status, readiness, metrics), `write` (read, and PUT, DELETE,
//! CAS, sessions), `admin` (write, and membership, leadership transfer,
//! backups, tokens). No token or one the node does not accept: 401
//! `unauthorized` (with `WWW-Authenticate: Bearer`), the same answer
//! whatever was wrong with it; a valid token short of the role: 403
//! `forbidden`. Both before anything else: an unauthenticated client
//! learns nothing, not even where the leader is. The cluster file can turn
//! this off (`[client_api] auth = false`, warned at start).
//!
//! A node that does not lead answers writes and linearizable reads with
//! `307` and a `Location` on the leader's `http_addr` (`https://` unless
//! the file says `[client_api] tls = false`); with no known leader,
//! `503` and `Retry-After`. Errors are `{"error": code, "message": text}`:
//! 400 malformed input, 401 no valid token, 403 role too weak, 404 unknown
//! path or key, 405 wrong method, 413 key or value too large, 503
//! unavailable, 504 outcome unknown.
//!
//! **Exactly-once writes.** PUT, DELETE and CAS made with the headers
//! `Client-Id: N` (from `POST /v1/sessions`) and `Client-Seq: S` (the
//! client's own number for this write; a retry reuses it) are applied at
//! most once per (id, sequence) ([`raft_core::session`]): a retry of a
//! write already applied gets the first answer again, with the header
//! `Replayed: true` and the index of the entry that applied it. So a
//! client retries a 504 with the same headers until the answer is
//! definite. `Client-Ack: A` says the client has seen the answers of all
//! its sequences below `A` (they are then forgotten; without it a session
//! keeps every answer, up to 4,096). A session unused for ten minutes
//! expires. Refusals, none of them applied: 410 `session_unknown`
//! (expired or never opened: open a new one), 409 `session_stale` (that
//! sequence was acknowledged), 429 `session_full` (too many unacknowledged
//! answers). Requests without the headers are applied once per commit, as
//! before: a 504 then leaves the outcome unknown.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::FromRequestParts;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use raft_core::session::{SessionError, SessionLimits, SessionTag};
use raft_core::{MembershipError, NodeId, Raft, RaftError, Role};
use raft_storage_rocksdb::{RocksError, RocksReader};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::CasAnswer;
pub use crate::api::Status;
use crate::auth::{self, Auth, Denied, TokenRecord};
use crate::cluster_file::Limits;
use crate::dashboard::{self, Dashboard};
use crate::metrics::{Metrics, role_name};
use crate::token::{self, BOOTSTRAP_NAME, TokenHash, check_name};
use crate::types::{Command, Kv, NodeAddr, Response as KvResponse, SessionWrite};

/// Awaits a call to the Raft handle for at most `limit`: its error becomes
/// the matching API error for the request at `uri`, running out of time
/// becomes `on_timeout`.
async fn bounded<T>(
    limit: std::time::Duration,
    call: impl std::future::Future<Output = Result<T, RaftError<NodeAddr>>>,
    uri: &Uri,
    on_timeout: impl FnOnce() -> ApiError,
) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map_err(|e| ApiError::from_raft(e, uri)),
        Err(_) => Err(on_timeout()),
    }
}

/// The `{key}` of a path, percent-decoded; a key that is not valid UTF-8
/// after decoding is a 400 like any other malformed input.
struct Key(String);

impl<S: Send + Sync> FromRequestParts<S> for Key {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Key, ApiError> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(k)| Key(k))
            .map_err(|e| ApiError::bad_request(format!("invalid key: {}", e.body_text())))
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// This node's Raft handle.
    pub raft: Raft<Kv>,
    /// Reads of the state machine.
    pub reader: RocksReader,
    /// Request size limits.
    pub limits: Limits,
    /// The node's counters, for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Where `GET /v1/snapshot` writes a backup before sending it (the
    /// node's data directory: a backup is as large as the data).
    pub scratch_dir: std::path::PathBuf,
    /// The cluster this node belongs to.
    pub cluster: Arc<raft_transport_quic::ClusterId>,
    /// Who may do what ([`crate::auth`]).
    pub auth: Arc<Auth>,
    /// `https` or `http`: what redirects to the leader say.
    pub scheme: &'static str,
    /// The live dashboard ([`crate::dashboard`]).
    pub dashboard: Dashboard,
}

/// The API's routes.
pub fn router(state: AppState) -> Router {
    // The body limit is checked by the handlers (413 as JSON); the extractor
    // stops reading one byte past it.
    let body_limit = state.limits.max_value_bytes.saturating_mul(2).max(64 << 10);
    Router::new()
        .route(
            "/v1/kv/{*key}",
            get(get_key).put(put_key).delete(delete_key),
        )
        .route("/v1/cas/{*key}", post(cas))
        .route("/v1/sessions", post(open_session))
        .route("/v1/snapshot", get(snapshot))
        .route("/v1/status", get(status))
        .route("/v1/members", post(add_member))
        .route("/v1/members/{id}", delete(remove_member))
        .route("/v1/members/{id}/promote", post(promote_member))
        .route("/v1/members/{id}/demote", post(demote_member))
        .route("/v1/leader/transfer", post(transfer_leader))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{name}", delete(revoke_token))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/", get(dashboard::page))
        .route("/ui", get(dashboard::page))
        .route(
            "/v1/events",
            get(|State(s): State<AppState>, headers: HeaderMap| async move {
                dashboard::events(&s.dashboard, &headers).await
            }),
        )
        .route(
            "/v1/dashboard/sample",
            get(|State(s): State<AppState>| async move { dashboard::sample(&s.dashboard).await }),
        )
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such path") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this path",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), gate))
        .with_state(state)
}

/// In front of every route: the token must carry the role the request
/// needs ([`auth::required_role`]; 401 or 403 otherwise, before anything
/// else is looked at, so an unauthenticated client learns nothing, not
/// even where the leader is). Behind it, the scheme-relative `Location`
/// of a redirect to the leader gets this node's scheme.
async fn gate(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(needed) = auth::required_role(request.method(), request.uri().path())
        && let Err(denied) = state
            .auth
            .check(request.headers().get(header::AUTHORIZATION), needed)
    {
        state.metrics.auth_refused.inc();
        return ApiError::from(denied).into_response();
    }
    // A body trickled in (a slow POST) holds its connection no longer
    // than the longest a handler may legitimately wait. Backups are exempt:
    // admins only, and as long as the state is large.
    let limit = state.limits.membership_timeout + 2 * state.limits.request_timeout;
    // Key-value requests are counted for the dashboard's charts.
    let path = request.uri().path();
    let kv = (path.starts_with("/v1/kv/") || path.starts_with("/v1/cas/"))
        .then(|| request.method() != axum::http::Method::GET);
    let backup = path == "/v1/snapshot";
    let began = std::time::Instant::now();
    let mut response = match backup {
        true => next.run(request).await,
        false => match tokio::time::timeout(limit, next.run(request)).await {
            Ok(r) => r,
            Err(_) => {
                return ApiError::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "the request took too long (a body sent too slowly?)",
                )
                .into_response();
            }
        },
    };
    if let Some(write) = kv
        && (response.status().is_success() || response.status() == StatusCode::NOT_FOUND)
    {
        state.dashboard.stats.record(write, began.elapsed());
    }
    let relative = response
        .headers()
        .get(header::LOCATION)
        .and_then(|l| l.to_str().ok())
        .filter(|l| l.starts_with("//"))
        .map(|l| format!("{}:{l}", state.scheme));
    if let Some(absolute) = relative.and_then(|l| HeaderValue::from_str(&l).ok()) {
        response.headers_mut().insert(header::LOCATION, absolute);
    }
    response
}

/// An error answer: `{"error": code, "message": text}` with a status, and
/// the headers a redirect or retry needs.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    location: Option<String>,
    retry_after: bool,
    /// A 401's `WWW-Authenticate: Bearer` (RFC 6750).
    challenge: bool,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            location: None,
            retry_after: false,
            challenge: false,
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: true,
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }

    fn unknown_outcome(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "outcome_unknown", message)
    }

    /// Maps an engine error for the request at `uri`.
    fn from_raft(e: RaftError<NodeAddr>, uri: &Uri) -> ApiError {
        match e {
            RaftError::NotLeader(nl) => match nl.leader_node {
                Some(leader) => {
                    let path = uri.path_and_query().map_or("/", |p| p.as_str());
                    ApiError {
                        // Scheme-relative: `gate` adds this node's.
                        location: Some(format!("//{}{path}", leader.http_addr)),
                        ..ApiError::new(
                            StatusCode::TEMPORARY_REDIRECT,
                            "not_leader",
                            format!("node {} leads", nl.leader_id.map_or(0, |id| id.0)),
                        )
                    }
                }
                None => ApiError::unavailable("no leader is known; retry shortly"),
            },
            RaftError::TransferInProgress => {
                ApiError::unavailable("leadership is being transferred; retry shortly")
            }
            RaftError::Overloaded { .. } => ApiError::unavailable(e.to_string()),
            // Definitely not applied: safe to retry.
            RaftError::ProposalDropped => ApiError::unavailable(
                "leadership changed before the write committed; it was not applied",
            ),
            RaftError::OutcomeUnknown | RaftError::Timeout(_) => {
                ApiError::unknown_outcome(e.to_string())
            }
            RaftError::LearnerBehind { .. } => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "learner_behind",
                format!("{e}; it stays a learner and keeps catching up"),
            ),
            RaftError::Membership(m) => {
                let (status, code) = match m {
                    MembershipError::InProgress { .. } => {
                        (StatusCode::CONFLICT, "change_in_progress")
                    }
                    MembershipError::AlreadyMember(_) => (StatusCode::CONFLICT, "already_member"),
                    MembershipError::UnknownNode(_) => (StatusCode::NOT_FOUND, "unknown_member"),
                    MembershipError::NoVoters
                    | MembershipError::NoCurrentVoter
                    | MembershipError::IsVoter(_)
                    | MembershipError::NotVoter(_) => (StatusCode::BAD_REQUEST, "invalid_change"),
                };
                ApiError {
                    retry_after: status == StatusCode::CONFLICT,
                    ..ApiError::new(status, code, m.to_string())
                }
            }
            RaftError::Refused(_) | RaftError::Initialize(_) => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            }
            // The node stopped while the request was in flight: a proposal
            // may already be in other nodes' logs.
            RaftError::Fatal(_) | RaftError::Shutdown => ApiError::unknown_outcome(e.to_string()),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> ApiError {
        let (status, code) = match e {
            SessionError::Unknown(_) => (StatusCode::GONE, "session_unknown"),
            SessionError::Stale { .. } => (StatusCode::CONFLICT, "session_stale"),
            SessionError::TooManyPending { .. } => (StatusCode::TOO_MANY_REQUESTS, "session_full"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<Denied> for ApiError {
    fn from(d: Denied) -> ApiError {
        match d {
            Denied::Unauthenticated => ApiError {
                challenge: true,
                ..ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "a valid token is required: Authorization: Bearer <token>",
                )
            },
            Denied::Forbidden { needed, has } => ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("this needs a token with the {needed} role; this one has {has}"),
            ),
            Denied::Unavailable(why) => ApiError::unavailable(why),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = axum::Json(json!({ "error": self.code, "message": self.message }));
        let mut resp = (self.status, body).into_response();
        if let Some(loc) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            resp.headers_mut().insert(header::LOCATION, loc);
        }
        if self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.challenge {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"raft-kv\""),
            );
        }
        resp
    }
}

impl AppState {
    fn check_key(&self, key: &str) -> Result<(), ApiError> {
        if key.is_empty() {
            return Err(ApiError::bad_request("the key is empty"));
        }
        if key.len() > self.limits.max_key_bytes {
            return Err(ApiError::too_large(format!(
                "key of {} bytes exceeds the {}-byte limit",
                key.len(),
                self.limits.max_key_bytes
            )));
        }
        Ok(())
    }

    fn check_value(&self, len: usize) -> Result<(), ApiError> {
        if len > self.limits.max_value_bytes {
            return Err(ApiError::too_large(format!(
                "value of {len} bytes exceeds the {}-byte limit",
                self.limits.max_value_bytes
            )));
        }
        Ok(())
    }

    /// Proposes `command` (in the client session `session` names, if any)
    /// and waits for its response, or answers 504 once the request
    /// timeout passes (the proposal may still commit).
    async fn write(
        &self,
        command: Command,
        session: Option<SessionTag>,
        uri: &Uri,
    ) -> Result<Written, ApiError> {
        let command = match session {
            Some(tag) => Command::InSession {
                tag,
                stamp_ms: now_ms(),
                command: SessionWrite::new(command).map_err(|_| {
                    ApiError::new(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "only puts, deletes and CASes are made in a session",
                    )
                })?,
            },
            None => command,
        };
        let (index, response) = self.propose(command, uri).await?;
        match response {
            KvResponse::InSession {
                index,
                replayed,
                response,
            } => Ok(Written {
                index,
                replayed,
                response: *response,
            }),
            KvResponse::SessionRefused(e) => Err(e.into()),
            response => Ok(Written {
                index,
                replayed: false,
                response,
            }),
        }
    }

    async fn propose(&self, command: Command, uri: &Uri) -> Result<(u64, KvResponse), ApiError> {
        self.metrics.proposals.inc();
        let outcome = bounded(
            self.limits.request_timeout,
            self.raft.client_write(command),
            uri,
            || {
                ApiError::unknown_outcome(
                    "timed out after proposing; the write may or may not be applied",
                )
            },
        )
        .await;
        if outcome.is_err() {
            self.metrics.proposals_failed.inc();
        }
        outcome.map(|(log_id, resp)| (log_id.index.0, resp))
    }

    /// Waits until a read of the local state machine is linearizable.
    async fn linearize(&self, uri: &Uri) -> Result<(), ApiError> {
        self.metrics.reads.inc();
        let outcome = bounded(
            self.limits.request_timeout,
            self.raft.ensure_linearizable(),
            uri,
            || ApiError::unavailable("could not confirm leadership in time"),
        )
        .await;
        if outcome.is_err() {
            self.metrics.reads_failed.inc();
        }
        outcome.map(|_| ())
    }

    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, ApiError> {
        self.reader.get(key.as_bytes()).map_err(|e| match e {
            // A follower loading a snapshot: its data is half replaced.
            RocksError::Installing { .. } => ApiError::unavailable(e.to_string()),
            e => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e.to_string()),
        })
    }
}

/// What a write answered.
struct Written {
    /// The index of the entry that applied it.
    index: u64,
    /// A retry in a session, answered without applying it again.
    replayed: bool,
    response: KvResponse,
}

impl Written {
    /// `body` as the answer, with `Replayed: true` on a replay.
    fn answer(&self, body: impl Serialize) -> Response {
        let mut resp = axum::Json(body).into_response();
        if self.replayed {
            resp.headers_mut()
                .insert("replayed", HeaderValue::from_static("true"));
        }
        resp
    }
}

/// Milliseconds since the Unix epoch: the leader's stamp on session
/// commands (the state machine keeps its log time from the largest stamp
/// applied, so a clock stepping back does no harm).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The session headers of a write: `Client-Id` and `Client-Seq` together
/// (or neither), `Client-Ack` optional.
fn session_tag(headers: &HeaderMap) -> Result<Option<SessionTag>, ApiError> {
    let number = |name: &str| -> Result<Option<u64>, ApiError> {
        headers
            .get(name)
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!("{name} must be an unsigned integer"))
                    })
            })
            .transpose()
    };
    match (
        number("client-id")?,
        number("client-seq")?,
        number("client-ack")?,
    ) {
        (None, None, None) => Ok(None),
        (Some(client_id), Some(seq), ack) => Ok(Some(SessionTag {
            client_id,
            seq,
            ack: ack.unwrap_or(0),
        })),
        _ => Err(ApiError::bad_request(
            "Client-Id and Client-Seq go together (Client-Ack only with them)",
        )),
    }
}

fn body_or_error(body: Result<Bytes, BytesRejection>, state: &AppState) -> Result<Bytes, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "body exceeds the {}-byte value limit",
                state.limits.max_value_bytes
            ))
        } else {
            ApiError::bad_request(r.body_text())
        }
    })?;
    state.check_value(body.len())?;
    Ok(body)
}

/// A JSON body of type `T` (size-checked like a value); malformed is 400.
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    state: &AppState,
    what: &str,
) -> Result<T, ApiError> {
    let body = body_or_error(body, state)?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))
}

async fn put_key(
    State(state): State<AppState>,
    Key(key): Key,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.check_key(&key)?;
    let session = session_tag(&headers)?;
    let value = body_or_error(body, &state)?;
    let command = Command::Put {
        key,
        value: serde_bytes::ByteBuf::from(value.to_vec()),
    };
    let w = state.write(command, session, &uri).await?;
    Ok(w.answer(json!({ "index": w.index })))
}

/// `POST /v1/sessions`: opens a client session with the default limits.
async fn open_session(State(state): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    let command = Command::OpenSession {
        stamp_ms: now_ms(),
        limits: SessionLimits::default(),
    };
    match state.propose(command, &uri).await? {
        (_, KvResponse::SessionOpened { client_id }) => {
            Ok(axum::Json(json!({ "client_id": client_id })).into_response())
        }
        _ => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected response to a session's registration",
        )),
    }
}

#[derive(Deserialize)]
struct ReadParams {
    consistency: Option<String>,
}

async fn get_key(
    State(state): State<AppState>,
    Key(key): Key,
    params: Result<Query<ReadParams>, QueryRejection>,
    uri: Uri,
) -> Result<Response, ApiError> {
    state.check_key(&key)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    match params.consistency.as_deref() {
        None | Some("linearizable") => state.linearize(&uri).await?,
        Some("stale") => {}
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "consistency must be `linearizable` or `stale`, not `{other}`"
            )));
        }
    }
    match state.read(&key)? {
        Some(v) => Ok(([(header::CONTENT_TYPE, "application/octet-stream")], v).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "key_not_found",
            format!("no key `{key}`"),
        )),
    }
}

async fn delete_key(
    State(state): State<AppState>,
    Key(key): Key,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.check_key(&key)?;
    let session = session_tag(&headers)?;
    let w = state.write(Command::Delete { key }, session, &uri).await?;
    let deleted = matches!(w.response, KvResponse::Deleted(true));
    Ok(w.answer(json!({ "index": w.index, "deleted": deleted })))
}

/// The CAS body; both fields are required (`null` is a value, not a default).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CasRequest {
    #[serde(deserialize_with = "Option::deserialize")]
    expected: Option<String>,
    #[serde(deserialize_with = "Option::deserialize")]
    new: Option<String>,
}

async fn cas(
    State(state): State<AppState>,
    Key(key): Key,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    state.check_key(&key)?;
    let session = session_tag(&headers)?;
    let req: CasRequest = json_body(body, &state, "CAS body")?;
    for v in [&req.expected, &req.new].into_iter().flatten() {
        state.check_value(v.len())?;
    }
    let bytes = |v: Option<String>| v.map(|s| serde_bytes::ByteBuf::from(s.into_bytes()));
    let command = Command::Cas {
        key,
        expected: bytes(req.expected),
        new: bytes(req.new),
    };
    let w = state.write(command, session, &uri).await?;
    let KvResponse::Cas { succeeded, current } = w.response.clone() else {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected response to CAS",
        ));
    };
    // Values written through CAS are UTF-8; one written by PUT may not be.
    let current = current.map(|v| String::from_utf8_lossy(&v).into_owned());
    Ok(w.answer(CasAnswer {
        succeeded,
        current,
        replayed: false,
    }))
}

/// `GET /healthz`: 200 while the process serves HTTP, for a liveness
/// probe; it says nothing about the cluster.
async fn healthz() -> Response {
    axum::Json(json!({ "status": "ok" })).into_response()
}

/// `GET /readyz`: 200 once the node knows a leader and has applied to
/// within `learner_max_lag` entries of the cluster's commit index
/// ([`Raft::is_ready`]), else 503; for a load balancer's readiness probe.
/// The body says why either way.
async fn readyz(State(state): State<AppState>) -> Response {
    let ready = state.raft.is_ready();
    let m = state.raft.metrics().borrow().clone();
    let body = axum::Json(json!({
        "ready": ready,
        "leader_id": m.leader_id.map(|id| id.0),
        "applied_index": m.applied_index.0,
        "leader_commit_index": m.leader_commit_index.0,
        "stopped": m.fatal.is_some(),
    }));
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, body).into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    let m = state.raft.metrics().borrow().clone();
    let ids = |s: std::collections::BTreeSet<NodeId>| s.into_iter().map(|id| id.0).collect();
    let role = role_name(m.role);
    axum::Json(Status {
        id: m.id.0,
        role: role.into(),
        term: m.term.0,
        leader_id: m.leader_id.map(|id| id.0),
        commit_index: m.commit_index.0,
        applied_index: m.applied_index.0,
        last_log_index: m.last_log_index.0,
        voters: ids(m.membership.voter_ids()),
        learners: ids(m.membership.learner_ids()),
        uuid: m.uuid.to_string(),
        recognized: m.recognized,
        unrecognized: ids(m.unrecognized.clone()),
        cluster_id: match state.cluster.get() {
            0 => String::new(),
            id => format!("{id:016x}"),
        },
    })
    .into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    let m = state.raft.metrics().borrow().clone();
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        state.metrics.render(m),
    )
        .into_response()
}

/// `POST /v1/members` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRequest {
    /// The member's id.
    pub id: u64,
    /// Its QUIC address.
    pub raft_addr: String,
    /// Its HTTP address.
    pub http_addr: String,
}

/// Leader-only membership requests check leadership first, so a follower
/// redirects instead of reporting a local view of the configuration.
fn require_leader(state: &AppState, uri: &Uri) -> Result<(), ApiError> {
    let m = state.raft.metrics().borrow().clone();
    if m.role == Role::Leader {
        return Ok(());
    }
    let leader_node = m
        .leader_id
        .and_then(|l| m.membership.nodes.get(&l).cloned());
    Err(ApiError::from_raft(
        RaftError::NotLeader(raft_core::NotLeader {
            leader_id: m.leader_id,
            leader_node,
        }),
        uri,
    ))
}

/// A node id from a path segment.
fn member_id(raw: &str) -> Result<NodeId, ApiError> {
    raw.parse::<u64>()
        .map_err(|_| {
            ApiError::bad_request(format!("`{raw}` is not a node id (a positive integer)"))
        })
        .and_then(positive_id)
}

fn positive_id(id: u64) -> Result<NodeId, ApiError> {
    match id {
        0 => Err(ApiError::bad_request("node ids start at 1")),
        id => Ok(NodeId(id)),
    }
}

async fn add_member(
    State(state): State<AppState>,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: MemberRequest = json_body(body, &state, "member")?;
    let id = positive_id(req.id)?;
    for (field, addr) in [("raft_addr", &req.raft_addr), ("http_addr", &req.http_addr)] {
        addr.parse::<std::net::SocketAddr>()
            .map_err(|e| ApiError::bad_request(format!("{field} `{addr}`: {e}")))?;
    }
    let node = NodeAddr {
        raft_addr: req.raft_addr,
        http_addr: req.http_addr,
    };
    let log_id = state
        .raft
        .add_learner(id, node, state.limits.membership_timeout)
        .await
        .map_err(|e| ApiError::from_raft(e, &uri))?;
    Ok(axum::Json(json!({ "index": log_id.index.0 })).into_response())
}

async fn change_voters(
    state: &AppState,
    uri: &Uri,
    voters: std::collections::BTreeSet<NodeId>,
) -> Result<Response, ApiError> {
    let change = state.raft.change_membership(voters);
    bounded(state.limits.membership_timeout, change, uri, || {
        ApiError::unknown_outcome("the membership change did not finish in time; it may still")
    })
    .await?;
    Ok(membership_answer(state))
}

fn membership_answer(state: &AppState) -> Response {
    let m = state.raft.metrics().borrow().clone();
    let ids =
        |s: std::collections::BTreeSet<NodeId>| s.into_iter().map(|id| id.0).collect::<Vec<_>>();
    axum::Json(json!({
        "voters": ids(m.membership.voter_ids()),
        "learners": ids(m.membership.learner_ids()),
    }))
    .into_response()
}

async fn promote_member(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = member_id(&raw)?;
    require_leader(&state, &uri)?;
    let m = state.raft.metrics().borrow().clone();
    let mut voters = m.membership.voter_ids();
    voters.insert(id);
    if m.membership.is_learner(id) {
        // A learner still catching up is not promoted: the new majority
        // would wait for it. Nothing is proposed when this times out.
        state
            .raft
            .wait_caught_up(id, state.limits.membership_timeout)
            .await
            .map_err(|e| ApiError::from_raft(e, &uri))?;
    }
    change_voters(&state, &uri, voters).await
}

/// `GET /v1/snapshot`: a backup of the state ([`RocksReader::export`]),
/// taken on the leader after a linearizable read barrier, so it holds
/// every write acknowledged before the request. Written to a file in the
/// data directory, which is unlinked once open and streamed from: memory
/// stays bounded and nothing is left behind if the client goes away.
async fn snapshot(State(state): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    require_leader(&state, &uri)?;
    state.linearize(&uri).await?;
    let path = state.scratch_dir.join(format!(
        "backup-{}.tmp",
        std::process::id() as u64 ^ now_ms()
    ));
    let exported = {
        let (reader, path) = (state.reader.clone(), path.clone());
        tokio::task::spawn_blocking(move || {
            let header = reader.export::<Kv>(&path)?;
            let file = std::fs::File::open(&path).map_err(|source| raft_core::StorageError::Io {
                context: format!("opening {}", path.display()),
                source,
            });
            let _ = std::fs::remove_file(&path);
            Ok::<_, raft_core::StorageError>((header, file?))
        })
        .await
    };
    let internal = |e: String| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", e);
    let (header, file) = exported
        .map_err(|e| internal(e.to_string()))?
        .map_err(|e| match e {
            raft_core::StorageError::Io { .. } | raft_core::StorageError::Corrupt { .. } => {
                internal(e.to_string())
            }
            other => ApiError::unavailable(other.to_string()),
        })?;
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let file = tokio::fs::File::from_std(file);
    let chunks = futures_util::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let mut resp = axum::body::Body::from_stream(chunks).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    headers.insert(
        "snapshot-index",
        HeaderValue::from(header.last_log_id.index.0),
    );
    headers.insert(
        "snapshot-term",
        HeaderValue::from(header.last_log_id.term.0),
    );
    Ok(resp)
}

/// `POST /v1/members/{id}/demote`: voter `id` becomes a learner by joint
/// consensus ([`Raft::demote_voter`]).
async fn demote_member(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = member_id(&raw)?;
    require_leader(&state, &uri)?;
    let demoted = state.raft.demote_voter(id);
    bounded(state.limits.membership_timeout, demoted, &uri, || {
        ApiError::unknown_outcome("the demotion did not finish in time; it may still")
    })
    .await?;
    Ok(membership_answer(&state))
}

async fn remove_member(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    let id = member_id(&raw)?;
    require_leader(&state, &uri)?;
    let m = state.raft.metrics().borrow().clone();
    if m.membership.is_voter(id) {
        let mut voters = m.membership.voter_ids();
        voters.remove(&id);
        return change_voters(&state, &uri, voters).await;
    }
    let removed = state.raft.remove_learner(id);
    bounded(state.limits.membership_timeout, removed, &uri, || {
        ApiError::unknown_outcome("the removal did not finish in time; it may still")
    })
    .await?;
    Ok(membership_answer(&state))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    to: u64,
}

async fn transfer_leader(
    State(state): State<AppState>,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: TransferRequest = json_body(body, &state, "transfer")?;
    let to = positive_id(req.to)?;
    require_leader(&state, &uri)?;
    if !state.raft.metrics().borrow().membership.is_voter(to) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "unknown_member",
            format!("node {to} is not a voter"),
        ));
    }
    // The engine gives up after an election timeout; wait a little longer.
    state
        .raft
        .transfer_leader_and_wait(to, state.limits.request_timeout)
        .await
        .map_err(|e| ApiError::from_raft(e, &uri))?;
    Ok(axum::Json(json!({ "leader_id": to.0 })).into_response())
}

/// `POST /v1/tokens` body: the token is made by the client; the cluster
/// gets its hash only.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// The token's name (`[A-Za-z0-9_-]`, at most 64 bytes).
    pub name: String,
    /// `read`, `write` or `admin`.
    pub role: token::Role,
    /// The SHA-256 of the whole token, 64 hex digits.
    pub hash: String,
}

/// `POST /v1/tokens`: records a token; 200 `{"name", "role", "index"}`,
/// 409 `token_exists` while a live token has that name.
async fn create_token(
    State(state): State<AppState>,
    uri: Uri,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let req: TokenRequest = json_body(body, &state, "token request")?;
    check_name(&req.name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let hash = TokenHash::from_hex(&req.hash)
        .ok_or_else(|| ApiError::bad_request("`hash` must be a SHA-256 in hex (64 digits)"))?;
    let exists = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "token_exists",
            format!("a token named `{}` exists; revoke it first", req.name),
        )
    };
    // The bootstrap token has no record until it is revoked or replaced:
    // creating `admin` over it would end it silently.
    if req.name == BOOTSTRAP_NAME && state.auth.has_bootstrap() {
        require_leader(&state, &uri)?;
        if state.auth.record(BOOTSTRAP_NAME)?.is_none() {
            return Err(exists());
        }
    }
    let command = Command::CreateToken {
        name: req.name.clone(),
        role: req.role,
        hash,
    };
    match state.propose(command, &uri).await? {
        (index, KvResponse::TokenChanged(true)) => Ok(axum::Json(
            json!({ "name": req.name, "role": req.role, "index": index }),
        )
        .into_response()),
        _ => Err(exists()),
    }
}

/// `DELETE /v1/tokens/{name}`: revokes a token on every node; 200
/// `{"name", "revoked", "index"}`, `revoked` false if no live token had
/// that name (a retried revocation is not an error).
async fn revoke_token(
    State(state): State<AppState>,
    Path(name): Path<String>,
    uri: Uri,
) -> Result<Response, ApiError> {
    check_name(&name).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let command = Command::RevokeToken { name: name.clone() };
    let (index, response) = state.propose(command, &uri).await?;
    let revoked = matches!(response, KvResponse::TokenChanged(true));
    Ok(axum::Json(json!({ "name": name, "revoked": revoked, "index": index })).into_response())
}

/// `GET /v1/tokens`: every token's name and role, revoked ones with
/// `"revoked": true`, as of a linearizable read on the leader.
async fn list_tokens(State(state): State<AppState>, uri: Uri) -> Result<Response, ApiError> {
    require_leader(&state, &uri)?;
    state.linearize(&uri).await?;
    let rows: Vec<_> = state
        .auth
        .list()?
        .into_iter()
        .map(|(name, record)| match record {
            TokenRecord::Live { role, .. } => {
                json!({ "name": name, "role": role, "revoked": false })
            }
            TokenRecord::Revoked => json!({ "name": name, "role": null, "revoked": true }),
        })
        .collect();
    Ok(axum::Json(rows).into_response())
}
