//! Samplers: which tokens go into which row of which batch, for a given (epoch, batch, rank).
//!
//! A plan only describes batches as lists of [`Segment`]s; `batch.rs` turns them into arrays.
//! Every plan has the same number of batches per epoch on every rank, and the batches of all
//! ranks together cover each unit (window / packed row / document piece) at most once per epoch:
//! exactly once, except that `drop_last` drops fewer than one global batch's worth, a different
//! random subset every epoch.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::error::{DataError, Result};
use crate::perm::{mix, shuffle, Permutation};

/// A contiguous run of tokens `start..start + len` placed in a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub start: u64,
    pub len: u32,
    /// The run ends its document, so its last position has no label. Otherwise the label of the
    /// last position is the token right after the run (a stream window, or a long document
    /// split into pieces), which callers guarantee exists.
    pub ends_doc: bool,
}

/// One batch for one rank: rows of `cols` tokens, each a list of segments (none: all padding).
///
/// Stored flat (one allocation, not one per row): a bucketed batch of short documents has
/// thousands of rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    pub cols: usize,
    n_rows: usize,
    segments: Segments,
    /// Row r holds `segments[row_ends[r - 1]..row_ends[r]]` (from 0 for the first row); empty
    /// when `one_per_row`.
    row_ends: Vec<usize>,
    /// From the stream sampler: when every row is a full window, the batch stores only
    /// input_ids and labels (see `Batch::windows`).
    pub windows: bool,
    /// From the bucketed sampler: row r holds exactly `segments[r]`, and the rows after the
    /// last segment are empty (an epoch's padded tail). Assembly then skips the per-row work
    /// of general rows, which matters for batches of thousands of one-sentence rows.
    pub one_per_row: bool,
}

/// The segments of a batch: its own list, or a run of a shared list (a bucketed batch is a
/// run of its bucket's shuffled documents: referenced, not copied).
#[derive(Debug, Clone)]
enum Segments {
    Owned(Vec<Segment>),
    Shared { lists: EpochDocs, list: usize, run: std::ops::Range<usize> },
}

impl std::ops::Deref for Segments {
    type Target = [Segment];

    fn deref(&self) -> &[Segment] {
        match self {
            Self::Owned(v) => v,
            Self::Shared { lists, list, run } => &lists[*list].get().expect("filled before it is shared")[run.clone()],
        }
    }
}

impl PartialEq for Segments {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for Segments {}

impl BatchSpec {
    pub fn new(cols: usize, rows: usize) -> Self {
        Self {
            cols,
            n_rows: 0,
            segments: Segments::Owned(Vec::with_capacity(rows)),
            row_ends: Vec::with_capacity(rows),
            windows: false,
            one_per_row: false,
        }
    }

    /// `rows` rows of `cols` slots holding one of `segments` each, in order, then empty rows.
    pub fn one_per_row(cols: usize, rows: usize, segments: Vec<Segment>) -> Self {
        Self::one_per_row_of(cols, rows, Segments::Owned(segments))
    }

    fn one_per_row_of(cols: usize, rows: usize, segments: Segments) -> Self {
        debug_assert!(segments.len() <= rows && segments.iter().all(|s| s.len as usize <= cols));
        Self { cols, n_rows: rows, segments, row_ends: Vec::new(), windows: false, one_per_row: true }
    }

    pub fn push_row(&mut self, segments: &[Segment]) {
        debug_assert!(segments.iter().map(|s| s.len as usize).sum::<usize>() <= self.cols);
        let Segments::Owned(own) = &mut self.segments else { unreachable!("rows are pushed only to new specs") };
        own.extend_from_slice(segments);
        self.row_ends.push(own.len());
        self.n_rows += 1;
    }

    pub fn n_rows(&self) -> usize {
        self.n_rows
    }

