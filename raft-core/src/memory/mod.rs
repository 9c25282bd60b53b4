//! In-memory backends for tests and quick starts.

pub mod kv;
