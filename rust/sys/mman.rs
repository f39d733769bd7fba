//! Memory mappings: mmap(2), munmap(2), madvise(2), mprotect(2), mremap(2).
//!
//! [`Mapping`] owns a range and unmaps it on drop. The two functions that
//! replace memory in place (`MAP_FIXED`, `mremap` to a fixed address) are
//! crate-private and take a userfaultfd [`Window`]: proof that the range is
//! write-protected by our context, so no write can land during the swap. The
//! Window does not prove that the range is memory ksm tracks; that is the duty
//! of their one caller, `os::Os`, which only opens windows on tracked pages
//! (memory the application advised, and ksm's own). ksm holds no Rust
//! reference into such memory (it copies out of it), so replacing it with the
//! same bytes cannot invalidate a borrow.

use std::io;
use std::os::fd::RawFd;
use std::ptr;

use super::cvt;
use super::uffd::Window;

/// A mapping this process created and unmaps on drop.
#[derive(Debug)]
pub struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// Anonymous private read-write memory, with `MADV_NOHUGEPAGE` (huge pages
    /// would be split by page-sized write-protection and could not be rebuilt).
    pub fn anonymous(len: usize) -> io::Result<Self> {
        super::inject::check(super::inject::Point::Anonymous)?;
        let m = map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )?;
        // SAFETY: the range was just mapped by us; NOHUGEPAGE does not change contents.
        cvt(unsafe { libc::madvise(m.addr as *mut libc::c_void, len, libc::MADV_NOHUGEPAGE) })?;
        Ok(m)
    }

    /// `len` bytes nobody can read or write (`PROT_NONE`): a source address that
    /// the kernel's user copies fail on with EFAULT (see `Uffd::prepare_anon_vma`).
    pub fn inaccessible(len: usize) -> io::Result<Self> {
        map(
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    }

    /// A read-write `MAP_SHARED` view of `fd` (the frame pool), reserved
    /// sparsely: `MAP_NORESERVE`, no memory until a page is written.
    pub fn shared_view(fd: RawFd, len: usize) -> io::Result<Self> {
        map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
            fd,
            0,
        )
    }

    /// A private read-write mapping of `len` bytes of `fd` from `offset`
    /// (`MAP_PRIVATE`): a run of frames assembled aside before `move_over` puts it in
    /// place. Writes into it give private copies; the file never changes.
    pub fn file_private(fd: RawFd, offset: u64, len: usize) -> io::Result<Self> {
        super::inject::check(super::inject::Point::Anonymous)?;
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        map(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd,
            off,
        )
    }

    /// A read-only `MAP_SHARED` view of `len` bytes of `fd` (a sealed domain segment,
    /// whose frames are compared through it). With `F_SEAL_WRITE` the kernel refuses to
    /// ever make such a mapping writable.
    pub fn read_only_view(fd: RawFd, len: usize) -> io::Result<Self> {
        super::inject::check(super::inject::Point::MapSegment)?;
        map(len, libc::PROT_READ, libc::MAP_SHARED, fd, 0)
    }

    pub fn addr(&self) -> usize {
        self.addr
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes of `[offset, offset+len)` of this mapping.
    ///
    /// Only for mappings whose contents no other thread writes (the pool view:
    /// frames are written by `pwrite` before anyone can map them).
    pub(crate) fn bytes(&self, offset: usize, len: usize) -> &[u8] {
        assert!(
            offset.checked_add(len).is_some_and(|e| e <= self.len),
            "range outside mapping"
        );
        // SAFETY: the range lies inside a live mapping owned by `self` (checked above),
        // which stays mapped for the lifetime of the returned borrow; per this method's
        // contract nothing writes those bytes while they are borrowed.
        unsafe { std::slice::from_raw_parts((self.addr + offset) as *const u8, len) }
    }

    /// Copy `buf.len()` bytes at `offset` out of this mapping.
    ///
    /// Application threads may write the mapping concurrently (it is exported to
    /// Python as a buffer): the copy can then be torn, which callers allow for by
    /// comparing again under write-protection before acting on it.
    pub fn copy_out(&self, offset: usize, buf: &mut [u8]) {
        assert!(
            offset.checked_add(buf.len()).is_some_and(|e| e <= self.len),
            "range outside mapping"
        );
        // SAFETY: the source lies inside this live mapping (checked above), which stays
        // mapped while `self` is borrowed; `buf` is a distinct Rust buffer. Concurrent
        // writers only make the copied bytes stale, never invalid (plain bytes).
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + offset) as *const u8,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
    }
}

