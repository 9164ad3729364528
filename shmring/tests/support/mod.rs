//! Code shared by integration tests (and the fuzz target).
pub mod hostile;
