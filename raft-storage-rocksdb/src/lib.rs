//! Placeholder crate: the layout is visible from day one; the implementation is tracked in its own issue.
