//! A small client of the HTTP API, used by the `raft-kv` subcommands.
//! Redirects to the leader are followed; `503` (no leader yet) is retried
//! for a few seconds.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use thiserror::Error;

use crate::http::Status;

/// Why a client call failed.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The request did not complete (no connection, a timeout, a bad body).
    #[error("request to {url} failed: {source}")]
    Http {
        /// The URL asked.
        url: String,
        #[source]
        /// reqwest's error.
        source: reqwest::Error,
    },
    /// The server answered with an error (`{"error", "message"}`).
    #[error("{status}: {code}: {message}")]
    Api {
        /// The HTTP status.
        status: StatusCode,
        /// The error's machine-readable code.
        code: String,
        /// Its explanation.
        message: String,
    },
    /// The endpoint is not an `http://host:port` URL.
    #[error("invalid endpoint `{0}`: expected http://host:port")]
    Endpoint(String),
}

/// A client bound to one endpoint (any node of the cluster).
pub struct Client {
    http: reqwest::Client,
    endpoint: String,
}

/// How long to keep retrying while the cluster has no leader.
const RETRY_FOR: Duration = Duration::from_secs(5);

impl Client {
    /// A client of the node at `endpoint` (`http://host:port`).
    pub fn new(endpoint: &str) -> Result<Client, ClientError> {
        Client::with_timeout(endpoint, Duration::from_secs(10))
    }

    /// A client whose requests may each take up to `timeout`.
    pub fn with_timeout(endpoint: &str, timeout: Duration) -> Result<Client, ClientError> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        if !endpoint.starts_with("http://") {
            return Err(ClientError::Endpoint(endpoint));
        }
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|source| ClientError::Http {
                url: endpoint.clone(),
                source,
            })?;
        Ok(Client { http, endpoint })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Vec<u8>), ClientError> {
        let url = format!("{}{path}", self.endpoint);
        let deadline = tokio::time::Instant::now() + RETRY_FOR;
        loop {
            let mut req = self.http.request(method.clone(), &url);
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let http_err = |source| ClientError::Http {
                url: url.clone(),
                source,
            };
            let resp = req.send().await.map_err(http_err)?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(http_err)?.to_vec();
            if status == StatusCode::SERVICE_UNAVAILABLE && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            return Ok((status, bytes));
        }
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

    async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Value, ClientError> {
        let (status, bytes) = self.call(method, path, body).await?;
        if !status.is_success() {
            return Err(Self::api_error(status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Api {
            status,
            code: "bad_response".into(),
            message: e.to_string(),
        })
    }

    /// `PUT /v1/kv/{key}`: the JSON answer (`{"index": N}`).
    pub async fn put(&self, key: &str, value: &[u8]) -> Result<Value, ClientError> {
        self.json(Method::PUT, &kv_path(key), Some(value.to_vec()))
            .await
    }

    /// `GET /v1/kv/{key}`: the value, or `None` for 404.
    pub async fn get(&self, key: &str, stale: bool) -> Result<Option<Vec<u8>>, ClientError> {
        let mut path = kv_path(key);
        if stale {
            path.push_str("?consistency=stale");
        }
        let (status, bytes) = self.call(Method::GET, &path, None).await?;
        match status {
            StatusCode::OK => Ok(Some(bytes)),
            StatusCode::NOT_FOUND => match Self::api_error(status, &bytes) {
                ClientError::Api { code, .. } if code == "key_not_found" => Ok(None),
                other => Err(other),
            },
            _ => Err(Self::api_error(status, &bytes)),
        }
    }

    /// `DELETE /v1/kv/{key}`: `{"index", "deleted"}`.
    pub async fn delete(&self, key: &str) -> Result<Value, ClientError> {
        self.json(Method::DELETE, &kv_path(key), None).await
    }

    /// `POST /v1/cas/{key}`: `{"succeeded", "current"}`.
    pub async fn cas(
        &self,
        key: &str,
        expected: Option<&str>,
        new: Option<&str>,
    ) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "expected": expected, "new": new }).to_string();
        self.json(
            Method::POST,
            &format!("/v1/cas/{}", encode_key(key)),
            Some(body.into_bytes()),
        )
        .await
    }

    /// `POST /v1/members`: adds node `id` as a learner.
    pub async fn add_member(
        &self,
        id: u64,
        raft_addr: &str,
        http_addr: &str,
    ) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "id": id, "raft_addr": raft_addr, "http_addr": http_addr });
        self.json(
            Method::POST,
            "/v1/members",
            Some(body.to_string().into_bytes()),
        )
        .await
    }

    /// `POST /v1/members/{id}/promote`.
    pub async fn promote_member(&self, id: u64) -> Result<Value, ClientError> {
        self.json(
            Method::POST,
            &format!("/v1/members/{id}/promote"),
            Some(Vec::new()),
        )
        .await
    }

    /// `DELETE /v1/members/{id}`.
    pub async fn remove_member(&self, id: u64) -> Result<Value, ClientError> {
        self.json(Method::DELETE, &format!("/v1/members/{id}"), None)
            .await
    }

    /// `POST /v1/leader/transfer`.
    pub async fn transfer_leader(&self, to: u64) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "to": to }).to_string().into_bytes();
        self.json(Method::POST, "/v1/leader/transfer", Some(body))
            .await
    }

    /// `GET /v1/status` of the endpoint itself (not redirected).
    pub async fn status(&self) -> Result<Status, ClientError> {
        let v = self.json(Method::GET, "/v1/status", None).await?;
        serde_json::from_value(v).map_err(|e| ClientError::Api {
            status: StatusCode::OK,
            code: "bad_response".into(),
            message: e.to_string(),
        })
    }
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
