//! Where a user's merge domains meet: one directory per user that only the user
//! can enter, holding per domain its broker's socket (`NAME.vN.sock`) and lock file
//! (`NAME.vN.lock`, held by the running broker, so at most one runs per domain), and
//! while a member starts a broker, its start claim (`NAME.vN.start`), where `N` is
//! the protocol's version (`proto::VERSION`): processes of two versions of ksm never
//! speak to each other, so each version has its own broker for a name, and a
//! process of a new version joins its domain while processes of the old one, still
//! running, go on sharing among themselves (with one socket per name, the new one
//! was refused at its `Hello` until the old broker exited). Whoever holds a
//! lock file removes it before giving the lock up, and whoever takes one checks that
//! the path still names the file it locked (else it opens the path again): so no
//! file outlives its domain's broker, and the lock stays one per name.
//!
//! The directory is `/tmp/ksm-UID`, whatever the environment or the session: two
//! processes of one user, one started from a desktop session (`XDG_RUNTIME_DIR`
//! set, `/run/user/UID` there) and one from a service, a cron job or `sudo -u`
//! (neither), meet all the same, and a domain lives on across logins and logouts
//! (systemd removes `/run/user/UID`, sockets and all, at a user's last logout). It
//! is created with mode 0700 and refused if it exists with another owner, other
//! permissions, or as a symbolic link: a socket there can only be reached by the
//! user (and root), and brokers check every peer's uid on top (`SO_PEERCRED`).
//! Domain names are therefore per user: two users' domains of one name never
//! meet. (Another user who makes `/tmp/ksm-UID` first denies the user its
//! domains, with an error that says so; a service with a private `/tmp`
//! meets only processes that share it.)

#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proto::{self, DomainStats, Msg};
use crate::sys::unix::{self, Socket};

/// Whether `dir` is a directory (not a link) of ours that nobody else may enter.
fn private_dir(dir: &Path) -> io::Result<()> {
    let md = fs::symlink_metadata(dir)?;
    let uid = unix::euid();
    if !md.file_type().is_dir() || md.uid() != uid || md.mode() & 0o077 != 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a private directory of uid {uid} (owner {}, mode {:o}{}): refusing \
                 to meet other processes there; remove it",
                dir.display(),
                md.uid(),
                md.mode() & 0o7777,
                if md.file_type().is_symlink() {
                    ", a symbolic link"
                } else {
                    ""
                },
            ),
        ));
    }
    Ok(())
}

/// The user's directory of domains, created if needed and checked private.
pub fn dir() -> io::Result<PathBuf> {
    let d = PathBuf::from(format!("/tmp/ksm-{}", unix::euid()));
    match fs::DirBuilder::new().mode(0o700).create(&d) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    private_dir(&d)?;
    Ok(d)
}

/// The name of domain `name`'s file of `kind` ("sock", "lock" or "start") in the
/// user's directory: this version's (see the module's doc).
fn file_name(name: &str, kind: &str) -> String {
    format!("{name}.v{}.{kind}", proto::VERSION)
}

/// The socket path of domain `name` (a name already checked by `proto::name_error`).
pub fn socket_path(name: &str) -> io::Result<PathBuf> {
    Ok(dir()?.join(file_name(name, "sock")))
}

/// The domains that have a broker socket of this version now (some may be stale).
pub fn list() -> Vec<String> {
    let Ok(d) = dir() else {
        return Vec::new();
    };
    let mut names: Vec<String> = fs::read_dir(d)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            n.strip_suffix(&file_name("", "sock")).map(str::to_owned)
        })
        .filter(|n| proto::name_error(n).is_none())
        .collect();
    names.sort();
    names
}

/// Be the broker of domain `name` unless one already runs: take the domain's lock,
/// leave the process that started us (see `unix::detach`), and serve until no
/// member is left. Returns false if another broker holds the lock. Call with one
/// thread only.
pub fn run_broker(name: &str) -> io::Result<bool> {
    if let Some(e) = proto::name_error(name) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
    }
    let d = dir()?;
    let Some(lock) = Held::take(d.join(file_name(name, "lock")), unix::try_lock)? else {
        return Ok(false);
    };
    // The member that started us waits for this first process to exit; the broker
    // goes on in a child of it, which init adopts (never a zombie of a member). The
    // lock is shared by both through the inherited descriptor (the first process
    // ends with `_exit`: it neither removes the file nor gives the lock up).
    unix::detach()?;
    let served = super::broker::serve(&d.join(file_name(name, "sock")), name);
    // The socket is gone (serve removed it): now the lock file, still held.
    drop(lock);
    served.map(|()| true)
}

/// A lock file held (see the module's doc): dropped, it is removed, then unlocked.
pub struct Held {
    path: PathBuf,
    file: fs::File,
}

