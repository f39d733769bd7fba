//! Read-only questions about what the engine tracks, for `ksm.advise` (which keeps
//! an object alive while its pages are advised).

use super::Engine;
use crate::sys;

impl Engine {
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
