//! The PollScheduler: every request the proxy makes to one Notion upstream shares one budget.
//!
//! Notion allows about 3 requests per second per integration. The budget is a governor rate limiter
//! spaced so that no 1-second window ever holds more than the budget; the client's own calls passing
//! through take from it too (without ever being delayed), so polls only use what is left. Waiters queue
//! on a FIFO semaphore, so every task gets its turn in order and none starves; a `rate_limited` answer
//! pauses every poll until its retry-after.

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

/// Counters of what the scheduler did (for logs, the demo summary and telemetry).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PollStats {
    /// Requests the proxy sent through the budget (task starts and polls).
    pub requests: u64,
    /// Client calls that passed through and were counted against the budget.
    pub client_calls: u64,
    /// `rate_limited` answers received.
    pub rate_limited: u64,
    /// Total time the proxy held back because of a retry-after, in ms.
    pub paused_ms: u64,
}

/// One shared request budget per upstream credential.
pub struct PollScheduler {
    limiter: DefaultDirectRateLimiter,
    turn: Semaphore,
    /// Lets one task start at a time into the turn queue (see [`Self::acquire_start`]).
    start_gate: Semaphore,
    paused_until: Mutex<Option<Instant>>,
    waiting: AtomicUsize,
    spacing: Duration,
    requests: AtomicU64,
    client_calls: AtomicU64,
    rate_limited: AtomicU64,
    paused_ms: AtomicU64,
}

/// How much later than another a request may reach Notion (after leaving here) with every 1-second
/// window there still within the budget. With only 1 ms of slack, a loaded test machine saw Notion's
/// simulator refuse the proxy's own request now and then; the real Notion is further away.
const JITTER: Duration = Duration::from_millis(50);

impl PollScheduler {
    /// A scheduler allowing at most `per_second` requests in any 1-second window.
    pub fn new(per_second: u32) -> Self {
        let per_second = per_second.max(1);
        // One request every (1 s + JITTER) / n: n+1 requests span at least 1 s + JITTER, so no
        // 1-second window at Notion holds n+1 of them even when one of them arrives up to JITTER
        // later than it left (the network, the upstream's own queue, a busy machine).
        let spacing =
            Duration::from_micros((1_000_000 + JITTER.as_micros() as u64).div_ceil(u64::from(per_second)));
        let quota = Quota::with_period(spacing).expect("spacing is positive").allow_burst(NonZeroU32::MIN);
        PollScheduler {
            limiter: RateLimiter::direct(quota),
            turn: Semaphore::new(1),
            start_gate: Semaphore::new(1),
            paused_until: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            spacing,
            requests: AtomicU64::new(0),
            client_calls: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            paused_ms: AtomicU64::new(0),
        }
    }

    /// Waits for this caller's turn and a free slot in the budget (and for any retry-after to pass).
    pub async fn acquire(&self) {
        // Counted as queued until this returns or is dropped mid-wait (a cancelled task's poll).
        struct Queued<'a>(&'a AtomicUsize);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let queued = Queued(&self.waiting);
        // FIFO: tokio's semaphore serves waiters in order.
        let _turn = self.turn.acquire().await.expect("the semaphore is never closed");
        loop {
            let pause = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(until) = pause
                && until > Instant::now()
            {
                tokio::time::sleep_until(until).await;
                continue;
            }
            self.limiter.until_ready().await;
            // A retry-after may have arrived while we waited for the slot.
            let pause = *self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
            if pause.is_none_or(|until| until <= Instant::now()) {
                break;
            }
        }
        drop(queued);
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Like [`Self::acquire`], for the start of a new task. Starts enter the queue one at a time, so
    /// polls of tasks already running never wait behind a crowd of new ones: finishing work comes
    /// before starting more (with 1,000 tasks started at once, a finished task is noticed within a few
    /// slots instead of after every start).
    pub async fn acquire_start(&self) {
        let _gate = self.start_gate.acquire().await.expect("the semaphore is never closed");
        self.acquire().await;
    }

    /// A client call passed through to the same upstream: it takes a slot if one is free (it is never
    /// delayed: the proxy does not slow the client down, it only leaves it room).
    pub fn note_client_call(&self) {
        self.client_calls.fetch_add(1, Ordering::Relaxed);
        let _ = self.limiter.check();
    }

