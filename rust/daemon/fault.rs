//! The userfaultfds and their reader threads: `ensure_uffd_of` opens one (for
//! memory ksm owns, or the application's) and starts its fault thread
//! (`fault_loop`); `follow_events` applies, under the state lock, the events the
//! fault threads logged (munmap, mremap, MADV_DONTNEED).
//!
//! Invariants: a fault thread never takes the state lock nor the GIL (a writer
//! blocked on a page under merge only ever waits for the merger); it decides
//! under the window lock, which `protect` takes to publish a window; the event
//! log is held while reading, so an application's munmap that returned has its
//! event logged; a discarded merged page is unmerged only once the discard has
//! zapped it (or a second passed).

#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{availability, Availability, Engine, State, EVENTS, REQUIRED_FEATURES, WINDOWS};
use crate::error::{Error, Result};
use crate::os::{own_event_or_disturb, Event};
use crate::sys;
use crate::sys::uffd::{self, Msg, Uffd};

/// Events of memory ksm owns: the application's MADV_DONTNEED of a merged page
/// (with minor faults, to give it zeros). Not UNMAP: our own remaps would raise it.
const OWNED_EVENTS: u64 = uffd::FEATURE_EVENT_REMOVE | uffd::FEATURE_MINOR_SHMEM;
/// Events of memory the application owns: tracking follows its munmap, mremap and
/// MADV_DONTNEED.
const FOREIGN_EVENTS: u64 = uffd::FEATURE_EVENT_UNMAP
    | uffd::FEATURE_EVENT_REMAP
    | uffd::FEATURE_EVENT_REMOVE
    | uffd::FEATURE_MINOR_SHMEM;

/// A fault thread: one per userfaultfd. It never takes the state lock.
///
/// * **Write-protect faults** inside an open merge window wait for the merger,
///   which wakes them when it closes the window; outside every window the
///   protection is stale (a path that could not release it): it is dropped, which
///   also wakes the writer. Checked and acted on under the window lock, which
///   `protect` also takes to publish a window before protecting.
/// * **Minor faults** come from merged pages (pool mappings) without a PTE: one the
///   application discarded with `MADV_DONTNEED` gets a private page of zeros, as
///   anonymous memory must read after it; any other maps its frame again. Inside a
///   window both stay write-protected, so that the merger still owns the page.
/// * **Events** (munmap, mremap, MADV_DONTNEED of registered memory) are logged for
///   the engine, which follows them under its lock, unless they are our own remaps
///   (a window with its own syscall in flight). An application event touching an
///   open window disturbs it: the merger then gives up that page. The event log
///   is held while reading, so that once the application's munmap has returned
///   (which waits for the read) its event is in the log (see `Os::protect`).
fn fault_loop(u: &Uffd, stop: &AtomicBool) {
    let page = sys::page_size();
    let mut msgs = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match u.wait_readable(Duration::from_millis(200)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        let mut log = EVENTS.lock();
        if u.read_available(&mut msgs).is_err() {
            continue;
        }
        for m in &msgs {
            let mut open = WINDOWS.lock();
            match *m {
                Msg::PageFault { addr, flags, .. } => {
                    let a = addr as usize & !(page - 1);
                    let in_window = open.iter().any(|w| w.start <= a && a < w.end);
                    if flags & uffd::PAGEFAULT_FLAG_MINOR != 0 {
                        let r = if log.is_removed(a) {
                            u.fill_zeros(a, page, in_window)
                        } else {
                            u.continue_minor(a, page, in_window)
                        };
                        // EEXIST: another fault resolved it first.
                        if r.is_err() {
                            let _ = u.wake(a, page);
                        }
                    } else if flags & uffd::PAGEFAULT_FLAG_WP == 0 {
                        // Missing: a page of a pool mapping over a free frame, which
                        // reads zeros (see `Uffd::register_wp_minor`).
                        if u.fill_zeros(a, page, in_window).is_err() {
                            let _ = u.wake(a, page);
                        }
                    } else if !in_window
                        && (flags & uffd::PAGEFAULT_FLAG_WP == 0
                            // Once: EAGAIN means an event this thread has yet to read;
                            // the woken writer faults again and is served after it.
                            || u.writeprotect_once(a, page, false).is_err())
                    {
                        let _ = u.wake(a, page);
                    }
                }
                Msg::Remove { start, end } => {
                    let (s, e) = (start as usize, end as usize);
                    if !own_event_or_disturb(&mut open, s, e) {
                        log.add_removed(s, e);
                        log.queue.push(Event::Removed { start: s, end: e });
                    }
                }
                Msg::Unmap { start, end } => {
                    let (s, e) = (start as usize, end as usize);
                    if !own_event_or_disturb(&mut open, s, e) {
                        log.queue.push(Event::Unmapped { start: s, end: e });
                    }
                }
                Msg::Remap { from, to, len } => {
                    let (from, to, len) = (from as usize, to as usize, len as usize);
                    own_event_or_disturb(&mut open, from, from + len);
                    log.queue.push(Event::Remapped { from, to, len });
                }
                Msg::Fork { .. } | Msg::Unknown { .. } => {}
            }
        }
    }
}

