//! BulbaGPT data engine, exposed to Python as `bulba._rust`.
//!
//! The pure-Rust modules (token files, samplers, assembly, prefetch) know nothing of Python and
//! are tested by `cargo test`; this file only converts arguments, errors and batches.
#![deny(unsafe_op_in_unsafe_fn)]
mod batch;
mod engine;
mod error;
mod hint;
mod perm;
mod plan;
mod prefetch;
#[cfg(test)]
mod test_dir;
mod tokens;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use numpy::ndarray::ArrayView2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::intern;
use pyo3::types::PyDict;

use crate::batch::{Batch, Pool};
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

/// Owns the memory of one batch while numpy arrays view it; gives it back to the engine's pool
/// when the last of them is gone.
#[pyclass(frozen, module = "bulba._rust")]
struct Block {
    data: Vec<i32>,
    pool: Arc<Pool>,
}

impl Drop for Block {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.data));
    }
}

/// The read-only cu_seqlens shared by every full-window batch of one shape (see
/// `Batch::windows`), made once per engine and shape.
type Constants = (usize, usize, Py<PyAny>);

fn window_cu_seqlens(py: Python<'_>, cache: &Mutex<Vec<Constants>>, rows: usize, cols: usize) -> PyResult<Py<PyAny>> {
    let mut cache = cache.lock().map_err(|_| PyRuntimeError::new_err("engine poisoned by an earlier panic"))?;
    if let Some((_, _, c)) = cache.iter().find(|c| (c.0, c.1) == (rows, cols)) {
        return Ok(c.clone_ref(py));
    }
    let cu = batch::window_cu_seqlens(rows, cols).into_pyarray(py).into_any().unbind();
    // Shared by many batches: writing into one must fail, not change the others.
    cu.bind(py).getattr("flags")?.setattr("writeable", false)?;
    cache.push((rows, cols, cu.clone_ref(py)));
    Ok(cu)
}

/// The batch as a dict of numpy arrays that view its buffer (no copy; the buffer returns to
/// the pool when they are all dropped).
fn to_dict<'py>(py: Python<'py>, b: Batch, pool: &Arc<Pool>, cache: &Mutex<Vec<Constants>>) -> PyResult<Bound<'py, PyDict>> {
    let (rows, cols, stride) = (b.rows, b.cols, b.stride());
    let mut data = b.data;
    let ptr = data.as_mut_ptr();
    let block = Bound::new(py, Block { data, pool: Arc::clone(pool) })?.into_any();
    let grid = |k: usize| {
        // SAFETY: `ptr` is the heap buffer of the Vec now owned by `block` (moving a Vec does not
        // move its buffer), of `k_max * stride` values with k < k_max; the buffer is neither
        // reallocated nor accessed from Rust until `block` is dropped, and every array holds a
        // reference to `block` as its base object.
        unsafe {
            let view = ArrayView2::from_shape_ptr((rows, cols), ptr.add(k * stride));
            PyArray2::borrow_from_array(&view, block.clone())
        }
    };
    let d = PyDict::new(py);
    d.set_item(intern!(py, "input_ids"), grid(0))?;
    d.set_item(intern!(py, "labels"), grid(1))?;
    if b.windows {
        d.set_item(intern!(py, "cu_seqlens"), window_cu_seqlens(py, cache, rows, cols)?)?;
    } else {
        d.set_item(intern!(py, "cu_seqlens"), b.cu.into_pyarray(py))?;
    }
    d.set_item(intern!(py, "max_seqlen"), b.max_seqlen)?;
    d.set_item(intern!(py, "n_tokens"), b.n_tokens)?;
    d.set_item(intern!(py, "n_pad"), b.n_pad)?;
    Ok(d)
}

/// One split of a prepared dataset with one sampler; batches are addressed by global position
/// (epoch * batches_per_epoch + index), so any position can be produced or resumed directly.
#[pyclass(frozen, module = "bulba._rust")]
struct Engine {
    inner: Arc<engine::Engine>,
    constants: Mutex<Vec<Constants>>,
}

#[pymethods]
impl Engine {
    #[new]
    #[pyo3(signature = (bin_path, idx_path, *, dtype, vocab_size, sampler, batch_size, ctx, seed=0, rank=0,
                        world_size=1, buckets=Vec::new(), shuffle=true, drop_last=true,
                        pad_id=0, expected_tokens=None, expected_docs=None, mask_path=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bin_path: PathBuf,
        idx_path: PathBuf,
        dtype: &str,
        vocab_size: u32,
        sampler: &str,
        batch_size: u64,
        ctx: u32,
        seed: u64,
        rank: u64,
        world_size: u64,
        buckets: Vec<u32>,
        shuffle: bool,
        drop_last: bool,
        pad_id: u32,
        expected_tokens: Option<u64>,
        expected_docs: Option<u64>,
        mask_path: Option<PathBuf>,
    ) -> PyResult<Self> {
        let opts = Options {
            dtype: Dtype::parse(dtype).map_err(value_error)?,
            vocab_size,
            sampler: sampler.parse().map_err(value_error)?,
            batch_size,
            ctx,
            buckets,
            pad_id,
            sharding: Sharding { seed, shuffle, rank, world: world_size, drop_last },
            expected_tokens,
            expected_docs,
            mask: mask_path,
        };
        // Validation reads the whole index: let other Python threads run meanwhile.
        let inner = py.detach(|| engine::Engine::open(&bin_path, &idx_path, &opts)).map_err(value_error)?;
        Ok(Self { inner: Arc::new(inner), constants: Mutex::default() })
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
        to_dict(py, b, self.inner.pool(), &self.constants)
    }

    /// Where each input position of batch `pos` comes from in the token file (int64
    /// [rows, cols], -1 for padding); from the plan alone, no tokens are read.
    fn offsets<'py>(&self, py: Python<'py>, pos: u64) -> PyResult<Bound<'py, PyArray2<i64>>> {
        let (cols, flat) = py.detach(|| self.inner.offsets(pos));
        let rows = flat.len().checked_div(cols).unwrap_or(0);
        numpy::ndarray::Array2::from_shape_vec((rows, cols), flat)
            .map(|a| a.into_pyarray(py))
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))
    }

    /// Iterator over positions `start..stop` (forever when stop is None), assembled by
    /// `workers` background threads up to `prefetch` batches ahead.
    #[pyo3(signature = (start=0, stop=None, prefetch=4, workers=1))]
    fn iter(slf: &Bound<'_, Self>, start: u64, stop: Option<u64>, prefetch: usize, workers: usize) -> BatchIter {
        let p = Prefetcher::spawn(Arc::clone(&slf.get().inner), start, stop, prefetch, workers);
        BatchIter { inner: Mutex::new(p), engine: slf.clone().unbind() }
    }
}

#[pyclass(module = "bulba._rust")]
struct BatchIter {
    inner: Mutex<Prefetcher>,
    engine: Py<Engine>,
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
            Some(Ok(b)) => {
                let engine = self.engine.get();
                to_dict(py, b, engine.inner.pool(), &engine.constants).map(Some)
            }
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
    m.add_class::<Block>()?;
    Ok(())
}
