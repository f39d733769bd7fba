//! Short pair runs put off to the end of the full scan: a pair whose run would be
//! short (under `DEFER_BELOW` pages) is not merged at its visit but both its pages
//! are marked (`DEFERRED`) and tried again once every page was visited, unless a
//! longer run took them meanwhile.
//!
//! Why: in copies of real data, a content repeated inside the first copy (a file
//! that appears twice) pairs with its earlier place long before the next copy's
//! run reaches both. Merged at once, each such pair took frames, two mappings and
//! their registrations, all undone when the long runs took the pages over (on
//! 4 × 256 MiB of the standard library: ~4,600 one-page mappings in the merging
//! scan, made and then replaced). Put off, the long runs take the pages
//! directly; what they leave merges at the end of the same full scan, so that
//! nothing is saved later than before.
//!
//! Invariants: the end of a full scan works through the marked pages within the
//! batch budget before the scan ends; a page is tried there only if it is still in
//! this scan's unstable index (its pair merge put off, nothing taken it since); no
//! pair is put off while that runs; marks left by a scan that did not end are
//! cleared by the next end of a scan.

#![forbid(unsafe_code)]

use super::visit::Seen;
use super::{Core, Mem, Presence};
use crate::region::{State, DEFERRED};

/// A pair run shorter than this many pages is put off to the end of the full scan:
/// the one-, two- and three-page runs that repeats inside a copy make (most of
/// them) are; the runs of small copies are not (at the end of the scan, pairs
/// merge in address order, not in the order of their visits: a copy of a few
/// pages could end up on frames out of order, and in more mappings).
const DEFER_BELOW: usize = 8;

/// Most pairs put off in one full scan; past this many, pairs merge at their visit
/// again. Lone pairs (random pairs of pages) gain nothing from waiting, and at the
/// VMA budget those tried at the end find the budget spent by the merges made
/// meanwhile: with 16,384, random pairs at the budget took 8 full scans to settle
/// instead of 6.
const DEFER_MAX: usize = 4096;

impl<M: Mem> Core<M> {
    /// Whether the pair merge of the page at `t` (with `o`, a run of `n` pages) is put
    /// off to the end of the full scan; if so the page is marked `DEFERRED`.
    pub(super) fn defer(&mut self, t: usize, o: usize, n: usize) -> bool {
        // Not while the end works through them, nor in a domain (a pair there is
        // published, not merged), nor past the cap.
        if self.deferred_at.is_some()
            || self.domain.is_some()
            || n >= DEFER_BELOW
            || self.deferred >= DEFER_MAX
        {
            return false;
        }
        // A run cut short by the distance between its pages (one content repeated
        // side by side) is as long as it can be: no later run takes those pages.
        if (n + 1) * self.page > t.abs_diff(o) {
            return false;
        }
        // Both are tried at the end: should one of them merge with some other frame
        // there, the other still finds its match then, not at the next full scan.
        self.rec_mut(t).set(DEFERRED);
        self.rec_mut(o).set(DEFERRED);
        self.deferred += 1;
        true
    }

    /// The end of a full scan: try the pairs put off again, at most `budget` pages.
    /// Returns how many pages it tried and whether it is done.
    pub(super) fn merge_deferred(&mut self, budget: u64) -> (u64, bool) {
        if self.deferred == 0 {
            self.deferred_at = None;
            return (0, true);
        }
        let page = self.page;
        let mut at = self.deferred_at.unwrap_or(0);
        let mut tried = 0u64;
        while tried < budget {
            let Some(addr) = self.next_deferred(at) else {
                self.deferred = 0;
                self.deferred_at = None;
                return (tried, true);
            };
            at = addr + page;
            self.deferred_at = Some(at);
            let r = self.rec_mut(addr);
            r.clear(DEFERRED);
            let rec = *r;
            if !(rec.advised() && rec.state() == State::Unstable) {
                continue;
            }
            tried += 1;
            // Out of the unstable index until this step puts it back, as at a visit
            // (every path of the step expects that: dropping it to the zero page
            // counts it out of `rmap_items` only, for one).
            self.counters.pages_unshared -= 1;
            self.rec_mut(addr).set_state(State::Volatile);
            // Its visit's content step again, with the checksum it took (its bytes are
            // read, and compared under protection, only against a candidate).
            let t = self.target_at(addr).expect("tracked");
            let seen = Seen {
                pres: Presence::Anon,
                tracked: false,
                unchanged: false,
                tracking: false,
            };
            let mut buf = std::mem::take(&mut self.buf);
            self.visit_content(t, &mut buf, (true, None), seen);
            self.buf = buf;
        }
        (tried, false)
    }

    /// The first page at or after `from` marked `DEFERRED`.
    fn next_deferred(&self, from: usize) -> Option<usize> {
        let page = self.page;
        let first = self.first_region_key(from);
        for (_, r) in self.regions.range(first..) {
            if r.pages.uniform().is_some_and(|p| !p.has(DEFERRED)) {
                continue;
            }
            let i0 = from.saturating_sub(r.start) / page;
            if let Some(i) = (i0..r.pages.len()).find(|&i| r.pages[i].has(DEFERRED)) {
                return Some(r.start + i * page);
            }
        }
        None
    }
}
