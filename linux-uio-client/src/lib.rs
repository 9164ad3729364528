//! The Linux side of an ivshmem link: real UIO (`/dev/uioN`) or the hosted hypervisor.
