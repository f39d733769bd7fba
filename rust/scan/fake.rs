//! An in-memory [`Mem`] for unit tests, fuzzing and Miri: pages, frames and
//! write-protection simulated with plain collections, with the same
//! copy-on-write semantics as the kernel (a write to a page that maps a frame
//! gives it a private copy; the frame never changes).

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::io;

use super::{Mem, Presence};
use crate::pool::FrameId;

/// A fixed, cheap hash for integer keys (addresses, frame ids): the same table layout
/// on every run, so that a fuzz input replays the same way, and no SipHash in the
/// checks the fuzzers make after every step (it was a third of their time).
#[derive(Clone, Copy, Default)]
pub struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        // Page-aligned keys leave the product's low bits zero: fold the high ones in.
        self.0 ^ (self.0 >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// A map keyed by integers, hashed with [`IntHasher`].
pub type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;
/// A set of integers, hashed with [`IntHasher`].
pub type IntSet<K> = HashSet<K, BuildHasherDefault<IntHasher>>;

/// What backs one virtual page.
#[derive(Clone, Debug)]
enum Backing {
    Anon(Vec<u8>),
    /// Maps a frame; `faulted` says whether a read brought the PTE in.
    Frame {
        f: FrameId,
        faulted: bool,
    },
}

/// Simulated address space.
#[derive(Debug)]
pub struct FakeMem {
    page: usize,
    pages: IntMap<usize, Backing>,
    frames: IntMap<FrameId, Vec<u8>>,
    protected: IntSet<usize>,
    zero: Vec<u8>,
    /// Fail `map_frames` (simulates ENOMEM from `vm.max_map_count`).
    pub fail_map: bool,
    /// Fail `unmerge_run` (simulates ENOMEM for the private copies).
    pub fail_unmerge: bool,
    /// Pages `unmerge_run` gave an anonymous mapping of their own.
    pub unmerged: u64,
    pub punched: u64,
    /// Pages whose presence `probe` (or `probe_tracked`) was asked for.
    pub probed: u64,
    /// Every `punch_run` call: (first frame, frames).
    pub punch_runs: Vec<(FrameId, u32)>,
    /// Merge windows shrunk (`release_tail`): runs ended under protection.
    pub tails_released: u64,
    /// What `vma_allowance` answers (the real count of a process).
    pub vma_allowance: u64,
    /// What `move_allowance` answers.
    pub move_allowance: u64,
    /// Write tracking (`probe_tracked`): anonymous pages not in `untracked` are
    /// tracked; `dirty` holds those written since their last probe.
    pub tracking: bool,
    untracked: IntSet<usize>,
    dirty: IntSet<usize>,
    /// Application writes `(addr, bytes)` that land at the next `protect`, just before
    /// it takes effect (a writer racing with a merge window), then are forgotten.
    pub writes_at_protect: Vec<(usize, Vec<u8>)>,
    /// Pages `checksums` read (checksums taken ahead of the visits), and the most
    /// threads one call used.
    pub sums_ahead: u64,
    /// Of `sums_ahead`, those of memory ksm owns.
    pub owned_sums_ahead: u64,
    pub most_sum_threads: usize,
    /// Whether `checksums` really starts its threads (tests of the threaded path), or
    /// reads the parts one after the other on the caller's thread (fuzzers, where
    /// starting threads on every scan cost more than the checks).
    pub sum_threads: bool,
    /// Ids of frames of dropped segments that pages still map (see `drop_segment`).
    ghosts: IntSet<FrameId>,
}

impl FakeMem {
    pub fn new(page: usize) -> Self {
        FakeMem {
            page,
            pages: IntMap::default(),
            frames: IntMap::default(),
            protected: IntSet::default(),
            zero: vec![0; page],
            fail_map: false,
            fail_unmerge: false,
            unmerged: 0,
            punched: 0,
            probed: 0,
            punch_runs: Vec::new(),
            tails_released: 0,
            vma_allowance: u64::MAX,
            move_allowance: 0,
            tracking: false,
            untracked: IntSet::default(),
            dirty: IntSet::default(),
            writes_at_protect: Vec::new(),
            sums_ahead: 0,
            owned_sums_ahead: 0,
            most_sum_threads: 0,
            sum_threads: true,
            ghosts: IntSet::default(),
        }
    }

    /// Application write of `data` at `addr` (within one page); COWs a merged page.
    pub fn write(&mut self, addr: usize, data: &[u8]) {
        let base = addr - addr % self.page;
        assert!(
            !self.protected.contains(&base),
            "the fake runs writes between operations only"
        );
        let off = addr - base;
        let cur = self.read_page(base);
        let mut v = cur;
        v[off..off + data.len()].copy_from_slice(data);
        self.pages.insert(base, Backing::Anon(v));
        self.dirty.insert(base);
    }

    /// A domain segment's frames from `f0`, as sealed bytes (never written or punched).
    pub fn add_segment(&mut self, f0: FrameId, frames: &[Vec<u8>]) {
        for (i, b) in frames.iter().enumerate() {
            self.frames.insert(f0 + i as FrameId, b.clone());
        }
    }

    /// The segment of `n` frames at `f0` is unmapped (the engine's `drop_segment`):
    /// its frame ids are served no more, and may name another segment's frames later.
    /// A page that still maps one of them (moved there behind ksm's back) keeps its
    /// bytes, as the kernel keeps a memfd while a mapping of it lives: the page moves
    /// to a ghost id from the top of the id space down, which ksm must never use (it
    /// names no frame of ksm's). Returns the frames moved: (frame, ghost).
    pub fn drop_segment(&mut self, f0: FrameId, n: u32) -> Vec<(FrameId, FrameId)> {
        let mut moved = Vec::new();
        for f in f0..f0 + n {
            let Some(bytes) = self.frames.remove(&f) else {
                continue;
            };
            let mut ghost = None;
            for b in self.pages.values_mut() {
                if let Backing::Frame { f: x, .. } = b {
                    if *x == f {
                        let g = *ghost.get_or_insert_with(|| {
                            let g = FrameId::MAX - self.ghosts.len() as FrameId;
                            self.ghosts.insert(g);
                            g
                        });
                        *x = g;
                    }
                }
            }
            if let Some(g) = ghost {
                self.frames.insert(g, bytes);
                moved.push((f, g));
            }
        }
        moved
    }

    /// Frames holding bytes that are not a domain segment's (ids below `DOMAIN_BASE`).
    pub fn pool_frames_held(&self) -> usize {
        self.frames
            .keys()
            .filter(|&&f| !crate::pool::is_domain(f))
            .count()
    }

    /// Application view of a page.
    pub fn read_page(&self, base: usize) -> Vec<u8> {
        self.page_bytes(base).to_vec()
    }

    /// Application view of a page, without a copy.
    pub fn page_bytes(&self, base: usize) -> &[u8] {
        match self.pages.get(&base) {
            None => &self.zero,
            Some(Backing::Anon(v)) => v,
            Some(Backing::Frame { f, .. }) => &self.frames[f],
        }
    }

    /// Application read (faults a merged page in).
    pub fn touch(&mut self, base: usize) {
        if let Some(Backing::Frame { faulted, .. }) = self.pages.get_mut(&base) {
            *faulted = true;
        }
    }

    /// `MADV_DONTNEED`-free drop of a page (e.g. the region being unmapped).
    pub fn unmap(&mut self, base: usize) {
        self.pages.remove(&base);
    }

    /// The application's `mremap(from, len, to)`: what was at `to` is unmapped, the
    /// pages move with what they map (a frame, or their own bytes). Moved memory is
    /// not in the write tracker (the mapping keeps the userfaultfd it had).
    pub fn mremap(&mut self, from: usize, to: usize, len: usize) {
        for i in (0..len).step_by(self.page) {
            self.pages.remove(&(to + i));
        }
        for i in (0..len).step_by(self.page) {
            if let Some(b) = self.pages.remove(&(from + i)) {
                self.pages.insert(to + i, b);
            }
            self.untracked.insert(to + i);
            self.dirty.remove(&(to + i));
        }
    }

    /// Every frame some page maps.
    pub fn mapped_frames(&self) -> IntSet<FrameId> {
        self.pages
            .values()
            .filter_map(|b| match b {
                Backing::Frame { f, .. } => Some(*f),
                Backing::Anon(_) => None,
            })
            .collect()
    }

    /// The bytes frame `f` holds, if it holds any.
    pub fn frame_bytes(&self, f: FrameId) -> Option<&[u8]> {
        self.frames.get(&f).map(Vec::as_slice)
    }

    /// Frames still holding bytes.
    pub fn frames_held(&self) -> usize {
        self.frames.len()
    }

    pub fn maps_frame(&self, base: usize) -> bool {
        matches!(self.pages.get(&base), Some(Backing::Frame { .. }))
    }

    /// Whether the page is a present anonymous page (what `probe` says, without `&mut`).
    pub fn is_anon(&self, base: usize) -> bool {
        matches!(self.pages.get(&base), Some(Backing::Anon(_)))
    }
}

impl Mem for FakeMem {
    fn page_size(&self) -> usize {
        self.page
    }

    fn probe(&mut self, addr: usize, out: &mut [Presence]) -> io::Result<()> {
        self.probed += out.len() as u64;
        for (i, o) in out.iter_mut().enumerate() {
            *o = match self.pages.get(&(addr + i * self.page)) {
                None => Presence::Absent,
                Some(Backing::Anon(_)) => Presence::Anon,
                Some(Backing::Frame { faulted: true, .. }) => Presence::File,
                Some(Backing::Frame { faulted: false, .. }) => Presence::Absent,
            };
        }
        Ok(())
    }

    fn probe_tracked(
        &mut self,
        addr: usize,
        out: &mut [Presence],
        tracked: &mut [bool],
        unchanged: &mut [bool],
        _frames: bool,
    ) -> io::Result<()> {
        self.probe(addr, out)?;
        for i in 0..out.len() {
            let a = addr + i * self.page;
            tracked[i] = self.tracking && out[i] == Presence::Anon && !self.untracked.contains(&a);
            unchanged[i] = tracked[i] && !self.dirty.contains(&a);
            if tracked[i] {
                self.dirty.remove(&a); // write-protected again
            }
        }
        Ok(())
    }

    fn write_tracking(&self) -> bool {
        self.tracking
    }

    fn set_write_tracking(&mut self, on: bool) {
        self.tracking = on;
    }

    fn untrack(&mut self, addr: usize, len: usize) -> io::Result<()> {
        for a in (addr..addr + len).step_by(self.page) {
            self.untracked.insert(a);
        }
        Ok(())
    }

    fn track_covered(&mut self, addr: usize, len: usize) -> io::Result<()> {
        if self.tracking {
            for a in (addr..addr + len).step_by(self.page) {
                self.untracked.remove(&a);
                self.dirty.remove(&a);
            }
        }
        Ok(())
    }

    fn retrack(&mut self, addr: usize, len: usize) {
        // As the kernel: registering with the tracker again write-protects afresh, so
        // a write it had not reported yet is forgotten.
        for a in (addr..addr + len).step_by(self.page) {
            self.untracked.remove(&a);
            self.dirty.remove(&a);
        }
    }

    fn read(&mut self, addr: usize, _owned: bool, buf: &mut [u8]) -> io::Result<()> {
        self.touch(addr);
        buf.copy_from_slice(self.page_bytes(addr));
        Ok(())
    }

    /// As the Os: the pages in `threads` parts read side by side, one thread each
    /// (however few pages, so that tests run the threaded path).
    fn checksums(
        &mut self,
        addrs: &[usize],
        owned: bool,
        threads: usize,
        sum: fn(&[u8]) -> u32,
        out: &mut [Option<u32>],
    ) {
        let per = addrs.len().div_ceil(threads.max(1)).max(1);
        let me = &*self;
        let part = move |a: &[usize], o: &mut [Option<u32>]| {
            for (&a, o) in a.iter().zip(o) {
                *o = Some(sum(me.page_bytes(a)));
            }
        };
        if self.sum_threads {
            std::thread::scope(|s| {
                for (a, o) in addrs.chunks(per).zip(out.chunks_mut(per)) {
                    s.spawn(move || part(a, o));
                }
            });
        } else {
            for (a, o) in addrs.chunks(per).zip(out.chunks_mut(per)) {
                part(a, o);
            }
        }
        for &a in addrs {
            self.touch(a);
        }
        self.sums_ahead += addrs.len() as u64;
        if owned {
            self.owned_sums_ahead += addrs.len() as u64;
        }
        self.most_sum_threads = self.most_sum_threads.max(addrs.len().div_ceil(per));
    }

    fn frame(&self, f: FrameId) -> &[u8] {
        assert!(!self.ghosts.contains(&f), "frame of a dropped segment read");
        &self.frames[&f]
    }

    fn write_frame(&mut self, f: FrameId, data: &[u8]) -> io::Result<()> {
        assert!(!crate::pool::is_domain(f), "domain frame {f} written");
        assert!(
            !self
                .pages
                .values()
                .any(|b| matches!(b, Backing::Frame { f: x, .. } if *x == f)),
            "frame {f} rewritten while mapped"
        );
        self.frames.insert(f, data.to_vec());
        Ok(())
    }

    fn punch(&mut self, f: FrameId) -> io::Result<()> {
        assert!(!crate::pool::is_domain(f), "domain frame {f} punched");
        assert!(
            !self
                .pages
                .values()
                .any(|b| matches!(b, Backing::Frame { f: x, .. } if *x == f)),
            "frame {f} punched while mapped"
        );
        self.frames.remove(&f);
        self.punched += 1;
        Ok(())
    }

    fn punch_run(&mut self, f0: FrameId, n: u32) -> io::Result<()> {
        self.punch_runs.push((f0, n));
        for f in f0..f0 + n {
            self.punch(f)?;
        }
        Ok(())
    }

    fn vma_allowance(&mut self) -> u64 {
        self.vma_allowance
    }

    fn move_allowance(&mut self) -> u64 {
        self.move_allowance
    }

    fn protect(&mut self, addr: usize, len: usize) -> io::Result<()> {
        for (a, bytes) in std::mem::take(&mut self.writes_at_protect) {
            self.write(a, &bytes);
        }
        for a in (addr..addr + len).step_by(self.page) {
            self.protected.insert(a);
            // As the Os: closing the window unprotects every page of it, so a covered
            // page `track_covered` protected is not tracked any more.
            self.untracked.insert(a);
        }
        Ok(())
    }

    fn release(&mut self, addr: usize, len: usize, _unprotect: bool) {
        for a in (addr..addr + len).step_by(self.page) {
            self.protected.remove(&a);
        }
    }

    fn release_tail(&mut self, addr: usize, len: usize, keep: usize) {
        assert!(
            keep > 0 && keep < len && keep % self.page == 0,
            "bad window shrink"
        );
        for a in (addr + keep..addr + len).step_by(self.page) {
            assert!(
                self.protected.remove(&a),
                "shrink of a page outside the window"
            );
        }
        self.tails_released += 1;
    }

    fn zap(&mut self, addr: usize) -> io::Result<()> {
        assert!(
            self.protected.contains(&addr),
            "zap outside the merge window"
        );
        // In the real process a zap inside a VMA mapping a frame would bring the
        // frame's bytes back: only anonymous pages may be zapped.
        match self.pages.get(&addr) {
            Some(Backing::Anon(v)) => assert!(v.iter().all(|&b| b == 0), "zap of a non-zero page"),
            other => panic!("zap of a page that is not anonymous: {other:?}"),
        }
        self.pages.remove(&addr);
        Ok(())
    }

    fn map_frames(
        &mut self,
        addr: usize,
        n: usize,
        _prot: i32,
        f0: FrameId,
        covered: &[(usize, Vec<u8>)],
    ) -> io::Result<bool> {
        for i in 0..n {
            let (a, f) = (addr + i * self.page, f0 + i as FrameId);
            assert!(
                !self.ghosts.contains(&f),
                "a page mapped onto a dropped segment"
            );
            assert!(
                self.protected.contains(&a),
                "remap outside the merge window"
            );
            match covered.iter().find(|(k, _)| *k == i) {
                Some((_, bytes)) => assert_eq!(self.page_bytes(a), bytes, "covered page changed"),
                None => assert_eq!(
                    self.page_bytes(a),
                    self.frames[&f],
                    "remap would change contents"
                ),
            }
        }
        if self.fail_map {
            return Err(io::Error::from_raw_os_error(libc::ENOMEM));
        }
        // The Os populates a new mapping's PTEs at once (read faults, no copy); a
        // covered page is a private copy of its own bytes. A pool mapping is never
        // write-tracked.
        for i in 0..n {
            self.untracked.insert(addr + i * self.page);
            let f = f0 + i as FrameId;
            let b = match covered.iter().find(|(k, _)| *k == i) {
                Some((_, bytes)) => Backing::Anon(bytes.clone()),
                None => Backing::Frame { f, faulted: true },
            };
            self.pages.insert(addr + i * self.page, b);
        }
        // As the Os copying covered bytes by hand: the caller punches free frames there.
        Ok(!covered.is_empty())
    }

    fn unmerge_run(&mut self, addr: usize, len: usize, _prot: i32, _owned: bool) -> io::Result<()> {
        if self.fail_unmerge {
            return Err(io::Error::from_raw_os_error(libc::EAGAIN));
        }
        for a in (addr..addr + len).step_by(self.page) {
            self.unmerged += 1;
            if self.pages.contains_key(&a) {
                let v = self.read_page(a);
                self.pages.insert(a, Backing::Anon(v));
            }
            // Anonymous memory ksm owns again: the Os tracks it afresh.
            self.untracked.remove(&a);
            self.dirty.remove(&a);
        }
        Ok(())
    }
}
