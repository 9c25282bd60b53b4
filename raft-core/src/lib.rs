//! # raft-core
//!
//! A Raft consensus library in three layers:
//! - [`engine`]: the sans-IO consensus state machine ([`Engine`]). Events in,
//!   [`Action`]s out; no clock, no IO, randomness only from a seed.
//! - the traits [`LogStore`], [`StateMachine`] and [`Network`] that backends
//!   implement, each method's durability contract in its docs;
//! - [`Raft`]: a tokio driver that runs one engine against those traits and
//!   is the handle applications use (`client_write`, `ensure_linearizable`,
//!   `metrics`, `shutdown`).
//!
//! [`memory`] has in-memory backends for tests and quick starts, and [`sim`]
//! a deterministic cluster simulator with safety and linearizability
//! checkers, reusable by other crates' tests.

#![deny(missing_docs)]

pub mod codec;
pub mod config;
pub mod engine;
pub mod error;
pub mod executor;
pub mod fuzz;
pub mod message;
pub mod network;
#[cfg(feature = "driver")]
pub mod raft;
pub mod session;
pub mod state_machine;
pub mod storage;
pub mod types;

pub use config::{Config, ConfigError, WhenFull};
pub use engine::{Action, Engine, ProposeError, ReadId, RecoveredState, Role};
pub use error::{InitializeError, MembershipError, NotLeader, RecoveryError, StepError};
pub use message::*;
pub use network::{Network, NetworkError, NetworkFactory};
#[cfg(feature = "driver")]
pub use raft::{Raft, RaftError, RaftMetrics, StartError};
pub use state_machine::{SnapshotBuild, SnapshotChunk, StateMachine};
pub use storage::{LogState, LogStore, StorageError};
pub use types::*;
pub mod log_store_suite;
pub mod memory;
pub mod mutation;
pub mod sim;
