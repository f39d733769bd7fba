//! The OS backend: [`Os`], the real [`Mem`] of the algorithm: userfaultfd
//! write-protection, the memfd pool, pagemap, and the remapping syscalls, in the
//! order the prototype proved race-free (docs/design.md, "The mechanism"):
//!
//! 1. `UFFDIO_WRITEPROTECT` the page (a writer now blocks in the fault thread);
//! 2. compare the page with the frame byte for byte (done by `scan::Core`);
//! 3. equal: `mmap(MAP_PRIVATE|MAP_FIXED)` the frame over it, register the new
//!    VMA with the userfaultfd, then `UFFDIO_WAKE`; a blocked writer retries on
//!    the new mapping and the kernel gives it a private copy;
//!    not equal: unprotect, which also wakes.
//!
//! Why the fault thread ignores faults inside an open window: it must never
//! unprotect a page under merge (the write would land on the page about to be
//! replaced and be lost). The merger wakes such writers itself when it closes
//! the window. A write-protect fault outside every window is stale protection
//! (a path that could not release it): the fault thread removes it, which also
//! wakes the writer. The window list is checked and acted on under one lock,
//! which `protect` also takes to publish a window before protecting.
//!
//! The windows and the event log shared with the fault threads are in `windows`;
//! this file holds `Os` itself.

#![forbid(unsafe_code)]

mod windows;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;

use crate::pool::{FrameId, Pool};
use crate::region::maps;
use crate::scan::{Mem, Presence};
use crate::sys::mman::{self, Mapping};
use crate::sys::pagemap::{
    PageRegion, Pagemap, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED,
    PAGE_IS_WPALLOWED, PAGE_IS_WRITTEN, PM_FILE, PM_PRESENT, PM_SWAP,
};
use crate::sys::procmem;
use crate::sys::uffd::{self, Uffd, Window};
pub use windows::{own_event_or_disturb, Event, EventLog, Events, Win, Windows};

/// Unmerging a run of at most this many pages copies them by hand into scratch
/// populated beforehand: registering the scratch for `UFFDIO_COPY` (and unregistering
/// it) costs more than the zero-filling it saves on so few pages.
const COPY_BY_HAND_MAX: usize = 8;

/// The operating-system side of the algorithm.
#[derive(Debug)]
pub struct Os {
    /// The userfaultfd of memory ksm owns (events: REMOVE only, so that our own
    /// remaps there raise none and stay fast).
    pub uffd: Option<Arc<Uffd>>,
    /// The userfaultfd of memory the application owns (events: UNMAP, REMAP, REMOVE).
    pub uffd_foreign: Option<Arc<Uffd>>,
    /// Write tracking (docs/design.md, "Write tracking"): an asynchronous write-protect userfaultfd that
    /// the unmerged pages of memory ksm owns are registered with, so that a scan
    /// learns from `PAGEMAP_SCAN` which were written instead of hashing them all.
    /// Its faults are resolved by the kernel: nothing reads it.
    tracker: Option<Uffd>,
    /// Whether write tracking is wanted (`Mem::set_write_tracking`, the knob).
    tracking: bool,
    /// Output room for the write tracker's `PAGEMAP_SCAN` calls (kept between calls).
    scratch_regions: Vec<PageRegion>,
    /// The range the last `untrack_runs` for a merge took wholly out of the tracker
    /// (None once anything may have tracked memory since): `protect` of exactly that
    /// range knows that no page of it is tracked without asking pagemap again.
    untracked: Option<(usize, usize)>,
    /// The frame pool, created with the first frame.
    pub pool: Option<Pool>,
    /// The merge domain's segments this process maps (frames from `DOMAIN_BASE`).
    pub segments: crate::pool::Segments,
    frame_capacity: u32,
    pub windows: &'static Windows,
    pub events: &'static Events,
    /// `/proc/self/pagemap` (None if it could not be opened: nothing is scanned).
    pagemap: Option<Pagemap>,
    page: usize,
    /// Memory allocated by `ksm.mmap`, by start address.
    owned: BTreeMap<usize, Mapping>,
    open: HashMap<usize, Window>,
    pm: Vec<u64>,
    regions: Vec<PageRegion>,
    /// Whether PAGEMAP_SCAN works here (it tells the zero page apart).
    pagemap_scan: bool,
    /// VMAs of the process when last counted.
    pub vmas_used: u64,
    /// VMAs of `vm.max_map_count` kept for the application (the `vma_reserve` knob).
    pub vma_reserve: u64,
    /// The most VMAs merging lets the process have (`vm.max_map_count - vma_reserve`)
    /// when last counted.
    pub vma_budget: u64,
    /// Threads an unmerge's copy of a long run is spread over (the cores available;
    /// filling a run's frames in parts measured no faster: shmem's page cache).
    pub copy_threads: usize,
    /// A page nobody can read, for `Uffd::prepare_anon_vma`.
    unreadable: Option<Mapping>,
    /// CPU time the threads `checksums` started have used (nanoseconds), taken by the
    /// engine into the scanner's CPU time after each batch.
    pub helper_cpu_ns: u64,
    /// `checksums` calls still to make on one thread, and how many the next time the
    /// threads come late (see `sys::Helped::late`).
    hash_backoff: (u32, u32),
}

