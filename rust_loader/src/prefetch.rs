//! Background batch assembly: worker threads fill bounded queues ahead of the consumer.
//!
//! Worker `w` of `n` assembles positions `start + w, start + w + n, ...` into its own queue and
//! the consumer reads the queues round-robin, so batches arrive in order without any
//! reordering buffer. Dropping the [`Prefetcher`] closes the queues, which stops the workers.
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::batch::Batch;
use crate::engine::Engine;
use crate::error::{DataError, Result};

pub struct Prefetcher {
    queues: Vec<Receiver<Result<Batch>>>,
    workers: Vec<JoinHandle<()>>,
    start: u64,
    next: u64,
    stop: Option<u64>,
    failed: bool,
}

impl Prefetcher {
    /// Batches at global positions `start..stop` (forever when `stop` is None), `depth` ahead.
    pub fn spawn(engine: Arc<Engine>, start: u64, stop: Option<u64>, depth: usize, workers: usize) -> Self {
        let n = workers.max(1);
        let per_queue = depth.div_ceil(n).max(1);
        let mut queues = Vec::with_capacity(n);
        let mut handles = Vec::with_capacity(n);
        for w in 0..n as u64 {
            let (tx, rx) = sync_channel(per_queue);
            let engine = Arc::clone(&engine);
            handles.push(std::thread::spawn(move || {
                let mut pos = start + w;
                while stop.is_none_or(|s| pos < s) {
                    let batch = engine.batch(pos);
                    let failed = batch.is_err();
                    // A closed queue means the consumer is gone: stop quietly.
                    if tx.send(batch).is_err() || failed {
                        break;
                    }
                    pos += n as u64;
                }
            }));
            queues.push(rx);
        }
        Self { queues, workers: handles, start, next: start, stop, failed: false }
    }

    /// The next batch in order; None at `stop` (or after an error was returned).
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        if self.failed || self.stop.is_some_and(|s| self.next >= s) {
            return None;
        }
        // Worker w holds positions start + w + k * n: the queue follows from the offset.
        let queue = &self.queues[((self.next - self.start) % self.queues.len() as u64) as usize];
        // A worker only hangs up early by panicking (a bug): report it rather than end quietly.
        let item = queue.recv().unwrap_or_else(|_| Err(DataError::new("a batch worker thread stopped unexpectedly")));
        self.failed = item.is_err();
        self.next += 1;
        Some(item)
    }

    /// Global position of the batch `next_batch` returns next.
    pub fn position(&self) -> u64 {
        self.next
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Close the queues first so blocked workers wake up, then wait for them.
        self.queues.clear();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
