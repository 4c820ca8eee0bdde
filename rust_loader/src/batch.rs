//! Batch assembly: turns a [`BatchSpec`] into the arrays of docs/contracts.md ("Batches").
use crate::error::Result;
use crate::plan::BatchSpec;
use crate::tokens::TokenFile;

/// Label of positions without a loss (padding, the last token of a document).
pub const IGNORE: i32 = -100;

/// Segments whose memory is touched together before copying (see `TokenFile::touch`).
const TOUCH_AHEAD: usize = 16;

/// One assembled batch; row-major `[rows, cols]` arrays, handed to numpy without a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub rows: usize,
    pub cols: usize,
    pub input_ids: Vec<i32>,
    pub labels: Vec<i32>,
    pub position_ids: Vec<i32>,
    pub seq_ids: Vec<i32>,
    /// Cumulative segment lengths over the flattened batch; padding is its own segment.
    pub cu_seqlens: Vec<i32>,
    pub max_seqlen: usize,
    /// Positions with a label.
    pub n_tokens: usize,
    pub n_pad: usize,
}

pub fn assemble(spec: &BatchSpec, tokens: &TokenFile, pad_id: i32) -> Result<Batch> {
    let (rows, cols) = (spec.n_rows(), spec.cols);
    let size = rows * cols;
    // Every array is written once, front to back (no fill-then-overwrite).
    let mut b = Batch {
        rows,
        cols,
        input_ids: Vec::with_capacity(size),
        labels: Vec::with_capacity(size),
        position_ids: Vec::with_capacity(size),
        seq_ids: Vec::with_capacity(size),
        cu_seqlens: Vec::with_capacity(rows * 2 + 1),
        max_seqlen: 0,
        n_tokens: 0,
        n_pad: 0,
    };
    b.cu_seqlens.push(0);
    let all = spec.segments();
    let mut seen = 0usize;
    for segments in spec.rows() {
        let row_end = b.input_ids.len() + cols;
        for (doc, seg) in segments.iter().enumerate() {
            if seen.is_multiple_of(TOUCH_AHEAD) {
                let next = &all[seen..all.len().min(seen + TOUCH_AHEAD)];
                tokens.touch(next.iter().flat_map(|s| [s.start as usize, (s.start + u64::from(s.len)) as usize - 1]));
            }
            seen += 1;
            let (start, len) = (seg.start as usize, seg.len as usize);
            let from = b.input_ids.len();
            tokens.extend_into(start, len, &mut b.input_ids)?;
            // Labels are the inputs shifted by one within the segment, then the token after the
            // segment, unless the document ends there.
            b.labels.extend_from_slice(&b.input_ids[from + 1..]);
            b.labels.push(if seg.ends_doc { IGNORE } else { tokens.token(start + len)? });
            b.n_tokens += len - usize::from(seg.ends_doc);
            b.position_ids.extend(0..len as i32);
            b.seq_ids.extend(std::iter::repeat_n(doc as i32, len));
            b.cu_seqlens.push(b.input_ids.len() as i32);
            b.max_seqlen = b.max_seqlen.max(len);
        }
        let pad = row_end - b.input_ids.len();
        if pad > 0 {
            b.input_ids.resize(row_end, pad_id);
            b.labels.resize(row_end, IGNORE);
            b.position_ids.resize(row_end, 0);
            b.seq_ids.resize(row_end, -1);
            b.cu_seqlens.push(row_end as i32);
            b.max_seqlen = b.max_seqlen.max(pad);
            b.n_pad += pad;
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Segment;
    use crate::tokens::Dtype;
    use std::io::Write;

    fn token_file(tokens: &[u16]) -> TokenFile {
        let p = std::env::temp_dir().join(format!("bulba-batch-{}-{}.bin", std::process::id(), tokens.len()));
        let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        std::fs::File::create(&p).unwrap().write_all(&bytes).unwrap();
        TokenFile::open(&p, Dtype::U16, 100, None).unwrap()
    }

    #[test]
    fn packs_documents_with_boundaries() {
        // docs: [10 11 12] [20 21] ; a window piece [30 31] followed by 32
        let tf = token_file(&[10, 11, 12, 20, 21, 30, 31, 32]);
        let seg = |start, len, ends_doc| Segment { start, len, ends_doc };
        let mut spec = BatchSpec::new(6, 2);
        spec.push_row(&[seg(0, 3, true), seg(3, 2, true)]);
        spec.push_row(&[seg(5, 2, false)]);
        let b = assemble(&spec, &tf, 99).unwrap();
        assert_eq!(b.input_ids, [10, 11, 12, 20, 21, 99, 30, 31, 99, 99, 99, 99]);
        assert_eq!(b.labels, [11, 12, -100, 21, -100, -100, 31, 32, -100, -100, -100, -100]);
        assert_eq!(b.position_ids, [0, 1, 2, 0, 1, 0, 0, 1, 0, 0, 0, 0]);
        assert_eq!(b.seq_ids, [0, 0, 0, 1, 1, -1, 0, 0, -1, -1, -1, -1]);
        assert_eq!(b.cu_seqlens, [0, 3, 5, 6, 8, 12]);
        assert_eq!((b.max_seqlen, b.n_tokens, b.n_pad), (4, 5, 5));
    }

    #[test]
    fn out_of_range_segment_is_an_error() {
        let tf = token_file(&[1, 2, 3]);
        let mut spec = BatchSpec::new(4, 1);
        spec.push_row(&[Segment { start: 1, len: 2, ends_doc: false }]);
        assert!(assemble(&spec, &tf, 0).is_err());
    }
}
