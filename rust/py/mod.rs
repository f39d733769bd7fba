//! The Python module `ksm._ksm`: thin wrappers, GIL release, error mapping.
//! The only code that uses PyO3.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pyo3::exceptions::{
    PyAttributeError, PyBufferError, PyOSError, PyOverflowError, PyTypeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use pyo3::{ffi, PyErr};

mod domain;

use crate::daemon::{knobs, Availability, Engine, MADV_MERGEABLE, MADV_UNMERGEABLE};
use crate::error::Error;
use crate::sys;

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e {
            // OSError(errno, strerror) so that `exc.errno` is set and Python picks the
            // subclass (PyO3's io::Error conversion would drop the errno).
            Error::Os { .. } | Error::Errno { .. } => {
                let errno = e.raw_errno().unwrap_or(libc::EIO);
                PyOSError::new_err((errno, e.to_string()))
            }
            Error::Value(m) => PyValueError::new_err(m),
            Error::Attribute(m) => PyAttributeError::new_err(m),
            Error::State(m) => pyo3::exceptions::PyRuntimeError::new_err(m),
        }
    }
}

fn engine() -> PyResult<&'static Engine> {
    Ok(Engine::get()?)
}

/// An int argument converted to `T`, with errors that name the argument and what it
/// accepts (PyO3's own say neither): TypeError for a non-int, OverflowError for an
/// int out of range.
fn int_arg<T: TryFrom<i128>>(v: &Bound<'_, PyAny>, name: &str, accepts: &str) -> PyResult<T> {
    if !v.is_instance_of::<pyo3::types::PyInt>() {
        return Err(PyTypeError::new_err(format!(
            "{name} must be an int ({accepts}), not {}",
            v.get_type().name()?
        )));
    }
    v.extract::<i128>()
        .ok()
        .and_then(|i| T::try_from(i).ok())
        .ok_or_else(|| PyOverflowError::new_err(format!("{name} must be {accepts}, got {v}")))
}

/// A float argument, converted as PyO3 converts an `f64` (what `float()` takes),
/// with a TypeError that names it: "argument 'timeout': must be real number, not
/// str". (PyO3 ≥ 0.29 puts the argument's name in a note, which `str(exc)` omits.)
fn float_arg(v: &Bound<'_, PyAny>, name: &str) -> PyResult<f64> {
    v.extract::<f64>().map_err(|e| {
        let py = v.py();
        if !e.get_type(py).is(py.get_type::<PyTypeError>()) {
            return e;
        }
        let named = PyTypeError::new_err(format!("argument '{name}': {}", e.value(py)));
        named.set_cause(py, e.cause(py));
        named
    })
}

const ADDRESS: &str = "an address from 0 to 2**64-1";
const LENGTH: &str = "a length from 0 to 2**64-1";

/// Anonymous private memory owned by ksm (base class of `ksm.mmap`).
///
/// Memory allocated here is unmapped only by ksm, under its lock, so the scanner
/// reads it directly: the safe, fast path for merging. The pages are
/// `MADV_NOHUGEPAGE` (write-protecting 4 KiB inside a huge page would split it).
/// `(length)` or `(-1, length)` like the stdlib `mmap.mmap`; the length is rounded
/// up to whole pages. ValueError for a length that is not positive or a fileno
/// other than -1; OSError (errno kept) if the kernel refuses the mapping.
#[pyclass(module = "ksm._ksm", name = "Mmap", subclass)]
pub struct Mmap {
    addr: usize,
    len: usize,
    closed: AtomicBool,
    exports: AtomicUsize,
}

impl Mmap {
    fn check_open(&self) -> PyResult<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PyValueError::new_err("mmap closed or invalid"));
        }
        Ok(())
    }
}

