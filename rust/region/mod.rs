//! Registered ranges and their per-page records.
//!
//! A [`Region`] is a contiguous, page-aligned range that ksm tracks: memory
//! allocated by `ksm.mmap` (owned) or an anonymous private range the
//! application advised (foreign). Each page has an 8-byte [`PageRec`] (the
//! kernel's rmap_item is 64 bytes). Invariant: a page whose record is
//! `Stable` maps frame `frame()` (or has been copied away by a write, which
//! the next visit detects through pagemap).

#![forbid(unsafe_code)]

pub mod covered;
pub mod maps;

use crate::pool::FrameId;
use covered::Covered;

/// What ksm knows about one page (the kernel's rmap_item, compacted to 8 bytes).
///
/// `word` holds what the page's state needs: the frame it maps while `Stable`, else
/// its checksum at the previous visit (only an unmerged page has one worth keeping;
/// `Inherited` and `Zero` pages keep neither). A covered page (`IN_POOL`) needs both
/// a checksum and the frame offset its mapping covers: the offset lives in its
/// region's side map ([`Region::covered_frame`]), by runs: a run of covered pages
/// of one pool mapping takes 10 bytes there (up to 65,535 pages a run).
///
/// `bits`, from the low end: state (3 bits), flags (8 bits: `ADVISED`, the
/// protection, `IN_POOL`, `SUM_TRACKED`), smart-scan age (4 bits, saturating:
/// `skip_age` tells apart ages up to 9 only) and remaining skips (4 bits, at most 8).
///
/// There is no scan number: a page is in the unstable index only if this full scan
/// put it there (the index is emptied whenever a full scan ends), so `Unstable` with
/// an address found in the index already means "in this scan's index".
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct PageRec {
    word: u32,
    bits: u32,
}

pub const ADVISED: u8 = 1;
/// The page is a private copy of its own bytes inside a mapping of the frame pool,
/// at the offset of a frame (not a reference to it; the offset is kept by the region,
/// see [`Region::covered_frame`]): a merged run covered it so that the run stays one
/// mapping. Such a page is unmerged in every other way (its state says where it is
/// in the algorithm).
pub const IN_POOL: u8 = 1 << 4;
/// `checksum` was taken while the page's writes were tracked (an asynchronous
/// write-protect userfaultfd): while the tracker reports no write, it still holds.
pub const SUM_TRACKED: u8 = 1 << 5;
/// A pair merge of the page would have made a short run: it was put off to the end
/// of the full scan (see `Core::merge_deferred`), where it is tried again unless a
/// longer run took the page meanwhile. Cleared there, whatever became of the page.
pub const DEFERRED: u8 = 1 << 6;

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
    /// In the unstable index of the current full scan, if the index still holds its
    /// address (counted in `pages_unshared` until revisited).
    Unstable,
    /// Maps frame `frame()` (counted in `pages_shared`/`pages_sharing`).
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

impl State {
    const ALL: [State; 6] = [
        State::Untracked,
        State::Volatile,
        State::Unstable,
        State::Stable,
        State::Inherited,
        State::Zero,
    ];
}

/// Bits of `flags` holding the page's protection (`PROT_READ|PROT_WRITE|PROT_EXEC`,
/// shifted by one) for memory ksm does not own, where it can differ page by page.
const PROT_SHIFT: u8 = 1;
const PROT_BITS: u8 = 0b111 << PROT_SHIFT;

// The layout of `PageRec::bits`.
const STATE_MASK: u32 = 0b111;
const FLAGS_SHIFT: u32 = 3;
const AGE_SHIFT: u32 = 11;
const SKIPS_SHIFT: u32 = 15;
const NIBBLE: u32 = 0xF;
/// The highest age kept (ages saturate there; `skip_age` is the same from 9 on).
pub const MAX_AGE: u8 = 15;
/// The most remaining skips a record holds (`skip_age` gives at most 8).
pub const MAX_SKIPS: u8 = 15;

impl std::fmt::Debug for PageRec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageRec")
            .field("state", &self.state())
            .field("word", &self.word)
            .field("flags", &self.flags())
            .field("age", &self.age())
            .field("skips", &self.skips())
            .finish()
    }
}

