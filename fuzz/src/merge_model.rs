//! `merge_model`: random operations on `Core` over an in-memory address space,
//! checked against a plain byte model of what the application wrote.
//!
//! The memory is `FakeMem` (kernel-like copy-on-write; it panics if a frame is
//! rewritten or punched while a page maps it, or if a remap would change a
//! page), wrapped in [`ChildMem`], which adds a simulated forked child: the
//! frames that the parent mapped at a fork must keep their bytes (never
//! punched, never rewritten) until `pool_quiet()` says the child is gone.
//!
//! After every operation [`Harness::check`] asserts:
//! * every page reads (application view) exactly what the model says was written;
//! * `Core::check_invariants()` (counters and reference counts agree with the records);
//! * a page that maps a frame has a `Stable`, advised record naming that very frame,
//!   and a `Stable` record's page maps its frame unless a write copied it away;
//! * every record's advice equals the model's advice;
//! * frames holding bytes == frames the table counts live (no leak, no early punch);
//! * no frame has more references than the largest `max_page_sharing` ever set;
//! * the child's frames still hold the bytes they had at the fork;
//! * (in `ChildMem::map_frames`) remaps (one per run) since a VMA budget of L was set stay ≤ L/2
//!   (each may add 2 VMAs; the fake's `vma_allowance` answers L − 2·remaps).
//!
//! `Settle` additionally checks the merge is complete: after full scans with no
//! failure injected and ample frames, no two advised pages with the same bytes
//! are both left unmerged.

use std::collections::{BTreeMap, HashMap};
use std::io;

use arbitrary::{Arbitrary, Unstructured};
use ksm::pool::FrameId;
use ksm::region::{Region, State};
use ksm::scan::fake::FakeMem;
use ksm::scan::{Core, Mem, Presence};

/// Start of the first region (a multiple of every page size used).
const BASE: usize = 0x10_0000;
/// `PROT_READ | PROT_WRITE` (ignored by the fake).
const PROT_RW: i32 = 3;
/// Frame capacity when the input does not ask for a small one.
const AMPLE_FRAMES: u32 = 1 << 16;

/// Shape of the address space.
#[derive(Arbitrary, Debug, Clone)]
pub struct Setup {
    /// 4096-byte pages (else 64-byte pages, faster; the algorithm is size-agnostic).
    pub big_pages: bool,
    /// Pages of region A, 1..=16.
    pub pages_a: u8,
    /// Pages of region B, 0..=16 (0: a single region).
    pub pages_b: u8,
    /// Pages between A and B, 0..=3 (0: adjacent, which tests run coalescing).
    pub gap: u8,
    /// Frame capacity 1..=32 (exhaustion), or `None` for ample.
    pub small_capacity: Option<u8>,
    /// Initial `max_page_sharing`: 2 + n % 3, or `None` for the default 256.
    pub max_page_sharing: Option<u8>,
    /// Write tracking (`Mem::probe_tracked`): unchanged pages are not hashed again.
    pub write_tracking: bool,
}

/// One step. Page and range arguments are reduced modulo what exists.
#[derive(Arbitrary, Debug, Clone)]
pub enum Op {
    /// Write a whole page with one of a few patterns (so that merges happen).
    Fill { page: u8, pattern: u8 },
    /// Write one byte.
    Poke { page: u8, offset: u16, value: u8 },
    /// Application read of a page (faults a merged page in: pagemap says file-backed).
    Touch { page: u8 },
    /// `advise(range)`.
    Advise { first: u8, len: u8 },
    /// `unadvise(range)`, with `fail_unmerge` set during the call if `fail`.
    Unadvise { first: u8, len: u8, fail: bool },
    /// `unmerge_range(range)`, with `fail_unmerge` set during the call if `fail`.
    UnmergeRange { first: u8, len: u8, fail: bool },
    /// `unmerge_all()` (`run = 2`), with `fail_unmerge` set during the call if `fail`.
    UnmergeAll { fail: bool },
    /// `scan_batch(budget % 41)`.
    ScanBatch { budget: u8 },
    /// `scan_full(1)`.
    ScanFull,
    /// `scan_full(3)` with `fail_map` off, then the completeness check.
    Settle,
    /// Flip `fail_map`.
    ToggleFailMap,
    /// `frames_mut().on_fork()`; a child now maps every frame the parent maps.
    Fork,
    /// The child exits: `pool_quiet()`.
    Quiet,
    /// Unmap region A (or B) and `remove_region` it.
    Remove { b: bool },
    /// Map region A (or B) again, fresh, and `add_region` it.
    AddBack { b: bool },
    /// `max_page_sharing = 2 + n % 3`.
    MaxPageSharing { n: u8 },
    /// A VMA budget of `n % 64` VMAs from now on (or none), then `refresh_vma_allowance()`.
    VmaBudget { n: Option<u8> },
    /// `refresh_vma_allowance()` (the engine does it at every full scan).
    RefreshVma,
    /// `use_zero_pages = on`.
    ZeroPages { on: bool },
    /// `smart_scan = on`.
    SmartScan { on: bool },
    /// `hash_threads = 1 + n % 4` (more than 1: checksums taken ahead, on threads).
    HashThreads { n: u8 },
}

