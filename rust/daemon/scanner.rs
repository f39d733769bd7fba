//! The scanner: the `ksmd` thread (`scanner_loop`), synchronous scans in the
//! caller's thread (`scan`), `wait_settled`, and what the engine does as a full
//! scan begins (the VMA budget, foreign memory followed from /proc/self/maps,
//! suspect frames freed) and ends (the scan-time advisor, frames held back since
//! a fork freed once no other process maps the pool).
//!
//! Invariants: the state lock is held for one batch at a time and handed to
//! waiting callers between batches (`pass_lock`); a scanner thread belongs to the
//! process that started it (a forked child's exits at once); every completed full
//! scan signals `scanned`.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::knobs::AdvisorMode;
use super::{advisor, Engine, State};
use crate::error::Result;
use crate::region::maps;
use crate::sys;

/// Pages per batch of a synchronous `scan()` (the lock is released between batches).
const SYNC_BATCH: u64 = 4096;

/// The longest pause of a merge domain's member between full scans that change
/// nothing, in milliseconds (see `Engine::idle_pause`): the kernel's default
/// `sleep_millisecs`.
const IDLE_PAUSE_MAX_MS: u64 = 20;

/// The pause after the `n + 1`-th full scan in a row that changed nothing (see
/// `Engine::idle_pause`): 1 ms, doubling up to `IDLE_PAUSE_MAX_MS`. Short at first:
/// a scan that changed nothing is often followed by one that does (the application
/// still writing, or a message that came between the check and the wait).
fn idle_pause_ms(n: u32) -> u64 {
    (1u64 << n.min(63)).min(IDLE_PAUSE_MAX_MS)
}

impl Engine {
    pub(super) fn start_threads(&'static self, st: &mut State) {
        st.threads_pid = sys::getpid();
        let spawned = std::thread::Builder::new()
            .name("ksmd".into())
            .spawn(move || self.scanner_loop());
        if spawned.is_err() {
            st.threads_pid = 0;
        }
    }

    /// Run `n` full scans now in the caller's thread (finishing a scan in progress first).
    pub fn scan(&'static self, n: u64) -> Result<()> {
        let mut st = self.lock();
        let mut finishing = !st.core.at_scan_start();
        let mut remaining = n;
        while remaining > 0 || finishing {
            if st.core.at_scan_start() {
                self.begin_full_scan(&mut st);
            }
            if Self::batch(&mut st, SYNC_BATCH) {
                self.end_full_scan(&mut st);
                if finishing {
                    finishing = false;
                } else {
                    remaining -= 1;
                }
            }
            // Let stats() and the application's calls in between batches.
            st = self.pass_lock(st);
        }
        Ok(())
    }

    /// One batch of `budget` pages, its CPU time charged to the scanner (for the advisor):
    /// this thread's, and that of the threads it hashed pages on.
    fn batch(st: &mut State, budget: u64) -> bool {
        let t0 = sys::thread_cpu_ns();
        let mut budget = budget;
        let done = loop {
            Self::domain_take_in(st);
            let done = st.core.scan_batch(budget);
            Self::domain_send_out(st);
            // Ended early to publish a segment's worth of pages: the rest of the batch
            // (if the part done counted some pages, so that the loop ends).
            match st.core.take_publish_cut() {
                Some(left) if left < budget => budget = left,
                _ => break done,
            }
        };
        st.scan_cpu_ns += sys::thread_cpu_ns().saturating_sub(t0)
            + std::mem::take(&mut st.core.mem.helper_cpu_ns);
        done
    }

    fn begin_full_scan(&self, st: &mut State) {
        st.scan_started = Instant::now();
        // /proc/self/maps is parsed only when foreign memory or suspect frames need it;
        // its line count then also gives the VMA budget (else a cheap count does).
        let needs_maps = st.core.regions().any(|r| !r.owned) || st.core.frames().suspects() > 0;
        let Some(vmas) = needs_maps.then(maps::read_self).and_then(Result::ok) else {
            st.core.count_vmas_when_needed();
            return;
        };
        let allowance = st.core.mem.vma_allowance_for(vmas.len() as u64);
        st.core.set_vma_allowance(allowance);
        Self::follow_foreign_memory(st, &vmas);
        Self::free_unmapped_suspects(st, &vmas);
    }

