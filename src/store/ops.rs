//! The operations of the template log and their encodings.
//!
//! A frame's plaintext starts with a tag: 1 one enrolment (JSON metadata +
//! f32 vector, written before batching), 2 a JSON operation (deletion; one
//! consent before batching), 3 up to [`OPS_PER_FRAME`] enrolments (binary),
//! 4 up to [`OPS_PER_FRAME`] consent records (binary), 5 an import: consent
//! records and the enrolments that use them in one frame (binary; one seal,
//! so a crash or a full disk keeps both or neither). Every reader is
//! bounds-checked: a damaged or hostile frame is an error, never a panic.

use serde::{Deserialize, Serialize};

use super::TemplateMeta;
use crate::compliance::{ConsentRecord, Purpose, SubjectId};

/// One operation in the template log.
///
/// Frames written since format 3 hold enrolments and consents in batches
/// (one frame per up to [`OPS_PER_FRAME`]): one seal, one checksum and one
/// frame header per batch instead of per template, and enrolments in a
/// compact binary layout (the vector as raw little-endian f32, the metadata
/// as length-prefixed fields) instead of JSON. Older frames (one JSON
/// enrolment or consent per frame) are still read.
#[derive(Clone, Debug)]
pub(crate) enum Op {
    Enrol {
        meta: TemplateMeta,
        vector: Vec<f32>,
    },
    /// Several enrolments in one frame (binary).
    EnrolMany(Vec<(TemplateMeta, Vec<f32>)>),
    Delete {
        templates: Vec<u64>,
    },
    Consent(ConsentRecord),
    /// Several consent records in one frame.
    Consents(Vec<ConsentRecord>),
    /// Consent records and the enrolments that use them, in one frame.
    Import(Vec<ConsentRecord>, Vec<(TemplateMeta, Vec<f32>)>),
}

/// Enrolments or consents per batched frame.
pub(crate) const OPS_PER_FRAME: usize = 1024;

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum JsonOp {
    Delete { templates: Vec<u64> },
    Consent { record: ConsentRecord },
}

const TAG_ENROL: u8 = 1;
const TAG_JSON: u8 = 2;
const TAG_ENROL_MANY: u8 = 3;
const TAG_CONSENTS: u8 = 4;
const TAG_IMPORT: u8 = 5;

/// Encode consents and the enrolments that use them as one frame:
/// `5 | u32 n | n bytes: a consents frame without its tag | an enrolments frame without its tag`.
/// Replay applies the consents first.
pub(crate) fn encode_import(consents: &[ConsentRecord], items: &[(&TemplateMeta, &[f32])]) -> Vec<u8> {
    let c = encode_consents(consents);
    let e = encode_enrolments(items);
    let mut out = Vec::with_capacity(5 + c.len() + e.len());
    out.push(TAG_IMPORT);
    put_count(&mut out, c.len() - 1);
    out.extend_from_slice(&c[1..]);
    out.extend_from_slice(&e[1..]);
    out
}

/// An import frame's two bodies: its consents and its enrolments (each without a tag).
pub(crate) type ImportParts<'a> = std::result::Result<(&'a [u8], &'a [u8]), String>;

/// The two bodies of an import frame (after its tag), if `b` is one.
pub(crate) fn import_frame(b: &[u8]) -> Option<ImportParts<'_>> {
    match b.split_first() {
        Some((&TAG_IMPORT, rest)) => {
            let mut r = Fields { b: rest, at: 0 };
            Some(r.u32().and_then(|n| r.take(n as usize)).map(|c| (c, &rest[r.at..])))
        }
        _ => None,
    }
}

/// The consent records of an import frame's consents body.
pub(crate) fn import_consents(body: &[u8]) -> std::result::Result<Vec<ConsentRecord>, String> {
    decode_consents(body)
}