/// The fewest pages each thread of `Os::checksums` must have for threads to start:
/// starting one costs 30–140 µs here, hashing 1024 pages of `ksm.mmap` memory about
/// 200 µs, of other memory 0.4–0.5 ms (read 64 at a time).
const SUM_PART_MIN: usize = 1024;

/// The mapping of `owned` (memory ksm allocated, by start address) holding `addr`.
fn owned_in(owned: &BTreeMap<usize, Mapping>, addr: usize) -> Option<&Mapping> {
    owned
        .range(..=addr)
        .next_back()
        .map(|(_, m)| m)
        .filter(|m| addr < m.addr() + m.len())
}

impl Os {
    /// Put the covered pages' own bytes into `scratch` (a private mapping of frames
    /// that nothing reads yet) with `UFFDIO_COPY`, through the userfaultfd of memory
    /// ksm owns (whose events leave the scratch's unmapping alone). `Ok(false)` if not
    /// every page could be placed: the caller copies them all by hand then (over a
    /// page placed here, the same bytes). An error if the scratch could not leave the
    /// userfaultfd: a fault there would wait for a fault thread that does not answer
    /// for it, so the scratch must be dropped untouched (the merge fails, nothing
    /// changed).
    fn place_covered(&self, scratch: &Mapping, covered: &[(usize, Vec<u8>)]) -> io::Result<bool> {
        let page = self.page;
        let Some(u) = self.uffd.as_ref() else {
            return Ok(false);
        };
        if u.register_missing(scratch.addr(), scratch.len()).is_err() {
            return Ok(false);
        }
        let placed = covered.iter().all(|(i, bytes)| {
            bytes.len() == page
                && u.copy(scratch.addr() + i * page, bytes.as_ptr() as usize, page)
                    .is_ok()
        });
        u.unregister(scratch.addr(), scratch.len())?;
        Ok(placed)
    }

    /// Serve domain frames from `f0` (a block start) from segment `seg`.
    pub fn add_segment(&mut self, f0: FrameId, seg: crate::domain::client::SegmentView) {
        self.segments.add(f0, seg);
    }

    /// Unmap the segment at `f0` (no page of ours maps it any more).
    pub fn drop_segment(&mut self, f0: FrameId) {
        self.segments.remove(f0);
    }

    /// Cannot fail: it allocates nothing big (the pool comes with the first frame), so
    /// that a forked child can always rebuild its engine.
    /// `vma_reserve`: the `vma_reserve` knob's value (its default until the engine
    /// applies its knobs).
    pub fn new(
        frame_capacity: u32,
        windows: &'static Windows,
        events: &'static Events,
        vma_reserve: u64,
    ) -> Self {
        Os {
            uffd: None,
            uffd_foreign: None,
            tracker: None,
            tracking: true,
            scratch_regions: Vec::new(),
            untracked: None,
            pool: None,
            segments: crate::pool::Segments::default(),
            frame_capacity,
            windows,
            events,
            pagemap: Pagemap::open().ok(),
            page: crate::sys::page_size(),
            owned: BTreeMap::new(),
            open: HashMap::new(),
            pm: Vec::new(),
            regions: Vec::new(),
            pagemap_scan: true,
            vmas_used: 0,
            vma_reserve,
            vma_budget: 0,
            copy_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            unreadable: Mapping::inaccessible(crate::sys::page_size()).ok(),
            helper_cpu_ns: 0,
            hash_backoff: (0, 1),
        }
    }

    /// Take ownership of a `ksm.mmap` allocation.
    pub fn adopt(&mut self, m: Mapping) {
        self.owned.insert(m.addr(), m);
    }

    /// Give back the mapping starting at `addr` (dropping it unmaps).
    pub fn disown(&mut self, addr: usize) -> Option<Mapping> {
        self.owned.remove(&addr)
    }

    fn owned_at(&self, addr: usize) -> Option<&Mapping> {
        owned_in(&self.owned, addr)
    }

