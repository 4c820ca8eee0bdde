//! BulbaGPT data engine, exposed to Python as `bulba._rust`.
//!
//! The pure-Rust modules (token files, samplers, assembly, prefetch) know nothing of Python and
//! are tested by `cargo test`; this file only converts arguments, errors and batches.
pub mod batch;
pub mod engine;
pub mod error;
pub mod perm;
pub mod plan;
pub mod prefetch;
pub mod tokens;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::ndarray::Array2;
use numpy::IntoPyArray;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::batch::Batch;
use crate::engine::Options;
use crate::error::DataError;
use crate::plan::Sharding;
use crate::prefetch::Prefetcher;
use crate::tokens::Dtype;

fn value_error(e: DataError) -> PyErr {
    PyValueError::new_err(e.0)
}

/// Version of the Rust engine (matches the Python package).
#[pyfunction]
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Moves the batch's buffers into numpy arrays (no copy: numpy owns the Rust allocations).
fn to_dict(py: Python<'_>, b: Batch) -> PyResult<Bound<'_, PyDict>> {
    let shape = (b.rows, b.cols);
    let grid = |v: Vec<i32>| {
        Array2::from_shape_vec(shape, v).map(|a| a.into_pyarray(py)).map_err(|e| PyRuntimeError::new_err(e.to_string()))
    };
    let d = PyDict::new(py);
    d.set_item("input_ids", grid(b.input_ids)?)?;
    d.set_item("labels", grid(b.labels)?)?;
    d.set_item("position_ids", grid(b.position_ids)?)?;
    d.set_item("seq_ids", grid(b.seq_ids)?)?;
    d.set_item("cu_seqlens", b.cu_seqlens.into_pyarray(py))?;
    d.set_item("max_seqlen", b.max_seqlen)?;
    d.set_item("n_tokens", b.n_tokens)?;
    d.set_item("n_pad", b.n_pad)?;
    Ok(d)
}

/// One split of a prepared dataset with one sampler; batches are addressed by global position
/// (epoch * batches_per_epoch + index), so any position can be produced or resumed directly.
#[pyclass(frozen, module = "bulba._rust")]
struct Engine {
    inner: Arc<engine::Engine>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (bin_path, idx_path, *, dtype, vocab_size, sampler, batch_size, ctx, seed=0, rank=0,
                        world_size=1, buckets=Vec::new(), token_budget=None, shuffle=true, drop_last=true,
                        pad_id=0, expected_tokens=None, expected_docs=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bin_path: PathBuf,
        idx_path: PathBuf,
        dtype: &str,
        vocab_size: u32,
        sampler: String,
        batch_size: u64,
        ctx: u32,
        seed: u64,
        rank: u64,
        world_size: u64,
        buckets: Vec<u32>,
        token_budget: Option<u64>,
        shuffle: bool,
        drop_last: bool,
        pad_id: u32,
        expected_tokens: Option<u64>,
        expected_docs: Option<u64>,
    ) -> PyResult<Self> {
        let opts = Options {
            dtype: Dtype::parse(dtype).map_err(value_error)?,
            vocab_size,
            sampler,
            batch_size,
            ctx,
            buckets,
            token_budget,
            pad_id,
            sharding: Sharding { seed, shuffle, rank, world: world_size, drop_last },
            expected_tokens,
            expected_docs,
        };
        // Validation reads the whole index: let other Python threads run meanwhile.
        let inner = py.detach(|| engine::Engine::open(&bin_path, &idx_path, &opts)).map_err(value_error)?;
        Ok(Self { inner: Arc::new(inner) })
    }

    #[getter]
    fn batches_per_epoch(&self) -> u64 {
        self.inner.batches_per_epoch()
    }

    #[getter]
    fn padding_frac(&self) -> f64 {
        self.inner.padding_frac()
    }

    /// Windows, packed rows or document pieces per epoch (over all ranks).
    #[getter]
    fn units(&self) -> u64 {
        self.inner.units()
    }

    #[getter]
    fn n_tokens(&self) -> u64 {
        self.inner.n_tokens()
    }

    #[getter]
    fn n_docs(&self) -> u64 {
        self.inner.n_docs()
    }

    /// The batch at global position `pos`, assembled now on this thread (GIL released).
    fn batch<'py>(&self, py: Python<'py>, pos: u64) -> PyResult<Bound<'py, PyDict>> {
        let b = py.detach(|| self.inner.batch(pos)).map_err(value_error)?;
        to_dict(py, b)
    }

    /// Iterator over positions `start..stop` (forever when stop is None), assembled by
    /// `workers` background threads up to `prefetch` batches ahead.
    #[pyo3(signature = (start=0, stop=None, prefetch=4, workers=1))]
    fn iter(&self, start: u64, stop: Option<u64>, prefetch: usize, workers: usize) -> BatchIter {
        let p = Prefetcher::spawn(Arc::clone(&self.inner), start, stop, prefetch, workers);
        BatchIter { inner: Mutex::new(p) }
    }
}

#[pyclass(module = "bulba._rust")]
struct BatchIter {
    inner: Mutex<Prefetcher>,
}

#[pymethods]
impl BatchIter {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyDict>>> {
        // Waiting for the workers must not hold the GIL (they never need it, but Python does).
        let item = py.detach(|| self.inner.lock().map(|mut p| p.next_batch()).map_err(|_| ()));
        match item.map_err(|()| PyRuntimeError::new_err("batch iterator poisoned by an earlier panic"))? {
            None => Ok(None),
            Some(Ok(b)) => to_dict(py, b).map(Some),
            Some(Err(e)) => Err(value_error(e)),
        }
    }

    /// Global position of the next batch.
    #[getter]
    fn position(&self) -> PyResult<u64> {
        self.inner.lock().map(|p| p.position()).map_err(|_| PyRuntimeError::new_err("batch iterator poisoned"))
    }
}

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(version, m)?)?;
    m.add_class::<Engine>()?;
    m.add_class::<BatchIter>()?;
    Ok(())
}
