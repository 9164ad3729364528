//! Scenarios shared by the integration tests and the fuzz targets.
pub mod nic_rx;