#[pymethods]
impl Mmap {
    #[new]
    #[pyo3(signature = (*args))]
    fn new(py: Python<'_>, args: Vec<Bound<'_, PyAny>>) -> PyResult<Self> {
        let (fd, length) = match args.as_slice() {
            [n] => (None, n),
            [fd, n] => (Some(fd), n),
            _ => {
                return Err(PyTypeError::new_err(format!(
                    "ksm.mmap takes (length) or (-1, length), got {} arguments",
                    args.len()
                )))
            }
        };
        // Py_ssize_t, as the stdlib mmap's length.
        let length: i64 = int_arg(length, "length", "a length from 1 to 2**63-1 bytes")?;
        if let Some(fd) = fd {
            let fd: i64 = int_arg(fd, "fileno", "-1: ksm.mmap is anonymous memory")?;
            if fd != -1 {
                return Err(PyValueError::new_err(format!(
                    "ksm.mmap is anonymous memory: fileno must be -1, got {fd}"
                )));
            }
        }
        let length = usize::try_from(length)
            .map_err(|_| PyValueError::new_err(format!("length must be positive, got {length}")))?;
        let e = engine()?;
        let (addr, len) = py.detach(|| e.alloc(length))?;
        Ok(Mmap {
            addr,
            len,
            closed: AtomicBool::new(false),
            exports: AtomicUsize::new(0),
        })
    }

    /// Address of byte 0 (page aligned). ValueError once the mmap is closed.
    #[getter]
    fn address(&self) -> PyResult<usize> {
        self.check_open()?;
        Ok(self.addr)
    }

    /// Whether `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    fn __len__(&self) -> PyResult<usize> {
        self.check_open()?;
        Ok(self.len)
    }

    /// Advise `[start, start+length)` of this mapping, like `mmap.mmap.madvise`.
    ///
    /// `madvise(option[, start[, length]])`, positional like the stdlib's: `option`
    /// is `MADV_MERGEABLE` or `MADV_UNMERGEABLE`; `start` a byte offset, a multiple
    /// of `PAGE_SIZE` (default 0); `length` in bytes, rounded up to pages (default:
    /// to the end). OSError with `errno` set as `ksm.madvise` documents; ValueError
    /// if the mmap is closed or `start` is past the end.
    #[pyo3(signature = (option, *args))]
    fn madvise(
        &self,
        py: Python<'_>,
        option: Bound<'_, PyAny>,
        args: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        if args.len() > 2 {
            return Err(PyTypeError::new_err(format!(
                "madvise takes (option[, start[, length]]), got {} arguments",
                args.len() + 1
            )));
        }
        let option: i32 = int_arg(&option, "option", "MADV_MERGEABLE or MADV_UNMERGEABLE")?;
        let start: usize = match args.first() {
            Some(v) => int_arg(v, "start", "an offset from 0 to the length")?,
            None => 0,
        };
        let length: Option<usize> = match args.get(1) {
            Some(v) if !v.is_none() => Some(int_arg(v, "length", LENGTH)?),
            _ => None,
        };
        self.check_open()?;
        if start > self.len {
            return Err(PyValueError::new_err(format!(
                "madvise start {start} out of range (length {})",
                self.len
            )));
        }
        let length = length.unwrap_or(self.len - start).min(self.len - start);
        let page = sys::page_size();
        if start % page != 0 {
            return Err(PyOSError::new_err((
                libc::EINVAL,
                format!("madvise start {start} is not a multiple of the page size {page}"),
            )));
        }
        let addr = self.addr + start;
        let e = engine()?;
        py.detach(|| e.madvise(addr, length, option))?;
        Ok(())
    }

    /// State of the page holding byte `offset`.
    ///
    /// `"merged"` (maps a shared frame), `"zero"` (dropped to the kernel's zero page
    /// by `use_zero_pages`, not written since), `"unmerged"` (a private page: never
    /// merged, not advised, or copied by a write since the last scan), `"volatile"`
    /// (advised, changed since the previous visit) or `"unshared"` (advised, stable,
    /// no twin found yet). ValueError if `offset` is out of range or the mmap closed.
    fn page_state(&self, py: Python<'_>, offset: Bound<'_, PyAny>) -> PyResult<&'static str> {
        let offset: usize = int_arg(&offset, "offset", "an offset from 0 to the length - 1")?;
        self.check_open()?;
        if offset >= self.len {
            return Err(PyValueError::new_err(format!(
                "offset {offset} out of range (length {})",
                self.len
            )));
        }
        let (e, page) = (engine()?, sys::page_size());
        let addr = self.addr + offset / page * page;
        Ok(py.detach(|| e.page_state(addr)))
    }

    /// Unmap the memory (merged pages release their share of the frame).
    ///
    /// Closing twice does nothing. BufferError while a `memoryview` (or a numpy
    /// array over it) is still alive.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        if self.exports.load(Ordering::Acquire) > 0 {
            return Err(PyBufferError::new_err(
                "cannot close exported pointers exist",
            ));
        }
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let (e, addr) = (engine()?, self.addr);
        py.detach(|| e.free(addr));
        Ok(())
    }

    unsafe fn __getbuffer__(
        slf: Bound<'_, Self>,
        view: *mut ffi::Py_buffer,
        flags: c_int,
    ) -> PyResult<()> {
        let this = slf.borrow();
        this.check_open()?;
        this.exports.fetch_add(1, Ordering::AcqRel);
        // SAFETY: `view` is the pointer CPython passed to this slot; `slf` is the exporter;
        // the range stays mapped while `exports > 0` because `close()` refuses then and
        // `Drop` only runs once every export (each holding a reference to `slf`) is gone.
        let r = unsafe {
            sys::pybuf::fill(
                slf.py(),
                view,
                slf.as_ptr(),
                this.addr,
                this.len,
                false,
                flags,
            )
        };
        if r.is_err() {
            this.exports.fetch_sub(1, Ordering::AcqRel);
        }
        r
    }

    unsafe fn __releasebuffer__(&self, _view: *mut ffi::Py_buffer) {
        self.exports.fetch_sub(1, Ordering::AcqRel);
    }

    fn __repr__(&self) -> String {
        if self.closed() {
            "<ksm.mmap closed>".into()
        } else {
            format!("<ksm.mmap address={:#x} length={}>", self.addr, self.len)
        }
    }
}

