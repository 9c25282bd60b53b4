//! A small key-value state machine: the command and response types the
//! simulator, the examples and the benchmarks share.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::codec::{self, CodecError};
use crate::types::{Entry, EntryPayload, LogId, Membership, TypeConfig};

/// The type configuration of the in-memory key-value store: string keys and
/// values, nodes addressed by a string.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvConfig;

impl TypeConfig for KvConfig {
    type Command = KvCommand;
    type Response = KvResponse;
    type Node = String;

    fn command_size(command: &KvCommand) -> usize {
        match command {
            KvCommand::Put { key, value } => key.len() + value.len(),
            KvCommand::Delete { key } => key.len(),
            KvCommand::Cas { key, expected, new } => {
                key.len()
                    + expected.as_ref().map_or(0, String::len)
                    + new.as_ref().map_or(0, String::len)
            }
        }
    }
}

/// A write to the example key-value store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: String,
    },
    /// Removes `key`.
    Delete {
        /// The key.
        key: String,
    },
    /// Compare-and-set: `expected: None` means the key must be absent;
    /// `new: None` deletes it.
    Cas {
        /// The key.
        key: String,
        /// The value it must hold for the swap to happen.
        expected: Option<String>,
        /// The value it gets if it does.
        new: Option<String>,
    },
}

impl KvCommand {
    /// The key the command writes.
    pub fn key(&self) -> &str {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key } | KvCommand::Cas { key, .. } => {
                key
            }
        }
    }
}

/// What applying a [`KvCommand`] answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvResponse {
    /// For blank and membership entries.
    #[default]
    None,
    /// The put was applied.
    Put,
    /// The delete was applied; whether the key existed.
    Deleted(bool),
    /// Whether the swap happened, and the key's value after the operation.
    Cas {
        /// The key held `expected`, and now holds `new`.
        succeeded: bool,
        /// The key's value after the operation.
        current: Option<String>,
    },
}

/// The key-value data plus what every state machine must track: the last
/// applied entry and the configuration as of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvStore {
    /// The keys and their values.
    pub data: BTreeMap<String, String>,
    /// The last entry applied.
    pub last_applied: LogId,
    /// The membership as of `last_applied`.
    pub membership: Membership<String>,
}

impl KvStore {
    /// Applies one committed entry. Takes it by value: the key and value
    /// move into the map instead of being copied (a tenth of the core
    /// bench's time went to such copies).
    pub fn apply(&mut self, entry: Entry<KvConfig>) -> KvResponse {
        self.last_applied = entry.log_id;
        match entry.payload {
            EntryPayload::Blank => KvResponse::None,
            EntryPayload::Membership(m) => {
                self.membership = m;
                KvResponse::None
            }
            EntryPayload::Command(cmd) => self.apply_command(Arc::unwrap_or_clone(cmd)),
        }
    }

    /// Applies one command to the data (no log bookkeeping).
    pub fn apply_command(&mut self, cmd: KvCommand) -> KvResponse {
        match cmd {
            KvCommand::Put { key, value } => {
                self.data.insert(key, value);
                KvResponse::Put
            }
            KvCommand::Delete { key } => KvResponse::Deleted(self.data.remove(&key).is_some()),
            KvCommand::Cas { key, expected, new } => {
                let current = self.data.get(&key).cloned();
                if current == expected {
                    match &new {
                        Some(v) => self.data.insert(key, v.clone()),
                        None => self.data.remove(&key),
                    };
                    KvResponse::Cas {
                        succeeded: true,
                        current: new,
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

    /// The value of `key`, if it has one.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.data.get(key)
    }

    /// About what [`KvStore::encode`] produces, in bytes, without encoding
    /// (a snapshot's `size` for the snapshot policy).
    pub fn approx_encoded_len(&self) -> u64 {
        let data: usize = self.data.iter().map(|(k, v)| k.len() + v.len() + 2).sum();
        (data + 64 + 32 * self.membership.nodes.len()) as u64
    }

    /// The whole store in the wire codec: a snapshot's bytes.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        codec::encode(self)
    }

    /// A store from [`KvStore::encode`]'s bytes; untrusted input gets an
    /// error, never a panic.
    pub fn decode(bytes: &[u8]) -> Result<KvStore, CodecError> {
        codec::decode(bytes)
    }
}
