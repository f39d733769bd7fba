//! A member's side of its domain: one thread that owns the socket to the
//! broker, and two mailboxes between it and the engine.
//!
//! The engine never blocks on the domain: it only puts messages in the outbox
//! and takes what arrived from the inbox, at scan boundaries, under its state
//! lock. Every blocking call (connect, send, receive, starting a broker) is on
//! this thread, which takes no lock of the engine's (only the mailboxes' own,
//! held for a push or a take).
//!
//! What arrives is checked here before the engine sees it: a segment must be a
//! memfd with every seal (so its bytes can never change, whoever holds it) and
//! the size it claims. Its frames' checksums come with it: the broker checked
//! them against the sealed bytes, and here they are only the keys the engine
//! indexes its frames by, hints like everything another process says (a page is
//! remapped onto a frame only once their bytes compare equal). A broker that
//! sends something malformed is dropped and a new one found. When the broker
//! dies, the member keeps its merged pages and segments, and the thread connects
//! again, starting a new broker if none runs.

#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::proto::{self, Msg};
use crate::sys::memfd::Memfd;
use crate::sys::mman::Mapping;
use crate::sys::unix::{self, Socket};

/// How long a member without a broker waits for one (being started, by it or by
/// another member) before it publishes the contents it holds twice on its own, so
/// that merging inside the process goes on when no broker answers. Starting a
/// broker takes tens of milliseconds, seconds on a heavily loaded machine; members
/// that publish on their own meanwhile each make a frame of the same content,
/// which then stay apart for as long as pages map them.
pub const CONNECT_GRACE: Duration = Duration::from_secs(5);

/// Longest wait between tries to reach a broker while one is expected (within
/// [`CONNECT_GRACE`] of losing it or of joining); 1 s after that.
const EXPECTED_RETRY: Duration = Duration::from_millis(25);

/// A segment received from the domain, checked and mapped read-only.
#[derive(Debug)]
pub struct SegmentView {
    /// Its identity (inode number), as this process sees it.
    pub id: u64,
    pub frames: u32,
    /// The checksum of each frame, as the broker sent them (checked there against the
    /// sealed bytes; a hint here, see the module's comment).
    pub sums: Vec<u32>,
    /// Whether this member published it.
    pub own: bool,
    pub memfd: Memfd,
    pub view: Mapping,
}

impl SegmentView {
    /// The bytes of frame `i`.
    pub fn frame(&self, i: u32, page: usize) -> &[u8] {
        self.view.bytes(i as usize * page, page)
    }
}

/// What the domain said, for the engine.
#[derive(Debug)]
pub enum Inbound {
    /// Connected to a broker. `first`: the first since joining (what was queued
    /// reaches it); else a new broker, which knows nothing of what was announced.
    Connected {
        first: bool,
    },
    Segment(SegmentView),
    /// Publish frames of these checksums, in a domain of this many members.
    PleasePublish(u32, Vec<u32>),
    Retire(u64),
}

/// What the engine says to the domain.
#[derive(Debug)]
pub enum Outbound {
    Msg(Msg),
    /// A sealed segment of ours, with the checksums of its frames.
    Publish(Memfd, Vec<u32>),
}

#[derive(Debug, Default)]
struct Shared {
    inbox: Mutex<Vec<Inbound>>,
    outbox: Mutex<VecDeque<Outbound>>,
    stop: AtomicBool,
    connected: AtomicBool,
    member: AtomicU32,
    members: AtomicU32,
    /// Messages or segments from the broker that were refused.
    refused: AtomicU64,
    /// Times a connection to a broker was lost.
    disconnects: AtomicU64,
    /// Brokers this member started (members that join together start one).
    brokers_started: AtomicU64,
    /// Segments that could not be mapped here (out of resources), skipped.
    skipped: AtomicU64,
    /// Messages and bytes sent to and received from brokers.
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    /// The last error met while reaching the broker, for `domain_stats` (cleared
    /// when a connection is made).
    last_error: Mutex<Option<String>>,
    /// When the link last had no broker (started, or lost its connection).
    down_since: Mutex<Option<Instant>>,
    /// Round trips asked for (`Link::sync`) and answered, and the broker's last answer.
    syncs_asked: AtomicU64,
    synced: Mutex<(u64, proto::DomainStats)>,
    synced_cv: Condvar,
}