    /// The userfaultfd `addr` is (to be) registered with: ours for owned memory.
    fn uffd(&self, addr: usize) -> io::Result<&Uffd> {
        let u = if self.owned_at(addr).is_some() {
            &self.uffd
        } else {
            &self.uffd_foreign
        };
        u.as_deref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// The write tracker, opened on first use; None where tracking is off or the
    /// kernel lacks asynchronous write-protection.
    fn tracker(&mut self) -> Option<&Uffd> {
        if self.tracker.is_none() && self.tracking && self.pagemap_scan {
            self.tracker = Uffd::open(uffd::FEATURE_WP_ASYNC | uffd::FEATURE_WP_UNPOPULATED)
                .ok()
                .filter(|u| u.features() & uffd::FEATURE_WP_ASYNC != 0);
            if self.tracker.is_none() {
                self.tracking = false;
            }
        }
        self.tracker.as_ref().filter(|_| self.tracking)
    }

    /// Track writes to `[addr, addr+len)`, anonymous memory ksm owns that is registered
    /// with no userfaultfd: register it with the tracker and write-protect it
    /// (asynchronously: a write just marks the page written). False if not tracked.
    pub fn track(&mut self, addr: usize, len: usize) -> bool {
        self.untracked = None;
        if self.owned_at(addr).is_none() {
            return false;
        }
        let Some(t) = self.tracker() else {
            return false;
        };
        if t.register_wp(addr, len).is_err() {
            return false;
        }
        if t.writeprotect(addr, len, true).is_err() {
            let _ = t.unregister(addr, len);
            return false;
        }
        true
    }

    /// Register a range we just remapped: merged pages (pool mappings) in write-protect
    /// and minor mode; unmerged memory ksm owns with the write tracker where it is on;
    /// anything else (or without minor-fault support) write-protect only.
    fn register_new(&mut self, addr: usize, len: usize, merged: bool) {
        if !merged && self.track(addr, len) {
            return;
        }
        let Ok(u) = self.uffd(addr) else { return };
        let minor = merged && u.register_wp_minor(addr, len).is_ok();
        if !minor {
            let _ = u.register_wp(addr, len);
        }
        if merged && !(minor && self.prepare_merged(addr)) {
            if let (Ok(u), Some(src)) = (self.uffd(addr), self.unreadable.as_ref()) {
                u.prepare_anon_vma(addr, self.page, src.addr());
            }
        }
    }

    /// Register the new pool mapping `[addr, addr+len)` (no PTE yet, readable, inside
    /// its merge window) in write-protect and minor mode, then give its pages their PTEs
    /// with one `UFFDIO_CONTINUE`, which prepares the mapping's `anon_vma` on the way:
    /// what `populate_read`, `register_new` and `prepare_merged` do with three calls.
    /// False, with the range registered with nothing, if that could not be done: the
    /// caller takes the long way (a page left without a PTE must not stay registered
    /// in minor mode, see `map_frames`).
    ///
    /// A page the application discards between registration and CONTINUE is logged by
    /// the fault thread before the discard takes effect, so that CONTINUE may map its
    /// frame again after it: such pages lose their PTE again here, and read zeros.
    fn map_in_registered(&mut self, addr: usize, len: usize) -> bool {
        let Ok(u) = self.uffd(addr) else {
            return false;
        };
        if u.register_wp_minor(addr, len).is_err() {
            return false;
        }
        if crate::sys::inject::check(crate::sys::inject::Point::DiscardBeforeContinue).is_err() {
            if let Some(w) = self.open.get(&addr) {
                let _ = mman::discard_in(w, addr, len);
            }
        }
        let Ok(u) = self.uffd(addr) else {
            return false;
        };
        if u.populate_minor(addr, len).is_err() {
            let _ = u.unregister(addr, len);
            return false;
        }
        let end = addr + len;
        let discarded: Vec<(usize, usize)> = self
            .events
            .lock()
            .removed
            .iter()
            .filter(|&&(s, e)| s < end && addr < e)
            .map(|&(s, e)| (s.max(addr), e.min(end)))
            .collect();
        if let Some(w) = self.open.get(&addr) {
            for (s, e) in discarded {
                let _ = mman::discard_in(w, s, e - s);
            }
        }
        true
    }

    /// Give the new pool mapping at `addr` (populated, registered in minor mode, inside
    /// its merge window) its `anon_vma` with a `UFFDIO_CONTINUE` of its first page: the
    /// kernel prepares the `anon_vma` of a private mapping first, then finds the PTE in
    /// place and answers EEXIST, changing nothing (cheaper than `prepare_anon_vma`: no
    /// page allocated, no fault taken). False if that did not happen (no minor mode).
    ///
    /// Had the page lost its PTE since it was populated, CONTINUE maps its frame again,
    /// as populating did. If it lost it to the application's `MADV_DONTNEED` (logged by
    /// the fault thread before the discard takes effect, so seen here), the page must
    /// read zeros: its PTE is dropped again, and the fault thread answers its next
    /// access with zeros.
    fn prepare_merged(&mut self, addr: usize) -> bool {
        let Ok(u) = self.uffd(addr) else {
            return false;
        };
        match u.continue_minor(addr, self.page, false) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => true,
            Err(_) => false,
            Ok(()) => {
                if self.events.lock().is_removed(addr) {
                    if let Some(w) = self.open.get(&addr) {
                        let _ = mman::discard_in(w, addr, self.page);
                    }
                }
                true
            }
        }
    }

    /// Hand over every `ksm.mmap` allocation (to the engine of a forked child).
    pub fn take_owned(&mut self) -> BTreeMap<usize, Mapping> {
        std::mem::take(&mut self.owned)
    }

    /// The VMA budget (docs/design.md, "VMAs and the budget") for a process with `used` VMAs: merging may add
    /// VMAs while the process, counting what it already has, stays under
    /// vm.max_map_count minus `vma_reserve` (by default half of the limit), so that
    /// the application's own mmap/munmap/malloc never start failing because of us.
    pub fn vma_allowance_for(&mut self, used: u64) -> u64 {
        let limit = maps::max_map_count().unwrap_or(65530);
        self.vmas_used = used.min(limit);
        self.vma_budget = limit.saturating_sub(self.vma_reserve);
        self.vma_budget.saturating_sub(used)
    }

