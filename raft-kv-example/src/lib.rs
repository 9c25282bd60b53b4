//! A replicated key-value service composed from the workspace's crates:
//! [`raft_core`] for consensus, [`raft_storage_rocksdb`] for the log and the
//! data, [`raft_transport_quic`] between nodes, and an HTTP API for clients.
//!
//! The `raft-kv` binary is a thin command line over this library:
//! `raft-kv serve --config cluster.toml --id N` runs [`server::Node`];
//! `raft-kv certs` writes development certificates; `put`, `get`, `delete`,
//! `cas` and `status` are clients of the [`http`] API.

#![deny(missing_docs)]

pub mod client;
pub mod cluster_file;
pub mod http;
pub mod logic;
pub mod metrics;
pub mod server;
pub mod types;

pub use cluster_file::ClusterFile;
pub use server::{Node, ServeError};
pub use types::{Command, Kv, NodeAddr, Response};