    pub fn rows(&self) -> Box<dyn Iterator<Item = &[Segment]> + '_> {
        if self.one_per_row {
            let empty = self.n_rows - self.segments.len();
            return Box::new(self.segments.chunks(1).chain(std::iter::repeat_n(&[][..], empty)));
        }
        let starts = std::iter::once(0).chain(self.row_ends.iter().copied());
        Box::new(starts.zip(&self.row_ends).map(|(a, &z)| &self.segments[a..z]))
    }

    /// Where each row's segments end in `segments()` (not for `one_per_row` specs).
    pub fn row_ends(&self) -> &[usize] {
        debug_assert!(!self.one_per_row);
        &self.row_ends
    }

    /// All segments, row after row.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }
}

/// How the units of an epoch are shuffled and split between ranks.
#[derive(Debug, Clone, Copy)]
pub struct Sharding {
    pub seed: u64,
    pub shuffle: bool,
    pub rank: u64,
    pub world: u64,
    /// Drop the incomplete tail (training); otherwise pad it with empty rows (evaluation).
    pub drop_last: bool,
}

impl Sharding {
    pub fn validate(&self) -> Result<()> {
        if self.world == 0 || self.rank >= self.world {
            return Err(DataError::new(format!("rank {} is not in 0..world_size ({})", self.rank, self.world)));
        }
        Ok(())
    }

    /// Batches per rank when `units` are split into batches of `per_batch`.
    fn batches_per_rank(&self, units: u64, per_batch: u64) -> u64 {
        let global = self.split(units, per_batch);
        self.split(global, self.world)
    }

    fn split(&self, n: u64, per: u64) -> u64 {
        if self.drop_last {
            n / per
        } else {
            n.div_ceil(per)
        }
    }

    fn perm(&self, n: u64, epoch: u64, stream: u64) -> Permutation {
        Permutation::new(n, mix(&[self.seed, epoch, stream]), self.shuffle)
    }
}

pub trait Plan: Send + Sync {
    fn batches_per_epoch(&self) -> u64;
    /// Batch `index` (< batches_per_epoch) of `epoch` for this plan's rank.
    fn batch(&self, epoch: u64, index: u64) -> BatchSpec;
    /// Padding slots / all slots over one epoch's units (before drop_last / tail padding).
    fn padding_frac(&self) -> f64;
    /// Windows, packed rows or document pieces in one epoch.
    fn units(&self) -> u64;
}

/// Batches of `batch_size` units drawn through one shuffled order; shared by stream and packed.
#[derive(Debug, Clone)]
struct UnitBatches {
    units: u64,
    batch_size: u64,
    shard: Sharding,
}

impl UnitBatches {
    fn batches_per_epoch(&self) -> u64 {
        self.shard.batches_per_rank(self.units, self.batch_size)
    }

    /// The units of a batch (None: past the end, a padding row).
    fn units_of(&self, epoch: u64, index: u64) -> impl Iterator<Item = Option<u64>> + '_ {
        let perm = self.shard.perm(self.units, epoch, 1);
        // Round-robin over ranks: global batch g goes to rank g % world.
        let global = index * self.shard.world + self.shard.rank;
        (0..self.batch_size).map(move |i| {
            let j = global * self.batch_size + i;
            (j < self.units).then(|| perm.apply(j))
        })
    }
}

fn too_small(what: &str, units: u64, need: u64) -> DataError {
    DataError::new(format!(
        "the data has {units} {what}, fewer than one batch on every rank needs ({need}): use a smaller batch_size/ctx or more data"
    ))
}

// ------------------------------------------------------------------------------------- stream

/// Windows of ctx + 1 tokens at stride ctx over the concatenated stream: the input windows
/// `[u*ctx, (u+1)*ctx)` are disjoint and so are the label windows, so every token but the
/// first is a target exactly once per epoch. Without drop_last the shorter window at the end
/// is kept (padded), so even a split shorter than ctx yields a batch.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    ctx: u32,
    n_tokens: u64,
    inner: UnitBatches,
}

