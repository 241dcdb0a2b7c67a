//! Hard eviction thresholds (`evictionHard`) and the node pressure they signal.
//!
//! A threshold such as `memory.available<100Mi` or `nodefs.available<10%` is met when the observed
//! signal falls below it. Met thresholds become the node's MemoryPressure, DiskPressure and
//! PIDPressure conditions; as upstream, a pressure stays reported for
//! `evictionPressureTransitionPeriod` after it was last observed, so the condition does not
//! oscillate. The same thresholds are subtracted from capacity for allocatable
//! ([`crate::resources::allocatable`]). Evicting pods comes with the pod workers.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use crate::quantity::{self, Amount};

/// An eviction signal, named as upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Signal {
    /// `memory.available`: memory capacity minus the working set.
    MemoryAvailable,
    /// `nodefs.available`: free bytes of the filesystem of the kubelet's root dir.
    NodeFsAvailable,
    /// `nodefs.inodesFree`.
    NodeFsInodesFree,
    /// `imagefs.available`: free bytes of the runtime's image filesystem.
    ImageFsAvailable,
    /// `imagefs.inodesFree`.
    ImageFsInodesFree,
    /// `pid.available`: the PID limit minus the running processes.
    PidAvailable,
}

impl Signal {
    /// Every signal with its upstream name.
    pub const ALL: [(Signal, &'static str); 6] = [
        (Signal::MemoryAvailable, "memory.available"),
        (Signal::NodeFsAvailable, "nodefs.available"),
        (Signal::NodeFsInodesFree, "nodefs.inodesFree"),
        (Signal::ImageFsAvailable, "imagefs.available"),
        (Signal::ImageFsInodesFree, "imagefs.inodesFree"),
        (Signal::PidAvailable, "pid.available"),
    ];

    /// The upstream name (`memory.available`).
    pub fn name(self) -> &'static str {
        Signal::ALL
            .iter()
            .find(|(s, _)| *s == self)
            .map_or("", |(_, n)| n)
    }

    /// The signal called `name`.
    pub fn from_name(name: &str) -> Option<Signal> {
        Signal::ALL
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(s, _)| *s)
    }

    /// The node pressure this signal reports.
    pub fn pressure(self) -> Pressure {
        match self {
            Signal::MemoryAvailable => Pressure::Memory,
            Signal::PidAvailable => Pressure::Pid,
            _ => Pressure::Disk,
        }
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A threshold's value: an absolute quantity or a share of the signal's capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdValue {
    /// An absolute amount (`100Mi`, or a count for inodes and PIDs).
    Quantity(Amount),
    /// A share of capacity, 0 < p <= 1 (`10%` is 0.1), a `float32` as upstream so percentages
    /// round to the same bytes.
    Percentage(f32),
}

impl ThresholdValue {
    /// The threshold as an amount of `capacity`'s unit (upstream `GetThresholdQuantity`).
    pub fn amount_of(&self, capacity: Amount) -> Amount {
        match *self {
            ThresholdValue::Quantity(a) => a,
            ThresholdValue::Percentage(p) => {
                let units = (capacity.units() as f64 * f64::from(p)) as i128;
                Amount::from_millis(units * 1000, capacity.format())
            }
        }
    }
}

/// A hard eviction threshold: `signal < value`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Threshold {
    /// The observed signal.
    pub signal: Signal,
    /// Below this, the threshold is met.
    pub value: ThresholdValue,
}

/// An invalid `evictionHard` entry.
#[derive(Debug, thiserror::Error)]
pub enum ThresholdError {
    /// The signal is not one upstream knows (or not one Deckhand observes).
    #[error("unknown eviction signal {0:?}")]
    UnknownSignal(String),
    /// The value is neither a quantity nor a percentage in (0, 100].
    #[error("eviction threshold {signal}: invalid value {value:?}")]
    BadValue {
        /// The signal's name.
        signal: String,
        /// The value as written.
        value: String,
    },
    /// A quantity that does not parse.
    #[error("eviction threshold {signal}: {source}")]
    Quantity {
        /// The signal's name.
        signal: String,
        /// Why the value does not parse.
        #[source]
        source: quantity::QuantityError,
    },
}

/// Upstream's default `evictionHard` on Linux.
pub fn default_eviction_hard() -> BTreeMap<String, String> {
    [
        ("memory.available", "100Mi"),
        ("nodefs.available", "10%"),
        ("nodefs.inodesFree", "5%"),
        ("imagefs.available", "15%"),
        ("imagefs.inodesFree", "5%"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Parses an `evictionHard` map (`{"memory.available": "100Mi", "nodefs.available": "10%"}`).
/// As upstream, a threshold of zero (`0`, `0%`) is disabled and left out.
pub fn parse_thresholds(map: &BTreeMap<String, String>) -> Result<Vec<Threshold>, ThresholdError> {
    let mut out = Vec::new();
    for (name, value) in map {
        let signal =
            Signal::from_name(name).ok_or_else(|| ThresholdError::UnknownSignal(name.clone()))?;
        let bad = || ThresholdError::BadValue {
            signal: name.clone(),
            value: value.clone(),
        };
        let v = value.trim();
        let value = if let Some(pct) = v.strip_suffix('%') {
            let p: f32 = pct.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad());
            }
            if p == 0.0 {
                continue;
            }
            ThresholdValue::Percentage(p / 100.0)
        } else {
            let a = quantity::parse(v).map_err(|source| ThresholdError::Quantity {
                signal: name.clone(),
                source,
            })?;
            if a.is_negative() {
                return Err(bad());
            }
            if a.millis() == 0 {
                continue;
            }
            ThresholdValue::Quantity(a)
        };
        out.push(Threshold { signal, value });
    }
    Ok(out)
}

/// One observation of a signal: what is available and out of what capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The available amount.
    pub available: Amount,
    /// The capacity, for percentage thresholds.
    pub capacity: Amount,
}

