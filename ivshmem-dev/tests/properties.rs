//! Property tests: layout arithmetic for arbitrary parameters, and discovery against
//! arbitrary (hostile) config space.

use std::cell::Cell;

use ivshmem_dev::pci::{self, probe, CLASS, CLASS_CODE, DEVICE_ID, VENDOR_ID};
use ivshmem_dev::{ConfigAccess, Doorbell, LayoutParams, PciAddress, SharedMemoryLayout};
use proptest::prelude::*;

/// A single function whose config space is whatever proptest generated, except that it
/// identifies as an ivshmem device so `probe` gets past the identity checks.
struct HostileFunction {
    space: [u8; 256],
    reads: Cell<usize>,
}

impl ConfigAccess for HostileFunction {
    fn read32(&self, _: PciAddress, offset: u8) -> u32 {
        self.reads.set(self.reads.get() + 1);
        let at = usize::from(offset & !3);
        u32::from_le_bytes(self.space[at..at + 4].try_into().unwrap())
    }
    fn write32(&self, _: PciAddress, _: u8, _: u32) {}
}

proptest! {
    #[test]
    fn valid_layouts_are_page_aligned_disjoint_and_cover_the_total(
        max_peers in 2u16..=16,
        state_pages in 1u32..4,
        rw_pages in 0u64..64,
        output_pages in 0u64..64,
        page_shift in 12u32..17,
    ) {
        let page = 1u64 << page_shift;
        let params = LayoutParams {
            max_peers,
            state_table_size: state_pages * page as u32,
            rw_size: rw_pages * page,
            output_size: output_pages * page,
            page_size: page,
        };
        let layout = SharedMemoryLayout::new(params).unwrap();
        let mut regions = vec![layout.state_table(), layout.rw()];
        regions.extend((0..max_peers).map(|peer| layout.output(peer).unwrap()));
        let mut end = 0;
        for region in &regions {
            prop_assert_eq!(region.offset % page, 0);
            prop_assert_eq!(region.offset, end, "parts follow each other without gaps or overlap");
            end = region.end();
        }
        prop_assert_eq!(end, layout.total_size());
        prop_assert_eq!(layout.output(max_peers), None);
        prop_assert!(u64::from(params.state_table_size) >= 4 * u64::from(max_peers));
    }

    #[test]
    fn arbitrary_parameters_are_accepted_or_refused_with_a_named_parameter(
        max_peers in any::<u16>(),
        state_table_size in any::<u32>(),
        rw_size in any::<u64>(),
        output_size in any::<u64>(),
        page_size in prop_oneof![Just(4096u64), any::<u64>()],
    ) {
        let params = LayoutParams { max_peers, state_table_size, rw_size, output_size, page_size };
        match SharedMemoryLayout::new(params) {
            Ok(layout) => {
                let outputs = u128::from(output_size) * u128::from(max_peers);
                let total = u128::from(state_table_size) + u128::from(rw_size) + outputs;
                prop_assert_eq!(u128::from(layout.total_size()), total);
            }
            Err(err) => {
                let known = ["max_peers", "state_table_size", "rw_size", "output_size", "page_size"];
                prop_assert!(known.contains(&err.parameter()));
                prop_assert!(err.to_string().starts_with(err.parameter()));
            }
        }
    }

    #[test]
    fn doorbell_roundtrips_every_value(value in any::<u32>(), peer in any::<u16>(), vector in any::<u16>()) {
        prop_assert_eq!(Doorbell::decode(value).encode(), value);
        prop_assert_eq!(Doorbell::decode(Doorbell::new(peer, vector).encode()), Doorbell::new(peer, vector));
    }

    #[test]
    fn probe_survives_arbitrary_config_space(bytes in proptest::collection::vec(any::<u8>(), 256)) {
        let mut space: [u8; 256] = bytes.try_into().unwrap();
        space[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
        space[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
        space[usize::from(CLASS)] = CLASS_CODE;
        let function = HostileFunction { space, reads: Cell::new(0) };
        let address = PciAddress::new(0, 1, 0);
        if let Ok(found) = probe(&function, address) {
            let cap = usize::from(found.capability.offset);
            prop_assert!(cap >= 0x40 && cap + usize::from(found.capability.length) <= 256);
            prop_assert_eq!(space[cap], pci::CAP_ID_VENDOR);
        }
        // Bounded work: the capability walk cannot loop.
        prop_assert!(function.reads.get() < 100);
    }
}
