//! Unix sockets between the members of a merge domain and their broker:
//! `SOCK_SEQPACKET` sockets (one `send` is one message, boundaries kept),
//! file descriptors passed with `SCM_RIGHTS`, the peer's credentials from
//! `SO_PEERCRED`, plus the process calls the broker needs (`posix_spawn`,
//! `waitpid`, `flock`, `poll`).
//!
//! See unix(7), sendmsg(2), recvmsg(2), cmsg(3), socket(7) (`SO_PEERCRED`),
//! posix_spawn(3), flock(2), poll(2).
//!
//! Everything received is untrusted: `recv` reports a truncated message or a
//! truncated set of descriptors as an error (the caller drops such a message),
//! and every received descriptor is an [`OwnedFd`] with `O_CLOEXEC`, closed
//! unless the caller keeps it.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::{cvt, retry_eintr};

/// Most descriptors one message carries.
pub const MAX_FDS: usize = 8;

/// A `SOCK_SEQPACKET` Unix socket, connected or listening.
#[derive(Debug)]
pub struct Socket {
    fd: OwnedFd,
}

/// The credentials the kernel recorded for a socket's peer (`SO_PEERCRED`): taken
/// when it connected, not something the peer says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: zeroed `sockaddr_un` is a valid value of this plain C struct.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "socket path {} is empty, contains NUL or is longer than {} bytes",
                path.display(),
                addr.sun_path.len() - 1
            ),
        ));
    }
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

fn new_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with constant arguments.
    let raw =
        cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket() just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

