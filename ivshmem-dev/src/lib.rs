//! The ivshmem v2 device contract (PCI identity, config space, registers, doorbell encoding,
//! shared-memory layout) and the guest-side driver.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod hosted;
