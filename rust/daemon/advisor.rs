//! The scan-time advisor (`advisor_mode = "scan-time"`, docs/kernel-contract.md,
//! “Scan-time advisor”): at
//! the end of every full scan it sets `pages_to_scan` so that one full scan takes
//! about `advisor_target_scan_time` seconds, within `advisor_max_cpu` percent of
//! a CPU for the scanner.
//!
//! The kernel's formula, with the two quirks that section records fixed:
//! * **CPU since the advisor started, not since ksmd started.** The kernel zeroes
//!   its saved CPU time when the mode is switched on, so its first step charges
//!   ksmd's whole lifetime to one scan and drops `pages_to_scan` (500 → 70
//!   measured). Here the first step counts only the scanner CPU spent since the
//!   mode was switched on; the smoothed change also starts neutral (100 %), where
//!   the kernel's starts at 0 and cuts its first estimate to 30 %.
//! * **The 10 % CPU floor only when the scan is too slow.** The kernel rounds the
//!   scan time to whole seconds and then always lifts `pages_to_scan` to what 10 %
//!   of a CPU would scan, which pins small workloads at `advisor_max_pages_to_scan`
//!   however long the target is (docs/kernel-contract.md, "Scan-time advisor": a
//!   full scan every 65 ms for a 5 s target).
//!   Here scan time is measured in milliseconds and the floor applies only while
//!   a full scan takes longer than the target, which is what it is for.
//!
//! Everything else is the kernel's integer arithmetic.

#![forbid(unsafe_code)]

/// `KSM_ADVISOR_MIN_CPU`: percent of a CPU the scanner may always use when behind.
const MIN_CPU: u64 = 10;
/// Weight of the newest value in the moving average of the scan-time change, in %.
const EWMA_WEIGHT: u64 = 30;

/// The advisor's memory between steps (`struct advisor_ctx`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advisor {
    /// Duration of the previous full scan, in ms (0: none yet).
    prev_scan_ms: u64,
    /// Smoothed ratio of this scan's duration to the previous one's, in %.
    change: u64,
}

impl Default for Advisor {
    fn default() -> Self {
        Advisor {
            prev_scan_ms: 0,
            change: 100,
        }
    }
}

/// The knobs one step reads.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub target_scan_time_s: u32,
    pub max_cpu: u32,
    pub max_pages_to_scan: u32,
}

impl Advisor {
    /// One step after a full scan that took `scan_ms` of wall time and `cpu_ms` of
    /// scanner CPU time, at `pages_to_scan`: the next `pages_to_scan` (≥ 1).
    pub fn step(&mut self, pages_to_scan: u32, scan_ms: u64, cpu_ms: u64, l: Limits) -> u32 {
        let scan_ms = scan_ms.max(1);
        let target_ms = u64::from(l.target_scan_time_s.max(1)) * 1000;
        let cpu_percent = (cpu_ms.saturating_mul(100) / scan_ms).max(1);
        let prev = if self.prev_scan_ms == 0 {
            scan_ms
        } else {
            self.prev_scan_ms
        };
        let change = (scan_ms.saturating_mul(100) / prev).max(1);
        let change = ((100 - EWMA_WEIGHT) * self.change.min(u64::MAX / 200)
            + EWMA_WEIGHT * change.min(u64::MAX / 200))
            / 100;
        let current = u64::from(pages_to_scan);
        // Scale so that a full scan takes the target time, weighted by the trend.
        let mut pages = current.saturating_mul(scan_ms) / target_ms;
        pages = pages.saturating_mul(change) / 100;
        let per_cpu_percent = (current / cpu_percent).max(1);
        pages = pages.min(per_cpu_percent.saturating_mul(u64::from(l.max_cpu)));
        if scan_ms > target_ms {
            pages = pages.max(per_cpu_percent.saturating_mul(MIN_CPU));
        }
        pages = pages.min(u64::from(l.max_pages_to_scan)).max(1);
        self.change = change;
        self.prev_scan_ms = scan_ms;
        u32::try_from(pages).unwrap_or(u32::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        target_scan_time_s: 200,
        max_cpu: 70,
        max_pages_to_scan: 30000,
    };

    #[test]
    fn a_scan_at_the_target_keeps_the_rate() {
        let mut a = Advisor::default();
        assert_eq!(a.step(1000, 200_000, 10_000, L), 1000);
    }

    #[test]
    fn too_slow_speeds_up_too_fast_slows_down() {
        let mut a = Advisor::default();
        assert!(a.step(1000, 400_000, 10_000, L) > 1000);
        let mut a = Advisor::default();
        assert!(a.step(1000, 100_000, 10_000, L) < 1000);
    }

    #[test]
    fn short_scans_are_not_pinned_at_the_maximum() {
        // The case docs/kernel-contract.md, "Scan-time advisor" records: 128 MiB,
        // 5 s target, each scan well under a second.
        let l = Limits {
            target_scan_time_s: 5,
            ..L
        };
        let mut a = Advisor::default();
        let mut pages = 500;
        for _ in 0..10 {
            // A scan's time is proportional to 1 / pages (32768 pages, 1 batch per 20 ms).
            let scan_ms = 32768 / u64::from(pages) * 20 + 1;
            pages = a.step(pages, scan_ms, scan_ms / 50, l);
            assert!(pages < l.max_pages_to_scan, "pinned at the maximum");
        }
        // 32768 pages in 5 s at 50 batches/s: about 131 pages per batch.
        assert!((60..=400).contains(&pages), "{pages}");
    }

    #[test]
    fn cpu_cap_and_floor() {
        let mut a = Advisor::default();
        // Far too slow, already using 100 % of a CPU: capped at max_cpu (70 %).
        let p = a.step(1000, 2_000_000, 2_000_000, L);
        assert_eq!(p, 700);
        // Far too slow at 1 % CPU: the floor gives at least 10 % worth.
        let mut a = Advisor::default();
        let p = a.step(100, 400_000, 4_000, L);
        assert!(p >= 100 * 10, "{p}");
    }

    #[test]
    fn never_zero_and_never_above_the_maximum() {
        let mut a = Advisor::default();
        assert_eq!(a.step(1, 1, 0, L), 1);
        let mut a = Advisor::default();
        assert_eq!(a.step(u32::MAX, u64::MAX / 1000, 0, L), 30000);
    }
}
