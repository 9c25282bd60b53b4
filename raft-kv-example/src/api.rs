//! The HTTP API's answers as types, shared by the server ([`crate::http`])
//! and the client ([`crate::client`]); compiled with either feature.

use serde::{Deserialize, Serialize};

/// `GET /v1/status`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The node answering.
    pub id: u64,
    /// Its role (`leader`, `follower`, ...).
    pub role: String,
    /// Its current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader_id: Option<u64>,
    /// Highest index known committed.
    pub commit_index: u64,
    /// Highest index applied.
    pub applied_index: u64,
    /// Last index in its log.
    pub last_log_index: u64,
    /// The voters.
    pub voters: Vec<u64>,
    /// The learners.
    pub learners: Vec<u64>,
    /// This node's identity (32 hex digits), drawn when its data
    /// directory was new.
    #[serde(default)]
    pub uuid: String,
    /// `false` when the cluster recorded another identity for this node's
    /// id: its data was wiped or replaced. It then neither votes nor
    /// campaigns; remove it (`DELETE /v1/members/{id}`) and add it back.
    #[serde(default = "yes")]
    pub recognized: bool,
    /// Leader only: members answering under an identity the cluster does
    /// not recognize (their data was wiped).
    #[serde(default)]
    pub unrecognized: Vec<u64>,
    /// The cluster the node belongs to (16 hex digits; empty while a node
    /// waiting to join has none).
    #[serde(default)]
    pub cluster_id: String,
}

fn yes() -> bool {
    true
}

/// The answer to `PUT /v1/kv/{key}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Written {
    /// The log index of the entry that applied the write.
    pub index: u64,
    /// The client saw `Replayed: true`: the write had been applied by an
    /// earlier try, and this is that try's answer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// The answer to `DELETE /v1/kv/{key}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Deleted {
    /// The log index of the entry that applied the delete.
    pub index: u64,
    /// The key existed.
    pub deleted: bool,
    /// As in [`Written::replayed`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}

/// The answer to `POST /v1/cas/{key}`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CasAnswer {
    /// The key held the expected value and now holds the new one.
    pub succeeded: bool,
    /// The key's value after the operation (lossy UTF-8).
    pub current: Option<String>,
    /// As in [`Written::replayed`]. The server never sends it in the body.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replayed: bool,
}
