//! Shared helpers for the ivshmem-stack examples and the side-by-side benchmark tool.
