//! How Deckhand's long-running daemons (deckhand-kubelet, deckhand-cri) use the C library's
//! memory.
//!
//! Their steady state is what a node pays for them, so two defaults of glibc's malloc are
//! changed, and libm is kept out (see [`pow`]):
//!
//! - **Arenas.** glibc gives threads their own arenas, up to eight per core. A daemon that runs
//!   a burst of blocking tasks (thirty pods started at once) ends up with a dozen arenas, each
//!   holding its own free memory, which no other thread reuses. [`limit_arenas`] caps them at
//!   [`ARENAS`]: the daemons do I/O, and their allocation rate is far from contending on two
//!   arena locks.
//! - **Returning memory.** `free` gives memory back to the kernel only from the top of a heap;
//!   after a burst, the freed chunks in the middle stay resident for the life of the process.
//!   [`spawn_trimmer`] runs `malloc_trim(0)` once work has gone quiet for a moment (and at least
//!   once a minute under constant work), which returns every free page of every arena. Callers
//!   say when they worked with [`after_work`]; nothing runs while the daemon is idle.
//!
//! Both are no-ops where the C library is not glibc.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The most malloc arenas a daemon uses (glibc's default is eight per core).
pub const ARENAS: i32 = 2;

/// Caps the process's malloc arenas at [`ARENAS`]. Call it first thing in `main`, before any
/// thread starts (threads that already have an arena keep it), and before logging is set up:
/// hence the result, `false` when malloc refused, for the caller to log.
pub fn limit_arenas() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes malloc's tunables; M_ARENA_MAX takes any positive value.
        unsafe { libc::mallopt(libc::M_ARENA_MAX, ARENAS) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    true
}

/// Returns the free memory of every arena to the kernel now. Returns whether any was.
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only walks malloc's own free lists, under the arenas' locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

static WORK: Notify = Notify::const_new();
static TRIMMER: AtomicBool = AtomicBool::new(false);

/// Tells the trimmer that work happened (a request served, a pod reconciled). Cheap: one
/// atomic load when no trimmer runs, a notification otherwise.
pub fn after_work() {
    if TRIMMER.load(Ordering::Relaxed) {
        WORK.notify_one();
    }
}

/// How long work must have been quiet before the trimmer trims.
pub const QUIET: Duration = Duration::from_secs(2);
/// The longest the trimmer waits, under work that never pauses, after the first [`after_work`]
/// of a round.
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// Starts, on the current tokio runtime, the task that trims once work has been quiet for
/// `quiet` (or, under work that never pauses, `max_delay` after the first [`after_work`] of
/// the round); the daemons use [`QUIET`] and [`MAX_DELAY`]. One per process: a second call
/// returns `false` and starts nothing.
pub fn spawn_trimmer(quiet: Duration, max_delay: Duration) -> bool {
    if TRIMMER.swap(true, Ordering::SeqCst) {
        return false;
    }
    tokio::spawn(async move {
        loop {
            WORK.notified().await;
            let deadline = Instant::now() + max_delay;
            loop {
                let until = (Instant::now() + quiet).min(deadline);
                match tokio::time::timeout_at(until, WORK.notified()).await {
                    Ok(()) if Instant::now() < deadline => continue,
                    _ => break,
                }
            }
            let released = trim();
            tracing::trace!(released, "malloc_trim after work");
        }
    });
    true
}

/// `pow` for the whole process, from the `libm` crate (a port of musl's): within one unit in
/// the last place of glibc's, which the tests check.
///
/// tokio's multi-threaded scheduler calls `f64::powf` (a moving average of poll times), the
/// only libm function the daemons use. Defined here, the link resolves that call to this
/// function, `--as-needed` leaves libm.so out of the daemons, and the dynamic loader no longer
/// maps it and resolves its hundred IFUNCs at start-up, which left ~240 KiB of libm's pages
/// resident in each daemon. An executable exports nothing it was not asked to, so no library
/// binds to this definition instead of its own libm.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[unsafe(no_mangle)]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Our `pow` gives what glibc's libm gives (found with dlsym, since in this binary the
    /// symbol `pow` is ours), to the last bit for special values and within one unit in the
    /// last place otherwise: tokio's use (a base in (0, 1), a count of polls) and a spread of
    /// ordinary arguments.
    #[test]
    fn pow_matches_glibc() {
        // SAFETY: dlopen/dlsym with valid C strings; the symbol has pow's C signature.
        let glibc: extern "C" fn(f64, f64) -> f64 = unsafe {
            let h = libc::dlopen(c"libm.so.6".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
            assert!(!h.is_null(), "libm.so.6 not found");
            let f = libc::dlsym(h, c"pow".as_ptr());
            assert!(!f.is_null(), "no pow in libm.so.6");
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(f64, f64) -> f64>(f)
        };
        let special = [
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -2.0,
            3.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::MIN_POSITIVE,
            f64::MAX,
        ];
        for &x in &special {
            for &y in &special {
                let (a, b) = (super::pow(x, y), glibc(x, y));
                assert!(
                    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                    "pow({x:e}, {y:e}): ours {a:e}, glibc {b:e}"
                );
            }
        }
        let mut cases = Vec::new();
        for n in 1..=1000 {
            cases.push((0.9, n as f64));
            cases.push((1.0 - 0.001, n as f64 / 7.0));
        }
        let mut v = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..100_000 {
            // xorshift: reproducible arguments over many magnitudes.
            v ^= v << 13;
            v ^= v >> 7;
            v ^= v << 17;
            let x = (v >> 11) as f64 / (1u64 << 53) as f64 * 100.0;
            let y = ((v & 0xffff) as f64 - 32768.0) / 1000.0;
            cases.push((x, y));
        }
        for (x, y) in cases {
            let (a, b) = (super::pow(x, y), glibc(x, y));
            let ulps = (a.to_bits() as i64)
                .wrapping_sub(b.to_bits() as i64)
                .unsigned_abs();
            assert!(
                ulps <= 1 || (a.is_nan() && b.is_nan()),
                "pow({x:e}, {y:e}): ours {a:e}, glibc {b:e}"
            );
        }
    }
}
