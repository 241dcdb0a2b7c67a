//! Freed memory goes back to the kernel: measured as this process's resident set
//! (/proc/self/statm). One test, so nothing else allocates in this process meanwhile.

use std::time::{Duration, Instant};

const CHUNK: usize = 2048;
const CHUNKS: usize = 20_000; // 40 MiB
const MIB: u64 = 1 << 20;

fn resident() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages");
    pages * 4096
}

/// Allocates 40 MiB in small chunks and frees all but every 50th: the heap stays resident
/// (the kept chunks pin it) although 98% of it is free. Returns the kept chunks.
fn fragment() -> Vec<Vec<u8>> {
    let mut all: Vec<Vec<u8>> = (0..CHUNKS).map(|i| vec![i as u8; CHUNK]).collect();
    let mut kept = Vec::new();
    for (i, c) in all.drain(..).enumerate() {
        if i % 50 == 0 {
            kept.push(c);
        }
    }
    kept
}

fn wait_below(limit: u64, within: Duration) -> bool {
    let end = Instant::now() + within;
    while Instant::now() < end {
        if resident() < limit {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    resident() < limit
}

#[test]
fn freed_memory_is_returned_by_trim_and_by_the_trimmer_after_work() {
    // trim(), directly.
    let base = resident();
    let kept = fragment();
    let fragmented = resident();
    assert!(
        fragmented > base + 30 * MIB,
        "the freed chunks should still be resident: {base} -> {fragmented}"
    );
    assert!(deckhand_malloc::trim(), "malloc_trim released nothing");
    let trimmed = resident();
    assert!(
        trimmed + 25 * MIB < fragmented,
        "trim returned too little: {fragmented} -> {trimmed}"
    );
    drop(kept);

    // The trimmer: nothing while idle, a trim soon after work.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let t = std::thread::spawn(move || {
        rt.block_on(async {
            assert!(deckhand_malloc::spawn_trimmer(
                Duration::from_millis(100),
                Duration::from_secs(60)
            ));
            assert!(!deckhand_malloc::spawn_trimmer(
                Duration::from_millis(100),
                Duration::from_secs(60)
            ));
            tokio::time::sleep(Duration::from_secs(4)).await;
        })
    });
    std::thread::sleep(Duration::from_millis(200));
    let before = resident();
    let kept = fragment();
    let fragmented = resident();
    assert!(fragmented > before + 30 * MIB, "{before} -> {fragmented}");
    // No work reported: no trim.
    assert!(
        !wait_below(fragmented - 25 * MIB, Duration::from_millis(600)),
        "trimmed without work"
    );
    deckhand_malloc::after_work();
    assert!(
        wait_below(fragmented - 25 * MIB, Duration::from_secs(2)),
        "no trim after work went quiet: {} still resident",
        resident()
    );
    drop(kept);
    t.join().expect("runtime thread");
}
