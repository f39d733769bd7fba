//! memfd: the anonymous file that holds the frames (shared copies of pages).
//!
//! See memfd_create(2), ftruncate(2), fallocate(2). The memfd is sized once,
//! sparsely (no memory is used until a frame is written), and frames are
//! returned to the system by punching holes.
//!
//! Segments of a merge domain are memfds too, but sealed once filled
//! (`F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL`): other processes
//! map them, so their bytes must never change, and the kernel refuses every
//! write, hole punch or resize of a sealed file (fcntl(2), "File Sealing").

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::cvt;

/// An owned memfd.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    /// `memfd_create(name, MFD_CLOEXEC)` then `ftruncate(size)`.
    pub fn create(name: &CStr, size: u64) -> io::Result<Self> {
        // SAFETY: `name` is a valid NUL-terminated string; flags are constants.
        let raw = cvt(unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) })?;
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len =
            libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscall on an fd we own.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
        Ok(Memfd { fd })
    }

    /// A memfd that can be sealed (`MFD_ALLOW_SEALING`), sized `size`: a segment of a
    /// merge domain, filled with `write_at` and then [`Memfd::seal`]ed before any other
    /// process sees it.
    pub fn create_sealable(name: &CStr, size: u64) -> io::Result<Self> {
        // SAFETY: `name` is a valid NUL-terminated string; flags are constants.
        let raw = cvt(unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        })?;
        // SAFETY: memfd_create just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len =
            libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscall on an fd we own.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })?;
        Ok(Memfd { fd })
    }

    /// Set the file's size (`ftruncate`; before sealing only).
    pub fn set_len(&self, size: u64) -> io::Result<()> {
        let len =
            libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: plain syscall on an fd we own.
        cvt(unsafe { libc::ftruncate(self.fd.as_raw_fd(), len) })?;
        Ok(())
    }

    /// Adopt a descriptor received from another process. Nothing is assumed of it:
    /// [`Memfd::is_sealed_segment`] says whether it can be trusted to never change.
    pub fn from_owned(fd: OwnedFd) -> Self {
        Memfd { fd }
    }

    /// A second descriptor of the same file (`F_DUPFD_CLOEXEC`).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Memfd {
            fd: self.fd.try_clone()?,
        })
    }

    /// The descriptor, to pass to another process.
    pub fn as_owned(&self) -> &OwnedFd {
        &self.fd
    }

    /// Seal the file for good: no write (`pwrite`, writable shared mappings), no hole
    /// punched, no size change, no seal removed. Its pages never change from now on,
    /// whoever holds it; the kernel frees them when the last mapping and descriptor go.
    pub fn seal(&self) -> io::Result<()> {
        super::inject::check(super::inject::Point::Seal)?;
        // SAFETY: plain fcntl on an fd we own.
        cvt(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_ADD_SEALS, SEGMENT_SEALS) })?;
        Ok(())
    }

    /// Whether this is a memfd carrying every seal of [`Memfd::seal`] (`F_GET_SEALS`
    /// fails on anything that is not a memfd or shmem file), with a size of `size`.
    pub fn is_sealed_segment(&self, size: u64) -> bool {
        // SAFETY: plain fcntl on an fd we own.
        let seals = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GET_SEALS) };
        seals != -1 && seals & SEGMENT_SEALS == SEGMENT_SEALS && self.size().ok() == Some(size)
    }

    /// The file size (`st_size`).
    pub fn size(&self) -> io::Result<u64> {
        Ok(self.stat()?.st_size as u64)
    }

    /// Device and inode: a file's identity while it exists, the same in every process.
    pub fn identity(&self) -> io::Result<(u64, u64)> {
        let st = self.stat()?;
        Ok((st.st_dev, st.st_ino))
    }

    fn stat(&self) -> io::Result<libc::stat> {
        // SAFETY: zeroed `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is valid for writes for the duration of the call.
        cvt(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(st)
    }

    /// Release the memory of `[offset, offset+len)` (`FALLOC_FL_PUNCH_HOLE`).
    pub fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        super::inject::check(super::inject::Point::Punch)?;
        let (off, len) = (to_off(offset)?, to_off(len)?);
        // SAFETY: plain syscall on an fd we own; the kernel checks the range.
        cvt(unsafe {
            libc::fallocate(
                self.fd.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        })?;
        Ok(())
    }

    /// Write `buf` at `offset` (`pwrite`, looping on short writes).
    pub fn write_at(&self, mut offset: u64, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let off = to_off(offset)?;
            let n = super::retry_eintr(|| {
                // SAFETY: `buf` is a valid readable slice of `buf.len()` bytes.
                cvt(unsafe {
                    libc::pwrite(self.fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off)
                })
            })?;
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            buf = &buf[n as usize..];
            offset += n as u64;
        }
        Ok(())
    }

    /// Write the `len` bytes at `offset_in_src` of mapping `src` at `offset` (`pwrite`
    /// straight from the mapping, looping on short writes): the kernel reads the bytes,
    /// no copy is made in between. For pages a merge window write-protects, so that
    /// what is written is what was compared.
    pub fn write_from(
        &self,
        offset: u64,
        src: &super::mman::Mapping,
        offset_in_src: usize,
        len: usize,
    ) -> io::Result<()> {
        assert!(
            offset_in_src
                .checked_add(len)
                .is_some_and(|e| e <= src.len()),
            "range outside mapping"
        );
        let (mut done, mut offset) = (0, offset);
        while done < len {
            let off = to_off(offset)?;
            let from = src.addr() + offset_in_src + done;
            let n = super::retry_eintr(|| {
                // SAFETY: `[from, from+len-done)` lies inside the live mapping `src`
                // (checked above), which `src`'s borrow keeps mapped; the kernel only
                // reads it (and reports memory it cannot read as EFAULT), no Rust
                // reference is formed over it.
                cvt(unsafe {
                    libc::pwrite(
                        self.fd.as_raw_fd(),
                        from as *const libc::c_void,
                        len - done,
                        off,
                    )
                })
            })?;
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            done += n as usize;
            offset += n as u64;
        }
        Ok(())
    }

    /// Blocks in use (`st_blocks` of `fstat`, 512-byte units).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        // SAFETY: zeroed `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is valid for writes for the duration of the call.
        cvt(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(st.st_blocks as u64 * 512)
    }

    /// The inode number (to find other processes that still map this file).
    pub fn inode(&self) -> io::Result<u64> {
        // SAFETY: as in `allocated_bytes`.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is valid for writes for the duration of the call.
        cvt(unsafe { libc::fstat(self.fd.as_raw_fd(), &mut st) })?;
        Ok(st.st_ino)
    }

    pub fn raw(&self) -> i32 {
        self.fd.as_raw_fd()
    }
}

/// The seals of a domain segment: its bytes and size are fixed, and so are the seals.
const SEGMENT_SEALS: i32 =
    libc::F_SEAL_WRITE | libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

fn to_off(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_segment_refuses_writes_and_holes_and_is_recognised() {
        let page = crate::sys::page_size();
        let m = Memfd::create_sealable(c"ksm-test-seg", 2 * page as u64).unwrap();
        m.write_at(0, &vec![5u8; page]).unwrap();
        assert!(!m.is_sealed_segment(2 * page as u64), "not sealed yet");
        m.seal().unwrap();
        assert!(m.is_sealed_segment(2 * page as u64));
        assert!(!m.is_sealed_segment(page as u64), "size must match");
        let e = m.write_at(0, &[1]).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        let e = m.punch_hole(0, page as u64).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
        // A pool memfd (no sealing allowed) is not a segment.
        let p = Memfd::create(c"ksm-test-pool", page as u64).unwrap();
        assert!(!p.is_sealed_segment(page as u64));
    }
}
