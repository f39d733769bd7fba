//! `merge_model`: random operations on `Core` over an in-memory address space,
//! checked against a plain byte model of what the application wrote.
//!
//! The memory is `FakeMem` (kernel-like copy-on-write; it panics if a frame is
//! rewritten or punched while a page maps it, or if a remap would change a
//! page), wrapped in [`ChildMem`], which adds a simulated forked child: the
//! frames that the parent mapped at a fork, and the free frame offsets under
//! its covered pages (`reserve_covered_frames`), must keep their bytes (never
//! punched, never rewritten; never given bytes) until `pool_quiet()` says the
//! child is gone.
//!
//! The address space holds ksm's own memory (`ksm.mmap`: regions A and B, closed
//! and opened again) and the application's (region C and the free space after
//! it), which ksm tracks once advised and follows the way the engine does: an
//! `munmap` (`forget_unmapped`, which splits regions), an `mremap`
//! (`relocate`, also onto ksm's own memory, which the application must not do),
//! memory vanishing without an event (`forget_vanished`), and freshly mapped
//! memory. Pages moved behind ksm's back may map frames no record names
//! ("loose" pages); their frames must stay until `free_unmapped_suspects` finds
//! them unmapped.
//!
//! After every operation [`Harness::check`] asserts:
//! * every mapped page reads (application view) exactly what the model says was written;
//! * `Core::check_invariants()` (counters and reference counts agree with the records);
//! * ksm tracks exactly the pages the model says (regions split, moved and dropped
//!   as the model predicts);
//! * a page that maps a frame has a `Stable`, advised record naming that very frame,
//!   unless it is loose; and a `Stable` record's page maps its frame unless a write
//!   copied it away;
//! * every frame some page maps is live in the frame table (never free, so never
//!   reused while mapped);
//! * every record's advice equals the model's advice;
//! * frames holding bytes == frames the table counts live (no leak, no early punch);
//! * no frame has more references than the largest `max_page_sharing` ever set;
//! * the child's frames still hold the bytes they had at the fork;
//! * (in `ChildMem::map_frames`) remaps (one per run) since a VMA budget of L was set stay ≤ L/2
//!   (each may add 2 VMAs; the fake's `vma_allowance` answers L − 2·remaps), or ≤ (L + M)/2
//!   where moves off retired segments were given a slack of M past the budget.
//!
//! `Settle` additionally checks the merge is complete: after full scans with no
//! failure injected and ample frames, no two advised pages with the same bytes
//! are both left unmerged.

use std::collections::{BTreeMap, HashMap};
use std::io;

use arbitrary::{Arbitrary, Unstructured};

use ksm::pool::{is_domain, FrameId};
use ksm::region::{Region, State};
use ksm::scan::fake::{FakeMem, IntMap, IntSet};
use ksm::scan::{page_checksum, Core, Mem, Presence};

/// Start of the first region (a multiple of every page size used).
const BASE: usize = 0x10_0000;
/// `PROT_READ | PROT_WRITE` (ignored by the fake).
const PROT_RW: i32 = 3;
/// Frame capacity when the input does not ask for a small one.
const AMPLE_FRAMES: u32 = 1 << 16;
/// Pages of free address space after the application's memory (where `Mremap` and
/// `Vanish` move pages to, and `MapFresh` maps).
const FREE_PAGES: usize = 16;