/// Encode consent records as one binary frame (`str`: u32 length + UTF-8):
/// `4 | u32 count | per record: str id | str subject | u8 basis (0 separate, 1 written, 2 legal + str) |
/// u32 n purposes | str each | i64 given | str collected by | u8 age (0 under 14, 1 14-17, 2 adult) |
/// u8 guardian (0, or 1 + str guardian + str relationship) | u8 withdrawn (0, or 1 + i64)`.
fn encode_consents(records: &[ConsentRecord]) -> Vec<u8> {
    use crate::compliance::{AgeBracket, ConsentBasis};
    let mut out = Vec::with_capacity(5 + records.len() * 96);
    out.push(TAG_CONSENTS);
    out.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for c in records {
        put_str32(&mut out, &c.consent_id);
        put_str32(&mut out, c.subject.as_str());
        match &c.basis {
            ConsentBasis::SeparateConsent => out.push(0),
            ConsentBasis::WrittenConsent => out.push(1),
            ConsentBasis::LegalBasis(b) => {
                out.push(2);
                put_str32(&mut out, b);
            }
        }
        put_count(&mut out, c.purposes.len());
        for p in &c.purposes {
            put_str32(&mut out, p.as_str());
        }
        out.extend_from_slice(&c.given_at_ms.to_le_bytes());
        put_str32(&mut out, &c.collected_by);
        out.push(match c.age_bracket {
            AgeBracket::Under14 => 0,
            AgeBracket::Minor14To17 => 1,
            AgeBracket::Adult => 2,
        });
        match &c.guardian {
            None => out.push(0),
            Some(g) => {
                out.push(1);
                put_str32(&mut out, &g.guardian);
                put_str32(&mut out, &g.relationship);
            }
        }
        match c.withdrawn_at_ms {
            None => out.push(0),
            Some(t) => {
                out.push(1);
                out.extend_from_slice(&t.to_le_bytes());
            }
        }
    }
    out
}

fn decode_consents(rest: &[u8]) -> std::result::Result<Vec<ConsentRecord>, String> {
    use crate::compliance::{AgeBracket, ConsentBasis, GuardianConsent};
    let mut r = Fields { b: rest, at: 0 };
    let n = r.u32()? as usize;
    let mut out = Vec::with_capacity(n.min(rest.len() / 16));
    for _ in 0..n {
        let consent_id = r.str32()?.to_string();
        let subject = SubjectId::new(r.str32()?).map_err(|e| format!("consent subject: {e}"))?;
        let basis = match r.u8()? {
            0 => ConsentBasis::SeparateConsent,
            1 => ConsentBasis::WrittenConsent,
            2 => ConsentBasis::LegalBasis(r.str32()?.to_string()),
            b => return Err(format!("unknown consent basis {b}")),
        };
        let np = r.u32()? as usize;
        let mut purposes = Vec::with_capacity(np.min(64));
        for _ in 0..np {
            purposes.push(Purpose::new(r.str32()?).map_err(|e| format!("consent purpose: {e}"))?);
        }
        let given_at_ms = r.u64()? as i64;
        let collected_by = r.str32()?.to_string();
        let age_bracket = match r.u8()? {
            0 => AgeBracket::Under14,
            1 => AgeBracket::Minor14To17,
            2 => AgeBracket::Adult,
            a => return Err(format!("unknown age bracket {a}")),
        };
        let guardian = match r.u8()? {
            0 => None,
            1 => Some(GuardianConsent { guardian: r.str32()?.to_string(), relationship: r.str32()?.to_string() }),
            g => return Err(format!("bad guardian flag {g}")),
        };
        let withdrawn_at_ms = match r.u8()? {
            0 => None,
            1 => Some(r.u64()? as i64),
            w => return Err(format!("bad withdrawal flag {w}")),
        };
        out.push(ConsentRecord { consent_id, subject, basis, purposes, given_at_ms, collected_by, age_bracket, guardian, withdrawn_at_ms });
    }
    if r.at != rest.len() {
        return Err("trailing bytes after the consents".into());
    }
    Ok(out)
}