impl StreamPlan {
    pub fn new(n_tokens: u64, ctx: u32, batch_size: u64, shard: Sharding) -> Result<Self> {
        check_shape(ctx, batch_size)?;
        shard.validate()?;
        let targets = n_tokens.saturating_sub(1);
        let units = if shard.drop_last { targets / u64::from(ctx) } else { targets.div_ceil(u64::from(ctx)) };
        let plan = Self { ctx, n_tokens, inner: UnitBatches { units, batch_size, shard } };
        if plan.batches_per_epoch() == 0 {
            return Err(too_small(&format!("windows of ctx+1 = {} tokens", ctx + 1), units, batch_size * shard.world));
        }
        Ok(plan)
    }
}

impl Plan for StreamPlan {
    fn batches_per_epoch(&self) -> u64 {
        self.inner.batches_per_epoch()
    }

    fn batch(&self, epoch: u64, index: u64) -> BatchSpec {
        let ctx = u64::from(self.ctx);
        let mut spec = BatchSpec::new(self.ctx as usize, self.inner.batch_size as usize);
        spec.windows = true;
        for u in self.inner.units_of(epoch, index) {
            match u {
                Some(u) => {
                    let start = u * ctx;
                    // Only the tail window is shorter; it still leaves its next token as a label.
                    let len = ctx.min(self.n_tokens - 1 - start) as u32;
                    spec.push_row(&[Segment { start, len, ends_doc: false }]);
                }
                None => spec.push_row(&[]),
            }
        }
        spec
    }

    fn padding_frac(&self) -> f64 {
        0.0
    }

    fn units(&self) -> u64 {
        self.inner.units
    }
}

fn check_shape(ctx: u32, batch_size: u64) -> Result<()> {
    if ctx == 0 || batch_size == 0 {
        return Err(DataError::new(format!("ctx ({ctx}) and batch_size ({batch_size}) must be positive")));
    }
    Ok(())
}

/// Documents as pieces of at most `max_len` tokens (long documents split; only the last piece
/// ends the document).
pub fn pieces(offsets: &[u64], max_len: u32) -> Vec<Segment> {
    let max_len = u64::from(max_len);
    let mut out = Vec::with_capacity(offsets.len());
    for w in offsets.windows(2) {
        let (mut start, end) = (w[0], w[1]);
        while start < end {
            let len = (end - start).min(max_len);
            out.push(Segment { start, len: len as u32, ends_doc: start + len == end });
            start += len;
        }
    }
    out
}

// ------------------------------------------------------------------------------------- packed

/// Whole documents packed into rows of exactly ctx tokens by best-fit decreasing; documents
/// longer than ctx are split into ctx-sized pieces first. The packing is fixed; the row order
/// is shuffled every epoch.
#[derive(Debug, Clone)]
pub struct PackedPlan {
    ctx: u32,
    segments: Vec<Segment>,
    /// Row r holds `segments[row_starts[r]..row_starts[r + 1]]`.
    row_starts: Vec<usize>,
    inner: UnitBatches,
}

impl PackedPlan {
    pub fn new(offsets: &[u64], ctx: u32, batch_size: u64, shard: Sharding) -> Result<Self> {
        check_shape(ctx, batch_size)?;
        shard.validate()?;
        let pieces = pieces(offsets, ctx);
        let groups = neighbour_groups(&pieces, ctx / GROUP_FRACTION);
        let lens: Vec<u32> = groups.iter().map(|g| pieces[g.clone()].iter().map(|p| p.len).sum()).collect();
        let bins = best_fit_decreasing_lens(&lens, ctx);
        let mut segments = Vec::with_capacity(pieces.len());
        let mut row_starts = Vec::with_capacity(bins.len() + 1);
        row_starts.push(0);
        for mut bin in bins {
            // In file order: neighbouring documents are then copied as one run.
            bin.sort_unstable_by_key(|&g| groups[g].start);
            segments.extend(bin.iter().flat_map(|&g| pieces[groups[g].clone()].iter().copied()));
            row_starts.push(segments.len());
        }
        let units = (row_starts.len() - 1) as u64;
        let plan = Self { ctx, segments, row_starts, inner: UnitBatches { units, batch_size, shard } };
        if plan.batches_per_epoch() == 0 {
            return Err(too_small(&format!("packed rows of ctx = {ctx} tokens"), units, batch_size * shard.world));
        }
        Ok(plan)
    }

