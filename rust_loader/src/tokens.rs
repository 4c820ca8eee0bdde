//! Token files: a memory-mapped `.bin` of little-endian ids and its `.idx` of document offsets.
//!
//! Everything is validated on open so that batch assembly can index without further checks
//! (beyond the vocabulary check it does on every token it copies).
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use memmap2::Mmap;
#[cfg(unix)]
use memmap2::UncheckedAdvice;

use crate::error::{DataError, Result};

/// Width of one token id on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    U16,
    U32,
}

impl Dtype {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "uint16" => Ok(Self::U16),
            "uint32" => Ok(Self::U32),
            other => Err(DataError::new(format!("unsupported token dtype {other:?}; expected uint16 or uint32"))),
        }
    }

    pub fn size(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

/// A token file's contents as words of its dtype.
#[derive(Debug, Clone, Copy)]
pub enum Words<'a> {
    U16(&'a [u16]),
    U32(&'a [u32]),
}

/// One token id on disk (little-endian in the file).
pub trait Word: Copy + Send + Sync {
    fn id(self) -> u32;
}

impl Word for u16 {
    #[inline(always)]
    fn id(self) -> u32 {
        u32::from(u16::from_le(self))
    }
}

impl Word for u32 {
    #[inline(always)]
    fn id(self) -> u32 {
        u32::from_le(self)
    }
}

/// How many tokens at each end of a large file are checked against the vocabulary on open;
/// the rest is checked as batches read it (a full scan of a multi-GB file on open is not
/// cheap). Files up to `CHECK_ALL_BYTES` are checked whole on open (a few ms).
const VOCAB_CHECK_TOKENS: usize = 1 << 16;
const CHECK_ALL_BYTES: u64 = 64 << 20;

/// Token ids are checked against the vocabulary in blocks of this many tokens, each block
/// once, the first time a batch reads from it (a vectorized pass of ~10 µs): batch assembly
/// then copies without a per-token check, yet no id a batch holds went unchecked.
const CHECK_BLOCK: usize = 1 << 16;

/// Files larger than this have their mapped pages released from this process every
/// `RELEASE_EVERY_READS` reads (see `TokenFile::note_read`); smaller ones stay mapped.
const RELEASE_ABOVE_BYTES: u64 = 64 << 20;
const RELEASE_EVERY_READS: usize = 16;

/// A validated, memory-mapped token file.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    /// `None` for an empty file (mapping zero bytes fails on some platforms).
    map: Option<Mmap>,
    dtype: Dtype,
    len: usize,
    vocab_size: u32,
    /// Reads since open, counted only for files above `RELEASE_ABOVE_BYTES`.
    reads: Option<AtomicUsize>,
    /// One bit per block of `CHECK_BLOCK` tokens: set once all its ids were found < vocab_size.
    checked: Vec<AtomicU64>,
    /// Blocks not checked yet: once 0, `verify` is a single load.
    unchecked: AtomicUsize,
}

impl TokenFile {
    /// Maps `path`, checking its size against the dtype and `expected_tokens` (from meta.json).
    pub fn open(path: &Path, dtype: Dtype, vocab_size: u32, expected_tokens: Option<u64>) -> Result<Self> {
        Self::open_checking(path, dtype, vocab_size, expected_tokens, CHECK_ALL_BYTES)
    }

    /// `open`, checking the whole file against the vocabulary when it has at most
    /// `check_all_bytes` bytes, else only its ends (the rest as batches read it).
    pub fn open_checking(path: &Path, dtype: Dtype, vocab_size: u32, expected_tokens: Option<u64>, check_all_bytes: u64) -> Result<Self> {
        let file = File::open(path).map_err(|e| DataError::at(path, format!("cannot open: {e}")))?;
        let bytes = file.metadata().map_err(|e| DataError::at(path, e))?.len();
        if bytes % dtype.size() as u64 != 0 {
            return Err(DataError::at(
                path,
                format!("size {bytes} bytes is not a multiple of {} ({dtype:?}): truncated or wrong dtype", dtype.size()),
            ));
        }
        let len = bytes / dtype.size() as u64;
        if let Some(expected) = expected_tokens {
            if expected != len {
                return Err(DataError::at(path, format!("holds {len} tokens but meta.json says {expected}: truncated or stale")));
            }
        }
        let len = usize::try_from(len).map_err(|_| DataError::at(path, "too large for this platform"))?;
        let map = if bytes == 0 {
            None
        } else {
            // SAFETY: the mapping is read-only and the data files are written once by prepare
            // (atomically, before meta.json) and never modified in place afterwards. If another
            // process truncated the file while mapped, reads could fault (SIGBUS); that is the
            // documented limit of mmap and why prepare writes new files instead of rewriting.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| DataError::at(path, format!("cannot mmap: {e}")))?;
            // Batches are random windows: read-ahead would only inflate RSS.
            #[cfg(unix)]
            let _ = map.advise(memmap2::Advice::Random);
            Some(map)
        };
        let reads = (bytes > RELEASE_ABOVE_BYTES).then(|| AtomicUsize::new(0));
        let blocks = len.div_ceil(CHECK_BLOCK);
        let checked = (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let unchecked = AtomicUsize::new(blocks);
        let tf = Self { path: path.to_path_buf(), map, dtype, len, vocab_size, reads, checked, unchecked };
        if bytes <= check_all_bytes {
            tf.verify(0, len)?;
        } else {
            // Whole blocks, marked checked: batches reading them later do not check them again.
            tf.verify(0, len.min(VOCAB_CHECK_TOKENS))?;
            tf.verify(len.saturating_sub(VOCAB_CHECK_TOKENS), len)?;
        }
        Ok(tf)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// Token `i` (panics past the end: callers index within validated plans).
    pub fn get(&self, i: usize) -> u32 {
        let b = self.bytes();
        match self.dtype {
            Dtype::U16 => u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32,
            Dtype::U32 => u32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        }
    }

    /// The whole file as token words (native little-endian order; see `Word::id`).
    pub fn words(&self) -> Words<'_> {
        let bytes = self.bytes();
        // SAFETY: u16 and u32 have no invalid bit patterns, and `align_to` only yields the
        // correctly aligned middle part; a page-aligned mapping (or the empty slice) has no
        // prefix or suffix, which the asserts below make certain.
        match self.dtype {
            Dtype::U16 => {
                let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
                assert!(pre.is_empty() && post.is_empty() && mid.len() == self.len, "token map is not u16-aligned");
                Words::U16(mid)
            }
            Dtype::U32 => {
                let (pre, mid, post) = unsafe { bytes.align_to::<u32>() };
                assert!(pre.is_empty() && post.is_empty() && mid.len() == self.len, "token map is not u32-aligned");
                Words::U32(mid)
            }
        }
    }

    /// Tokens `start..start + len` of `words` (this file's `words()`), counted as one read and
    /// checked against the vocabulary (`verify`); an error (never an out-of-bounds read) past
    /// the end.
    #[inline(always)]
    pub fn range<'a, W>(&self, words: &'a [W], start: usize, len: usize) -> Result<&'a [W]> {
        match start.checked_add(len).filter(|&e| e <= words.len()) {
            Some(end) => {
                self.note_read();
                self.verify(start, end)?;
                Ok(&words[start..end])
            }
            None => Err(DataError::at(&self.path, format!("read of {len} tokens at {start} is past the end ({})", self.len))),
        }
    }

    /// Every block was checked against the vocabulary: `verify` has nothing left to do.
    #[inline(always)]
    pub fn all_checked(&self) -> bool {
        self.unchecked.load(Ordering::Relaxed) == 0
    }

    /// Checks that every id in `start..end` (within the file) is < vocab_size, scanning each
    /// block of `CHECK_BLOCK` tokens it touches the first time only.
    #[inline(always)]
    pub fn verify(&self, start: usize, end: usize) -> Result<()> {
        if end <= start || self.all_checked() {
            return Ok(());
        }
        let (mut block, last) = (start / CHECK_BLOCK, (end - 1) / CHECK_BLOCK);
        while block <= last {
            if self.checked[block / 64].load(Ordering::Relaxed) & (1u64 << (block % 64)) == 0 {
                self.verify_block(block)?;
            }
            block += 1;
        }
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn verify_block(&self, block: usize) -> Result<()> {
        let range = block * CHECK_BLOCK..self.len.min((block + 1) * CHECK_BLOCK);
        let max = match self.words() {
            Words::U16(w) => w[range.clone()].iter().fold(0u32, |m, &t| m.max(t.id())),
            Words::U32(w) => w[range.clone()].iter().fold(0u32, |m, &t| m.max(t.id())),
        };
        if max >= self.vocab_size {
            return Err(self.vocab_error(range.start, range.end));
        }
        let bit = 1u64 << (block % 64);
        // Counted once per block, whichever thread set its bit first.
        if self.checked[block / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            self.unchecked.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Keeps the file's pages from piling up in this process's resident set.
    ///
    /// Every page a batch reads stays mapped, and the kernel maps whole page-cache folios (up
    /// to MBs) per fault, so random windows over a multi-GB file would grow RSS towards the
    /// file size. It is only page cache, but it shows up as this process's memory; dropping
    /// the mappings every few reads keeps RSS flat. A dropped page that is read again just
    /// faults back in from the page cache.
    #[inline(always)]
    pub fn note_read(&self) {
        let Some(reads) = &self.reads else { return };
        if (reads.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(RELEASE_EVERY_READS) {
            #[cfg(unix)]
            if let Some(map) = &self.map {
                // SAFETY: `map` is a read-only MAP_SHARED file mapping (memmap2's `Mmap::map`) that
                // nothing writes through. MADV_DONTNEED only removes this process's page-table
                // entries; later reads, also concurrent ones on other threads, fault the same file
                // contents back in from the page cache, so no slice we hand out changes.
                let _ = unsafe { map.unchecked_advise(UncheckedAdvice::DontNeed) };
            }
        }
    }

    fn vocab_error(&self, start: usize, end: usize) -> DataError {
        let (pos, tok) = (start..end).map(|i| (i, self.get(i))).find(|&(_, t)| t >= self.vocab_size).unwrap_or((start, 0));
        DataError::at(
            &self.path,
            format!("token id {tok} at position {pos} is >= vocab_size {}: data and tokenizer disagree (re-run prepare.py)", self.vocab_size),
        )
    }
}

/// A loss mask (`NAME.mask.bin`, format version 2): one byte per token of the `.bin`, 1 where the
/// token is a training target, 0 where its label is dropped (chat data: everything but the
/// assistant turns). Read whole: chat datasets are small, and the mask is one byte per token.
#[derive(Debug)]
pub struct MaskFile {
    bits: Vec<u8>,
}

impl MaskFile {
    /// Reads `path`, which must hold exactly `n_tokens` bytes, each 0 or 1.
    pub fn open(path: &Path, n_tokens: u64) -> Result<Self> {
        let bits = std::fs::read(path).map_err(|e| DataError::at(path, format!("cannot read the loss mask: {e}")))?;
        if bits.len() as u64 != n_tokens {
            return Err(DataError::at(
                path,
                format!("loss mask holds {} values but the token file {n_tokens} tokens: truncated or stale (re-run prepare.py)", bits.len()),
            ));
        }
        if let Some(i) = bits.iter().position(|&b| b > 1) {
            return Err(DataError::at(path, format!("loss mask value {} at position {i} is not 0 or 1: corrupt (re-run prepare.py)", bits[i])));
        }
        Ok(Self { bits })
    }

    /// Is token `i` a training target? (Past the end: no.)
    #[inline(always)]
    pub fn trained(&self, i: usize) -> bool {
        self.bits.get(i) == Some(&1)
    }
}

/// Reads and validates a `.idx` file (n_docs + 1 little-endian u64 offsets, first 0, strictly
/// increasing, last = `n_tokens`). Returns the document offsets when `keep`, else just checks.
///
/// Read with buffered I/O rather than mmap: a full scan of a mapped index would leave it all
/// resident in this process (RSS), while the stream sampler never needs it again.
pub fn read_index(path: &Path, n_tokens: u64, expected_docs: Option<u64>, keep: bool) -> Result<(u64, Vec<u64>)> {
    let file = File::open(path).map_err(|e| DataError::at(path, format!("cannot open: {e}")))?;
    let bytes = file.metadata().map_err(|e| DataError::at(path, e))?.len();
    if bytes % 8 != 0 || bytes < 8 {
        return Err(DataError::at(path, format!("size {bytes} bytes is not (n_docs + 1) uint64 offsets: truncated or corrupt")));
    }
    let count = bytes / 8;
    let n_docs = count - 1;
    if let Some(expected) = expected_docs {
        if expected != n_docs {
            return Err(DataError::at(path, format!("holds {n_docs} documents but meta.json says {expected}: truncated or stale")));
        }
    }
    let mut offsets = Vec::new();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = [0u8; 8];
    let mut prev: Option<u64> = None;
    for i in 0..count {
        reader.read_exact(&mut buf).map_err(|e| DataError::at(path, format!("read failed: {e}")))?;
        let off = u64::from_le_bytes(buf);
        match prev {
            None if off != 0 => return Err(DataError::at(path, format!("first offset is {off}, expected 0: corrupt"))),
            Some(p) if off <= p => {
                return Err(DataError::at(path, format!("offset {i} ({off}) is not greater than the one before ({p}): corrupt")))
            }
            _ => {}
        }
        if off > n_tokens {
            return Err(DataError::at(path, format!("offset {i} ({off}) is past the end of the token file ({n_tokens} tokens): corrupt")));
        }
        if keep {
            offsets.push(off);
        }
        prev = Some(off);
    }
    if prev != Some(n_tokens) {
        return Err(DataError::at(
            path,
            format!("last offset is {} but the token file holds {n_tokens} tokens: index and data disagree", prev.unwrap_or(0)),
        ));
    }
    Ok((n_docs, offsets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_dir::TestDir;
    use std::io::Write;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> TestDir {
        TestDir::new(&format!("tokens-{tag}"))
    }

    #[test]
    fn reads_u16_and_u32() {
        let d = tmpdir("rw");
        let p = write(&d, "a.bin", &[1, 0, 2, 0, 0xff, 0x00]);
        let tf = TokenFile::open(&p, Dtype::U16, 300, Some(3)).unwrap();
        let Words::U16(w) = tf.words() else { panic!("a u16 file reads as u16 words") };
        assert_eq!(w.iter().map(|&t| t.id()).collect::<Vec<_>>(), [1, 2, 255]);
        let p = write(&d, "b.bin", &70000u32.to_le_bytes());
        let tf = TokenFile::open(&p, Dtype::U32, 70001, None).unwrap();
        let Words::U32(w) = tf.words() else { panic!("a u32 file reads as u32 words") };
        assert_eq!(w[0].id(), 70000);
    }

    #[test]
    fn rejects_bad_sizes_and_vocab() {
        let d = tmpdir("bad");
        let p = write(&d, "odd.bin", &[1, 0, 2]);
        let e = TokenFile::open(&p, Dtype::U16, 10, None).unwrap_err();
        assert!(e.0.contains("odd.bin") && e.0.contains("multiple"), "{e}");
        let p = write(&d, "v.bin", &[1, 0, 9, 0]);
        let e = TokenFile::open(&p, Dtype::U16, 5, None).unwrap_err();
        assert!(e.0.contains("vocab_size 5"), "{e}");
        let p = write(&d, "n.bin", &[1, 0]);
        assert!(TokenFile::open(&p, Dtype::U16, 5, Some(2)).is_err());
        // Deep inside a small file: found on open. Checking only the ends on open (as for
        // large files) leaves it to `verify`, which finds it too.
        let mut toks = vec![1u8; 6 << 17];
        toks[5 << 16] = 9; // token 163840 = 0x0909
        toks[(5 << 16) + 1] = 9;
        let p = write(&d, "deep.bin", &toks);
        let e = TokenFile::open(&p, Dtype::U16, 300, None).unwrap_err();
        assert!(e.0.contains("2313 at position 163840"), "{e}");
        let tf = TokenFile::open_checking(&p, Dtype::U16, 300, None, 0).unwrap();
        assert!(tf.verify(0, 100).is_ok() && tf.verify(160_000, 170_000).is_err());
    }

    #[test]
    fn validates_mask() {
        let d = tmpdir("mask");
        let p = write(&d, "ok.mask.bin", &[0, 1, 1, 0]);
        let m = MaskFile::open(&p, 4).unwrap();
        assert!(!m.trained(0) && m.trained(1) && m.trained(2) && !m.trained(3) && !m.trained(4));
        let e = MaskFile::open(&p, 5).unwrap_err();
        assert!(e.0.contains("ok.mask.bin") && e.0.contains("4 values"), "{e}");
        let p = write(&d, "bad.mask.bin", &[0, 2]);
        assert!(MaskFile::open(&p, 2).unwrap_err().0.contains("value 2 at position 1"));
    }

    #[test]
    fn validates_index() {
        let d = tmpdir("idx");
        let idx = |v: &[u64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let p = write(&d, "ok.idx", &idx(&[0, 3, 5]));
        assert_eq!(read_index(&p, 5, Some(2), true).unwrap(), (2, vec![0, 3, 5]));
        for (name, v, n) in [("nz", vec![1, 5], 5), ("dec", vec![0, 3, 3, 5], 5), ("end", vec![0, 3, 4], 5), ("oob", vec![0, 9, 5], 5)] {
            let p = write(&d, &format!("{name}.idx"), &idx(&v));
            let e = read_index(&p, n, None, false).unwrap_err();
            assert!(e.0.contains(&format!("{name}.idx")), "{e}");
        }
        let p = write(&d, "short.idx", &[0; 12]);
        assert!(read_index(&p, 0, None, false).is_err());
        let p = write(&d, "empty.idx", &idx(&[0]));
        assert_eq!(read_index(&p, 0, Some(0), true).unwrap(), (0, vec![0]));
    }
}
