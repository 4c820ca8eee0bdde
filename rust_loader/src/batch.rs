//! Batch assembly: turns a [`BatchSpec`] into the arrays of docs/contracts.md ("Batches").
//!
//! A batch is `input_ids` and `labels` ([rows, cols] int32) and `cu_seqlens` (where each
//! document or padding segment ends in the flattened batch). Position ids and the document
//! mask are functions of `cu_seqlens` that the trainer computes on its device
//! (`bulba.data.document_layout`), so they are not assembled here: they would double the bytes
//! written per token, and cost a store per document.
//!
//! Assembly is bound by memory bandwidth and per-document work, so:
//! * both arrays of a batch live in one buffer taken from a [`Pool`] and given back when
//!   Python drops the batch: no allocation, no page faults, and the buffer is usually still in
//!   cache;
//! * a `stream` batch whose rows are all full windows (all but an epoch's padded tail) has the
//!   same `cu_seqlens` as every such batch of that shape ([`window_cu_seqlens`]): not stored;
//! * documents that are neighbours in the file and in a row (packed rows keep their documents
//!   in file order) are converted as one run, not one by one;
//! * a row holding one document (bucketed) is written with fixed-width, branch-free loops
//!   over the whole row instead of a copy plus padding fills;
//! * token ids are checked against the vocabulary per file block, once (`TokenFile::verify`),
//!   not per copied token.
use std::sync::{Mutex, PoisonError};

use crate::error::Result;
use crate::hint::prefetch;
use crate::plan::{BatchSpec, Segment};
use crate::tokens::{MaskFile, TokenFile, Word, Words};

/// Label of positions without a loss (padding, the last token of a document).
pub const IGNORE: i32 = -100;

/// How many segments ahead of the one being copied their source tokens are asked for (see
/// `hint::prefetch`): enough to overlap the cache misses of a batch gathered from all over
/// the file, not so many that they evict each other.
const PREFETCH_AHEAD: usize = 16;

/// Short documents are written in chunks of this many values, the last one running past the
/// document's end (the next document, the row's padding or the next row overwrites that);
/// chunks of a constant width compile to a few vector instructions instead of a `memcpy`
/// call and a remainder loop per document.
const CHUNK: usize = 16;

/// `PREFIX_MASKS[k]`: all ones in the first k lanes of a chunk, zeros after.
static PREFIX_MASKS: [[i32; CHUNK]; CHUNK + 1] = {
    let mut m = [[0; CHUNK]; CHUNK + 1];
    let mut k = 0;
    while k <= CHUNK {
        let mut i = 0;
        while i < k {
            m[k][i] = -1;
            i += 1;
        }
        k += 1;
    }
    m
};

/// Two chunks: the other row width `one_per_row` is compiled for.
const SPAN_2: usize = 2 * CHUNK;

/// Values after each array in a batch's buffer that the last row's chunks may run into.
pub const SLACK: usize = CHUNK;

/// Free buffers kept for reuse; more than the batches in flight are simply freed.
const POOL_MAX: usize = 32;

/// Buffers of finished batches, reused by the next ones.
#[derive(Debug, Default)]
pub struct Pool {
    free: Mutex<Vec<Vec<i32>>>,
}

impl Pool {
    /// A buffer of `len` values (contents unspecified: assembly writes every one).
    pub fn take(&self, len: usize) -> Vec<i32> {
        let v = self.free.lock().unwrap_or_else(PoisonError::into_inner).pop();
        let mut v = v.unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0);
        }
        v
    }

    pub fn give(&self, v: Vec<i32>) {
        let mut free = self.free.lock().unwrap_or_else(PoisonError::into_inner);
        if free.len() < POOL_MAX {
            free.push(v);
        }
    }
}

