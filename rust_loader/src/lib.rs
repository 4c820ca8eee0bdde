//! BulbaGPT data engine, exposed to Python as `bulba._rust`.
use pyo3::prelude::*;

/// Version of the Rust engine (matches the Python package).
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    Ok(())
}
