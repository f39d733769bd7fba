//! Merge domains: merging across cooperating processes of one user.
//!
//! Processes that join the same domain share frames: a page of one maps, with
//! `MAP_PRIVATE`, the same memfd page as identical pages of the others (one
//! physical frame, the kernel's copy-on-write on a write). Frames that other
//! processes can map live only in **sealed segments**: memfds that the kernel
//! will never let anyone write, punch or resize, and frees when the last
//! mapping and descriptor of them go. So no member's bug, crash or malice can
//! change another member's memory, and a member's death frees what only it held.
//!
//! * [`proto`]: the messages and their decoder (fuzzed: nothing received is trusted).
//! * [`broker`]: the domain's hints (who announced which checksum, which segments
//!   exist) in a small process that the first member starts.
//! * [`place`]: where brokers listen (a directory only the user can enter) and who
//!   may connect (same uid, checked with `SO_PEERCRED`).
//! * [`client`]: a member's thread that talks to the broker, and the mailboxes
//!   between it and the engine (which never blocks on the domain).
//!
//! The merging itself is the engine's, unchanged: a frame of a segment enters the
//! stable index like a frame of the process's own pool, and a page is remapped onto
//! it only after write-protection and a byte-for-byte comparison with the sealed
//! bytes. See docs/design.md, "Merge domains".

pub mod broker;
pub mod client;
pub mod place;
pub mod proto;
