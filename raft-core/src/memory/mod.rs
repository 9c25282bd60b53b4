//! In-memory backends for tests and quick starts: a [`MemLogStore`], a
//! key-value [`MemStateMachine`] and an in-process network (`MemRouter`,
//! with the `driver` feature: it routes between `Raft` handles).

pub mod kv;
mod log_store;
#[cfg(feature = "driver")]
mod network;
mod state_machine;

pub use kv::{KvCommand, KvConfig, KvResponse, KvStore};
pub use log_store::MemLogStore;
#[cfg(feature = "driver")]
pub use network::{MemNetwork, MemNetworkFactory, MemRouter};
pub use state_machine::MemStateMachine;
