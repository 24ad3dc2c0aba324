//! On-disk format of the audit log: sealed JSON lines, hashes, HMACs, `HEAD`
//! and `RETIRED`.
//!
//! Every line is a JSON object whose last field authenticates the exact bytes
//! before it: a line is `body[..len-1] + ,"<field>":"<64 hex>"}` where `body`
//! is the canonical JSON object without that field. Hashing raw bytes (not a
//! re-serialisation) means any byte change is caught, whatever JSON allows.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::AuditKey;
use crate::{Error, Result};

/// On-disk format version written into headers and `HEAD`.
pub(crate) const FORMAT: u32 = 1;

pub(crate) const HEAD_FILE: &str = "HEAD";
pub(crate) const RETIRED_FILE: &str = "RETIRED";
pub(crate) const LOCK_FILE: &str = "LOCK";

const RECORD_DOMAIN: &[u8] = b"fm-audit-record-v1\0";
pub(crate) const HEADER_DOMAIN: &[u8] = b"fm-audit-header-v1\0";
pub(crate) const CKPT_DOMAIN: &[u8] = b"fm-audit-checkpoint-v1\0";
pub(crate) const HEAD_DOMAIN: &[u8] = b"fm-audit-head-v1\0";
pub(crate) const RETIRED_DOMAIN: &[u8] = b"fm-audit-retired-v1\0";

/// The fixed `prev` of record 0 and `prev_hash` of segment 0 (hex SHA-256 of
/// a constant label), so the start of the chain is pinned too.
///
/// ```
/// assert_eq!(facematch::audit::genesis_hash().len(), 64);
/// ```
pub fn genesis_hash() -> String {
    hex::encode(Sha256::digest(b"facematch audit log genesis v1"))
}

/// A hex string of 64 zeros (no previous MAC).
pub(crate) fn zero_mac() -> String {
    "0".repeat(64)
}

/// File name of segment `i`.
pub(crate) fn segment_name(i: u32) -> String {
    format!("seg-{i:06}.log")
}