/// One assembled batch.
#[derive(Debug, Clone)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    /// Row-major `[rows, cols]` input_ids, then labels, `stride()` values apart (each followed
    /// by `SLACK` values of scratch).
    pub data: Vec<i32>,
    /// Every row is one full window (no padding, no document boundary): cu_seqlens is
    /// [`window_cu_seqlens`] and not stored.
    pub windows: bool,
    /// Cumulative segment lengths over the flattened batch; padding is its own segment.
    /// Empty when `windows`.
    pub cu: Vec<i32>,
    pub max_seqlen: usize,
    /// Positions with a label.
    pub n_tokens: usize,
    pub n_pad: usize,
}

impl Batch {
    fn size(&self) -> usize {
        self.rows * self.cols
    }

    /// Distance between the arrays in `data`: `rows * cols` values and `SLACK` more.
    pub fn stride(&self) -> usize {
        self.size() + SLACK
    }

    /// Array `k` of `data` (0 input_ids, 1 labels).
    pub fn array(&self, k: usize) -> &[i32] {
        &self.data[k * self.stride()..k * self.stride() + self.size()]
    }

    pub fn input_ids(&self) -> &[i32] {
        self.array(0)
    }

    pub fn labels(&self) -> &[i32] {
        self.array(1)
    }

    pub fn cu_seqlens(&self) -> Vec<i32> {
        if self.windows {
            window_cu_seqlens(self.rows, self.cols)
        } else {
            self.cu.clone()
        }
    }
}

/// Equal contents (what Python sees), whatever the slack between the arrays holds.
impl PartialEq for Batch {
    fn eq(&self, other: &Self) -> bool {
        (self.rows, self.cols, self.max_seqlen, self.n_tokens, self.n_pad) == (other.rows, other.cols, other.max_seqlen, other.n_tokens, other.n_pad)
            && self.input_ids() == other.input_ids()
            && self.labels() == other.labels()
            && self.cu_seqlens() == other.cu_seqlens()
    }
}

impl Eq for Batch {}

/// cu_seqlens of a batch of `rows` full windows of `cols` tokens: `0, cols, 2 * cols, …`.
pub fn window_cu_seqlens(rows: usize, cols: usize) -> Vec<i32> {
    (0..=rows).map(|r| (r * cols) as i32).collect()
}

/// Assembles `spec`, filling padding with `pad_id`.
pub fn assemble(spec: &BatchSpec, tokens: &TokenFile, pad_id: i32, pool: &Pool) -> Result<Batch> {
    // The same code compiled for AVX2 and AVX-512 as well: two and four times the vector
    // width for the conversions and chunked stores, where the CPU has them (the wheel itself
    // targets baseline x86-64).
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: the CPU supports these, checked just above.
        return unsafe { assemble_avx512(spec, tokens, pad_id, pool) };
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { assemble_avx2(spec, tokens, pad_id, pool) };
    }
    assemble_any(spec, tokens, pad_id, pool)
}