/// Shape of the address space.
#[derive(Arbitrary, Debug, Clone)]
pub struct Setup {
    /// 4096-byte pages (else 64-byte pages, faster; the algorithm is size-agnostic).
    pub big_pages: bool,
    /// Pages of region A (ksm's own), 1..=16.
    pub pages_a: u8,
    /// Pages of region B (ksm's own), 0..=16 (0: none).
    pub pages_b: u8,
    /// Pages between A and B, 0..=3 (0: adjacent, which tests run coalescing).
    pub gap: u8,
    /// Pages of the application's own memory C (mapped, not advised yet), 0..=16;
    /// it starts one page after B.
    pub pages_c: u8,
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
    /// `madvise(range, MADV_MERGEABLE)` as the engine does it: the application's memory
    /// ksm does not track yet becomes regions of its own, then `advise(range)`.
    Advise { first: u8, len: u8 },
    /// `unadvise(range)`, with `fail_unmerge` set during the call if `fail`; then the
    /// regions of the application's memory with no advice left go (`remove_region`).
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
    /// `frames_mut().on_fork()` and `reserve_covered_frames()`; a child now maps every
    /// frame the parent maps, and may read the frame offset under every covered page.
    Fork,
    /// The child exits: `pool_quiet()`.
    Quiet,
    /// Unmap region A (or B) and `remove_region` it (closing a `ksm.mmap`).
    Remove { b: bool },
    /// Map region A (or B) again, fresh, and `add_region` it.
    AddBack { b: bool },
    /// The application unmaps its memory in `range` (a userfaultfd UNMAP event:
    /// `forget_unmapped`, which splits a region the range cuts into).
    Munmap { first: u8, len: u8 },
    /// The application maps fresh memory where nothing is mapped in `range` (ksm's
    /// own address ranges excepted).
    MapFresh { first: u8, len: u8 },
    /// The application moves its memory in `range` (all mapped) to page `dest` (a
    /// userfaultfd REMAP event: `relocate`); a destination over ksm's own memory is
    /// the misuse ksm must survive.
    Mremap { first: u8, len: u8, dest: u8 },
    /// An advised page of the application's memory vanishes without an event:
    /// unmapped, or moved to free space if `moved` (its frame goes along). The engine
    /// finds it gone at a full scan: `forget_vanished`, then the regions with no
    /// advice left go.
    Vanish { page: u8, moved: bool },
    /// `free_unmapped_suspects`, told which frames some page maps.
    FreeSuspects,
    /// `set_write_tracking(on)` (the `write_tracking` knob).
    WriteTracking { on: bool },
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
    /// `join_domain()`.
    JoinDomain,
    /// `leave_domain()`, then the segments no page maps dropped, as the engine leaves.
    LeaveDomain,
    /// `domain_connected()` (a new broker: what was announced is said again), after
    /// `take_domain_out()` as in the engine.
    DomainConnected,
    /// Another member's segment `1 + id % 6` arrives (`add_segment`): a frame per page
    /// picked (the `i`-th mapped page, modulo), holding a copy of its bytes under their
    /// checksum; with `lie` (frame `k`, pattern `p`), frame `k` holds pattern `p` under
    /// the checksum of its page's bytes instead (a collision, or a lie the sealed bytes
    /// do not back). If taken, the fake serves the frames from the id given.
    AddSegment {
        id: u8,
        pages: Vec<u8>,
        lie: Option<(u8, u8)>,
    },
    /// The domain retires segment `1 + id % 6`, or the `id`-th held (modulo) if `held`.
    RetireSegment { id: u8, held: bool },
    /// `domain_wants` the checksums of the pages picked (and `any`), in a domain of
    /// `members` (with 4 or more, repeats between pages published are published too).
    DomainWants {
        pages: Vec<u8>,
        any: Option<u32>,
        members: u8,
    },
    /// `take_domain_out()`: every checksum is announced once (until a new broker or a
    /// new join); if `echo`, the pages to publish are read now and come back as a
    /// segment of ours (as the broker hands every member the segment, publisher
    /// included).
    TakeDomainOut { echo: bool },
    /// `drop_unmapped_segments()` (the engine does it before every batch): the fake
    /// serves those segments' frames no more.
    DropUnmapped,
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
    /// Frames a child may read (since the last `pool_quiet`), with the bytes it would
    /// read: `None` for a free frame offset under a covered page, which must get no
    /// bytes until then.
    pub child: IntMap<FrameId, Option<Vec<u8>>>,
    /// Frame given to the last successful `map_frames` at each address (meaningful
    /// while `fake.maps_frame(addr)`).
    pub mapped: IntMap<usize, FrameId>,
    /// VMA budget set by `VmaBudget` (None: no limit).
    pub vma_limit: Option<u64>,
    /// Successful remaps since the budget was set: each may have added up to 2 VMAs.
    pub maps_since_limit: u64,
    /// VMAs past the budget that moves off retired segments may use (the real
    /// process's half of `vma_reserve`), set with the budget.
    pub move_slack: u64,
    /// Domain segments the fake serves, by first frame id: frames and whether the
    /// segment was retired (no page may be mapped onto it since).
    pub segments: BTreeMap<FrameId, (u32, bool)>,
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
        frames: bool,
    ) -> io::Result<()> {
        self.fake
            .probe_tracked(addr, out, tracked, unchanged, frames)
    }
    fn untrack(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.fake.untrack(addr, len)
    }
    fn retrack(&mut self, addr: usize, len: usize) {
        self.fake.retrack(addr, len)
    }
    fn track_covered(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.fake.track_covered(addr, len)
    }
    fn write_tracking(&self) -> bool {
        self.fake.write_tracking()
    }
    fn set_write_tracking(&mut self, on: bool) {
        self.fake.set_write_tracking(on)
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
    /// What moves may add past the budget, as the real count would show at worst.
    fn move_allowance(&mut self) -> u64 {
        self.vma_limit.map_or(0, |l| {
            (l + self.move_slack).saturating_sub((2 * self.maps_since_limit).max(l))
        })
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
    ) -> io::Result<bool> {
        if is_domain(f0) {
            let (&s0, &(frames, retired)) = self
                .segments
                .range(..=f0)
                .next_back()
                .expect("a domain frame of a segment held");
            assert!(
                f0 - s0 + n as FrameId <= frames,
                "a run of {n} frames from {f0} leaves the segment at {s0} ({frames} frames)"
            );
            assert!(!retired, "a page mapped onto retired segment {s0}");
        }
        let filled = self.fake.map_frames(addr, n, prot, f0, covered)?;
        let page = self.fake.page_size();
        for i in 0..n {
            self.mapped.insert(addr + i * page, f0 + i as FrameId);
        }
        self.maps_since_limit += 1;
        if let Some(l) = self.vma_limit {
            // (Past the budget only by moves off retired segments, within their slack.)
            assert!(
                2 * self.maps_since_limit <= l + self.move_slack,
                "{} remaps since a budget of {l} VMAs (and {} for moves) was set",
                self.maps_since_limit,
                self.move_slack
            );
        }
        Ok(filled)
    }
    fn unmerge_run(&mut self, addr: usize, len: usize, prot: i32, owned: bool) -> io::Result<()> {
        self.fake.unmerge_run(addr, len, prot, owned)
    }
    fn zap(&mut self, addr: usize) -> io::Result<()> {
        self.fake.zap(addr)
    }
}

/// What the model knows of one page of the address space.
#[derive(Clone, Debug)]
struct PageModel {
    /// Memory is mapped here (else the address is only still spanned by a region).
    mapped: bool,
    /// What the application reads.
    data: Vec<u8>,
    /// Written since mapped (else never faulted in: not present, never tracked).
    written: bool,
    /// Written while it mapped a frame (copied away), and not remapped since.
    cowed: bool,
    advised: bool,
    /// In a region of `Core`.
    tracked: bool,
    /// In a region of ksm's own memory (A or B).
    owned: bool,
    /// Moved here behind ksm's back: it may map a frame that no record names.
    loose: bool,
}