    /// Notion said `rate_limited`: hold every request back for `wait`.
    pub fn pause_for(&self, wait: Duration) {
        self.rate_limited.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::metrics().notion_wait.record(wait.as_secs_f64(), &[]);
        let until = Instant::now() + wait;
        let mut paused = self.paused_until.lock().unwrap_or_else(|e| e.into_inner());
        if paused.is_none_or(|p| p < until) {
            *paused = Some(until);
            self.paused_ms.fetch_add(wait.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// The real interval between two polls of one task whose own backoff is `backoff`: with many tasks
    /// queued, the shared budget, not the backoff, sets the pace.
    pub fn cadence(&self, backoff: Duration) -> Duration {
        let queued = self.waiting.load(Ordering::Relaxed) as u32 + 1;
        backoff.max(self.spacing * queued)
    }

    /// What the scheduler did so far.
    pub fn stats(&self) -> PollStats {
        PollStats {
            requests: self.requests.load(Ordering::Relaxed),
            client_calls: self.client_calls.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            paused_ms: self.paused_ms.load(Ordering::Relaxed),
        }
    }
}

/// The least a wait grows by: a suggested backoff of 0 still grows (0, 100 ms, 150 ms, …).
const MIN_STEP: Duration = Duration::from_millis(100);

/// Backoff between polls of one task: first `suggested`, then ×`factor` each time (at least
/// [`MIN_STEP`]), at most `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    next: Duration,
    factor: f64,
    max: Duration,
}

impl Backoff {
    /// Starts at `suggested`.
    pub fn new(suggested: Duration, factor: f64, max: Duration) -> Self {
        Backoff { next: suggested.min(max), factor, max }
    }

    /// The current delay.
    pub fn current(&self) -> Duration {
        self.next
    }

    /// Returns the delay to wait now and grows the next one.
    pub fn step(&mut self) -> Duration {
        let now = self.next;
        self.next = self.next.mul_f64(self.factor).max(MIN_STEP).min(self.max);
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_by_half_up_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(1000), 1.5, Duration::from_secs(10));
        let steps: Vec<u64> = (0..8).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps, [1000, 1500, 2250, 3375, 5062, 7593, 10000, 10000]);
    }

    #[test]
    fn a_suggested_backoff_of_zero_still_grows() {
        let mut b = Backoff::new(Duration::ZERO, 1.5, Duration::from_secs(10));
        let steps: Vec<u64> = (0..4).map(|_| b.step().as_millis() as u64).collect();
        assert_eq!(steps, [0, 100, 150, 225]);
    }

    #[tokio::test]
    async fn an_abandoned_wait_leaves_the_queue() {
        // A poll given up while it waits (the adapter's select! drops it when the task is cancelled)
        // must not count as queued forever: the cadence told to clients would creep up.
        let s = PollScheduler::new(1);
        s.pause_for(Duration::from_secs(60));
        for _ in 0..5 {
            let _ = tokio::time::timeout(Duration::from_millis(5), s.acquire()).await;
        }
        assert_eq!(s.cadence(Duration::ZERO), s.spacing, "no one is waiting any more");
    }

    #[tokio::test]
    async fn no_one_second_window_exceeds_the_budget() {
        let s = std::sync::Arc::new(PollScheduler::new(20));
        let start = Instant::now();
        let mut handles = Vec::new();
        for _ in 0..30 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                s.acquire().await;
                start.elapsed()
            }));
        }
        let mut times = Vec::new();
        for h in handles {
            times.push(h.await.unwrap());
        }
        times.sort();
        for (i, t) in times.iter().enumerate() {
            let in_window = times[i..].iter().take_while(|u| **u < *t + Duration::from_secs(1)).count();
            assert!(in_window <= 20, "{in_window} requests within 1 s of {t:?}");
        }
        assert_eq!(s.stats().requests, 30);
    }

    #[tokio::test]
    async fn the_budget_holds_when_a_request_arrives_late() {
        // n+1 requests span more than a second by JITTER: one of them may reach Notion that much
        // later than the others without n+1 landing in one of its windows.
        let s = PollScheduler::new(20);
        let start = Instant::now();
        let mut times = Vec::new();
        for _ in 0..21 {
            s.acquire().await;
            times.push(start.elapsed());
        }
        let span = times[20] - times[0];
        assert!(span >= Duration::from_secs(1) + JITTER, "21 requests within {span:?}");
    }

    #[tokio::test]
    async fn a_retry_after_holds_everyone_back() {
        let s = PollScheduler::new(100);
        s.pause_for(Duration::from_millis(200));
        let t = Instant::now();
        s.acquire().await;
        assert!(t.elapsed() >= Duration::from_millis(190));
        assert_eq!(s.stats().rate_limited, 1);
    }
}