/// Drops the labels of the targets `mask` excludes (chat data: all but the assistant turns).
///
/// The label at a row position is the token after it, so position k of a segment starting at
/// file token s keeps its label only when token s + k + 1 is trained on. A second pass over an
/// assembled batch, so the assembly paths of every sampler stay as they are; it runs only for
/// datasets with a mask.
pub fn apply_mask(spec: &BatchSpec, mask: &MaskFile, b: &mut Batch) {
    let (rows, cols, stride) = (b.rows, b.cols, b.stride());
    let labels = &mut b.data[stride..stride + rows * cols];
    let mut dropped = 0;
    for (r, row) in spec.rows().enumerate() {
        let mut at = r * cols;
        for seg in row {
            let start = seg.start as usize;
            for (k, label) in labels[at..at + seg.len as usize].iter_mut().enumerate() {
                if *label != IGNORE && !mask.trained(start + k + 1) {
                    *label = IGNORE;
                    dropped += 1;
                }
            }
            at += seg.len as usize;
        }
    }
    b.n_tokens -= dropped;
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn assemble_avx2(spec: &BatchSpec, tokens: &TokenFile, pad_id: i32, pool: &Pool) -> Result<Batch> {
    assemble_any(spec, tokens, pad_id, pool)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2")]
unsafe fn assemble_avx512(spec: &BatchSpec, tokens: &TokenFile, pad_id: i32, pool: &Pool) -> Result<Batch> {
    assemble_any(spec, tokens, pad_id, pool)
}

#[inline(always)]
fn assemble_any(spec: &BatchSpec, tokens: &TokenFile, pad_id: i32, pool: &Pool) -> Result<Batch> {
    match tokens.words() {
        Words::U16(w) => Assembler { tokens, words: w, pad_id }.run(spec, pool),
        Words::U32(w) => Assembler { tokens, words: w, pad_id }.run(spec, pool),
    }
}

struct Assembler<'a, W> {
    tokens: &'a TokenFile,
    words: &'a [W],
    pad_id: i32,
}

/// A row of one document of `len` tokens, `labeled` of them with a label, from `src` (the
/// document and more: `ids.len() + 1` tokens): `ids` and `labels` (a multiple of CHUNK long)
/// written in fixed-width chunks, positions past the document getting padding and no label.
#[inline(always)]
fn masked_row<W: Word>(src: &[W], len: usize, labeled: usize, pad_id: i32, ids: &mut [i32], labels: &mut [i32]) {
    for (c, (ids, labels)) in ids.chunks_exact_mut(CHUNK).zip(labels.chunks_exact_mut(CHUNK)).enumerate() {
        let o = c * CHUNK;
        let window: &[W; CHUNK + 1] = src[o..o + CHUNK + 1].try_into().expect("chunk");
        let (ids, labels) = (ids.try_into().expect("chunk"), labels.try_into().expect("chunk"));
        masked_chunk(window, len.saturating_sub(o).min(CHUNK), labeled.saturating_sub(o).min(CHUNK), pad_id, ids, labels);
    }
}

/// One chunk of a row: `ids[i]` is `window[i]` for `i < real` and padding after it,
/// `labels[i]` is `window[i + 1]` for `i < labeled` and IGNORE after it (`real`, `labeled`
/// <= CHUNK).
///
/// Fixed-size arguments that cannot overlap (distinct `&mut`s), and a mask table instead of
/// branches or lane arithmetic: the compiler turns this into a few vector instructions.
#[inline(always)]
fn masked_chunk<W: Word>(window: &[W; CHUNK + 1], real: usize, labeled: usize, pad_id: i32, ids: &mut [i32; CHUNK], labels: &mut [i32; CHUNK]) {
    let (real, labeled) = (&PREFIX_MASKS[real], &PREFIX_MASKS[labeled]);
    for i in 0..CHUNK {
        ids[i] = (window[i].id() as i32 & real[i]) | (pad_id & !real[i]);
        labels[i] = (window[i + 1].id() as i32 & labeled[i]) | (IGNORE & !labeled[i]);
    }
}

/// Converts `src` into `out` (same length). Ids were checked against the vocabulary when
/// read (`TokenFile::range`).
#[inline(always)]
fn convert<W: Word>(src: &[W], out: &mut [i32]) {
    for (o, &t) in out.iter_mut().zip(src) {
        *o = t.id() as i32;
    }
}

impl<W: Word> Assembler<'_, W> {
    #[inline(always)]
    fn run(&self, spec: &BatchSpec, pool: &Pool) -> Result<Batch> {
        let (rows, cols) = (spec.n_rows(), spec.cols);
        let n = rows * cols;
        let windows = spec.windows
            && n > 0
            && spec.segments().len() == rows
            && spec.rows().all(|r| r.len() == 1 && r[0].len as usize == cols && !r[0].ends_doc);
        let mut data = pool.take(2 * (n + SLACK));
        let mut b = Batch { rows, cols, data: Vec::new(), windows, cu: Vec::new(), max_seqlen: 0, n_tokens: 0, n_pad: 0 };
        let result = if windows {
            self.windows(spec, &mut data, &mut b)
        } else if spec.one_per_row {
            // The row width of the common short buckets as a constant: the chunk loop unrolled.
            match spec.cols.next_multiple_of(CHUNK) {
                CHUNK => self.one_per_row::<CHUNK>(spec, &mut data, &mut b),
                SPAN_2 => self.one_per_row::<SPAN_2>(spec, &mut data, &mut b),
                _ => self.one_per_row::<0>(spec, &mut data, &mut b),
            }
        } else {
            self.general(spec, &mut data, &mut b)
        };
        if let Err(e) = result {
            pool.give(data);
            return Err(e);
        }
        b.data = data;
        Ok(b)
    }

    /// Prefetches the first token of each segment: a batch gathers documents from all over
    /// the file, and asking for the next few in one go overlaps their cache misses instead of
    /// taking them one after another while copying.
    #[inline(always)]
    fn prefetch_starts(&self, segs: &[Segment]) {
        for s in segs {
            prefetch(self.words, s.start as usize);
        }
    }

    /// Full windows: each row's tokens and the one after them, converted once.
    #[inline(always)]
    fn windows(&self, spec: &BatchSpec, data: &mut [i32], b: &mut Batch) -> Result<()> {
        let (n, cols) = (b.rows * b.cols, b.cols);
        let (ids, labels) = data.split_at_mut(n + SLACK);
        let segs = spec.segments();
        for (r, seg) in segs.iter().enumerate() {
            if r % PREFETCH_AHEAD == 0 {
                self.prefetch_starts(&segs[r..segs.len().min(r + PREFETCH_AHEAD)]);
            }
            let start = seg.start as usize;
            let src = self.tokens.range(self.words, start, cols + 1)?;
            let (ids, labels) = (&mut ids[r * cols..(r + 1) * cols], &mut labels[r * cols..(r + 1) * cols]);
            convert(&src[..cols], ids);
            labels[..cols - 1].copy_from_slice(&ids[1..]);
            labels[cols - 1] = src[cols].id() as i32;
        }
        b.max_seqlen = cols;
        b.n_tokens = n;
        Ok(())
    }

    #[inline(always)]
    fn general(&self, spec: &BatchSpec, data: &mut [i32], b: &mut Batch) -> Result<()> {
        let (n, cols) = (b.rows * b.cols, b.cols);
        let (ids, labels) = data.split_at_mut(n + SLACK);
        let mut out = Out { ids, labels };
        let mut cu = Vec::with_capacity(spec.segments().len() + b.rows + 1);
        cu.push(0);
        let all = spec.segments();
        let (mut seen, mut prefetched) = (0usize, 0usize);
        // Rows in order: a row's chunks may run into the next row, which overwrites them.
        let mut first = 0;
        for (r, &last) in spec.row_ends().iter().enumerate() {
            let segs = &all[first..last];
            first = last;
            let row = r * cols..(r + 1) * cols;
            if seen >= prefetched {
                prefetched = all.len().min(seen + PREFETCH_AHEAD);
                self.prefetch_starts(&all[seen..prefetched]);
            }
            seen += segs.len();
            if let [seg] = segs {
                // Whole chunks over the row, and the label after them, within the file.
                if (seg.start as usize) + cols.next_multiple_of(CHUNK) < self.words.len() {
                    self.one_document(*seg, row.start, cols, &mut out, b, &mut cu)?;
                    continue;
                }
            }
            let end = self.runs(segs, row.start, &mut out, b, &mut cu)?;
            let pad = row.end - end;
            if pad > 0 {
                out.ids[end..row.end].fill(self.pad_id);
                out.labels[end..row.end].fill(IGNORE);
                cu.push(row.end as i32);
                b.max_seqlen = b.max_seqlen.max(pad);
                b.n_pad += pad;
            }
        }
        b.cu = cu;
        Ok(())
    }

    /// A row of one document (`seg.len <= cols`) at `at`, the file holding whole chunks over
    /// the row from its start.
    #[inline(always)]
    fn one_document(&self, seg: Segment, at: usize, cols: usize, out: &mut Out<'_>, b: &mut Batch, cu: &mut Vec<i32>) -> Result<()> {
        let len = seg.len as usize;
        self.chunks(seg, at, cols.next_multiple_of(CHUNK), out)?;
        cu.push((at + len) as i32);
        if len < cols {
            cu.push((at + cols) as i32);
        }
        b.n_tokens += len - usize::from(seg.ends_doc);
        b.n_pad += cols - len;
        b.max_seqlen = b.max_seqlen.max(len).max(cols - len);
        Ok(())
    }

    /// Rows of one document piece each, then empty rows (see `BatchSpec::one_per_row`): a
    /// bucketed batch of short documents has thousands of rows, so the loop per row is kept
    /// to the copy and a few branch-free updates (the vocabulary check comes before it).
    /// `SPAN`: the rows' chunked width when known at compile time, else 0.
    #[inline(always)]
    fn one_per_row<const SPAN: usize>(&self, spec: &BatchSpec, data: &mut [i32], b: &mut Batch) -> Result<()> {
        let (rows, cols) = (b.rows, b.cols);
        let n = rows * cols;
        let segs = spec.segments();
        let span = if SPAN > 0 { SPAN } else { cols.next_multiple_of(CHUNK) };
        // Ids against the vocabulary, unless the whole file was checked already.
        if !self.tokens.all_checked() {
            for s in segs {
                let start = s.start as usize;
                self.tokens.verify(start, (start + s.len as usize + 1).min(self.words.len()))?;
            }
        }
        let (ids, labels) = data.split_at_mut(n + SLACK);
        let mut out = Out { ids, labels };
        // cu_seqlens: each row's document, then its padding (if any) as a segment of its own.
        // Both entries are written for every row and the second kept only with padding: no
        // branch (rows with and without padding alternate at random), one spare entry.
        let mut cu = vec![0i32; 2 * rows + 2];
        let mut k = 1;
        let (mut n_tokens, mut max_seqlen) = (0usize, 0usize);
        for (r, seg) in segs.iter().enumerate() {
            // Start the cache misses of a row a few ahead now, so they overlap this row's work.
            if let Some(ahead) = segs.get(r + PREFETCH_AHEAD) {
                prefetch(self.words, ahead.start as usize);
                prefetch(self.words, ahead.start as usize + span);
            }
            let (at, start, len) = (r * cols, seg.start as usize, seg.len as usize);
            let labeled = len - usize::from(seg.ends_doc);
            match self.words.get(start..start + span + 1) {
                Some(src) => {
                    self.tokens.note_read();
                    let (ids, labels) = (&mut out.ids[at..at + span], &mut out.labels[at..at + span]);
                    masked_row(src, len, labeled, self.pad_id, ids, labels);
                }
                None => self.exact_row(*seg, at, cols, &mut out)?,
            }
            cu[k] = (at + len) as i32;
            cu[k + 1] = (at + cols) as i32;
            k += 1 + usize::from(len < cols);
            n_tokens += labeled;
            max_seqlen = max_seqlen.max(len).max(cols - len);
        }
        // Empty rows.
        let filled = segs.len() * cols;
        out.ids[filled..n].fill(self.pad_id);
        out.labels[filled..n].fill(IGNORE);
        for at in (filled..n).step_by(cols) {
            cu[k] = (at + cols) as i32;
            k += 1;
            max_seqlen = max_seqlen.max(cols);
        }
        cu.truncate(k);
        let used: usize = segs.iter().map(|s| s.len as usize).sum();
        b.cu = cu;
        (b.n_tokens, b.n_pad, b.max_seqlen) = (n_tokens, n - used, max_seqlen);
        Ok(())
    }

    /// The row `seg` at `at`, then padding to `cols`, for a document whose row's whole chunks
    /// would run past the end of the file (the fixed-width path's limit).
    #[cold]
    fn exact_row(&self, seg: Segment, at: usize, cols: usize, out: &mut Out<'_>) -> Result<()> {
        let (start, len) = (seg.start as usize, seg.len as usize);
        let next = usize::from(!seg.ends_doc);
        let src = self.tokens.range(self.words, start, len + next)?;
        self.copy_run(start, len, at, out);
        out.labels[at + len - 1] = if next == 1 { src[len].id() as i32 } else { IGNORE };
        out.ids[at + len..at + cols].fill(self.pad_id);
        out.labels[at + len..at + cols].fill(IGNORE);
        Ok(())
    }

    /// The row holding `seg` (`seg.len <= span`) at `at`, the file holding `span + 1` tokens
    /// from its start: both arrays written over `span` values (see `masked_row`).
    #[inline(always)]
    fn chunks(&self, seg: Segment, at: usize, span: usize, out: &mut Out<'_>) -> Result<()> {
        let len = seg.len as usize;
        let src = self.tokens.range(self.words, seg.start as usize, span + 1)?;
        let labeled = len - usize::from(seg.ends_doc);
        masked_row(src, len, labeled, self.pad_id, &mut out.ids[at..at + span], &mut out.labels[at..at + span]);
        Ok(())
    }

    /// Writes `segs` from `at` on, converting neighbours in the file as one run; returns
    /// where the row's content ends.
    #[inline(always)]
    fn runs(&self, segs: &[Segment], at: usize, out: &mut Out<'_>, b: &mut Batch, cu: &mut Vec<i32>) -> Result<usize> {
        let mut o = at;
        let mut i = 0usize;
        while i < segs.len() {
            let first = segs[i];
            let mut end = first.start + u64::from(first.len);
            let mut j = i + 1;
            while j < segs.len() && segs[j].start == end {
                end += u64::from(segs[j].len);
                j += 1;
            }
            let start = first.start as usize;
            let run = end as usize - start;
            // The run's last label is the token after it unless its last segment ends a document.
            let next = usize::from(!segs[j - 1].ends_doc);
            let src = self.tokens.range(self.words, start, run + next)?;
            self.copy_run(start, run, o, out);
            out.labels[o + run - 1] = if next == 1 { src[run].id() as i32 } else { IGNORE };
            for s in &segs[i..j] {
                let len = s.len as usize;
                o += len;
                if s.ends_doc {
                    out.labels[o - 1] = IGNORE;
                }
                b.n_tokens += len - usize::from(s.ends_doc);
                cu.push(o as i32);
                b.max_seqlen = b.max_seqlen.max(len);
            }
            i = j;
        }
        Ok(o)
    }

    /// input_ids of the run `start..start + run` at `o`, and its labels but the last (the
    /// next input); in whole chunks (no scalar remainder loop) unless at the end of the file.
    #[inline(always)]
    fn copy_run(&self, start: usize, run: usize, o: usize, out: &mut Out<'_>) {
        let span = run.next_multiple_of(CHUNK);
        match self.words.get(start..start + span) {
            // The chunk past the run holds tokens of the next document: overwritten later.
            Some(src) => {
                for c in (0..span).step_by(CHUNK) {
                    let t: &[W; CHUNK] = src[c..c + CHUNK].try_into().expect("chunk");
                    let ids: [i32; CHUNK] = std::array::from_fn(|i| t[i].id() as i32);
                    out.ids[o + c..o + c + CHUNK].copy_from_slice(&ids);
                }
                for c in (0..run - 1).step_by(CHUNK) {
                    let (ids, labels) = (&out.ids[o + 1 + c..o + 1 + c + CHUNK], &mut out.labels[o + c..o + c + CHUNK]);
                    labels.copy_from_slice(ids);
                }
            }
            None => {
                convert(&self.words[start..start + run], &mut out.ids[o..o + run]);
                out.labels[o..o + run - 1].copy_from_slice(&out.ids[o + 1..o + run]);
            }
        }
    }
}

