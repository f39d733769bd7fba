//! The engine: one per process. It owns the algorithm's state behind one lock,
//! the `ksmd` scanner thread and the userfaultfd fault thread, the knobs, and
//! the fork handlers.
//!
//! Threads (docs/design.md, "Threads"):
//! * the **fault thread** reads the userfaultfd. It never takes the state lock
//!   and never the GIL: a writer blocked on a page under merge is only ever
//!   waiting for the merger, which wakes it.
//! * the **scanner thread** (`ksmd`) runs batches of `pages_to_scan` pages
//!   under the state lock and sleeps `sleep_millisecs` between them.
//! * **callers** (Python threads) take the state lock per batch, with the GIL
//!   released by the PyO3 layer.
//!
//! Fork (docs/design.md, "Fork rule"): `prepare` takes the state lock (so the
//! scanner is between batches and no page is write-protected) and the window
//! lock; `parent` releases them and records the fork in the frame table; `child`
//! rebuilds the engine: new pool, no userfaultfd (the child's copies of
//! registered ranges are unregistered by the kernel), records forgotten and
//! counters reset as the kernel resets a forked mm's, threads restarted lazily.
//!
//! This file holds the engine's lifecycle: its state and lock, ksm's own memory,
//! `madvise`, the knobs and the statistics. The rest of `impl Engine` lives with
//! its thread: `scanner` (ksmd, synchronous scans, what a full scan begins and
//! ends with), `fault` (the userfaultfds, their reader threads, and following the
//! events they log), `atfork` (the fork handlers).

#![forbid(unsafe_code)]

pub mod advisor;
mod atfork;
mod domain;
mod fault;
pub mod knobs;
mod scanner;

pub use domain::{MemberStats, SEGMENT_NAME};
mod query;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use crate::error::{Error, Result};
use crate::os::{Events, Os, Windows};
use crate::region::{maps, Region};
use crate::scan::{Core, Mem};
use crate::stats::{KsmStat, Snapshot};
use crate::sys::mman::Mapping;
use crate::sys::uffd::{self, Uffd};
use crate::sys::{self, fork};

use advisor::Advisor;
use atfork::{fork_child, fork_parent, fork_prepare};
pub use knobs::Knobs;
use knobs::{AdvisorMode, Value};

pub const MADV_MERGEABLE: i32 = 12;
pub const MADV_UNMERGEABLE: i32 = 13;

/// Frames the pool can hold: 2^24 × 4 KiB = 64 GiB of address space, reserved
/// sparsely (memory is used only by frames that hold bytes).
const FRAME_CAPACITY: u32 = 1 << 24;

/// The userfaultfd features we need (WP_UNPOPULATED: see `sys::uffd`).
const REQUIRED_FEATURES: u64 = uffd::FEATURE_PAGEFAULT_FLAG_WP | uffd::FEATURE_WP_UNPOPULATED;

/// Events of the application read by the fault threads, not yet followed.
static EVENTS: Events = Events::new();

static WINDOWS: Windows = Windows::new();
static ENGINE: OnceLock<Engine> = OnceLock::new();

/// Whether merging can work here, and if not why.
#[derive(Clone, Debug)]
pub enum Availability {
    Available { mode: uffd::Mode, features: u64 },
    Unavailable(String),
}