impl Drop for Mmap {
    fn drop(&mut self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            if let Some(e) = ENGINE_READY.get() {
                // Dropped with the GIL held: release it while waiting for the engine.
                let addr = self.addr;
                Python::attach(|py| py.detach(|| e.free(addr)));
            }
        }
    }
}

static ENGINE_READY: std::sync::OnceLock<&'static Engine> = std::sync::OnceLock::new();

/// The daemon: the knobs and statistics of `/sys/kernel/mm/ksm/`, per process.
///
/// Use it as `ksm.ksmd`; `help(ksm.ksmd)` lists every knob with its default and
/// range, and every statistic. An unknown name raises AttributeError, a value out
/// of range ValueError naming the range, a value of the wrong type TypeError, and
/// nothing changes.
#[pyclass(module = "ksm._ksm", name = "Ksmd")]
pub struct Ksmd;

/// The statistics `ksm.ksmd` exposes (read-only), with the kernel's names.
const STATS: &[&str] = &[
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "full_scans",
    "pages_scanned",
    "pages_skipped",
    "stable_node_chains",
    "stable_node_dups",
    "ksm_zero_pages",
    "general_profit",
];

fn knob_to_py(py: Python<'_>, v: knobs::Value) -> PyResult<Py<PyAny>> {
    Ok(match v {
        knobs::Value::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        knobs::Value::Str(s) => s.into_pyobject(py)?.into_any().unbind(),
    })
}

#[pymethods]
impl Ksmd {
    fn __getattr__(&self, py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
        let e = engine()?;
        if let Some(v) = py.detach(|| e.knobs()).get(name) {
            return knob_to_py(py, v);
        }
        if STATS.contains(&name) {
            let v = py
                .detach(|| e.snapshot())
                .fields()
                .into_iter()
                .find(|(n, _)| *n == name)
                .expect("known statistic")
                .1;
            return Ok(v.into_pyobject(py)?.into_any().unbind());
        }
        Err(PyAttributeError::new_err(format!(
            "ksmd has no knob or statistic {name:?}; knobs: {}; statistics: {}",
            knobs::names().collect::<Vec<_>>().join(", "),
            STATS.join(", ")
        )))
    }

