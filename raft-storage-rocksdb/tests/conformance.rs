//! The RocksDB store passes raft-core's LogStore conformance suite, reopening
//! a real directory wherever the suite reopens: with the simulator's
//! key-value types, and with an application's own (binary commands, socket
//! addresses for nodes).

use std::marker::PhantomData;

use async_trait::async_trait;
use raft_core::TypeConfig;
use raft_core::log_store_suite::{self, LogStoreHarness};
use raft_core::memory::{KvCommand, KvConfig};
use raft_storage_rocksdb::{RocksDb, RocksLogStore, RocksOptions};

struct Harness<C> {
    dirs: Vec<tempfile::TempDir>,
    /// The directory of the store the suite is working with.
    current: std::path::PathBuf,
    _c: PhantomData<C>,
}

impl<C> Harness<C> {
    fn new() -> Self {
        Harness {
            dirs: Vec::new(),
            current: Default::default(),
            _c: PhantomData,
        }
    }
}

/// The values each configuration puts in entries.
trait Values: TypeConfig {
    fn command(term: u64, index: u64) -> Self::Command;
    fn node(id: u64) -> Self::Node;
}

impl Values for KvConfig {
    fn command(term: u64, index: u64) -> KvCommand {
        KvCommand::Put {
            key: format!("k{index}"),
            value: format!("t{term}"),
        }
    }
    fn node(id: u64) -> String {
        format!("node-{id}")
    }
}

/// An application's own types: commands are opaque bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Blobs;

impl TypeConfig for Blobs {
    type Command = Vec<u8>;
    type Response = ();
    type Node = std::net::SocketAddr;
    fn command_size(c: &Vec<u8>) -> usize {
        c.len()
    }
}

impl Values for Blobs {
    fn command(term: u64, index: u64) -> Vec<u8> {
        let mut c = term.to_be_bytes().to_vec();
        c.extend_from_slice(&index.to_le_bytes());
        c
    }
    fn node(id: u64) -> std::net::SocketAddr {
        ([10, 0, 0, id as u8], 7000).into()
    }
}

#[async_trait]
impl<C: Values> LogStoreHarness for Harness<C> {
    type Config = C;
    type Store = RocksLogStore<C>;

    fn command(&self, term: u64, index: u64) -> C::Command {
        C::command(term, index)
    }

    fn node(&self, id: u64) -> C::Node {
        C::node(id)
    }

    async fn fresh(&mut self) -> Self::Store {
        let dir = tempfile::tempdir().expect("tempdir");
        self.current = dir.path().to_path_buf();
        self.dirs.push(dir);
        let db = RocksDb::open(&self.current, RocksOptions::default()).expect("open");
        db.log_store(1).expect("log store")
    }

    async fn reopen(&mut self, store: Self::Store) -> Self::Store {
        drop(store); // closes the database (joins its writer thread)
        let db = RocksDb::open(&self.current, RocksOptions::default()).expect("reopen");
        db.log_store(1).expect("log store")
    }
}

#[tokio::test]
async fn rocksdb_log_store_conforms() {
    log_store_suite::run(&mut Harness::<KvConfig>::new()).await;
}

#[tokio::test]
async fn rocksdb_log_store_conforms_with_an_applications_own_types() {
    log_store_suite::run(&mut Harness::<Blobs>::new()).await;
}
