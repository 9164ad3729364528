//! A smoltcp virtual NIC over shmring rings on an ivshmem link (protocol 0001h).
#![cfg_attr(not(feature = "std"), no_std)]
