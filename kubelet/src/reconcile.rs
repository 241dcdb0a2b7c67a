//! Running a reconciler in the manner of kube-rs controllers.
//!
//! A [`Reconciler`] compares desired and actual state once and returns an [`Action`]: when to
//! look again. [`run`] drives one: it reconciles, then sleeps until the requeue time, an explicit
//! wake-up ([`Trigger`], e.g. from a watch event) or shutdown, whichever comes first. Errors go
//! through the reconciler's `error_policy` (typically an exponential [`Backoff`]); a reconcile
//! that takes longer than its timeout counts as an error. There is no global polling loop: each
//! reconciler has its own period and is woken by the events that concern it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What to do after a reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Reconcile again after `after` (or earlier when woken).
    pub fn requeue(after: Duration) -> Action {
        Action {
            requeue_after: Some(after),
        }
    }

    /// Reconcile again right away.
    pub fn requeue_now() -> Action {
        Action::requeue(Duration::ZERO)
    }

    /// Reconcile again only when woken.
    pub fn await_change() -> Action {
        Action {
            requeue_after: None,
        }
    }

    /// The requeue delay, if any.
    pub fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// A wake-up signal for a reconciler; waking it while it reconciles makes it run once more.
pub type Trigger = Arc<Notify>;

/// Something that converges actual state on desired state, one idempotent step at a time.
pub trait Reconciler: Send {
    /// The error of one reconcile.
    type Error: std::fmt::Display + Send;

    /// A short name for logs.
    fn name(&self) -> &'static str;

    /// The longest one reconcile may take.
    fn timeout(&self) -> Duration;

    /// One step; safe to repeat at any time.
    fn reconcile(&mut self) -> impl Future<Output = Result<Action, Self::Error>> + Send;

    /// What to do after `error` (a reconcile that timed out is reported as `None`).
    fn error_policy(&mut self, error: Option<&Self::Error>) -> Action;
}

/// Drives `reconciler` until `shutdown` is cancelled. A reconcile in flight at shutdown is
/// dropped.
pub async fn run<R: Reconciler>(mut reconciler: R, trigger: Trigger, shutdown: CancellationToken) {
    loop {
        let timeout = reconciler.timeout();
        // Boxed: a reconcile's state machine (a pod worker's is tens of KiB) then lives only
        // while it runs, not for as long as the reconciler waits between runs.
        let outcome = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(timeout, Box::pin(reconciler.reconcile())) => r,
        };
        // What the reconcile allocated and freed goes back to the kernel once work pauses.
        deckhand_malloc::after_work();
        let action = match outcome {
            Ok(Ok(action)) => action,
            Ok(Err(e)) => {
                let action = reconciler.error_policy(Some(&e));
                tracing::warn!(
                    reconciler = reconciler.name(),
                    retry_in = ?action.requeue_after(),
                    "reconcile failed: {e}"
                );
                action
            }
            Err(_) => {
                let action = reconciler.error_policy(None);
                tracing::warn!(
                    reconciler = reconciler.name(),
                    retry_in = ?action.requeue_after(),
                    "reconcile timed out after {timeout:?}"
                );
                action
            }
        };
        let sleep = async {
            match action.requeue_after() {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            _ = trigger.notified() => {}
            _ = sleep => {}
        }
    }
    tracing::debug!(reconciler = reconciler.name(), "stopped");
}

/// Exponential back-off: `initial`, doubled after every failure, at most `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// A back-off starting at `initial` and capped at `max`.
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay before the next retry; doubles the one after.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// Back to `initial` after a success.
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn backoff_doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(1));
        let ds: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(ds, [200, 400, 800, 1000, 1000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    struct Counter {
        runs: Arc<AtomicU32>,
        fail: bool,
    }

    impl Reconciler for Counter {
        type Error = String;
        fn name(&self) -> &'static str {
            "counter"
        }
        fn timeout(&self) -> Duration {
            Duration::from_secs(5)
        }
        async fn reconcile(&mut self) -> Result<Action, String> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            if self.fail {
                Err("no".into())
            } else {
                Ok(Action::await_change())
            }
        }
        fn error_policy(&mut self, _: Option<&String>) -> Action {
            Action::requeue(Duration::from_millis(10))
        }
    }

    #[tokio::test]
    async fn runs_on_trigger_and_retries_errors_until_shutdown() {
        let runs = Arc::new(AtomicU32::new(0));
        let trigger = Trigger::default();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            Counter {
                runs: runs.clone(),
                fail: false,
            },
            trigger.clone(),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1, "awaits a change");
        trigger.notify_one();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "woken once");
        shutdown.cancel();
        task.await.expect("driver ends");

        let runs = Arc::new(AtomicU32::new(0));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            Counter {
                runs: runs.clone(),
                fail: true,
            },
            Trigger::default(),
            shutdown.clone(),
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(runs.load(Ordering::SeqCst) >= 3, "errors are retried");
        shutdown.cancel();
        task.await.expect("driver ends");
    }
}