/// Segment index from a file name, if it is one.
pub(crate) fn parse_segment_name(name: &str) -> Option<u32> {
    let digits = name.strip_prefix("seg-")?.strip_suffix(".log")?;
    if digits.len() < 6 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// SHA-256 of a record's canonical bytes.
pub(crate) fn record_hash(body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(body);
    h.finalize().into()
}

/// HMAC-SHA256 under `key` of `domain || body`.
pub(crate) fn mac(key: &AuditKey, domain: &[u8], body: &[u8]) -> [u8; 32] {
    // HMAC accepts keys of any length; new_from_slice cannot fail here.
    let mut m = match <Hmac<Sha256> as Mac>::new_from_slice(key.bytes()) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    m.update(domain);
    m.update(body);
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of a MAC with a hex string.
pub(crate) fn mac_matches(expected: &[u8; 32], got_hex: &str) -> bool {
    let mut got = [0u8; 32];
    if hex::decode_to_slice(got_hex, &mut got).is_err() {
        return false;
    }
    let mut diff = 0u8;
    for (a, b) in expected.iter().zip(got.iter()) {
        diff |= a ^ b;
    }
    diff == 0
}

/// Append `body` sealed with `field` = `auth` (hex) and a newline to `out`.
/// `body` must be a JSON object (ends with `}`), with at least one field.
pub(crate) fn seal_into(out: &mut Vec<u8>, body: &[u8], field: &str, auth: &[u8; 32]) {
    debug_assert!(body.ends_with(b"}"));
    out.extend_from_slice(&body[..body.len() - 1]);
    out.extend_from_slice(b",\"");
    out.extend_from_slice(field.as_bytes());
    out.extend_from_slice(b"\":\"");
    let mut hexbuf = [0u8; 64];
    // hex::encode_to_slice only fails on a wrong output length.
    let _ = hex::encode_to_slice(auth, &mut hexbuf);
    out.extend_from_slice(&hexbuf);
    out.extend_from_slice(b"\"}\n");
}

/// Split a sealed line (without its newline) into the canonical body's
/// prefix (the body minus its final `}`) and the hex authenticator.
pub(crate) fn unseal<'a>(line: &'a [u8], field: &str) -> Option<(&'a [u8], &'a str)> {
    let suffix_len = 2 + field.len() + 3 + 64 + 2;
    if line.len() < suffix_len + 2 {
        return None;
    }
    let (prefix, suffix) = line.split_at(line.len() - suffix_len);
    let expect_start = [b",\"", field.as_bytes(), b"\":\""].concat();
    if !suffix.starts_with(&expect_start) || !suffix.ends_with(b"\"}") {
        return None;
    }
    let hex_part = &suffix[expect_start.len()..expect_start.len() + 64];
    if !hex_part.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    // ASCII checked above.
    let hex_str = std::str::from_utf8(hex_part).ok()?;
    Some((prefix, hex_str))
}

/// Hash of a record line's canonical bytes given the prefix from [`unseal`].
pub(crate) fn record_hash_of_prefix(prefix: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(RECORD_DOMAIN);
    h.update(prefix);
    h.update(b"}");
    h.finalize().into()
}

/// MAC of a sealed control line's canonical bytes given its prefix.
pub(crate) fn mac_of_prefix(key: &AuditKey, domain: &[u8], prefix: &[u8]) -> [u8; 32] {
    let mut body = Vec::with_capacity(prefix.len() + 1);
    body.extend_from_slice(prefix);
    body.push(b'}');
    mac(key, domain, &body)
}

/// First line of every segment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Header {
    #[serde(rename = "type")]
    pub kind: String,
    pub format: u32,
    pub segment: u32,
    pub first_seq: u64,
    pub prev_hash: String,
    pub prev_mac: String,
    pub key_id: String,
    pub created_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// A checkpoint: HMAC over the last record's seq and hash, chained to the
/// previous checkpoint's (or the segment header's) MAC so that removing a
/// checkpoint is detected too.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Checkpoint {
    #[serde(rename = "type")]
    pub kind: String,
    pub segment: u32,
    pub seq: u64,
    pub hash: String,
    pub prev_mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Contents of `HEAD`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Head {
    pub format: u32,
    pub key_id: String,
    /// Segment holding the last record (the current segment when empty).
    pub segment: u32,
    /// Records committed so far (last seq + 1).
    pub records: u64,
    /// Hash of record `records - 1`, or the genesis hash.
    pub last_hash: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// One line of `RETIRED`: a segment deleted by retention.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Retired {
    #[serde(rename = "type")]
    pub kind: String,
    pub segment: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: String,
    pub closing_mac: String,
    pub newest_ms: i64,
    pub retired_ms: i64,
    pub key_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

/// Serialize `v` (with its auth field unset) and seal it with an HMAC.
pub(crate) fn seal_control<T: Serialize>(key: &AuditKey, domain: &[u8], v: &T) -> Result<(Vec<u8>, [u8; 32])> {
    let body = serde_json::to_vec(v).map_err(|e| Error::Audit(format!("serialising audit control line: {e}")))?;
    let m = mac(key, domain, &body);
    let mut out = Vec::with_capacity(body.len() + 80);
    seal_into(&mut out, &body, "mac", &m);
    Ok((out, m))
}

/// Parse a sealed control line; returns the value and the prefix for MAC checks.
pub(crate) fn parse_control<T: serde::de::DeserializeOwned>(line: &[u8]) -> Option<(T, &[u8], &str)> {
    let (prefix, auth) = unseal(line, "mac")?;
    let v: T = serde_json::from_slice(line).ok()?;
    Some((v, prefix, auth))
}

/// Checkpoint line for (segment, seq, hash) chained to `prev_mac` under
/// `key`; returns line and MAC.
pub(crate) fn checkpoint_line(key: &AuditKey, segment: u32, seq: u64, hash_hex: &str, prev_mac: &str) -> Result<(Vec<u8>, [u8; 32])> {
    let c = Checkpoint { kind: "checkpoint".into(), segment, seq, hash: hash_hex.to_string(), prev_mac: prev_mac.to_string(), mac: None };
    seal_control(key, CKPT_DOMAIN, &c)
}

/// Length of a segment's data: the file without its trailing NUL bytes,
/// which are preallocated free space (see `space`). No line of the log
/// holds a NUL (JSON escapes control characters), so a segment is its lines
/// followed by nothing but zeros; a NUL before the last non-zero byte is
/// the remains of a commit that never finished (readers treat it as a torn
/// tail).
pub(crate) fn data_len(file: &mut File) -> std::io::Result<u64> {
    let mut end = file.metadata()?.len();
    let mut buf = vec![0u8; 64 * 1024];
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let part = &mut buf[..(end - start) as usize];
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(part)?;
        match part.iter().rposition(|&b| b != 0) {
            Some(i) => return Ok(start + i as u64 + 1),
            None => end = start,
        }
    }
    Ok(0)
}

/// fsync a directory so renames and new files in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    crate::fs::Dir::open(dir)?.sync()
}

