//! Saved state whose clocks should have gone on running: between a source's save and a
//! destination's restore, a real LAPIC timer counts down and a real TSC and clock advance. KVM
//! restores all three as they were at the save (the timer from its saved current count), so a
//! guest would find every timer late by the time its state spent in transit, and its clocks
//! behind by it. (On this project's PVM host the guest reads the host's TSC directly whatever
//! KVM is told; where KVM applies a TSC offset, VT-x or SVM, the moved-on TSC is the one the
//! guest reads, and its TSC-deadline timers fire when they would have.)

use std::time::Duration;

use kvm_bindings::kvm_lapic_state;

use super::{VcpuState, VmChipState};
use crate::machine::cpu::{lapic_reg, set_lapic_reg, MSR_IA32_TSC};

/// Register offsets in the LAPIC page.
const LVT_TIMER: usize = 0x320;
const INITIAL_COUNT: usize = 0x380;
const CURRENT_COUNT: usize = 0x390;
const DIVIDE_CONFIG: usize = 0x3e0;
/// LVT timer mode bits 17-18; 2 is TSC-deadline, whose deadline is an absolute TSC value.
const TIMER_MODE_SHIFT: u32 = 17;
const TSC_DEADLINE_MODE: u32 = 2;
/// KVM's LAPIC bus runs at 1 GHz unless a VMM changes it (KVM_CAP_X86_APIC_BUS_CYCLES_NS,
/// which ferry leaves alone): one count per nanosecond before the divider.
const BUS_CYCLE_NS: u64 = 1;

impl VcpuState {
    /// Moves the vCPU's clocks on by `elapsed`: the TSC at `tsc_khz` (if known) and the LAPIC
    /// timer, which a timer that would have expired meanwhile leaves one count from expiry, so
    /// the guest gets its interrupt as soon as it runs (a periodic one then keeps that phase).
    pub fn age(&mut self, elapsed: Duration, tsc_khz: Option<u32>) {
        if let Some(khz) = tsc_khz {
            let cycles = elapsed.as_nanos() * u128::from(khz) / 1_000_000;
            let cycles = u64::try_from(cycles).unwrap_or(u64::MAX);
            for msr in self.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
                msr.data = msr.data.saturating_add(cycles);
            }
        }
        let lapic = &mut self.lapic;
        let mode = (lapic_reg(&lapic.regs, LVT_TIMER) >> TIMER_MODE_SHIFT) & 3;
        let current = lapic_reg(&lapic.regs, CURRENT_COUNT);
        if mode == TSC_DEADLINE_MODE || current == 0 || lapic_reg(&lapic.regs, INITIAL_COUNT) == 0 {
            return;
        }
        let counts = elapsed.as_nanos() / u128::from(BUS_CYCLE_NS * divisor(lapic));
        let left = u128::from(current).saturating_sub(counts).max(1);
        set_lapic_reg(&mut lapic.regs, CURRENT_COUNT, left as u32);
    }
}

impl VmChipState {
    /// Moves KVM's clock (the guest's kvmclock) on by `elapsed`.
    pub fn age(&mut self, elapsed: Duration) {
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.clock.clock = self.clock.clock.saturating_add(nanos);
    }
}

