//! The write-protect windows and the application's events, shared between the
//! merger (the scan, through [`super::Os`]) and the engine's fault threads: the
//! open merge windows ([`Windows`], one [`Win`] each), and the log of what the
//! application did to registered memory ([`Events`]: munmap, mremap,
//! MADV_DONTNEED) that the engine follows under its lock.
//!
//! Invariants: the window list is checked and acted on under one lock, which
//! `Os::protect` takes to publish a window before protecting, and the fault
//! thread takes before acting on a fault (lock order: event log, then windows);
//! an event of our own remapping syscall (a window with its syscall in flight)
//! is never logged as the application's, and an application event touching an
//! open window disturbs it, so that the merger gives that page up; a discarded
//! range is remembered until the engine has followed the discard, so that its
//! merged pages read zeros meanwhile.

#![forbid(unsafe_code)]

use std::sync::{Mutex, MutexGuard};

/// One open merge window.
#[derive(Clone, Copy, Debug)]
pub struct Win {
    pub start: usize,
    pub end: usize,
    /// An application event (munmap, mremap, MADV_DONTNEED) touched the range while
    /// the window was open: the merger must not replace the page any more.
    pub disturbed: bool,
    /// Our own remapping syscall is in flight (its UNMAP/REMOVE event is ours).
    pub own: bool,
}

/// Ranges currently inside a merge window, shared with the fault thread.
#[derive(Debug, Default)]
pub struct Windows {
    open: Mutex<Vec<Win>>,
}

impl Windows {
    pub(super) fn add(&self, s: usize, len: usize) {
        self.lock().push(Win {
            start: s,
            end: s + len,
            disturbed: false,
            own: false,
        });
    }
    /// The window at `s` ends at `end` from now on (see `Os::release_tail`).
    pub(super) fn shrink(&self, s: usize, end: usize) {
        if let Some(w) = self.lock().iter_mut().find(|w| w.start == s) {
            w.end = w.end.min(end);
        }
    }
    pub(super) fn remove(&self, s: usize) {
        let mut v = self.lock();
        if let Some(i) = v.iter().position(|w| w.start == s) {
            v.swap_remove(i);
        }
    }
    /// Mark our own syscall on the window at `s` as in flight; false (and nothing
    /// marked) if an application event already disturbed the window.
    pub(super) fn begin_own(&self, s: usize) -> bool {
        let mut v = self.lock();
        match v.iter_mut().find(|w| w.start == s) {
            Some(w) if !w.disturbed => {
                w.own = true;
                true
            }
            _ => false,
        }
    }
    /// Our syscall on the window at `s` returned. `events` is taken first: the fault
    /// thread holds it from reading messages until it has sorted them all, and the
    /// syscall returned once its event was read, so the event is sorted as ours.
    pub(super) fn end_own(&self, s: usize, events: &Events) {
        let _sorted = events.lock();
        if let Some(w) = self.lock().iter_mut().find(|w| w.start == s) {
            w.own = false;
        }
    }
    /// The lock (also taken by the fork handlers, so that no child inherits it held).
    /// Poisoning is ignored: the list stays valid whatever panicked.
    pub fn lock(&self) -> MutexGuard<'_, Vec<Win>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub const fn new() -> Self {
        Windows {
            open: Mutex::new(Vec::new()),
        }
    }
}

/// Whether `[s, e)` is an event of our own syscall in `open` (exactly a window
/// whose own syscall is in flight); otherwise every window it touches is marked
/// disturbed. Called by the fault thread with the window lock held.
pub fn own_event_or_disturb(open: &mut [Win], s: usize, e: usize) -> bool {
    if open.iter().any(|w| w.own && w.start == s && w.end == e) {
        return true;
    }
    for w in open.iter_mut().filter(|w| w.start < e && s < w.end) {
        w.disturbed = true;
    }
    false
}

/// What the application did to registered memory, as the fault thread read it
/// from userfaultfd events, for the engine to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `munmap` (or a mapping placed over it): the range's memory is gone.
    Unmapped { start: usize, end: usize },
    /// `mremap` moved `[from, from+len)` to `to`.
    Remapped { from: usize, to: usize, len: usize },
    /// `MADV_DONTNEED`/`MADV_REMOVE`: the range reads zeros from now on.
    Removed { start: usize, end: usize },
}

/// Events not yet followed, and the ranges the application discarded whose merged
/// pages still need zeros (the fault thread answers minor faults there with zeros
/// until the engine has given those pages mappings of their own).
#[derive(Debug, Default)]
pub struct EventLog {
    pub queue: Vec<Event>,
    pub removed: Vec<(usize, usize)>,
}

impl EventLog {
    pub fn is_removed(&self, addr: usize) -> bool {
        self.removed.iter().any(|&(s, e)| s <= addr && addr < e)
    }
    /// Whether an unfollowed event says `[s, e)` was unmapped or moved away.
    pub fn vanished(&self, s: usize, e: usize) -> bool {
        self.queue.iter().any(|ev| match *ev {
            Event::Unmapped { start, end } => start < e && s < end,
            Event::Remapped { from, len, .. } => from < e && s < from + len,
            Event::Removed { .. } => false,
        })
    }
    /// Record `[s, e)` as discarded, merged with the ranges it touches (so that a
    /// range discarded again and again is kept once).
    pub fn add_removed(&mut self, s: usize, e: usize) {
        let (mut s, mut e) = (s, e);
        self.removed.retain(|&(rs, re)| {
            let touches = rs <= e && s <= re;
            if touches {
                (s, e) = (s.min(rs), e.max(re));
            }
            !touches
        });
        self.removed.push((s, e));
    }

    /// The application moved `[from, from+len)` to `to` (`mremap`): its discarded
    /// ranges move along.
    pub fn relocate_removed(&mut self, from: usize, to: usize, len: usize) {
        let moved: Vec<(usize, usize)> = self
            .removed
            .iter()
            .filter(|&&(s, e)| s < from + len && from < e)
            .map(|&(s, e)| (s.max(from) - from + to, e.min(from + len) - from + to))
            .collect();
        // What was at the destination is gone, its marks with it.
        self.clear_removed(from, from + len);
        self.clear_removed(to, to + len);
        for (s, e) in moved {
            self.add_removed(s, e);
        }
    }

    /// Forget `[s, e)` as discarded: its merged pages were given pages of their own,
    /// or it maps frames anew (which must never be answered with zeros).
    pub fn clear_removed(&mut self, s: usize, e: usize) {
        let mut kept = Vec::with_capacity(self.removed.len());
        for &(rs, re) in &self.removed {
            if re <= s || e <= rs {
                kept.push((rs, re));
                continue;
            }
            if rs < s {
                kept.push((rs, s));
            }
            if e < re {
                kept.push((e, re));
            }
        }
        self.removed = kept;
    }
}

/// The event log, shared by the fault threads and the engine.
pub struct Events(Mutex<EventLog>);

impl Events {
    pub const fn new() -> Self {
        Events(Mutex::new(EventLog {
            queue: Vec::new(),
            removed: Vec::new(),
        }))
    }
    /// Poisoning is ignored: the log stays valid whatever panicked.
    pub fn lock(&self) -> MutexGuard<'_, EventLog> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for Events {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Events")
    }
}