/// Parsed as the setup, then operations until the bytes run out (derived
/// `Vec` parsing would stop after a couple of operations on random bytes).
#[derive(Debug, Clone)]
pub struct Input {
    pub setup: Setup,
    pub ops: Vec<Op>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let setup = Setup::arbitrary(u)?;
        let ops = u.arbitrary_iter()?.collect::<arbitrary::Result<_>>()?;
        Ok(Input { setup, ops })
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        let setup = Setup::arbitrary(&mut u)?;
        let mut ops = Vec::new();
        while !u.is_empty() {
            ops.push(Op::arbitrary(&mut u)?);
        }
        Ok(Input { setup, ops })
    }
}

/// `FakeMem` plus a simulated forked child and the frame each page was last mapped to.
pub struct ChildMem {
    pub fake: FakeMem,
    /// Frames a child maps (since the last `pool_quiet`), with the bytes it would read.
    pub child: HashMap<FrameId, Vec<u8>>,
    /// Frame given to the last successful `map_frames` at each address (meaningful
    /// while `fake.maps_frame(addr)`).
    pub mapped: HashMap<usize, FrameId>,
    /// VMA budget set by `VmaBudget` (None: no limit).
    pub vma_limit: Option<u64>,
    /// Successful remaps since the budget was set: each may have added up to 2 VMAs.
    pub maps_since_limit: u64,
}

impl Mem for ChildMem {
    fn page_size(&self) -> usize {
        self.fake.page_size()
    }
    fn probe(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()> {
        self.fake.probe(addr, out)
    }
    fn probe_tracked(
        &mut self,
        addr: usize,
        out: &mut [Presence],
        tracked: &mut [bool],
        unchanged: &mut [bool],
    ) -> io::Result<()> {
        self.fake.probe_tracked(addr, out, tracked, unchanged)
    }
    fn untrack(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.fake.untrack(addr, len)
    }
    fn retrack(&mut self, addr: usize, len: usize) {
        self.fake.retrack(addr, len)
    }
    fn read(&mut self, addr: usize, owned: bool, buf: &mut [u8]) -> io::Result<()> {
        self.fake.read(addr, owned, buf)
    }
    fn checksums(
        &mut self,
        addrs: &[usize],
        owned: bool,
        threads: usize,
        sum: fn(&[u8]) -> u32,
        out: &mut [Option<u32>],
    ) {
        self.fake.checksums(addrs, owned, threads, sum, out)
    }
    fn frame(&self, f: FrameId) -> &[u8] {
        self.fake.frame(f)
    }
    fn write_frame(&mut self, f: FrameId, data: &[u8]) -> io::Result<()> {
        assert!(
            !self.child.contains_key(&f),
            "frame {f} rewritten while a forked child maps it"
        );
        self.fake.write_frame(f, data)
    }
    /// What the process could still add: the budget less 2 per remap since it was set
    /// (the most a remap can add), like the real count would show at worst.
    fn vma_allowance(&mut self) -> u64 {
        self.vma_limit
            .map_or(u64::MAX, |l| l.saturating_sub(2 * self.maps_since_limit))
    }
    fn punch(&mut self, f: FrameId) -> io::Result<()> {
        assert!(
            !self.child.contains_key(&f),
            "frame {f} punched while a forked child maps it"
        );
        self.fake.punch(f)
    }
    fn protect(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.fake.protect(addr, len)
    }
    fn release(&mut self, addr: usize, len: usize, unprotect: bool) {
        self.fake.release(addr, len, unprotect)
    }
    fn release_tail(&mut self, addr: usize, len: usize, keep: usize) {
        self.fake.release_tail(addr, len, keep)
    }
    fn map_frames(
        &mut self,
        addr: usize,
        n: usize,
        prot: i32,
        f0: FrameId,
        covered: &[(usize, Vec<u8>)],
    ) -> io::Result<()> {
        self.fake.map_frames(addr, n, prot, f0, covered)?;
        let page = self.fake.page_size();
        for i in 0..n {
            self.mapped.insert(addr + i * page, f0 + i as FrameId);
        }
        self.maps_since_limit += 1;
        if let Some(l) = self.vma_limit {
            assert!(
                2 * self.maps_since_limit <= l,
                "{} remaps since a budget of {l} VMAs was set",
                self.maps_since_limit
            );
        }
        Ok(())
    }
    fn unmerge_run(&mut self, addr: usize, len: usize, prot: i32, owned: bool) -> io::Result<()> {
        self.fake.unmerge_run(addr, len, prot, owned)
    }
    fn zap(&mut self, addr: usize) -> io::Result<()> {
        self.fake.zap(addr)
    }
}

/// What the application wrote into one region.
struct RegionModel {
    start: usize,
    npages: usize,
    present: bool,
    data: Vec<Vec<u8>>,
    /// Written since mapped (else never faulted in: not present, never tracked).
    written: Vec<bool>,
    /// Written while it mapped a frame (copied away), and not remapped since.
    cowed: Vec<bool>,
    advised: Vec<bool>,
}

impl RegionModel {
    fn new(start: usize, npages: usize, page: usize) -> Self {
        RegionModel {
            start,
            npages,
            present: true,
            data: vec![vec![0; page]; npages],
            written: vec![false; npages],
            cowed: vec![false; npages],
            advised: vec![false; npages],
        }
    }