impl Mapping {
    /// Whether the bytes at `offset` of this mapping equal `data` (libc `memcmp` over
    /// the mapping in place: no copy).
    ///
    /// Application threads may write the mapping concurrently (see `copy_out`): the
    /// answer is then only a hint, except for pages write-protected by a merge window
    /// (no write can land there), where it is the answer the merge acts on.
    pub fn equals(&self, offset: usize, data: &[u8]) -> bool {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|e| e <= self.len),
            "range outside mapping"
        );
        // SAFETY: the range lies inside this live mapping (checked above), which stays
        // mapped while `self` is borrowed; `data` is a valid slice of the same length.
        // memcmp only reads; concurrent writers (plain bytes) only make the answer stale,
        // and no Rust reference is formed over the mapping's bytes.
        unsafe {
            libc::memcmp(
                (self.addr + offset) as *const libc::c_void,
                data.as_ptr().cast(),
                data.len(),
            ) == 0
        }
    }

    /// Whether `len` bytes at `offset` of this mapping equal `len` bytes at
    /// `other_offset` of `other` (libc `memcmp`, both in place; see `equals`).
    pub fn equals_at(
        &self,
        offset: usize,
        other: &Mapping,
        other_offset: usize,
        len: usize,
    ) -> bool {
        let inside = |m: &Mapping, o: usize| o.checked_add(len).is_some_and(|e| e <= m.len);
        assert!(
            inside(self, offset) && inside(other, other_offset),
            "range outside mapping"
        );
        // SAFETY: both ranges lie inside live mappings (checked above), mapped while
        // `self` and `other` are borrowed; memcmp only reads (see `equals`).
        unsafe {
            libc::memcmp(
                (self.addr + offset) as *const libc::c_void,
                (other.addr + other_offset) as *const libc::c_void,
                len,
            ) == 0
        }
    }

    /// Give every page of this mapping its memory now (`MADV_POPULATE_WRITE`), so
    /// that filling it takes no page fault per page, and so that running out of
    /// memory shows here, as ENOMEM, before anything else has changed. A kernel
    /// without `MADV_POPULATE_WRITE` (before 5.14, EINVAL) is not an error: the
    /// pages are then faulted in as they are written.
    ///
    /// Only for private scratch mappings nobody else can see yet (the unmerge copy).
    pub fn populate_write(&self) -> io::Result<()> {
        const MADV_POPULATE_WRITE: i32 = 23;
        // SAFETY: the range is owned by `self`; populating anonymous private memory
        // for writing allocates zero-filled pages and changes no byte anyone reads.
        match cvt(unsafe {
            libc::madvise(
                self.addr as *mut libc::c_void,
                self.len,
                MADV_POPULATE_WRITE,
            )
        }) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
            r => r.map(drop),
        }
    }

    /// The whole mapping as one mutable byte slice, to fill it in place.
    ///
    /// Only for private scratch mappings nobody else can see yet (the unmerge copy):
    /// `&mut self` is then the only way to reach these bytes.
    pub fn scratch_mut(&mut self) -> &mut [u8] {
        // SAFETY: the range is a live read-write mapping owned by `self` (`anonymous`
        // maps PROT_READ|PROT_WRITE), which stays mapped for the lifetime of the borrow;
        // per this method's contract no other thread knows its address, and the
        // exclusive borrow of `self` keeps any other Rust reference to it from existing.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }

    /// Copy `data` into this mapping at `offset`.
    ///
    /// Only for private scratch mappings nobody else can see yet (the unmerge copy).
    pub fn copy_in(&self, offset: usize, data: &[u8]) {
        assert!(
            offset
                .checked_add(data.len())
                .is_some_and(|e| e <= self.len),
            "range outside mapping"
        );
        // SAFETY: the destination lies inside this live read-write mapping (checked above;
        // `anonymous` maps PROT_READ|PROT_WRITE) and no Rust reference into it exists.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                (self.addr + offset) as *mut u8,
                data.len(),
            )
        };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `self` owns exactly this range; nothing borrows it past `self`.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

