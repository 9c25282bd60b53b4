//! Placeholder crate: the replicated KV service is tracked in its own issue.
