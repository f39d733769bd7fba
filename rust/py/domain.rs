//! Merge domains from Python: thin wrappers (the Python layer in `ksm/__init__.py`
//! adds the broker's command line and `KSM_DOMAIN`).

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::engine;
use crate::domain::client::Spawner;
use crate::domain::{place, proto};
use crate::error::Error;

fn name_arg(name: &Bound<'_, PyAny>) -> PyResult<String> {
    if !name.is_instance_of::<pyo3::types::PyString>() {
        return Err(PyTypeError::new_err(format!(
            "a domain name must be a str, not {}",
            name.get_type().name()?
        )));
    }
    let s: String = name.extract()?;
    if let Some(e) = proto::name_error(&s) {
        return Err(Error::Value(e).into());
    }
    Ok(s)
}

/// Join merge domain `name`; `argv` and `env` start its broker if none runs.
#[pyfunction]
fn _join(
    py: Python<'_>,
    name: Bound<'_, PyAny>,
    argv: Vec<String>,
    env: Vec<String>,
) -> PyResult<()> {
    let name = name_arg(&name)?;
    let e = engine()?;
    py.detach(|| e.join(&name, Spawner { argv, env }))?;
    Ok(())
}

/// Leave the merge domain joined, if any.
#[pyfunction]
fn _leave(py: Python<'_>) -> PyResult<()> {
    let e = engine()?;
    py.detach(|| e.leave());
    Ok(())
}

/// The merge domain joined, or None.
#[pyfunction]
fn _domain(py: Python<'_>) -> PyResult<Option<String>> {
    let e = engine()?;
    Ok(py.detach(|| e.domain()))
}

/// The statistics of domain `name`, asked of its broker (members 0 if none runs).
#[pyfunction]
fn _domain_stats<'py>(py: Python<'py>, name: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let name = name_arg(&name)?;
    let s = py
        .detach(|| place::query_stats(&name))
        .map_err(|e| Error::io("asking a merge domain's broker", e))?;
    let d = PyDict::new(py);
    d.set_item("members", s.members)?;
    d.set_item("pages_shared", s.pages_shared)?;
    d.set_item("pages_sharing", s.pages_sharing)?;
    d.set_item("pool_bytes", s.pool_bytes)?;
    d.set_item("live_frames", s.live_frames)?;
    d.set_item("segments", s.segments)?;
    d.set_item("segments_retired", s.segments_retired)?;
    d.set_item("refused", s.refused)?;
    Ok(d)
}

/// A round trip to the domain's broker, at most `timeout` seconds: True once
/// answered (everything sent before was handled, everything the broker sent before
/// is in this process's inbox, taken in at the next batch). False if in no domain or
/// no answer came.
#[pyfunction]
#[pyo3(signature = (timeout = 10.0))]
fn _domain_sync(py: Python<'_>, timeout: f64) -> PyResult<bool> {
    let e = engine()?;
    let t = std::time::Duration::try_from_secs_f64(timeout.max(0.0)).map_err(|_| {
        pyo3::exceptions::PyValueError::new_err("timeout must be a finite number of seconds")
    })?;
    Ok(py.detach(|| e.domain_sync(t)).is_some())
}

/// This process's figures of its domain.
#[pyfunction]
fn _member_stats(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    let e = engine()?;
    let s = py.detach(|| e.member_stats());
    let d = PyDict::new(py);
    d.set_item("domain", s.name)?;
    d.set_item("connected", s.link.connected)?;
    d.set_item("member", s.link.member)?;
    d.set_item("members", s.link.members)?;
    d.set_item("segments", s.segments)?;
    d.set_item("pages", s.pages)?;
    d.set_item("announced", s.announced)?;
    d.set_item("published", s.published)?;
    d.set_item("evicted", s.evicted)?;
    d.set_item("publish_failures", s.publish_failures)?;
    d.set_item("refused", s.link.refused)?;
    d.set_item("disconnects", s.link.disconnects)?;
    d.set_item("brokers_started", s.link.brokers_started)?;
    d.set_item("segments_skipped", s.link.skipped)?;
    d.set_item("messages_sent", s.link.sent)?;
    d.set_item("bytes_sent", s.link.sent_bytes)?;
    d.set_item("messages_received", s.link.received)?;
    d.set_item("bytes_received", s.link.received_bytes)?;
    d.set_item("last_error", s.last_error)?;
    Ok(d)
}

/// Be the broker of domain `name` until its last member leaves (False if another
/// broker runs). Started by members, in a process of its own.
#[pyfunction]
fn _broker(py: Python<'_>, name: Bound<'_, PyAny>) -> PyResult<bool> {
    let name = name_arg(&name)?;
    py.detach(|| place::run_broker(&name))
        .map_err(|e| Error::io("running a merge domain's broker", e).into())
}

/// The directory where this user's domains meet (created private if needed).
#[pyfunction]
fn _domain_dir() -> PyResult<String> {
    let d = place::dir().map_err(|e| Error::io("the merge domains' directory", e))?;
    Ok(d.to_string_lossy().into_owned())
}

/// The path of domain `name`'s broker socket (this version's; it may not exist).
#[pyfunction]
fn _domain_socket(name: Bound<'_, PyAny>) -> PyResult<String> {
    let name = name_arg(&name)?;
    let p = place::socket_path(&name).map_err(|e| Error::io("the merge domains' directory", e))?;
    Ok(p.to_string_lossy().into_owned())
}

/// The user's domains with a broker socket now.
#[pyfunction]
fn _domains(py: Python<'_>) -> Vec<String> {
    py.detach(place::list)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(_join, m)?)?;
    m.add_function(wrap_pyfunction!(_leave, m)?)?;
    m.add_function(wrap_pyfunction!(_domain, m)?)?;
    m.add_function(wrap_pyfunction!(_domain_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_member_stats, m)?)?;
    m.add_function(wrap_pyfunction!(_domain_sync, m)?)?;
    m.add_function(wrap_pyfunction!(_broker, m)?)?;
    m.add_function(wrap_pyfunction!(_domains, m)?)?;
    m.add_function(wrap_pyfunction!(_domain_dir, m)?)?;
    m.add_function(wrap_pyfunction!(_domain_socket, m)?)?;
    Ok(())
}
