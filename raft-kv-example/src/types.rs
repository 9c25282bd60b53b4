//! The service's vocabulary: what is replicated, what applying it answers,
//! and how a member is addressed.

use std::net::{SocketAddr, ToSocketAddrs};

use raft_core::TypeConfig;
use raft_core::session::{SessionError, SessionLimits, SessionTag};
use raft_transport_quic::QuicAddr;
use serde::{Deserialize, Serialize};

use crate::token::{Role, TokenHash};

/// The service's [`TypeConfig`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kv;

impl TypeConfig for Kv {
    type Command = Command;
    type Response = Response;
    type Node = NodeAddr;

    fn command_size(command: &Command) -> usize {
        let opt = |v: &Option<serde_bytes::ByteBuf>| v.as_ref().map_or(0, |v| v.len());
        match command {
            Command::Put { key, value } => key.len() + value.len(),
            Command::Delete { key } => key.len(),
            Command::Cas { key, expected, new } => key.len() + opt(expected) + opt(new),
            Command::OpenSession { .. } => 16,
            Command::InSession { command, .. } => 32 + Kv::command_size(command.command()),
            Command::CreateToken { name, .. } => 40 + name.len(),
            Command::RevokeToken { name } => name.len(),
        }
    }
}

/// One replicated operation. Keys are UTF-8 (they travel in URL paths);
/// values are arbitrary bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets `key` to `value`.
    Put {
        /// The key.
        key: String,
        /// Its new value.
        value: serde_bytes::ByteBuf,
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
        /// The value it must hold.
        expected: Option<serde_bytes::ByteBuf>,
        /// The value it gets.
        new: Option<serde_bytes::ByteBuf>,
    },
    /// Opens a client session ([`raft_core::session`]); its client id is
    /// this entry's log index.
    OpenSession {
        /// The proposing leader's clock, in ms since the Unix epoch.
        stamp_ms: u64,
        /// The session's limits.
        limits: SessionLimits,
    },
    /// A write in a client session: applied at most once per (client id,
    /// sequence), however often it is retried. The write is a `Put`,
    /// `Delete` or `Cas` (nothing else encodes or decodes there).
    InSession {
        /// The session, the write's sequence and the client's
        /// acknowledgement.
        tag: SessionTag,
        /// The proposing leader's clock, in ms since the Unix epoch.
        stamp_ms: u64,
        /// The write.
        command: SessionWrite,
    },
    /// Records the client-API token `name` with `role`, given its hash
    /// ([`crate::auth`]); refused (`TokenChanged(false)`) while a live
    /// token of that name exists.
    CreateToken {
        /// The token's name.
        name: String,
        /// What it may do.
        role: Role,
        /// The SHA-256 of the whole token: the cluster never sees the token.
        hash: TokenHash,
    },
    /// Revokes the token `name` on every node.
    RevokeToken {
        /// The token's name.
        name: String,
    },
}

/// A write that may go in a session: a `Put`, `Delete` or `Cas` command,
/// never a session command, so commands never nest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionWrite(#[serde(with = "plain_write")] Box<Command>);

impl SessionWrite {
    /// `command` as a write in a session; a session command is handed back.
    pub fn new(command: Command) -> Result<SessionWrite, Command> {
        match command {
            Command::Put { .. } | Command::Delete { .. } | Command::Cas { .. } => {
                Ok(SessionWrite(Box::new(command)))
            }
            other => Err(other),
        }
    }

    /// The write.
    pub fn command(&self) -> &Command {
        &self.0
    }
}

/// The write inside a [`SessionWrite`], encoded exactly as the `Put`,
/// `Delete` or `Cas` command it is, and decoded as one of those only: a
/// command can never nest another, so an entry that nests commands a
/// million deep (hostile, or corrupt behind a valid checksum) is refused
/// as an unknown variant instead of overflowing the stack while decoding.
mod plain_write {
    use serde::de::Deserializer;
    use serde::ser::{Error as _, Serializer};
    use serde::{Deserialize, Serialize};
    use serde_bytes::ByteBuf;

    use super::Command;