/// Replace `dir/name` atomically with `bytes`: write a temp file, fsync it,
/// rename it over, fsync the directory (syncs skipped when `sync` is false).
/// A link or hard-linked file planted at `name.tmp` is unlinked, never followed.
pub(crate) fn atomic_write(dir: &Path, name: &str, bytes: &[u8], sync: bool) -> Result<()> {
    crate::fs::Dir::open(dir)?.write_atomic(name, bytes, sync)
}

/// Serialized, sealed `HEAD` contents.
pub(crate) fn head_bytes(key: &AuditKey, segment: u32, records: u64, last_hash: &str) -> Result<Vec<u8>> {
    let h = Head { format: FORMAT, key_id: key.id(), segment, records, last_hash: last_hash.to_string(), mac: None };
    Ok(seal_control(key, HEAD_DOMAIN, &h)?.0)
}

/// Write `HEAD` atomically.
pub(crate) fn write_head(dir: &Path, key: &AuditKey, segment: u32, records: u64, last_hash: &str, sync: bool) -> Result<()> {
    let b = head_bytes(key, segment, records, last_hash)?;
    atomic_write(dir, HEAD_FILE, &b, sync)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_unseal_roundtrip() {
        let mut out = Vec::new();
        let body = br#"{"a":1,"b":"x"}"#;
        let h = record_hash(body);
        seal_into(&mut out, body, "hash", &h);
        assert!(out.ends_with(b"\"}\n"));
        let line = &out[..out.len() - 1];
        let v: serde_json::Value = serde_json::from_slice(line).unwrap();
        assert_eq!(v["hash"], hex::encode(h));
        let (prefix, auth) = unseal(line, "hash").unwrap();
        assert_eq!(record_hash_of_prefix(prefix), h);
        assert_eq!(auth, hex::encode(h));
        assert!(unseal(line, "mac").is_none());
        // Upper-case hex is not canonical.
        let upper = String::from_utf8(line.to_vec()).unwrap().to_uppercase();
        assert!(unseal(upper.as_bytes(), "hash").is_none() || upper.contains("HASH"));
    }

    #[test]
    fn segment_names() {
        assert_eq!(segment_name(7), "seg-000007.log");
        assert_eq!(parse_segment_name("seg-000007.log"), Some(7));
        assert_eq!(parse_segment_name("seg-1234567.log"), Some(1_234_567));
        assert_eq!(parse_segment_name("seg-7.log"), None);
        assert_eq!(parse_segment_name("seg-000007.log.tmp"), None);
    }

    #[test]
    fn mac_compare() {
        let k = AuditKey::from_bytes([3; 32]);
        let m = mac(&k, CKPT_DOMAIN, b"x");
        assert!(mac_matches(&m, &hex::encode(m)));
        assert!(!mac_matches(&m, &zero_mac()));
        assert!(!mac_matches(&m, "zz"));
        assert_ne!(m, mac(&AuditKey::from_bytes([4; 32]), CKPT_DOMAIN, b"x"));
        assert_ne!(m, mac(&k, HEAD_DOMAIN, b"x"));
    }
}
