//! `pthread_atfork(3)` registration.
//!
//! Why: only the forking thread survives in the child, so a lock held by the
//! scanner or fault thread at the moment of `fork()` would stay held forever
//! there (docs/design.md, "Fork rule"). The engine registers three plain
//! functions: prepare (take the locks at a safe point), parent (release), child
//! (release and reset the daemon state, which has no threads in the child).

use std::io;
use std::sync::OnceLock;

/// The three handlers, in `pthread_atfork` order.
#[derive(Clone, Copy)]
pub struct Handlers {
    pub prepare: fn(),
    pub parent: fn(),
    pub child: fn(),
}

static HANDLERS: OnceLock<Handlers> = OnceLock::new();

extern "C" fn prepare() {
    if let Some(h) = HANDLERS.get() {
        (h.prepare)()
    }
}
extern "C" fn parent() {
    if let Some(h) = HANDLERS.get() {
        (h.parent)()
    }
}
extern "C" fn child() {
    if let Some(h) = HANDLERS.get() {
        (h.child)()
    }
}

/// Register `h` once per process (later calls are ignored: handlers survive fork).
pub fn register(h: Handlers) -> io::Result<()> {
    if HANDLERS.set(h).is_err() {
        return Ok(());
    }
    // SAFETY: the three functions are `extern "C"`, live for the whole program, and
    // only read `HANDLERS`, which is set before registration.
    let r = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}