    fn reset(&mut self, page: usize) {
        *self = RegionModel::new(self.start, self.npages, page);
    }
}

/// The system under test and its model.
pub struct Harness {
    pub core: Core<ChildMem>,
    page: usize,
    regions: Vec<RegionModel>,
    capacity: u32,
    max_sharing_ever: u32,
    /// Address span covered by range arguments, in pages.
    span: usize,
}

fn pattern(p: u8, page: usize) -> Vec<u8> {
    match p % 5 {
        0 => vec![0; page],
        1 => vec![0xAA; page],
        2 => vec![0x55; page],
        3 => (0..page).map(|i| i as u8).collect(),
        _ => (0..page).map(|i| (i as u8) ^ 1).collect(),
    }
}

impl Harness {
    pub fn new(s: &Setup) -> Self {
        let page = if s.big_pages { 4096 } else { 64 };
        let na = 1 + usize::from(s.pages_a % 16);
        let nb = usize::from(s.pages_b % 17);
        let gap = usize::from(s.gap % 4);
        let capacity = s
            .small_capacity
            .map_or(AMPLE_FRAMES, |c| 1 + u32::from(c % 32));
        let mem = ChildMem {
            fake: FakeMem::new(page),
            child: HashMap::new(),
            mapped: HashMap::new(),
            vma_limit: None,
            maps_since_limit: 0,
        };
        let mut core = Core::new(mem, capacity);
        core.mem.fake.tracking = s.write_tracking;
        let mut regions = vec![RegionModel::new(BASE, na, page)];
        if nb > 0 {
            regions.push(RegionModel::new(BASE + (na + gap) * page, nb, page));
        }
        for r in &regions {
            core.add_region(Region::new(r.start, r.npages, true, PROT_RW));
        }
        if let Some(n) = s.max_page_sharing {
            core.max_page_sharing = 2 + u32::from(n % 3);
        }
        let max_sharing_ever = core.max_page_sharing;
        Harness {
            core,
            page,
            regions,
            capacity,
            max_sharing_ever,
            span: na + gap + nb + 1,
        }
    }

    /// The `i`-th page (modulo) of the regions currently mapped: (region, page index).
    fn pick(&self, i: u8) -> Option<(usize, usize)> {
        let total: usize = self
            .regions
            .iter()
            .filter(|r| r.present)
            .map(|r| r.npages)
            .sum();
        if total == 0 {
            return None;
        }
        let mut i = usize::from(i) % total;
        for (ri, r) in self.regions.iter().enumerate().filter(|(_, r)| r.present) {
            if i < r.npages {
                return Some((ri, i));
            }
            i -= r.npages;
        }
        unreachable!()
    }

    fn addr(&self, ri: usize, pi: usize) -> usize {
        self.regions[ri].start + pi * self.page
    }