    fn end_full_scan(&self, st: &mut State) {
        Self::domain_report(st);
        // Merging settled after changes: the allocator's free memory goes back (the
        // scans' buffers, freed, would stay in the threads' arenas, memory the
        // process pays for as long as it lives; a worker pool pays it per worker).
        if !st.core.settled() {
            st.trim_due = true;
        } else if std::mem::take(&mut st.trim_due) {
            sys::release_free_heap();
        }
        if st.knobs.advisor_mode == AdvisorMode::ScanTime {
            let k = st.knobs;
            let scan_ms = st.scan_started.elapsed().as_millis() as u64;
            let cpu_ms = std::mem::take(&mut st.scan_cpu_ns) / 1_000_000;
            st.knobs.pages_to_scan = st.advisor.step(
                k.pages_to_scan,
                scan_ms,
                cpu_ms,
                advisor::Limits {
                    target_scan_time_s: k.advisor_target_scan_time,
                    max_cpu: k.advisor_max_cpu,
                    max_pages_to_scan: k.advisor_max_pages_to_scan,
                },
            );
        }
        // Frames held back since a fork: free them once no other process maps the pool.
        // Reading every process's maps costs milliseconds, so at most once a second or
        // every 8 full scans (which makes it deterministic for `scan()` callers).
        st.scans_since_quiet_check += 1;
        let due = st.scans_since_quiet_check >= 8
            || st
                .last_quiet_check
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if st.core.frames().needs_quiet_check() && st.core.frames().deferred() > 0 && due {
            st.last_quiet_check = Some(Instant::now());
            st.scans_since_quiet_check = 0;
            let inode = st.core.mem.pool.as_ref().map_or(0, |p| p.inode());
            if !maps::others_map(inode, crate::pool::POOL_PATH_PREFIX, sys::getpid()) {
                st.core.pool_quiet();
            }
        }
        self.scanned.notify_all();
    }

