//! Kubernetes resource quantities (`100Mi`, `250m`, `1.5G`, `1e3`) as exact numbers.
//!
//! [`Amount`] holds a quantity in thousandths of its unit (millicores, millibytes), which covers
//! every value a node reports, and remembers whether it is written with binary (`Ki`, `Mi`) or
//! decimal suffixes. [`Amount::to_quantity`] writes the canonical form the API server's Go
//! `resource.Quantity` would write, so a status computed here compares equal to what the API
//! server stores (`8148820Ki`, `1900m`, `110`).

use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// How a quantity is written (Go's `resource.Format`, without `DecimalExponent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Powers of 1024: `Ki`, `Mi`, `Gi`...
    BinarySi,
    /// Powers of 1000: `m`, `k`, `M`, `G`...
    DecimalSi,
}

/// An exact resource quantity, in thousandths of its unit.
#[derive(Debug, Clone, Copy)]
pub struct Amount {
    millis: i128,
    format: Format,
}

impl PartialEq for Amount {
    fn eq(&self, other: &Self) -> bool {
        self.millis == other.millis
    }
}

impl Eq for Amount {}

impl PartialOrd for Amount {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Amount {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.millis.cmp(&other.millis)
    }
}

/// A string that is not a quantity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid quantity {input:?}: {reason}")]
pub struct QuantityError {
    input: String,
    reason: &'static str,
}

impl Amount {
    /// Zero, written in `format`.
    pub const fn zero(format: Format) -> Amount {
        Amount { millis: 0, format }
    }

    /// Whole units (bytes, cores, pods).
    pub fn from_units(units: u64, format: Format) -> Amount {
        Amount {
            millis: i128::from(units) * 1000,
            format,
        }
    }

    /// Thousandths of a unit (millicores).
    pub fn from_millis(millis: i128, format: Format) -> Amount {
        Amount { millis, format }
    }

    /// The value in thousandths of the unit.
    pub fn millis(&self) -> i128 {
        self.millis
    }

    /// The value in whole units, rounded up as Go's `Quantity.Value` does.
    pub fn units(&self) -> i128 {
        self.millis.div_euclid(1000) + i128::from(self.millis.rem_euclid(1000) != 0)
    }

    /// How the amount is written.
    pub fn format(&self) -> Format {
        self.format
    }

    /// `self - other`, written like `self` (as Go's `Quantity.Sub`).
    pub fn saturating_sub(self, other: Amount) -> Amount {
        Amount {
            millis: self.millis.saturating_sub(other.millis),
            format: self.format,
        }
    }

    /// `self + other`, written like `self`.
    pub fn saturating_add(self, other: Amount) -> Amount {
        Amount {
            millis: self.millis.saturating_add(other.millis),
            format: self.format,
        }
    }

    /// Zero if negative.
    pub fn non_negative(self) -> Amount {
        Amount {
            millis: self.millis.max(0),
            format: self.format,
        }
    }

    /// Whether the amount is below zero.
    pub fn is_negative(&self) -> bool {
        self.millis < 0
    }

    /// The k8s-openapi quantity in canonical form.
    pub fn to_quantity(&self) -> Quantity {
        Quantity(self.to_string())
    }
}

impl fmt::Display for Amount {
    /// The canonical form Go's `resource.Quantity.String` writes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.millis;
        if m == 0 {
            return f.write_str("0");
        }
        let binary =
            self.format == Format::BinarySi && m % 1000 == 0 && !(-1_024_000 < m && m < 1_024_000);
        if binary {
            const SUFFIXES: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
            let mut v = m / 1000;
            let mut i = 0;
            while i + 1 < SUFFIXES.len() && v % 1024 == 0 {
                v /= 1024;
                i += 1;
            }
            return write!(f, "{v}{}", SUFFIXES[i]);
        }
        // Decimal: the largest power of 1000 (from milli up to exa) that keeps an integer.
        const SUFFIXES: [&str; 8] = ["m", "", "k", "M", "G", "T", "P", "E"];
        let mut v = m;
        let mut i = 0;
        while i + 1 < SUFFIXES.len() && v % 1000 == 0 {
            v /= 1000;
            i += 1;
        }
        write!(f, "{v}{}", SUFFIXES[i])
    }
}

impl std::str::FromStr for Amount {
    type Err = QuantityError;

    fn from_str(s: &str) -> Result<Amount, QuantityError> {
        parse(s)
    }
}

