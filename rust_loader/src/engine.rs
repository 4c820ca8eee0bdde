//! The engine: one validated token file plus one sampler plan, addressed by global position.
use std::path::Path;
use std::sync::Arc;

use crate::batch::{assemble, Batch};
use crate::error::{DataError, Result};
use crate::plan::{BucketedPlan, PackedPlan, Plan, Sharding, StreamPlan};
use crate::tokens::{read_index, Dtype, TokenFile};

/// Everything needed to open a split, as given by the Python side (from meta.json and the recipe).
#[derive(Debug, Clone)]
pub struct Options {
    pub dtype: Dtype,
    pub vocab_size: u32,
    pub sampler: String,
    pub batch_size: u64,
    pub ctx: u32,
    pub buckets: Vec<u32>,
    /// Tokens per bucketed batch; default batch_size * ctx.
    pub token_budget: Option<u64>,
    pub pad_id: u32,
    pub sharding: Sharding,
    pub expected_tokens: Option<u64>,
    pub expected_docs: Option<u64>,
}

pub struct Engine {
    tokens: TokenFile,
    plan: Box<dyn Plan>,
    pad_id: i32,
    n_docs: u64,
}

impl Engine {
    pub fn open(bin: &Path, idx: &Path, opts: &Options) -> Result<Self> {
        if opts.pad_id >= opts.vocab_size {
            return Err(DataError::new(format!("pad_id {} is >= vocab_size {}", opts.pad_id, opts.vocab_size)));
        }
        let tokens = TokenFile::open(bin, opts.dtype, opts.vocab_size, opts.expected_tokens)?;
        let n_tokens = tokens.len() as u64;
        // The stream sampler needs the index only to validate it; the others keep the offsets.
        let keep = opts.sampler != "stream";
        let (n_docs, offsets) = read_index(idx, n_tokens, opts.expected_docs, keep)?;
        let shard = opts.sharding;
        let where_ = |e: DataError| DataError::at(bin, e);
        let plan: Box<dyn Plan> = match opts.sampler.as_str() {
            "stream" => Box::new(StreamPlan::new(n_tokens, opts.ctx, opts.batch_size, shard).map_err(where_)?),
            "packed" => Box::new(PackedPlan::new(&offsets, opts.ctx, opts.batch_size, shard).map_err(where_)?),
            "bucketed" => {
                let budget = opts.token_budget.unwrap_or(opts.batch_size * u64::from(opts.ctx));
                Box::new(BucketedPlan::new(&offsets, &opts.buckets, budget, shard).map_err(where_)?)
            }
            other => return Err(DataError::new(format!("unknown sampler {other:?}; expected stream, packed or bucketed"))),
        };
        Ok(Self { tokens, plan, pad_id: opts.pad_id as i32, n_docs })
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.plan.batches_per_epoch()
    }

    /// The batch at global position `pos` (epoch = pos / batches_per_epoch).
    pub fn batch(&self, pos: u64) -> Result<Batch> {
        let per_epoch = self.batches_per_epoch();
        let spec = self.plan.batch(pos / per_epoch, pos % per_epoch);
        assemble(&spec, &self.tokens, self.pad_id)
    }

    pub fn padding_frac(&self) -> f64 {
        self.plan.padding_frac()
    }

    pub fn units(&self) -> u64 {
        self.plan.units()
    }

    pub fn n_tokens(&self) -> u64 {
        self.tokens.len() as u64
    }

    pub fn n_docs(&self) -> u64 {
        self.n_docs
    }
}

/// Engines are shared with the prefetch workers.
pub type SharedEngine = Arc<Engine>;
