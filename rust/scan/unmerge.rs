//! Unmerging: every merged page of a range gets a private copy again
//! (`unmerge_range`, `run = 2`'s `unmerge_all`, and after a discard
//! `unmerge_discarded`), one remap per run of pages.
//!
//! Invariants: the advice is kept; zero pages simply leave the count (they read
//! the kernel's zero page as private zeros); frames an unmerge frees are punched
//! together when it ends, only once no page maps them, and none is reused before
//! (unmerging allocates no frame).

#![forbid(unsafe_code)]

use std::io;

use super::{Core, Mem};
use crate::pool::FrameId;
use crate::region::State;

impl<M: Mem> Core<M> {
    /// Unmerge every merged page of `[start, end)`, keeping the advice (`run = 2` does
    /// this everywhere). Covered pages (see `IN_POOL`) move to anonymous memory too, so
    /// that unmerged memory maps no frame pool at all.
    pub fn unmerge_range(&mut self, start: usize, end: usize) -> io::Result<()> {
        self.unmerge_pages(start, end, true)
    }

    /// Unmerge the merged pages of `[start, end)` after the application discarded the
    /// range (`MADV_DONTNEED`), once the discard has zapped them. Covered pages stay:
    /// whether one was zapped yet cannot be told from whether it was written since,
    /// and in place it reads right either way (zeros through the fault thread, or what
    /// was written).
    pub fn unmerge_discarded(&mut self, start: usize, end: usize) -> io::Result<()> {
        self.unmerge_pages(start, end, false)
    }

    /// The frames an unmerge frees are punched together at the end, consecutive ones
    /// with one call (a frame is punched only once no page maps it, and none is reused
    /// before: unmerging allocates no frame).
    fn unmerge_pages(&mut self, start: usize, end: usize, covered: bool) -> io::Result<()> {
        let outer = self.punch_later.is_none();
        if outer {
            self.punch_later = Some(Vec::new());
        }
        let r = self.unmerge_runs(start, end, covered);
        if outer {
            let mut freed = self.punch_later.take().unwrap_or_default();
            freed.sort_unstable();
            let mut i = 0;
            while i < freed.len() {
                let mut n = 1;
                while i + n < freed.len() && freed[i + n] == freed[i] + n as FrameId {
                    n += 1;
                }
                // A failed punch leaks the frames' bytes but never corrupts data.
                let _ = self.mem.punch_run(freed[i], n as u32);
                i += n;
            }
            self.frames.trim();
        }
        r
    }

    fn unmerge_runs(&mut self, start: usize, end: usize, covered: bool) -> io::Result<()> {
        let page = self.page;
        // Zero pages read the kernel's zero page, as never-written anonymous memory
        // does: a private page of zeros in every way that matters, with nothing to copy.
        let zeros: Vec<usize> = self
            .pages_in(start, end)
            .filter(|(_, r)| r.state() == State::Zero)
            .map(|(a, _)| a)
            .collect();
        for a in zeros {
            self.forget(a);
            self.unsettle();
        }
        let mut runs: Vec<(usize, usize, i32, bool)> = Vec::new();
        for (addr, rec) in self.pages_in(start, end) {
            let merged = matches!(rec.state(), State::Stable | State::Inherited);
            let in_pool = covered && rec.covered();
            if !(merged || in_pool) {
                continue;
            }
            let r = self.region_at(addr).expect("tracked");
            let prot = r.prot_of((addr - r.start) / page);
            match runs.last_mut() {
                Some(last)
                    if last.0 + last.1 == addr
                        && last.2 == prot
                        && self.region_at(last.0).map(|x| x.start) == Some(r.start) =>
                {
                    last.1 += page
                }
                _ => runs.push((addr, page, prot, r.owned)),
            }
        }
        for (addr, len, prot, owned) in runs {
            self.mem.unmerge_run(addr, len, prot, owned)?;
            for a in (addr..addr + len).step_by(page) {
                self.forget(a);
                self.uncover(a);
            }
            self.unsettle();
        }
        Ok(())
    }

    /// `run = 2`: unmerge everything, forget every record, reset `full_scans`.
    pub fn unmerge_all(&mut self) -> io::Result<()> {
        let bounds: Vec<(usize, usize)> = self
            .regions
            .values()
            .map(|r| (r.start, r.end(self.page)))
            .collect();
        for (s, e) in bounds {
            self.unmerge_range(s, e)?;
            for a in (s..e).step_by(self.page) {
                self.forget(a);
            }
        }
        self.unstable.reset(0);
        self.scan_end_metadata = 0;
        self.cursor = None;
        // (Pages still marked `DEFERRED` are cleared by the next end of a full scan.)
        self.deferred_at = None;
        self.counters.full_scans = 0;
        self.unsettle();
        Ok(())
    }
}
