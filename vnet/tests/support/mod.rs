//! Scenarios shared by the integration tests and the fuzz targets (each test uses one;
//! `ivnet` allows its own dead code, as the fuzz target includes it alone).
pub mod ivnet;
#[allow(dead_code)]
pub mod nic_rx;