    fn __setattr__(&self, py: Python<'_>, name: &str, value: Bound<'_, PyAny>) -> PyResult<()> {
        if STATS.contains(&name) {
            return Err(PyAttributeError::new_err(format!(
                "{name} is a read-only statistic"
            )));
        }
        let kind = knobs::kind(name)?; // an unknown name is an AttributeError, whatever the value
        let type_error = || -> PyResult<PyErr> {
            Ok(pyo3::exceptions::PyTypeError::new_err(format!(
                "{name} takes {}, got a value of type {}",
                knobs::accepted(name),
                value.get_type().name()?
            )))
        };
        let is_bool = value.is_instance_of::<pyo3::types::PyBool>();
        let v = match kind {
            knobs::Kind::Mode => match value.extract::<String>() {
                Ok(s) => knobs::Value::Str(s),
                Err(_) => return Err(type_error()?),
            },
            knobs::Kind::Int { .. } if is_bool => return Err(type_error()?),
            _ if !value.is_instance_of::<pyo3::types::PyInt>() => return Err(type_error()?),
            _ => knobs::Value::Int(value.extract().map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} must be {}, got {value}",
                    knobs::accepted(name)
                ))
            })?),
        };
        let e = engine()?;
        let name = name.to_owned();
        py.detach(|| e.set_knob(&name, &v))?;
        Ok(())
    }

    fn __dir__(&self) -> Vec<&'static str> {
        knobs::names().chain(STATS.iter().copied()).collect()
    }

    fn __repr__(&self) -> PyResult<String> {
        let k = engine()?.knobs();
        Ok(format!(
            "<ksm.ksmd {}>",
            knobs::names()
                .filter_map(|n| k.get(n).map(|v| match v {
                    knobs::Value::Int(i) => format!("{n}={i}"),
                    knobs::Value::Str(s) => format!("{n}={s:?}"),
                }))
                .collect::<Vec<_>>()
                .join(" ")
        ))
    }
}

/// This process's `/proc/self/ksm_stat`, as a dict, in one consistent snapshot.
///
/// `ksm_rmap_items` (pages with a record), `ksm_zero_pages` (pages dropped to the
/// zero page by `use_zero_pages`), `ksm_merging_pages` (pages mapping a shared
/// frame, first users included: `pages_shared + pages_sharing`),
/// `ksm_process_profit` (`(ksm_merging_pages + ksm_zero_pages) * PAGE_SIZE` minus
/// ksm's bookkeeping and the VMAs merging added), `ksm_merge_any` (bool, see
/// `get_memory_merge`), `ksm_mergeable` (bool: some page is advised).
#[pyfunction]
fn ksm_stat(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let e = engine()?;
    let s = py.detach(|| e.ksm_stat());
    let d = PyDict::new(py);
    d.set_item("ksm_rmap_items", s.ksm_rmap_items)?;
    d.set_item("ksm_zero_pages", s.ksm_zero_pages)?;
    d.set_item("ksm_merging_pages", s.ksm_merging_pages)?;
    d.set_item("ksm_process_profit", s.ksm_process_profit)?;
    d.set_item("ksm_merge_any", s.ksm_merge_any)?;
    d.set_item("ksm_mergeable", s.ksm_mergeable)?;
    Ok(d)
}

/// Like `prctl(PR_SET_MEMORY_MERGE, enable)`, for the memory ksm owns.
///
/// True: every `ksm.mmap` region, existing and future, is mergeable. False: every
/// region (advised ranges of other memory too) is unmerged and loses its advice.
/// Setting the current state does nothing. TypeError if `enable` is not a bool or
/// int; OSError EINVAL when merging is unavailable here, EAGAIN when merged pages
/// could not get private copies (merge-any then stays on, nothing is lost).
#[pyfunction]
fn set_memory_merge(py: Python<'_>, enable: Bound<'_, PyAny>) -> PyResult<()> {
    if !enable.is_instance_of::<pyo3::types::PyInt>() {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "set_memory_merge takes a bool (or an int: nonzero enables, as prctl's), got a value of type {}",
            enable.get_type().name()?
        )));
    }
    let on = enable.is_truthy()?;
    let e = engine()?;
    py.detach(|| e.set_memory_merge(on))?;
    Ok(())
}

/// Like `prctl(PR_GET_MEMORY_MERGE)`: whether merge-any (`set_memory_merge`) is on.
#[pyfunction]
fn get_memory_merge(py: Python<'_>) -> PyResult<bool> {
    let e = engine()?;
    Ok(py.detach(|| e.get_memory_merge()))
}