impl PageRec {
    /// A record in `state` that keeps only `flags` (checksum, frame, age and skips
    /// start over).
    pub fn fresh(state: State, flags: u8) -> Self {
        let mut r = PageRec::default();
        r.set_state(state);
        r.set_flags(flags);
        r
    }

    pub fn state(&self) -> State {
        State::ALL[(self.bits & STATE_MASK) as usize]
    }

    pub fn set_state(&mut self, s: State) {
        self.bits = (self.bits & !STATE_MASK) | s as u32;
    }

    pub fn flags(&self) -> u8 {
        (self.bits >> FLAGS_SHIFT) as u8
    }

    fn set_flags(&mut self, flags: u8) {
        self.bits = (self.bits & !(0xFF << FLAGS_SHIFT)) | (u32::from(flags) << FLAGS_SHIFT);
    }

    /// Whether every flag of `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags() & flag == flag
    }

    pub fn set(&mut self, flag: u8) {
        self.set_flags(self.flags() | flag);
    }

    pub fn clear(&mut self, flag: u8) {
        self.set_flags(self.flags() & !flag);
    }

    /// Checksum at the previous visit (volatility check); meaningful while unmerged.
    pub fn checksum(&self) -> u32 {
        debug_assert!(!matches!(self.state(), State::Stable), "{self:?}");
        self.word
    }

    pub fn set_checksum(&mut self, c: u32) {
        debug_assert!(!matches!(self.state(), State::Stable), "{self:?}");
        self.word = c;
    }

    /// The frame this page maps; meaningful while `Stable`.
    pub fn frame(&self) -> FrameId {
        debug_assert_eq!(self.state(), State::Stable, "{self:?}");
        self.word
    }

    /// Make it `Stable` on frame `f`.
    pub fn set_stable(&mut self, f: FrameId) {
        self.set_state(State::Stable);
        self.word = f;
    }

    /// Smart-scan age (the kernel's `age`), saturating at [`MAX_AGE`].
    pub fn age(&self) -> u8 {
        ((self.bits >> AGE_SHIFT) & NIBBLE) as u8
    }

    pub fn set_age(&mut self, age: u8) {
        let a = u32::from(age.min(MAX_AGE));
        self.bits = (self.bits & !(NIBBLE << AGE_SHIFT)) | (a << AGE_SHIFT);
    }

    /// Smart-scan visits left to skip (the kernel's `remaining_skips`).
    pub fn skips(&self) -> u8 {
        ((self.bits >> SKIPS_SHIFT) & NIBBLE) as u8
    }

    /// Whether smart scan passes this page in the full scan that reaches it now (aged,
    /// with skips left: `should_skip`).
    pub fn smart_skip_due(&self) -> bool {
        self.age() >= 3 && self.skips() > 0
    }

    pub fn set_skips(&mut self, skips: u8) {
        debug_assert!(skips <= MAX_SKIPS);
        let s = u32::from(skips.min(MAX_SKIPS));
        self.bits = (self.bits & !(NIBBLE << SKIPS_SHIFT)) | (s << SKIPS_SHIFT);
    }

    pub fn advised(&self) -> bool {
        self.has(ADVISED)
    }

    /// Whether its checksum was taken under write tracking (see `SUM_TRACKED`).
    pub fn sum_tracked(&self) -> bool {
        self.has(SUM_TRACKED)
    }

    /// Whether it is a private copy inside a pool mapping (see `IN_POOL`).
    pub fn covered(&self) -> bool {
        self.has(IN_POOL)
    }

    /// Whether the page sits in a mapping of a frame pool: merged (ours, or the
    /// parent's in a forked child) or covered. Every other page is in an anonymous
    /// mapping.
    pub fn in_pool_mapping(&self) -> bool {
        matches!(self.state(), State::Stable | State::Inherited) || self.covered()
    }

    pub fn prot(&self) -> i32 {
        i32::from((self.flags() & PROT_BITS) >> PROT_SHIFT)
    }

    pub fn set_prot(&mut self, prot: i32) {
        let bits = (prot & 0b111) as u8;
        self.set_flags((self.flags() & !PROT_BITS) | (bits << PROT_SHIFT));
    }
}

