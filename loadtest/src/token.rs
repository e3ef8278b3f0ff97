//! User tokens: HS256 JWTs with claims sub, name, role, exp (the wire contract's identity).

use anyhow::Result;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Claims {
    pub sub: String,
    pub name: String,
    pub role: String,
    pub exp: u64,
}

/// Mint a token valid for `ttl_secs` from now.
pub fn mint(secret: &str, sub: &str, name: &str, role: &str, ttl_secs: u64) -> Result<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = Claims {
        sub: sub.into(),
        name: name.into(),
        role: role.into(),
        exp: now + ttl_secs,
    };
    Ok(encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};

    #[test]
    fn minted_token_verifies_with_same_secret_only() {
        let t = mint("sekret", "lt-w1", "wallet 1", "viewer", 3600).unwrap();
        let v = Validation::new(Algorithm::HS256);
        let d = decode::<Claims>(&t, &DecodingKey::from_secret(b"sekret"), &v).unwrap();
        assert_eq!(d.header.alg, Algorithm::HS256);
        assert_eq!(d.claims.sub, "lt-w1");
        assert_eq!(d.claims.name, "wallet 1");
        assert_eq!(d.claims.role, "viewer");
        assert!(d.claims.exp > 1_700_000_000);
        assert!(decode::<Claims>(&t, &DecodingKey::from_secret(b"other"), &v).is_err());
    }

    #[test]
    fn streamer_role() {
        let t = mint("k", "s1", "S", "streamer", 60).unwrap();
        let v = Validation::new(Algorithm::HS256);
        let d = decode::<Claims>(&t, &DecodingKey::from_secret(b"k"), &v).unwrap();
        assert_eq!(d.claims.role, "streamer");
    }
}
