//! What the algorithm needs of memory: the [`Mem`] trait, and [`Presence`] (what
//! pagemap says of a page).
//!
//! The real implementation is the OS backend (`os::Os`: userfaultfd, memfd, mmap);
//! tests and fuzzers use [`super::fake::FakeMem`]. Contract kept by every caller in
//! `scan`: a method that changes a mapping (`map_frames`, `zap`, `unmerge_run` of a
//! merged page's copy) is only called inside the protect … release window of that
//! page (see `window`), and a frame is punched only once no record names it.

#![forbid(unsafe_code)]

use std::io;

use crate::pool::FrameId;

/// What pagemap says about a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Presence {
    /// No PTE (never touched, or a merged page not yet read again).
    Absent,
    /// Present, anonymous (a private page: unmerged, or a merged page copied by a write).
    Anon,
    /// Present, file-backed (a merged page mapping its frame).
    File,
}

/// The memory operations the algorithm needs. The real implementation is
/// `os::Os`; every method that changes a mapping is only called inside the
/// protect … release window for that page.
pub trait Mem {
    fn page_size(&self) -> usize;
    /// Presence of `out.len()` pages from `addr`.
    fn probe(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()>;
    /// `probe` for pages known to be in anonymous mappings (ksm's own memory where no
    /// page is merged or covered): any present page is anonymous, which the Os can
    /// tell far more cheaply.
    fn probe_anonymous(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()> {
        self.probe(addr, out)
    }
    /// `probe` of ksm's own memory with write tracking: per page whether it is tracked
    /// (its writes are recorded) and, if so, whether it is unchanged since the previous
    /// call for it (and from now on, until the next call, every write is recorded).
    /// `frames`: whether some of the pages may map a frame (else all are known to be
    /// anonymous, as for `probe_anonymous`). A page mapping a frame is never tracked:
    /// its writes fault to ksm. Without write tracking nothing is tracked.
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
        if frames {
            self.probe(addr, out)
        } else {
            self.probe_anonymous(addr, out)
        }
    }
    /// Stop tracking writes to `[addr, addr+len)`, anonymous pages about to be
    /// write-protected for a merge (which needs the synchronous userfaultfd).
    fn untrack(&mut self, _addr: usize, _len: usize) -> io::Result<()> {
        Ok(())
    }
    /// `untrack` for a merge about to write-protect the range through the synchronous
    /// userfaultfd: the Os may register it there at once (else `protect` does).
    fn untrack_for_merge(&mut self, addr: usize, len: usize) -> io::Result<()> {
        self.untrack(addr, len)
    }
    /// Track writes to `[addr, addr+len)` again: anonymous pages a merge protected
    /// and left anonymous (it failed, or dropped them to the zero page), or memory
    /// already registered when the `write_tracking` knob is switched back on.
    fn retrack(&mut self, _addr: usize, _len: usize) {}
    /// Track writes to `[addr, addr+len)`, private copies in a pool mapping (pages of
    /// ksm's own memory written after they were merged, `covered`), which the tracker
    /// cannot take (a mapping has one userfaultfd): write-protect them through the
    /// synchronous userfaultfd, so that `probe_tracked` finds them unchanged until a
    /// write faults and the fault thread unprotects them. Only for copies whose
    /// content held still between two visits: their next write costs a fault.
    fn track_covered(&mut self, _addr: usize, _len: usize) -> io::Result<()> {
        Ok(())
    }
    /// Whether write tracking is wanted (the `write_tracking` knob).
    fn write_tracking(&self) -> bool {
        false
    }
    fn set_write_tracking(&mut self, _on: bool) {}
    /// Copy `buf.len()` bytes from `addr` (a page, or a run inside one region),
    /// fault-safely unless `owned`.
    fn read(&mut self, addr: usize, owned: bool, buf: &mut [u8]) -> io::Result<()>;
    /// `sum` of the bytes of each page of `addrs` (pages of one region, which ksm owns
    /// or not as `owned` says), each read now as `read` would, on up to `threads`
    /// threads; `None` where a page could not be read. One by one here; the Os and the
    /// fake spread the pages over threads.
    fn checksums(
        &mut self,
        addrs: &[usize],
        owned: bool,
        threads: usize,
        sum: fn(&[u8]) -> u32,
        out: &mut [Option<u32>],
    ) {
        let _ = threads;
        let mut buf = vec![0u8; self.page_size()];
        for (&a, o) in addrs.iter().zip(out) {
            *o = self.read(a, owned, &mut buf).is_ok().then(|| sum(&buf));
        }
    }
    fn frame(&self, f: FrameId) -> &[u8];
    /// Whether the page at `addr` holds `data` (`read` and compare; the Os compares
    /// memory ksm owns in place, without a copy).
    fn equals(&mut self, addr: usize, owned: bool, data: &[u8]) -> io::Result<bool> {
        let mut buf = vec![0u8; data.len()];
        self.read(addr, owned, &mut buf)?;
        Ok(buf == data)
    }
    /// Whether the page at `addr` holds the bytes of frame `f` (see `equals`).
    fn equals_frame(&mut self, addr: usize, owned: bool, f: FrameId) -> io::Result<bool> {
        let data = self.frame(f).to_vec();
        self.equals(addr, owned, &data)
    }
    /// Whether the pages at `a` and `b` hold the same bytes (see `equals`).
    fn same_pages(&mut self, a: usize, a_owned: bool, b: usize, b_owned: bool) -> io::Result<bool> {
        let mut buf = vec![0u8; self.page_size()];
        self.read(a, a_owned, &mut buf)?;
        self.equals(b, b_owned, &buf)
    }
    fn write_frame(&mut self, f: FrameId, data: &[u8]) -> io::Result<()>;
    /// Write frames `f0, f0+1, …` with the bytes of the `n` pages from `addr` (pages a
    /// merge window protects): `read` and `write_frame` page by page; the Os writes
    /// memory ksm owns into the pool straight from its pages, with one call.
    fn fill_frames(&mut self, f0: FrameId, addr: usize, owned: bool, n: usize) -> io::Result<()> {
        let page = self.page_size();
        let mut buf = vec![0u8; page];
        for i in 0..n {
            self.read(addr + i * page, owned, &mut buf)?;
            self.write_frame(f0 + i as FrameId, &buf)?;
        }
        Ok(())
    }
    fn punch(&mut self, f: FrameId) -> io::Result<()>;
    /// Punch the `n` consecutive frames from `f0` (one call where the pool allows it).
    fn punch_run(&mut self, f0: FrameId, n: u32) -> io::Result<()> {
        // Every frame is tried, whatever the others give; the first error is returned.
        let mut r = Ok(());
        for f in f0..f0 + n {
            r = r.and(self.punch(f));
        }
        r
    }
    /// VMAs merging may still add before the budget (`vm.max_map_count` minus the
    /// `vma_reserve` knob minus what the process uses now); `u64::MAX` when there is
    /// no limit.
    fn vma_allowance(&mut self) -> u64;
    /// VMAs that moving runs of pages off a retired segment may add past the budget
    /// of `vma_allowance` (a move replaces a run's mapping with one mapping, and adds
    /// at most 2 where the run ends inside a mapping). None by default.
    fn move_allowance(&mut self) -> u64 {
        0
    }
    /// Start the merge window: write-protect (writers block until `release`).
    fn protect(&mut self, addr: usize, len: usize) -> io::Result<()>;
    /// End the merge window: unprotect (if `unprotect`) and always wake waiters.
    fn release(&mut self, addr: usize, len: usize, unprotect: bool);
    /// Shrink the merge window `[addr, addr+len)` to its first `keep` bytes (a whole
    /// number of pages, at least one): the rest leaves the window, unprotected and
    /// woken; the first `keep` bytes stay protected, for `map_frames` or `release`.
    fn release_tail(&mut self, addr: usize, len: usize, keep: usize);
    /// Map frames `f0..f0+npages` privately over the (protected) pages from `addr`,
    /// with one mapping (so a run of merged pages is one VMA). The pages `covered`
    /// names (index in the run, and their bytes now) keep their own bytes as private
    /// copies inside that mapping. `Ok(true)` if that may have given the holes of free
    /// frames under covered pages memory of the pool (their bytes written over the
    /// frames by hand), for the caller to punch.
    fn map_frames(
        &mut self,
        addr: usize,
        npages: usize,
        prot: i32,
        f0: FrameId,
        covered: &[(usize, Vec<u8>)],
    ) -> io::Result<bool>;
    /// Drop the (protected, anonymous, all-zero) page at `addr` (`MADV_DONTNEED`):
    /// it reads zeros from the kernel's zero page afterwards, holding no memory.
    fn zap(&mut self, addr: usize) -> io::Result<()>;
    /// Give `[addr, addr+len)` private anonymous pages with the same bytes
    /// (write-protect, copy, move over, wake). Nothing changes on error.
    fn unmerge_run(&mut self, addr: usize, len: usize, prot: i32, owned: bool) -> io::Result<()>;
}