/// The records of a region's pages, created when the first is changed on its own.
/// Until then every page has the same record (`fill`): advising a whole region, or
/// forgetting one nothing visited, touches that one record only, so that making and
/// unmapping memory costs the same whatever its size (numpy's allocator makes and
/// drops arrays of a GiB as fast as it can). A change to one page (a visit) creates
/// them all.
#[derive(Clone, Debug, Default)]
pub struct Recs {
    len: usize,
    fill: PageRec,
    /// Empty while every record is `fill`, else `len` records.
    v: Vec<PageRec>,
}

impl Recs {
    /// `len` records, all `fill`, created only when one is changed alone.
    pub fn new(len: usize, fill: PageRec) -> Self {
        Recs {
            len,
            fill,
            v: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records allocated (0 while every record is the one `fill`).
    pub fn capacity(&self) -> usize {
        self.v.capacity()
    }

    /// The record every page has, while they are not created one by one.
    pub fn uniform(&self) -> Option<PageRec> {
        (self.v.is_empty() && self.len > 0).then_some(self.fill)
    }

    fn create(&mut self) {
        if self.v.is_empty() && self.len > 0 {
            self.v = vec![self.fill; self.len];
        }
    }

    pub fn iter(&self) -> RecsIter<'_> {
        let lazy = if self.v.is_empty() { self.len } else { 0 };
        self.v.iter().chain(std::iter::repeat_n(&self.fill, lazy))
    }

    /// The records of pages `range` (read only: nothing is created).
    pub fn range(&self, range: std::ops::Range<usize>) -> RecsIter<'_> {
        assert!(
            range.start <= range.end && range.end <= self.len,
            "records {range:?} of {}",
            self.len
        );
        if self.v.is_empty() {
            self.v
                .iter()
                .chain(std::iter::repeat_n(&self.fill, range.end - range.start))
        } else {
            self.v[range]
                .iter()
                .chain(std::iter::repeat_n(&self.fill, 0))
        }
    }

    /// Every record, to change one by one (creates them).
    pub fn iter_mut(&mut self) -> std::slice::IterMut<'_, PageRec> {
        self.create();
        self.v.iter_mut()
    }

    /// The records of pages `range`, to change one by one (creates them).
    pub fn range_mut(&mut self, range: std::ops::Range<usize>) -> &mut [PageRec] {
        self.create();
        &mut self.v[range]
    }

    /// Apply `f` to every record (to the one shared record while they are not created).
    pub fn update_all(&mut self, mut f: impl FnMut(&mut PageRec)) {
        if self.v.is_empty() {
            f(&mut self.fill);
        } else {
            self.v.iter_mut().for_each(f);
        }
    }

    /// How many records satisfy `pred`.
    pub fn count(&self, pred: impl Fn(&PageRec) -> bool) -> usize {
        match self.uniform() {
            Some(r) => {
                if pred(&r) {
                    self.len
                } else {
                    0
                }
            }
            None => self.v.iter().filter(|p| pred(p)).count(),
        }
    }

    /// Whether any record of pages `range` satisfies `pred`.
    pub fn any_in(&self, range: std::ops::Range<usize>, pred: impl Fn(&PageRec) -> bool) -> bool {
        match self.uniform() {
            Some(r) => {
                assert!(range.end <= self.len, "records {range:?} of {}", self.len);
                range.start < range.end && pred(&r)
            }
            None => self.v[range].iter().any(pred),
        }
    }

    /// How many records of pages `range` satisfy `pred`.
    pub fn count_in(
        &self,
        range: std::ops::Range<usize>,
        pred: impl Fn(&PageRec) -> bool,
    ) -> usize {
        match self.uniform() {
            Some(r) => {
                assert!(range.end <= self.len, "records {range:?} of {}", self.len);
                if pred(&r) {
                    range.end.saturating_sub(range.start)
                } else {
                    0
                }
            }
            None => self.v[range].iter().filter(|p| pred(p)).count(),
        }
    }

    /// Whether any record satisfies `pred`.
    pub fn any(&self, pred: impl Fn(&PageRec) -> bool) -> bool {
        match self.uniform() {
            Some(r) => pred(&r),
            None => self.v.iter().any(pred),
        }
    }

    /// The records from `at` on, taken away.
    pub fn split_off(&mut self, at: usize) -> Recs {
        assert!(at <= self.len, "split at {at} of {}", self.len);
        let tail_len = self.len - at;
        self.len = at;
        if self.v.is_empty() {
            return Recs::new(tail_len, self.fill);
        }
        let v = self.v.split_off(at);
        if at == 0 {
            // Still `at` (no) records: the shared one stands for none.
            self.v = Vec::new();
        }
        Recs {
            len: tail_len,
            fill: self.fill,
            v,
        }
    }

    pub fn shrink_to_fit(&mut self) {
        self.v.shrink_to_fit();
    }
}

