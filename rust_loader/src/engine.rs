//! The engine: one validated token file plus one sampler plan, addressed by global position.
use std::path::Path;
use std::sync::Arc;

use crate::batch::{apply_mask, assemble, Batch, Pool};
use crate::error::{DataError, Result};
use crate::plan::{BucketedPlan, PackedPlan, Plan, Sharding, StreamPlan};
use crate::tokens::{read_index, Dtype, MaskFile, TokenFile};

/// How batches are cut from the token stream (docs/loader.md): windows of the stream, whole
/// documents packed into rows, or one document per row padded to a bucket length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sampler {
    Stream,
    Packed,
    Bucketed,
}

impl std::str::FromStr for Sampler {
    type Err = DataError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stream" => Ok(Self::Stream),
            "packed" => Ok(Self::Packed),
            "bucketed" => Ok(Self::Bucketed),
            other => Err(DataError::new(format!("unknown sampler {other:?}; expected stream, packed or bucketed"))),
        }
    }
}

/// Everything needed to open a split, as given by the Python side (from meta.json and the recipe).
#[derive(Debug, Clone)]
pub struct Options {
    pub dtype: Dtype,
    pub vocab_size: u32,
    pub sampler: Sampler,
    pub batch_size: u64,
    pub ctx: u32,
    pub buckets: Vec<u32>,
    pub pad_id: u32,
    pub sharding: Sharding,
    pub expected_tokens: Option<u64>,
    pub expected_docs: Option<u64>,
    /// The split's loss mask (`NAME.mask.bin`; None: every target keeps its label).
    pub mask: Option<std::path::PathBuf>,
}

pub struct Engine {
    tokens: TokenFile,
    mask: Option<MaskFile>,
    plan: Box<dyn Plan>,
    pad_id: i32,
    n_docs: u64,
    /// Buffers of batches Python has dropped, reused by the next ones.
    pool: Arc<Pool>,
}

impl Engine {
    pub fn open(bin: &Path, idx: &Path, opts: &Options) -> Result<Self> {
        if opts.pad_id >= opts.vocab_size {
            return Err(DataError::new(format!("pad_id {} is >= vocab_size {}", opts.pad_id, opts.vocab_size)));
        }
        let tokens = TokenFile::open(bin, opts.dtype, opts.vocab_size, opts.expected_tokens)?;
        let n_tokens = tokens.len() as u64;
        let mask = opts.mask.as_deref().map(|p| MaskFile::open(p, n_tokens)).transpose()?;
        // The stream sampler needs the index only to validate it; the others keep the offsets.
        let keep = opts.sampler != Sampler::Stream;
        let (n_docs, offsets) = read_index(idx, n_tokens, opts.expected_docs, keep)?;
        let shard = opts.sharding;
        let where_ = |e: DataError| DataError::at(bin, e);
        let plan: Box<dyn Plan> = match opts.sampler {
            Sampler::Stream => Box::new(StreamPlan::new(n_tokens, opts.ctx, opts.batch_size, shard).map_err(where_)?),
            Sampler::Packed => Box::new(PackedPlan::new(&offsets, opts.ctx, opts.batch_size, shard).map_err(where_)?),
            Sampler::Bucketed => {
                // As many slots per batch as the other samplers: batch_size rows of ctx.
                let budget = opts.batch_size * u64::from(opts.ctx);
                Box::new(BucketedPlan::new(&offsets, &opts.buckets, budget, shard).map_err(where_)?)
            }
        };
        Ok(Self { tokens, mask, plan, pad_id: opts.pad_id as i32, n_docs, pool: Arc::default() })
    }

    pub fn batches_per_epoch(&self) -> u64 {
        self.plan.batches_per_epoch()
    }

    /// The batch at global position `pos` (epoch = pos / batches_per_epoch).
    pub fn batch(&self, pos: u64) -> Result<Batch> {
        let per_epoch = self.batches_per_epoch();
        let spec = self.plan.batch(pos / per_epoch, pos % per_epoch);
        let mut b = assemble(&spec, &self.tokens, self.pad_id, &self.pool)?;
        if let Some(mask) = &self.mask {
            apply_mask(&spec, mask, &mut b);
        }
        Ok(b)
    }

