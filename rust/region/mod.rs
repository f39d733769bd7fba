//! Registered ranges and their per-page records.
//!
//! A [`Region`] is a contiguous, page-aligned range that ksm tracks: memory
//! allocated by `ksm.mmap` (owned) or an anonymous private range the
//! application advised (foreign). Each page has a 16-byte [`PageRec`] (the
//! kernel's rmap_item is 64 bytes). Invariant: a page whose record is
//! `Stable` maps frame `frame` (or has been copied away by a write, which
//! the next visit detects through pagemap).

#![forbid(unsafe_code)]

pub mod maps;

/// What ksm knows about one page (the kernel's rmap_item, compacted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PageRec {
    /// Checksum at the previous visit (volatility check).
    pub checksum: u32,
    /// The frame this page maps while `Stable`; with `IN_POOL`, the frame offset its
    /// mapping covers.
    pub frame: u32,
    /// Full-scan sequence number at which the page entered the unstable index.
    pub seq: u32,
    pub state: State,
    /// `ADVISED` and future flags.
    pub flags: u8,
    /// Smart-scan age and remaining skips (the kernel's `age`, `remaining_skips`).
    pub age: u8,
    pub skips: u8,
}

pub const ADVISED: u8 = 1;
/// The page is a private copy of its own bytes inside a mapping of the frame pool,
/// at the offset of frame `frame` (not a reference to it): a merged run covered it
/// so that the run stays one mapping, or it was written after merging. Such a page
/// is unmerged in every other way (its state says where it is in the algorithm).
pub const IN_POOL: u8 = 1 << 4;
/// `checksum` was taken while the page's writes were tracked (an asynchronous
/// write-protect userfaultfd): while the tracker reports no write, it still holds.
pub const SUM_TRACKED: u8 = 1 << 5;

/// The page's place in the algorithm (kernel: no rmap_item / in no tree /
/// unstable tree / stable tree).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Never looked at (or forgotten): the kernel has no rmap_item for it.
    #[default]
    Untracked,
    /// Looked at, in no index: its checksum changed or a merge failed.
    Volatile,
    /// In the unstable index of scan `seq` (counted in `pages_unshared` until revisited).
    Unstable,
    /// Maps frame `frame` (counted in `pages_shared`/`pages_sharing`).
    Stable,
    /// In a forked child: maps a frame of the parent's pool (inherited at fork).
    /// Not an rmap_item (the kernel resets a child's counters too), but still a
    /// merged page that `MADV_UNMERGEABLE` must give a private copy.
    Inherited,
    /// Dropped to the kernel's zero page by `use_zero_pages` and not written since
    /// (counted in `ksm_zero_pages`). Not an rmap_item: the kernel's ksmd frees the
    /// rmap_item of such a page on its next pass (its page walk skips the zero page),
    /// ksm at once. Survives fork, as the kernel adds inherited zero pages too.
    Zero,
}

/// Bits of `flags` holding the page's protection (`PROT_READ|PROT_WRITE|PROT_EXEC`,
/// shifted by one) for memory ksm does not own, where it can differ page by page.
const PROT_SHIFT: u8 = 1;
const PROT_BITS: u8 = 0b111 << PROT_SHIFT;

impl PageRec {
    pub fn advised(&self) -> bool {
        self.flags & ADVISED != 0
    }

    /// Whether the page sits in a mapping of a frame pool: merged (ours, or the
    /// parent's in a forked child) or covered. Every other page is in an anonymous
    /// mapping.
    pub fn in_pool_mapping(&self) -> bool {
        matches!(self.state, State::Stable | State::Inherited) || self.in_pool().is_some()
    }

    /// The frame offset its mapping covers, for a private copy inside a pool mapping.
    pub fn in_pool(&self) -> Option<u32> {
        (self.flags & IN_POOL != 0).then_some(self.frame)
    }

    pub fn prot(&self) -> i32 {
        i32::from((self.flags & PROT_BITS) >> PROT_SHIFT)
    }

    pub fn set_prot(&mut self, prot: i32) {
        let bits = (prot & 0b111) as u8;
        self.flags = (self.flags & !PROT_BITS) | (bits << PROT_SHIFT);
    }
}

/// A tracked range.
#[derive(Debug)]
pub struct Region {
    pub start: usize,
    pub pages: Vec<PageRec>,
    /// Allocated by ksm (read directly) or by the application (read fault-safely).
    pub owned: bool,
    /// Protection to use when remapping (`PROT_*`) for owned memory; foreign pages
    /// keep theirs in their record, refreshed from /proc/self/maps every full scan.
    pub prot: i32,
    /// Registered with the userfaultfd in write-protect mode.
    pub registered: bool,
}

impl Region {
    pub fn new(start: usize, npages: usize, owned: bool, prot: i32) -> Self {
        let mut rec = PageRec::default();
        rec.set_prot(prot);
        Region {
            start,
            pages: vec![rec; npages],
            owned,
            prot,
            registered: false,
        }
    }

    pub fn len(&self, page: usize) -> usize {
        self.pages.len() * page
    }

    pub fn end(&self, page: usize) -> usize {
        self.start + self.len(page)
    }

    /// The protection to remap page `i` with.
    pub fn prot_of(&self, i: usize) -> i32 {
        if self.owned {
            self.prot
        } else {
            self.pages[i].prot()
        }
    }

    pub fn any_advised(&self) -> bool {
        self.pages.iter().any(PageRec::advised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_record_is_16_bytes() {
        assert_eq!(std::mem::size_of::<PageRec>(), 16);
    }
}