    fn range(&self, first: u8, len: u8) -> (usize, usize) {
        let first = usize::from(first) % self.span;
        let len = usize::from(len) % (self.span + 1);
        (BASE + first * self.page, BASE + (first + len) * self.page)
    }

    /// Every mapped page in `[start, end)`: (region, page index, address).
    fn pages_in(&self, start: usize, end: usize) -> Vec<(usize, usize, usize)> {
        let mut v = Vec::new();
        for (ri, r) in self.regions.iter().enumerate().filter(|(_, r)| r.present) {
            for pi in 0..r.npages {
                let a = self.addr(ri, pi);
                if a >= start && a < end {
                    v.push((ri, pi, a));
                }
            }
        }
        v
    }

    fn rec_state(&self, addr: usize) -> (State, FrameId, bool) {
        let r = self.core.region_at(addr).expect("tracked page");
        let p = r.pages[(addr - r.start) / self.page];
        let frame = if p.state() == State::Stable {
            p.frame()
        } else {
            0
        };
        (p.state(), frame, p.advised())
    }

    /// Whether the page's record says it is in a pool mapping: covered (`IN_POOL`).
    fn in_pool(&self, addr: usize) -> bool {
        let r = self.core.region_at(addr).expect("tracked page");
        r.covered_frame((addr - r.start) / self.page).is_some()
    }

    /// Whether unmerging `[start, end)` has pages to move: merged or covered ones.
    fn any_stable(&self, start: usize, end: usize) -> bool {
        self.pages_in(start, end)
            .iter()
            .any(|&(_, _, a)| self.rec_state(a).0 == State::Stable || self.in_pool(a))
    }

    fn write(&mut self, ri: usize, pi: usize, off: usize, data: &[u8]) {
        let a = self.addr(ri, pi);
        let cow = self.core.mem.fake.maps_frame(a);
        self.core.mem.fake.write(a + off, data);
        let m = &mut self.regions[ri];
        m.cowed[pi] |= cow;
        m.data[pi][off..off + data.len()].copy_from_slice(data);
        m.written[pi] = true;
    }