/// Observed signals; a signal that could not be observed is absent and meets no threshold.
pub type Observations = BTreeMap<Signal, Observation>;

/// The thresholds met by `observations`.
pub fn thresholds_met<'a>(
    thresholds: &'a [Threshold],
    observations: &Observations,
) -> Vec<&'a Threshold> {
    thresholds
        .iter()
        .filter(|t| {
            observations
                .get(&t.signal)
                .is_some_and(|o| o.available < t.value.amount_of(o.capacity))
        })
        .collect()
}

/// A node pressure condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Pressure {
    /// MemoryPressure.
    Memory,
    /// DiskPressure.
    Disk,
    /// PIDPressure.
    Pid,
}

/// Remembers when each pressure was last observed and reports it for the transition period.
#[derive(Debug, Clone)]
pub struct PressureTracker {
    transition_period: Duration,
    last_observed: BTreeMap<Pressure, Instant>,
}

impl PressureTracker {
    /// A tracker that keeps a pressure for `transition_period` after it was last observed.
    pub fn new(transition_period: Duration) -> PressureTracker {
        PressureTracker {
            transition_period,
            last_observed: BTreeMap::new(),
        }
    }

    /// Records the thresholds met now and returns whether each pressure is to be reported.
    pub fn update(&mut self, now: Instant, met: &[&Threshold]) -> PressureState {
        for t in met {
            self.last_observed.insert(t.signal.pressure(), now);
        }
        let active = |p: Pressure| {
            self.last_observed
                .get(&p)
                .is_some_and(|at| now.saturating_duration_since(*at) < self.transition_period)
                || met.iter().any(|t| t.signal.pressure() == p)
        };
        PressureState {
            memory: active(Pressure::Memory),
            disk: active(Pressure::Disk),
            pid: active(Pressure::Pid),
        }
    }
}

/// Which pressures the node reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PressureState {
    /// MemoryPressure is True.
    pub memory: bool,
    /// DiskPressure is True.
    pub disk: bool,
    /// PIDPressure is True.
    pub pid: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantity::Format;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn parses_defaults_and_rejects_garbage() {
        let t = parse_thresholds(&default_eviction_hard()).expect("defaults parse");
        assert_eq!(t.len(), 5);
        let mem = t
            .iter()
            .find(|t| t.signal == Signal::MemoryAvailable)
            .expect("memory threshold");
        assert_eq!(
            mem.value,
            ThresholdValue::Quantity(Amount::from_units(100 << 20, Format::BinarySi))
        );
        assert!(parse_thresholds(&map(&[("memory.free", "1Mi")])).is_err());
        assert!(parse_thresholds(&map(&[("nodefs.available", "101%")])).is_err());
        assert!(parse_thresholds(&map(&[("nodefs.available", "x")])).is_err());
        assert!(parse_thresholds(&map(&[("memory.available", "-1")])).is_err());
        let disabled =
            parse_thresholds(&map(&[("memory.available", "0"), ("pid.available", "0%")]))
                .expect("zero parses");
        assert!(disabled.is_empty());
    }

    #[test]
    fn thresholds_compare_against_observations() {
        let t = parse_thresholds(&map(&[
            ("memory.available", "100Mi"),
            ("nodefs.available", "10%"),
        ]))
        .expect("parse");
        let gib = |n: u64| Amount::from_units(n << 30, Format::BinarySi);
        let mut obs = Observations::new();
        obs.insert(
            Signal::MemoryAvailable,
            Observation {
                available: Amount::from_units(50 << 20, Format::BinarySi),
                capacity: gib(8),
            },
        );
        obs.insert(
            Signal::NodeFsAvailable,
            Observation {
                available: gib(20),
                capacity: gib(100),
            },
        );
        let met = thresholds_met(&t, &obs);
        assert_eq!(met.len(), 1);
        assert_eq!(met[0].signal, Signal::MemoryAvailable);
        obs.insert(
            Signal::NodeFsAvailable,
            Observation {
                available: gib(9),
                capacity: gib(100),
            },
        );
        assert_eq!(thresholds_met(&t, &obs).len(), 2);
    }

    #[test]
    fn pressure_lasts_for_the_transition_period() {
        let t = Threshold {
            signal: Signal::PidAvailable,
            value: ThresholdValue::Quantity(Amount::from_units(10, Format::DecimalSi)),
        };
        let mut tracker = PressureTracker::new(Duration::from_secs(300));
        let t0 = Instant::now();
        assert_eq!(tracker.update(t0, &[]), PressureState::default());
        let s = tracker.update(t0, &[&t]);
        assert!(s.pid && !s.memory && !s.disk);
        assert!(tracker.update(t0 + Duration::from_secs(299), &[]).pid);
        assert!(!tracker.update(t0 + Duration::from_secs(301), &[]).pid);
    }
}