pub type RecsIter<'a> =
    std::iter::Chain<std::slice::Iter<'a, PageRec>, std::iter::RepeatN<&'a PageRec>>;

impl std::ops::Index<usize> for Recs {
    type Output = PageRec;

    fn index(&self, i: usize) -> &PageRec {
        if self.v.is_empty() {
            assert!(i < self.len, "record {i} of {}", self.len);
            &self.fill
        } else {
            &self.v[i]
        }
    }
}

impl std::ops::IndexMut<usize> for Recs {
    fn index_mut(&mut self, i: usize) -> &mut PageRec {
        self.create();
        &mut self.v[i]
    }
}

impl<'a> IntoIterator for &'a Recs {
    type Item = &'a PageRec;
    type IntoIter = RecsIter<'a>;

    fn into_iter(self) -> RecsIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &'a mut Recs {
    type Item = &'a mut PageRec;
    type IntoIter = std::slice::IterMut<'a, PageRec>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter_mut()
    }
}

/// A tracked range.
#[derive(Debug)]
pub struct Region {
    pub start: usize,
    pub pages: Recs,
    /// Allocated by ksm (read directly) or by the application (read fault-safely).
    pub owned: bool,
    /// Protection to use when remapping (`PROT_*`) for owned memory; foreign pages
    /// keep theirs in their record, refreshed from /proc/self/maps every full scan.
    pub prot: i32,
    /// Registered with the userfaultfd in write-protect mode.
    pub registered: bool,
    /// Memory ksm owns registered with the synchronous userfaultfd until the scan
    /// first reaches it, where its write tracking starts (see `Core::scan_batch`):
    /// tracking a range costs a marker and page tables under every page, which
    /// nothing needs before a scan has taken checksums there.
    pub track_pending: bool,
    /// The frame offset under each covered page (`IN_POOL`), by page index (a region
    /// has fewer than 2^32 pages: its records alone would take 32 GiB).
    covered: Covered,
}

impl Region {
    pub fn new(start: usize, npages: usize, owned: bool, prot: i32) -> Self {
        let mut rec = PageRec::default();
        rec.set_prot(prot);
        Region {
            start,
            pages: Recs::new(npages, rec),
            owned,
            prot,
            registered: false,
            track_pending: false,
            covered: Covered::default(),
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
        self.pages.any(PageRec::advised)
    }

    /// The frame offset page `i`'s mapping covers, for a private copy inside a pool
    /// mapping (`IN_POOL`).
    pub fn covered_frame(&self, i: usize) -> Option<FrameId> {
        if !self.pages[i].covered() {
            return None;
        }
        let g = self.covered.get(index(i));
        debug_assert!(g.is_some(), "covered page {i} without its offset");
        g
    }

    /// Page `i` becomes a private copy inside a pool mapping at frame offset `g`.
    pub fn cover(&mut self, i: usize, g: FrameId) {
        self.pages[i].set(IN_POOL);
        self.covered.insert(index(i), g);
    }

    /// Page `i` is no longer inside a pool mapping (or maps a frame of its own now).
    pub fn uncover(&mut self, i: usize) {
        if !self.pages[i].covered() {
            return;
        }
        self.pages[i].clear(IN_POOL);
        self.covered.remove(index(i));
    }

    /// Every frame offset under a covered page.
    pub fn covered_frames(&self) -> impl Iterator<Item = FrameId> + '_ {
        self.covered.frames()
    }

