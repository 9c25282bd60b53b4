//! The RocksDB store passes raft-core's LogStore conformance suite, reopening
//! a real directory wherever the suite reopens.

use async_trait::async_trait;
use raft_core::log_store_suite::{self, LogStoreHarness};
use raft_core::memory::KvConfig;
use raft_storage_rocksdb::{RocksDb, RocksLogStore, RocksOptions};

struct Harness {
    dirs: Vec<tempfile::TempDir>,
    /// The directory of the store the suite is working with.
    current: std::path::PathBuf,
}

#[async_trait]
impl LogStoreHarness for Harness {
    type Store = RocksLogStore<KvConfig>;

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
    log_store_suite::run(&mut Harness {
        dirs: Vec::new(),
        current: Default::default(),
    })
    .await;
}