    fn scanner_loop(&'static self) {
        let me = sys::getpid();
        let mut st = self.lock();
        loop {
            if st.threads_pid != me {
                return;
            }
            let sleep = if st.knobs.run == 1 && !st.core.any_advised() {
                Self::free_suspects_while_idle(&mut st);
                // Nothing registered: no scans, no full_scans (the kernel's ksmd idles).
                Some(Duration::from_millis(
                    u64::from(st.knobs.sleep_millisecs).max(20),
                ))
            } else if st.knobs.run == 1 {
                if st.core.at_scan_start() {
                    self.begin_full_scan(&mut st);
                }
                let budget = u64::from(st.knobs.pages_to_scan);
                let mut pause = Duration::from_millis(u64::from(st.knobs.sleep_millisecs));
                if Self::batch(&mut st, budget) {
                    self.end_full_scan(&mut st);
                    if self.settle_waiters.load(Ordering::Acquire) > 0 {
                        // Let the woken waiters look at the result before the next scan.
                        drop(st);
                        std::thread::sleep(Duration::from_micros(200));
                        st = self.lock();
                    }
                    pause = pause.max(Self::idle_pause(&mut st));
                }
                Some(pause)
            } else {
                None
            };
            st = match sleep {
                Some(d) if d.is_zero() => self.pass_lock(st),
                Some(d) => {
                    self.wake
                        .wait_timeout(st, d)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.wake.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }

    /// How long a member of a merge domain waits before its next full scan, at
    /// least (`sleep_millisecs` still applies): after full scans that changed
    /// nothing, with nothing arrived from the domain since, see `idle_pause_ms`;
    /// else nothing.
    ///
    /// Each member runs a ksmd of its own, where the kernel runs one for every
    /// process: with `sleep_millisecs = 0`, members that have merged what they can
    /// scan again and again, and take the CPUs from the application and from members
    /// still merging (measured, 16 members of 64 MiB on 2 CPUs: once settled, they
    /// kept both CPUs busy, 1.99 CPUs; with the pause 0.95-0.99, about what the
    /// kernel's one ksmd takes at these knobs). What gives a member more to do
    /// arrives from the domain, and the domain's thread wakes the scanner when it
    /// does (`ring_scanner`), so the pause delays no merge with other members. What
    /// it delays is noticing the application's writes, by at most
    /// `IDLE_PAUSE_MAX_MS`, and a wake-up that comes between the check below and
    /// the wait (the domain's thread does not take the state lock) by as much.
    fn idle_pause(st: &mut State) -> Duration {
        let idle = st.core.settled() && st.domain.as_ref().is_some_and(|l| !l.has_inbound());
        if !idle {
            st.idle_scans = 0;
            return Duration::ZERO;
        }
        let ms = idle_pause_ms(st.idle_scans);
        st.idle_scans = st.idle_scans.saturating_add(1);
        Duration::from_millis(ms)
    }

    /// True once a full scan completes with nothing left to merge; waits up to
    /// `timeout` while ksmd runs. With ksmd stopped it answers at once.
    pub fn wait_settled(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut st = self.lock();
        loop {
            // Nothing advised: nothing to merge, settled by definition.
            if st.core.settled() || !st.core.any_advised() {
                return true;
            }
            if st.knobs.run != 1 {
                return false;
            }
            let now = Instant::now();
            if deadline.is_some_and(|d| now >= d) {
                return false;
            }
            self.settle_waiters.fetch_add(1, Ordering::AcqRel);
            st = match deadline {
                None => self.scanned.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    self.scanned
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
            self.settle_waiters.fetch_sub(1, Ordering::AcqRel);
            Self::follow_events(&mut st);
        }
    }

    /// Memory ksm does not own, as the application has it now (read once per full
    /// scan from /proc/self/maps): each page's protection, to remap it with; pages
    /// whose mapping is gone or is no longer anonymous private memory are forgotten
    /// with their advice, as the kernel's advice dies with its VMA.
    fn follow_foreign_memory(st: &mut State, vmas: &[maps::Vma]) {
        let page = sys::page_size();
        let mut vanished = Vec::new();
        for r in st.core.regions_mut().filter(|r| !r.owned) {
            let mut v = vmas.partition_point(|v| v.end <= r.start);
            for (i, rec) in r.pages.iter_mut().enumerate() {
                let addr = r.start + i * page;
                while v < vmas.len() && vmas[v].end <= addr {
                    v += 1;
                }
                match vmas.get(v).filter(|x| x.start <= addr && x.eligible()) {
                    Some(x) => rec.set_prot(x.prot),
                    None if rec.advised() => vanished.push(addr),
                    None => {}
                }
            }
        }
        for addr in vanished {
            st.core.forget_vanished(addr);
        }
        let idle: Vec<usize> = st
            .core
            .regions()
            .filter(|r| !r.owned && !r.any_advised())
            .map(|r| r.start)
            .collect();
        for start in idle {
            st.core.remove_region(start);
        }
    }

    /// Free the suspect frames that no mapping in `vmas` (this process's, read from
    /// /proc/self/maps) holds any more.
    fn free_unmapped_suspects(st: &mut State, vmas: &[maps::Vma]) {
        if st.core.frames().suspects() == 0 {
            return;
        }
        let page = sys::page_size() as u64;
        let inode = st.core.mem.pool.as_ref().map_or(0, |p| p.inode());
        let pool: Vec<(u64, u64)> = vmas
            .iter()
            // Private mappings of the pool are merged pages (the shared one is our view).
            .filter(|v| {
                !v.shared && v.inode == inode && v.path.starts_with(crate::pool::POOL_PATH_PREFIX)
            })
            .map(|v| {
                (
                    v.offset / page,
                    v.offset / page + ((v.end - v.start) as u64) / page,
                )
            })
            .collect();
        st.core.free_unmapped_suspects(|f| {
            pool.iter()
                .any(|&(s, e)| s <= u64::from(f) && u64::from(f) < e)
        });
    }

    /// With nothing advised no full scan begins, yet the last users of suspect frames
    /// are often gone just then (unadvised, unmerged, closed): look for them here, at
    /// most once a second while some are left.
    fn free_suspects_while_idle(st: &mut State) {
        if st.core.frames().suspects() == 0
            || st
                .last_suspect_check
                .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        st.last_suspect_check = Some(Instant::now());
        Self::free_suspects_now(st);
    }

    /// `free_unmapped_suspects` with the maps read now, if any frame is a suspect.
    pub(super) fn free_suspects_now(st: &mut State) {
        if st.core.frames().suspects() > 0 {
            if let Ok(vmas) = maps::read_self() {
                Self::free_unmapped_suspects(st, &vmas);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_pause_doubles_from_one_millisecond_to_the_most() {
        let pauses: Vec<u64> = (0..8).map(idle_pause_ms).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 20, 20, 20]);
        assert_eq!(idle_pause_ms(u32::MAX), IDLE_PAUSE_MAX_MS);
    }
}