    /// The runs of covered pages: `(first page index, pages, frame offset under the
    /// first)`, in no particular order.
    pub fn covered_runs(&self) -> impl Iterator<Item = (usize, usize, FrameId)> + '_ {
        self.covered
            .runs()
            .map(|(i, n, g)| (i as usize, n as usize, g))
    }

    /// Forget every covered offset (a forked child's records: its pool mappings are
    /// the parent's, and it unmerges them as inherited pages).
    pub fn clear_covered(&mut self) {
        self.pages.update_all(|p| p.clear(IN_POOL));
        self.covered = Covered::default();
    }

    /// Split off the pages from index `at` on into a region of their own. The head
    /// gives back the room of the records it no longer has (bookkeeping is counted by
    /// capacity, see `metadata_bytes`).
    pub fn split_off(&mut self, at: usize, page: usize) -> Region {
        let covered = self.covered.split_off(index(at));
        let pages = self.pages.split_off(at);
        self.pages.shrink_to_fit();
        Region {
            start: self.start + at * page,
            pages,
            owned: self.owned,
            prot: self.prot,
            registered: self.registered,
            track_pending: self.track_pending,
            covered,
        }
    }

    /// Bytes of bookkeeping: the records (by capacity) and the side map.
    pub fn metadata_bytes(&self) -> usize {
        self.pages.capacity() * std::mem::size_of::<PageRec>() + self.covered.metadata_bytes()
    }
}

