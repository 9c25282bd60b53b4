//! The same 3-node in-process cluster over openraft, measured in the same
//! run as ours: the baseline issue 15 asks us to beat.
//!
//! Built only with `--features openraft-baseline` (`cargo xtask bench core`).
//! Everything here is written to give openraft its best case, the way its
//! own `benchmarks/minimal` does: the log store keeps entries as values (no
//! serialization), the network calls the target `Raft` directly, and the
//! config is the one that benchmark uses. The state machine does the same
//! work as ours (a put into a map) and answers each write.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, TryStreamExt};
use openraft::alias::{EntryOf, LogIdOf, SnapshotMetaOf, SnapshotOf, StoredMembershipOf, VoteOf};
use openraft::async_runtime::WatchReceiver;
use openraft::entry::RaftEntry;
use openraft::error::{RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::storage::{
    EntryResponder, IOFlushed, LogState, RaftLogReader, RaftLogStorage, RaftSnapshotBuilder,
    RaftStateMachine,
};
use openraft::{EntryPayload, OptionalSend, RaftNetworkFactory, RaftNetworkV2, ServerState};

use crate::{WriteFailed, Writer};

/// One client write: the same key and value our bench puts.
#[derive(Clone, Debug)]
pub struct Put {
    key: String,
    value: String,
}

impl fmt::Display for Put {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "put {}", self.key)
    }
}

openraft::declare_raft_types!(
    pub Bench:
        D = Put,
        R = (),
        Node = (),
);

type BenchRaft = openraft::Raft<Bench, Arc<StateMachine>>;

/// The log, the vote and the committed id, in memory.
#[derive(Default)]
pub struct LogStore {
    inner: Mutex<LogInner>,
}

#[derive(Default)]
struct LogInner {
    log: BTreeMap<u64, EntryOf<Bench>>,
    vote: Option<VoteOf<Bench>>,
    committed: Option<LogIdOf<Bench>>,
    purged: Option<LogIdOf<Bench>>,
}

impl RaftLogReader<Bench> for Arc<LogStore> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + fmt::Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<Bench>>, io::Error> {
        let inner = self.inner.lock().unwrap();
        Ok(inner.log.range(range).map(|(_, e)| e.clone()).collect())
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<Bench>>, io::Error> {
        Ok(self.inner.lock().unwrap().vote)
    }
}

