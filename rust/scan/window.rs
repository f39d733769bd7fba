//! The write-protect window around a merge: `protect` opens it (taking the range
//! out of write tracking first), `release_failed` and `release_tail` close what
//! did not merge and give it back to write tracking; and the algorithm's side of
//! the `write_tracking` knob.
//!
//! Invariants: a page's checksum is trusted (`SUM_TRACKED`) only while the write
//! tracker vouches for it: a window distrusts every page it takes before any is
//! untracked, and forgets the checksums taken ahead for them; pages a window
//! leaves in anonymous mappings are tracked again when it closes.

#![forbid(unsafe_code)]

use std::io;

use super::{Core, Mem};
use crate::region::SUM_TRACKED;

impl<M: Mem> Core<M> {
    /// Write-protect `[addr, addr+len)` for a merge (the synchronous userfaultfd). Its
    /// unmerged pages, in anonymous mappings whose writes may be tracked, are taken out
    /// of write tracking first (a mapping has one userfaultfd); merged and covered
    /// pages are in pool mappings, never tracked.
    ///
    /// What the tracker knew of their writes is lost with them (giving them back
    /// write-protects them afresh, see `release_failed`), and a write since their last
    /// probe may not have been taken yet: their checksums are not trusted any more (a
    /// page the window leaves unmerged is hashed again at its next visit).
    pub(super) fn protect(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.sums_ahead.forget(addr, len, self.page);
        let runs = self.unmerged_runs(addr, addr + len);
        // All distrusted first: should untracking fail halfway, a later run keeps no
        // trusted checksum that the tracker may no longer vouch for.
        for &(s, e) in &runs {
            self.distrust(s, e);
        }
        for (s, e) in runs {
            self.mem.untrack_for_merge(s, e - s)?;
        }
        self.mem.protect(addr, len)
    }

    /// End a merge window that changed nothing (unprotect, wake), and give its
    /// unmerged pages back to write tracking (see `Core::protect`).
    pub(super) fn release_failed(&mut self, addr: usize, len: usize) {
        self.mem.release(addr, len, true);
        for (s, e) in self.unmerged_runs(addr, addr + len) {
            self.mem.retrack(s, e - s);
        }
    }

    /// Shrink the merge window `[addr, addr+len)` to its first `keep` bytes: the rest is
    /// released as by `release_failed` (unprotected, woken, tracked again).
    pub(super) fn release_tail(&mut self, addr: usize, len: usize, keep: usize) {
        self.mem.release_tail(addr, len, keep);
        for (s, e) in self.unmerged_runs(addr + keep, addr + len) {
            self.mem.retrack(s, e - s);
        }
    }

    /// The runs of `[start, end)` whose pages are in anonymous mappings (not merged,
    /// inherited or covered), as `(start, end)`.
    fn unmerged_runs(&self, start: usize, end: usize) -> Vec<(usize, usize)> {
        let page = self.page;
        let mut anon: Vec<(usize, usize)> = Vec::new();
        for (a, r) in self.pages_in(start, end) {
            if r.in_pool_mapping() {
                continue;
            }
            match anon.last_mut() {
                Some(last) if last.1 == a => last.1 = a + page,
                _ => anon.push((a, a + page)),
            }
        }
        anon
    }

    /// The algorithm's side of the `write_tracking` knob (see `Mem::set_write_tracking`):
    /// switched off, the unmerged pages of memory ksm owns leave the tracker at once
    /// (no write pays for tracking any more; a merge registers them as it needs);
    /// switched on, those of memory already registered (advised) are tracked again, so
    /// that scans stop rehashing them. Either way no checksum taken before is trusted
    /// any more: the writes made while nothing tracked them were never recorded.
    pub fn set_write_tracking(&mut self, on: bool) {
        self.mem.set_write_tracking(on);
        let page = self.page;
        let owned: Vec<(usize, usize)> = self
            .regions
            .values()
            .filter(|r| r.owned && (r.registered || !on))
            .map(|r| (r.start, r.end(page)))
            .collect();
        // Tracking left for the scan to start is settled here, now.
        for r in self.regions.values_mut() {
            r.track_pending = false;
        }
        for (start, end) in owned {
            for (s, e) in self.unmerged_runs(start, end) {
                self.distrust(s, e);
                if on {
                    self.mem.retrack(s, e - s);
                } else {
                    // Best effort: what stays tracked is untracked by the merge that needs it.
                    let _ = self.mem.untrack(s, e - s);
                }
            }
        }
    }

    /// Clear `SUM_TRACKED` on every page of `[start, end)`: their checksums are not
    /// trusted any more (one pass over each region's slice of records).
    fn distrust(&mut self, start: usize, end: usize) {
        let page = self.page;
        let first = self.first_region_key(start);
        for r in self.regions.range_mut(first..end).map(|(_, r)| r) {
            let (s, e) = (start.max(r.start), end.min(r.end(page)));
            if s < e {
                if r.pages.uniform().is_some_and(|p| !p.sum_tracked()) {
                    continue;
                }
                let slice = r
                    .pages
                    .range_mut((s - r.start) / page..(e - r.start) / page);
                for p in slice {
                    p.clear(SUM_TRACKED);
                }
            }
        }
    }
}