struct State {
    core: Core<Os>,
    knobs: Knobs,
    /// The pid that started the threads (a forked child has none).
    threads_pid: i32,
    fault_stop: Arc<AtomicBool>,
    last_quiet_check: Option<Instant>,
    /// When `free_suspects_while_idle` last read the maps.
    last_suspect_check: Option<Instant>,
    scans_since_quiet_check: u32,
    /// The scan-time advisor's memory, the start of the current full scan, and the
    /// scanner CPU time (any thread's) since the advisor's last step.
    advisor: Advisor,
    scan_started: Instant,
    scan_cpu_ns: u64,
    /// Ranges the application discarded (MADV_DONTNEED) whose merged pages still
    /// need pages of their own, with when the event was read.
    discarded: Vec<(usize, usize, Instant)>,
    /// Pages advised MADV_MERGEABLE that ksm never merges (shared, file-backed,
    /// hugetlb, locked, special): accepted as the kernel does, counted.
    unmergeable_pages: u64,
    /// The merge domain joined, if any (see `domain.rs`).
    domain: Option<crate::domain::client::Link>,
    /// Segments that could not be built or sealed since joining.
    publish_failures: u64,
    /// (segments, `domain_changes`) when the domain was last told (see `domain.rs`).
    usage_reported: (u64, u64),
    /// The report last sent with `ScanDone` (see `domain.rs`).
    usage_scan_done: Vec<crate::domain::proto::SegUsage>,
    /// Whether every segment's age in that report had reached the retirement age, and
    /// the (segments, pages) it was made from.
    usage_aged: bool,
    usage_scan_done_totals: (u64, u64),
    /// Whether a full scan changed something since the allocator was last trimmed
    /// (see `scanner.rs`).
    trim_due: bool,
    /// Full scans in a row that changed nothing in a merge domain (see
    /// `Engine::idle_pause`).
    idle_scans: u32,
}

/// The per-process engine.
pub struct Engine {
    state: Mutex<State>,
    /// Callers waiting for `state` (the scanning loops let them in between batches:
    /// the mutex is not fair, and a scanner that re-locks at once would starve them).
    waiting: AtomicUsize,
    /// The process the threads were last checked for (a forked child differs).
    pid: AtomicI32,
    /// Wakes the scanner (knob changes, new advice).
    wake: Condvar,
    /// Signalled at the end of every full scan.
    scanned: Condvar,
    /// Threads in `wait_settled` (woken by `scanned`, they still need the lock: a
    /// scanner with `sleep_millisecs = 0` hands it over after each full scan).
    settle_waiters: AtomicUsize,
}

/// `[start, end)` pieces of a madvise range and what they are.
type Pieces = Vec<(usize, usize, Piece)>;

/// Whether merging can work in this process: probed once (it cannot change).
fn availability() -> &'static Availability {
    static AVAIL: OnceLock<Availability> = OnceLock::new();
    AVAIL.get_or_init(probe_availability)
}

fn probe_availability() -> Availability {
    if let Some(v) =
        std::env::var_os("KSM_DISABLE_USERFAULTFD").filter(|v| !v.is_empty() && v != "0")
    {
        return Availability::Unavailable(format!(
            "merging is disabled by the environment variable KSM_DISABLE_USERFAULTFD={}; unset it to enable merging",
            v.to_string_lossy()
        ));
    }
    match Uffd::probe() {
        Err(e) => Availability::Unavailable(format!(
            "userfaultfd cannot be opened ({e}); give this user read-write access to /dev/userfaultfd \
             (for example `setfacl -m u:$USER:rw /dev/userfaultfd`), or allow it with \
             `sysctl vm.unprivileged_userfaultfd=1`, or run with CAP_SYS_PTRACE"
        )),
        Ok((features, _)) if features & REQUIRED_FEATURES != REQUIRED_FEATURES => Availability::Unavailable(format!(
            "this kernel's userfaultfd lacks write-protect features ksm needs \
             (UFFD_FEATURE_PAGEFAULT_FLAG_WP and UFFD_FEATURE_WP_UNPOPULATED, Linux 6.4 or later; offered features {features:#x})"
        )),
        Ok((features, mode)) => Availability::Available { mode, features },
    }
}

fn new_core() -> Core<Os> {
    let mut core = Core::new(
        Os::new(
            FRAME_CAPACITY,
            &WINDOWS,
            &EVENTS,
            u64::from(knobs::default_vma_reserve()),
        ),
        FRAME_CAPACITY,
    );
    apply_knobs(&mut core, &Knobs::default());
    core
}