    fn row(&self, r: u64) -> &[Segment] {
        let r = r as usize;
        &self.segments[self.row_starts[r]..self.row_starts[r + 1]]
    }
}

impl Plan for PackedPlan {
    fn batches_per_epoch(&self) -> u64 {
        self.inner.batches_per_epoch()
    }

    fn batch(&self, epoch: u64, index: u64) -> BatchSpec {
        let mut spec = BatchSpec::new(self.ctx as usize, self.inner.batch_size as usize);
        for u in self.inner.units_of(epoch, index) {
            spec.push_row(u.map(|u| self.row(u)).unwrap_or_default());
        }
        spec
    }

    fn padding_frac(&self) -> f64 {
        let used: u64 = self.segments.iter().map(|s| u64::from(s.len)).sum();
        let slots = self.inner.units * u64::from(self.ctx);
        if slots == 0 {
            0.0
        } else {
            (slots - used) as f64 / slots as f64
        }
    }

    fn units(&self) -> u64 {
        self.inner.units
    }
}

/// Packed rows are built from groups of neighbouring documents of at most ctx / this many
/// tokens (see `neighbour_groups`).
const GROUP_FRACTION: u32 = 4;

/// Splits `pieces` (in file order, each following the one before) into runs of neighbours
/// whose lengths sum to at most a target drawn between 1 and `max` for each group (a piece
/// longer than its target is a group of its own).
///
/// Best-fit decreasing then packs groups instead of single documents: a row holds a few runs of
/// neighbouring documents, which batch assembly copies in one go each (short documents one by
/// one cost more than their tokens), and the spread of group sizes leaves BFD enough small
/// groups to fill the rows as tightly as single documents would. Documents stay whole.
pub fn neighbour_groups(pieces: &[Segment], max: u32) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::with_capacity(pieces.len() / 2 + 1);
    let (mut start, mut len) = (0usize, 0u32);
    let target = |g: usize| 1 + (crate::perm::splitmix64(g as u64) % u64::from(max.max(1))) as u32;
    let mut want = target(0);
    for (i, p) in pieces.iter().enumerate() {
        if i > start && len + p.len > want {
            groups.push(start..i);
            (start, len, want) = (i, 0, target(groups.len()));
        }
        len += p.len;
    }
    if start < pieces.len() {
        groups.push(start..pieces.len());
    }
    groups
}

/// Best-fit decreasing over item lengths (each `<= cap`): the bins as lists of item indices.
pub fn best_fit_decreasing_lens(lens: &[u32], cap: u32) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(lens[i]), i));
    let mut bins: Vec<Vec<usize>> = Vec::new();
    // Remaining capacity → bins with exactly that much room: the best fit for an item of
    // length l is the first key >= l.
    let mut free: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for i in order {
        let len = lens[i];
        debug_assert!(len <= cap);
        let fit = free.range(len..).next().map(|(&room, _)| room);
        let (bin, room) = match fit {
            Some(room) => {
                let list = free.get_mut(&room).expect("key just found");
                let bin = list.pop().expect("lists in `free` are never empty");
                if list.is_empty() {
                    free.remove(&room);
                }
                (bin, room)
            }
            None => {
                bins.push(Vec::new());
                (bins.len() - 1, cap)
            }
        };
        bins[bin].push(i);
        let left = room - len;
        if left > 0 {
            free.entry(left).or_default().push(bin);
        }
    }
    bins
}

// ----------------------------------------------------------------------------------- bucketed

/// Every bucket's document pieces in one epoch's shuffled order, each list shuffled by the
/// first thread that needs it (outside any lock: threads that need other lists do not wait).
type EpochDocs = Arc<[OnceLock<Vec<Segment>>]>;

