//! A replicated key-value service composed from the workspace's crates:
//! [`raft_core`] for consensus, [`raft_storage_rocksdb`] for the log and the
//! data, [`raft_transport_quic`] between nodes, and an HTTP API for clients.
//!
//! The `raft-kv` binary is a thin command line over this library:
//! `raft-kv serve --config cluster.toml --id N` runs [`server::Node`];
//! `raft-kv certs` writes development certificates; `put`, `get`, `delete`,
//! `cas` and `status` are clients of the HTTP API through [`client`].
//!
//! Features: `server` (the node; RocksDB and QUIC) and `client` (the client
//! library alone), both on by default. An application that only talks to a
//! cluster depends on `default-features = false, features = ["client"]`.

#![deny(missing_docs)]

pub mod api;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod certs;
#[cfg(feature = "client")]
pub mod client;
#[cfg(feature = "server")]
pub mod cluster_file;
#[cfg(feature = "server")]
pub mod dashboard;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod listener;
#[cfg(feature = "server")]
pub mod logic;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "client")]
pub mod token;
#[cfg(feature = "server")]
pub mod types;

#[cfg(feature = "server")]
pub use cluster_file::ClusterFile;
#[cfg(feature = "server")]
pub use server::{Node, ServeError};
#[cfg(feature = "server")]
pub use types::{Command, Kv, NodeAddr, Response, SessionWrite};
