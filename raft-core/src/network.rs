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
    #[error("peer {0} unreachable: {1}")]
    Unreachable(NodeId, String),
    #[error("rpc to peer {0} timed out")]
    Timeout(NodeId),
    /// The peer answered with an error (it refused the message).
    #[error("peer {0} refused: {1}")]
    Remote(NodeId, String),
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
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<C>,
    ) -> Result<AppendEntriesResponse, NetworkError>;
    async fn vote(&self, req: VoteRequest) -> Result<VoteResponse, NetworkError>;
    async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<C>,
    ) -> Result<InstallSnapshotResponse, NetworkError>;
    async fn timeout_now(&self, req: TimeoutNowRequest) -> Result<(), NetworkError>;
}

/// Creates one [`Network`] client per peer.
pub trait NetworkFactory<C: TypeConfig>: Send + Sync + 'static {
    type Network: Network<C>;
    /// A client for `target`, whose address is `node`. Called once per peer
    /// (again if the peer's address changes).
    fn connect(&mut self, target: NodeId, node: &C::Node) -> Self::Network;
}
