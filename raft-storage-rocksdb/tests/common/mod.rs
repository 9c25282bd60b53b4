//! The key-value command logic of raft-core's `KvConfig`, on RocksDB.
#![allow(dead_code)]

use raft_core::memory::{KvCommand, KvConfig, KvResponse};
use raft_storage_rocksdb::{KvApply, WriteView};

pub struct KvLogic;

impl KvApply<KvConfig> for KvLogic {
    fn apply(&self, command: &KvCommand, view: &mut WriteView<'_>) -> KvResponse {
        let s = |v: Option<Vec<u8>>| v.map(|b| String::from_utf8_lossy(&b).into_owned());
        match command {
            KvCommand::Put { key, value } => {
                view.put(key.as_bytes(), value.as_bytes());
                KvResponse::Put
            }
            KvCommand::Delete { key } => {
                let existed = view.get(key.as_bytes()).is_some();
                view.delete(key.as_bytes());
                KvResponse::Deleted(existed)
            }
            KvCommand::Cas { key, expected, new } => {
                let current = s(view.get(key.as_bytes()));
                if current == *expected {
                    match new {
                        Some(v) => view.put(key.as_bytes(), v.as_bytes()),
                        None => view.delete(key.as_bytes()),
                    }
                    KvResponse::Cas {
                        succeeded: true,
                        current: new.clone(),
                    }
                } else {
                    KvResponse::Cas {
                        succeeded: false,
                        current,
                    }
                }
            }
        }
    }

    fn empty_response(&self) -> KvResponse {
        KvResponse::None
    }
}

/// A node whose log, data and snapshots all live in one RocksDB directory
/// (group 1), on `router`'s in-process network: its handle and a reader of
/// its data.
pub async fn start_node(
    dir: &std::path::Path,
    id: raft_core::NodeId,
    config: raft_core::Config,
    router: &raft_core::memory::MemRouter<KvConfig>,
) -> (raft_core::Raft<KvConfig>, raft_storage_rocksdb::RocksReader) {
    let db =
        raft_storage_rocksdb::RocksDb::open(dir, raft_storage_rocksdb::RocksOptions::default())
            .expect("open rocksdb");
    let log = db.log_store(1).expect("log store");
    let sm = raft_storage_rocksdb::RocksStateMachine::open(&db, 1, KvLogic).expect("state machine");
    let reader = sm.reader();
    let raft = raft_core::Raft::start(id, config, log, sm, router.factory(id))
        .await
        .expect("start");
    (raft, reader)
}