impl Socket {
    /// A listening socket bound at `path` (which must not exist).
    pub fn listen(path: &Path) -> io::Result<Socket> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: `addr` is a valid `sockaddr_un` of `len` bytes for the call.
        cvt(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                len,
            )
        })?;
        // SAFETY: plain syscall on an fd we own.
        cvt(unsafe { libc::listen(fd.as_raw_fd(), 64) })?;
        Ok(Socket { fd })
    }

    /// A socket connected to the listening socket at `path`.
    pub fn connect(path: &Path) -> io::Result<Socket> {
        let fd = new_socket()?;
        let (addr, len) = sockaddr(path)?;
        retry_eintr(|| {
            // SAFETY: `addr` is a valid `sockaddr_un` of `len` bytes for the call.
            cvt(unsafe {
                libc::connect(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_un).cast(),
                    len,
                )
            })
        })?;
        Ok(Socket { fd })
    }

    /// Two connected sockets (for tests and in-process pairs).
    pub fn pair() -> io::Result<(Socket, Socket)> {
        let mut fds = [0; 2];
        // SAFETY: `fds` is valid for writes of two ints.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: socketpair() just returned these fds and nothing else owns them.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((Socket { fd: a }, Socket { fd: b }))
    }

    /// Accept one connection (blocking unless the socket is non-blocking).
    pub fn accept(&self) -> io::Result<Socket> {
        let raw = retry_eintr(|| {
            // SAFETY: null address arguments are allowed: the peer's address is not wanted.
            cvt(unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            })
        })?;
        // SAFETY: accept4() just returned this fd and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(Socket { fd })
    }

    /// The peer's credentials as the kernel recorded them at connect time.
    pub fn peer_cred(&self) -> io::Result<PeerCred> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` and `len` are valid for writes; the kernel writes at most `len` bytes.
        cvt(unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        })?;
        Ok(PeerCred {
            pid: cred.pid,
            uid: cred.uid,
        })
    }

    /// Send one message with `fds` attached. `nonblocking`: fail with EAGAIN rather
    /// than wait for the peer to read (a broker must not be stalled by a member that
    /// stops reading). Never raises SIGPIPE: a closed peer is EPIPE.
    pub fn send(&self, data: &[u8], fds: &[RawFd], nonblocking: bool) -> io::Result<()> {
        assert!(
            fds.len() <= MAX_FDS,
            "at most {MAX_FDS} descriptors per message"
        );
        super::inject::check(super::inject::Point::Send)?;
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut cbuf = [0u64; 8 + MAX_FDS / 2];
        // SAFETY: zeroed `msghdr` is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if !fds.is_empty() {
            let bytes = std::mem::size_of_val(fds);
            // SAFETY: CMSG_SPACE only computes a size.
            let space = unsafe { libc::CMSG_SPACE(bytes as u32) } as usize;
            debug_assert!(space <= std::mem::size_of_val(&cbuf));
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: `msg_control` points at `cbuf`, 8-byte aligned and at least `space`
            // bytes (checked above), so the first header and its data lie inside it;
            // CMSG_FIRSTHDR returns a pointer into that buffer (non-null: space > 0).
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as usize;
                std::ptr::copy_nonoverlapping(
                    fds.as_ptr(),
                    libc::CMSG_DATA(c).cast::<RawFd>(),
                    fds.len(),
                );
            }
        }
        let flags = libc::MSG_NOSIGNAL | if nonblocking { libc::MSG_DONTWAIT } else { 0 };
        let n = retry_eintr(|| {
            // SAFETY: `msg` points at `iov` (over `data`) and `cbuf`, all alive for the call.
            cvt(unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, flags) })
        })?;
        if n as usize != data.len() {
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        Ok(())
    }

    /// Receive one message into `buf` with the descriptors it carries. `Ok(None)` at
    /// end of stream (the peer closed). A message longer than `buf`, or with more
    /// descriptors than [`MAX_FDS`], is an error (EMSGSIZE); its descriptors are closed.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<(usize, Vec<OwnedFd>)>> {
        super::inject::check(super::inject::Point::Recv)?;
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8 + MAX_FDS / 2];
        // SAFETY: zeroed `msghdr` is a valid value of this plain C struct.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        let n = retry_eintr(|| {
            // SAFETY: `msg` points at `iov` (over `buf`) and `cbuf`, writable and alive
            // for the call; the kernel writes at most their lengths.
            cvt(unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })
        })? as usize;
        let mut fds = Vec::new();
        // SAFETY: after a successful recvmsg, `msg.msg_control`/`msg_controllen` describe
        // the control data the kernel wrote into `cbuf`; CMSG_FIRSTHDR/NXTHDR stay
        // inside it, and each SCM_RIGHTS payload holds `(cmsg_len - CMSG_LEN(0)) / 4`
        // descriptors that the kernel installed in this process for us to own.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                    let data = libc::CMSG_DATA(c).cast::<RawFd>();
                    for i in 0..bytes / std::mem::size_of::<RawFd>() {
                        fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
            // `fds` is dropped: every descriptor that did arrive is closed.
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        if n == 0 && fds.is_empty() {
            return Ok(None);
        }
        Ok(Some((n, fds)))
    }

    /// Give the socket a send timeout (a blocking `send` fails with EAGAIN after it).
    pub fn set_send_timeout(&self, ms: u64) -> io::Result<()> {
        let tv = libc::timeval {
            tv_sec: (ms / 1000) as libc::time_t,
            tv_usec: ((ms % 1000) * 1000) as libc::suseconds_t,
        };
        // SAFETY: `tv` is a valid timeval for the call.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(())
    }

    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Wait until one of `fds` is readable (or closed), at most `timeout_ms` (-1: no
/// limit). Returns per descriptor whether it is ready.
pub fn poll_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    retry_eintr(|| {
        // SAFETY: `p` is a valid array of `p.len()` pollfds for the call.
        cvt(unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, timeout_ms) })
    })?;
    Ok(p.iter().map(|x| x.revents != 0).collect())
}

/// Start `argv[0]` (a path) with `argv` and `env`, in a session of its own, with
/// stdin, stdout and stderr on /dev/null and no other descriptor of ours (so it
/// holds no pipe of ours open: a multiprocessing worker's sentinel, say, which its
/// parent waits on to see the worker exit), and return its pid. Unlike fork,
/// posix_spawn runs no fork handler of this process (ksm's take its state lock) and
/// copies nothing of it.
pub fn spawn(argv: &[String], env: &[String]) -> io::Result<i32> {
    let cstr = |s: &String| {
        CString::new(s.as_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "argument or environment with NUL",
            )
        })
    };
    if argv.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no program to start",
        ));
    }
    let args: Vec<CString> = argv.iter().map(cstr).collect::<io::Result<_>>()?;
    let envs: Vec<CString> = env.iter().map(cstr).collect::<io::Result<_>>()?;
    let mut argp: Vec<*mut libc::c_char> = args.iter().map(|s| s.as_ptr().cast_mut()).collect();
    argp.push(std::ptr::null_mut());
    let mut envp: Vec<*mut libc::c_char> = envs.iter().map(|s| s.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());
    let devnull: &CStr = c"/dev/null";
    // SAFETY: zeroed attribute objects are only handed to their init functions, which
    // set them up; each is destroyed below whatever happens in between. Every pointer
    // passed (program, argv, envp, path) points at NUL-terminated strings in `args`,
    // `envs` and `devnull`, alive for the whole call, and argv/envp end with null.
    unsafe {
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        let mut at: libc::posix_spawnattr_t = std::mem::zeroed();
        let r = libc::posix_spawn_file_actions_init(&mut fa);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        let r = libc::posix_spawnattr_init(&mut at);
        if r != 0 {
            libc::posix_spawn_file_actions_destroy(&mut fa);
            return Err(io::Error::from_raw_os_error(r));
        }
        let mut r = 0;
        for fd in 0..3 {
            let flags = if fd == 0 {
                libc::O_RDONLY
            } else {
                libc::O_WRONLY
            };
            if r == 0 {
                r = libc::posix_spawn_file_actions_addopen(&mut fa, fd, devnull.as_ptr(), flags, 0);
            }
        }
        if r == 0 {
            // Descriptors the application left inheritable, closed in the child only.
            r = libc::posix_spawn_file_actions_addclosefrom_np(&mut fa, 3);
        }
        if r == 0 {
            r = libc::posix_spawnattr_setflags(&mut at, libc::POSIX_SPAWN_SETSID as libc::c_short);
        }
        let mut pid = 0;
        if r == 0 {
            r = libc::posix_spawn(&mut pid, argp[0], &fa, &at, argp.as_ptr(), envp.as_ptr());
        }
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::posix_spawnattr_destroy(&mut at);
        if r != 0 {
            return Err(io::Error::from_raw_os_error(r));
        }
        Ok(pid)
    }
}

/// Leave the process that started us: fork, and let the parent exit at once, so
/// that this process (the child) is adopted by init and never becomes a zombie of a
/// process that does not wait for it. Call only while this process has one thread
/// (a broker, first thing): the child is a copy of the calling thread alone.
pub fn detach() -> io::Result<()> {
    // SAFETY: called by a process that has a single thread (documented duty above), so
    // the child holds no lock another thread held; the parent only calls `_exit`, which
    // is async-signal-safe and runs no destructor or atexit handler.
    match cvt(unsafe { libc::fork() })? {
        0 => Ok(()),
        // SAFETY: see above; `_exit` ends the parent without touching its state.
        _ => unsafe { libc::_exit(0) },
    }
}

/// Wait for child `pid` to exit (`waitpid`), retrying EINTR.
pub fn wait_child(pid: i32) {
    let mut status = 0;
    let _ = retry_eintr(|| {
        // SAFETY: `status` is valid for writes.
        cvt(unsafe { libc::waitpid(pid, &mut status, 0) })
    });
}

/// Take an exclusive `flock` on `fd` without waiting: false if another holds it.
pub fn try_lock(fd: RawFd) -> io::Result<bool> {
    // SAFETY: plain syscall on a descriptor the caller owns.
    match cvt(unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Take an exclusive record lock (`fcntl(F_SETLK)`, the whole file) on `fd` without
/// waiting: false if another process holds it. Unlike `flock`, a forked child does
/// not inherit it, and it goes with the process or its last descriptor of the file.
pub fn try_lock_process(fd: RawFd) -> io::Result<bool> {
    // SAFETY: `flock` is a plain struct for which all zeroes is valid.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: plain syscall on a descriptor the caller owns, with a valid `struct flock`.
    match cvt(unsafe { libc::fcntl(fd, libc::F_SETLK, &fl as *const libc::flock) }) {
        Ok(_) => Ok(true),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => Ok(false),
        Err(e) => Err(e),
    }
}

/// This process's effective user id.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

/// This process's id.
pub fn pid() -> i32 {
    std::process::id() as i32
}

/// Raise the soft limit of open descriptors to the hard one (segments of a domain
/// are held as descriptors); returns the soft limit now.
pub fn raise_fd_limit() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is valid for writes.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return 1024;
    }
    if r.rlim_cur < r.rlim_max {
        let want = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit; raising the soft limit to the hard one is
        // always allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    r.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_keep_boundaries_and_carry_descriptors() {
        let (a, b) = Socket::pair().unwrap();
        let f = std::fs::File::open("/dev/null").unwrap();
        a.send(b"one", &[f.as_raw_fd()], false).unwrap();
        a.send(b"second", &[], false).unwrap();
        let mut buf = [0u8; 64];
        let (n, fds) = b.recv(&mut buf).unwrap().unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"one"[..], 1));
        let (n, fds) = b.recv(&mut buf).unwrap().unwrap();
        assert_eq!((&buf[..n], fds.len()), (&b"second"[..], 0));
        assert_eq!(a.peer_cred().unwrap().uid, euid());
        drop(a);
        assert!(b.recv(&mut buf).unwrap().is_none(), "end of stream");
    }

    #[test]
    fn a_message_longer_than_the_buffer_is_refused() {
        let (a, b) = Socket::pair().unwrap();
        a.send(&[7u8; 100], &[], false).unwrap();
        let mut buf = [0u8; 10];
        let e = b.recv(&mut buf).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE));
    }

    #[test]
    fn listen_connect_accept() {
        let dir = std::env::temp_dir().join(format!("ksm-unix-test-{}", pid()));
        let _ = std::fs::create_dir(&dir);
        let path = dir.join("s.sock");
        let _ = std::fs::remove_file(&path);
        let l = Socket::listen(&path).unwrap();
        let c = Socket::connect(&path).unwrap();
        let s = l.accept().unwrap();
        assert_eq!(s.peer_cred().unwrap().pid, pid());
        c.send(b"hi", &[], false).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(s.recv(&mut buf).unwrap().unwrap().0, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