/// `madvise(2)` for merging, on any address range of this process.
///
/// `advice` is `MADV_MERGEABLE` (12) or `MADV_UNMERGEABLE` (13); `address` page
/// aligned; `length` in bytes, rounded up to pages (0 does nothing). OSError with
/// the kernel's errno: EINVAL (unaligned, unknown advice, overflow, merging
/// unavailable), ENOMEM (part of the range unmapped; the mapped parts were
/// advised), EAGAIN (no memory for private copies; nothing lost).
#[pyfunction]
fn madvise(
    py: Python<'_>,
    address: Bound<'_, PyAny>,
    length: Bound<'_, PyAny>,
    advice: Bound<'_, PyAny>,
) -> PyResult<()> {
    let address: usize = int_arg(&address, "address", ADDRESS)?;
    let length: usize = int_arg(&length, "length", LENGTH)?;
    let advice: i32 = int_arg(
        &advice,
        "advice",
        "MADV_MERGEABLE (12) or MADV_UNMERGEABLE (13)",
    )?;
    let e = engine()?;
    py.detach(|| e.madvise(address, length, advice))?;
    Ok(())
}

/// Run `full_scans` full scans now, in the calling thread (GIL released).
///
/// A scan already in progress (by ksmd) is finished first and not counted. A page
/// merges on its second visit, so `scan(2)` merges what was written before. Ctrl-C
/// stops between two full scans. `ksm.scan` gives `full_scans` its default of 1.
// The default lives in Python, so that an explicit None is refused here.
#[pyfunction]
fn scan(py: Python<'_>, full_scans: Bound<'_, PyAny>) -> PyResult<()> {
    let full_scans: i64 = int_arg(&full_scans, "full_scans", "a count from 0 to 2**63-1")?;
    let n = u64::try_from(full_scans).map_err(|_| {
        PyValueError::new_err(format!("full_scans must be 0 or more, got {full_scans}"))
    })?;
    let e = engine()?;
    if n == 0 {
        // Only finish a scan in progress.
        py.detach(|| e.scan(0))?;
    }
    // One full scan at a time, so that Ctrl-C (a pending signal) stops a long run.
    for _ in 0..n {
        py.detach(|| e.scan(1))?;
        py.check_signals()?;
    }
    Ok(())
}

/// How long `wait_settled` waits with the GIL released before looking for signals.
const SIGNAL_CHECK: Duration = Duration::from_millis(100);

/// Wait until a full scan completes with nothing changed (no merge, unmerge or new
/// checksum).
///
/// `timeout` is in seconds (None: as long as ksmd runs). Returns True once settled,
/// False when the time is up; with ksmd stopped (`run != 1`) it answers at once.
/// ValueError for a negative or infinite timeout; Ctrl-C interrupts the wait.
#[pyfunction]
#[pyo3(signature = (timeout = None))]
fn wait_settled(py: Python<'_>, timeout: Option<Bound<'_, PyAny>>) -> PyResult<bool> {
    let timeout = timeout.map(|t| float_arg(&t, "timeout")).transpose()?;
    let t = match timeout {
        Some(t) if !(t >= 0.0 && t.is_finite()) => {
            return Err(PyValueError::new_err(format!(
                "timeout must be a finite number of seconds ≥ 0, got {t}"
            )))
        }
        Some(t) => Some(
            Duration::try_from_secs_f64(t)
                .map_err(|_| PyOverflowError::new_err(format!("timeout {t} s is too large")))?,
        ),
        None => None,
    };
    let e = engine()?;
    // A deadline past the clock's range waits as long as no timeout does.
    let deadline = t.and_then(|t| std::time::Instant::now().checked_add(t));
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
        let chunk = left.map_or(SIGNAL_CHECK, |l| l.min(SIGNAL_CHECK));
        if py.detach(|| e.wait_settled(Some(chunk))) {
            return Ok(true);
        }
        // Not settled: ksmd stopped (it will not settle by itself), or time is up.
        if e.knobs().run != 1 || left.is_some_and(|l| l <= chunk) {
            return Ok(false);
        }
        py.check_signals()?;
    }
}

