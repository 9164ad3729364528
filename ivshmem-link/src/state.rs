//! The ivshmem-net link state machine (RESET → INIT → READY → RUN), pure.
//!
//! Each peer publishes its [`LinkState`] in its `STATE` register; after every interrupt (and at
//! start) a peer reads the other peer's state-table entry, calls [`next`], performs the
//! returned [`Action`] and writes the new own state to `STATE` if it changed. Repeat until the
//! step returns the same state with [`Action::None`] (at most three steps). [`crate::Link`]
//! does exactly that; this module is the table alone, for tests and for other drivers.
//!
//! Transitions (own state × peer state → new state, action), following the Linux
//! `ivshmem-net` driver:
//!
//! | own | peer | new | action |
//! |-----|------|-----|--------|
//! | RESET | RESET or INIT | INIT | none |
//! | RESET | READY or RUN | RESET | none: wait until the peer has noticed we left and reset |
//! | INIT | RESET | INIT | none |
//! | INIT | INIT, READY or RUN | READY | [`Action::SetUpOwn`] |
//! | READY | RESET | RESET | [`Action::TearDown`] |
//! | READY | INIT | READY | none: the peer is still setting up |
//! | READY | READY or RUN | RUN | [`Action::AttachPeer`] |
//! | RUN | RESET | RESET | [`Action::TearDown`] |
//! | RUN | INIT | RESET | [`Action::TearDown`] (see below) |
//! | RUN | READY or RUN | RUN | none (carrier: [`carrier`] is true only when the peer is RUN) |
//!
//! Choices beyond `ivshmem-net`:
//! - **RUN with a peer in INIT** means the peer went through RESET (it restarted) while we
//!   did not look: its old rings are gone, so we tear down too (the Linux driver ignores this
//!   case and would keep using stale rings).
//! - **A peer value above 3** is untrusted garbage (the state table is written by the
//!   hypervisor, but the value comes from the peer's `STATE` write): it is treated exactly like
//!   RESET, i.e. "the peer is not there". Never a panic.

/// A link state as published in `STATE`.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkState {
    /// 0: not there (also what the hypervisor writes for a dead or restarted peer).
    Reset = 0,
    /// 1: starting, own rings not yet set up.
    Init = 1,
    /// 2: own rings set up and announced; waiting for the peer.
    Ready = 2,
    /// 3: attached to the peer's rings; frames flow once both are RUN.
    Run = 3,
}

impl LinkState {
    /// All states, in numeric order.
    pub const ALL: [LinkState; 4] = [
        LinkState::Reset,
        LinkState::Init,
        LinkState::Ready,
        LinkState::Run,
    ];

    /// The value written to `STATE`.
    pub const fn as_u32(self) -> u32 {
        self as u32
    }

    /// Decodes a state-table value; values above 3 are `None` (untrusted garbage).
    pub const fn from_u32(value: u32) -> Option<LinkState> {
        match value {
            0 => Some(LinkState::Reset),
            1 => Some(LinkState::Init),
            2 => Some(LinkState::Ready),
            3 => Some(LinkState::Run),
            _ => None,
        }
    }

    /// Decodes a peer's state-table value, mapping garbage (> 3) to [`LinkState::Reset`].
    pub const fn from_peer(value: u32) -> LinkState {
        match LinkState::from_u32(value) {
            Some(s) => s,
            None => LinkState::Reset,
        }
    }
}

/// What the caller must do before publishing the new state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Nothing.
    None,
    /// Initialise the own ring parts (in the own output section), then publish READY.
    SetUpOwn,
    /// Attach to the peer's ring parts (its output section); carrier when the peer is RUN.
    AttachPeer,
    /// The peer left (or restarted): stop using its output section, drop the rings, reset
    /// the own parts, then publish RESET.
    TearDown,
}

/// Result of one step of the state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Step {
    /// The new own state (publish it in `STATE` after performing `action`).
    pub state: LinkState,
    /// What to do first.
    pub action: Action,
}

/// One step: the new own state and the action, given the own state and the peer's raw
/// state-table value (untrusted; see the module documentation for the table).
pub const fn next(own: LinkState, peer: u32) -> Step {
    use LinkState::*;
    let peer = LinkState::from_peer(peer);
    let (state, action) = match (own, peer) {
        (Reset, Reset | Init) => (Init, Action::None),
        (Reset, Ready | Run) => (Reset, Action::None),
        (Init, Reset) => (Init, Action::None),
        (Init, Init | Ready | Run) => (Ready, Action::SetUpOwn),
        (Ready, Reset) => (Reset, Action::TearDown),
        (Ready, Init) => (Ready, Action::None),
        (Ready, Ready | Run) => (Run, Action::AttachPeer),
        (Run, Reset | Init) => (Reset, Action::TearDown),
        (Run, Ready | Run) => (Run, Action::None),
    };
    Step { state, action }
}

