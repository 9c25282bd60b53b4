//! In-memory backends for tests and quick starts: a [`MemLogStore`], a
//! [`MemStateMachine`] for any [`MemApp`] (the key-value [`KvStore`] by
//! default) and an in-process network (`MemRouter`,
//! with the `driver` feature: it routes between `Raft` handles).

mod app;
pub mod kv;
mod log_store;
#[cfg(feature = "driver")]
mod network;
mod state_machine;

pub use app::MemApp;
pub use kv::{KvCommand, KvConfig, KvResponse, KvStore};
pub use log_store::MemLogStore;
#[cfg(feature = "driver")]
pub use network::{MemNetwork, MemNetworkFactory, MemRouter};
pub use state_machine::MemStateMachine;
