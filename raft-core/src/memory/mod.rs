//! In-memory backends for tests and quick starts: a [`MemLogStore`], a
//! key-value [`MemStateMachine`] and an in-process network ([`MemRouter`]).

pub mod kv;
mod log_store;
mod network;
mod state_machine;

pub use kv::{KvCommand, KvConfig, KvResponse, KvStore};
pub use log_store::MemLogStore;
pub use network::{MemNetwork, MemNetworkFactory, MemRouter};
pub use state_machine::MemStateMachine;