    /// `Command`'s first three variants, borrowed (same variant indices,
    /// same fields: the same bytes in the codec).
    #[derive(Serialize)]
    enum Ref<'a> {
        Put {
            key: &'a String,
            value: &'a ByteBuf,
        },
        Delete {
            key: &'a String,
        },
        Cas {
            key: &'a String,
            expected: &'a Option<ByteBuf>,
            new: &'a Option<ByteBuf>,
        },
    }

    /// The same, owned, for decoding.
    #[derive(Deserialize)]
    enum Owned {
        Put {
            key: String,
            value: ByteBuf,
        },
        Delete {
            key: String,
        },
        Cas {
            key: String,
            expected: Option<ByteBuf>,
            new: Option<ByteBuf>,
        },
    }

    pub fn serialize<S: Serializer>(c: &Command, s: S) -> Result<S::Ok, S::Error> {
        match c {
            Command::Put { key, value } => Ref::Put { key, value }.serialize(s),
            Command::Delete { key } => Ref::Delete { key }.serialize(s),
            Command::Cas { key, expected, new } => Ref::Cas { key, expected, new }.serialize(s),
            // `SessionWrite::new` lets no other command in.
            _ => Err(S::Error::custom(
                "a write in a session is a put, a delete or a CAS",
            )),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Box<Command>, D::Error> {
        Ok(Box::new(match Owned::deserialize(d)? {
            Owned::Put { key, value } => Command::Put { key, value },
            Owned::Delete { key } => Command::Delete { key },
            Owned::Cas { key, expected, new } => Command::Cas { key, expected, new },
        }))
    }
}

/// What applying a [`Command`] answered. Kept in client sessions, so it
/// is stored with the data (in the workspace codec).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// For blank and membership entries.
    #[default]
    None,
    /// The put was applied.
    Put,
    /// Whether the key existed.
    Deleted(bool),
    /// Whether the swap happened, and the key's value after the operation.
    Cas {
        /// Whether the swap happened.
        succeeded: bool,
        /// The key's value after it.
        current: Option<Vec<u8>>,
    },
    /// A session was opened.
    SessionOpened {
        /// Its client id.
        client_id: u64,
    },
    /// The answer to a write in a session.
    InSession {
        /// The log index of the entry that applied the write (for a replay,
        /// the first commit's).
        index: u64,
        /// A retry answered from the session, not applied again.
        replayed: bool,
        /// What applying the write answered.
        response: Box<Response>,
    },
    /// A write in a session was refused, and not applied.
    SessionRefused(SessionError),
    /// Whether a `CreateToken` created the token, or a `RevokeToken`
    /// revoked a live one.
    TokenChanged(bool),
}

/// How a member is reached: its QUIC address for peers and its HTTP address
/// for clients (redirects point there). Stored in membership entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddr {
    /// The member's QUIC address.
    pub raft_addr: String,
    /// The member's HTTP address.
    pub http_addr: String,
}

impl QuicAddr for NodeAddr {
    fn quic_addr(&self) -> Option<SocketAddr> {
        self.raft_addr
            .parse()
            .ok()
            .or_else(|| self.raft_addr.to_socket_addrs().ok()?.next())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put() -> Command {
        Command::Put {
            key: "k".into(),
            value: serde_bytes::ByteBuf::from(b"v".to_vec()),
        }
    }

    fn in_session(command: Command) -> Command {
        Command::InSession {
            tag: SessionTag {
                client_id: 1,
                seq: 2,
                ack: 2,
            },
            stamp_ms: 3,
            command: SessionWrite::new(command).expect("a plain write"),
        }
    }

    #[test]
    fn a_write_in_a_session_round_trips_and_is_encoded_as_the_plain_command() {
        let cas = Command::Cas {
            key: "c".into(),
            expected: None,
            new: Some(serde_bytes::ByteBuf::from(b"n".to_vec())),
        };
        for inner in [put(), Command::Delete { key: "d".into() }, cas] {
            let c = in_session(inner.clone());
            let bytes = raft_core::codec::encode(&c).expect("encode");
            assert_eq!(
                raft_core::codec::decode::<Command>(&bytes).expect("decode"),
                c
            );
            let plain = raft_core::codec::encode(&inner).expect("encode");
            assert!(
                bytes.ends_with(&plain),
                "the write is the command's own bytes"
            );
        }
    }

    #[test]
    fn commands_never_nest_whatever_the_bytes_say() {
        // A session command cannot be made a session write.
        assert!(SessionWrite::new(in_session(put())).is_err());
        // Bytes that nest one a million deep decode to an error, not a
        // stack overflow: the inner command may not be a session one.
        let one = raft_core::codec::encode(&in_session(put())).expect("encode");
        let plain = raft_core::codec::encode(&put()).expect("encode");
        let header = &one[..one.len() - plain.len()];
        let mut nested = header.repeat(1_000_000);
        nested.extend_from_slice(&plain);
        assert!(raft_core::codec::decode::<Command>(&nested).is_err());
    }
}
