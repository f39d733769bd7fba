//! Fork handling: the `pthread_atfork` handlers (`fork_prepare`, `fork_parent`,
//! `fork_child`) and the lazy restart of the threads in a forked child
//! (`after_fork_check`). See docs/design.md, "Fork rule".
//!
//! Invariants: `prepare` holds the state lock (the scanner is between batches,
//! no page is write-protected), the event log and the window lock across
//! `fork()`, in the fault threads' order; after a fork the parent never punches a
//! frame the child may map; the child never touches the parent's pool: it starts
//! over with a new one, no userfaultfd, counters from zero, and pages that map
//! the parent's frames known as inherited.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, MutexGuard};

use super::{apply_knobs, new_core, Engine, State, ENGINE, EVENTS, WINDOWS};
use crate::os::{EventLog, Win};
use crate::sys;

/// The locks `prepare` takes: the engine state and the open merge windows.
type ForkGuards = (
    MutexGuard<'static, State>,
    MutexGuard<'static, EventLog>,
    MutexGuard<'static, Vec<Win>>,
);

thread_local! {
    /// Locks held across `fork()` by the forking thread (prepare → parent/child).
    static FORK_GUARDS: RefCell<Option<ForkGuards>> = const { RefCell::new(None) };
}

pub(super) fn fork_prepare() {
    let Some(e) = ENGINE.get() else { return };
    // The fault threads' lock order: event log, then windows.
    let st = e.lock_raw();
    let log = EVENTS.lock();
    // A page of a pool mapping the application discarded (merged or covered) reads
    // zeros only through our fault thread, until ksm has followed the discard; the
    // child will have no fault thread: give such pages their zeros now.
    // The fill takes only a page with no PTE, or with the marker a discard leaves in
    // place of a write-protected one (a covered page whose writes are tracked, see
    // `Mem::track_covered`), which pagemap shows as swapped; a page there (present
    // or swapped) is EEXIST, left as it is.
    for (s, end) in log.removed.clone() {
        for a in st.core.pool_pages_in(s, end) {
            let _ = st.core.mem.fill_zero_page(a);
        }
    }
    let w = WINDOWS.lock();
    FORK_GUARDS.with(|g| *g.borrow_mut() = Some((st, log, w)));
}

pub(super) fn fork_parent() {
    if let Some((mut st, log, w)) = FORK_GUARDS.with(|g| g.borrow_mut().take()) {
        // Every live frame may now be mapped by the child: never punch it while the child lives.
        st.core.frames_mut().on_fork();
        st.core.reserve_covered_frames();
        drop(w);
        drop(log);
        drop(st);
    }
}

pub(super) fn fork_child() {
    let Some((mut st, mut log, mut w)) = FORK_GUARDS.with(|g| g.borrow_mut().take()) else {
        return;
    };
    // The child has no userfaultfd (its copies are unregistered): nothing to follow.
    w.clear();
    drop(w);
    *log = EventLog::default();
    drop(log);
    st.discarded.clear();
    // The domain's thread does not exist here and its socket is the parent's
    // conversation: drop it without a word. The child joins a domain only if it
    // asks (the Python layer does when KSM_DOMAIN is set). Pages it inherited on
    // segments stay correct: segments never change.
    if let Some(link) = st.domain.take() {
        link.abandon_in_child();
    }
    st.publish_failures = 0;
    // Threads do not survive fork; the kernel unregistered our ranges in the child's
    // copy (no UFFD_FEATURE_EVENT_FORK). Start over with a new pool: the child must
    // never punch a frame of the parent's pool, which the parent's pages may map.
    st.threads_pid = 0;
    st.fault_stop = Arc::new(AtomicBool::new(false));
    // Nothing here can fail: the new engine allocates nothing big (its pool comes
    // with its first frame), so the child can never be left with the parent's pool.
    let mut core = new_core();
    for m in st.core.mem.take_owned().into_values() {
        core.mem.adopt(m);
    }
    for mut r in st.core.take_regions() {
        r.registered = false;
        r.track_pending = false;
        // (Records never created stay so: the child allocates nothing big here.)
        r.pages.update_all(|p| {
            // Counters start from zero in the child, as the kernel's do; pages that map
            // the parent's frames stay known, for MADV_UNMERGEABLE.
            // The zero pages stay counted, as the kernel adds the child's inherited ones.
            // A private copy inside a pool mapping (`IN_POOL`) sits in a mapping of the
            // parent's pool too: unmerged (moved to anonymous memory) as inherited pages are.
            let state = match p.state() {
                crate::region::State::Stable => crate::region::State::Inherited,
                crate::region::State::Zero => crate::region::State::Zero,
                _ if p.covered() => crate::region::State::Inherited,
                _ => crate::region::State::Untracked,
            };
            // (A pair put off by the parent's scan is not the child's.)
            *p = crate::region::PageRec::fresh(state, p.flags() & !crate::region::DEFERRED);
        });
        r.clear_covered();
        core.add_region(r);
    }
    apply_knobs(&mut core, &st.knobs);
    drop(std::mem::replace(&mut st.core, core));
}

impl Engine {
    /// Restart threads in a forked child (they do not survive fork). Lock-free unless
    /// the process changed.
    pub(super) fn after_fork_check(&'static self) {
        let me = sys::getpid();
        if self.pid.swap(me, Ordering::AcqRel) == me {
            return;
        }
        let mut st = self.lock();
        if st.knobs.run == 1 && st.threads_pid != sys::getpid() {
            self.start_threads(&mut st);
        }
    }

    /// Called by Python's `os.register_at_fork(after_in_child=...)`.
    pub fn after_fork_child(&'static self) {
        self.after_fork_check();
    }
}
