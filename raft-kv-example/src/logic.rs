//! The key-value command logic, run by raft-storage-rocksdb's state-machine
//! helper (which writes data, last applied id and membership atomically).

use raft_storage_rocksdb::{KvApply, WriteView};

use crate::types::{Command, Kv, Response};

/// Applies [`Command`]s to the RocksDB-backed data.
pub struct KvLogic;

impl KvApply<Kv> for KvLogic {
    fn apply(&self, command: &Command, view: &mut WriteView<'_>) -> Response {
        match command {
            Command::Put { key, value } => {
                view.put(key.as_bytes(), value);
                Response::Put
            }
            Command::Delete { key } => {
                let existed = view.get(key.as_bytes()).is_some();
                if existed {
                    view.delete(key.as_bytes());
                }
                Response::Deleted(existed)
            }
            Command::Cas { key, expected, new } => {
                let current = view.get(key.as_bytes());
                if current.as_deref() != expected.as_deref().map(|v| v.as_slice()) {
                    return Response::Cas {
                        succeeded: false,
                        current,
                    };
                }
                match new {
                    Some(v) => view.put(key.as_bytes(), v),
                    None => view.delete(key.as_bytes()),
                }
                Response::Cas {
                    succeeded: true,
                    current: new.as_ref().map(|v| v.to_vec()),
                }
            }
        }
    }

    fn empty_response(&self) -> Response {
        Response::None
    }
}
