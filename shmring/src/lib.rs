//! Lock-free single-producer single-consumer rings over shared memory.
#![cfg_attr(not(feature = "std"), no_std)]
