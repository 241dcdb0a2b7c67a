//! Conversions between cgroup v1 (and CRI, which speaks v1 units) and cgroup v2 values, in one
//! place.

/// Smallest and largest v1 `cpu.shares`.
pub const MIN_SHARES: u64 = 2;
pub const MAX_SHARES: u64 = 262_144;
/// Smallest and largest v2 `cpu.weight`.
pub const MIN_WEIGHT: u64 = 1;
pub const MAX_WEIGHT: u64 = 10_000;

/// v1 `cpu.shares` to v2 `cpu.weight`.
///
/// The quadratic mapping in log space that runc (≥ 1.3.2/1.4) and crun (≥ 1.23) use: it maps
/// the range ends onto each other (2 → 1, 262144 → 10000) *and* the defaults (1024 → 100), which
/// the older linear formula of KEP-2254 (`1 + (shares - 2) * 9999 / 262142`, giving 1024 → 39)
/// did not, so a container with default shares got less CPU than a default v2 sibling.
/// `0` means "not set" and stays `0`.
///
/// `log2` and `pow` come from the `libm` crate, whose results here equal glibc's for every
/// shares value (the `share_conversions_match_glibc` test checks the whole range; its `pow` is
/// not correctly rounded everywhere, but no weight depends on the difference): the std float
/// functions would link libm.so into every binary for this one formula, and the dynamic
/// loader's work on it costs each process (one monitor per container) memory and start-up time.
pub fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 0;
    }
    let shares = shares.clamp(MIN_SHARES, MAX_SHARES);
    let l = libm::log2(shares as f64);
    let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
    (libm::ceil(libm::pow(10.0, exponent)) as u64).clamp(MIN_WEIGHT, MAX_WEIGHT)
}

/// v2 `cpu.weight` back to v1 shares (the inverse of [`shares_to_weight`], up to rounding):
/// for reporting a v2 cgroup's weight in CRI units. `0` stays `0`.
pub fn weight_to_shares(weight: u64) -> u64 {
    if weight == 0 {
        return 0;
    }
    let w = weight.clamp(MIN_WEIGHT, MAX_WEIGHT) as f64;
    // l² + 125 l − 612 (log10 w + 7/34) = 0
    let c = 612.0 * (libm::log10(w) + 7.0 / 34.0);
    let l = (-125.0 + libm::sqrt(125.0f64 * 125.0 + 4.0 * c)) / 2.0;
    let mut s = (libm::round(libm::pow(2.0, l)) as u64).clamp(MIN_SHARES, MAX_SHARES);
    // Float rounding can land one step off: move to the nearest shares value that maps back
    // to exactly this weight.
    let w = w as u64;
    while s > MIN_SHARES && shares_to_weight(s) > w {
        s -= 1;
    }
    while s < MAX_SHARES && shares_to_weight(s) < w {
        s += 1;
    }
    s
}

/// v1 `blkio.weight` (10..=1000) to v2 `io.weight` (1..=10000), as runc converts it.
/// `0` means "not set".
pub fn blkio_weight_to_io_weight(weight: u64) -> u64 {
    if weight == 0 {
        return 0;
    }
    let w = weight.clamp(10, 1000);
    1 + (w - 10) * 9999 / 990
}

/// OCI `memory.swap` is memory+swap (the v1 `memsw` meaning); v2 `memory.swap.max` is swap
/// alone. Returns the value to write (`"max"` or bytes), or `None` when nothing is to be written.
pub fn swap_to_v2(limit: Option<i64>, swap: Option<i64>) -> Result<Option<String>, String> {
    let Some(swap) = swap else {
        return Ok(None);
    };
    if swap == -1 {
        return Ok(Some("max".into()));
    }
    if swap == 0 {
        // Unset in runtime-spec terms (Go's zero value); leave the kernel default.
        return Ok(None);
    }
    match limit {
        None | Some(0) | Some(-1) => Err(format!(
            "memory.swap = {swap} needs a memory limit on cgroup v2 (swap is memory+swap)"
        )),
        Some(limit) if swap < limit => Err(format!(
            "memory.swap ({swap}) must not be below memory.limit ({limit})"
        )),
        Some(limit) => Ok(Some((swap - limit).to_string())),
    }
}

