//! The network trait: how a node reaches its peers.

use async_trait::async_trait;
use thiserror::Error;

use crate::message::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    TimeoutNowRequest, VoteRequest, VoteResponse,
};
use crate::types::{NodeId, TypeConfig};

/// Why an RPC got no answer. The engine treats all of these alike (the
/// message was lost) and retries on its own schedule.
#[derive(Debug, Error)]
pub enum NetworkError {
    /// No connection to the peer could be made (refused, no route, the
    /// handshake failed); the request was not delivered.
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    /// No answer came in the transport's own time bound; the request may
    /// or may not have been delivered.
    #[error("rpc to peer {0} timed out")]
    Timeout(NodeId),
    /// The peer answered with an error (it refused the message).
    #[error("peer {0} refused: {1}")]
    Remote(NodeId, String),
    /// Any other transport failure (a stream reset, a frame that did not
    /// decode), with its cause.
    #[error("transport: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// A client for one peer. Calls may run concurrently (the driver pipelines
/// AppendEntries), so methods take `&self`.
///
/// # Contract
/// - Each method delivers one request to the peer's `Raft` handle (the
///   matching `Raft::handle_*` method) and returns its response.
/// - A message may be lost, duplicated or delayed; Raft tolerates all of it.
///   Return an error rather than wait forever: the driver also applies its
///   own timeout.
/// - The returned futures are polled by the node's driver task itself (no
///   task per message), so they must never block: do blocking or long CPU
///   work (compressing a large snapshot chunk, say) on a blocking thread or
///   a task of your own. Encoding a message and handing it to a socket or
///   a connection's task is fine.
#[async_trait]
pub trait Network<C: TypeConfig>: Send + Sync + 'static {
    /// Delivers an AppendEntries (entries, or an empty heartbeat) and
    /// returns the peer's answer. Requests to one peer may be in flight
    /// side by side and may arrive out of order; the peer's executor holds
    /// one that overtook its predecessor, so no ordering is required here.
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<C>,
    ) -> Result<AppendEntriesResponse, NetworkError>;
    /// Delivers a vote or pre-vote request and returns the peer's answer.
    async fn vote(&self, req: VoteRequest) -> Result<VoteResponse, NetworkError>;
    /// Delivers one chunk of a snapshot and returns the peer's answer,
    /// which says which offset it expects next. Chunks can be up to
    /// `Config::snapshot_chunk_bytes` of data.
    async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<C>,
    ) -> Result<InstallSnapshotResponse, NetworkError>;
    /// Tells the peer to start an election now (leadership transfer).
    /// `Ok` means it was delivered; nothing comes back.
    async fn timeout_now(&self, req: TimeoutNowRequest) -> Result<(), NetworkError>;
}

/// Creates one [`Network`] client per peer.
pub trait NetworkFactory<C: TypeConfig>: Send + Sync + 'static {
    /// The client for one peer.
    type Network: Network<C>;
    /// A client for `target`, whose address is `node`. Called once per peer
    /// (again if the peer's address changes).
    fn connect(&mut self, target: NodeId, node: &C::Node) -> Self::Network;
}