/// The timer's divider from the divide configuration register (bits 0, 1 and 3).
fn divisor(lapic: &kvm_lapic_state) -> u64 {
    let config = lapic_reg(&lapic.regs, DIVIDE_CONFIG);
    let code = (config & 3) | ((config & 8) >> 1);
    1 << ((code + 1) & 7)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lapic(mode: u32, divide_config: u32, initial: u32, current: u32) -> kvm_lapic_state {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(
            &mut lapic.regs,
            LVT_TIMER,
            0x20 | (mode << TIMER_MODE_SHIFT),
        );
        set_lapic_reg(&mut lapic.regs, DIVIDE_CONFIG, divide_config);
        set_lapic_reg(&mut lapic.regs, INITIAL_COUNT, initial);
        set_lapic_reg(&mut lapic.regs, CURRENT_COUNT, current);
        lapic
    }

    fn empty_state() -> VcpuState {
        VcpuState {
            cpuid: Vec::new(),
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Box::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: Vec::new(),
            events: Default::default(),
        }
    }

    fn aged(lapic: kvm_lapic_state, elapsed: Duration) -> u32 {
        let mut state = VcpuState {
            lapic,
            ..empty_state()
        };
        state.age(elapsed, None);
        lapic_reg(&state.lapic.regs, CURRENT_COUNT)
    }

    #[test]
    fn a_periodic_timer_counts_down_by_the_time_in_transit() {
        // Divide by 1 (0b1011): one count per ns.
        let timer = lapic(1, 0b1011, 10_000_000, 6_000_000);
        assert_eq!(aged(timer, Duration::from_millis(2)), 4_000_000);
    }

    #[test]
    fn the_divider_slows_the_count() {
        // Divide by 16 (0b0011).
        let timer = lapic(0, 0b0011, 1_000_000, 1_000_000);
        assert_eq!(aged(timer, Duration::from_micros(160)), 990_000);
        assert_eq!(divisor(&lapic(0, 0b0000, 1, 1)), 2);
        assert_eq!(divisor(&lapic(0, 0b1010, 1, 1)), 128);
    }

    #[test]
    fn a_timer_that_expired_in_transit_fires_at_once() {
        let timer = lapic(0, 0b1011, 1_000_000, 500);
        assert_eq!(aged(timer, Duration::from_millis(1)), 1);
    }

    #[test]
    fn stopped_and_tsc_deadline_timers_are_left_alone() {
        assert_eq!(
            aged(lapic(0, 0b1011, 1_000, 0), Duration::from_millis(1)),
            0
        );
        let deadline = lapic(TSC_DEADLINE_MODE, 0b1011, 0, 0);
        assert_eq!(aged(deadline, Duration::from_millis(1)), 0);
    }

    /// KVM restores a timer from the current count it is given: the count this module ages.
    #[test]
    fn kvm_restarts_a_timer_from_the_aged_count() {
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(kvm) => kvm,
            Err(_) if std::env::var("CI").as_deref() != Ok("true") => return,
            Err(error) => panic!("CI=true needs /dev/kvm: {error}"),
        };
        let vcpu_with_lapic = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            (vm, vcpu)
        };
        let second = 1_000_000_000;
        let (_source_vm, source) = vcpu_with_lapic();
        let mut armed = source.get_lapic().unwrap();
        // Software-enabled, periodic, divide by 1, one second.
        set_lapic_reg(&mut armed.regs, 0xf0, 0x1ff);
        set_lapic_reg(&mut armed.regs, LVT_TIMER, 0x20 | (1 << TIMER_MODE_SHIFT));
        set_lapic_reg(&mut armed.regs, DIVIDE_CONFIG, 0b1011);
        set_lapic_reg(&mut armed.regs, INITIAL_COUNT, second);
        set_lapic_reg(&mut armed.regs, CURRENT_COUNT, second);
        source.set_lapic(&armed).unwrap();
        let saved = source.get_lapic().unwrap();
        let count = lapic_reg(&saved.regs, CURRENT_COUNT);
        assert!(count > second / 2 && count <= second, "{count}");

        let transit = Duration::from_millis(100);
        let mut state = VcpuState {
            lapic: saved,
            ..empty_state()
        };
        state.age(transit, None);
        let (_destination_vm, destination) = vcpu_with_lapic();
        destination.set_lapic(&state.lapic).unwrap();
        let restored = lapic_reg(&destination.get_lapic().unwrap().regs, CURRENT_COUNT);
        let expected = count - transit.as_nanos() as u32;
        // Restoring and reading back take microseconds; the host may add a few ms.
        assert!(
            restored <= expected && restored > expected - 20_000_000,
            "saved {count}, aged by {transit:?}, restored {restored}"
        );
    }

    #[test]
    fn the_tsc_moves_on_at_its_frequency() {
        let mut state = empty_state();
        state.msrs = vec![
            kvm_bindings::kvm_msr_entry {
                index: MSR_IA32_TSC,
                data: 1_000,
                ..Default::default()
            },
            kvm_bindings::kvm_msr_entry {
                index: 0x6e0,
                data: 7,
                ..Default::default()
            },
        ];
        // 2 ms at 2.6 GHz.
        state.age(Duration::from_millis(2), Some(2_600_000));
        assert_eq!(state.msrs[0].data, 1_000 + 5_200_000);
        assert_eq!(
            state.msrs[1].data, 7,
            "a TSC deadline is a moment, not a count"
        );
        state.age(Duration::from_millis(2), None);
        assert_eq!(state.msrs[0].data, 1_000 + 5_200_000);
    }

    #[test]
    fn the_clock_moves_on() {
        let clock = kvm_bindings::kvm_clock_data {
            clock: 5,
            ..Default::default()
        };
        let mut chips = VmChipState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock,
        };
        chips.age(Duration::from_nanos(7));
        assert_eq!(chips.clock.clock, 12);
    }
}
