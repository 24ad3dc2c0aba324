//! Keys and authenticated encryption of everything the gallery writes.
//!
//! One 32-byte master key (from a file or an environment variable, never
//! written into the store) derives a store key (XChaCha20-Poly1305) and an
//! audit key (HMAC-SHA256). A wrong key is detected by the manifest's key
//! check before anything is read or written.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::{Error, Result};

/// Environment variable read by [`MasterKey::from_env`].
pub const KEY_ENV: &str = "FACEMATCH_KEY";

/// The operator's 32-byte master key. Never printed, zeroed on drop.
///
/// ```
/// use facematch::store::MasterKey;
/// let k = MasterKey::generate();
/// let again = MasterKey::from_hex(&k.to_hex()).unwrap();
/// assert_eq!(k.fingerprint(), again.fingerprint());
/// ```
#[derive(Clone)]
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.fingerprint())
    }
}

impl MasterKey {
    /// A new random key from the OS generator.
    pub fn generate() -> Self {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut k[..]);
        MasterKey(k)
    }
    /// From raw bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(b))
    }
    /// From 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<Self> {
        let s = s.trim();
        let v = Zeroizing::new(hex::decode(s).map_err(|_| Error::Key("key is not valid hex".into()))?);
        if v.len() != 32 {
            return Err(Error::Key(format!("key must be 32 bytes (64 hex digits), got {} bytes", v.len())));
        }
        let mut k = Zeroizing::new([0u8; 32]);
        k.copy_from_slice(&v);
        Ok(MasterKey(k))
    }
    /// From a key file: 64 hex digits, or exactly 32 raw bytes.
    pub fn from_file(path: &Path) -> Result<Self> {
        // A key file is 32 raw bytes or 64 hex digits (and whitespace): refuse
        // anything larger, and FIFOs or devices, before reading.
        let bytes = Zeroizing::new(crate::fs::read_bounded(path, 256).map_err(|e| match e {
            Error::Io { source, .. } => Error::Key(format!("cannot read key file {}: {source}", path.display())),
            e => Error::Key(format!("key file: {e}")),
        })?);
        if bytes.len() == 32 {
            let mut k = Zeroizing::new([0u8; 32]);
            k.copy_from_slice(&bytes);
            return Ok(MasterKey(k));
        }
        let s =
            std::str::from_utf8(&bytes).map_err(|_| Error::Key(format!("key file {} is neither 32 raw bytes nor hex", path.display())))?;
        Self::from_hex(s)
    }
    /// From the environment variable [`KEY_ENV`] (hex).
    pub fn from_env() -> Result<Self> {
        let v = Zeroizing::new(std::env::var(KEY_ENV).map_err(|_| Error::Key(format!("no key: set {KEY_ENV} or pass a key file")))?);
        Self::from_hex(&v)
    }
    /// Hex form (for writing a new key file; handle with care).
    pub fn to_hex(&self) -> String {
        hex::encode(&self.0[..])
    }
    /// A short non-secret fingerprint (first 8 bytes of HMAC(key, "fingerprint")).
    pub fn fingerprint(&self) -> String {
        hex::encode(&self.derive(b"facematch/fingerprint/v1")[..8])
    }
    pub(crate) fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0[..]).expect("HMAC accepts any key length");
        mac.update(label);
        let mut out = Zeroizing::new([0u8; 32]);
        out.copy_from_slice(&mac.finalize().into_bytes());
        out
    }
    /// Hex HMAC-SHA256 of `bytes` under the key derived for `label`: what
    /// authenticates the manifest and anchors.
    pub(crate) fn mac_hex(&self, label: &[u8], bytes: &[u8]) -> String {
        let k = self.derive(label);
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&k[..]).expect("HMAC accepts any key length");
        mac.update(bytes);
        hex::encode(mac.finalize().into_bytes())
    }
    /// The store cipher.
    pub(crate) fn store_cipher(&self) -> Cipher {
        let k = self.derive(b"facematch/store/v1");
        Cipher { aead: XChaCha20Poly1305::new_from_slice(&k[..]).expect("32-byte key") }
    }
    /// The audit HMAC key bytes.
    pub fn audit_key_bytes(&self) -> [u8; 32] {
        *self.derive(b"facematch/audit/v1")
    }
}

/// Nonce length of XChaCha20-Poly1305.
pub(crate) const NONCE_LEN: usize = 24;
/// Authentication tag length.
pub(crate) const TAG_LEN: usize = 16;

/// Authenticated encryption with a random 192-bit nonce per message.
#[derive(Clone)]
pub(crate) struct Cipher {
    aead: XChaCha20Poly1305,
}

impl Cipher {
    /// nonce || ciphertext || tag.
    pub(crate) fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let ct = self
            .aead
            .encrypt(XNonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .expect("encryption cannot fail for in-memory buffers");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }
    /// Decrypt and authenticate `nonce || ciphertext || tag`; `None` if it fails.
    pub(crate) fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.aead.decrypt(XNonce::from_slice(nonce), Payload { msg: ct, aad }).ok().map(Zeroizing::new)
    }
}

/// Constant-time comparison of two byte strings of public length (MACs).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = MasterKey::generate();
        let c = k.store_cipher();
        let s = c.seal(b"aad", b"hello");
        assert_eq!(&c.open(b"aad", &s).unwrap()[..], b"hello");
        assert!(c.open(b"other", &s).is_none());
        let mut t = s.clone();
        t[30] ^= 1;
        assert!(c.open(b"aad", &t).is_none());
        assert!(MasterKey::generate().store_cipher().open(b"aad", &s).is_none());
    }

    #[test]
    fn key_parsing() {
        assert!(MasterKey::from_hex("zz").is_err());
        assert!(MasterKey::from_hex("00").is_err());
        assert!(MasterKey::from_hex(&"ab".repeat(32)).is_ok());
        assert!(!format!("{:?}", MasterKey::from_hex(&"ab".repeat(32)).unwrap()).contains("abab"));
    }
}