/// Documents (split at the longest bucket) grouped by the smallest bucket length that holds
/// them, one document per row padded to the bucket length; each bucket's batches have
/// `token_budget / bucket` rows, so every batch holds about the same number of slots and
/// torch.compile sees only `buckets.len()` shapes.
#[derive(Debug)]
pub struct BucketedPlan {
    buckets: Vec<Bucket>,
    /// Cumulative batch counts per bucket: bucket b owns global batches `cum[b]..cum[b + 1]`.
    cum: Vec<u64>,
    shard: Sharding,
    /// Each bucket's documents in the order of the last epochs asked for. A batch of short
    /// documents has thousands of rows: gathering them through the permutation one by one
    /// costs a cache miss each, referencing a run of a shuffled list does not. Two entries: the
    /// current epoch's and the next one's, prepared while workers are still in the current
    /// one (see `batch`). A batch holds on to its epoch's lists (an `Arc`) even when evicted.
    shuffled: Mutex<Vec<(u64, EpochDocs)>>,
}

/// Entries kept in `BucketedPlan::shuffled`.
const EPOCHS_KEPT: usize = 2;

#[derive(Debug, Clone)]
struct Bucket {
    len: u32,
    rows: u64,
    docs: Vec<Segment>,
}

impl BucketedPlan {
    pub fn new(offsets: &[u64], bucket_lens: &[u32], token_budget: u64, shard: Sharding) -> Result<Self> {
        shard.validate()?;
        let mut lens = bucket_lens.to_vec();
        lens.sort_unstable();
        lens.dedup();
        let (Some(&shortest), Some(&longest)) = (lens.first(), lens.last()) else {
            return Err(DataError::new("bucketed sampler needs at least one bucket length"));
        };
        if shortest == 0 {
            return Err(DataError::new("bucket lengths must be positive"));
        }
        check_shape(longest, token_budget)?;
        let mut buckets: Vec<Bucket> =
            lens.iter().map(|&len| Bucket { len, rows: (token_budget / u64::from(len)).max(1), docs: Vec::new() }).collect();
        for piece in pieces(offsets, longest) {
            let b = lens.partition_point(|&l| l < piece.len);
            buckets[b].docs.push(piece);
        }
        let mut cum = vec![0u64];
        for b in &buckets {
            cum.push(cum.last().copied().unwrap_or(0) + shard.split(b.docs.len() as u64, b.rows));
        }
        let plan = Self { buckets, cum, shard, shuffled: Mutex::new(Vec::new()) };
        if plan.batches_per_epoch() == 0 {
            let docs = plan.units();
            return Err(too_small("document pieces (not enough for a full batch in any bucket on every rank)", docs, shard.world));
        }
        Ok(plan)
    }

    fn global_batches(&self) -> u64 {
        self.cum.last().copied().unwrap_or(0)
    }

    /// Epoch `epoch`'s lists (each shuffled when first asked for, see `list`).
    fn shuffled(&self, epoch: u64) -> EpochDocs {
        // A panic elsewhere cannot leave this cache inconsistent: ignore poisoning.
        let mut cache = self.shuffled.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, lists)) = cache.iter().find(|(e, _)| *e == epoch) {
            return Arc::clone(lists);
        }
        if cache.len() >= EPOCHS_KEPT {
            cache.remove(0);
        }
        let lists: EpochDocs = self.buckets.iter().map(|_| OnceLock::new()).collect();
        cache.push((epoch, Arc::clone(&lists)));
        lists
    }

    /// Bucket `bi`'s documents in epoch `epoch`'s order.
    fn list<'a>(&self, lists: &'a EpochDocs, epoch: u64, bi: usize) -> &'a [Segment] {
        lists[bi].get_or_init(|| {
            let mut docs = self.buckets[bi].docs.clone();
            if self.shard.shuffle {
                shuffle(&mut docs, mix(&[self.shard.seed, epoch, 3 + bi as u64]));
            }
            docs
        })
    }
}

impl Plan for BucketedPlan {
    fn batches_per_epoch(&self) -> u64 {
        self.shard.split(self.global_batches(), self.shard.world)
    }

