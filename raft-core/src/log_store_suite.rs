//! A conformance suite any [`LogStore`] runs against itself: append, read,
//! truncate and purge edge cases, hard-state round trips, reopening after
//! every operation, and an empty store.
//!
//! It works for any application's [`TypeConfig`]: the harness says how to
//! make a command and a node address of its types. For a store of your
//! own (here the in-memory one, with commands that are plain bytes):
//!
//! ```
//! use async_trait::async_trait;
//! use raft_core::log_store_suite::{self, LogStoreHarness};
//! use raft_core::memory::MemLogStore;
//! use raft_core::TypeConfig;
//!
//! #[derive(Clone, Debug, PartialEq, Eq)]
//! struct Blobs;
//! impl TypeConfig for Blobs {
//!     type Command = Vec<u8>;
//!     type Response = ();
//!     type Node = std::net::SocketAddr;
//!     fn command_size(c: &Vec<u8>) -> usize {
//!         c.len()
//!     }
//! }
//!
//! struct Harness;
//! #[async_trait]
//! impl LogStoreHarness for Harness {
//!     type Config = Blobs;
//!     type Store = MemLogStore<Blobs>;
//!     async fn fresh(&mut self) -> Self::Store {
//!         MemLogStore::new()
//!     }
//!     async fn reopen(&mut self, store: Self::Store) -> Self::Store {
//!         store // a real store closes and reopens its files here
//!     }
//!     fn command(&self, term: u64, index: u64) -> Vec<u8> {
//!         format!("{term}/{index}").into_bytes()
//!     }
//!     fn node(&self, id: u64) -> std::net::SocketAddr {
//!         ([127, 0, 0, 1], 7000 + id as u16).into()
//!     }
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
//! log_store_suite::run(&mut Harness).await;
//! # });
//! ```

use async_trait::async_trait;

use crate::storage::{LogState, LogStore};
use crate::types::{
    Entry, EntryPayload, HardState, LogId, LogIndex, NodeId, NodeUuid, Term, TypeConfig,
};

/// How the suite gets stores (fresh ones, and the same storage reopened,
/// as after a process restart) and the application's values to put in
/// entries.
#[async_trait]
pub trait LogStoreHarness: Send {
    /// The application's types.
    type Config: TypeConfig;
    /// The store under test.
    type Store: LogStore<Self::Config>;
    /// A new, empty store.
    async fn fresh(&mut self) -> Self::Store;
    /// Closes `store` and opens the same storage again.
    async fn reopen(&mut self, store: Self::Store) -> Self::Store;
    /// A command for the entry at `index` of `term`, different for every
    /// (term, index), so that the suite can tell entries apart.
    fn command(&self, term: u64, index: u64) -> <Self::Config as TypeConfig>::Command;
    /// The address of node `id`, for membership entries.
    fn node(&self, id: u64) -> <Self::Config as TypeConfig>::Node;
}

fn entry<H: LogStoreHarness>(h: &H, term: u64, index: u64) -> Entry<H::Config> {
    Entry {
        log_id: LogId::new(term, index),
        payload: EntryPayload::command(h.command(term, index)),
    }
}

fn entries<H: LogStoreHarness>(h: &H, term: u64, from: u64, to: u64) -> Vec<Entry<H::Config>> {
    (from..=to).map(|i| entry(h, term, i)).collect()
}

async fn state<C: TypeConfig, S: LogStore<C>>(s: &mut S) -> LogState {
    s.log_state().await.expect("log_state")
}

async fn ids<C: TypeConfig, S: LogStore<C>>(s: &mut S, from: u64, to: u64) -> Vec<LogId> {
    s.read(LogIndex(from), LogIndex(to))
        .await
        .expect("read")
        .iter()
        .map(|e| e.log_id)
        .collect()
}

fn id_range(term: u64, from: u64, to: u64) -> Vec<LogId> {
    (from..=to).map(|i| LogId::new(term, i)).collect()
}

/// Runs every case; panics naming the case that failed.
pub async fn run<H: LogStoreHarness>(h: &mut H) {
    empty_store(h).await;
    append_and_read_ranges(h).await;
    append_leaving_a_hole_is_refused(h).await;
    truncate_edges(h).await;
    purge_edges(h).await;
    purge_past_the_end_then_append(h).await;
    hard_state_round_trip(h).await;
    reopen_after_every_operation(h).await;
    entries_round_trip_exactly(h).await;
}