/// Little-endian field reader over a frame (every read bounds-checked).
struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let s = self.b.get(self.at..self.at.checked_add(n).ok_or("length overflow")?).ok_or("short enrolment frame")?;
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    fn str32(&mut self) -> std::result::Result<&'a str, String> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| "field is not UTF-8".to_string())
    }
}

fn put_str32(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

/// Encode enrolments as one binary frame:
/// `3 | u32 count | u32 dim | per enrolment: u64 template | i64 enrolled | i64 expires | str subject | str consent | str model | u32 n purposes | str each | dim x f32`
/// (`str`: u32 length + UTF-8 bytes).
pub(crate) fn encode_enrolments(items: &[(&TemplateMeta, &[f32])]) -> Vec<u8> {
    let dim = items.first().map_or(0, |(_, v)| v.len());
    let mut out = Vec::with_capacity(9 + items.len() * (64 + dim * 4));
    out.push(TAG_ENROL_MANY);
    out.extend_from_slice(&(items.len() as u32).to_le_bytes());
    out.extend_from_slice(&(dim as u32).to_le_bytes());
    for (m, v) in items {
        out.extend_from_slice(&m.template.to_le_bytes());
        out.extend_from_slice(&m.enrolled_at_ms.to_le_bytes());
        out.extend_from_slice(&m.expires_at_ms.to_le_bytes());
        put_str32(&mut out, m.subject.as_str());
        put_str32(&mut out, &m.consent_id);
        put_str32(&mut out, &m.model_id);
        put_count(&mut out, m.purposes.len());
        for p in &m.purposes {
            put_str32(&mut out, p.as_str());
        }
        debug_assert_eq!(v.len(), dim);
        for x in v.iter() {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// One enrolment's metadata as it lies in a batched frame (borrowed, not
/// yet validated): replaying millions of them allocates only for what the
/// state keeps.
pub(crate) struct MetaRef<'a> {
    pub template: u64,
    pub enrolled_at_ms: i64,
    pub expires_at_ms: i64,
    pub subject: &'a str,
    pub consent_id: &'a str,
    pub model_id: &'a str,
    /// `u32 count | str each`.
    pub purposes_raw: &'a [u8],
}

impl MetaRef<'_> {
    /// The purposes, validated.
    pub(crate) fn purposes(&self) -> std::result::Result<Vec<Purpose>, String> {
        let mut r = Fields { b: self.purposes_raw, at: 0 };
        let n = r.u32()? as usize;
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            out.push(Purpose::new(r.str32()?).map_err(|e| format!("purpose: {e}"))?);
        }
        Ok(out)
    }

    /// Owned and validated.
    pub(crate) fn to_meta(&self) -> std::result::Result<TemplateMeta, String> {
        Ok(TemplateMeta {
            template: self.template,
            subject: SubjectId::new(self.subject).map_err(|e| format!("subject: {e}"))?,
            purposes: self.purposes()?,
            enrolled_at_ms: self.enrolled_at_ms,
            expires_at_ms: self.expires_at_ms,
            consent_id: self.consent_id.to_string(),
            model_id: self.model_id.to_string(),
        })
    }
}

/// Walk the enrolments of a batched frame body (after its tag): `f` gets
/// each one's metadata and its vector's raw bytes (little-endian f32), so a
/// caller that already holds the vectors (a snapshot) need not convert them.
pub(crate) fn visit_enrolments(
    rest: &[u8],
    mut f: impl FnMut(&MetaRef<'_>, &[u8]) -> std::result::Result<(), String>,
) -> std::result::Result<(), String> {
    let mut r = Fields { b: rest, at: 0 };
    let count = r.u32()? as usize;
    let dim = r.u32()? as usize;
    if dim == 0 || dim > 65_536 {
        return Err(format!("enrolment dimension {dim} out of range"));
    }
    for _ in 0..count {
        let template = r.u64()?;
        let enrolled_at_ms = r.u64()? as i64;
        let expires_at_ms = r.u64()? as i64;
        let subject = r.str32()?;
        let consent_id = r.str32()?;
        let model_id = r.str32()?;
        let p0 = r.at;
        let np = r.u32()? as usize;
        for _ in 0..np {
            r.str32()?;
        }
        let purposes_raw = &rest[p0..r.at];
        let v = r.take(dim * 4)?;
        f(&MetaRef { template, enrolled_at_ms, expires_at_ms, subject, consent_id, model_id, purposes_raw }, v)?;
    }
    if r.at != rest.len() {
        return Err("trailing bytes after the enrolments".into());
    }
    Ok(())
}

/// The body of a batched enrolment frame (after its tag), if `b` is one.
pub(crate) fn enrolments_frame(b: &[u8]) -> Option<&[u8]> {
    match b.split_first() {
        Some((&TAG_ENROL_MANY, rest)) => Some(rest),
        _ => None,
    }
}

/// Little-endian f32 bytes to floats.
/// Every enrolment of a batched frame's body, owned (metadata and vector).
fn owned_enrolments(body: &[u8]) -> std::result::Result<Vec<(TemplateMeta, Vec<f32>)>, String> {
    let mut items = Vec::new();
    visit_enrolments(body, |m, v| {
        let mut x = Vec::with_capacity(v.len() / 4);
        f32s_from_le(v, &mut x);
        items.push((m.to_meta()?, x));
        Ok(())
    })?;
    Ok(items)
}

pub(crate) fn f32s_from_le(b: &[u8], out: &mut Vec<f32>) {
    let n = b.len() / 4;
    out.reserve(n);
    #[cfg(target_endian = "little")]
    {
        let start = out.len();
        // SAFETY: room for `n` more f32s was reserved; every bit pattern is a
        // valid f32 and the stored layout (little-endian) is the native one.
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), out.as_mut_ptr().add(start) as *mut u8, n * 4);
            out.set_len(start + n);
        }
    }
    #[cfg(not(target_endian = "little"))]
    out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
}