impl Engine {
    /// Open the userfaultfd of owned memory and start its reader, once per process.
    pub(super) fn ensure_uffd(st: &mut State) -> Result<Arc<Uffd>> {
        Self::ensure_uffd_of(st, false)
    }

    /// Open the userfaultfd of foreign memory (or of owned memory) and start its
    /// reader, once per process. Optional event features are asked for when offered;
    /// without them ksm works as before they existed (see the README's limitations).
    pub(super) fn ensure_uffd_of(st: &mut State, foreign: bool) -> Result<Arc<Uffd>> {
        let slot = if foreign {
            &st.core.mem.uffd_foreign
        } else {
            &st.core.mem.uffd
        };
        if let Some(u) = slot {
            return Ok(u.clone());
        }
        let offered = match availability() {
            Availability::Unavailable(why) => {
                return Err(Error::errno(
                    libc::EINVAL,
                    format!("merging is not available in this process: {why}"),
                ))
            }
            Availability::Available { features, .. } => *features,
        };
        let wanted = if foreign {
            FOREIGN_EVENTS
        } else {
            OWNED_EVENTS
        };
        let u = Arc::new(
            Uffd::open(REQUIRED_FEATURES | (offered & wanted))
                .map_err(|e| Error::os("opening userfaultfd", 0, 0, e))?,
        );
        let stop = st.fault_stop.clone();
        let reader = u.clone();
        std::thread::Builder::new()
            .name(if foreign { "ksm-events" } else { "ksm-faults" }.into())
            .spawn(move || fault_loop(&reader, &stop))
            .map_err(|e| Error::os("spawning the fault thread", 0, 0, e))?;
        if foreign {
            st.core.mem.uffd_foreign = Some(u.clone());
        } else {
            st.core.mem.uffd = Some(u.clone());
        }
        Ok(u)
    }

    /// Follow what the application did to registered memory (events the fault
    /// threads read): forget unmapped memory, move the records of moved memory, and
    /// give merged pages it discarded (MADV_DONTNEED) private pages of zeros.
    pub(super) fn follow_events(st: &mut State) {
        let events = std::mem::take(&mut EVENTS.lock().queue);
        if events.is_empty() && st.discarded.is_empty() {
            return;
        }
        for ev in events {
            match ev {
                Event::Unmapped { start, end } => st.core.forget_unmapped(start, end),
                Event::Remapped { from, to, len } => {
                    st.core.relocate(from, to, len);
                    EVENTS.lock().relocate_removed(from, to, len);
                }
                Event::Removed { start, end } => st.discarded.push((start, end, Instant::now())),
            }
        }
        for (start, end, seen) in std::mem::take(&mut st.discarded) {
            // The application zaps the range only after its event was read: until then
            // a merged page still maps its frame, and copying it would bring the
            // discarded bytes back. Wait for the zap (a second at most: a madvise that
            // failed after its event zaps nothing).
            let pending = st.core.frame_mapped_in(start, end);
            if pending && seen.elapsed() < Duration::from_secs(1) {
                st.discarded.push((start, end, seen));
                continue;
            }
            // The merged pages read zeros now, or what was written since (the fault
            // thread fills them): copy that into anonymous pages of their own.
            if pending || st.core.unmerge_discarded(start, end).is_ok() {
                // Covered pages stay where they are (see `unmerge_discarded`), so their
                // minor faults must go on being answered with zeros: until they map
                // something anew (`map_frames` forgets the mark then).
                let mut log = EVENTS.lock();
                log.clear_removed(start, end);
                for (s, e) in st.core.covered_ranges(start, end) {
                    log.add_removed(s, e);
                }
            } else {
                st.discarded.push((start, end, seen));
            }
        }
    }
}
