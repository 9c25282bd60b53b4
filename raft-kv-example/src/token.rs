//! Bearer tokens of the client API: their format, their roles, and the
//! hash a cluster keeps of each (never the token itself).
//!
//! A token reads `rkv.<name>.<secret>`: the name it was created under
//! (letters, digits, `-` and `_`, at most [`MAX_NAME_BYTES`]) and 64 hex
//! digits of a 256-bit random secret. The name lets a node find the
//! token's record with one lookup; the record holds the SHA-256 of the
//! whole token, which the node compares in constant time. Tokens are made
//! where they are asked for (`raft-kv token create`): the cluster is sent
//! only the name, the role and the hash.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The longest token name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// The name of the token `raft-kv certs` creates (`admin.token`).
pub const BOOTSTRAP_NAME: &str = "admin";

const PREFIX: &str = "rkv.";
const SECRET_BYTES: usize = 32;

/// What a token may do. Each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads (`GET /v1/kv`, stale or linearizable), status, readiness and
    /// metrics.
    Read,
    /// Read, and writes: `PUT` and `DELETE` of keys, CAS, sessions.
    Write,
    /// Write, and the cluster's administration: membership, leadership
    /// transfer, backups and tokens.
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::Read, Role::Write, Role::Admin];

    /// The role's name: `read`, `write` or `admin`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Role {
    type Err = TokenError;
    fn from_str(s: &str) -> Result<Role, TokenError> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| TokenError::Role(s.chars().take(32).collect()))
    }
}

/// Why a token, a name or a role was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TokenError {
    /// Not of the form `rkv.<name>.<64 hex digits>`.
    #[error("not a raft-kv token (expected rkv.<name>.<64 hex digits>)")]
    Malformed,
    /// The `Authorization` header is not `Bearer <token>`.
    #[error("expected an `Authorization: Bearer <token>` header")]
    NotBearer,
    /// A token name outside the allowed alphabet or length.
    #[error("token name must be 1 to {MAX_NAME_BYTES} letters, digits, `-` or `_`: {0:?}")]
    Name(String),
    /// Not `read`, `write` or `admin`.
    #[error("unknown role {0:?}: expected read, write or admin")]
    Role(String),
    /// The system's random number generator failed.
    #[error("no randomness for a token: {0}")]
    Random(String),
}

/// Checks a token name: 1 to [`MAX_NAME_BYTES`] of `[A-Za-z0-9_-]`.
pub fn check_name(name: &str) -> Result<(), TokenError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(TokenError::Name(
            name.chars().take(MAX_NAME_BYTES).collect(),
        )),
    }
}

/// The SHA-256 of a whole token: what a cluster stores.
#[derive(Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenHash(pub [u8; 32]);

impl TokenHash {
    /// As 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// From 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<TokenHash> {
        let mut out = [0u8; 32];
        unhex(text.trim(), &mut out).then_some(TokenHash(out))
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_hex())
    }
}

/// A bearer token. Its `Debug` shows the name only.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    text: String,
    name_end: usize,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({}, secret hidden)", self.name())
    }
}

impl Token {
    /// A new token named `name`, with a fresh 256-bit secret from the
    /// operating system's generator.
    pub fn generate(name: &str) -> Result<Token, TokenError> {
        use ring::rand::SecureRandom;
        check_name(name)?;
        let mut secret = [0u8; SECRET_BYTES];
        ring::rand::SystemRandom::new()
            .fill(&mut secret)
            .map_err(|e| TokenError::Random(e.to_string()))?;
        Token::parse(&format!("{PREFIX}{name}.{}", hex(&secret)))
    }

