//! The virtual ivshmem v2 device, system configuration and the cell life cycle.