/// The two arrays of a batch being assembled, each followed by `SLACK` values.
struct Out<'a> {
    ids: &'a mut [i32],
    labels: &'a mut [i32],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use crate::tokens::Dtype;
    use std::io::Write;

    /// The file lives as long as the returned directory (keep it bound: `let (_dir, tf) = ...`).
    fn token_file(tag: &str, tokens: &[u16]) -> (TestDir, TokenFile) {
        let dir = TestDir::new(&format!("batch-{tag}"));
        let p = dir.join("tokens.bin");
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::File::create(&p).unwrap().write_all(&bytes).unwrap();
        // Checked as batches read it, as a large file is (small ones are checked on open).
        (dir, TokenFile::open_checking(&p, Dtype::U16, 100, None, 0).unwrap())
    }

    fn seg(start: u64, len: u32, ends_doc: bool) -> Segment {
        Segment { start, len, ends_doc }
    }

    #[test]
    fn packs_documents_with_boundaries() {
        // docs: [10 11 12] [20 21] ; a window piece [30 31] followed by 32
        let (_dir, tf) = token_file("pack", &[10, 11, 12, 20, 21, 30, 31, 32]);
        let mut spec = BatchSpec::new(6, 2);
        spec.push_row(&[seg(0, 3, true), seg(3, 2, true)]);
        spec.push_row(&[seg(5, 2, false)]);
        let b = assemble(&spec, &tf, 99, &Pool::default()).unwrap();
        assert!(!b.windows);
        assert_eq!(b.input_ids(), [10, 11, 12, 20, 21, 99, 30, 31, 99, 99, 99, 99]);
        assert_eq!(b.labels(), [11, 12, -100, 21, -100, -100, 31, 32, -100, -100, -100, -100]);
        assert_eq!(b.cu_seqlens(), [0, 3, 5, 6, 8, 12]);
        assert_eq!((b.max_seqlen, b.n_tokens, b.n_pad), (4, 5, 5));
    }

    #[test]
    fn runs_and_single_documents_agree_with_segment_by_segment() {
        // Rows of neighbouring documents (one run), scattered ones, one-document rows near the
        // end of the file (no room for the fixed-width path), and a non-final piece.
        let toks: Vec<u16> = (0..40).map(|i| (i * 7 % 90) as u16 + 1).collect();
        let (_dir, tf) = token_file("runs", &toks);
        let mut spec = BatchSpec::new(8, 5);
        spec.push_row(&[seg(0, 3, true), seg(3, 2, true), seg(5, 3, false)]);
        spec.push_row(&[seg(20, 2, true), seg(10, 4, true)]);
        spec.push_row(&[seg(30, 5, true)]);
        spec.push_row(&[seg(36, 4, true)]);
        spec.push_row(&[seg(12, 8, false)]);
        // A reused buffer full of junk: every value must be written.
        let pool = Pool::default();
        pool.give(vec![12345; 1000]);
        let b = assemble(&spec, &tf, 99, &pool).unwrap();
        // Reference: the contract, position by position.
        let (mut ids, mut labels, mut pad, mut cu) = (vec![], vec![], 0, vec![0]);
        for row in spec.rows() {
            let mut used = 0;
            for s in row {
                for k in 0..s.len as usize {
                    let p = s.start as usize + k;
                    ids.push(i32::from(toks[p]));
                    let last = k + 1 == s.len as usize;
                    labels.push(if last && s.ends_doc { IGNORE } else { i32::from(toks[p + 1]) });
                }
                used += s.len as usize;
                cu.push((ids.len()) as i32);
            }
            if used < 8 {
                for _ in used..8 {
                    ids.push(99);
                    labels.push(IGNORE);
                    pad += 1;
                }
                cu.push(ids.len() as i32);
            }
        }
        assert_eq!(b.input_ids(), ids);
        assert_eq!(b.labels(), labels);
        assert_eq!(b.cu_seqlens(), cu);
        assert_eq!(b.n_tokens, labels.iter().filter(|&&l| l != IGNORE).count());
        assert_eq!(b.n_pad, pad);
        let longest = cu.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap();
        assert_eq!(b.max_seqlen, longest);
    }

    #[test]
    fn one_document_rows_agree_with_general_rows() {
        // Rows of widths that are and are not a multiple of CHUNK; documents and non-final
        // pieces; rows whose chunks would run past the end of the file; empty tail rows.
        let toks: Vec<u16> = (0..100).map(|i| (i * 13 % 90) as u16 + 1).collect();
        let (_dir, tf) = token_file("onerow", &toks);
        for cols in [5, 16, 24, 40] {
            let segs: Vec<Segment> = [(3, 5, true), (50, 1, true), (20, 5, false), (95, 5, true), (90, 4, false), (60, 2, true)]
                .iter()
                .map(|&(start, len, ends)| seg(start, len.min(cols as u32), ends))
                .collect();
            let rows = segs.len() + 2;
            let mut general = BatchSpec::new(cols, rows);
            segs.iter().for_each(|s| general.push_row(std::slice::from_ref(s)));
            (0..2).for_each(|_| general.push_row(&[]));
            let fast = BatchSpec::one_per_row(cols, rows, segs.clone());
            assert!(fast.one_per_row && fast.rows().eq(general.rows()), "{cols}");
            // Reused buffers full of junk: every value must be written.
            let pool = Pool::default();
            pool.give(vec![12345; 4000]);
            let want = assemble(&general, &tf, 99, &pool).unwrap();
            pool.give(vec![-7; 4000]);
            assert_eq!(assemble(&fast, &tf, 99, &pool).unwrap(), want, "cols {cols}");
        }
        // A bad id in a row is an error, as in a general row.
        let mut toks: Vec<u16> = (0..3 << 16).map(|i| (i % 90) as u16 + 1).collect();
        toks[100_000] = 500;
        let (_dir, tf) = token_file("onerow-vocab", &toks);
        let spec = BatchSpec::one_per_row(16, 2, vec![seg(100, 8, true), seg(99_995, 8, true)]);
        assert!(assemble(&spec, &tf, 0, &Pool::default()).unwrap_err().0.contains("500"));
    }

    #[test]
    fn full_windows_store_two_arrays() {
        let (_dir, tf) = token_file("win", &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let mut spec = BatchSpec::new(3, 2);
        spec.windows = true;
        spec.push_row(&[seg(4, 3, false)]);
        spec.push_row(&[seg(0, 3, false)]);
        let pool = Pool::default();
        let b = assemble(&spec, &tf, 0, &pool).unwrap();
        assert!(b.windows);
        assert_eq!(b.data.len(), 2 * (6 + SLACK));
        assert!(b.cu.is_empty(), "a constant, not stored");
        assert_eq!(b.input_ids(), [5, 6, 7, 1, 2, 3]);
        assert_eq!(b.labels(), [6, 7, 8, 2, 3, 4]);
        assert_eq!(b.cu_seqlens(), [0, 3, 6]);
        assert_eq!((b.max_seqlen, b.n_tokens, b.n_pad), (3, 6, 0));
        // A reused buffer (whatever it holds) gives the same batch.
        pool.give(vec![77; 100]);
        assert_eq!(assemble(&spec, &tf, 0, &pool).unwrap(), b);
    }

    #[test]
    fn out_of_range_segment_and_bad_tokens_are_errors() {
        let (_dir, tf) = token_file("oob", &[1, 2, 3]);
        let mut spec = BatchSpec::new(4, 1);
        spec.push_row(&[seg(1, 2, false)]);
        assert!(assemble(&spec, &tf, 0, &Pool::default()).is_err());
        // Deep inside the file (the ends are checked on open).
        let m = 1 << 17;
        let mut toks: Vec<u16> = (0..2 * m).map(|i| (i % 90) as u16 + 1).collect();
        toks[m + 20] = 500;
        let (_dir, tf) = token_file("vocab", &toks);
        let m = m as u64;
        for (cols, segs) in [
            (8, vec![seg(m + 18, 4, true)]),
            (8, vec![seg(m + 10, 4, true), seg(m + 18, 4, true)]),
            (4, vec![seg(m + 17, 3, false)]),
            (4, vec![seg(m + 16, 4, false)]),
        ] {
            let mut spec = BatchSpec::new(cols, 1);
            spec.push_row(&segs);
            let e = assemble(&spec, &tf, 0, &Pool::default()).unwrap_err();
            assert!(e.0.contains("500"), "{e}");
        }
        // Ids are checked in blocks: a batch in a clean block is fine.
        let mut spec = BatchSpec::new(8, 1);
        spec.push_row(&[seg(8, 4, true)]);
        assert!(assemble(&spec, &tf, 0, &Pool::default()).is_ok());
    }
}