/// Whether the carrier is on: own state RUN and the peer's state RUN.
pub const fn carrier(own: LinkState, peer: u32) -> bool {
    matches!(own, LinkState::Run) && peer == LinkState::Run as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use LinkState::*;

    /// The whole table, written out by hand: (own, peer, new, action).
    const TABLE: [(LinkState, u32, LinkState, Action); 16] = [
        (Reset, 0, Init, Action::None),
        (Reset, 1, Init, Action::None),
        (Reset, 2, Reset, Action::None),
        (Reset, 3, Reset, Action::None),
        (Init, 0, Init, Action::None),
        (Init, 1, Ready, Action::SetUpOwn),
        (Init, 2, Ready, Action::SetUpOwn),
        (Init, 3, Ready, Action::SetUpOwn),
        (Ready, 0, Reset, Action::TearDown),
        (Ready, 1, Ready, Action::None),
        (Ready, 2, Run, Action::AttachPeer),
        (Ready, 3, Run, Action::AttachPeer),
        (Run, 0, Reset, Action::TearDown),
        (Run, 1, Reset, Action::TearDown),
        (Run, 2, Run, Action::None),
        (Run, 3, Run, Action::None),
    ];

    #[test]
    fn exhaustive_table() {
        for (own, peer, state, action) in TABLE {
            assert_eq!(
                next(own, peer),
                Step { state, action },
                "own {own:?} peer {peer}"
            );
        }
        // Every (own, valid peer) pair is covered exactly once.
        for own in LinkState::ALL {
            for peer in 0..4 {
                let n = TABLE
                    .iter()
                    .filter(|(o, p, ..)| *o == own && *p == peer)
                    .count();
                assert_eq!(n, 1, "{own:?}/{peer}");
            }
        }
    }

    #[test]
    fn garbage_peer_values_act_like_reset() {
        for own in LinkState::ALL {
            for peer in [4, 5, 0x8000_0000, u32::MAX] {
                assert_eq!(next(own, peer), next(own, 0), "own {own:?} peer {peer:#x}");
                assert!(!carrier(own, peer));
            }
        }
    }

    #[test]
    fn carrier_only_when_both_run() {
        for own in LinkState::ALL {
            for peer in 0..8 {
                assert_eq!(carrier(own, peer), own == Run && peer == 3);
            }
        }
    }

    #[test]
    fn encoding_round_trips() {
        for s in LinkState::ALL {
            assert_eq!(LinkState::from_u32(s.as_u32()), Some(s));
        }
        assert_eq!(LinkState::from_u32(4), None);
        assert_eq!(LinkState::from_peer(9), Reset);
    }

    /// Runs one side until it is stable against a fixed peer value; returns its actions.
    fn settle(own: &mut LinkState, peer: u32) -> [Action; 4] {
        let mut actions = [Action::None; 4];
        for slot in actions.iter_mut() {
            let step = next(*own, peer);
            *slot = step.action;
            if step.state == *own && step.action == Action::None {
                return actions;
            }
            *own = step.state;
        }
        panic!("did not settle");
    }

    #[test]
    fn two_peers_come_up_go_down_and_come_back() {
        let (mut a, mut b) = (Reset, Reset);
        // Interleave: each side reacts to the other's published value until both are stable.
        let mut set_up = [0; 2];
        let mut attached = [0; 2];
        let mut teardowns = [0; 2];
        let mut count = |who: usize, acts: [Action; 4]| {
            for act in acts {
                match act {
                    Action::SetUpOwn => set_up[who] += 1,
                    Action::AttachPeer => attached[who] += 1,
                    Action::TearDown => teardowns[who] += 1,
                    Action::None => {}
                }
            }
        };
        for _ in 0..6 {
            count(0, settle(&mut a, b.as_u32()));
            count(1, settle(&mut b, a.as_u32()));
        }
        assert_eq!((a, b), (Run, Run));
        assert!(carrier(a, b.as_u32()) && carrier(b, a.as_u32()));
        // b dies: the hypervisor writes 0. a tears down and waits in INIT.
        count(0, settle(&mut a, 0));
        assert_eq!(a, Init);
        // b restarts from RESET and both come up again.
        b = Reset;
        for _ in 0..6 {
            count(1, settle(&mut b, a.as_u32()));
            count(0, settle(&mut a, b.as_u32()));
        }
        assert_eq!((a, b), (Run, Run));
        assert_eq!(set_up, [2, 2]);
        assert_eq!(attached, [2, 2]);
        assert_eq!(teardowns, [1, 0]);
    }

    #[test]
    fn a_fresh_peer_waits_for_the_old_side_to_reset() {
        // b restarted (RESET) but a still shows RUN: b must not set up against stale rings.
        let mut b = Reset;
        settle(&mut b, Run.as_u32());
        assert_eq!(b, Reset);
    }
}
