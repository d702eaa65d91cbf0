//! Secrets (API tokens, device credentials, activation codes) and the
//! callers they authenticate.
//!
//! Every secret is a prefix and 256 random bits in hex. The store keeps only
//! its SHA-256, which is enough for a value with that much entropy.

use edgekeep_api::TokenInfo;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Prefix of API tokens.
pub const TOKEN_PREFIX: &str = "ek_";
/// Prefix of device credentials.
pub const CREDENTIAL_PREFIX: &str = "ekd_";
/// Prefix of device activation codes.
pub const ACTIVATION_PREFIX: &str = "eka_";

/// Generates a secret: `prefix` followed by 64 hex characters.
pub fn generate_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

/// Returns the lowercase hex SHA-256 of a secret, the only form stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// The token behind a REST call.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: i64,
    pub name: String,
    pub admin: bool,
    /// Projects the token may act on; `None` for every project.
    pub project_ids: Option<Vec<i64>>,
}

impl Caller {
    pub fn from_token(info: &TokenInfo) -> Self {
        Caller {
            token_id: info.id,
            name: info.name.clone(),
            admin: info.admin,
            project_ids: info.project_ids.clone(),
        }
    }

    /// Rejects the call with 403 unless the token covers `project_id`.
    pub fn check_project(&self, project_id: i64) -> Result<()> {
        match &self.project_ids {
            Some(ids) if !ids.contains(&project_id) => Err(Error::Forbidden(format!(
                "token {} does not cover project {project_id}; use a token scoped to it",
                self.name
            ))),
            _ => Ok(()),
        }
    }

    /// Rejects the call with 403 unless the token is the administrator token.
    pub fn require_admin(&self) -> Result<()> {
        if self.admin {
            Ok(())
        } else {
            Err(Error::Forbidden(format!(
                "token {} is not an administrator token; this call needs the administrator token",
                self.name
            )))
        }
    }

    /// Rejects the call with 403 when the token is limited to some projects.
    pub fn require_unscoped(&self) -> Result<()> {
        match self.project_ids {
            Some(_) => Err(Error::Forbidden(format!(
                "token {} is limited to some projects; this call needs a token for every project",
                self.name
            ))),
            None => Ok(()),
        }
    }
}

/// Checks that a stored token is usable at `now`.
pub fn check_token(info: &TokenInfo, now: i64) -> Result<()> {
    if info.revoked_at.is_some() {
        return Err(Error::Unauthorized(format!(
            "token {} was revoked; ask an administrator for a new token",
            info.name
        )));
    }
    if info.expires_at.is_some_and(|expires| expires <= now) {
        return Err(Error::Unauthorized(format!(
            "token {} expired at {}; ask an administrator for a new token",
            info.name,
            crate::format_time(info.expires_at.unwrap_or_default())
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_token_has_prefix_and_64_hex() {
        let token = generate_secret(TOKEN_PREFIX);
        let digits = token.strip_prefix("ek_").expect("prefix");
        assert_eq!(digits.len(), 64);
        assert!(digits.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(token, generate_secret(TOKEN_PREFIX));
    }

    #[test]
    fn hash_is_sha256_hex() {
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
