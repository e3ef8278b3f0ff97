//! User tokens: HS256 JWTs with `sub`, `name`, `role`, `exp` (PROTOCOL "Identity").

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Streamer,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Streamer => "streamer",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "streamer" => Ok(Role::Streamer),
            other => Err(format!("role must be viewer or streamer, not `{other}`")),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// Shared, not copied, by every gift record of this connection (`GiftRecord`).
    pub sub: Arc<str>,
    pub name: Arc<str>,
    pub role: Role,
    pub exp: u64,
}

/// The HS256 key and what it signs and checks.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys(..)")
    }
}

impl TokenKeys {
    pub fn new(secret: &[u8]) -> TokenKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        TokenKeys {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// The secret from `--token-secret`, or the one kept in the data dir (made on first start).
    pub fn load_or_create(explicit: Option<&str>, data_dir: &Path) -> anyhow::Result<TokenKeys> {
        if let Some(s) = explicit {
            anyhow::ensure!(s.len() >= 8, "--token-secret must be at least 8 bytes");
            return Ok(TokenKeys::new(s.as_bytes()));
        }
        let path = data_dir.join("token_secret");
        match std::fs::read_to_string(&path) {
            Ok(s) if !s.trim().is_empty() => Ok(TokenKeys::new(s.trim().as_bytes())),
            _ => {
                use rand::RngCore;
                let mut bytes = [0u8; 32];
                rand::rng().fill_bytes(&mut bytes);
                let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                std::fs::create_dir_all(data_dir)?;
                std::fs::write(&path, &hex)?;
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                }
                Ok(TokenKeys::new(hex.as_bytes()))
            }
        }
    }

    pub fn mint(&self, sub: &str, name: &str, role: Role, ttl_secs: u64) -> String {
        let claims = Claims {
            sub: sub.into(),
            name: name.into(),
            role,
            exp: crate::now_secs() + ttl_secs,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .expect("HS256 encoding cannot fail")
    }

    /// Checks signature, expiry and the shape of the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, &'static str> {
        let data =
            decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
                match e.kind() {
                    jsonwebtoken::errors::ErrorKind::ExpiredSignature => "token expired",
                    _ => "bad token",
                }
            })?;
        let c = data.claims;
        if !crate::protocol::valid_id(&c.sub, crate::limits::ID_CHARS_MAX)
            || crate::protocol::clean_text(&c.name, crate::limits::NAME_CHARS_MAX).is_none()
        {
            return Err("bad token claims");
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mint_verify_and_refuse() {
        let k = TokenKeys::new(b"secret-one");
        let t = k.mint("u1", "Ann", Role::Streamer, 60);
        let c = k.verify(&t).unwrap();
        assert_eq!((&*c.sub, &*c.name, c.role), ("u1", "Ann", Role::Streamer));
        assert_eq!(
            TokenKeys::new(b"secret-two").verify(&t).unwrap_err(),
            "bad token"
        );
        let expired = {
            let claims = Claims {
                sub: "u1".into(),
                name: "A".into(),
                role: Role::Viewer,
                exp: 1,
            };
            encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(b"secret-one"),
            )
            .unwrap()
        };
        assert_eq!(k.verify(&expired).unwrap_err(), "token expired");
        assert!(k.verify("garbage").is_err());
        let bad_sub = k.mint("has space", "A", Role::Viewer, 60);
        assert_eq!(k.verify(&bad_sub).unwrap_err(), "bad token claims");
    }
}
