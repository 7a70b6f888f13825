//! Placeholder crate: see the issue tracker.