/// Every statistic in one consistent snapshot, as a dict.
///
/// The kernel's (`pages_shared`, `pages_sharing`, `pages_unshared`,
/// `pages_volatile`, `full_scans`, `pages_scanned`, `pages_skipped`,
/// `stable_node_chains`, `stable_node_dups`, `ksm_zero_pages`, `general_profit`)
/// and ksm's own: `rmap_items`, `frames`, `deferred_frames`, `suspect_frames`,
/// `pool_bytes`, `merges` (pages remapped onto a frame, moves from one frame to
/// another included), `merge_failures`, `pages_hashed`, `cows`, `vmas_added`,
/// `vmas_used`, `vma_budget`, `vma_budget_skips`, `vma_budget_bytes` (what the
/// merges the budget put off in the latest complete full scan would have saved,
/// each page once), `unmergeable_pages`,
/// `metadata_bytes`, `metadata_peak_bytes` (what the last full scan held at its
/// end, unstable index included, if more than `metadata_bytes`), `tracked_pages`,
/// `advised_pages`, `settled` (bool: the last full scan changed nothing). `pages_shared + pages_sharing + pages_unshared +
/// pages_volatile == rmap_items` in every snapshot. `general_profit` is
/// `(pages_sharing + ksm_zero_pages) * PAGE_SIZE - metadata_bytes - vmas_added * 380`.
/// In a merge domain, a page on a frame of the domain counts in `pages_sharing`;
/// the frame itself is counted once, by `ksm.domain_stats()`, by no member.
#[pyfunction]
fn stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let e = engine()?;
    let s = py.detach(|| e.snapshot());
    let d = PyDict::new(py);
    for (k, v) in s.fields() {
        if k == "settled" {
            d.set_item(k, v != 0)?;
        } else {
            d.set_item(k, v)?;
        }
    }
    Ok(d)
}

/// Whether merging can work in this process (a userfaultfd with write-protect).
///
/// When False, `unavailable_reason()` says why and what to change, and
/// `MADV_MERGEABLE` fails with EINVAL, as the kernel's madvise does without KSM.
#[pyfunction]
fn available() -> PyResult<bool> {
    Ok(matches!(
        engine()?.availability(),
        Availability::Available { .. }
    ))
}

/// Why merging cannot work here and what to change, or None when it can.
#[pyfunction]
fn unavailable_reason() -> PyResult<Option<String>> {
    Ok(match engine()?.availability() {
        Availability::Available { .. } => None,
        Availability::Unavailable(why) => Some(why),
    })
}

/// `(mode, features)` of the userfaultfd, or None (for `ksm info`; not public API).
#[pyfunction]
fn _uffd_info() -> PyResult<Option<(&'static str, u64)>> {
    Ok(match engine()?.availability() {
        Availability::Available { mode, features } => Some((mode.name(), features)),
        Availability::Unavailable(_) => None,
    })
}

/// Test-only fault injection: every `every`-th call at `point` fails with `errno`
/// (`every = 0` turns it off). Points: see `sys::inject::POINTS`.
#[pyfunction]
fn _inject(point: &str, every: u64, errno: i32) -> PyResult<()> {
    let p = sys::inject::POINTS
        .iter()
        .find(|(n, _)| *n == point)
        .map(|&(_, p)| p)
        .ok_or_else(|| {
            let names: Vec<_> = sys::inject::POINTS.iter().map(|(n, _)| *n).collect();
            PyValueError::new_err(format!(
                "unknown injection point {point:?}; points are {}",
                names.join(", ")
            ))
        })?;
    sys::inject::set(p, every, errno);
    Ok(())
}

/// Tests only: failures injected so far.
#[pyfunction]
fn _injected() -> u64 {
    sys::inject::fired()
}

/// Restart ksmd in a forked child if it was running (registered with
/// `os.register_at_fork`; not public API).
#[pyfunction]
fn _after_fork_child() -> PyResult<()> {
    engine()?.after_fork_child();
    Ok(())
}

// ---- no code changes: ksm.advise and numpy's allocator --------------------------

fn errno_of(e: &Error) -> i32 {
    e.raw_errno().unwrap_or(libc::EIO)
}