/// A page index as the side map keeps it.
fn index(i: usize) -> u32 {
    u32::try_from(i).expect("regions have fewer than 2^32 pages")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_record_is_8_bytes() {
        assert_eq!(std::mem::size_of::<PageRec>(), 8);
    }

    #[test]
    fn fields_round_trip_without_touching_each_other() {
        for state in State::ALL {
            for flags in [
                0u8,
                ADVISED,
                IN_POOL | SUM_TRACKED,
                0xFF,
                ADVISED | (0b101 << 1),
            ] {
                for age in [0u8, 1, 3, 9, MAX_AGE] {
                    for skips in [0u8, 1, 4, 8, MAX_SKIPS] {
                        let mut r = PageRec::fresh(state, flags);
                        r.set_age(age);
                        r.set_skips(skips);
                        if state == State::Stable {
                            r.set_stable(0xDEAD_BEEF);
                            assert_eq!(r.frame(), 0xDEAD_BEEF);
                        } else {
                            r.set_checksum(u32::MAX - 1);
                            assert_eq!(r.checksum(), u32::MAX - 1);
                        }
                        assert_eq!(
                            (r.state(), r.flags(), r.age(), r.skips()),
                            (state, flags, age, skips)
                        );
                        r.set_prot(0b011);
                        assert_eq!(r.prot(), 0b011);
                        assert_eq!(r.flags() & !PROT_BITS, flags & !PROT_BITS);
                        r.set(SUM_TRACKED);
                        r.clear(ADVISED);
                        assert!(r.sum_tracked() && !r.advised());
                        assert_eq!((r.state(), r.age(), r.skips()), (state, age, skips));
                    }
                }
            }
        }
    }

    #[test]
    fn age_saturates_where_skip_age_stops_changing() {
        let mut r = PageRec::default();
        r.set_age(200);
        assert_eq!(r.age(), MAX_AGE);
        r.set_age(r.age().saturating_add(1));
        assert_eq!(r.age(), MAX_AGE);
    }

    #[test]
    fn fresh_keeps_only_the_flags() {
        let mut r = PageRec::fresh(State::Unstable, ADVISED | SUM_TRACKED);
        r.set_checksum(7);
        r.set_age(5);
        r.set_skips(2);
        let f = PageRec::fresh(State::Volatile, r.flags());
        assert_eq!(f.state(), State::Volatile);
        assert_eq!(f.flags(), ADVISED | SUM_TRACKED);
        assert_eq!((f.checksum(), f.age(), f.skips()), (0, 0, 0));
    }

    #[test]
    fn a_split_gives_back_the_head_s_room_for_the_records_it_lost() {
        // Review finding: the head kept the capacity of the whole region's records.
        let mut r = Region::new(0x10000, 1024, false, 3);
        for i in (0..1024).step_by(8) {
            r.cover(i, i as FrameId);
        }
        let before = r.metadata_bytes();
        let tail = r.split_off(16, 0x1000);
        assert_eq!((r.pages.len(), tail.pages.len()), (16, 1008));
        assert!(r.pages.capacity() < 32, "head holds {}", r.pages.capacity());
        assert!(
            r.metadata_bytes() < before / 16,
            "head: {} of {before} bytes",
            r.metadata_bytes()
        );
        assert_eq!(r.covered_frames().count(), 2);
        assert_eq!(tail.covered_frame(8), Some(24));
    }

    #[test]
    fn records_are_created_when_one_changes_alone() {
        let mut r = Region::new(0x10000, 1 << 18, true, 3);
        assert_eq!(r.metadata_bytes(), 0, "a GiB of pages, no record yet");
        r.pages.update_all(|p| p.set(ADVISED));
        assert!(r.any_advised() && r.pages.uniform().is_some());
        assert_eq!(r.pages.count(PageRec::advised), 1 << 18);
        assert_eq!(r.pages.count_in(10..20, PageRec::advised), 10);
        assert!(!r.pages.any_in(0..1 << 18, PageRec::in_pool_mapping));
        assert!(!r.pages.any_in(5..5, PageRec::advised));
        assert_eq!(r.pages.range(3..7).count(), 4);
        assert_eq!(r.pages.iter().count(), 1 << 18);
        // A lazy split keeps both halves lazy.
        let tail = r.split_off(1 << 17, 0x1000);
        assert_eq!((r.pages.len(), tail.pages.len()), (1 << 17, 1 << 17));
        assert!(tail.pages.uniform().is_some_and(|p| p.advised()));
        assert_eq!(r.metadata_bytes(), 0);
        // One page changed: every record exists, the others as they were.
        r.pages[5].set_state(State::Volatile);
        assert!(r.pages.uniform().is_none());
        assert_eq!(r.pages.capacity(), 1 << 17);
        assert_eq!(r.pages.count(|p| p.state() == State::Volatile), 1);
        assert_eq!(r.pages.count(PageRec::advised), 1 << 17);
        assert!(r.pages.any_in(5..6, |p| p.state() == State::Volatile));
        assert!(!r.pages.any_in(6..100, |p| p.state() == State::Volatile));
        let t2 = r.split_off(4, 0x1000);
        assert_eq!(t2.pages[1].state(), State::Volatile);
        assert_eq!(r.pages.iter().filter(|p| p.advised()).count(), 4);
    }

    #[test]
    #[should_panic(expected = "record 8 of 8")]
    fn a_lazy_record_past_the_end_panics_as_a_vec_would() {
        let r = Region::new(0x10000, 8, true, 3);
        let _ = r.pages[8];
    }

    #[test]
    fn covered_offsets_follow_cover_uncover_and_split() {
        let mut r = Region::new(0x10000, 8, false, 3);
        r.cover(2, 40);
        r.cover(6, 44);
        assert_eq!(r.covered_frame(2), Some(40));
        assert_eq!(r.covered_frame(3), None);
        assert!(r.pages[6].in_pool_mapping());
        let tail = r.split_off(4, 0x1000);
        assert_eq!(tail.start, 0x14000);
        assert_eq!(tail.covered_frame(2), Some(44));
        assert_eq!(r.covered_frame(2), Some(40));
        assert_eq!(r.covered_frames().collect::<Vec<_>>(), vec![40]);
        r.uncover(2);
        assert_eq!(r.covered_frame(2), None);
        assert!(!r.pages[2].in_pool_mapping());
        assert_eq!(r.covered_frames().count(), 0);
    }
}
