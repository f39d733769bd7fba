//! Read-only questions about what the engine tracks, for `ksm.advise` (which keeps
//! an object alive while its pages are advised).

use super::Engine;
use crate::sys;

impl Engine {
    /// The runs of `[start, end)`, memory ksm owns that nothing else uses (a block the
    /// numpy handler keeps for reuse), that may read other than zeros; None if that
    /// cannot be told (then all of it may): a page merged or covered sits in a mapping
    /// of a frame, which with no PTE reads the frame's bytes. Pages that read zeros now
    /// keep reading zeros until written (a merge never changes a page's bytes).
    pub fn maybe_nonzero_runs(&self, start: usize, end: usize) -> Option<Vec<(usize, usize)>> {
        let mut st = self.lock();
        if st.core.has_merged_pages(start, end) {
            return None;
        }
        st.core.mem.maybe_nonzero_runs(start, end).ok()
    }

    /// Pages of `[start, end)` advised `MADV_MERGEABLE` now.
    pub fn advised_pages_in(&self, start: usize, end: usize) -> usize {
        let page = sys::page_size();
        let st = self.lock();
        st.core
            .regions()
            .filter(|r| r.start < end && r.end(page) > start)
            .map(|r| {
                let first = (start.max(r.start) - r.start) / page;
                let last = (end.min(r.end(page)) - r.start).div_ceil(page);
                r.pages
                    .count_in(first..last.min(r.pages.len()), |p| p.advised())
            })
            .sum()
    }
}