fn map(len: usize, prot: i32, flags: i32, fd: RawFd, off: i64) -> io::Result<Mapping> {
    if len == 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: no MAP_FIXED: the kernel picks a fresh range, so no existing memory changes.
    let p = unsafe { libc::mmap(ptr::null_mut(), len, prot, flags, fd, off) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(Mapping {
        addr: p as usize,
        len,
    })
}

/// Map `len` bytes of `fd` at `offset` privately (`MAP_PRIVATE|MAP_FIXED`) over
/// the write-protected window `w`: the merge step. A later write gets a private
/// copy from the kernel (copy-on-write); the frame never changes.
///
/// Safe to call because `w` proves the range is registered with our
/// userfaultfd and write-protected (no write can land during the swap) and ksm
/// holds no Rust reference into advised memory; that the bytes are equal is the
/// merge protocol's duty (it compares under the same window).
pub(crate) fn map_file_fixed(w: &Window, prot: i32, fd: RawFd, offset: u64) -> io::Result<()> {
    super::inject::check(super::inject::Point::MapFixed)?;
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: MAP_FIXED replaces exactly the window's range, which is protected and
    // referenced by no Rust borrow (see above); the kernel validates fd and offset.
    let p = unsafe {
        libc::mmap(
            w.addr() as *mut libc::c_void,
            w.len(),
            prot,
            libc::MAP_PRIVATE | libc::MAP_FIXED,
            fd,
            off,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    debug_assert_eq!(p as usize, w.addr());
    Ok(())
}

/// `MADV_DONTNEED` the write-protected window `w`: the zero-page merge
/// (`use_zero_pages`). In an anonymous private VMA the pages read zeros from the
/// kernel's zero page afterwards and hold no memory; the caller checked, under
/// the same window, that they held only zeros, and that the VMA is anonymous
/// (in a private file mapping the file's bytes would come back).
pub(crate) fn discard(w: &Window) -> io::Result<()> {
    // SAFETY: the range is the protected window (no write can land in it, and ksm
    // holds no Rust reference into advised memory); dropping all-zero pages of an
    // anonymous mapping leaves the bytes every reader sees unchanged.
    cvt(unsafe { libc::madvise(w.addr() as *mut libc::c_void, w.len(), libc::MADV_DONTNEED) })?;
    Ok(())
}

/// `MADV_DONTNEED` of `[addr, addr+len)`, pages of the write-protected window `w`
/// that map a frame (a pool mapping, private): they lose their PTE, and their next
/// access is a minor fault that the fault thread answers (zeros where the
/// application discarded them). For a page the application discarded while its merge
/// was mapping it again (see `Os::prepare_merged`).
pub(crate) fn discard_in(w: &Window, addr: usize, len: usize) -> io::Result<()> {
    if addr < w.addr() || addr + len > w.addr() + w.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the range lies inside the protected window (checked above), which ksm
    // holds no Rust reference into; dropping PTEs of a private file mapping changes no
    // byte of the file, and the page's next access is served by the fault thread.
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_DONTNEED) })?;
    Ok(())
}

/// `MADV_POPULATE_READ`: fault the pages of `[addr, addr+len)` in for reading, so
/// that a merged page has its PTE (pointing at the frame) from the start. Read
/// faults change no contents and never break copy-on-write.
/// `madvise(MADV_HUGEPAGE)` over `[addr, addr+len)`: transparent huge pages where the
/// kernel's setting allows them on request (`madvise`), as numpy asks for its large
/// arrays. A merge inside a huge page splits it (as the kernel's ksmd does).
pub fn hugepage(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: advice on memory the caller maps; MADV_HUGEPAGE changes no contents.
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE) })?;
    Ok(())
}

pub fn populate_read(addr: usize, len: usize) -> io::Result<()> {
    const MADV_POPULATE_READ: i32 = 22;
    // SAFETY: populating for read changes no byte of the range; an unmapped or
    // inaccessible range only makes the call fail.
    cvt(unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_READ) })?;
    Ok(())
}

/// Move `scratch` over the write-protected window `w` (`mremap MAYMOVE|FIXED`):
/// the unmerge step, and the merge of a run with covered pages. `scratch` (the
/// window's bytes: private copies, or frames with the covered pages' own copies
/// among them) is consumed.
pub(crate) fn move_over(scratch: Mapping, w: &Window) -> io::Result<()> {
    super::inject::check(super::inject::Point::MoveOver)?;
    if scratch.len != w.len() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: the source is a mapping we own and give up here (forgotten only on
    // success); the target is the protected window, referenced by no Rust borrow.
    let p = unsafe {
        libc::mremap(
            scratch.addr as *mut libc::c_void,
            scratch.len,
            scratch.len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            w.addr() as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(scratch);
    Ok(())
}

/// `mprotect` of a range the caller owns.
pub fn protect_owned(m: &Mapping, prot: i32) -> io::Result<()> {
    // SAFETY: the range is owned by `m`; changing protection does not change contents.
    cvt(unsafe { libc::mprotect(m.addr as *mut libc::c_void, m.len, prot) })?;
    Ok(())
}
