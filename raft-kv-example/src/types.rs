//! The service's vocabulary: what is replicated, what applying it answers,
//! and how a member is addressed.

use std::net::{SocketAddr, ToSocketAddrs};

use raft_core::TypeConfig;
use raft_core::session::{SessionError, SessionLimits, SessionTag};
use raft_transport_quic::QuicAddr;
use serde::{Deserialize, Serialize};

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
            Command::InSession { command, .. } => 32 + Kv::command_size(command),
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
    /// `Delete` or `Cas`; anything else is answered [`Response::None`] and
    /// applied nowhere.
    InSession {
        /// The session, the write's sequence and the client's
        /// acknowledgement.
        tag: SessionTag,
        /// The proposing leader's clock, in ms since the Unix epoch.
        stamp_ms: u64,
        /// The write.
        command: Box<Command>,
    },
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