impl RaftLogStorage<Bench> for Arc<LogStore> {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<Bench>, io::Error> {
        let inner = self.inner.lock().unwrap();
        let last = inner.log.values().next_back().map(|e| e.log_id());
        Ok(LogState {
            last_purged_log_id: inner.purged,
            last_log_id: last.or(inner.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<Bench>) -> Result<(), io::Error> {
        self.inner.lock().unwrap().vote = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogIdOf<Bench>>) -> Result<(), io::Error> {
        self.inner.lock().unwrap().committed = committed;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<Bench>>, io::Error> {
        Ok(self.inner.lock().unwrap().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: IOFlushed<Bench>) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<Bench>> + OptionalSend,
    {
        {
            let mut inner = self.inner.lock().unwrap();
            for e in entries {
                inner.log.insert(e.index(), e);
            }
        }
        callback.io_completed(Ok(()));
        Ok(())
    }

    async fn truncate_after(&mut self, last: Option<LogIdOf<Bench>>) -> Result<(), io::Error> {
        let from = last.map_or(0, |l| l.index() + 1);
        self.inner.lock().unwrap().log.split_off(&from);
        Ok(())
    }

    async fn purge(&mut self, upto: LogIdOf<Bench>) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().unwrap();
        let keep = inner.log.split_off(&(upto.index() + 1));
        inner.log = keep;
        inner.purged = Some(upto);
        Ok(())
    }
}

/// A map of key to value: the same `BTreeMap` and the same put as
/// `raft_core::memory::MemStateMachine`.
#[derive(Default)]
pub struct StateMachine {
    inner: Mutex<SmInner>,
}

#[derive(Default, Clone)]
struct SmInner {
    applied: Option<LogIdOf<Bench>>,
    membership: StoredMembershipOf<Bench>,
    data: BTreeMap<String, String>,
    snapshot: Option<(SnapshotMetaOf<Bench>, SnapshotData)>,
}

/// Snapshots move between in-process nodes as the map itself.
type SnapshotData = Arc<BTreeMap<String, String>>;

impl RaftSnapshotBuilder<Bench> for Arc<StateMachine> {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<SnapshotOf<Bench, SnapshotData>, io::Error> {
        let mut inner = self.inner.lock().unwrap();
        let meta = SnapshotMetaOf::<Bench> {
            last_log_id: inner.applied,
            last_membership: inner.membership.clone(),
        };
        let data = Arc::new(inner.data.clone());
        inner.snapshot = Some((meta.clone(), data.clone()));
        Ok(SnapshotOf::<Bench, SnapshotData> {
            meta,
            snapshot: data,
        })
    }
}

impl RaftStateMachine<Bench> for Arc<StateMachine> {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogIdOf<Bench>>, StoredMembershipOf<Bench>), io::Error> {
        let inner = self.inner.lock().unwrap();
        Ok((inner.applied, inner.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<Bench>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            {
                let mut inner = self.inner.lock().unwrap();
                inner.applied = Some(entry.log_id);
                match entry.payload {
                    EntryPayload::Blank => {}
                    EntryPayload::Normal(put) => {
                        inner.data.insert(put.key, put.value);
                    }
                    EntryPayload::Membership(m) => {
                        inner.membership = StoredMembershipOf::<Bench>::new(Some(entry.log_id), m);
                    }
                }
            }
            if let Some(r) = responder {
                r.send(());
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMetaOf<Bench>,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let mut inner = self.inner.lock().unwrap();
        inner.applied = meta.last_log_id;
        inner.membership = meta.last_membership.clone();
        inner.data = (*snapshot).clone();
        inner.snapshot = Some((meta.clone(), snapshot));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<SnapshotOf<Bench, SnapshotData>>, io::Error> {
        let inner = self.inner.lock().unwrap();
        Ok(inner
            .snapshot
            .clone()
            .map(|(meta, snapshot)| SnapshotOf::<Bench, SnapshotData> { meta, snapshot }))
    }
}

/// Every node of the cluster by id, for the in-process network.
#[derive(Clone, Default)]
pub struct Router {
    nodes: Arc<Mutex<BTreeMap<u64, BenchRaft>>>,
}

impl Router {
    fn get(&self, id: u64) -> BenchRaft {
        self.nodes.lock().unwrap()[&id].clone()
    }
}

pub struct Peer {
    target: BenchRaft,
}

fn unreachable<E: std::error::Error + 'static>(e: E) -> RPCError<Bench> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftNetworkFactory<Bench> for Router {
    type Network = Peer;

    async fn new_client(&mut self, target: u64, _node: &()) -> Peer {
        Peer {
            target: self.get(target),
        }
    }
}

impl RaftNetworkV2<Bench> for Peer {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<Bench>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<Bench>, RPCError<Bench>> {
        self.target.append_entries(rpc).await.map_err(unreachable)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<Bench>,
        _option: RPCOption,
    ) -> Result<VoteResponse<Bench>, RPCError<Bench>> {
        self.target.vote(rpc).await.map_err(unreachable)
    }

    async fn full_snapshot(
        &mut self,
        vote: VoteOf<Bench>,
        snapshot: SnapshotOf<Bench, SnapshotData>,
        _cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<Bench>, StreamingError<Bench>> {
        self.target
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(|e| StreamingError::Unreachable(Unreachable::new(&e)))
    }
}

/// Starts an `n`-node openraft cluster and waits for its leader.
pub async fn cluster(n: u64) -> Vec<BenchRaft> {
    // The settings of openraft's own `benchmarks/minimal`.
    let config = Arc::new(
        openraft::Config {
            election_timeout_min: 200,
            election_timeout_max: 2000,
            purge_batch_size: 1024,
            max_payload_entries: 1024,
            ..Default::default()
        }
        .validate()
        .expect("openraft config"),
    );
    let router = Router::default();
    let mut nodes = Vec::new();
    for id in 0..n {
        let raft = BenchRaft::new(
            id,
            config.clone(),
            router.clone(),
            Arc::new(LogStore::default()),
            Arc::new(StateMachine::default()),
        )
        .await
        .expect("openraft start");
        router.nodes.lock().unwrap().insert(id, raft.clone());
        nodes.push(raft);
    }
    let members: std::collections::BTreeSet<u64> = (0..n).collect();
    nodes[0]
        .initialize(members)
        .await
        .expect("openraft initialize");
    loop {
        if nodes
            .iter()
            .any(|r| r.metrics().borrow_watched().state == ServerState::Leader)
        {
            return nodes;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A client of the openraft cluster: writes to the node it believes leads,
/// and follows the leader the cluster names when a write fails.
#[derive(Clone)]
pub struct OpenraftWriter {
    nodes: Vec<BenchRaft>,
    leader: usize,
}

impl OpenraftWriter {
    pub fn new(nodes: Vec<BenchRaft>) -> Self {
        let leader = nodes
            .iter()
            .position(|r| r.metrics().borrow_watched().state == ServerState::Leader)
            .unwrap_or(0);
        OpenraftWriter { nodes, leader }
    }
}

impl Writer for OpenraftWriter {
    async fn write(&mut self, key: String, value: String) -> Result<(), WriteFailed> {
        match self.nodes[self.leader]
            .client_write(Put { key, value })
            .await
        {
            Ok(_) => Ok(()),
            Err(_) => {
                if let Some(l) = self
                    .nodes
                    .iter()
                    .position(|r| r.metrics().borrow_watched().state == ServerState::Leader)
                {
                    self.leader = l;
                }
                Err(WriteFailed)
            }
        }
    }

    fn views(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|r| format!("{:?}", *r.metrics().borrow_watched()))
            .collect()
    }

    async fn shutdown(self) {
        for r in &self.nodes {
            let _ = r.shutdown().await;
        }
    }
}