    pub fn apply(&mut self, op: &Op) {
        let page = self.page;
        match *op {
            Op::Fill {
                page: p,
                pattern: k,
            } => {
                if let Some((ri, pi)) = self.pick(p) {
                    self.write(ri, pi, 0, &pattern(k, page));
                }
            }
            Op::Poke {
                page: p,
                offset,
                value,
            } => {
                if let Some((ri, pi)) = self.pick(p) {
                    self.write(ri, pi, usize::from(offset) % page, &[value]);
                }
            }
            Op::Touch { page: p } => {
                if let Some((ri, pi)) = self.pick(p) {
                    let a = self.addr(ri, pi);
                    self.core.mem.fake.touch(a);
                }
            }
            Op::Advise { first, len } => {
                let (s, e) = self.range(first, len);
                let mut expect = 0;
                for (ri, pi, _) in self.pages_in(s, e) {
                    if !self.regions[ri].advised[pi] {
                        self.regions[ri].advised[pi] = true;
                        expect += 1;
                    }
                }
                assert_eq!(self.core.advise(s, e), expect, "pages newly advised");
            }
            Op::Unadvise { first, len, fail } => {
                let (s, e) = self.range(first, len);
                let had_stable = self.any_stable(s, e);
                self.core.mem.fake.fail_unmerge = fail;
                let r = self.core.unadvise(s, e);
                self.core.mem.fake.fail_unmerge = false;
                assert_eq!(r.is_err(), fail && had_stable, "unadvise result: {r:?}");
                if r.is_ok() {
                    for (ri, pi, a) in self.pages_in(s, e) {
                        self.regions[ri].advised[pi] = false;
                        assert!(
                            !self.core.mem.fake.maps_frame(a),
                            "unadvised page still merged"
                        );
                        assert!(!self.in_pool(a), "unadvised page still covered");
                        assert_eq!(
                            self.rec_state(a).0,
                            State::Untracked,
                            "unadvised page tracked"
                        );
                    }
                }
            }
            Op::UnmergeRange { first, len, fail } => {
                let (s, e) = self.range(first, len);
                let had_stable = self.any_stable(s, e);
                self.core.mem.fake.fail_unmerge = fail;
                let r = self.core.unmerge_range(s, e);
                self.core.mem.fake.fail_unmerge = false;
                assert_eq!(
                    r.is_err(),
                    fail && had_stable,
                    "unmerge_range result: {r:?}"
                );
                if r.is_ok() {
                    for (_, _, a) in self.pages_in(s, e) {
                        assert!(!self.core.mem.fake.maps_frame(a), "page still merged");
                        assert_ne!(self.rec_state(a).0, State::Stable, "page still stable");
                        assert!(!self.in_pool(a), "page still covered");
                    }
                }
            }
            Op::UnmergeAll { fail } => {
                let had_stable = self.any_stable(0, usize::MAX);
                self.core.mem.fake.fail_unmerge = fail;
                let r = self.core.unmerge_all();
                self.core.mem.fake.fail_unmerge = false;
                assert_eq!(r.is_err(), fail && had_stable, "unmerge_all result: {r:?}");
                if r.is_ok() {
                    assert_eq!(self.core.counters().full_scans, 0);
                    for (_, _, a) in self.pages_in(0, usize::MAX) {
                        assert!(!self.core.mem.fake.maps_frame(a), "page still merged");
                        assert_eq!(self.rec_state(a).0, State::Untracked);
                        assert!(!self.in_pool(a), "page still covered");
                    }
                }
            }
            Op::ScanBatch { budget } => {
                self.core.scan_batch(u64::from(budget % 41));
            }
            Op::ScanFull => self.core.scan_full(1),
            Op::Settle => {
                let fail_map = self.core.mem.fake.fail_map;
                self.core.mem.fake.fail_map = false;
                let skips = self.core.counters().vma_budget_skips;
                // Smart scan may skip a page for up to 8 visits: completeness after 3
                // full scans holds without it.
                let smart = std::mem::replace(&mut self.core.smart_scan, false);
                self.core.scan_full(3);
                self.core.smart_scan = smart;
                self.core.mem.fake.fail_map = fail_map;
                if self.core.counters().vma_budget_skips == skips {
                    self.check_complete();
                }
            }
            Op::ToggleFailMap => self.core.mem.fake.fail_map ^= true,
            Op::Fork => {
                for (_, _, a) in self.pages_in(0, usize::MAX) {
                    if self.core.mem.fake.maps_frame(a) {
                        let f = self.core.mem.mapped[&a];
                        let bytes = self.core.mem.fake.frame(f).to_vec();
                        let old = self.core.mem.child.insert(f, bytes.clone());
                        assert!(old.is_none_or(|o| o == bytes), "child frame {f} changed");
                    }
                }
                self.core.frames_mut().on_fork();
            }
            Op::Quiet => {
                self.core.mem.child.clear();
                self.core.pool_quiet();
                assert_eq!(self.core.frames().deferred(), 0);
            }
            Op::Remove { b } => {
                let ri = usize::from(b).min(self.regions.len() - 1);
                if self.regions[ri].present {
                    for pi in 0..self.regions[ri].npages {
                        let a = self.addr(ri, pi);
                        self.core.mem.fake.unmap(a);
                    }
                    let start = self.regions[ri].start;
                    let r = self.core.remove_region(start);
                    assert!(r.is_some_and(|r| r.pages.len() == self.regions[ri].npages));
                    self.regions[ri].present = false;
                }
            }
            Op::AddBack { b } => {
                let ri = usize::from(b).min(self.regions.len() - 1);
                if !self.regions[ri].present {
                    self.regions[ri].reset(page);
                    let r = &self.regions[ri];
                    self.core
                        .add_region(Region::new(r.start, r.npages, true, PROT_RW));
                }
            }
            Op::MaxPageSharing { n } => {
                self.core.max_page_sharing = 2 + u32::from(n % 3);
                self.max_sharing_ever = self.max_sharing_ever.max(self.core.max_page_sharing);
            }
            Op::VmaBudget { n } => {
                self.core.mem.vma_limit = n.map(|n| u64::from(n % 64));
                self.core.mem.maps_since_limit = 0;
                self.core.refresh_vma_allowance();
            }
            Op::RefreshVma => self.core.refresh_vma_allowance(),
            Op::ZeroPages { on } => self.core.use_zero_pages = on,
            Op::SmartScan { on } => self.core.smart_scan = on,
            Op::HashThreads { n } => self.core.hash_threads = 1 + usize::from(n % 4),
        }
    }

    /// The checks that hold after every operation.
    pub fn check(&mut self) {
        self.check_pages();
        let (fake, page) = (&self.core.mem.fake, self.page);
        for r in self.regions.iter_mut().filter(|r| r.present) {
            for pi in 0..r.npages {
                if fake.maps_frame(r.start + pi * page) {
                    r.cowed[pi] = false;
                }
            }
        }
    }

