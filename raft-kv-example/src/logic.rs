//! The key-value command logic, run by raft-storage-rocksdb's state-machine
//! helper (which writes data, last applied id and membership atomically).

use raft_core::LogId;
use raft_core::session::{self, Admission};
use raft_storage_rocksdb::{KvApply, RocksSessions, WriteView};

use crate::auth;
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
            Command::CreateToken { name, role, hash } => {
                Response::TokenChanged(auth::apply_create(view, name, *role, *hash))
            }
            Command::RevokeToken { name } => Response::TokenChanged(auth::apply_revoke(view, name)),
            // Session commands need the entry's log id: `apply_at`.
            Command::OpenSession { .. } | Command::InSession { .. } => Response::None,
        }
    }

    fn apply_at(&self, log_id: LogId, command: &Command, view: &mut WriteView<'_>) -> Response {
        let index = log_id.index.0;
        match command {
            Command::OpenSession { stamp_ms, limits } => {
                session::register::<Response>(
                    &mut RocksSessions::new(view),
                    index,
                    *stamp_ms,
                    *limits,
                );
                Response::SessionOpened { client_id: index }
            }
            Command::InSession {
                tag,
                stamp_ms,
                command,
            } => {
                let command = command.command();
                match session::admit(&mut RocksSessions::new(view), tag, *stamp_ms) {
                    Admission::Apply => {
                        let response = self.apply(command, view);
                        session::record(
                            &mut RocksSessions::new(view),
                            tag,
                            index,
                            response.clone(),
                        );
                        Response::InSession {
                            index,
                            replayed: false,
                            response: Box::new(response),
                        }
                    }
                    Admission::Replay { index, response } => Response::InSession {
                        index,
                        replayed: true,
                        response: Box::new(response),
                    },
                    Admission::Refuse(e) => Response::SessionRefused(e),
                }
            }
            command => self.apply(command, view),
        }
    }

    fn empty_response(&self) -> Response {
        Response::None
    }
}