    /// Unregister the runs of `[addr, addr+len)` that the write tracker holds, exactly
    /// those (the kernel refuses, or before Linux 6.17 does wrongly, an unregister
    /// whose range holds a VMA of another userfaultfd); `for_merge`: register each
    /// straight with the synchronous userfaultfd that `protect` needs (best effort:
    /// `protect` registers what this leaves out).
    fn untrack_runs(&mut self, addr: usize, len: usize, for_merge: bool) -> io::Result<()> {
        self.untracked = None;
        if self.owned_at(addr).is_none() || self.tracker.is_none() {
            return Ok(());
        }
        let mut runs = std::mem::take(&mut self.scratch_regions);
        let r = self
            .tracked_runs(addr, addr + len, &mut runs)
            .and_then(|()| {
                let t = self.tracker.as_ref().expect("checked above");
                runs.iter().try_for_each(|r| {
                    let (s, l) = (r.start as usize, (r.end - r.start) as usize);
                    t.unregister(s, l)?;
                    if let (true, Some(u)) = (for_merge, &self.uffd) {
                        let _ = u.register_wp(s, l);
                    }
                    Ok(())
                })
            });
        self.scratch_regions = runs;
        // Every run the tracker held in the range is unregistered: none of it is tracked.
        if r.is_ok() && for_merge {
            self.untracked = Some((addr, len));
        }
        r
    }