    fn check_pages(&self) {
        let fake = &self.core.mem.fake;
        self.core.check_invariants();
        let tracked: Vec<usize> = self.core.regions().map(|r| r.start).collect();
        let present: Vec<usize> = self
            .regions
            .iter()
            .filter(|r| r.present)
            .map(|r| r.start)
            .collect();
        assert_eq!(tracked, present, "tracked regions");
        let mut mapped_count: BTreeMap<FrameId, u32> = BTreeMap::new();
        for (ri, r) in self.regions.iter().enumerate().filter(|(_, r)| r.present) {
            for pi in 0..r.npages {
                let a = self.addr(ri, pi);
                assert!(
                    fake.read_page(a) == r.data[pi],
                    "page {a:#x} (region {ri} page {pi}) reads other bytes than written"
                );
                let (state, frame, advised) = self.rec_state(a);
                assert_eq!(advised, r.advised[pi], "advice of page {a:#x}");
                if fake.maps_frame(a) {
                    let f = self.core.mem.mapped[&a];
                    assert_eq!(state, State::Stable, "page {a:#x} maps frame {f} untracked");
                    assert_eq!(frame, f, "page {a:#x} maps another frame than recorded");
                    assert!(advised, "unadvised page {a:#x} maps frame {f}");
                    *mapped_count.entry(f).or_default() += 1;
                }
                if state == State::Zero {
                    // Still the zero page, or written since (the next visit sees it present).
                    assert!(
                        !fake.maps_frame(a)
                            && (r.data[pi].iter().all(|&b| b == 0) || fake.is_anon(a)),
                        "page {a:#x} recorded as the zero page but is not"
                    );
                }
                if state == State::Stable {
                    assert!(
                        fake.maps_frame(a) || r.cowed[pi],
                        "page {a:#x} recorded merged on frame {frame} but neither maps it nor was written"
                    );
                    let refs = self.core.frames().refs(frame);
                    assert!(
                        refs <= self.max_sharing_ever,
                        "frame {frame}: {refs} references > max_page_sharing {}",
                        self.max_sharing_ever
                    );
                }
            }
        }
        for (&f, &n) in &mapped_count {
            assert!(
                self.core.frames().refs(f) >= n,
                "frame {f} mapped more than referenced"
            );
        }
        assert_eq!(
            fake.frames_held(),
            self.core.frames().live() as usize,
            "frames holding bytes vs live frames"
        );
        for (&f, bytes) in &self.core.mem.child {
            assert!(fake.frame(f) == &bytes[..], "child's frame {f} changed");
        }
        let k = self.core.counters();
        assert!(k.rmap_items >= k.pages_shared + k.pages_sharing + k.pages_unshared);
    }

    /// After `Settle`: no two advised, present pages with the same bytes are both
    /// unmerged (the kernel leaves at most one page of a content unshared), as
    /// long as frames did not run out.
    fn check_complete(&self) {
        if self.capacity != AMPLE_FRAMES {
            return;
        }
        let mut unmerged: HashMap<&[u8], usize> = HashMap::new();
        for (ri, r) in self.regions.iter().enumerate().filter(|(_, r)| r.present) {
            for pi in 0..r.npages {
                let a = self.addr(ri, pi);
                if !r.advised[pi]
                    || !r.written[pi]
                    || self.core.mem.fake.maps_frame(a)
                    || self.rec_state(a).0 == State::Zero
                    // Dropped to the zero page (and its record since forgotten by an
                    // unmerge): holds no memory, nothing to merge.
                    || !self.core.mem.fake.is_anon(a)
                {
                    continue;
                }
                if let Some(other) = unmerged.insert(&r.data[pi][..], a) {
                    panic!(
                        "pages {other:#x} and {a:#x} have the same bytes and are both unmerged \
                         after scan_full(3) (states {:?}, {:?})",
                        self.rec_state(other),
                        self.rec_state(a)
                    );
                }
            }
        }
    }
}

/// Run one input: every operation, each followed by the checks.
pub fn run(input: &Input) {
    let mut h = Harness::new(&input.setup);
    h.check();
    for op in &input.ops {
        h.apply(op);
        h.check();
    }
}

/// Run raw fuzzer bytes (for use without libFuzzer).
pub fn run_bytes(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}