/// A memory value in OCI terms (`-1` = unlimited) as a v1 string.
pub(crate) fn mem_v1(v: i64) -> String {
    if v < 0 { "-1".into() } else { v.to_string() }
}

/// A memory value in OCI terms (`-1` = unlimited) as a v2 string.
pub(crate) fn mem_v2(v: i64) -> String {
    if v < 0 { "max".into() } else { v.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_weight_ends_and_default() {
        assert_eq!(shares_to_weight(0), 0);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(1024), 100);
        assert_eq!(shares_to_weight(262_144), 10_000);
        assert_eq!(shares_to_weight(1_000_000), 10_000);
        // Monotonic.
        let mut last = 0;
        for s in (2..262_144).step_by(97) {
            let w = shares_to_weight(s);
            assert!(w >= last, "{s}");
            last = w;
        }
        for s in [2u64, 102, 512, 1024, 2048, 100_000, 262_144] {
            let back = weight_to_shares(shares_to_weight(s));
            // The weight is coarser than shares: the inverse lands within one weight step.
            assert_eq!(shares_to_weight(back), shares_to_weight(s), "{s} -> {back}");
        }
        assert_eq!(weight_to_shares(100), 1024);
    }

    /// The `libm` crate gives what glibc's libm (std's float functions) gives, for every shares
    /// value: the weights written are those of crun (C, glibc) and of earlier Deckhand builds.
    #[test]
    fn share_conversions_match_glibc() {
        let glibc = |shares: u64| {
            let l = (shares as f64).log2();
            let exponent = (l * l + 125.0 * l) / 612.0 - 7.0 / 34.0;
            (10f64.powf(exponent).ceil() as u64).clamp(MIN_WEIGHT, MAX_WEIGHT)
        };
        for s in MIN_SHARES..=MAX_SHARES {
            assert_eq!(shares_to_weight(s), glibc(s), "shares {s}");
        }
        // weight_to_shares: its first estimate (the rest is shares_to_weight, checked above).
        for w in MIN_WEIGHT..=MAX_WEIGHT {
            let c = 612.0 * ((w as f64).log10() + 7.0 / 34.0);
            let l = (-125.0 + (125.0f64 * 125.0 + 4.0 * c).sqrt()) / 2.0;
            let c_ours = 612.0 * (libm::log10(w as f64) + 7.0 / 34.0);
            let l_ours = (-125.0 + libm::sqrt(125.0f64 * 125.0 + 4.0 * c_ours)) / 2.0;
            assert_eq!(
                libm::round(libm::pow(2.0, l_ours)),
                2f64.powf(l).round(),
                "weight {w}"
            );
        }
    }

    #[test]
    fn blkio_and_swap() {
        assert_eq!(blkio_weight_to_io_weight(10), 1);
        assert_eq!(blkio_weight_to_io_weight(1000), 10_000);
        assert_eq!(blkio_weight_to_io_weight(500), 1 + 490 * 9999 / 990);
        assert_eq!(swap_to_v2(Some(100), None), Ok(None));
        assert_eq!(swap_to_v2(Some(100), Some(-1)), Ok(Some("max".into())));
        assert_eq!(swap_to_v2(Some(100), Some(100)), Ok(Some("0".into())));
        assert_eq!(swap_to_v2(Some(100), Some(300)), Ok(Some("200".into())));
        assert!(swap_to_v2(Some(100), Some(50)).is_err());
        assert!(swap_to_v2(None, Some(50)).is_err());
        assert_eq!(mem_v1(-1), "-1");
        assert_eq!(mem_v2(-1), "max");
        assert_eq!(mem_v2(4096), "4096");
    }
}