/// The numpy handler's source of memory: ksm memory, advised mergeable.
fn numpy_alloc(len: usize) -> Result<usize, i32> {
    let e = Engine::get().map_err(|e| errno_of(&e))?;
    if !matches!(e.availability(), Availability::Available { .. }) {
        return Err(libc::EINVAL);
    }
    let (addr, mapped) = e.alloc(len).map_err(|e| errno_of(&e))?;
    if sys::npalloc::wants_hugepages(len) {
        // As numpy's default handler: fewer page faults where the array is filled. Best
        // effort (a kernel without transparent huge pages refuses; nothing changes).
        let _ = sys::mman::hugepage(addr, mapped);
    }
    if let Err(err) = e.madvise(addr, mapped, MADV_MERGEABLE) {
        e.free(addr);
        return Err(errno_of(&err));
    }
    Ok(addr)
}

fn numpy_nonzero(start: usize, end: usize) -> Option<Vec<(usize, usize)>> {
    Engine::get().ok()?.maybe_nonzero_runs(start, end)
}

fn numpy_free(addr: usize) {
    if let Ok(e) = Engine::get() {
        e.free(addr);
    }
}

/// The capsule of ksm's numpy memory handler for arrays of at least `min_bytes`.
#[pyfunction]
fn _numpy_handler(
    py: Python<'_>,
    array_api: Bound<'_, PyAny>,
    min_bytes: Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    let min_bytes: usize = int_arg(&min_bytes, "min_bytes", "a size from 0 to 2**64-1 bytes")?;
    sys::npalloc::handler(py, &array_api, min_bytes)
}

/// `PyDataMem_SetHandler(handler)` in the current context; returns the previous handler.
#[pyfunction]
fn _numpy_set_handler(
    py: Python<'_>,
    array_api: Bound<'_, PyAny>,
    handler: Bound<'_, PyAny>,
) -> PyResult<Py<PyAny>> {
    sys::npalloc::set_handler(py, &array_api, &handler)
}

/// The most ksm allocations the numpy handler keeps alive at once (each is a VMA).
#[pyfunction]
fn _numpy_set_max_live(n: Bound<'_, PyAny>) -> PyResult<()> {
    sys::npalloc::set_max_live(int_arg(&n, "n", "a count from 0 to 2**64-1")?);
    Ok(())
}

/// Whether the numpy handler asks for transparent huge pages for arrays of 4 MiB and
/// more (numpy's own setting, `_get_madvise_hugepage()`).
#[pyfunction]
fn _numpy_set_hugepages(on: bool) {
    sys::npalloc::set_hugepages(on);
}

/// Give back the freed blocks the numpy handler keeps for reuse; how many there were.
#[pyfunction]
fn _numpy_trim(py: Python<'_>) -> usize {
    py.detach(sys::npalloc::trim)
}

/// Whether `address` is the start of array data the numpy handler put in ksm memory.
#[pyfunction]
fn _numpy_owns(address: Bound<'_, PyAny>) -> PyResult<bool> {
    Ok(sys::npalloc::owns(int_arg(&address, "address", ADDRESS)?))
}

#[pyfunction]
fn _numpy_allocator_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    use sys::npalloc as a;
    let d = PyDict::new(py);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    d.set_item("allocations", load(&a::ALLOCATIONS))?;
    d.set_item("frees", load(&a::FREES))?;
    d.set_item("live_allocations", a::live_allocations())?;
    d.set_item("live_bytes", a::LIVE_BYTES.load(Ordering::Relaxed))?;
    d.set_item("fallbacks", load(&a::FALLBACKS))?;
    d.set_item("fallbacks_budget", load(&a::FALLBACKS_BUDGET))?;
    d.set_item("last_fallback_errno", load(&a::LAST_ERRNO))?;
    d.set_item("max_live_allocations", a::max_live())?;
    d.set_item("cached_bytes", a::CACHED_BYTES.load(Ordering::Relaxed))?;
    d.set_item("cache_hits", load(&a::CACHE_HITS))?;
    Ok(d)
}

