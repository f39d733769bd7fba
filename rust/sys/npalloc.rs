//! numpy's data-memory handler (NEP 49): array data of at least `min_bytes` in
//! memory from [`Hooks::alloc`] (ksm memory, page aligned, advised), smaller
//! arrays and every failure in numpy's default handler.
//!
//! numpy calls a handler through a `PyDataMem_Handler` struct in a capsule named
//! `"mem_handler"` (numpy/ndarraytypes.h):
//!
//! ```c
//! typedef struct { void *ctx; void *(*malloc)(void *ctx, size_t size);
//!     void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
//!     void *(*realloc)(void *ctx, void *ptr, size_t new_size);
//!     void (*free)(void *ctx, void *ptr, size_t size); } PyDataMemAllocator;
//! typedef struct { char name[127]; uint8_t version; PyDataMemAllocator allocator; } PyDataMem_Handler;
//! ```
//!
//! and sets one per context with `PyDataMem_SetHandler`, entry 304 of the C-API
//! table that `numpy._core._multiarray_umath._ARRAY_API` (numpy 1.x:
//! `numpy.core._multiarray_umath`) holds; entry 306 is `PyDataMem_DefaultHandler`,
//! the capsule of numpy's own handler. Both entries are the same from numpy 1.22
//! to 2.x.
//!
//! Every array keeps a reference to the capsule it was allocated under and frees
//! through it, so a handler outlives its installation: one handler per distinct
//! `min_bytes` is made on first use and never freed. Which pointers are ksm's is
//! recorded here (`LIVE`), so that `free` and `realloc` send a pointer the handler
//! got from numpy's default back there. The functions do not need the GIL (numpy
//! may call them without it) and never call into Python. Their locks are held for a
//! map update only, never across a call out, so a `fork()` from another thread can
//! leave one held only if it lands inside such an update (numpy normally allocates with the
//! GIL held, which `os.fork()` takes first).

use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use pyo3::exceptions::{PyRuntimeError, PyTypeError};
use pyo3::{ffi, Bound, Py, PyAny, PyErr, PyResult, Python};

type MallocFn = unsafe extern "C" fn(*mut c_void, usize) -> *mut c_void;
type CallocFn = unsafe extern "C" fn(*mut c_void, usize, usize) -> *mut c_void;
type ReallocFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void, *mut c_void, usize);

/// `PyDataMemAllocator` (version 1).
#[repr(C)]
#[derive(Clone, Copy)]
struct Allocator {
    ctx: *mut c_void,
    malloc: Option<MallocFn>,
    calloc: Option<CallocFn>,
    realloc: Option<ReallocFn>,
    free: Option<FreeFn>,
}

/// `PyDataMem_Handler`.
#[repr(C)]
struct Handler {
    name: [u8; 127],
    version: u8,
    allocator: Allocator,
}

/// numpy's default allocator, copied out of its handler (a static of numpy's, never
/// freed: numpy's extension is never unloaded).
#[derive(Clone, Copy)]
struct NumpyDefault(Allocator);
// SAFETY: numpy's default allocator is its static, thread-safe malloc family (ctx is
// NULL); calling it from any thread is what numpy itself does.
unsafe impl Send for NumpyDefault {}
// SAFETY: as above; the copy is never written after it is set.
unsafe impl Sync for NumpyDefault {}

/// A handler of ours with its settings (`ctx` points at its `Config`).
struct Ours(Handler);
// SAFETY: the handler is written once before it is shared and never after; its ctx
// points at a leaked `Config` that is only read (atomics).
unsafe impl Send for Ours {}
// SAFETY: as above.
unsafe impl Sync for Ours {}

struct Config {
    min_bytes: usize,
}

/// `[start, end)` address ranges.
pub type Runs = Vec<(usize, usize)>;