impl Op {
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Op::Enrol { meta, vector } => {
                let m = serde_json::to_vec(meta).unwrap_or_default();
                let mut out = Vec::with_capacity(1 + 4 + m.len() + 4 + vector.len() * 4);
                out.push(TAG_ENROL);
                out.extend_from_slice(&(m.len() as u32).to_le_bytes());
                out.extend_from_slice(&m);
                out.extend_from_slice(&(vector.len() as u32).to_le_bytes());
                for x in vector {
                    out.extend_from_slice(&x.to_le_bytes());
                }
                out
            }
            Op::EnrolMany(items) => encode_enrolments(&items.iter().map(|(m, v)| (m, v.as_slice())).collect::<Vec<_>>()),
            Op::Delete { templates } => json_frame(&JsonOp::Delete { templates: templates.clone() }),
            Op::Consent(record) => json_frame(&JsonOp::Consent { record: record.clone() }),
            Op::Consents(records) => encode_consents(records),
            Op::Import(consents, items) => encode_import(consents, &items.iter().map(|(m, v)| (m, v.as_slice())).collect::<Vec<_>>()),
        }
    }

    pub(crate) fn decode(b: &[u8]) -> std::result::Result<Op, String> {
        let (&tag, rest) = b.split_first().ok_or("empty frame")?;
        match tag {
            TAG_ENROL => {
                let rd = |s: &[u8], at: usize| -> std::result::Result<u32, String> {
                    s.get(at..at + 4).map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]])).ok_or_else(|| "short enrol frame".to_string())
                };
                let ml = rd(rest, 0)? as usize;
                let meta_bytes = rest.get(4..4 + ml).ok_or("short enrol meta")?;
                let meta: TemplateMeta = serde_json::from_slice(meta_bytes).map_err(|e| format!("enrol meta: {e}"))?;
                let dim = rd(rest, 4 + ml)? as usize;
                let vb = rest.get(8 + ml..8 + ml + dim * 4).ok_or("short enrol vector")?;
                let vector = vb.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Ok(Op::Enrol { meta, vector })
            }
            TAG_ENROL_MANY => Ok(Op::EnrolMany(owned_enrolments(rest)?)),
            TAG_CONSENTS => Ok(Op::Consents(decode_consents(rest)?)),
            TAG_IMPORT => {
                let (c, e) = import_frame(b).ok_or("not an import frame")??;
                Ok(Op::Import(decode_consents(c)?, owned_enrolments(e)?))
            }
            TAG_JSON => match serde_json::from_slice::<JsonOp>(rest).map_err(|e| format!("op: {e}"))? {
                JsonOp::Delete { templates } => Ok(Op::Delete { templates }),
                JsonOp::Consent { record } => Ok(Op::Consent(record)),
            },
            t => Err(format!("unknown op tag {t}")),
        }
    }
}

