//! Coins and the exact revenue split. Money is a `u64` newtype, never a float; every
//! operation is checked, so overflow is an error and never a wrap.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Shares are kept in units of 1/`SHARE_UNIT` coin. A basis point is 1/10000, so a share of
/// `amount` coins at `bp` basis points is exactly `amount * bp` units: no rounding, ever.
pub const SHARE_UNIT: u64 = 10_000;

/// The largest amount one gift or credit may carry, so that `amount * SHARE_UNIT` and every
/// running total stay far below `u64::MAX` (1.8e19): 10^12 coins * 10^4 = 10^16.
pub const AMOUNT_MAX: u64 = 1_000_000_000_000;
const _: () = assert!(AMOUNT_MAX.checked_mul(SHARE_UNIT).is_some());

/// Whole coins.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Coins(pub u64);

impl Coins {
    pub const ZERO: Coins = Coins(0);
    pub fn checked_add(self, other: Coins) -> Option<Coins> {
        self.0.checked_add(other.0).map(Coins)
    }
    pub fn checked_sub(self, other: Coins) -> Option<Coins> {
        self.0.checked_sub(other.0).map(Coins)
    }
    pub fn checked_mul(self, count: u64) -> Option<Coins> {
        self.0.checked_mul(count).map(Coins)
    }
}

impl fmt::Display for Coins {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// One gift's value split three ways, in units of 1/`SHARE_UNIT` coin.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shares {
    pub store: u64,
    pub streamer: u64,
    pub platform: u64,
}

impl Shares {
    pub fn total(&self) -> Option<u64> {
        self.store
            .checked_add(self.streamer)?
            .checked_add(self.platform)
    }
}

/// The revenue split in basis points; always sums to 10000.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    pub store_bp: u64,
    pub streamer_bp: u64,
    pub platform_bp: u64,
}

impl Default for Split {
    fn default() -> Self {
        Split {
            store_bp: 3000,
            streamer_bp: 5000,
            platform_bp: 2000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SplitError {
    #[error("split part `{0}` is not of the form name=basis_points")]
    Malformed(String),
    #[error("unknown split part `{0}` (expected store, streamer, platform)")]
    Unknown(String),
    #[error("split part `{0}` given twice")]
    Duplicate(String),
    #[error("split is missing `{0}`")]
    Missing(&'static str),
    #[error("split parts sum to {0} basis points, must be exactly 10000")]
    Sum(u64),
}

impl FromStr for Split {
    type Err = SplitError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts: [Option<u64>; 3] = [None; 3];
        for part in s.split(',') {
            let part = part.trim();
            let (name, value) = part
                .split_once('=')
                .ok_or_else(|| SplitError::Malformed(part.to_string()))?;
            let value: u64 = value
                .trim()
                .parse()
                .map_err(|_| SplitError::Malformed(part.to_string()))?;
            if value > 10_000 {
                return Err(SplitError::Sum(value));
            }
            let index = match name.trim() {
                "store" => 0,
                "streamer" => 1,
                "platform" => 2,
                other => return Err(SplitError::Unknown(other.to_string())),
            };
            if parts[index].replace(value).is_some() {
                return Err(SplitError::Duplicate(name.trim().to_string()));
            }
        }
        let store_bp = parts[0].ok_or(SplitError::Missing("store"))?;
        let streamer_bp = parts[1].ok_or(SplitError::Missing("streamer"))?;
        let platform_bp = parts[2].ok_or(SplitError::Missing("platform"))?;
        let sum = store_bp + streamer_bp + platform_bp;
        if sum != SHARE_UNIT {
            return Err(SplitError::Sum(sum));
        }
        Ok(Split {
            store_bp,
            streamer_bp,
            platform_bp,
        })
    }
}

impl fmt::Display for Split {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "store={},streamer={},platform={}",
            self.store_bp, self.streamer_bp, self.platform_bp
        )
    }
}

impl Split {
    /// The exact shares of `amount`. `None` only when `amount > AMOUNT_MAX`.
    pub fn shares(&self, amount: Coins) -> Option<Shares> {
        if amount.0 > AMOUNT_MAX {
            return None;
        }
        let shares = Shares {
            store: amount.0 * self.store_bp,
            streamer: amount.0 * self.streamer_bp,
            platform: amount.0 * self.platform_bp,
        };
        debug_assert_eq!(shares.total(), Some(amount.0 * SHARE_UNIT));
        Some(shares)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_default() {
        let s: Split = "store=3000,streamer=5000,platform=2000".parse().unwrap();
        assert_eq!(s, Split::default());
        assert_eq!(s.to_string().parse::<Split>().unwrap(), s);
    }

    #[test]
    fn rejects_bad_splits() {
        assert_eq!(
            "store=3000,streamer=5000".parse::<Split>(),
            Err(SplitError::Missing("platform"))
        );
        assert_eq!(
            "store=3000,streamer=5000,platform=2001".parse::<Split>(),
            Err(SplitError::Sum(10001))
        );
        assert!(matches!(
            "store=3000,streamer=5000,bank=2000".parse::<Split>(),
            Err(SplitError::Unknown(_))
        ));
        assert!(matches!(
            "store=3000,store=5000,platform=2000".parse::<Split>(),
            Err(SplitError::Duplicate(_))
        ));
        assert!(matches!(
            "store=x,streamer=5000,platform=2000".parse::<Split>(),
            Err(SplitError::Malformed(_))
        ));
        assert!(matches!(
            "store=-1,streamer=5000,platform=2000".parse::<Split>(),
            Err(SplitError::Malformed(_))
        ));
    }

    #[test]
    fn amount_over_the_max_is_refused() {
        assert!(Split::default().shares(Coins(AMOUNT_MAX)).is_some());
        assert!(Split::default().shares(Coins(AMOUNT_MAX + 1)).is_none());
    }

    proptest! {
        #[test]
        fn shares_always_sum_exactly(a in 0u64..=10_000, b in 0u64..=10_000, amount in 0u64..=AMOUNT_MAX) {
            prop_assume!(a + b <= 10_000);
            let split = Split { store_bp: a, streamer_bp: b, platform_bp: 10_000 - a - b };
            let shares = split.shares(Coins(amount)).unwrap();
            prop_assert_eq!(shares.total(), Some(amount * SHARE_UNIT));
            prop_assert_eq!(shares.store, amount * a);
        }
    }
}
