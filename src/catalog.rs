//! The sticker catalog: built in, or read from a JSON or TOML file (`--catalog`).

use crate::limits::GIFT_COUNT_MAX;
use crate::money::AMOUNT_MAX;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

/// One sticker. `tier` (1–5) decides how loud the shout-out is, how long a paid message stays
/// pinned (`pin_secs`) and how long the overlay shows it (`alert_secs`), as Super Chat does by
/// amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sticker {
    /// Shared, not copied, by every gift record of this sticker (`GiftRecord`).
    pub id: Arc<str>,
    pub name: String,
    pub price: u64,
    pub emoji: String,
    pub tier: u8,
    #[serde(default)]
    pub pin_secs: u32,
    #[serde(default)]
    pub alert_secs: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Catalog {
    pub stickers: Vec<Sticker>,
}

/// Pin and alert seconds by tier, when the file does not give them.
const TIER_PIN_SECS: [u32; 5] = [0, 30, 120, 300, 600];
const TIER_ALERT_SECS: [u32; 5] = [3, 4, 6, 10, 15];
/// The largest sticker price: `price * GIFT_COUNT_MAX` must stay within `AMOUNT_MAX`.
pub const PRICE_MAX: u64 = AMOUNT_MAX / GIFT_COUNT_MAX as u64;
/// Stickers in one catalog.
pub const STICKERS_MAX: usize = 200;

impl Default for Catalog {
    fn default() -> Self {
        let s = |id: &str, name: &str, price: u64, emoji: &str, tier: u8| Sticker {
            id: id.into(),
            name: name.into(),
            price,
            emoji: emoji.into(),
            tier,
            pin_secs: TIER_PIN_SECS[tier as usize - 1],
            alert_secs: TIER_ALERT_SECS[tier as usize - 1],
        };
        Catalog {
            stickers: vec![
                s("rose", "Rose", 1, "🌹", 1),
                s("heart", "Heart", 5, "❤️", 1),
                s("coffee", "Coffee", 10, "☕", 2),
                s("star", "Star", 50, "⭐", 2),
                s("crown", "Crown", 100, "👑", 3),
                s("rocket", "Rocket", 500, "🚀", 3),
                s("castle", "Castle", 1_000, "🏰", 4),
                s("planet", "Planet", 5_000, "🪐", 4),
                s("galaxy", "Galaxy", 10_000, "🌌", 5),
                s("universe", "Universe", 30_000, "✨", 5),
            ],
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalog {0}: {1}")]
    Read(String, std::io::Error),
    #[error("catalog {0} is not valid {1}: {2}")]
    Parse(String, &'static str, String),
    #[error("catalog: {0}")]
    Invalid(String),
}

impl Catalog {
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let name = path.display().to_string();
        let text =
            std::fs::read_to_string(path).map_err(|e| CatalogError::Read(name.clone(), e))?;
        let mut catalog: Catalog = if path.extension().is_some_and(|e| e == "toml") {
            toml::from_str(&text).map_err(|e| CatalogError::Parse(name, "TOML", e.to_string()))?
        } else {
            serde_json::from_str(&text)
                .map_err(|e| CatalogError::Parse(name, "JSON", e.to_string()))?
        };
        for s in &mut catalog.stickers {
            if (1..=5).contains(&s.tier) {
                if s.pin_secs == 0 {
                    s.pin_secs = TIER_PIN_SECS[s.tier as usize - 1];
                }
                if s.alert_secs == 0 {
                    s.alert_secs = TIER_ALERT_SECS[s.tier as usize - 1];
                }
            }
        }
        catalog.validate()?;
        Ok(catalog)
    }

    pub fn validate(&self) -> Result<(), CatalogError> {
        if self.stickers.is_empty() || self.stickers.len() > STICKERS_MAX {
            return Err(CatalogError::Invalid(format!(
                "needs 1 to {STICKERS_MAX} stickers"
            )));
        }
        let mut ids = HashSet::new();
        for s in &self.stickers {
            if !crate::protocol::valid_id(&s.id, 32) {
                return Err(CatalogError::Invalid(format!("bad sticker id `{}`", s.id)));
            }
            if !ids.insert(&s.id) {
                return Err(CatalogError::Invalid(format!(
                    "sticker id `{}` given twice",
                    s.id
                )));
            }
            if s.price == 0 || s.price > PRICE_MAX {
                return Err(CatalogError::Invalid(format!(
                    "sticker `{}`: price must be 1..={PRICE_MAX}",
                    s.id
                )));
            }
            if !(1..=5).contains(&s.tier) {
                return Err(CatalogError::Invalid(format!(
                    "sticker `{}`: tier must be 1..=5",
                    s.id
                )));
            }
            if s.name.is_empty() || s.name.chars().count() > 40 || s.emoji.chars().count() > 16 {
                return Err(CatalogError::Invalid(format!(
                    "sticker `{}`: bad name or emoji",
                    s.id
                )));
            }
        }
        Ok(())
    }

    pub fn get(&self, id: &str) -> Option<&Sticker> {
        self.stickers.iter().find(|s| *s.id == *id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_spans_one_to_ten_thousand_plus() {
        let c = Catalog::default();
        c.validate().unwrap();
        assert!(c.stickers.len() >= 8);
        assert_eq!(c.stickers.iter().map(|s| s.price).min(), Some(1));
        assert!(c.stickers.iter().map(|s| s.price).max().unwrap() >= 10_000);
    }

    #[test]
    fn loads_json_and_toml_and_refuses_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("c.json");
        std::fs::write(
            &json,
            r#"{"stickers":[{"id":"a","name":"A","price":2,"emoji":"x","tier":2}]}"#,
        )
        .unwrap();
        let c = Catalog::load(&json).unwrap();
        assert_eq!(c.stickers[0].pin_secs, TIER_PIN_SECS[1]);
        let toml_path = dir.path().join("c.toml");
        std::fs::write(
            &toml_path,
            "[[stickers]]\nid='b'\nname='B'\nprice=3\nemoji='y'\ntier=1\n",
        )
        .unwrap();
        assert_eq!(Catalog::load(&toml_path).unwrap().stickers[0].price, 3);
        let bad = dir.path().join("bad.json");
        std::fs::write(
            &bad,
            r#"{"stickers":[{"id":"a","name":"A","price":0,"emoji":"x","tier":2}]}"#,
        )
        .unwrap();
        assert!(Catalog::load(&bad).is_err());
        std::fs::write(&bad, r#"{"stickers":[{"id":"a","name":"A","price":1,"emoji":"x","tier":2},{"id":"a","name":"A","price":1,"emoji":"x","tier":2}]}"#).unwrap();
        assert!(Catalog::load(&bad).is_err());
        std::fs::write(
            &bad,
            r#"{"stickers":[{"id":"a","name":"A","price":1,"emoji":"x","tier":6}]}"#,
        )
        .unwrap();
        assert!(Catalog::load(&bad).is_err());
    }
}