    /// Where in the token file each input position of batch `pos` comes from, row-major
    /// `[rows, cols]`, -1 for padding: segments fill a row from column 0 in order (as
    /// `assemble` places them). Only the plan is consulted, no tokens are read; validation
    /// uses it to attribute each scored token to its document's source.
    pub fn offsets(&self, pos: u64) -> (usize, Vec<i64>) {
        let per_epoch = self.batches_per_epoch();
        let spec = self.plan.batch(pos / per_epoch, pos % per_epoch);
        let cols = spec.cols;
        let mut out = vec![-1i64; spec.n_rows() * cols];
        for (r, segs) in spec.rows().enumerate() {
            let mut c = r * cols;
            for s in segs {
                for (j, o) in out[c..c + s.len as usize].iter_mut().enumerate() {
                    *o = (s.start + j as u64) as i64;
                }
                c += s.len as usize;
            }
        }
        (cols, out)
    }

    /// Where the buffers of dropped batches go back to (see `Pool`).
    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefetch::Prefetcher;
    use crate::test_dir::TestDir;
    use crate::tokens::TokenFile;
    use std::io::Write;
    use std::path::PathBuf;

    /// A split of `n_docs` documents of varying length, written as prepare.py would.
    /// The files live as long as the returned directory (keep it bound: `let (_dir, ..) = ...`).
    fn write_split(tag: &str, n_docs: u64) -> (TestDir, PathBuf, PathBuf) {
        let dir = TestDir::new(&format!("engine-{tag}"));
        let (mut tokens, mut offsets) = (Vec::new(), vec![0u64]);
        for d in 0..n_docs {
            let len = 2 + crate::perm::splitmix64(d) % 50;
            tokens.extend((0..len).map(|i| ((d + i) % 100) as u16));
            offsets.push(tokens.len() as u64);
        }
        let (bin, idx) = (dir.join("train.bin"), dir.join("train.idx"));
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::File::create(&bin).unwrap().write_all(&bytes).unwrap();
        let bytes: Vec<u8> = offsets.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::File::create(&idx).unwrap().write_all(&bytes).unwrap();
        (dir, bin, idx)
    }

    fn options(sampler: &str) -> Options {
        Options {
            dtype: Dtype::U16,
            vocab_size: 100,
            sampler: sampler.parse().unwrap(),
            batch_size: 4,
            ctx: 32,
            buckets: vec![8, 16, 32],
            pad_id: 0,
            sharding: Sharding { seed: 1, shuffle: true, rank: 0, world: 1, drop_last: true },
            expected_tokens: None,
            expected_docs: Some(300),
            mask: None,
        }
    }

