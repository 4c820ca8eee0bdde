//! Background batch assembly: worker threads fill bounded queues ahead of the consumer.
//!
//! Worker `w` of `n` assembles positions `start + w, start + w + n, ...` into its own queue and
//! the consumer reads the queues round-robin, so batches arrive in order without any
//! reordering buffer. Dropping the [`Prefetcher`] closes the queues, which stops the workers.
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::batch::Batch;
use crate::engine::Engine;
use crate::error::{DataError, Result};

/// A bounded queue from one worker to the consumer that wakes each side in batches.
///
/// Putting a thread to sleep and waking it costs microseconds (a futex round trip, more in a
/// VM): as much as assembling a bucketed batch. A full queue makes its worker sleep until half
/// of it has been taken, and an empty queue makes the consumer sleep until half of it is
/// filled (or the worker has finished), so a wake-up moves half a queue of batches, not one;
/// a side is only signalled when it sleeps. The consumer still never waits while a batch is
/// ready: it only sleeps on an empty queue.
struct Queue {
    state: Mutex<State>,
    /// The consumer waits here for batches.
    ready: Condvar,
    /// The worker waits here for room.
    room: Condvar,
    cap: usize,
}

#[derive(Default)]
struct State {
    items: VecDeque<Result<Batch>>,
    /// The worker will push nothing more (finished, failed or panicked).
    done: bool,
    /// The consumer is gone: the worker should stop.
    closed: bool,
    consumer_sleeps: bool,
    worker_sleeps: bool,
}

impl Queue {
    fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self { state: Mutex::default(), ready: Condvar::new(), room: Condvar::new(), cap }
    }

    /// Half the capacity (at least one): the fill that wakes a sleeping consumer, and the
    /// room that wakes a sleeping worker.
    fn half(&self) -> usize {
        self.cap.div_ceil(2)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent whatever panicked while holding the lock.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds `item` once there is room; false when the consumer is gone.
    fn push(&self, item: Result<Batch>) -> bool {
        let mut s = self.lock();
        if s.items.len() >= self.cap && !s.closed {
            s.worker_sleeps = true;
            while s.items.len() > self.cap - self.half() && !s.closed {
                s = self.room.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.worker_sleeps = false;
        }
        if s.closed {
            return false;
        }
        s.items.push_back(item);
        if s.consumer_sleeps && s.items.len() >= self.half() {
            self.ready.notify_one();
        }
        true
    }

    /// Marks the worker finished and wakes the consumer for what is left.
    fn finish(&self) {
        let mut s = self.lock();
        s.done = true;
        if s.consumer_sleeps {
            self.ready.notify_one();
        }
    }

    /// The next item; None once the worker has finished and everything was taken.
    fn pop(&self) -> Option<Result<Batch>> {
        let mut s = self.lock();
        if s.items.is_empty() && !s.done {
            s.consumer_sleeps = true;
            while s.items.len() < self.half() && !s.done {
                s = self.ready.wait(s).unwrap_or_else(PoisonError::into_inner);
            }
            s.consumer_sleeps = false;
        }
        let item = s.items.pop_front();
        if s.worker_sleeps && s.items.len() <= self.cap - self.half() {
            self.room.notify_one();
        }
        item
    }

    /// The consumer is gone: wakes the worker so it stops.
    fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.items.clear();
        self.room.notify_one();
    }
}

/// Marks a worker's queue finished however the worker ends, a panic included, so the consumer
/// never waits forever.
struct FinishOnDrop(Arc<Queue>);

impl Drop for FinishOnDrop {
    fn drop(&mut self) {
        self.0.finish();
    }
}

pub struct Prefetcher {
    queues: Vec<Arc<Queue>>,
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
            let queue = Arc::new(Queue::new(per_queue));
            let engine = Arc::clone(&engine);
            let finish = FinishOnDrop(Arc::clone(&queue));
            handles.push(std::thread::spawn(move || {
                let queue = &finish.0;
                let mut pos = start + w;
                while stop.is_none_or(|s| pos < s) {
                    let batch = engine.batch(pos);
                    let failed = batch.is_err();
                    if !queue.push(batch) || failed {
                        break;
                    }
                    pos += n as u64;
                }
            }));
            queues.push(queue);
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
        // A worker only finishes before `stop` by failing (its error is queued) or panicking
        // (a bug): report the latter rather than end quietly.
        let item = queue.pop().unwrap_or_else(|| Err(DataError::new("a batch worker thread stopped unexpectedly")));
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
        for q in &self.queues {
            q.close();
        }
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