/// What the handler calls to get and give back ksm memory: set once by the Python layer.
#[derive(Clone, Copy)]
pub struct Hooks {
    /// `len` bytes (> 0) of page-aligned memory, advised mergeable; the errno on failure.
    pub alloc: fn(usize) -> Result<usize, i32>,
    /// Give back what `alloc` returned.
    pub free: fn(usize),
    /// The runs of `[start, end)` (a kept block) that may read other than zeros, or
    /// None if all of it may.
    pub nonzero: fn(usize, usize) -> Option<Runs>,
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();
static DEFAULT: OnceLock<NumpyDefault> = OnceLock::new();
static HANDLERS: Mutex<Option<HashMap<usize, &'static Ours>>> = Mutex::new(None);
/// ksm allocations alive: address → bytes numpy asked for.
static LIVE: Mutex<Option<HashMap<usize, usize>>> = Mutex::new(None);
/// The most ksm allocations alive at once (each is at least one VMA): beyond it,
/// arrays go to the default handler.
static MAX_LIVE: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Freed ksm allocations kept for reuse, newest last: (address, bytes mapped). numpy
/// makes and drops arrays of the same sizes over and over; glibc's malloc serves
/// those from memory it keeps, which a fresh mapping (and its page faults and
/// bookkeeping) cannot match. Kept blocks stay advised (ksmd may merge them).
static CACHE: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
/// The most bytes the cache keeps, and the largest block it keeps (glibc's largest
/// mmap threshold: beyond it glibc maps afresh too).
pub const CACHE_MAX_BYTES: usize = 64 << 20;
pub const CACHE_MAX_BLOCK: usize = 32 << 20;
pub static CACHED_BYTES: AtomicUsize = AtomicUsize::new(0);
pub static CACHE_HITS: AtomicU64 = AtomicU64::new(0);

/// Whether arrays of `HUGEPAGE_MIN` bytes and more ask for transparent huge pages, as
/// numpy's default handler does (numpy's `_set_madvise_hugepage`, read at install).
static HUGEPAGES: AtomicBool = AtomicBool::new(true);
/// numpy's threshold for that advice (4 MiB).
pub const HUGEPAGE_MIN: usize = 4 << 20;

pub fn set_hugepages(on: bool) {
    HUGEPAGES.store(on, Ordering::Relaxed);
}

/// Whether an allocation of `len` bytes asks for huge pages.
pub fn wants_hugepages(len: usize) -> bool {
    len >= HUGEPAGE_MIN && HUGEPAGES.load(Ordering::Relaxed)
}

/// Counters, for `ksm.numpy_allocator_stats()`.
pub static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
pub static FREES: AtomicU64 = AtomicU64::new(0);
pub static FALLBACKS: AtomicU64 = AtomicU64::new(0);
pub static FALLBACKS_BUDGET: AtomicU64 = AtomicU64::new(0);
pub static LAST_ERRNO: AtomicU64 = AtomicU64::new(0);
pub static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// The name numpy shows (`get_handler_name()`).
pub const NAME: &str = "ksm";
const CAPSULE_NAME: &CStr = c"mem_handler";

fn live<R>(f: impl FnOnce(&mut HashMap<usize, usize>) -> R) -> R {
    let mut g = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// ksm allocations alive now.
pub fn live_allocations() -> usize {
    live(|m| m.len())
}

/// Whether `addr` is the start of a ksm allocation of the handler.
pub fn owns(addr: usize) -> bool {
    live(|m| m.contains_key(&addr))
}

pub fn set_hooks(h: Hooks) {
    let _ = HOOKS.set(h);
}

pub fn set_max_live(n: usize) {
    MAX_LIVE.store(n, Ordering::Relaxed);
}

pub fn max_live() -> usize {
    MAX_LIVE.load(Ordering::Relaxed)
}

fn config(ctx: *mut c_void) -> usize {
    // SAFETY: numpy passes back the ctx of our handler, a pointer to a leaked Config.
    unsafe { (*(ctx as *const Config)).min_bytes }
}

fn default() -> Allocator {
    DEFAULT
        .get()
        .expect("the default handler is read before ours is made")
        .0
}

fn mapped_len(size: usize) -> usize {
    size.max(1).next_multiple_of(super::page_size())
}

/// A kept block of at least `need` bytes and at most twice that (the smallest), taken.
fn from_cache(need: usize) -> Option<usize> {
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let (i, &(addr, len)) = c
        .iter()
        .enumerate()
        .filter(|(_, &(_, len))| len >= need && len / 2 <= need)
        .min_by_key(|(_, &(_, len))| len)?;
    c.remove(i);
    CACHED_BYTES.fetch_sub(len, Ordering::Relaxed);
    CACHE_HITS.fetch_add(1, Ordering::Relaxed);
    Some(addr)
}

/// Keep a freed block for reuse if it fits; the blocks to give back (oldest first).
fn to_cache(addr: usize, len: usize) -> Vec<usize> {
    if len > CACHE_MAX_BLOCK {
        return vec![addr];
    }
    let mut c = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    c.push((addr, len));
    let mut total = CACHED_BYTES.fetch_add(len, Ordering::Relaxed) + len;
    let mut out = Vec::new();
    while total > CACHE_MAX_BYTES {
        let (a, l) = c.remove(0);
        total -= l;
        CACHED_BYTES.fetch_sub(l, Ordering::Relaxed);
        out.push(a);
    }
    out
}

/// Give every kept block back; how many there were.
pub fn trim() -> usize {
    let blocks = std::mem::take(&mut *CACHE.lock().unwrap_or_else(|e| e.into_inner()));
    let n = blocks.len();
    for (addr, len) in blocks {
        CACHED_BYTES.fetch_sub(len, Ordering::Relaxed);
        if let Some(h) = HOOKS.get() {
            (h.free)(addr);
        }
    }
    n
}

/// ksm memory for `size` bytes, or None (counted) when the default must serve;
/// `zero`: the bytes must read as zeros.
fn ksm_alloc(size: usize, zero: bool) -> Option<usize> {
    let hooks = HOOKS.get()?;
    if let Some(addr) = from_cache(mapped_len(size)) {
        if zero {
            // Only what may hold bytes is cleared: pages never written (or given back)
            // read as zeros already, and clearing them would fault every one in (as
            // glibc's calloc clears only the memory it reuses).
            let end = addr + size;
            let runs = (hooks.nonzero)(addr, mapped_len(size) + addr).unwrap_or(vec![(addr, end)]);
            for (s, e) in runs {
                let (s, e) = (s.max(addr), e.min(end));
                if s < e {
                    // SAFETY: a kept block is a live mapping of ours of at least `size`
                    // bytes (from_cache only hands out blocks that large) that nothing
                    // else uses; `[s, e)` lies inside its first `size` bytes.
                    unsafe { std::ptr::write_bytes(s as *mut u8, 0, e - s) };
                }
            }
        }
        live(|m| m.insert(addr, size));
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(size, Ordering::Relaxed);
        return Some(addr);
    }
    if live_allocations() >= MAX_LIVE.load(Ordering::Relaxed) {
        FALLBACKS.fetch_add(1, Ordering::Relaxed);
        FALLBACKS_BUDGET.fetch_add(1, Ordering::Relaxed);
        return None;
    }
    match (hooks.alloc)(size.max(1)) {
        Ok(addr) => {
            live(|m| m.insert(addr, size));
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            LIVE_BYTES.fetch_add(size, Ordering::Relaxed);
            Some(addr)
        }
        Err(errno) => {
            FALLBACKS.fetch_add(1, Ordering::Relaxed);
            LAST_ERRNO.store(errno as u64, Ordering::Relaxed);
            None
        }
    }
}

/// Forget and give back a ksm allocation; false if `addr` is not one.
fn ksm_free(addr: usize) -> bool {
    let Some(size) = live(|m| m.remove(&addr)) else {
        return false;
    };
    LIVE_BYTES.fetch_sub(size, Ordering::Relaxed);
    FREES.fetch_add(1, Ordering::Relaxed);
    for a in to_cache(addr, mapped_len(size)) {
        if let Some(h) = HOOKS.get() {
            (h.free)(a);
        }
    }
    true
}

unsafe extern "C" fn h_malloc(ctx: *mut c_void, size: usize) -> *mut c_void {
    if size >= config(ctx) {
        if let Some(addr) = ksm_alloc(size, false) {
            return addr as *mut c_void;
        }
    }
    let d = default();
    match d.malloc {
        // SAFETY: numpy's default malloc with its own ctx, as numpy calls it.
        Some(f) => unsafe { f(d.ctx, size) },
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn h_calloc(ctx: *mut c_void, nelem: usize, elsize: usize) -> *mut c_void {
    if let Some(size) = nelem.checked_mul(elsize) {
        if size >= config(ctx) {
            // Fresh anonymous memory reads as zeros; a kept block is cleared.
            if let Some(addr) = ksm_alloc(size, true) {
                return addr as *mut c_void;
            }
        }
    }
    let d = default();
    match d.calloc {
        // SAFETY: numpy's default calloc with its own ctx (it checks the overflow).
        Some(f) => unsafe { f(d.ctx, nelem, elsize) },
        None => std::ptr::null_mut(),
    }
}

unsafe extern "C" fn h_realloc(ctx: *mut c_void, ptr: *mut c_void, new_size: usize) -> *mut c_void {
    let old = if ptr.is_null() {
        None
    } else {
        live(|m| m.get(&(ptr as usize)).copied())
    };
    let Some(old_size) = old else {
        // NULL, or memory of the default handler: grows there (its size is not known
        // here, so its bytes cannot be carried over into ksm memory).
        if ptr.is_null() {
            // SAFETY: realloc(NULL, n) is malloc(n), with our own ctx.
            return unsafe { h_malloc(ctx, new_size) };
        }
        let d = default();
        return match d.realloc {
            // SAFETY: `ptr` came from numpy's default handler (not recorded as ours).
            Some(f) => unsafe { f(d.ctx, ptr, new_size) },
            None => std::ptr::null_mut(),
        };
    };
    let mapped = mapped_len(old_size);
    if new_size >= config(ctx) && new_size <= mapped {
        // Fits the pages it has: stays in place (shrinking keeps the tail pages).
        live(|m| m.insert(ptr as usize, new_size));
        if new_size >= old_size {
            LIVE_BYTES.fetch_add(new_size - old_size, Ordering::Relaxed);
        } else {
            LIVE_BYTES.fetch_sub(old_size - new_size, Ordering::Relaxed);
        }
        return ptr;
    }
    // SAFETY: realloc moves into a new block from our own malloc.
    let new = unsafe { h_malloc(ctx, new_size.max(1)) };
    if new.is_null() {
        // As realloc: the old block stays valid.
        return new;
    }
    // SAFETY: `ptr` is a live ksm allocation of at least `old_size` bytes (recorded at
    // its allocation), `new` a fresh block of at least `new_size` bytes; they do not
    // overlap (the old block is still allocated).
    unsafe {
        std::ptr::copy_nonoverlapping(ptr as *const u8, new as *mut u8, old_size.min(new_size))
    };
    ksm_free(ptr as usize);
    new
}

unsafe extern "C" fn h_free(_ctx: *mut c_void, ptr: *mut c_void, size: usize) {
    if ptr.is_null() || ksm_free(ptr as usize) {
        return;
    }
    let d = default();
    if let Some(f) = d.free {
        // SAFETY: `ptr` is not ours, so it came from numpy's default handler.
        unsafe { f(d.ctx, ptr, size) }
    }
}

/// The C-API table of numpy (`_ARRAY_API`), checked to be a capsule.
fn api_table(api: &Bound<'_, PyAny>) -> PyResult<*const *const c_void> {
    // SAFETY: `api` is a live object; the check only reads its type.
    if unsafe { ffi::PyCapsule_CheckExact(api.as_ptr()) } == 0 {
        return Err(PyTypeError::new_err("numpy's _ARRAY_API is not a capsule"));
    }
    // SAFETY: a capsule (checked above); numpy's has no name (NULL), which is what we ask.
    let p = unsafe { ffi::PyCapsule_GetPointer(api.as_ptr(), std::ptr::null()) };
    if p.is_null() {
        return Err(PyErr::take(api.py())
            .unwrap_or_else(|| PyRuntimeError::new_err("numpy's _ARRAY_API is NULL")));
    }
    Ok(p as *const *const c_void)
}

/// numpy's default handler (entry 306), copied into `DEFAULT` once.
fn read_default(py: Python<'_>, table: *const *const c_void) -> PyResult<()> {
    if DEFAULT.get().is_some() {
        return Ok(());
    }
    // SAFETY: entry 306 of numpy's C-API table (numpy ≥ 1.22) is the address of the
    // `PyObject *PyDataMem_DefaultHandler` variable, set when numpy's module loaded.
    let cap = unsafe { *(*table.add(306) as *const *mut ffi::PyObject) };
    if cap.is_null() {
        return Err(PyRuntimeError::new_err(
            "numpy's default memory handler is not set",
        ));
    }
    // SAFETY: `cap` is numpy's handler capsule, named "mem_handler".
    let h = unsafe { ffi::PyCapsule_GetPointer(cap, CAPSULE_NAME.as_ptr()) } as *const Handler;
    if h.is_null() {
        return Err(PyErr::take(py).unwrap_or_else(|| {
            PyRuntimeError::new_err("numpy's default memory handler is not a mem_handler capsule")
        }));
    }
    // SAFETY: numpy's default handler is a static PyDataMem_Handler of version 1 or later,
    // whose leading fields are the layout `Handler` declares.
    let a = unsafe { (*h).allocator };
    let _ = DEFAULT.set(NumpyDefault(a));
    Ok(())
}

/// A new reference to the capsule of our handler for `min_bytes` (made on first use).
pub fn handler(py: Python<'_>, api: &Bound<'_, PyAny>, min_bytes: usize) -> PyResult<Py<PyAny>> {
    let table = api_table(api)?;
    read_default(py, table)?;
    let ours: &'static Ours = {
        let mut g = HANDLERS.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(HashMap::new)
            .entry(min_bytes)
            .or_insert_with(|| {
                let ctx = Box::leak(Box::new(Config { min_bytes })) as *mut Config as *mut c_void;
                let mut name = [0u8; 127];
                name[..NAME.len()].copy_from_slice(NAME.as_bytes());
                Box::leak(Box::new(Ours(Handler {
                    name,
                    version: 1,
                    allocator: Allocator {
                        ctx,
                        malloc: Some(h_malloc),
                        calloc: Some(h_calloc),
                        realloc: Some(h_realloc),
                        free: Some(h_free),
                    },
                })))
            })
    };
    // SAFETY: the handler is leaked (lives forever), so the capsule needs no destructor.
    let cap = unsafe {
        ffi::PyCapsule_New(
            &ours.0 as *const Handler as *mut c_void,
            CAPSULE_NAME.as_ptr(),
            None,
        )
    };
    if cap.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: `cap` is a new reference we own.
    Ok(unsafe { Bound::from_owned_ptr(py, cap) }.unbind())
}

/// `PyDataMem_SetHandler(handler)` (entry 304) in the current context; returns the
/// handler it replaced.
pub fn set_handler(
    py: Python<'_>,
    api: &Bound<'_, PyAny>,
    handler: &Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let table = api_table(api)?;
    // SAFETY: the check only reads the type of a live object.
    let ok = unsafe { ffi::PyCapsule_IsValid(handler.as_ptr(), CAPSULE_NAME.as_ptr()) } != 0;
    if !ok {
        return Err(PyTypeError::new_err(
            "a numpy memory handler is a capsule named \"mem_handler\"",
        ));
    }
    // SAFETY: entry 304 of numpy's C-API table (numpy ≥ 1.22) is
    // `PyObject *PyDataMem_SetHandler(PyObject *handler)`, which takes a borrowed
    // "mem_handler" capsule (checked above) and returns a new reference or NULL with an
    // exception set. The GIL is held.
    let old = unsafe {
        let f: unsafe extern "C" fn(*mut ffi::PyObject) -> *mut ffi::PyObject =
            std::mem::transmute(*table.add(304));
        f(handler.as_ptr())
    };
    if old.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference we own.
    Ok(unsafe { Bound::from_owned_ptr(py, old) }.unbind())
}