    #[test]
    fn prefetched_batches_match_direct_ones_in_order() {
        let (_dir, bin, idx) = write_split("order", 300);
        for sampler in ["stream", "packed", "bucketed"] {
            let engine = Arc::new(Engine::open(&bin, &idx, &options(sampler)).unwrap());
            let start = engine.batches_per_epoch() - 2; // across an epoch boundary
            // Windows of one batch to more than the run; workers alone and with the consumer
            // assembling too (it does when its next batch is not ready).
            for (depth, workers) in [(1, 1), (3, 1), (3, 2), (20, 3)] {
                let mut p = Prefetcher::spawn(Arc::clone(&engine), start, Some(start + 6), depth, workers);
                for pos in start..start + 6 {
                    assert_eq!(p.next_batch().unwrap().unwrap(), engine.batch(pos).unwrap(), "{sampler} at {pos}");
                }
                assert!(p.next_batch().is_none());
            }
            // An endless prefetcher dropped while its workers wait for room stops them.
            let mut p = Prefetcher::spawn(Arc::clone(&engine), 0, None, 2, 2);
            p.next_batch().unwrap().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(5));
            drop(p);
        }
    }

    #[test]
    fn the_loss_mask_drops_exactly_the_untrained_targets_in_every_sampler() {
        // Odd token ids are trained on, even ones not (the mask written beside the split), so
        // a label's own value says whether the mask keeps it.
        let (_dir, bin, idx) = write_split("mask", 300);
        let bytes = std::fs::read(&bin).unwrap();
        let mask: Vec<u8> = bytes.chunks(2).map(|c| (u16::from_le_bytes([c[0], c[1]]) % 2) as u8).collect();
        let mask_path = bin.with_extension("mask.bin");
        std::fs::write(&mask_path, &mask).unwrap();
        for sampler in ["stream", "packed", "bucketed"] {
            let plain = Engine::open(&bin, &idx, &options(sampler)).unwrap();
            let masked = Engine::open(&bin, &idx, &Options { mask: Some(mask_path.clone()), ..options(sampler) }).unwrap();
            let mut kept = 0;
            for pos in 0..plain.batches_per_epoch() + 2 {
                let (a, b) = (plain.batch(pos).unwrap(), masked.batch(pos).unwrap());
                assert_eq!(a.input_ids(), b.input_ids(), "{sampler} {pos}");
                assert_eq!(a.cu_seqlens(), b.cu_seqlens(), "{sampler} {pos}");
                for (&x, &y) in a.labels().iter().zip(b.labels()) {
                    let want = if x != crate::batch::IGNORE && x % 2 == 1 { x } else { crate::batch::IGNORE };
                    assert_eq!(y, want, "{sampler} {pos}");
                }
                let n = b.labels().iter().filter(|&&l| l != crate::batch::IGNORE).count();
                assert_eq!(b.n_tokens, n, "{sampler} {pos}");
                kept += n;
            }
            assert!(kept > 0, "{sampler}: some targets are trained on");
        }
        // A mask that does not match the token file is refused on open.
        std::fs::write(&mask_path, &mask[1..]).unwrap();
        let e = Engine::open(&bin, &idx, &Options { mask: Some(mask_path.clone()), ..options("packed") }).err().unwrap();
        assert!(e.0.contains("mask.bin") && e.0.contains("truncated"), "{e}");
    }

    #[test]
    fn a_worker_error_arrives_in_order_and_ends_the_iteration() {
        // A bad id deep inside a file that is checked as batches read it (as files above
        // 64 MB are): the batches before it arrive, then its error, then nothing.
        let (_dir, bin, _) = write_split("worker-error", 10_000);
        let mut bytes = std::fs::read(&bin).unwrap();
        let bad = (bytes.len() / 4) & !1; // a token in the middle of the file
        bytes[bad..bad + 2].copy_from_slice(&150u16.to_le_bytes());
        std::fs::write(&bin, &bytes).unwrap();
        let tokens = TokenFile::open_checking(&bin, Dtype::U16, 100, None, 0).unwrap();
        let shard = Sharding { seed: 1, shuffle: false, rank: 0, world: 1, drop_last: true };
        let plan = StreamPlan::new(tokens.len() as u64, 32, 4, shard).unwrap();
        let engine = Arc::new(Engine { tokens, mask: None, plan: Box::new(plan), pad_id: 0, n_docs: 10_000, pool: Arc::default() });
        let first_bad = (0..).find(|&pos| engine.batch(pos).is_err()).unwrap();
        assert!(first_bad > 0);
        let mut p = Prefetcher::spawn(Arc::clone(&engine), 0, None, 4, 2);
        for pos in 0..first_bad {
            assert_eq!(p.next_batch().unwrap().unwrap(), engine.batch(pos).unwrap(), "{pos}");
        }
        let e = p.next_batch().unwrap().unwrap_err();
        assert!(e.0.contains("token id 150") && e.0.contains("vocab_size 100"), "{e}");
        assert!(p.next_batch().is_none());
    }

    #[test]
    fn offsets_name_the_file_position_of_every_input_token() {
        let (_dir, bin, idx) = write_split("offsets", 300);
        let tokens = std::fs::read(&bin).unwrap();
        let token = |i: usize| i32::from(u16::from_le_bytes([tokens[2 * i], tokens[2 * i + 1]]));
        for sampler in ["stream", "packed", "bucketed"] {
            let engine = Engine::open(&bin, &idx, &options(sampler)).unwrap();
            for pos in [0, 1, engine.batches_per_epoch() + 2] {
                let (b, (cols, offs)) = (engine.batch(pos).unwrap(), engine.offsets(pos));
                assert_eq!(cols, b.cols);
                assert_eq!(offs.len(), b.rows * b.cols, "{sampler}");
                let ids = &b.data[..b.rows * b.cols];
                let real = offs.iter().filter(|&&o| o >= 0).count();
                assert_eq!(real, b.rows * b.cols - b.n_pad, "{sampler} at {pos}: padding");
                for (&o, &id) in offs.iter().zip(ids) {
                    if o >= 0 {
                        assert_eq!(token(o as usize), id, "{sampler} at {pos}");
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_mismatches_with_meta_and_bad_options() {
        let (_dir, bin, idx) = write_split("meta", 300);
        let mut o = options("packed");
        o.expected_docs = Some(301);
        assert!(Engine::open(&bin, &idx, &o).err().unwrap().0.contains("meta.json"));
        let mut o = options("stream");
        o.vocab_size = 50; // ids go up to 99
        assert!(Engine::open(&bin, &idx, &o).err().unwrap().0.contains("vocab_size 50"));
        assert!("random".parse::<Sampler>().err().unwrap().0.contains("expected stream, packed or bucketed"));
        let mut o = options("stream");
        o.pad_id = 100;
        assert!(Engine::open(&bin, &idx, &o).is_err());
    }
}