    /// Parses `rkv.<name>.<64 hex digits>` (surrounding whitespace, as a
    /// token file's final newline, ignored).
    pub fn parse(text: &str) -> Result<Token, TokenError> {
        let text = text.trim();
        let rest = text.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let (name, secret) = rest.rsplit_once('.').ok_or(TokenError::Malformed)?;
        check_name(name).map_err(|_| TokenError::Malformed)?;
        let mut bytes = [0u8; SECRET_BYTES];
        if !unhex(secret, &mut bytes) {
            return Err(TokenError::Malformed);
        }
        Ok(Token {
            text: text.to_string(),
            name_end: PREFIX.len() + name.len(),
        })
    }

    /// The token from an `Authorization` header's value: `Bearer <token>`
    /// (the scheme in any case, RFC 9110 §11.1).
    pub fn from_header(value: &[u8]) -> Result<Token, TokenError> {
        let value = std::str::from_utf8(value).map_err(|_| TokenError::NotBearer)?;
        let (scheme, token) = value.split_once(' ').ok_or(TokenError::NotBearer)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(TokenError::NotBearer);
        }
        Token::parse(token)
    }

    /// The name the token was created under.
    pub fn name(&self) -> &str {
        &self.text[PREFIX.len()..self.name_end]
    }

    /// The whole token, as it goes in a header: a secret.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// Its SHA-256.
    pub fn hash(&self) -> TokenHash {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.text.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        TokenHash(out)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Decodes exactly `out.len()` bytes of hex from `text`.
fn unhex(text: &str, out: &mut [u8]) -> bool {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    if text.len() != out.len() * 2 {
        return false;
    }
    for (o, pair) in out.iter_mut().zip(text.as_bytes().chunks(2)) {
        match (digit(pair[0]), digit(pair[1])) {
            (Some(h), Some(l)) => *o = h << 4 | l,
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_back_with_its_name_and_hash() {
        let t = Token::generate("ci-bot_2").expect("token");
        assert!(t.expose().starts_with("rkv.ci-bot_2."));
        assert_eq!(t.expose().len(), "rkv.ci-bot_2.".len() + 64);
        let back = Token::parse(&format!("{}\n", t.expose())).expect("parses");
        assert_eq!(back.name(), "ci-bot_2");
        assert_eq!(back.hash(), t.hash());
        assert_ne!(Token::generate("ci-bot_2").unwrap().hash(), t.hash());
        assert!(
            !format!("{t:?}").contains(&t.expose()[14..]),
            "Debug hides the secret"
        );
        let header = format!("bEaReR {}", t.expose());
        assert_eq!(Token::from_header(header.as_bytes()), Ok(t));
    }

    #[test]
    fn malformed_tokens_and_names_are_refused() {
        let secret = "ab".repeat(32);
        for bad in [
            String::new(),
            "rkv.".into(),
            format!("rkv..{secret}"),
            format!("xyz.a.{secret}"),
            format!("rkv.a.{}", &secret[1..]),
            format!("rkv.a.{secret}0"),
            format!("rkv.a b.{secret}"),
            format!("rkv.a.{}", "zz".repeat(32)),
            format!("rkv.{}.{secret}", "n".repeat(MAX_NAME_BYTES + 1)),
            format!("rkv.é.{secret}"),
        ] {
            assert_eq!(Token::parse(&bad), Err(TokenError::Malformed), "{bad:?}");
        }
        assert!(Token::parse(&format!("rkv.{}.{secret}", "n".repeat(MAX_NAME_BYTES))).is_ok());
        for header in [
            format!("Basic rkv.a.{secret}"),
            format!("Bearer{secret}"),
            "Bearer".into(),
        ] {
            assert!(Token::from_header(header.as_bytes()).is_err(), "{header:?}");
        }
        assert!(Token::from_header(b"Bearer \xff").is_err());
        assert!(check_name("a.b").is_err());
        assert_eq!("write".parse::<Role>(), Ok(Role::Write));
        assert!("root".parse::<Role>().is_err());
        let h = Token::generate("x").unwrap().hash();
        assert_eq!(TokenHash::from_hex(&format!(" {}\n", h.to_hex())), Some(h));
        assert_eq!(TokenHash::from_hex("00"), None);
    }
}