impl Held {
    /// Open (or create) `path` and take its lock with `lock` (false: another holds
    /// it, then None), making sure the lock is on the file the path names: a holder
    /// before may have removed it between our open and our lock.
    fn take(path: PathBuf, lock: fn(RawFd) -> io::Result<bool>) -> io::Result<Option<Held>> {
        // Each retry needs another holder to give a lock up between our open and our
        // lock: a handful at most.
        for _ in 0..1000 {
            let file = open_lock_file(&path)?;
            if !lock(file.as_raw_fd())? {
                return Ok(None);
            }
            if names(&path, &file) {
                return Ok(Some(Held { path, file }));
            }
            // Removed (and perhaps made anew) meanwhile: not the domain's lock any
            // more. Closing it gives our lock on it up; nothing to remove.
        }
        Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} kept being replaced while it was locked", path.display()),
        ))
    }
}

/// Whether `path` names `file` (not another file, nor nothing).
fn names(path: &Path, file: &fs::File) -> bool {
    match (fs::symlink_metadata(path), file.metadata()) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        if names(&self.path, &self.file) {
            let _ = fs::remove_file(&self.path);
        }
        // The lock goes with the descriptor, closed after this.
    }
}

/// Claim the start of domain `name`'s broker: the open claim file while this process
/// holds it (drop it to give the claim up; the kernel drops it with the process),
/// or None if another member holds it (a broker is being started). A record lock,
/// not a `flock`: a child forked while the claim is held does not inherit it (it
/// would keep it for its whole life, and no member could start a broker again).
pub fn claim_start(name: &str) -> io::Result<Option<Held>> {
    Held::take(
        dir()?.join(file_name(name, "start")),
        unix::try_lock_process,
    )
}

/// Open (or create: mode 0600) the lock file `path`, close-on-exec.
fn open_lock_file(path: &Path) -> io::Result<fs::File> {
    fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
}

/// Whether a failed connect means that no broker listens (no socket, or a socket
/// left by one that died): one may be started.
pub fn no_broker(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
    )
}

/// The statistics of domain `name`, asked of its broker (members 0 if none runs).
pub fn query_stats(name: &str) -> io::Result<DomainStats> {
    if let Some(e) = proto::name_error(name) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
    }
    let path = socket_path(name)?;
    let sock = match Socket::connect(&path) {
        Ok(s) => s,
        Err(e) if no_broker(&e) => return Ok(DomainStats::default()),
        Err(e) => return Err(e),
    };
    if sock.peer_cred()?.uid != unix::euid() {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the domain's broker runs as another user",
        ));
    }
    sock.set_send_timeout(2000)?;
    sock.send(&Msg::StatsQuery.encode(), &[], false)?;
    let timeout = Duration::from_secs(5);
    let mut buf = vec![0u8; proto::MAX_MESSAGE];
    if !unix::poll_readable(&[sock.raw()], timeout.as_millis() as i32)?[0] {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the domain's broker did not answer within 5 s",
        ));
    }
    match sock.recv(&mut buf)? {
        Some((n, fds)) => match proto::decode(&buf[..n], fds.len()) {
            Ok(Msg::Stats(s)) => Ok(s),
            // The broker went away between connect and reply.
            _ => Ok(DomainStats::default()),
        },
        None => Ok(DomainStats::default()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_version_meets_under_its_own_files_and_lists_only_its_own() {
        let name = format!("place-test-{}", std::process::id());
        let sock = socket_path(&name).unwrap();
        let v = proto::VERSION;
        assert_eq!(
            sock.file_name().unwrap().to_str().unwrap(),
            format!("{name}.v{v}.sock")
        );
        // A broker of another version under the same name (its socket in the layout of
        // before files carried the version, or a later version's) is not this version's.
        let d = dir().unwrap();
        let others = [
            d.join(format!("{name}.sock")),
            d.join(format!("{name}.v{}.sock", v + 1)),
        ];
        for p in &others {
            fs::write(p, b"").unwrap();
        }
        let listed = list().contains(&name);
        fs::write(&sock, b"").unwrap();
        let listed_ours = list().contains(&name);
        for p in others.iter().chain([&sock]) {
            fs::remove_file(p).unwrap();
        }
        assert!(!listed, "another version's socket listed");
        assert!(listed_ours, "this version's socket not listed");
    }

    #[test]
    fn a_held_lock_file_is_one_per_path_and_removed_when_given_up() {
        let d = std::env::temp_dir().join(format!("ksm-place-test-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        let path = d.join("x.lock");
        let a = Held::take(path.clone(), unix::try_lock)
            .unwrap()
            .expect("free");
        assert!(path.exists());
        assert!(
            Held::take(path.clone(), unix::try_lock).unwrap().is_none(),
            "held by another"
        );
        // A descriptor opened before the holder let go is of a removed file then: the
        // path no longer names it, so a lock taken on it would not count.
        let stale = open_lock_file(&path).unwrap();
        drop(a);
        assert!(!path.exists(), "removed when given up");
        assert!(!names(&path, &stale));
        let b = Held::take(path.clone(), unix::try_lock)
            .unwrap()
            .expect("free again");
        assert!(names(&path, &b.file) && !names(&path, &stale));
        drop(b);
        fs::remove_dir(&d).unwrap();
    }
}