/// Parses a quantity in the API's grammar: a signed decimal number followed by a binary SI
/// suffix (`Ki`...`Ei`), a decimal SI suffix (`m`, `k`, `M`...`E`) or a decimal exponent (`e3`).
/// Precision below a thousandth is rounded up, as the API server does.
pub fn parse(input: &str) -> Result<Amount, QuantityError> {
    let err = |reason| QuantityError {
        input: input.to_string(),
        reason,
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    let (negative, rest) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let num_end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    let (number, suffix) = rest.split_at(num_end);
    let (int_part, frac_part) = number.split_once('.').unwrap_or((number, ""));
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(err("no digits"));
    }
    if number.matches('.').count() > 1 {
        return Err(err("more than one decimal point"));
    }
    if int_part.len() + frac_part.len() > 30 {
        return Err(err("too many digits"));
    }
    let mut mantissa: i128 = 0;
    for c in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa * 10 + i128::from(c - b'0');
    }
    // value = mantissa / 10^frac * num / den
    let mut den: i128 = 10_i128.pow(frac_part.len() as u32);
    let mut num: i128 = 1000; // to millis
    match suffix {
        "" => {}
        "m" => den *= 1000,
        "k" => num *= 1_000,
        "M" => num *= 1_000_000,
        "G" => num *= 1_000_000_000,
        "T" => num *= 1_000_000_000_000,
        "P" => num *= 1_000_000_000_000_000,
        "E" => num *= 1_000_000_000_000_000_000,
        "Ki" => num <<= 10,
        "Mi" => num <<= 20,
        "Gi" => num <<= 30,
        "Ti" => num <<= 40,
        "Pi" => num <<= 50,
        "Ei" => num <<= 60,
        _ => {
            let exp = suffix
                .strip_prefix('e')
                .or_else(|| suffix.strip_prefix('E'))
                .ok_or_else(|| err("unknown suffix"))?;
            let e: i32 = exp.parse().map_err(|_| err("bad exponent"))?;
            if !(-30..=30).contains(&e) {
                return Err(err("exponent out of range"));
            }
            if e >= 0 {
                num = num
                    .checked_mul(10_i128.pow(e.unsigned_abs()))
                    .ok_or_else(|| err("too large"))?;
            } else {
                den = den
                    .checked_mul(10_i128.pow(e.unsigned_abs()))
                    .ok_or_else(|| err("too small"))?;
            }
        }
    }
    let scaled = mantissa.checked_mul(num).ok_or_else(|| err("too large"))?;
    // Round up (away from zero for positive values, as Go rounds the magnitude up).
    let millis = scaled / den + i128::from(scaled % den != 0);
    // Quantities are bounded by int64 in Go; beyond that the API server would refuse them.
    if millis > i128::from(i64::MAX) * 1000 {
        return Err(err("too large"));
    }
    let format = if suffix.ends_with('i') {
        Format::BinarySi
    } else {
        Format::DecimalSi
    };
    Ok(Amount {
        millis: if negative { -millis } else { millis },
        format,
    })
}

/// Parses a k8s-openapi quantity (as read from the API server).
pub fn parse_quantity(q: &Quantity) -> Result<Amount, QuantityError> {
    parse(&q.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Amount {
        parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn parses_suffixes() {
        assert_eq!(p("100Mi").units(), 100 * 1024 * 1024);
        assert_eq!(p("1Ki").units(), 1024);
        assert_eq!(p("250m").millis(), 250);
        assert_eq!(p("2").millis(), 2000);
        assert_eq!(p("1.5G").units(), 1_500_000_000);
        assert_eq!(p("1e3").units(), 1000);
        assert_eq!(p("0.5").millis(), 500);
        assert_eq!(p(".5").millis(), 500);
        assert_eq!(p("-1k").units(), -1000);
        assert_eq!(p("0.0001").millis(), 1, "rounded up to a milli");
        assert_eq!(p("1.5Gi").units(), 1024 * 1024 * 1536);
        for bad in ["", "Mi", "1.2.3", "1x", "1e", "1Ki2", "--1", "1e99"] {
            assert!(parse(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn formats_canonically_like_go() {
        let bin = |b: u64| Amount::from_units(b, Format::BinarySi).to_string();
        assert_eq!(bin(8_344_391_680), "8148820Ki");
        assert_eq!(bin(2 * 1024 * 1024), "2Mi");
        assert_eq!(bin(1 << 30), "1Gi");
        assert_eq!(bin(1023), "1023");
        assert_eq!(bin(1000), "1k", "below 1024 Go switches to decimal");
        assert_eq!(bin(0), "0");
        assert_eq!(bin(1025), "1025");
        let dec = |m: i128| Amount::from_millis(m, Format::DecimalSi).to_string();
        assert_eq!(dec(2000), "2");
        assert_eq!(dec(1900), "1900m");
        assert_eq!(dec(110_000), "110");
        assert_eq!(dec(1_500_000), "1500");
        assert_eq!(dec(2_000_000), "2k");
        assert_eq!(
            Amount::from_millis(1500, Format::BinarySi).to_string(),
            "1500m"
        );
    }

    #[test]
    fn arithmetic_keeps_the_first_format() {
        let mem = Amount::from_units(8_344_391_680, Format::BinarySi);
        let left = mem.saturating_sub(p("100Mi"));
        assert_eq!(left.to_string(), "8046420Ki");
        let cpu = Amount::from_units(2, Format::DecimalSi).saturating_sub(p("100m"));
        assert_eq!(cpu.to_string(), "1900m");
        assert!(p("1").saturating_sub(p("2")).is_negative());
        assert_eq!(p("1").saturating_sub(p("2")).non_negative().millis(), 0);
    }
}
