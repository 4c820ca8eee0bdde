//! Background batch assembly: worker threads fill a window of upcoming batches ahead of the
//! consumer.
//!
//! Workers claim positions in order from a shared counter, up to `depth` ahead of the one the
//! consumer takes next, and put each batch in that position's slot; the consumer takes the
//! slots in order. So batches arrive in order, and a worker held up by a slow batch (one that
//! also shuffles an epoch's lists, say) holds up nobody else: the others claim the next
//! positions. A consumer whose next batch is not ready yet assembles a later one itself
//! rather than sleep. Dropping the [`Prefetcher`] closes the window, which stops the workers.
use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::batch::Batch;
use crate::engine::Engine;
use crate::error::{DataError, Result};

/// The window shared by the workers and the consumer.
///
/// Putting a thread to sleep and waking it costs microseconds (a futex round trip, more in a
/// VM): as much as assembling a bucketed batch. So threads are only signalled while they
/// sleep, and sleeping workers are woken once half the window is free, not per batch.
struct Window {
    state: Mutex<State>,
    /// The consumer waits here for its next batch.
    ready: Condvar,
    /// Workers wait here for room.
    room: Condvar,
    depth: u64,
    stop: Option<u64>,
}

struct State {
    /// Slot i holds position `next + i` once assembled (positions up to `claimed` have one).
    slots: VecDeque<Option<Result<Batch>>>,
    /// The position the consumer takes next.
    next: u64,
    /// The position claimed next.
    claimed: u64,
    /// An assembly failed: no more positions are claimed.
    failed: bool,
    /// The consumer is gone: workers stop.
    closed: bool,
    /// A worker panicked (a bug): its position will never be filled.
    panicked: bool,
    consumer_sleeps: bool,
    workers_sleeping: usize,
}

impl Window {
    fn new(start: u64, stop: Option<u64>, depth: u64) -> Self {
        let state = State {
            slots: VecDeque::new(),
            next: start,
            claimed: start,
            failed: false,
            closed: false,
            panicked: false,
            consumer_sleeps: false,
            workers_sleeping: 0,
        };
        Self { state: Mutex::new(state), ready: Condvar::new(), room: Condvar::new(), depth: depth.max(1), stop }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update below leaves the state consistent: a panic elsewhere cannot break it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(cv: &Condvar, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        cv.wait(s).unwrap_or_else(PoisonError::into_inner)
    }

    /// Claims the next position if the window has room for it (and there is one to claim).
    fn try_claim(&self, s: &mut State) -> Option<u64> {
        let open = !s.closed && !s.failed && self.stop.is_none_or(|stop| s.claimed < stop);
        (open && s.claimed < s.next + self.depth).then(|| {
            s.slots.push_back(None);
            s.claimed += 1;
            s.claimed - 1
        })
    }

    /// A position for a worker to assemble, once there is room; None when it should stop.
    fn claim(&self) -> Option<u64> {
        let mut s = self.lock();
        loop {
            if let Some(p) = self.try_claim(&mut s) {
                return Some(p);
            }
            if s.closed || s.failed || self.stop.is_some_and(|stop| s.claimed >= stop) {
                return None;
            }
            s.workers_sleeping += 1;
            s = Self::wait(&self.room, s);
            s.workers_sleeping -= 1;
        }
    }

    /// Puts the batch of position `p` (claimed by this thread) in its slot.
    fn put(&self, p: u64, batch: Result<Batch>) {
        let mut s = self.lock();
        if s.closed {
            return;
        }
        s.failed |= batch.is_err();
        let i = (p - s.next) as usize;
        s.slots[i] = Some(batch);
        if i == 0 && s.consumer_sleeps {
            self.ready.notify_one();
        }
    }

    /// The batch of position `next`; None at `stop`. While it is not ready, assembles later
    /// positions (on this thread) as long as there is one to claim, and only then sleeps.
    fn take(&self, engine: &Engine) -> Option<Result<Batch>> {
        let mut s = self.lock();
        if self.stop.is_some_and(|stop| s.next >= stop) {
            return None;
        }
        loop {
            if matches!(s.slots.front(), Some(Some(_))) || s.panicked {
                break;
            }
            if let Some(p) = self.try_claim(&mut s) {
                drop(s);
                self.put(p, engine.batch(p));
                s = self.lock();
                continue;
            }
            s.consumer_sleeps = true;
            s = Self::wait(&self.ready, s);
            s.consumer_sleeps = false;
        }
        // Only a panicking worker (a bug) leaves a position unfilled: report it rather than
        // end quietly.
        let item = s.slots.pop_front().flatten().unwrap_or_else(|| Err(DataError::new("a batch worker thread stopped unexpectedly")));
        s.next += 1;
        let room = s.next + self.depth - s.claimed;
        if s.workers_sleeping > 0 && room >= self.depth.div_ceil(2) {
            self.room.notify_all();
        }
        Some(item)
    }

    /// A worker is ending: by panicking, the consumer must not wait for its position.
    fn worker_exits(&self) {
        if std::thread::panicking() {
            let mut s = self.lock();
            s.panicked = true;
            self.ready.notify_one();
        }
    }

    /// The consumer is gone: wakes the workers so they stop.
    fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.slots.clear();
        self.room.notify_all();
    }
}

/// Tells the window when its worker ends, a panic included, so the consumer never waits
/// forever.
struct ExitGuard(Arc<Window>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.worker_exits();
    }
}

pub struct Prefetcher {
    engine: Arc<Engine>,
    window: Arc<Window>,
    workers: Vec<JoinHandle<()>>,
    /// An error was returned: the iteration is over.
    failed: bool,
}

impl Prefetcher {
    /// Batches at global positions `start..stop` (forever when `stop` is None), `depth` ahead.
    pub fn spawn(engine: Arc<Engine>, start: u64, stop: Option<u64>, depth: usize, workers: usize) -> Self {
        let window = Arc::new(Window::new(start, stop, depth as u64));
        let workers = (0..workers.max(1))
            .map(|_| {
                let engine = Arc::clone(&engine);
                let guard = ExitGuard(Arc::clone(&window));
                std::thread::spawn(move || {
                    let window = &guard.0;
                    while let Some(p) = window.claim() {
                        window.put(p, engine.batch(p));
                    }
                })
            })
            .collect();
        Self { engine, window, workers, failed: false }
    }

    /// The next batch in order; None at `stop` (or after an error was returned).
    pub fn next_batch(&mut self) -> Option<Result<Batch>> {
        if self.failed {
            return None;
        }
        let item = self.window.take(&self.engine)?;
        self.failed = item.is_err();
        Some(item)
    }

    /// Global position of the batch `next_batch` returns next.
    pub fn position(&self) -> u64 {
        self.window.lock().next
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        // Close the window first so sleeping workers wake up, then wait for them.
        self.window.close();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}