    fn batch(&self, epoch: u64, index: u64) -> BatchSpec {
        let global = index * self.shard.world + self.shard.rank;
        if global >= self.global_batches() {
            // Only without drop_last: an all-padding batch so every rank steps equally often.
            let b = &self.buckets[0];
            return BatchSpec::one_per_row(b.len as usize, b.rows as usize, Vec::new());
        }
        let j = self.shard.perm(self.global_batches(), epoch, 2).apply(global);
        let bi = self.cum.partition_point(|&c| c <= j) - 1;
        let bucket = &self.buckets[bi];
        let chunk = (j - self.cum[bi]) as usize;
        let shuffled = self.shuffled(epoch);
        // Shuffling a list takes a while (~0.15 ms per 100k documents). The next epoch's are
        // shuffled from the middle of this one on, a bucket per batch, so the workers share
        // the work and none of them waits for a list at the boundary.
        if let Some(next) = index.checked_sub(self.batches_per_epoch() / 2).filter(|&k| k < self.buckets.len() as u64) {
            self.list(&self.shuffled(epoch + 1), epoch + 1, next as usize);
        }
        let docs = self.list(&shuffled, epoch, bi);
        let rows = bucket.rows as usize;
        // The last chunk of a bucket may be short (drop_last = false): empty rows after it.
        let run = (chunk * rows).min(docs.len())..((chunk + 1) * rows).min(docs.len());
        BatchSpec::one_per_row_of(bucket.len as usize, rows, Segments::Shared { lists: Arc::clone(&shuffled), list: bi, run })
    }

    fn padding_frac(&self) -> f64 {
        let (mut used, mut slots) = (0u64, 0u64);
        for b in &self.buckets {
            used += b.docs.iter().map(|d| u64::from(d.len)).sum::<u64>();
            slots += b.docs.len() as u64 * u64::from(b.len);
        }
        if slots == 0 {
            0.0
        } else {
            (slots - used) as f64 / slots as f64
        }
    }