/// The knobs the algorithm itself reads.
fn apply_knobs(core: &mut Core<Os>, k: &Knobs) {
    core.max_page_sharing = k.max_page_sharing;
    core.smart_scan = k.smart_scan;
    core.use_zero_pages = k.use_zero_pages;
    core.mem.vma_reserve = u64::from(k.vma_reserve);
    core.hash_threads = k.hash_threads as usize;
    if core.mem.write_tracking() != k.write_tracking {
        core.set_write_tracking(k.write_tracking);
    }
}

impl Engine {
    /// The process's engine, created on first use.
    pub fn get() -> Result<&'static Engine> {
        if let Some(e) = ENGINE.get() {
            e.after_fork_check();
            return Ok(e);
        }
        let core = new_core();
        let engine = Engine {
            state: Mutex::new(State {
                core,
                knobs: Knobs::default(),
                threads_pid: 0,
                fault_stop: Arc::new(AtomicBool::new(false)),
                last_quiet_check: None,
                last_suspect_check: None,
                scans_since_quiet_check: 0,
                advisor: Advisor::default(),
                scan_started: Instant::now(),
                scan_cpu_ns: 0,
                discarded: Vec::new(),
                unmergeable_pages: 0,
                domain: None,
                publish_failures: 0,
                usage_reported: (0, 0),
                usage_scan_done: Vec::new(),
                usage_aged: false,
                usage_scan_done_totals: (0, 0),
                trim_due: false,
                idle_scans: 0,
            }),
            wake: Condvar::new(),
            scanned: Condvar::new(),
            waiting: AtomicUsize::new(0),
            settle_waiters: AtomicUsize::new(0),
            pid: AtomicI32::new(sys::getpid()),
        };
        let _ = ENGINE.set(engine);
        fork::register(fork::Handlers {
            prepare: fork_prepare,
            parent: fork_parent,
            child: fork_child,
        })
        .map_err(|e| Error::os("pthread_atfork", 0, 0, e))?;
        Ok(ENGINE.get().expect("set above"))
    }

    /// The state lock, with the application's events followed first.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut st = self.lock_raw();
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        Self::follow_events(&mut st);
        st
    }

    fn lock_raw(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters possibly off, never memory
        // unsafe; keep serving rather than poisoning every later call.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Between two batches of a scanning loop: release the lock, let every waiting
    /// caller have it first (bounded), then take it again.
    fn pass_lock<'a>(&'a self, st: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        drop(st);
        for _ in 0..10_000 {
            if self.waiting.load(Ordering::Acquire) == 0 {
                break;
            }
            std::thread::yield_now();
        }
        let mut st = self.lock_raw();
        Self::follow_events(&mut st);
        st
    }

    pub fn availability(&self) -> Availability {
        availability().clone()
    }

    // ---- owned memory -------------------------------------------------------

    /// Allocate `len` bytes (rounded up to pages) of ksm-owned memory.
    pub fn alloc(&'static self, len: usize) -> Result<(usize, usize)> {
        let page = sys::page_size();
        if len == 0 {
            return Err(Error::Value(
                "cannot create a ksm.mmap of length 0; the length must be at least 1 byte".into(),
            ));
        }
        let len = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::Value(format!("length {len} is too large")))?;
        let m = Mapping::anonymous(len).map_err(|e| Error::os("mmap", 0, len, e))?;
        let addr = m.addr();
        let mut st = self.lock();
        // The kernel gave us this range, so anything we still track there is memory
        // the application unmapped without telling us: forget it first.
        let stale: Vec<usize> = st
            .core
            .regions()
            .filter(|r| r.start < addr + len && r.end(page) > addr)
            .map(|r| r.start)
            .collect();
        for start in stale {
            st.core.remove_vanished_region(start);
        }
        st.core.mem.adopt(m);
        st.core.add_region(Region::new(
            addr,
            len / page,
            true,
            libc::PROT_READ | libc::PROT_WRITE,
        ));
        if st.knobs.merge_any {
            drop(st);
            self.madvise(addr, len, MADV_MERGEABLE)?;
        }
        Ok((addr, len))
    }

    /// Unmap ksm-owned memory starting at `addr` (its frames are released).
    pub fn free(&self, addr: usize) {
        let mut st = self.lock();
        // Unmap first, then release the frames: no moment where a page maps a punched frame.
        drop(st.core.mem.disown(addr));
        st.core.remove_region(addr);
    }

    // ---- madvise ------------------------------------------------------------

    /// `madvise(addr, len, MADV_MERGEABLE | MADV_UNMERGEABLE)` with the kernel's errors.
    pub fn madvise(&'static self, addr: usize, len: usize, advice: i32) -> Result<()> {
        let page = sys::page_size();
        if advice != MADV_MERGEABLE && advice != MADV_UNMERGEABLE {
            return Err(Error::errno(
                libc::EINVAL,
                format!("unknown advice {advice}: ksm accepts MADV_MERGEABLE ({MADV_MERGEABLE}) and MADV_UNMERGEABLE ({MADV_UNMERGEABLE})"),
            ));
        }
        if addr % page != 0 {
            return Err(Error::errno(
                libc::EINVAL,
                format!("address {addr:#x} is not aligned to the page size ({page})"),
            ));
        }
        if len == 0 {
            return Ok(());
        }
        let end = len
            .checked_next_multiple_of(page)
            .and_then(|l| addr.checked_add(l))
            .ok_or_else(|| {
                Error::errno(
                    libc::EINVAL,
                    format!("range {addr:#x}+{len:#x} overflows the address space"),
                )
            })?;
        let mut st = self.lock();
        if advice == MADV_MERGEABLE {
            Self::ensure_uffd(&mut st)?;
        }
        let (pieces, gap) = Self::cover(&st, addr, end)?;
        for (s, e, kind) in pieces {
            match (advice, kind) {
                (MADV_MERGEABLE, Piece::Tracked) => Self::advise_tracked(&mut st, s, e)?,
                (MADV_MERGEABLE, Piece::Foreign(prot)) => {
                    Self::advise_foreign(&mut st, s, e, prot)?
                }
                (MADV_UNMERGEABLE, Piece::Tracked) => Self::unadvise(&mut st, s, e)?,
                // Memory ksm never merges (MAP_SHARED, file-backed, special): accepted,
                // nothing to do, as the kernel does; counted.
                (MADV_MERGEABLE, Piece::Never) => {
                    st.unmergeable_pages += ((e - s) / sys::page_size()) as u64
                }
                // Never-advised memory: nothing to undo.
                _ => {}
            }
        }
        if advice == MADV_MERGEABLE {
            self.wake.notify_all();
        }
        if gap {
            return Err(Error::errno(
                libc::ENOMEM,
                format!(
                    "part of {addr:#x}..{end:#x} is not mapped (the mapped parts were advised)"
                ),
            ));
        }
        Ok(())
    }

    /// Split `[addr, end)` into pieces tracked already, foreign anonymous memory
    /// (with its protection), and memory that is never merged; and whether a gap exists.
    fn cover(st: &State, addr: usize, end: usize) -> Result<(Pieces, bool)> {
        let page = sys::page_size();
        // Fast path: entirely inside tracked regions (ksm.mmap memory).
        let mut pos = addr;
        while pos < end {
            match st.core.region_at(pos) {
                Some(r) => pos = r.end(page),
                None => break,
            }
        }
        if pos >= end {
            return Ok((vec![(addr, end, Piece::Tracked)], false));
        }
        let vmas = maps::read_self()
            .map_err(|e| Error::os("reading /proc/self/maps", addr, end - addr, e))?;
        let (covered, gap) = maps::cover(&vmas, addr, end);
        let mut out = Vec::new();
        for v in covered {
            // Within a VMA, split at tracked-region boundaries.
            let mut p = v.start;
            while p < v.end {
                if let Some(r) = st.core.region_at(p) {
                    let e = r.end(page).min(v.end);
                    out.push((p, e, Piece::Tracked));
                    p = e;
                } else {
                    let next = st
                        .core
                        .regions()
                        .map(|r| r.start)
                        .filter(|&s| s > p)
                        .min()
                        .unwrap_or(v.end)
                        .min(v.end);
                    let kind = if v.eligible() {
                        Piece::Foreign(v.prot)
                    } else {
                        Piece::Never
                    };
                    out.push((p, next, kind));
                    p = next;
                }
            }
        }
        Ok((out, gap))
    }

    /// Register every tracked region overlapping `[s, e)` with the userfaultfd
    /// (merging and unmerging both need write-protection).
    fn ensure_registered(st: &mut State, s: usize, e: usize) -> Result<()> {
        let page = sys::page_size();
        let starts: Vec<(usize, bool)> = st
            .core
            .regions()
            .filter(|r| r.start < e && r.end(page) > s && !r.registered)
            .map(|r| (r.start, r.owned))
            .collect();
        for (start, owned) in starts {
            let u = Self::ensure_uffd_of(st, !owned)?;
            let len = st.core.region_at(start).expect("listed").len(page);
            // Memory ksm owns is write-tracked while unmerged (where the kernel can),
            // from the scan's first visit on (see `Region::track_pending`): until then
            // it is registered with `u`, which costs the same whatever its size. A
            // merge moves the pages it protects to `u`.
            let pending = owned
                && st.core.mem.write_tracking()
                && !st.core.has_merged_pages(start, start + len);
            u.register_wp(start, len)
                .map_err(|e| Error::os("UFFDIO_REGISTER", start, len, e))?;
            let r = st
                .core
                .regions_mut()
                .find(|r| r.start == start)
                .expect("listed");
            r.registered = true;
            r.track_pending = pending;
        }
        Ok(())
    }

    fn advise_tracked(st: &mut State, s: usize, e: usize) -> Result<()> {
        Self::ensure_registered(st, s, e)?;
        st.core.advise(s, e);
        Ok(())
    }

    fn advise_foreign(st: &mut State, s: usize, e: usize, prot: i32) -> Result<()> {
        let page = sys::page_size();
        let u = Self::ensure_uffd_of(st, true)?;
        if maps::vm_flags(s).is_ok_and(|f| {
            f.iter()
                .any(|x| maps::NEVER_MERGE_FLAGS.contains(&x.as_str()))
        }) {
            // Locked, wipe-on-fork, don't-fork or don't-dump memory: never merged.
            st.unmergeable_pages += ((e - s) / page) as u64;
            return Ok(());
        }
        match u.register_wp(s, e - s) {
            Ok(()) => {}
            // The kernel turns an allocation failure inside madvise into EAGAIN.
            Err(err) if err.raw_os_error() == Some(libc::ENOMEM) => {
                return Err(Error::errno(
                    libc::EAGAIN,
                    format!("registering {s:#x}..{e:#x}: {err}"),
                ));
            }
            // A range userfaultfd refuses (e.g. a special mapping) is accepted, never merged.
            Err(_) => {
                st.unmergeable_pages += ((e - s) / page) as u64;
                return Ok(());
            }
        }
        let mut r = Region::new(s, (e - s) / page, false, prot);
        r.registered = true;
        st.core.add_region(r);
        st.core.advise(s, e);
        Ok(())
    }

    fn unadvise(st: &mut State, s: usize, e: usize) -> Result<()> {
        let page = sys::page_size();
        // A forked child's regions are unregistered until it merges; its inherited
        // merged pages still need the write-protected unmerge.
        if st.core.has_merged_pages(s, e) {
            Self::ensure_registered(st, s, e)?;
        }
        st.core.unadvise(s, e).map_err(|err| {
            Error::errno(
                libc::EAGAIN,
                format!(
                    "could not give merged pages in {s:#x}..{e:#x} private copies ({err}); nothing was lost and the range stays mergeable{}",
                    if err.raw_os_error() == Some(libc::ENOMEM) { ": retry when memory is available" } else { "" }
                ),
            )
        })?;
        // Foreign regions with no advice left are forgotten (and unregistered).
        let idle: Vec<(usize, usize)> = st
            .core
            .regions()
            .filter(|r| !r.owned && r.start < e && r.end(page) > s && !r.any_advised())
            .map(|r| (r.start, r.len(page)))
            .collect();
        for (start, len) in idle {
            st.core.remove_region(start);
            if let Some(u) = &st.core.mem.uffd_foreign {
                let _ = u.unregister(start, len);
            }
        }
        Ok(())
    }

    // ---- knobs and statistics -----------------------------------------------

    pub fn knobs(&self) -> Knobs {
        self.lock().knobs
    }

    /// Set a knob by its sysfs name; invalid values change nothing.
    pub fn set_knob(&'static self, name: &str, value: &Value) -> Result<()> {
        let mut st = self.lock();
        let old = st.knobs;
        let mut k = old;
        k.set(name, value)?;
        let shared = st.core.counters().pages_shared;
        if name == "pages_to_scan" && old.advisor_mode == AdvisorMode::ScanTime {
            return Err(Error::Value(
                "pages_to_scan is set by the advisor while advisor_mode is \"scan-time\"; set advisor_mode = \"none\" first".into(),
            ));
        }
        let busy = match name {
            "max_page_sharing" => k.max_page_sharing != old.max_page_sharing,
            "merge_across_nodes" => k.merge_across_nodes != old.merge_across_nodes,
            _ => false,
        };
        if busy && shared > 0 {
            return Err(Error::errno(
                libc::EBUSY,
                format!("{name} can change only while no page is shared (pages_shared = {shared}); set run = 2 first"),
            ));
        }
        if name == "advisor_mode" && k.advisor_mode != old.advisor_mode {
            // As the kernel does: switching the mode resets pages_to_scan.
            k.pages_to_scan = match k.advisor_mode {
                AdvisorMode::ScanTime => {
                    st.advisor = Advisor::default();
                    st.scan_cpu_ns = 0;
                    k.advisor_min_pages_to_scan
                }
                AdvisorMode::None => Knobs::default().pages_to_scan,
            };
        }
        if name == "run" && k.run == 2 && old.run != 2 {
            if st.core.has_merged_pages(0, usize::MAX) {
                Self::ensure_registered(&mut st, 0, usize::MAX)?;
            }
            if let Err(e) = st.core.unmerge_all() {
                // The kernel sets run = 0 when unmerging fails.
                st.knobs.run = 0;
                return Err(Error::errno(libc::EAGAIN, format!("run = 2 could not unmerge every page ({e}); run is now 0, nothing was lost")));
            }
            // Frames only a moved mapping may still hold were kept as suspects: free
            // those nothing maps now (no full scan begins under run = 2).
            Self::free_suspects_now(&mut st);
        }
        st.knobs = k;
        apply_knobs(&mut st.core, &k);
        if name == "vma_reserve" {
            // The budget follows at once (merges charge it as they go).
            st.core.refresh_vma_allowance();
        }
        if k.run == 1 && st.threads_pid != sys::getpid() {
            self.start_threads(&mut st);
        }
        drop(st);
        self.wake.notify_all();
        self.scanned.notify_all();
        Ok(())
    }

    pub fn snapshot(&self) -> Snapshot {
        let st = self.lock();
        let c = st.core.counters();
        let page = sys::page_size() as u64;
        let metadata_bytes = st.core.metadata_bytes();
        let vmas_added = st.core.vmas_added();
        let tracked: u64 = st.core.regions().map(|r| r.pages.len() as u64).sum();
        let (stable_node_chains, stable_node_dups) = st.core.stable_chains();
        Snapshot {
            pages_shared: c.pages_shared,
            pages_sharing: c.pages_sharing,
            pages_unshared: c.pages_unshared,
            pages_volatile: c.pages_volatile(),
            full_scans: c.full_scans,
            pages_scanned: c.pages_scanned,
            pages_skipped: c.pages_skipped,
            stable_node_chains,
            stable_node_dups,
            ksm_zero_pages: c.ksm_zero_pages,
            general_profit: Snapshot::profit(
                c.pages_sharing + c.ksm_zero_pages,
                page,
                metadata_bytes,
                vmas_added,
            ),
            rmap_items: c.rmap_items,
            frames: u64::from(st.core.frames().live()),
            deferred_frames: st.core.frames().deferred() as u64,
            suspect_frames: st.core.frames().suspects() as u64,
            pool_bytes: st.core.mem.pool.as_ref().map_or(0, |p| p.allocated_bytes()),
            merges: c.merges,
            merge_failures: c.merge_failures,
            pages_hashed: c.pages_hashed,
            cows: c.cows,
            vmas_added,
            metadata_bytes,
            metadata_peak_bytes: st.core.metadata_peak_bytes(),
            tracked_pages: tracked,
            advised_pages: st.core.advised_pages(),
            settled: st.core.settled(),
            vma_budget_skips: c.vma_budget_skips,
            vma_budget_bytes: c.vma_put_off_pages * page,
            unmergeable_pages: st.unmergeable_pages,
            vmas_used: st.core.mem.vmas_used,
            vma_budget: st.core.mem.vma_budget,
        }
    }

    /// `/proc/self/ksm_stat`: this process's view (ksm is per process, so the
    /// merging pages are `pages_shared + pages_sharing`).
    pub fn ksm_stat(&self) -> KsmStat {
        let st = self.lock();
        let c = st.core.counters();
        let merging = c.pages_shared + c.pages_sharing;
        KsmStat {
            ksm_rmap_items: c.rmap_items,
            ksm_zero_pages: c.ksm_zero_pages,
            ksm_merging_pages: merging,
            ksm_process_profit: Snapshot::profit(
                merging + c.ksm_zero_pages,
                sys::page_size() as u64,
                st.core.metadata_bytes(),
                st.core.vmas_added(),
            ),
            ksm_merge_any: st.knobs.merge_any,
            ksm_mergeable: st.core.any_advised(),
        }
    }

    /// `prctl(PR_GET_MEMORY_MERGE)`.
    pub fn get_memory_merge(&self) -> bool {
        self.lock().knobs.merge_any
    }

    /// `prctl(PR_SET_MEMORY_MERGE, on)` for the memory ksm owns (docs/kernel-contract.md,
    /// “prctl(PR_SET_MEMORY_MERGE)”):
    /// on, every `ksm.mmap` region, existing and future, is advised mergeable; off,
    /// every region (foreign ones too) is unmerged and loses its advice. Setting the
    /// current state does nothing; if unmerging fails, merge-any stays on.
    pub fn set_memory_merge(&'static self, on: bool) -> Result<()> {
        let page = sys::page_size();
        let mut st = self.lock();
        if on == st.knobs.merge_any {
            return Ok(());
        }
        let bounds = |st: &State, owned_only: bool| -> Vec<(usize, usize)> {
            st.core
                .regions()
                .filter(|r| r.owned || !owned_only)
                .map(|r| (r.start, r.end(page)))
                .collect()
        };
        if on {
            Self::ensure_uffd(&mut st)?;
            for (s, e) in bounds(&st, true) {
                Self::advise_tracked(&mut st, s, e)?;
            }
            st.knobs.merge_any = true;
            drop(st);
            self.wake.notify_all();
        } else {
            for (s, e) in bounds(&st, false) {
                Self::unadvise(&mut st, s, e)?;
            }
            st.knobs.merge_any = false;
        }
        Ok(())
    }

    /// `page_state()` of the page at `addr`: merged, unmerged, volatile, unshared.
    pub fn page_state(&self, addr: usize) -> &'static str {
        let mut st = self.lock();
        let pres = st.core.mem.presence(addr);
        st.core.page_state(addr, pres).unwrap_or("unmerged")
    }

    /// The bytes of every referenced frame (diagnostics and tests).
    pub fn frame_contents(&self) -> Vec<Vec<u8>> {
        let st = self.lock();
        st.core
            .frames()
            .referenced()
            .map(|f| crate::scan::Mem::frame(&st.core.mem, f).to_vec())
            .collect()
    }
}

#[derive(Clone, Copy, Debug)]
enum Piece {
    Tracked,
    Foreign(i32),
    Never,
}

#[cfg(test)]
mod tests;