/// Why `[address, address+length)` can never merge (shared, file-backed or special
/// memory, or not mapped), or None.
#[pyfunction]
fn _never_merges(address: Bound<'_, PyAny>, length: Bound<'_, PyAny>) -> PyResult<Option<String>> {
    let address: usize = int_arg(&address, "address", ADDRESS)?;
    let length: usize = int_arg(&length, "length", LENGTH)?;
    let end = address.saturating_add(length);
    let vmas = crate::region::maps::read_self()
        .map_err(|e| Error::os("reading /proc/self/maps", address, length, e))?;
    let (covered, gap) = crate::region::maps::cover(&vmas, address, end);
    for v in &covered {
        if v.eligible() {
            continue;
        }
        let what = if v.shared && (v.inode == 0 || v.path.starts_with("/dev/zero")) {
            "MAP_SHARED anonymous memory (shared with other processes, which the kernel's KSM never merges either)".to_owned()
        } else if v.shared {
            format!("a MAP_SHARED mapping of the file {}", v.path)
        } else if v.inode != 0 {
            format!("a mapping of the file {} (file pages never merge)", v.path)
        } else {
            format!("a special mapping ({})", v.path)
        };
        return Ok(Some(what));
    }
    Ok(gap.then(|| "not mapped memory".to_owned()))
}

/// Pages of `[address, address+length)` advised MADV_MERGEABLE now.
#[pyfunction]
fn _advised_pages(
    py: Python<'_>,
    address: Bound<'_, PyAny>,
    length: Bound<'_, PyAny>,
) -> PyResult<usize> {
    let address: usize = int_arg(&address, "address", ADDRESS)?;
    let length: usize = int_arg(&length, "length", LENGTH)?;
    let e = engine()?;
    Ok(py.detach(|| e.advised_pages_in(address, address.saturating_add(length))))
}

// Free-threaded CPython (3.14t) loads this module only when it is built for that
// interpreter from source (the abi3 wheel does not load there); it then turns the GIL
// back on, with a RuntimeWarning. ksm relies on the GIL: `Mmap.close()` and
// `__getbuffer__` check and change the export count and the closed flag as separate
// steps, and the numpy handler's fork safety assumes `os.fork()` holds the GIL.
#[pymodule(gil_used = true)]
fn _ksm(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let e = engine()?;
    let _ = ENGINE_READY.set(e);
    m.add("PAGE_SIZE", sys::page_size())?;
    m.add("MADV_MERGEABLE", MADV_MERGEABLE)?;
    m.add("MADV_UNMERGEABLE", MADV_UNMERGEABLE)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<Mmap>()?;
    m.add_class::<Ksmd>()?;
    m.add("ksmd", Ksmd)?;
    m.add_function(wrap_pyfunction!(madvise, m)?)?;
    m.add_function(wrap_pyfunction!(scan, m)?)?;
    m.add_function(wrap_pyfunction!(wait_settled, m)?)?;
    m.add_function(wrap_pyfunction!(stats, m)?)?;
    m.add_function(wrap_pyfunction!(ksm_stat, m)?)?;
    m.add_function(wrap_pyfunction!(set_memory_merge, m)?)?;
    m.add_function(wrap_pyfunction!(get_memory_merge, m)?)?;
    m.add_function(wrap_pyfunction!(available, m)?)?;
    m.add_function(wrap_pyfunction!(unavailable_reason, m)?)?;
    m.add_function(wrap_pyfunction!(_uffd_info, m)?)?;
    m.add_function(wrap_pyfunction!(_after_fork_child, m)?)?;
    m.add_function(wrap_pyfunction!(_inject, m)?)?;
    m.add_function(wrap_pyfunction!(_injected, m)?)?;
    domain::register(m)?;
    m.add_function(wrap_pyfunction!(_numpy_handler, m)?)?;
    m.add_function(wrap_pyfunction!(_numpy_set_handler, m)?)?;
    m.add_function(wrap_pyfunction!(_numpy_set_max_live, m)?)?;
    m.add_function(wrap_pyfunction!(_numpy_owns, m)?)?;
    m.add_function(wrap_pyfunction!(_numpy_trim, m)?)?;
    m.add_function(wrap_pyfunction!(_numpy_set_hugepages, m)?)?;
    m.add_function(wrap_pyfunction!(_numpy_allocator_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_never_merges, m)?)?;
    m.add_function(wrap_pyfunction!(_advised_pages, m)?)?;
    sys::npalloc::set_hooks(sys::npalloc::Hooks {
        alloc: numpy_alloc,
        free: numpy_free,
        nonzero: numpy_nonzero,
    });
    Ok(())
}