async fn empty_store<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    assert_eq!(
        state(&mut s).await,
        LogState::default(),
        "empty_store: log state"
    );
    assert_eq!(
        s.load_hard_state().await.expect("hs"),
        HardState::default(),
        "empty_store: hard state"
    );
    assert!(ids(&mut s, 0, 100).await.is_empty(), "empty_store: read");
    let mut s = h.reopen(s).await;
    assert_eq!(
        state(&mut s).await,
        LogState::default(),
        "empty_store: reopened"
    );
}

async fn append_and_read_ranges<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    s.append(entries(h, 1, 1, 5)).await.expect("append");
    s.append(entries(h, 2, 6, 10)).await.expect("append");
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::ZERO,
            last: LogId::new(2, 10)
        }
    );
    assert_eq!(ids(&mut s, 1, 10).await.len(), 10, "read all");
    assert_eq!(
        ids(&mut s, 4, 7).await,
        [id_range(1, 4, 5), id_range(2, 6, 7)].concat(),
        "read middle"
    );
    assert_eq!(
        ids(&mut s, 0, 2).await,
        id_range(1, 1, 2),
        "read clipped below"
    );
    assert_eq!(
        ids(&mut s, 9, 50).await,
        id_range(2, 9, 10),
        "read clipped above"
    );
    assert!(ids(&mut s, 11, 20).await.is_empty(), "read past the end");
    assert!(ids(&mut s, 7, 6).await.is_empty(), "read an empty range");
}

async fn append_leaving_a_hole_is_refused<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    s.append(entries(h, 1, 1, 3)).await.expect("append");
    assert!(
        s.append(entries(h, 1, 5, 6)).await.is_err(),
        "append with a hole must fail"
    );
    assert!(
        s.append(entries(h, 1, 3, 4)).await.is_err(),
        "append overlapping the end must fail"
    );
    assert_eq!(
        state(&mut s).await.last,
        LogId::new(1, 3),
        "refused appends leave the log as it was"
    );
}

async fn truncate_edges<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    s.append(entries(h, 1, 1, 10)).await.expect("append");
    s.truncate(LogIndex(11)).await.expect("truncate past end");
    assert_eq!(
        state(&mut s).await.last,
        LogId::new(1, 10),
        "truncate past the end is a no-op"
    );
    s.truncate(LogIndex(6)).await.expect("truncate");
    assert_eq!(
        state(&mut s).await.last,
        LogId::new(1, 5),
        "truncate middle"
    );
    assert!(
        ids(&mut s, 6, 10).await.is_empty(),
        "truncated entries are gone"
    );
    s.append(entries(h, 3, 6, 8))
        .await
        .expect("append after truncate");
    assert_eq!(
        ids(&mut s, 5, 8).await,
        [id_range(1, 5, 5), id_range(3, 6, 8)].concat()
    );
    s.truncate(LogIndex(1)).await.expect("truncate all");
    assert_eq!(
        state(&mut s).await,
        LogState::default(),
        "truncate from the first entry empties the log"
    );
    s.append(entries(h, 4, 1, 2))
        .await
        .expect("append to emptied log");
    assert_eq!(state(&mut s).await.last, LogId::new(4, 2));
}

async fn purge_edges<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    s.append(entries(h, 1, 1, 10)).await.expect("append");
    s.purge(LogId::new(1, 4)).await.expect("purge");
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::new(1, 4),
            last: LogId::new(1, 10)
        }
    );
    assert_eq!(
        ids(&mut s, 1, 6).await,
        id_range(1, 5, 6),
        "purged entries are gone"
    );
    s.purge(LogId::new(1, 2))
        .await
        .expect("purge behind the purge point");
    assert_eq!(
        state(&mut s).await.last_purged,
        LogId::new(1, 4),
        "purging backwards is a no-op"
    );
    s.truncate(LogIndex(7)).await.expect("truncate after purge");
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::new(1, 4),
            last: LogId::new(1, 6)
        }
    );
    s.truncate(LogIndex(5))
        .await
        .expect("truncate everything after purge");
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::new(1, 4),
            last: LogId::new(1, 4)
        }
    );
    s.append(entries(h, 2, 5, 5))
        .await
        .expect("append after purge point");
    assert_eq!(state(&mut s).await.last, LogId::new(2, 5));
}