impl PageModel {
    fn fresh(page: usize, owned: bool) -> Self {
        PageModel {
            mapped: true,
            data: vec![0; page],
            written: false,
            cowed: false,
            advised: false,
            tracked: owned,
            owned,
            loose: false,
        }
    }
}

/// The system under test and its model.
pub struct Harness {
    pub core: Core<ChildMem>,
    page: usize,
    /// Every page mapped or tracked, by address.
    pages: BTreeMap<usize, PageModel>,
    /// ksm's own regions A and B: (start, pages, open).
    owned: Vec<(usize, usize, bool)>,
    capacity: u32,
    max_sharing_ever: u32,
    /// Address span covered by range arguments, in pages (ends with the free space).
    span: usize,
    /// Domain segments given to the core and served by the fake: id → (first
    /// frame, frames).
    segs: BTreeMap<u64, (FrameId, u32)>,
    /// Checksums announced since the last join or new broker.
    announced: IntSet<u32>,
    /// Checksums announced again without a join, a new broker or a retirement between.
    reannounced: u64,
    /// Id of the next segment of ours.
    next_own: u64,
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
        let nc = usize::from(s.pages_c % 17);
        let capacity = s
            .small_capacity
            .map_or(AMPLE_FRAMES, |c| 1 + u32::from(c % 32));
        let mut fake = FakeMem::new(page);
        // (Threads on every scan cost more than the checks; unit tests cover them.)
        fake.sum_threads = false;
        let mem = ChildMem {
            fake,
            child: IntMap::default(),
            mapped: IntMap::default(),
            vma_limit: None,
            maps_since_limit: 0,
            move_slack: 0,
            segments: BTreeMap::new(),
        };
        let mut core = Core::new(mem, capacity);
        core.mem.fake.tracking = s.write_tracking;
        if let Some(n) = s.max_page_sharing {
            core.max_page_sharing = 2 + u32::from(n % 3);
        }
        let max_sharing_ever = core.max_page_sharing;
        let mut owned = vec![(BASE, na, true)];
        if nb > 0 {
            owned.push((BASE + (na + gap) * page, nb, true));
        }
        let c_start = BASE + (na + gap + nb + 1) * page;
        let mut h = Harness {
            core,
            page,
            pages: BTreeMap::new(),
            owned,
            capacity,
            max_sharing_ever,
            span: na + gap + nb + 1 + nc + FREE_PAGES,
            segs: BTreeMap::new(),
            announced: IntSet::default(),
            reannounced: 0,
            next_own: 1000,
        };
        for ri in 0..h.owned.len() {
            h.open_owned(ri);
        }
        for i in 0..nc {
            h.pages
                .insert(c_start + i * page, PageModel::fresh(page, false));
        }
        h
    }

    /// Map ksm's own region `ri` (fresh) and track it.
    fn open_owned(&mut self, ri: usize) {
        let (start, n, _) = self.owned[ri];
        for i in 0..n {
            self.pages
                .insert(start + i * self.page, PageModel::fresh(self.page, true));
        }
        self.core.add_region(Region::new(start, n, true, PROT_RW));
        self.owned[ri].2 = true;
    }

    /// Whether `addr` is in the range of ksm's own region A or B (open or not).
    fn in_owned_range(&self, addr: usize) -> bool {
        self.owned
            .iter()
            .any(|&(s, n, _)| s <= addr && addr < s + n * self.page)
    }

    /// The `i`-th (modulo) page for which `f` holds.
    fn nth(&self, i: u8, f: impl Fn(&PageModel) -> bool) -> Option<usize> {
        let v: Vec<usize> = self
            .pages
            .iter()
            .filter(|(_, p)| f(p))
            .map(|(&a, _)| a)
            .collect();
        (!v.is_empty()).then(|| v[usize::from(i) % v.len()])
    }

    fn range(&self, first: u8, len: u8) -> (usize, usize) {
        let first = usize::from(first) % self.span;
        let len = usize::from(len) % (self.span + 1);
        (BASE + first * self.page, BASE + (first + len) * self.page)
    }

    /// The addresses of the model's pages in `[start, end)` for which `f` holds.
    fn addrs(&self, start: usize, end: usize, f: impl Fn(&PageModel) -> bool) -> Vec<usize> {
        self.pages
            .range(start..end)
            .filter(|(_, p)| f(p))
            .map(|(&a, _)| a)
            .collect()
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
        self.addrs(start, end, |p| p.tracked)
            .into_iter()
            .any(|a| self.rec_state(a).0 == State::Stable || self.in_pool(a))
    }

    fn write(&mut self, a: usize, off: usize, data: &[u8]) {
        let cow = self.core.mem.fake.maps_frame(a);
        self.core.mem.fake.write(a + off, data);
        let m = self.pages.get_mut(&a).expect("a mapped page");
        m.cowed |= cow;
        m.data[off..off + data.len()].copy_from_slice(data);
        m.written = true;
    }

    /// The application's regions overlapping `[s, e)` with no advice left go, as the
    /// engine drops them (after an unadvise, or at a full scan).
    fn drop_idle_foreign(&mut self, s: usize, e: usize) {
        let page = self.page;
        let idle: Vec<(usize, usize)> = self
            .core
            .regions()
            .filter(|r| !r.owned && r.start < e && s < r.end(page) && !r.any_advised())
            .map(|r| (r.start, r.end(page)))
            .collect();
        for (start, end) in idle {
            assert!(self.core.remove_region(start).is_some());
            self.untrack(start, end);
        }
    }

    /// The model's side of a region of the application's memory going: its pages are
    /// not tracked any more, and the addresses with no memory are forgotten.
    fn untrack(&mut self, start: usize, end: usize) {
        for a in self.addrs(start, end, |p| p.tracked && !p.owned) {
            let p = self.pages.get_mut(&a).expect("listed");
            p.tracked = false;
            p.advised = false;
            if !p.mapped {
                self.pages.remove(&a);
            }
        }
    }

    /// Move the fake's pages (and what each was last mapped to) from `from` to `to`.
    fn move_memory(&mut self, from: usize, to: usize, len: usize) {
        let mem = &mut self.core.mem;
        mem.fake.mremap(from, to, len);
        for i in (0..len).step_by(self.page) {
            mem.mapped.remove(&(to + i));
            if let Some(f) = mem.mapped.remove(&(from + i)) {
                mem.mapped.insert(to + i, f);
            }
        }
    }

    pub fn apply(&mut self, op: &Op) {
        let page = self.page;
        match *op {
            Op::Fill {
                page: p,
                pattern: k,
            } => {
                if let Some(a) = self.nth(p, |m| m.mapped) {
                    self.write(a, 0, &pattern(k, page));
                }
            }
            Op::Poke {
                page: p,
                offset,
                value,
            } => {
                if let Some(a) = self.nth(p, |m| m.mapped) {
                    self.write(a, usize::from(offset) % page, &[value]);
                }
            }
            Op::Touch { page: p } => {
                if let Some(a) = self.nth(p, |m| m.mapped) {
                    self.core.mem.fake.touch(a);
                }
            }
            Op::Advise { first, len } => {
                let (s, e) = self.range(first, len);
                // The application's mapped memory ksm does not track yet: regions of
                // its own, run by run. Memory mapping frames behind ksm's back (loose) is
                // a mapping of the pool, which the engine never merges.
                let mut runs: Vec<(usize, usize)> = Vec::new();
                for a in self.addrs(s, e, |p| p.mapped && !p.tracked && !p.owned && !p.loose) {
                    match runs.last_mut() {
                        Some(last) if last.1 == a => last.1 = a + page,
                        _ => runs.push((a, a + page)),
                    }
                }
                for (rs, re) in runs {
                    let mut r = Region::new(rs, (re - rs) / page, false, PROT_RW);
                    r.registered = true;
                    self.core.add_region(r);
                    for a in (rs..re).step_by(page) {
                        self.pages.get_mut(&a).expect("listed").tracked = true;
                    }
                }
                // ksm's own memory is registered with the userfaultfd when first advised.
                for r in self.core.regions_mut() {
                    if r.start < e && s < r.end(page) {
                        r.registered = true;
                    }
                }
                let mut expect = 0;
                for a in self.addrs(s, e, |p| p.tracked && !p.advised) {
                    self.pages.get_mut(&a).expect("listed").advised = true;
                    expect += 1;
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
                    for a in self.addrs(s, e, |p| p.tracked) {
                        let loose = self.pages[&a].loose;
                        self.pages.get_mut(&a).expect("listed").advised = false;
                        assert!(
                            loose || !self.core.mem.fake.maps_frame(a),
                            "unadvised page still merged"
                        );
                        assert!(!self.in_pool(a), "unadvised page still covered");
                        assert_eq!(
                            self.rec_state(a).0,
                            State::Untracked,
                            "unadvised page tracked"
                        );
                    }
                    self.drop_idle_foreign(s, e);
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
                    for a in self.addrs(s, e, |p| p.tracked && !p.loose) {
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
                    for a in self.addrs(0, usize::MAX, |p| p.tracked && !p.loose) {
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
                let mem = &mut self.core.mem;
                for &a in self.pages.keys() {
                    // A domain frame is sealed: the fake refuses any write or punch.
                    if mem.fake.maps_frame(a) && !is_domain(mem.mapped[&a]) {
                        let f = mem.mapped[&a];
                        let bytes = mem.fake.frame(f).to_vec();
                        let old = mem.child.insert(f, Some(bytes.clone()));
                        assert!(
                            old.is_none_or(|o| o == Some(bytes)),
                            "child frame {f} changed"
                        );
                    }
                }
                // A covered page is a private copy over a frame offset: the child reads
                // that offset if it discards the page. It must keep the bytes it has, or
                // get none if it is free.
                let offsets: Vec<FrameId> = self
                    .core
                    .regions()
                    .flat_map(Region::covered_frames)
                    .filter(|&g| !is_domain(g))
                    .collect();
                for g in offsets {
                    let bytes = self
                        .core
                        .frames()
                        .is_live(g)
                        .then(|| self.core.mem.fake.frame_bytes(g).map(<[u8]>::to_vec))
                        .flatten();
                    self.core.mem.child.entry(g).or_insert(bytes);
                }
                self.core.frames_mut().on_fork();
                self.core.reserve_covered_frames();
            }
            Op::Quiet => {
                self.core.mem.child.clear();
                self.core.pool_quiet();
                assert_eq!(self.core.frames().deferred(), 0);
            }
            Op::Remove { b } => {
                let ri = usize::from(b).min(self.owned.len() - 1);
                let (start, n, open) = self.owned[ri];
                if open {
                    // ksm unmaps its memory, whatever the application moved there.
                    for i in 0..n {
                        self.core.mem.fake.unmap(start + i * page);
                        self.pages.remove(&(start + i * page));
                    }
                    let r = self.core.remove_region(start);
                    assert!(r.is_some_and(|r| r.pages.len() == n));
                    self.owned[ri].2 = false;
                }
            }
            Op::AddBack { b } => {
                let ri = usize::from(b).min(self.owned.len() - 1);
                let (start, n, open) = self.owned[ri];
                // A new `ksm.mmap` is placed where nothing is mapped.
                if !open && self.pages.range(start..start + n * page).next().is_none() {
                    self.open_owned(ri);
                }
            }
            Op::Munmap { first, len } => {
                let (s, e) = self.range(first, len);
                for a in self.addrs(s, e, |p| !p.owned) {
                    self.core.mem.fake.unmap(a);
                    self.pages.remove(&a);
                }
                self.core.forget_unmapped(s, e);
            }
            Op::MapFresh { first, len } => {
                let (s, e) = self.range(first, len);
                for a in (s..e).step_by(page) {
                    if self.in_owned_range(a) {
                        continue;
                    }
                    match self.pages.get_mut(&a) {
                        Some(p) if p.mapped => {}
                        // Still spanned by a region (vanished memory): its record stays.
                        Some(p) => {
                            let advised = p.advised;
                            *p = PageModel {
                                advised,
                                tracked: true,
                                ..PageModel::fresh(page, false)
                            };
                            self.core.mem.fake.unmap(a);
                        }
                        None => {
                            self.pages.insert(a, PageModel::fresh(page, false));
                            self.core.mem.fake.unmap(a);
                        }
                    }
                }
            }
            Op::Mremap { first, len, dest } => {
                let (s, e) = self.range(first, len.max(1));
                let n = (e - s) / page;
                let to = BASE + usize::from(dest) % self.span * page;
                let movable = (s..e)
                    .step_by(page)
                    .all(|a| self.pages.get(&a).is_some_and(|p| p.mapped && !p.owned));
                let fits = to + n * page <= BASE + self.span * page;
                if n == 0 || !movable || !fits || (to < e && s < to + n * page) {
                    return;
                }
                let misuse = self.pages.range(to..to + n * page).any(|(_, p)| p.owned);
                self.move_memory(s, to, n * page);
                self.core.relocate(s, to, n * page);
                let moved: Vec<PageModel> = (s..e)
                    .step_by(page)
                    .map(|a| self.pages.remove(&a).expect("movable"))
                    .collect();
                for (i, m) in moved.into_iter().enumerate() {
                    let a = to + i * page;
                    let old = self.pages.remove(&a);
                    let p = match old {
                        // ksm's own page, replaced behind its back: its record is gone,
                        // advice included.
                        Some(o) if o.owned => PageModel {
                            advised: false,
                            loose: true,
                            owned: true,
                            tracked: true,
                            ..m
                        },
                        // Moved over ksm's memory: nothing of it is tracked any more.
                        _ if misuse => PageModel {
                            advised: false,
                            loose: true,
                            tracked: false,
                            ..m
                        },
                        // The records followed the memory.
                        _ => m,
                    };
                    self.pages.insert(a, p);
                }
            }
            Op::Vanish { page: i, moved } => {
                let Some(a) = self.nth(i, |p| p.tracked && p.advised && p.mapped && !p.owned)
                else {
                    return;
                };
                let free = BASE + (self.span - FREE_PAGES) * page;
                let to = (free..BASE + self.span * page)
                    .step_by(page)
                    .find(|t| !self.pages.contains_key(t))
                    .filter(|_| moved);
                match to {
                    Some(to) => {
                        self.move_memory(a, to, page);
                        let m = self.pages[&a].clone();
                        let p = PageModel {
                            advised: false,
                            tracked: false,
                            loose: true,
                            ..m
                        };
                        self.pages.insert(to, p);
                    }
                    None => self.core.mem.fake.unmap(a),
                }
                let p = self.pages.get_mut(&a).expect("picked");
                (p.mapped, p.advised, p.loose) = (false, false, false);
                self.core.forget_vanished(a);
                self.drop_idle_foreign(0, usize::MAX);
            }
            Op::FreeSuspects => {
                let mapped = self.core.mem.fake.mapped_frames();
                self.core.free_unmapped_suspects(|f| mapped.contains(&f));
            }
            Op::WriteTracking { on } => self.core.set_write_tracking(on),
            Op::MaxPageSharing { n } => {
                self.core.max_page_sharing = 2 + u32::from(n % 3);
                self.max_sharing_ever = self.max_sharing_ever.max(self.core.max_page_sharing);
            }
            Op::VmaBudget { n } => {
                self.core.mem.vma_limit = n.map(|n| u64::from(n % 64));
                // (Slack for moves in 3 of 4 budgets: 0, 4, 8 or 12 VMAs.)
                self.core.mem.move_slack = n.map_or(0, |n| u64::from(n / 64) * 4);
                self.core.mem.maps_since_limit = 0;
                self.core.refresh_vma_allowance();
            }
            Op::RefreshVma => self.core.refresh_vma_allowance(),
            Op::ZeroPages { on } => self.core.use_zero_pages = on,
            Op::SmartScan { on } => self.core.smart_scan = on,
            Op::HashThreads { n } => self.core.hash_threads = 1 + usize::from(n % 4),
            Op::JoinDomain => {
                if !self.core.in_domain() {
                    self.announced.clear();
                }
                self.core.join_domain();
            }
            Op::LeaveDomain => {
                self.core.leave_domain();
                self.announced.clear();
                for v in self.core.mem.segments.values_mut() {
                    v.1 = true;
                }
                self.drop_unmapped();
            }
            Op::DomainConnected => {
                // The engine takes what a batch collected right after it, and a new
                // broker's news before the next one: nothing is queued at a connect.
                self.apply(&Op::TakeDomainOut { echo: false });
                self.core.domain_connected();
                self.announced.clear();
            }
            Op::AddSegment { id, ref pages, lie } => {
                let id = 1 + u64::from(id % 6);
                let picked = self.picked(pages);
                if picked.is_empty() {
                    return;
                }
                let mut frames: Vec<Vec<u8>> = picked
                    .iter()
                    .map(|&a| self.pages[&a].data.clone())
                    .collect();
                let sums: Vec<u32> = frames.iter().map(|b| page_checksum(b)).collect();
                if let Some((k, p)) = lie {
                    let k = usize::from(k) % frames.len();
                    frames[k] = pattern(p, page);
                    frames[k][0] ^= 0x80;
                }
                self.add_segment(id, &frames, &sums);
            }
            Op::RetireSegment { id, held } => {
                let id = match held {
                    true if !self.segs.is_empty() => *self
                        .segs
                        .keys()
                        .nth(usize::from(id) % self.segs.len())
                        .expect("modulo"),
                    _ => 1 + u64::from(id % 6),
                };
                // The domain retires it: pages on it move off (compaction), and its
                // contents may be announced again (the pages moved off are candidates
                // again): announcing once is checked between retirements.
                if self.core.frames().segment(id).is_some() {
                    self.announced.clear();
                }
                self.core.retire_segment(id, true);
                if let Some(&(f0, _)) = self.segs.get(&id) {
                    self.core.mem.segments.get_mut(&f0).expect("served").1 = true;
                }
            }
            Op::DomainWants {
                ref pages,
                any,
                members,
            } => {
                let mut sums: Vec<u32> = self
                    .picked(pages)
                    .iter()
                    .map(|a| page_checksum(&self.pages[a].data))
                    .collect();
                sums.extend(any);
                self.core.domain_wants(u32::from(members), &sums);
            }
            Op::TakeDomainOut { echo } => {
                let out = self.core.take_domain_out();
                let (announce, publish, asked) = (out.announce, out.publish, out.asked);
                for s in announce {
                    // Announcing a checksum again costs a message, never a byte: the
                    // model counts it (an efficiency property, not one of correctness).
                    if !self.announced.insert(s) {
                        self.reannounced += 1;
                    }
                }
                // As the engine builds a segment: the pages' bytes as they are now.
                let frames: Vec<Vec<u8>> = publish
                    .iter()
                    .filter(|&&(a, _, _)| self.pages.get(&a).is_some_and(|p| p.mapped))
                    .map(|&(a, _, _)| self.core.mem.fake.read_page(a))
                    .collect();
                if echo && !frames.is_empty() {
                    let sums: Vec<u32> = frames.iter().map(|b| page_checksum(b)).collect();
                    self.core.domain_published(&asked, Some(&sums));
                    let id = self.next_own;
                    self.next_own += 1;
                    self.add_segment(id, &frames, &sums);
                } else if !asked.is_empty() {
                    // Not built (as a failed build): asked for again later.
                    self.core.domain_published(&asked, None);
                }
            }
            Op::DropUnmapped => self.drop_unmapped(),
        }
    }

    /// The mapped pages picked by `idx` (the `i`-th, modulo), at most 8.
    fn picked(&self, idx: &[u8]) -> Vec<usize> {
        let mapped: Vec<usize> = self.addrs(0, usize::MAX, |p| p.mapped);
        if mapped.is_empty() {
            return Vec::new();
        }
        idx.iter()
            .take(8)
            .map(|&i| mapped[usize::from(i) % mapped.len()])
            .collect()
    }

    /// Segment `id` of `frames` under checksums `sums` offered to the core; if taken,
    /// the fake serves its frames.
    fn add_segment(&mut self, id: u64, frames: &[Vec<u8>], sums: &[u32]) {
        let held = self.core.frames().segment(id).is_some();
        match self.core.add_segment(id, sums) {
            Some(f0) => {
                assert!(!held && self.core.in_domain(), "segment {id} taken twice");
                assert!(is_domain(f0), "segment {id} at pool frame {f0}");
                let n = frames.len() as u32;
                assert!(
                    self.core.mem.segments.range(f0..f0 + n).next().is_none()
                        && self
                            .core
                            .mem
                            .segments
                            .range(..f0)
                            .next_back()
                            .is_none_or(|(&s0, &(m, _))| s0 + m <= f0),
                    "segment {id} at {f0} overlaps another"
                );
                self.core.mem.fake.add_segment(f0, frames);
                self.core.mem.segments.insert(f0, (n, false));
                self.segs.insert(id, (f0, n));
            }
            None => {
                assert!(
                    held || !self.core.in_domain(),
                    "segment {id} refused in a domain"
                );
                // Held retired (we left the domain, or it retired it) and offered again:
                // back in use, as it was (the frames offered now are not taken).
                if let Some((f0, _)) = self.core.frames().segment(id) {
                    if !self.core.frames().retired(f0) {
                        self.core.mem.segments.get_mut(&f0).expect("served").1 = false;
                    }
                }
            }
        }
    }

    /// `drop_unmapped_segments()`, and the fake serves those segments no more (it
    /// panics if a page still maps one of their frames).
    fn drop_unmapped(&mut self) {
        for (id, f0) in self.core.drop_unmapped_segments() {
            let (g0, n) = self.segs.remove(&id).expect("a segment given");
            assert_eq!(f0, g0, "segment {id} dropped at another frame");
            let (_, retired) = self.core.mem.segments.remove(&f0).expect("served");
            assert!(retired, "segment {id} dropped while not retired");
            // Pages still on its frames were moved there behind ksm's back (no record
            // names them): they keep their bytes, as the kernel keeps the memfd.
            for (f, g) in self.core.mem.fake.drop_segment(f0, n) {
                for x in self.core.mem.mapped.values_mut().filter(|x| **x == f) {
                    *x = g;
                }
            }
        }
    }

    /// The checks that hold after every operation.
    pub fn check(&mut self) {
        self.check_pages();
        let (fake, mapped) = (&self.core.mem.fake, &self.core.mem.mapped);
        let core = &self.core;
        let page = self.page;
        for (&a, p) in self.pages.iter_mut().filter(|(_, p)| p.mapped) {
            if fake.maps_frame(a) {
                p.cowed = false;
            }
            // Loose while it maps a frame no record names.
            let named = p.tracked && {
                let r = core.region_at(a).expect("tracked");
                let rec = r.pages[(a - r.start) / page];
                rec.state() == State::Stable && Some(&rec.frame()) == mapped.get(&a)
            };
            p.loose &= fake.maps_frame(a) && !named;
        }
    }

    fn check_pages(&self) {
        let fake = &self.core.mem.fake;
        self.core.check_invariants();
        let page = self.page;
        let mut tracked = 0;
        for r in self.core.regions() {
            for i in 0..r.pages.len() {
                let a = r.start + i * page;
                let p = self.pages.get(&a);
                assert!(
                    p.is_some_and(|p| p.tracked && p.owned == r.owned),
                    "page {a:#x} tracked by ksm (owned: {}), the model says {p:?}",
                    r.owned
                );
                tracked += 1;
            }
        }
        assert_eq!(
            tracked,
            self.pages.values().filter(|p| p.tracked).count(),
            "pages tracked"
        );
        let mut mapped_count: BTreeMap<FrameId, u32> = BTreeMap::new();
        for (&a, p) in &self.pages {
            if !p.mapped {
                assert!(p.tracked, "page {a:#x}: neither mapped nor tracked");
                assert_ne!(
                    self.rec_state(a).0,
                    State::Stable,
                    "page {a:#x} gone, still merged"
                );
                continue;
            }
            assert!(
                fake.page_bytes(a) == p.data,
                "page {a:#x} ({p:?}) reads other bytes than written"
            );
            if fake.maps_frame(a) {
                let f = self.core.mem.mapped[&a];
                // (A page moved behind ksm's back onto a dropped segment's frame keeps it:
                // the kernel keeps the segment while it is mapped.)
                assert!(
                    self.core.frames().is_live(f) || (p.loose && is_domain(f)),
                    "page {a:#x} maps frame {f}, which is free"
                );
                if !p.tracked {
                    assert!(p.loose, "page {a:#x} maps frame {f} with no record");
                }
            }
            if !p.tracked {
                continue;
            }
            let (state, frame, advised) = self.rec_state(a);
            assert_eq!(advised, p.advised, "advice of page {a:#x}");
            if fake.maps_frame(a) && !p.loose {
                let f = self.core.mem.mapped[&a];
                assert_eq!(state, State::Stable, "page {a:#x} maps frame {f} untracked");
                assert_eq!(frame, f, "page {a:#x} maps another frame than recorded");
                assert!(advised, "unadvised page {a:#x} maps frame {f}");
                *mapped_count.entry(f).or_default() += 1;
            }
            if state == State::Zero {
                // Still the zero page, or written since (the next visit sees it present).
                assert!(
                    !fake.maps_frame(a) && (p.data.iter().all(|&b| b == 0) || fake.is_anon(a)),
                    "page {a:#x} recorded as the zero page but is not"
                );
            }
            if state == State::Stable {
                assert!(
                    fake.maps_frame(a) || p.cowed,
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
        for (&f, &n) in &mapped_count {
            assert!(
                self.core.frames().refs(f) >= n,
                "frame {f} mapped more than referenced"
            );
        }
        // Free offsets reserved for a child hold no bytes but count as live.
        let reserved = self.core.mem.child.values().filter(|b| b.is_none()).count();
        // Segments' frames are the domain's, not counted live.
        for (&id, &(f0, n)) in &self.segs {
            assert_eq!(
                self.core.frames().segment(id),
                Some((f0, n)),
                "segment {id} forgotten without being dropped"
            );
        }
        assert_eq!(
            fake.pool_frames_held() + reserved,
            self.core.frames().live() as usize,
            "frames holding bytes vs live frames"
        );
        for (&f, bytes) in &self.core.mem.child {
            assert!(
                fake.frame_bytes(f) == bytes.as_deref(),
                "child's frame {f} changed"
            );
        }
        let k = self.core.counters();
        assert!(k.rmap_items >= k.pages_shared + k.pages_sharing + k.pages_unshared);
    }

    /// Everything is unmapped, ksm's memory closed, suspects looked for and the child
    /// gone: no frame may be left (a leak: a suspect, a mark or a reference that
    /// outlives every mapping).
    fn teardown(&mut self) {
        for b in [false, true] {
            self.apply(&Op::Remove { b });
        }
        // (Ranges reach up to twice the span past BASE.)
        let end = BASE + 2 * self.span * self.page;
        for a in self.addrs(BASE, end, |p| !p.owned) {
            self.core.mem.fake.unmap(a);
            self.pages.remove(&a);
        }
        self.core.forget_unmapped(BASE, end);
        self.check();
        self.apply(&Op::FreeSuspects);
        self.apply(&Op::Quiet);
        self.check();
        self.apply(&Op::LeaveDomain);
        self.check();
        assert!(self.segs.is_empty(), "segments left: {:?}", self.segs);
        assert_eq!(self.core.regions().count(), 0, "regions left");
        assert_eq!(
            (
                self.core.frames().live(),
                self.core.mem.fake.pool_frames_held()
            ),
            (0, 0),
            "frames left when nothing is mapped"
        );
    }

    /// After `Settle`: no two advised, present pages with the same bytes are both
    /// unmerged (the kernel leaves at most one page of a content unshared), as
    /// long as frames did not run out.
    fn check_complete(&self) {
        // In a domain, contents held twice wait for the domain (a segment) instead of
        // merging onto the process's own frames: nothing to prove without the engine.
        if self.capacity != AMPLE_FRAMES || self.core.in_domain() {
            return;
        }
        let fake = &self.core.mem.fake;
        let mut unmerged: HashMap<&[u8], usize> = HashMap::new();
        for (&a, p) in &self.pages {
            if !p.mapped
                || !p.tracked
                || !p.advised
                || !p.written
                || fake.maps_frame(a)
                || self.rec_state(a).0 == State::Zero
                // Dropped to the zero page (and its record since forgotten by an
                // unmerge): holds no memory, nothing to merge.
                || !fake.is_anon(a)
            {
                continue;
            }
            if let Some(other) = unmerged.insert(&p.data[..], a) {
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

/// Run one input: every operation, each followed by the checks, then the teardown.
pub fn run(input: &Input) {
    let mut h = Harness::new(&input.setup);
    h.check();
    for op in &input.ops {
        h.apply(op);
        h.check();
    }
    h.teardown();
}

/// Run raw fuzzer bytes (for use without libFuzzer).
pub fn run_bytes(data: &[u8]) {
    if let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) {
        run(&input);
    }
}

/// An input drawn from `rng` with the operations weighted towards those that make
/// merges (writes of a few patterns, copies of a few pages with a difference, advice,
/// scans): random bytes rarely get far enough for runs with covered pages, or for
/// forks, moves and unmaps over merged memory, and the libFuzzer-free runs (`cargo
/// test`) have no coverage feedback to get there.
pub fn weighted_input(rng: &mut crate::XorShift, nops: usize) -> Input {
    let mut byte = || rng.next_u64() as u8;
    let setup = Setup {
        big_pages: byte() % 4 == 0,
        pages_a: byte(),
        pages_b: byte(),
        gap: byte(),
        pages_c: byte(),
        small_capacity: (byte() % 8 == 0).then(&mut byte),
        max_page_sharing: (byte() % 4 == 0).then(&mut byte),
        write_tracking: byte() % 2 == 0,
    };
    let mut ops = Vec::with_capacity(nops);
    while ops.len() < nops {
        let r = rng.next_u64();
        let (x, y, z) = ((r >> 8) as u8, (r >> 16) as u8, (r >> 24) as u8);
        let flag = (r >> 32) & 1 == 1;
        // One operation in eight is a merge domain's.
        if (r >> 61) == 0 {
            let picks = [x, y, z, x.wrapping_add(1), y.wrapping_add(1)];
            let n = 1 + (r >> 40) as usize % picks.len();
            ops.push(match (r >> 8) % 16 {
                0..=1 => Op::JoinDomain,
                2 => Op::LeaveDomain,
                3 => Op::DomainConnected,
                4..=7 => Op::AddSegment {
                    id: z,
                    pages: picks[..n].to_vec(),
                    lie: (r >> 48).is_multiple_of(4).then_some((y, z)),
                },
                8..=9 => Op::RetireSegment { id: y, held: flag },
                10..=11 => Op::DomainWants {
                    pages: picks[..n].to_vec(),
                    any: None,
                    members: y % 40,
                },
                12..=14 => Op::TakeDomainOut { echo: flag },
                _ => Op::DropUnmapped,
            });
            continue;
        }
        ops.push(match r % 100 {
            0..=19 => Op::Fill {
                page: x,
                pattern: y,
            },
            20..=26 => {
                // A copy of up to 6 pages `y` pages further on, one page differing.
                let n = 2 + z % 5;
                let odd = (r >> 40) as u8 % (n + 2);
                for j in 0..n {
                    let p = (r >> (44 + 3 * u32::from(j))) as u8;
                    ops.push(Op::Fill {
                        page: x.wrapping_add(j),
                        pattern: p,
                    });
                    ops.push(Op::Fill {
                        page: x.wrapping_add(y).wrapping_add(j),
                        pattern: p.wrapping_add(u8::from(j == odd)),
                    });
                }
                continue;
            }
            27..=29 => Op::Poke {
                page: x,
                offset: u16::from(y),
                value: z,
            },
            30..=31 => Op::Touch { page: x },
            32..=41 => Op::Advise { first: x, len: y },
            42..=44 => Op::Unadvise {
                first: x,
                len: y,
                fail: flag,
            },
            45..=46 => Op::UnmergeRange {
                first: x,
                len: y,
                fail: flag,
            },
            47 => Op::UnmergeAll { fail: flag },
            48..=55 => Op::ScanBatch { budget: x },
            56..=65 => Op::ScanFull,
            66..=69 => Op::Settle,
            70 => Op::ToggleFailMap,
            71..=73 => Op::Fork,
            74..=75 => Op::Quiet,
            76 => Op::Remove { b: flag },
            77..=78 => Op::AddBack { b: flag },
            79..=80 => Op::Munmap { first: x, len: y },
            81..=82 => Op::MapFresh { first: x, len: y },
            83..=86 => Op::Mremap {
                first: x,
                len: y,
                dest: z,
            },
            87..=89 => Op::Vanish {
                page: x,
                moved: flag,
            },
            90..=92 => Op::FreeSuspects,
            93 => Op::WriteTracking { on: flag },
            94 => Op::MaxPageSharing { n: x },
            95 => Op::VmaBudget {
                n: flag.then_some(x),
            },
            96 => Op::RefreshVma,
            97 => Op::ZeroPages { on: flag },
            98 => Op::SmartScan { on: flag },
            _ => Op::ToggleFailMap,
        });
    }
    Input { setup, ops }
}