    /// The runs of `[start, end)` registered with the write tracker.
    fn tracked_runs(&self, start: usize, end: usize, out: &mut Vec<PageRegion>) -> io::Result<()> {
        let pm = self
            .pagemap
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        if pm.tracked(start, end, out)? != end {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        Ok(())
    }

    /// Give the page at `addr` (of a pool mapping, with no PTE) an anonymous page of
    /// zeros, as the fault thread would on its first access (EEXIST if it has one).
    pub fn fill_zero_page(&self, addr: usize) -> io::Result<()> {
        self.uffd(addr)?.fill_zeros(addr, self.page, false)
    }

    /// The runs of `[start, end)` that may read other than zeros: present pages but the
    /// shared zero page, and swapped ones (a write tracker's marker shows as swapped too:
    /// counted, to be safe). Pages with no PTE in an anonymous mapping read as zeros.
    /// Needs `PAGEMAP_SCAN` (ENOTTY before Linux 6.7).
    pub fn maybe_nonzero_runs(
        &mut self,
        start: usize,
        end: usize,
    ) -> io::Result<Vec<(usize, usize)>> {
        let pagemap = self
            .pagemap
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        if !self.pagemap_scan {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        if pagemap.scan(start, end, 0, &mut self.regions)? != end {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        let mut out: Vec<(usize, usize)> = Vec::new();
        for r in self
            .regions
            .iter()
            .filter(|r| r.categories & PAGE_IS_PFNZERO == 0)
        {
            let (s, e) = (r.start as usize, r.end as usize);
            match out.last_mut() {
                Some(last) if last.1 == s => last.1 = e,
                _ => out.push((s, e)),
            }
        }
        Ok(out)
    }

    /// Read pagemap for one page (for `page_state`).
    pub fn presence(&mut self, addr: usize) -> Presence {
        let mut p = [Presence::Absent];
        let _ = self.probe(addr, &mut p);
        p[0]
    }

    /// `probe`; `extra`: the categories also asked of `PAGEMAP_SCAN` (`PAGE_IS_FILE`
    /// to tell pages mapping a file, a frame, from anonymous ones), left in
    /// `self.regions`.
    fn probe_with(&mut self, addr: usize, out: &mut [Presence], extra: u64) -> io::Result<()> {
        let end = addr + out.len() * self.page;
        let pagemap = self
            .pagemap
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
        if self.pagemap_scan {
            match pagemap.scan(addr, end, extra, &mut self.regions) {
                Ok(walk_end) if walk_end == end => {
                    out.fill(Presence::Absent);
                    for r in &self.regions {
                        // The shared zero page (read, never written) holds no memory and is
                        // not an anonymous page: the kernel's ksmd skips it too.
                        let tracked_marker = r.categories
                            & (PAGE_IS_WPALLOWED | PAGE_IS_SWAPPED | PAGE_IS_PRESENT)
                            == PAGE_IS_WPALLOWED | PAGE_IS_SWAPPED;
                        let p = if r.categories & PAGE_IS_PFNZERO != 0 {
                            Presence::Absent
                        } else if tracked_marker {
                            // The write tracker's marker on a page with no PTE (never
                            // written, or dropped to the zero page) shows as swapped: no
                            // page there. (A tracked page really swapped out is passed over
                            // as well, as the kernel's ksmd passes over swapped pages; no
                            // merged page is ever tracked.)
                            Presence::Absent
                        } else if r.categories & PAGE_IS_FILE != 0
                            && r.categories & PAGE_IS_PRESENT != 0
                        {
                            Presence::File
                        } else {
                            Presence::Anon
                        };
                        let (s, e) = (
                            (r.start as usize - addr) / self.page,
                            (r.end as usize - addr) / self.page,
                        );
                        out[s..e].fill(p);
                    }
                    return Ok(());
                }
                // Stopped early (cannot happen with one slot per page) or not supported
                // (ENOTTY before Linux 6.7): use plain pagemap from now on.
                Ok(_) => {}
                Err(_) => self.pagemap_scan = false,
            }
        }
        self.pm.resize(out.len(), 0);
        pagemap.read(addr, &mut self.pm)?;
        for (o, &e) in out.iter_mut().zip(&self.pm) {
            *o = if e & PM_PRESENT != 0 {
                if e & PM_FILE != 0 {
                    Presence::File
                } else {
                    Presence::Anon
                }
            } else if e & PM_SWAP != 0 {
                // A swapped page is a private anonymous page.
                Presence::Anon
            } else {
                Presence::Absent
            };
        }
        Ok(())
    }
}

impl Mem for Os {
    fn page_size(&self) -> usize {
        self.page
    }

    fn probe(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()> {
        self.probe_with(addr, out, PAGE_IS_FILE)
    }

    fn probe_anonymous(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()> {
        self.probe_with(addr, out, 0)
    }

    fn probe_tracked(
        &mut self,
        addr: usize,
        out: &mut [Presence],
        tracked: &mut [bool],
        unchanged: &mut [bool],
        frames: bool,
    ) -> io::Result<()> {
        tracked.fill(false);
        unchanged.fill(false);
        let end = addr + out.len() * self.page;
        // First the written pages, write-protected again in the same step (a write
        // from now on shows at the next scan), then which pages are tracked at all.
        let mut written = std::mem::take(&mut self.scratch_regions);
        let took = match (&self.tracker, &self.pagemap) {
            (Some(_), Some(pm)) if self.tracking && self.pagemap_scan => {
                pm.take_written(addr, end, &mut written).ok() == Some(end)
            }
            _ => false,
        };
        // A page in a pool mapping is in a VMA registered with the synchronous
        // userfaultfd: `take_written` passed it over, and it is not `WPALLOWED` below.
        // A private copy there (see `Mem::track_covered`) is tracked while its PTE stays
        // write-protected: a write to it faults first, and the fault thread unprotects.
        let extra = if frames {
            PAGE_IS_FILE | PAGE_IS_WRITTEN
        } else {
            0
        };
        let r = self.probe_with(addr, out, extra);
        if took && r.is_ok() && self.pagemap_scan {
            for reg in &self.regions {
                let (s, e) = (
                    (reg.start as usize - addr) / self.page,
                    (reg.end as usize - addr) / self.page,
                );
                let c = reg.categories;
                let protected_copy = frames
                    && c & (PAGE_IS_WPALLOWED | PAGE_IS_FILE | PAGE_IS_WRITTEN | PAGE_IS_PRESENT)
                        == PAGE_IS_PRESENT;
                if c & PAGE_IS_WPALLOWED != 0 || protected_copy {
                    tracked[s..e].fill(true);
                }
            }
            for (i, (t, u)) in tracked.iter().zip(unchanged.iter_mut()).enumerate() {
                *u = *t && out[i] == Presence::Anon;
            }
            for reg in &written {
                let (s, e) = ((reg.start as usize).max(addr), (reg.end as usize).min(end));
                unchanged[(s - addr) / self.page..(e.max(s) - addr) / self.page].fill(false);
            }
        }
        self.scratch_regions = written;
        r
    }

    /// On: memory ksm owns registered from now on is tracked (advised, or given
    /// anonymous memory again by an unmerge), where the kernel offers
    /// `UFFD_FEATURE_WP_ASYNC`. Off: nothing is trusted; `Core::set_write_tracking`
    /// unregisters what is tracked.
    fn set_write_tracking(&mut self, on: bool) {
        self.tracking = on;
    }

    fn write_tracking(&self) -> bool {
        self.tracking
    }

    fn untrack(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.untrack_runs(addr, len, false)
    }

    fn untrack_for_merge(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.untrack_runs(addr, len, true)
    }

    fn track_covered(&mut self, addr: usize, len: usize) -> io::Result<()> {
        if !self.tracking || !self.pagemap_scan || self.owned_at(addr).is_none() {
            return Ok(());
        }
        // Not a window: a write from now on faults, and the fault thread unprotects
        // the page at once (its writer goes on); `probe_tracked` then sees it written.
        self.uffd(addr)?.writeprotect(addr, len, true)
    }

    fn retrack(&mut self, addr: usize, len: usize) {
        // The tracker is opened here if it never was (tracking switched on after
        // memory was registered).
        if self.owned_at(addr).is_none() || self.tracker().is_none() {
            return;
        }
        // Back from the synchronous userfaultfd (or from none, after tracking was
        // switched off) to the tracker: the VMA joins its tracked neighbours again.
        // Should registering fail, it stays synchronous.
        match self.uffd.clone() {
            Some(u) => {
                if u.unregister(addr, len).is_ok() && !self.track(addr, len) {
                    let _ = u.register_wp(addr, len);
                }
            }
            None => {
                self.track(addr, len);
            }
        }
    }

    fn read(&mut self, addr: usize, owned: bool, buf: &mut [u8]) -> io::Result<()> {
        match self.owned_at(addr) {
            Some(m) if owned => {
                m.copy_out(addr - m.addr(), buf);
                Ok(())
            }
            _ => procmem::read_foreign(addr, buf),
        }
    }

    /// Pages spread over up to `threads` threads ([`crate::sys::map_parts`]); memory ksm
    /// owns is copied out of its mapping (nothing unmaps it while the state lock is
    /// held), other memory read fault-safely, up to 64 consecutive pages with one call.
    fn checksums(
        &mut self,
        addrs: &[usize],
        owned: bool,
        threads: usize,
        sum: fn(&[u8]) -> u32,
        out: &mut [Option<u32>],
    ) {
        let page = self.page;
        let mappings = &self.owned;
        // Pages of ksm.mmap memory are copied out one at a time, others read `most` at a time.
        let most = match owned {
            true => 1,
            false => procmem::MAX_PAGES_AT_ONCE.min(addrs.len()),
        };
        let scratch = || vec![0u8; most * page];
        let part = |buf: &mut Vec<u8>, addrs: &[usize], out: &mut [Option<u32>]| {
            let mut i = 0;
            while i < addrs.len() {
                if let Some(m) = owned_in(mappings, addrs[i]).filter(|_| owned) {
                    let b = &mut buf[..page];
                    m.copy_out(addrs[i] - m.addr(), b);
                    out[i] = Some(sum(b));
                    i += 1;
                    continue;
                }
                // The run of consecutive pages from here, read with one call.
                let mut k = 1;
                while i + k < addrs.len() && k < most && addrs[i + k] == addrs[i] + k * page {
                    k += 1;
                }
                let read =
                    procmem::read_foreign_pages(addrs[i], page, &mut buf[..k * page]).unwrap_or(0);
                for (j, o) in out[i..i + read].iter_mut().enumerate() {
                    *o = Some(sum(&buf[j * page..(j + 1) * page]));
                }
                i += read;
                if read < k {
                    // The page that stopped the run, alone (see `read_foreign`).
                    let b = &mut buf[..page];
                    out[i] = procmem::read_foreign(addrs[i], b).ok().map(|()| sum(b));
                    i += 1;
                }
            }
        };
        // Threads that came late (a busy core) are not waited for again at once: the
        // next calls go without, twice as many each time they come late again.
        let threads = match self.hash_backoff.0 {
            0 => threads,
            _ => {
                self.hash_backoff.0 -= 1;
                1
            }
        };
        let helped = crate::sys::map_parts(addrs, out, (threads, SUM_PART_MIN), scratch, part);
        self.helper_cpu_ns += helped.cpu_ns;
        if helped.late() {
            self.hash_backoff = (self.hash_backoff.1, (self.hash_backoff.1 * 2).min(64));
        } else if helped.threads > 0 {
            self.hash_backoff = (0, 1);
        }
    }

    fn frame(&self, f: FrameId) -> &[u8] {
        if crate::pool::is_domain(f) {
            return self.segments.frame(f, self.page);
        }
        self.pool
            .as_ref()
            .expect("a frame exists only once the pool does")
            .frame(f)
    }

    fn equals(&mut self, addr: usize, owned: bool, data: &[u8]) -> io::Result<bool> {
        match self.owned_at(addr) {
            Some(m) if owned => Ok(m.equals(addr - m.addr(), data)),
            _ => {
                let mut buf = vec![0u8; data.len()];
                procmem::read_foreign(addr, &mut buf)?;
                Ok(buf == data)
            }
        }
    }

    fn equals_frame(&mut self, addr: usize, owned: bool, f: FrameId) -> io::Result<bool> {
        let frame = self.frame(f);
        match self.owned_at(addr) {
            Some(m) if owned => Ok(m.equals(addr - m.addr(), frame)),
            _ => {
                let mut buf = vec![0u8; self.page];
                procmem::read_foreign(addr, &mut buf)?;
                Ok(buf == frame)
            }
        }
    }

    fn same_pages(&mut self, a: usize, a_owned: bool, b: usize, b_owned: bool) -> io::Result<bool> {
        if let (Some(ma), Some(mb), true, true) =
            (self.owned_at(a), self.owned_at(b), a_owned, b_owned)
        {
            return Ok(ma.equals_at(a - ma.addr(), mb, b - mb.addr(), self.page));
        }
        let mut buf = vec![0u8; self.page];
        self.read(a, a_owned, &mut buf)?;
        self.equals(b, b_owned, &buf)
    }

    fn fill_frames(&mut self, f0: FrameId, addr: usize, owned: bool, n: usize) -> io::Result<()> {
        let len = n * self.page;
        if self.pool.is_none() {
            self.pool = Some(Pool::new(self.frame_capacity, self.page)?);
        }
        let pool = self.pool.as_ref().expect("created above");
        match self.owned_at(addr) {
            Some(m) if owned && addr + len <= m.addr() + m.len() => {
                pool.write_from(f0, m, addr - m.addr(), len)
            }
            _ => {
                let mut buf = vec![0u8; self.page];
                for i in 0..n {
                    self.read(addr + i * self.page, owned, &mut buf)?;
                    self.write_frame(f0 + i as FrameId, &buf)?;
                }
                Ok(())
            }
        }
    }

    fn write_frame(&mut self, f: FrameId, data: &[u8]) -> io::Result<()> {
        if crate::pool::is_domain(f) {
            // Sealed: the kernel would refuse it too.
            return Err(io::Error::from_raw_os_error(libc::EPERM));
        }
        // The pool is created with the first frame: a process (or forked child) that
        // never merges reserves no address space for it.
        if self.pool.is_none() {
            self.pool = Some(Pool::new(self.frame_capacity, self.page)?);
        }
        self.pool.as_ref().expect("created above").write(f, data)
    }

    fn punch(&mut self, f: FrameId) -> io::Result<()> {
        if crate::pool::is_domain(f) {
            // A segment is never punched: it goes with its last mapping.
            return Ok(());
        }
        match &self.pool {
            Some(p) => p.punch(f),
            None => Ok(()),
        }
    }

    fn punch_run(&mut self, f0: FrameId, n: u32) -> io::Result<()> {
        if crate::pool::is_domain(f0) {
            return Ok(());
        }
        match &self.pool {
            Some(p) => p.punch_run(f0, n),
            None => Ok(()),
        }
    }

    fn vma_allowance(&mut self) -> u64 {
        let used = maps::count_self().unwrap_or(u64::MAX);
        self.vma_allowance_for(used)
    }

    /// Moves off retired segments may use half of `vma_reserve` past the budget: the
    /// application keeps the other half for its own mappings.
    fn move_allowance(&mut self) -> u64 {
        let used = maps::count_self().unwrap_or(u64::MAX);
        let limit = maps::max_map_count().unwrap_or(65530);
        let budget = limit.saturating_sub(self.vma_reserve);
        let line = limit.saturating_sub(self.vma_reserve / 2);
        line.saturating_sub(used.max(budget))
    }

    fn protect(&mut self, addr: usize, len: usize) -> io::Result<()> {
        // A range `untrack_runs` took wholly out of the tracker for this merge needs no
        // second look below: only `track` registers memory with the tracker, and it
        // forgets that range.
        let untracked = self.untracked.take() == Some((addr, len));
        // Publish the window before protecting, so that a fault raised the moment
        // protection lands is already recognised as ours.
        self.windows.add(addr, len);
        let u = match self.uffd(addr) {
            Ok(u) => u,
            Err(e) => {
                self.windows.remove(addr);
                return Err(e);
            }
        };
        let mut r = u.open_window(addr, len);
        if matches!(&r, Err(e) if e.raw_os_error() == Some(libc::ENOENT)) {
            // Part of the range is not registered: a VMA whose registration failed
            // after a remap, a forked child's memory, or memory the application
            // unmapped or moved (and perhaps mapped anew). The fault thread holds the
            // event log while it reads, and an munmap returns only once its event was
            // read, so the log tells the last case apart: never register that.
            if self.events.lock().vanished(addr, addr + len) {
                self.windows.remove(addr);
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            r = u
                .register_wp_minor(addr, len)
                .or_else(|_| u.register_wp(addr, len))
                .and_then(|()| u.open_window(addr, len));
        }
        // Write-protecting through our userfaultfd does not block writers in a VMA of
        // the write tracker (its faults resolve themselves): make sure none is left
        // in the window, else a write there could land between compare and remap.
        if let Ok(w) = r {
            let mut runs = Vec::new();
            let tracked = !untracked
                && self.tracker.is_some()
                && self.owned_at(addr).is_some()
                && !matches!(self.tracked_runs(addr, addr + len, &mut runs), Ok(()) if runs.is_empty());
            if tracked {
                let _ = u.close_window(w, true);
                self.windows.remove(addr);
                return Err(io::Error::from_raw_os_error(libc::EBUSY));
            }
            r = Ok(w);
        }
        match r {
            Ok(w) => {
                self.open.insert(addr, w);
                Ok(())
            }
            Err(e) => {
                // WRITEPROTECT stops at the first VMA it cannot protect, after protecting
                // those before it: unprotect page by page (which also wakes), so that no
                // page stays protected with nobody to release it.
                for a in (addr..addr + len).step_by(self.page) {
                    let _ = u.writeprotect(a, self.page, false);
                    let _ = u.wake(a, self.page);
                }
                self.windows.remove(addr);
                Err(e)
            }
        }
    }

    fn release(&mut self, addr: usize, len: usize, unprotect: bool) {
        // Forget the window first: a fault read after this point is woken by the
        // fault thread, one read before it by the wake below; either is enough.
        self.windows.remove(addr);
        let w = self.open.remove(&addr);
        let Ok(u) = self.uffd(addr) else { return };
        match w {
            Some(w) => {
                let _ = u.close_window(w, unprotect);
            }
            None => {
                let _ = u.wake(addr, len);
            }
        }
    }

    fn release_tail(&mut self, addr: usize, len: usize, keep: usize) {
        // As in `release`: the tail leaves the window list first (a fault read after
        // this point is woken by the fault thread, one read before by the wake below).
        self.windows.shrink(addr, addr + keep);
        let u = if self.owned_at(addr).is_some() {
            self.uffd.clone()
        } else {
            self.uffd_foreign.clone()
        };
        let Some(u) = u else { return };
        match self.open.get_mut(&addr) {
            Some(w) => {
                let _ = u.shrink_window(w, keep);
            }
            None => {
                let _ = u.wake(addr + keep, len - keep);
            }
        }
    }

    fn map_frames(
        &mut self,
        addr: usize,
        n: usize,
        prot: i32,
        f0: FrameId,
        covered: &[(usize, Vec<u8>)],
    ) -> io::Result<bool> {
        let page = self.page;
        let w = self
            .open
            .get(&addr)
            .filter(|w| w.len() == n * page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // The file and offset of the run's frames: the pool's, or one domain segment's.
        let (fd, offset) = if crate::pool::is_domain(f0) {
            self.segments.backing(f0, n, page)
        } else {
            self.pool.as_ref().map(|p| (p.fd(), p.offset(f0)))
        }
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // With covered pages, the run is assembled aside (the frames, with private
        // copies of the covered pages' own bytes written in) and moved over the window
        // in one step: at no moment does a covered page show another page's bytes.
        let mut scratch_populated = false;
        let mut filled = false;
        let scratch = if covered.is_empty() {
            None
        } else {
            let s = Mapping::file_private(fd, offset, n * page)?;
            // The covered pages' bytes go in first, as anonymous pages the kernel fills
            // (`UFFDIO_COPY` into a private mapping of a memfd fills no hole of the
            // file): populating first would give each covered slot whose frame is free
            // a page of the pool (to be punched again), then a copy-on-write fault.
            let placed = self.place_covered(&s, covered)?;
            filled = !placed;
            scratch_populated = mman::populate_read(s.addr(), s.len()).is_ok();
            if !placed {
                for (i, bytes) in covered {
                    s.copy_in(i * page, bytes);
                }
            }
            if prot != libc::PROT_READ | libc::PROT_WRITE {
                mman::protect_owned(&s, prot)?;
            }
            Some(s)
        };
        // The run's pages were read under protection just before (so none lacks its
        // page now): forget their discards before the remap, not after, so that a
        // minor fault on the new mapping is never answered with zeros.
        self.events.lock().clear_removed(addr, addr + n * page);
        if !self.windows.begin_own(addr) {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        let assembled = scratch.is_some();
        let r = match scratch {
            None => mman::map_file_fixed(w, prot, fd, offset),
            Some(s) => mman::move_over(s, w),
        };
        self.windows.end_own(addr, self.events);
        r?;
        // The pages map the frames now, whatever follows. Give them their PTEs at once
        // (so that a page without one is one the application discarded, see the fault
        // thread), then register the new VMA: later merges and unmerges need it, and
        // `protect` registers it if this fails. Minor faults only where the PTEs are
        // in place: an access the kernel makes for the application (`/proc/self/mem`)
        // cannot wait for a userfaultfd, and PROT_NONE pages cannot be populated.
        let len = n * self.page;
        if !assembled && prot & libc::PROT_READ != 0 && self.map_in_registered(addr, len) {
            return Ok(filled);
        }
        // A run assembled aside was populated there (covered pages written in are
        // present too) and `mremap` moved its PTEs along; `mprotect` keeps them, but
        // without PROT_READ they cannot count as populated (as below).
        let populated = (scratch_populated && prot & libc::PROT_READ != 0)
            || mman::populate_read(addr, len).is_ok();
        self.register_new(addr, len, populated);
        Ok(filled)
    }

    fn zap(&mut self, addr: usize) -> io::Result<()> {
        let w = self
            .open
            .get(&addr)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        if !self.windows.begin_own(addr) {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        let r = mman::discard(w);
        self.windows.end_own(addr, self.events);
        r
    }

    fn unmerge_run(&mut self, addr: usize, len: usize, prot: i32, owned: bool) -> io::Result<()> {
        // The private copy's address range first: failing here changes nothing.
        let mut scratch = Mapping::anonymous(len)?;
        // The copy is made by the kernel (`UFFDIO_COPY`: each page allocated and copied
        // once, no page fault, no zero-filling) when a userfaultfd can take the scratch
        // in missing mode; otherwise by hand into scratch populated beforehand (ENOMEM
        // shows here, before anything changed, and the copy takes no fault).
        let filler = self
            .uffd
            .as_ref()
            .or(self.uffd_foreign.as_ref())
            .filter(|_| len > COPY_BY_HAND_MAX * self.page)
            .filter(|u| u.register_missing(scratch.addr(), len).is_ok())
            .cloned();
        if filler.is_none() {
            scratch.populate_write()?;
        }
        let unregister = |u: &Uffd, m: &Mapping| u.unregister(m.addr(), m.len());
        if let Err(e) = self.protect(addr, len) {
            if let Some(u) = &filler {
                let _ = unregister(u, &scratch);
            }
            return Err(e);
        }
        let result = (|| {
            let copied = match &filler {
                Some(u) => {
                    let r =
                        u.copy_parallel(scratch.addr(), addr, len, self.copy_threads, self.page);
                    // Registered, the scratch must not be touched, moved or unmapped.
                    unregister(u, &scratch)?;
                    match r {
                        // The kernel could not read the source (PROT_NONE, or a merged page
                        // it must not fault in itself): copy the rest by hand below.
                        Err(e) if e.raw_os_error() == Some(libc::EFAULT) => false,
                        r => r.map(|()| true)?,
                    }
                }
                None => false,
            };
            if !copied {
                if filler.is_some() {
                    scratch.populate_write()?;
                }
                // One copy of the whole run (one memcpy for memory ksm owns, one
                // fault-safe read for the application's).
                self.read(addr, owned, scratch.scratch_mut())?;
            }
            if prot != libc::PROT_READ | libc::PROT_WRITE {
                mman::protect_owned(&scratch, prot)?;
            }
            let w = self.open.get(&addr).expect("window opened above");
            if !self.windows.begin_own(addr) {
                return Err(io::Error::from_raw_os_error(libc::EAGAIN));
            }
            let moved = mman::move_over(scratch, w);
            self.windows.end_own(addr, self.events);
            moved?;
            // Anonymous memory now: no minor fault can happen there, no mark is needed.
            self.events.lock().clear_removed(addr, addr + len);
            // The private copies are in place; `protect` registers later if this fails.
            self.register_new(addr, len, false);
            Ok(())
        })();
        self.release(addr, len, result.is_err());
        result
    }
}