    fn units(&self) -> u64 {
        self.buckets.iter().map(|b| b.docs.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn shard(rank: u64, world: u64, drop_last: bool) -> Sharding {
        Sharding { seed: 7, shuffle: true, rank, world, drop_last }
    }

    /// Offsets of documents with lengths from a simple deterministic generator.
    fn docs(n: usize, max: u64) -> Vec<u64> {
        let mut offs = vec![0u64];
        for i in 0..n {
            let len = 2 + crate::perm::splitmix64(i as u64) % max;
            offs.push(offs.last().unwrap() + len);
        }
        offs
    }

    /// All segments each rank sees in one epoch, and the batch counts per rank.
    fn epoch_segments(make: impl Fn(Sharding) -> Box<dyn Plan>, world: u64, drop_last: bool) -> (Vec<Segment>, Vec<u64>) {
        let mut segs = Vec::new();
        let mut counts = Vec::new();
        for rank in 0..world {
            let plan = make(shard(rank, world, drop_last));
            counts.push(plan.batches_per_epoch());
            for i in 0..plan.batches_per_epoch() {
                let spec = plan.batch(3, i);
                for row in spec.rows() {
                    assert!(row.iter().map(|s| s.len as usize).sum::<usize>() <= spec.cols);
                    segs.extend(row.iter().copied());
                }
            }
        }
        (segs, counts)
    }

    fn assert_disjoint(segs: &[Segment]) {
        let starts: HashSet<u64> = segs.iter().map(|s| s.start).collect();
        assert_eq!(starts.len(), segs.len(), "a segment appears twice");
    }

    #[test]
    fn stream_covers_each_window_once() {
        for drop_last in [true, false] {
            let (segs, counts) = epoch_segments(|s| Box::new(StreamPlan::new(1000, 16, 3, s).unwrap()), 2, drop_last);
            assert!(counts.iter().all(|&c| c == counts[0]));
            assert_disjoint(&segs);
            let covered: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
            if drop_last {
                assert!(999 - covered < 6 * 16 + 16);
            } else {
                assert_eq!(covered, 999, "every token but the first is a target");
            }
        }
    }

    #[test]
    fn packed_rows_are_full_and_cover_all_tokens() {
        let offs = docs(500, 40);
        let (segs, counts) = epoch_segments(|s| Box::new(PackedPlan::new(&offs, 64, 4, s).unwrap()), 3, false);
        assert!(counts.iter().all(|&c| c == counts[0]));
        assert_disjoint(&segs);
        let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
        assert_eq!(total, *offs.last().unwrap());
        let plan = PackedPlan::new(&offs, 64, 4, shard(0, 1, true)).unwrap();
        assert!(plan.padding_frac() < 0.02, "{}", plan.padding_frac());
    }

    #[test]
    fn packed_splits_long_documents() {
        let offs = vec![0, 150, 160];
        let plan = PackedPlan::new(&offs, 64, 1, shard(0, 1, false)).unwrap();
        let all: Vec<Segment> = plan.segments.clone();
        assert_eq!(all.iter().filter(|s| s.ends_doc).count(), 2);
        assert!(all.iter().all(|s| s.len <= 64));
    }

    #[test]
    fn bucketed_shapes_and_coverage() {
        let offs = docs(700, 300);
        for drop_last in [true, false] {
            let (segs, counts) =
                epoch_segments(|s| Box::new(BucketedPlan::new(&offs, &[32, 64, 128, 256], 1024, s).unwrap()), 2, drop_last);
            assert!(counts.iter().all(|&c| c == counts[0]));
            assert_disjoint(&segs);
            if !drop_last {
                let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
                assert_eq!(total, *offs.last().unwrap());
            }
        }
        let plan = BucketedPlan::new(&offs, &[32, 64, 128, 256], 1024, shard(0, 1, true)).unwrap();
        for i in 0..plan.batches_per_epoch() {
            let spec = plan.batch(0, i);
            assert_eq!(spec.n_rows() * spec.cols, 1024);
        }
    }

    #[test]
    fn bucketed_batches_do_not_depend_on_the_order_asked() {
        // Epoch lists are cached, prepared ahead and evicted: none of that may change a batch.
        let offs = docs(700, 300);
        let make = || BucketedPlan::new(&offs, &[32, 64, 128, 256], 1024, shard(0, 1, false)).unwrap();
        let (a, b) = (make(), make());
        let n = a.batches_per_epoch();
        let in_order: Vec<BatchSpec> = (0..4).flat_map(|e| (0..n).map(move |i| (e, i))).map(|(e, i)| a.batch(e, i)).collect();
        for (e, i) in (0..4u64).rev().flat_map(|e| (0..n).rev().map(move |i| (e, i))).chain([(0, 0), (3, n - 1), (1, 0)]) {
            assert_eq!(b.batch(e, i), in_order[(e * n + i) as usize], "epoch {e} batch {i}");
        }
    }

    #[test]
    fn deterministic_per_seed_and_epoch() {
        let a = StreamPlan::new(10_000, 8, 4, shard(0, 1, true)).unwrap();
        assert_eq!(a.batch(2, 5), a.batch(2, 5));
        assert_ne!(a.batch(2, 5), a.batch(3, 5));
    }

    #[test]
    fn too_small_is_an_error() {
        assert!(StreamPlan::new(10, 8, 4, shard(0, 1, true)).is_err());
        assert_eq!(StreamPlan::new(3, 8, 4, shard(0, 1, false)).unwrap().batch(0, 0).segments()[0].len, 2);
        assert!(StreamPlan::new(100, 8, 4, shard(2, 2, true)).is_err());
    }

    #[test]
    fn bfd_fills_bins() {
        let lens = [5u32, 3, 2, 5, 4, 1];
        let bins = best_fit_decreasing_lens(&lens, 10);
        assert_eq!(bins.len(), 2);
        assert!(bins.iter().all(|b| b.iter().map(|&i| lens[i]).sum::<u32>() == 10));
    }
}
