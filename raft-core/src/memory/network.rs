//! An in-process [`Network`]: a router that hands each RPC straight to the
//! target's [`Raft`] handle, with switches to cut links in tests.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;

use crate::message::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    TimeoutNowRequest, VoteRequest, VoteResponse,
};
use crate::network::{Network, NetworkError, NetworkFactory};
use crate::raft::{Raft, RaftError};
use crate::types::{NodeId, TypeConfig};

struct Routes<C: TypeConfig> {
    nodes: HashMap<NodeId, Raft<C>>,
    cut: HashSet<(NodeId, NodeId)>,
}

/// Routes RPCs between `Raft` nodes in one process.
pub struct MemRouter<C: TypeConfig> {
    routes: Arc<RwLock<Routes<C>>>,
}

impl<C: TypeConfig> Clone for MemRouter<C> {
    fn clone(&self) -> Self {
        MemRouter {
            routes: self.routes.clone(),
        }
    }
}

impl<C: TypeConfig> Default for MemRouter<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: TypeConfig> MemRouter<C> {
    /// A router with no nodes registered.
    pub fn new() -> Self {
        MemRouter {
            routes: Arc::new(RwLock::new(Routes {
                nodes: HashMap::new(),
                cut: HashSet::new(),
            })),
        }
    }

    /// Makes `raft` reachable as `id` (replacing an earlier registration).
    pub fn register(&self, id: NodeId, raft: Raft<C>) {
        if let Ok(mut r) = self.routes.write() {
            r.nodes.insert(id, raft);
        }
    }

    /// Makes `id` unreachable (as if it crashed).
    pub fn unregister(&self, id: NodeId) {
        if let Ok(mut r) = self.routes.write() {
            r.nodes.remove(&id);
        }
    }

    /// Cuts every link to and from `id`.
    pub fn isolate(&self, id: NodeId) {
        if let Ok(mut r) = self.routes.write() {
            let ids: Vec<NodeId> = r.nodes.keys().copied().collect();
            for other in ids {
                r.cut.insert((id, other));
                r.cut.insert((other, id));
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        if let Ok(mut r) = self.routes.write() {
            r.cut.clear();
        }
    }

    /// The network factory for node `from`.
    pub fn factory(&self, from: NodeId) -> MemNetworkFactory<C> {
        MemNetworkFactory {
            router: self.clone(),
            from,
        }
    }

    fn target(&self, from: NodeId, to: NodeId) -> Result<Raft<C>, NetworkError> {
        let r = self
            .routes
            .read()
            .map_err(|_| NetworkError::Unreachable(to, "router poisoned".into()))?;
        if r.cut.contains(&(from, to)) {
            return Err(NetworkError::Unreachable(to, "link cut".into()));
        }
        r.nodes
            .get(&to)
            .cloned()
            .ok_or_else(|| NetworkError::Unreachable(to, "not registered".into()))
    }
}

/// Creates [`MemNetwork`] clients for one node.
pub struct MemNetworkFactory<C: TypeConfig> {
    router: MemRouter<C>,
    from: NodeId,
}

impl<C: TypeConfig> NetworkFactory<C> for MemNetworkFactory<C> {
    type Network = MemNetwork<C>;
    fn connect(&mut self, target: NodeId, _node: &C::Node) -> MemNetwork<C> {
        MemNetwork {
            router: self.router.clone(),
            from: self.from,
            to: target,
        }
    }
}

/// An in-process client for one peer.
pub struct MemNetwork<C: TypeConfig> {
    router: MemRouter<C>,
    from: NodeId,
    to: NodeId,
}

fn remote<N>(to: NodeId, e: RaftError<N>) -> NetworkError {
    NetworkError::Remote(to, e.to_string())
}

#[async_trait]
impl<C: TypeConfig> Network<C> for MemNetwork<C> {
    async fn append_entries(
        &self,
        req: AppendEntriesRequest<C>,
    ) -> Result<AppendEntriesResponse, NetworkError> {
        let t = self.router.target(self.from, self.to)?;
        let resp = t
            .handle_append_entries(self.from, req)
            .await
            .map_err(|e| remote(self.to, e))?;
        self.router.target(self.to, self.from)?;
        Ok(resp)
    }

    async fn vote(&self, req: VoteRequest) -> Result<VoteResponse, NetworkError> {
        let t = self.router.target(self.from, self.to)?;
        let resp = t
            .handle_vote(self.from, req)
            .await
            .map_err(|e| remote(self.to, e))?;
        self.router.target(self.to, self.from)?;
        Ok(resp)
    }

    async fn install_snapshot(
        &self,
        req: InstallSnapshotRequest<C>,
    ) -> Result<InstallSnapshotResponse, NetworkError> {
        let t = self.router.target(self.from, self.to)?;
        let resp = t
            .handle_install_snapshot(self.from, req)
            .await
            .map_err(|e| remote(self.to, e))?;
        self.router.target(self.to, self.from)?;
        Ok(resp)
    }

    async fn timeout_now(&self, req: TimeoutNowRequest) -> Result<(), NetworkError> {
        let t = self.router.target(self.from, self.to)?;
        t.handle_timeout_now(self.from, req)
            .await
            .map_err(|e| remote(self.to, e))
    }
}
