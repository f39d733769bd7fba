//! The CPython buffer protocol for `ksm.mmap` (`PyBuffer_FillInfo`).
//!
//! Kept here so that the PyO3 layer stays free of raw pointer work: its
//! `__getbuffer__` only forwards to [`fill`].

use pyo3::{ffi, PyErr, PyResult, Python};

/// Fill `view` with a one-dimensional byte buffer over `[addr, addr+len)`.
///
/// # Safety
/// `view` must be the pointer CPython passed to `__getbuffer__`; `obj` the exporting
/// object (a new reference is taken); `[addr, addr+len)` must stay mapped until the
/// matching `__releasebuffer__` (the exporter refuses to unmap while exports exist).
pub unsafe fn fill(
    py: Python<'_>,
    view: *mut ffi::Py_buffer,
    obj: *mut ffi::PyObject,
    addr: usize,
    len: usize,
    readonly: bool,
    flags: std::os::raw::c_int,
) -> PyResult<()> {
    debug_assert!(!view.is_null() && !obj.is_null());
    let len = ffi::Py_ssize_t::try_from(len)
        .map_err(|_| pyo3::exceptions::PyOverflowError::new_err("buffer too large"))?;
    // SAFETY: per the contract `view` is CPython's buffer struct and the memory stays
    // valid while the export lives; FillInfo takes its own reference to `obj`.
    let r = unsafe {
        ffi::PyBuffer_FillInfo(
            view,
            obj,
            addr as *mut std::ffi::c_void,
            len,
            readonly as _,
            flags,
        )
    };
    if r == -1 {
        return Err(PyErr::fetch(py));
    }
    Ok(())
}