async fn purge_past_the_end_then_append<H: LogStoreHarness>(h: &mut H) {
    // What installing a snapshot newer than the log does.
    let mut s = h.fresh().await;
    s.append(entries(h, 1, 1, 3)).await.expect("append");
    s.purge(LogId::new(5, 20)).await.expect("purge past end");
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::new(5, 20),
            last: LogId::new(5, 20)
        }
    );
    assert!(ids(&mut s, 0, 30).await.is_empty());
    s.append(entries(h, 5, 21, 22))
        .await
        .expect("append after snapshot point");
    let mut s = h.reopen(s).await;
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::new(5, 20),
            last: LogId::new(5, 22)
        }
    );
}

async fn hard_state_round_trip<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    let a = HardState {
        term: Term(3),
        voted_for: Some(NodeId(2)),
        uuid: NodeUuid(u128::MAX - 5),
    };
    s.save_hard_state(a).await.expect("save");
    assert_eq!(s.load_hard_state().await.expect("load"), a);
    let b = HardState {
        term: Term(4),
        voted_for: None,
        uuid: NodeUuid(0x0123_4567_89ab_cdef_0011_2233_4455_6677),
    };
    s.save_hard_state(b).await.expect("save");
    let mut s = h.reopen(s).await;
    assert_eq!(
        s.load_hard_state().await.expect("load"),
        b,
        "hard state survives reopen"
    );
}

async fn reopen_after_every_operation<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    s.append(entries(h, 1, 1, 10)).await.expect("append");
    let mut s = h.reopen(s).await;
    assert_eq!(
        state(&mut s).await.last,
        LogId::new(1, 10),
        "append survives reopen"
    );
    s.truncate(LogIndex(8)).await.expect("truncate");
    let mut s = h.reopen(s).await;
    assert_eq!(
        state(&mut s).await.last,
        LogId::new(1, 7),
        "truncate survives reopen"
    );
    s.purge(LogId::new(1, 3)).await.expect("purge");
    let mut s = h.reopen(s).await;
    assert_eq!(
        state(&mut s).await,
        LogState {
            last_purged: LogId::new(1, 3),
            last: LogId::new(1, 7)
        }
    );
    assert_eq!(
        ids(&mut s, 0, 100).await,
        id_range(1, 4, 7),
        "purge survives reopen"
    );
    s.save_hard_state(HardState {
        term: Term(9),
        voted_for: Some(NodeId(1)),
        uuid: NodeUuid(1),
    })
    .await
    .expect("save");
    let mut s = h.reopen(s).await;
    assert_eq!(s.load_hard_state().await.expect("load").term, Term(9));
}

async fn entries_round_trip_exactly<H: LogStoreHarness>(h: &mut H) {
    let mut s = h.fresh().await;
    let mut es = entries(h, 1, 1, 3);
    es.push(Entry {
        log_id: LogId::new(1, 4),
        payload: EntryPayload::Blank,
    });
    es.push(Entry {
        log_id: LogId::new(2, 5),
        payload: EntryPayload::Membership(crate::types::Membership::new_voters(
            [(NodeId(1), h.node(1)), (NodeId(2), h.node(2))].into(),
        )),
    });
    s.append(es.clone()).await.expect("append");
    let mut s = h.reopen(s).await;
    assert_eq!(
        s.read(LogIndex(1), LogIndex(5)).await.expect("read"),
        es,
        "entries come back exactly"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{KvCommand, KvConfig, MemLogStore};

    struct MemHarness;

    #[async_trait]
    impl LogStoreHarness for MemHarness {
        type Config = KvConfig;
        type Store = MemLogStore<KvConfig>;
        async fn fresh(&mut self) -> Self::Store {
            MemLogStore::new()
        }
        async fn reopen(&mut self, store: Self::Store) -> Self::Store {
            store // clones share the same memory: "reopening" keeps it
        }
        fn command(&self, term: u64, index: u64) -> KvCommand {
            KvCommand::Put {
                key: format!("k{index}"),
                value: format!("t{term}"),
            }
        }
        fn node(&self, id: u64) -> String {
            format!("node-{id}")
        }
    }

    #[tokio::test]
    async fn memory_log_store_conforms() {
        run(&mut MemHarness).await;
    }
}