fn json_frame(op: &JsonOp) -> Vec<u8> {
    let mut out = vec![TAG_JSON];
    out.extend_from_slice(&serde_json::to_vec(op).unwrap_or_default());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip() {
        let meta = TemplateMeta {
            template: 7,
            subject: SubjectId::new("s").unwrap(),
            purposes: vec![Purpose::new("a").unwrap()],
            enrolled_at_ms: 1,
            expires_at_ms: 2,
            consent_id: "c".into(),
            model_id: "m".into(),
        };
        let op = Op::Enrol { meta: meta.clone(), vector: vec![0.5, -0.25] };
        match Op::decode(&op.encode()).unwrap() {
            Op::Enrol { meta: m, vector } => {
                assert_eq!(m, meta);
                assert_eq!(vector, vec![0.5, -0.25]);
            }
            _ => panic!("wrong op"),
        }
        let two = Op::EnrolMany(vec![(meta.clone(), vec![0.5, -0.25]), (TemplateMeta { template: 8, ..meta.clone() }, vec![1.0, 0.0])]);
        match Op::decode(&two.encode()).unwrap() {
            Op::EnrolMany(items) => {
                assert_eq!(items.len(), 2);
                assert_eq!(items[0], (meta.clone(), vec![0.5, -0.25]));
                assert_eq!((items[1].0.template, items[1].1.clone()), (8, vec![1.0, 0.0]));
            }
            _ => panic!("wrong op"),
        }
        let mut c = ConsentRecord::new(
            "c1",
            "s",
            crate::compliance::ConsentBasis::LegalBasis("art. 13".into()),
            vec![Purpose::new("a").unwrap()],
            "op",
            crate::compliance::AgeBracket::Under14,
        );
        c.guardian = Some(crate::compliance::GuardianConsent { guardian: "g".into(), relationship: "parent".into() });
        let plain = ConsentRecord { consent_id: "c2".into(), guardian: None, withdrawn_at_ms: Some(5), ..c.clone() };
        let cs = Op::Consents(vec![c.clone(), plain.clone()]);
        match Op::decode(&cs.encode()).unwrap() {
            Op::Consents(got) => assert_eq!(got, vec![c.clone(), plain]),
            _ => panic!("wrong op"),
        }
        let bytes = cs.encode();
        for cut in 0..bytes.len() {
            assert!(Op::decode(&bytes[..cut]).is_err(), "consents cut at {cut}");
        }
        let imp = Op::Import(vec![c.clone()], vec![(meta.clone(), vec![0.5, -0.25])]);
        match Op::decode(&imp.encode()).unwrap() {
            Op::Import(cs, items) => {
                assert_eq!(cs, vec![c.clone()]);
                assert_eq!(items, vec![(meta.clone(), vec![0.5, -0.25])]);
            }
            _ => panic!("wrong op"),
        }
        let bytes = imp.encode();
        for cut in 0..bytes.len() {
            assert!(Op::decode(&bytes[..cut]).is_err(), "import cut at {cut}");
        }
        // Every truncation of a batched frame is an error, never a panic.
        let bytes = two.encode();
        for cut in 0..bytes.len() {
            assert!(Op::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(Op::decode(&[]).is_err());
        assert!(Op::decode(&[1, 200, 0, 0, 0]).is_err());
        assert!(Op::decode(&[9]).is_err());
    }
}