impl Shared {
    /// How long the link has been without a broker (since it joined or lost one).
    fn down_for(&self) -> Duration {
        self.down_since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .map_or(Duration::ZERO, |t| t.elapsed())
    }
}

/// How to start a broker: the program and its arguments, and the environment.
#[derive(Clone, Debug)]
pub struct Spawner {
    pub argv: Vec<String>,
    pub env: Vec<String>,
}

/// The member's link to its domain: the thread and the mailboxes.
#[derive(Debug)]
pub struct Link {
    name: String,
    shared: Arc<Shared>,
    wake: Socket,
    thread: Option<JoinHandle<()>>,
}

/// Figures of the link, for statistics.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinkStats {
    pub connected: bool,
    pub member: u32,
    pub members: u32,
    pub refused: u64,
    pub disconnects: u64,
    pub skipped: u64,
    pub sent: u64,
    pub sent_bytes: u64,
    pub received: u64,
    pub received_bytes: u64,
    pub brokers_started: u64,
}

impl Link {
    /// Join domain `name` (checked): start the thread, which connects (starting a
    /// broker with `spawner` if none runs) and says hello. `bell` is rung after
    /// anything is put in the inbox (see `Link::take`), from the link's thread.
    pub fn start(name: &str, spawner: Spawner, bell: fn()) -> io::Result<Link> {
        if let Some(e) = proto::name_error(name) {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, e));
        }
        let path = super::place::socket_path(name)?;
        // Segments are held as descriptors: room for many.
        unix::raise_fd_limit();
        let shared = Arc::new(Shared::default());
        *shared.down_since.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let (wake, wake_rx) = Socket::pair()?;
        let s = Arc::clone(&shared);
        let n = name.to_owned();
        let thread = std::thread::Builder::new()
            .name("ksm-domain".into())
            .spawn(move || {
                Worker {
                    name: n,
                    path,
                    spawner,
                    bell,
                    shared: s,
                    wake: wake_rx,
                    sock: None,
                    spawned_at: None,
                    start_claim: None,
                    page: crate::sys::page_size(),
                    retry: Vec::new(),
                }
                .run()
            })?;
        Ok(Link {
            name: name.to_owned(),
            shared,
            wake,
            thread: Some(thread),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Queue messages for the broker (never blocks).
    pub fn send(&self, items: impl IntoIterator<Item = Outbound>) {
        let mut q = self.shared.outbox.lock().unwrap_or_else(|e| e.into_inner());
        let before = q.len();
        q.extend(items);
        if q.len() > before {
            drop(q);
            // A full wake socket means the thread is awake already.
            let _ = self.wake.send(&[1], &[], true);
        }
    }

    /// What arrived since the last call.
    pub fn take(&self) -> Vec<Inbound> {
        std::mem::take(&mut *self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Whether something arrived that `take` has not taken yet.
    pub fn has_inbound(&self) -> bool {
        !self
            .shared
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    pub fn stats(&self) -> LinkStats {
        let s = &self.shared;
        LinkStats {
            connected: s.connected.load(Ordering::Relaxed),
            member: s.member.load(Ordering::Relaxed),
            members: s.members.load(Ordering::Relaxed),
            refused: s.refused.load(Ordering::Relaxed),
            disconnects: s.disconnects.load(Ordering::Relaxed),
            skipped: s.skipped.load(Ordering::Relaxed),
            sent: s.sent.load(Ordering::Relaxed),
            sent_bytes: s.sent_bytes.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            received_bytes: s.received_bytes.load(Ordering::Relaxed),
            brokers_started: s.brokers_started.load(Ordering::Relaxed),
        }
    }

    /// Whether a broker answers, or may still answer soon: connected, or not for
    /// less than [`CONNECT_GRACE`] (a broker being started, or restarted after one
    /// died). While it may, contents held twice wait for the broker to say which
    /// member publishes them, rather than each member publishing its own copy.
    pub fn broker_expected(&self) -> bool {
        self.shared.connected.load(Ordering::Relaxed) || self.shared.down_for() < CONNECT_GRACE
    }

    /// The last error met reaching the broker since the last connection, if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ask the broker for a round trip: once answered, everything this member sent
    /// before was handled by the broker, and everything the broker sent before its
    /// answer (segments other members published meanwhile, requests to publish) is in
    /// the inbox. Returns a ticket for [`Link::wait_sync`].
    pub fn ask_sync(&self) -> u64 {
        let t = self.shared.syncs_asked.fetch_add(1, Ordering::AcqRel) + 1;
        self.send([Outbound::Msg(Msg::StatsQuery)]);
        t
    }

    /// Handle for waiting on a sync without the engine's lock.
    pub fn syncer(&self) -> Syncer {
        Syncer(Arc::clone(&self.shared))
    }

    /// In a forked child: the thread does not exist here. Close the descriptors
    /// without a word to the broker (the socket is the parent's conversation; the
    /// parent's own end stays open in the parent).
    pub fn abandon_in_child(mut self) {
        if let Some(t) = self.thread.take() {
            // No such thread in the child: never join it.
            std::mem::forget(t);
        }
    }
}

/// Waits for the broker's answer to a sync (see [`Link::ask_sync`]).
#[derive(Debug)]
pub struct Syncer(Arc<Shared>);

impl Syncer {
    /// Wait up to `timeout` for the answer to `ticket`: the domain's statistics then,
    /// or None (no broker answered in time; the link keeps trying).
    pub fn wait(&self, ticket: u64, timeout: Duration) -> Option<proto::DomainStats> {
        let deadline = Instant::now() + timeout;
        let mut g = self.0.synced.lock().unwrap_or_else(|e| e.into_inner());
        while g.0 < ticket {
            let left = deadline.checked_duration_since(Instant::now())?;
            g = self
                .0
                .synced_cv
                .wait_timeout(g, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        // Woken by a lost connection rather than an answer.
        self.0.connected.load(Ordering::Acquire).then_some(g.1)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.send(&[1], &[], true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A segment the broker sent, as it came: its descriptor, frame count, publisher
/// and its frames' checksums.
struct Offer {
    memfd: Memfd,
    frames: u32,
    publisher: u32,
    sums: Vec<u32>,
}

/// Why a segment was not taken.
enum Refusal {
    /// It is not what it claims: the broker is dropped.
    Lie(String),
    /// It cannot be used here now (resources): kept, to try again.
    Here(String, Offer),
}

struct Worker {
    name: String,
    path: PathBuf,
    spawner: Spawner,
    /// Rung after each push to the inbox.
    bell: fn(),
    shared: Arc<Shared>,
    wake: Socket,
    sock: Option<Socket>,
    spawned_at: Option<Instant>,
    /// The start claim while this member is the one starting the broker (see
    /// `place::claim_start`), given up once connected.
    start_claim: Option<super::place::Held>,
    page: usize,
    /// Segments that could not be mapped here yet: tried again at every wake-up.
    retry: Vec<Offer>,
}

impl Worker {
    fn run(mut self) {
        let mut buf = vec![0u8; proto::MAX_MESSAGE];
        let mut retry = Duration::from_millis(10);
        while !self.shared.stop.load(Ordering::Relaxed) {
            if self.sock.is_none() {
                match self.connect() {
                    Ok(()) => retry = Duration::from_millis(10),
                    Err(e) => {
                        self.error(format!(
                            "cannot reach the broker of domain {:?}: {e}",
                            self.name
                        ));
                        let _ = unix::poll_readable(&[self.wake.raw()], retry.as_millis() as i32);
                        self.drain_wake();
                        // While a broker is expected (one starting takes ~0.1-0.3 s),
                        // try often: members then wait for it no longer than needed.
                        let most = if self.shared.down_for() < CONNECT_GRACE {
                            EXPECTED_RETRY
                        } else {
                            Duration::from_secs(1)
                        };
                        retry = (retry * 2).min(most);
                        continue;
                    }
                }
            }
            let sock_fd = self.sock.as_ref().map_or(-1, Socket::raw);
            let ready = match unix::poll_readable(&[sock_fd, self.wake.raw()], 500) {
                Ok(r) => r,
                Err(_) => continue,
            };
            if ready[1] {
                self.drain_wake();
            }
            if ready[0] {
                self.receive(&mut buf);
            }
            self.retry_skipped();
            self.flush();
        }
    }

    fn error(&self, e: String) {
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(e);
    }

    fn drain_wake(&self) {
        let mut b = [0u8; 64];
        while unix::poll_readable(&[self.wake.raw()], 0).is_ok_and(|r| r[0]) {
            if !matches!(self.wake.recv(&mut b), Ok(Some(_))) {
                break;
            }
        }
    }

    /// Connect to the domain's broker, starting one if none listens.
    fn connect(&mut self) -> io::Result<()> {
        let sock = match Socket::connect(&self.path) {
            Ok(s) => s,
            Err(e) if super::place::no_broker(&e) => {
                // One member starts the broker, the one holding the start claim
                // (members joining together would otherwise start one each, and
                // all but one find the broker's lock taken and exit: a Python
                // start each, ~0.1 s of CPU); it starts one at most once a second
                // until it connects. Were two brokers still started, the second
                // finds the lock taken and exits.
                // (Should the claim file be unusable, this member starts one anyway.)
                let claimed = self.start_claim.is_some()
                    || match super::place::claim_start(&self.name) {
                        Ok(c) => {
                            self.start_claim = c;
                            self.start_claim.is_some()
                        }
                        Err(_) => true,
                    };
                if claimed
                    && self
                        .spawned_at
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
                {
                    self.spawned_at = Some(Instant::now());
                    // The broker detaches at once (its first process exits, the broker
                    // goes on in a child that init adopts): waiting here is brief and
                    // leaves no zombie.
                    let pid = unix::spawn(&self.spawner.argv, &self.spawner.env)?;
                    unix::wait_child(pid);
                    self.shared.brokers_started.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let cred = sock.peer_cred()?;
        if cred.uid != unix::euid() {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the broker (pid {}) runs as uid {}", cred.pid, cred.uid),
            ));
        }
        sock.set_send_timeout(5000)?;
        let hello = Msg::Hello {
            version: proto::VERSION,
            page: self.page as u32,
            name: self.name.clone(),
        };
        sock.send(&hello.encode(), &[], false)?;
        self.sock = Some(sock);
        self.start_claim = None;
        self.shared.connected.store(true, Ordering::Relaxed);
        *self
            .shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = None;
        let first = self.shared.disconnects.load(Ordering::Relaxed) == 0;
        self.push(Inbound::Connected { first });
        Ok(())
    }

    fn disconnect(&mut self) {
        // Round trips in flight will never be answered: a new broker knows nothing of
        // them. Their waiters learn it from the connection state.
        {
            let mut g = self.shared.synced.lock().unwrap_or_else(|e| e.into_inner());
            g.0 = self.shared.syncs_asked.load(Ordering::Acquire);
            g.1 = proto::DomainStats::default();
            self.shared.synced_cv.notify_all();
        }
        if self.sock.take().is_some() {
            *self
                .shared
                .down_since
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            self.shared.connected.store(false, Ordering::Relaxed);
            self.shared.members.store(0, Ordering::Relaxed);
            self.shared.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn push(&self, m: Inbound) {
        self.shared
            .inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(m);
        (self.bell)();
    }

    fn refused(&mut self, why: &str) {
        self.shared.refused.fetch_add(1, Ordering::Relaxed);
        self.error(format!("refused from the broker: {why}"));
        self.disconnect();
    }

    fn receive(&mut self, buf: &mut [u8]) {
        let Some(sock) = &self.sock else { return };
        let (n, mut fds) = match sock.recv(buf) {
            Ok(Some(x)) => x,
            Ok(None) | Err(_) => {
                self.disconnect();
                return;
            }
        };
        self.shared.received.fetch_add(1, Ordering::Relaxed);
        self.shared
            .received_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        let msg = match proto::decode(&buf[..n], fds.len()) {
            Ok(m) => m,
            Err(e) => return self.refused(&e.to_string()),
        };
        match msg {
            Msg::Welcome { member, members } => {
                self.shared.member.store(member, Ordering::Relaxed);
                self.shared.members.store(members, Ordering::Relaxed);
            }
            Msg::Segment {
                frames,
                publisher,
                sums,
                ..
            } => {
                let memfd = Memfd::from_owned(fds.pop().expect("decode checked one fd"));
                let offer = Offer {
                    memfd,
                    frames,
                    publisher,
                    sums,
                };
                match self.check_segment(offer) {
                    Ok(seg) => self.push(Inbound::Segment(seg)),
                    Err(Refusal::Lie(e)) => self.refused(&e),
                    // Out of address space, descriptors or memory here: this segment is
                    // not taken (its pages stay as they are), the link stays.
                    Err(Refusal::Here(e, offer)) => {
                        self.shared.skipped.fetch_add(1, Ordering::Relaxed);
                        self.error(format!("a segment could not be mapped here: {e}"));
                        self.retry.push(offer);
                    }
                }
            }
            Msg::PleasePublish { members, sums } => {
                self.shared.members.store(members, Ordering::Relaxed);
                self.push(Inbound::PleasePublish(members, sums));
            }
            Msg::Retire { id } => self.push(Inbound::Retire(id)),
            Msg::Stats(st) => {
                let mut g = self.shared.synced.lock().unwrap_or_else(|e| e.into_inner());
                g.0 += 1;
                g.1 = st;
                self.shared.synced_cv.notify_all();
            }
            other => self.refused(&format!("unexpected {other:?}")),
        }
    }

    /// Try again the segments that could not be mapped (resources may be back).
    fn retry_skipped(&mut self) {
        for offer in std::mem::take(&mut self.retry) {
            match self.check_segment(offer) {
                Ok(seg) => self.push(Inbound::Segment(seg)),
                Err(Refusal::Here(_, offer)) => self.retry.push(offer),
                Err(Refusal::Lie(e)) => self.refused(&e),
            }
        }
    }

    /// A segment is taken only if the kernel guarantees its bytes never change.
    fn check_segment(&self, offer: Offer) -> Result<SegmentView, Refusal> {
        let size = u64::from(offer.frames) * self.page as u64;
        if !offer.memfd.is_sealed_segment(size) {
            return Err(Refusal::Lie(format!(
                "a segment that is not a sealed memfd of {size} bytes"
            )));
        }
        let (_, id) = match offer.memfd.identity() {
            Ok(x) => x,
            Err(e) => return Err(Refusal::Here(e.to_string(), offer)),
        };
        let view = match Mapping::read_only_view(offer.memfd.raw(), size as usize) {
            Ok(v) => v,
            Err(e) => return Err(Refusal::Here(format!("mapping a segment: {e}"), offer)),
        };
        let Offer {
            memfd,
            frames,
            publisher,
            sums,
        } = offer;
        Ok(SegmentView {
            id,
            frames,
            sums,
            own: publisher != 0 && publisher == self.shared.member.load(Ordering::Relaxed),
            memfd,
            view,
        })
    }

    /// Send what the engine queued; a failure drops the connection (the queue is
    /// kept for the next broker, except what failed).
    fn flush(&mut self) {
        loop {
            if self.sock.is_none() {
                return;
            }
            let next = self
                .shared
                .outbox
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            let Some(item) = next else { return };
            let sock = self.sock.as_ref().expect("checked");
            let (bytes, fd) = match &item {
                Outbound::Msg(m) => (m.encode(), None),
                Outbound::Publish(memfd, sums) => {
                    let m = Msg::Publish {
                        frames: sums.len() as u32,
                        sums: sums.clone(),
                    };
                    (m.encode(), Some(memfd.raw()))
                }
            };
            let r = sock.send(&bytes, fd.as_slice(), false);
            if r.is_ok() {
                self.shared.sent.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .sent_bytes
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            }
            if let Err(e) = r {
                self.error(format!("sending to the broker: {e}"));
                self.disconnect();
                return;
            }
        }
    }
}
