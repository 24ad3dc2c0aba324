//! The in-memory gallery: template slots, subjects, consents, per-purpose counts.
//!
//! Per-template metadata is one fixed-size [`Slot`] (no heap object per
//! template): the strings a template refers to (its subject, consent, purpose
//! set and model) are interned once and referred to by index. Maps hash with
//! foldhash (randomly seeded, so crafted ids cannot force collisions).

use super::*;

/// A `HashMap` with a fast, randomly seeded hasher.
pub(super) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub(super) template: u64,
    pub(super) subject: u32,
    pub(super) mask: u64,
    /// Enrolment time: the template serves purpose `p` while
    /// `enrolled_at_ms > now - retention(p)`.
    pub(super) enrolled_at_ms: i64,
    /// When its last purpose expires (then it is purged).
    pub(super) expires_at_ms: i64,
    /// The expiry recorded at enrolment ([`TemplateMeta::expires_at_ms`]).
    pub(super) recorded_expiry_ms: i64,
    /// Index into [`State::consent_ids`].
    pub(super) consent: u32,
    /// Index into [`State::purpose_sets`].
    pub(super) purposes: u32,
    /// Index into [`State::models`].
    pub(super) model: u32,
}

/// Distinct strings (or lists) by index.
#[derive(Default)]
pub(super) struct Interned<T: std::hash::Hash + Eq + Clone> {
    pub(super) items: Vec<T>,
    index: FastMap<T, u32>,
}

impl<T: std::hash::Hash + Eq + Clone> Interned<T> {
    fn get_or_insert<Q>(&mut self, q: &Q) -> u32
    where
        T: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized + ToOwned<Owned = T>,
    {
        if let Some(&i) = self.index.get(q) {
            return i;
        }
        let i = self.items.len() as u32;
        let owned = q.to_owned();
        self.items.push(owned.clone());
        self.index.insert(owned, i);
        i
    }
}

pub(super) struct State {
    pub(super) index: VectorIndex,
    pub(super) slots: Vec<Slot>,
    pub(super) by_template: FastMap<u64, u32>,
    pub(super) subject_ids: Vec<SubjectId>,
    pub(super) subject_idx: FastMap<SubjectId, u32>,
    pub(super) live_by_subject: FastMap<u32, Vec<u64>>,
    pub(super) consents: FastMap<String, ConsentRecord>,
    pub(super) consent_ids: Interned<String>,
    pub(super) purpose_sets: Interned<Vec<Purpose>>,
    /// Purpose sets by their encoding in a frame (replay skips re-validating them).
    purposes_by_bytes: FastMap<Vec<u8>, u32>,
    pub(super) models: Interned<String>,
    pub(super) per_purpose: [u64; 64],
    pub(super) next_template: u64,
    /// Earliest expiry among slots (a lower bound: deleted slots may keep it low until compaction).
    pub(super) min_expiry_ms: i64,
    /// Oldest enrolment among the slots (a purpose's retention filter is needed once it expires).
    pub(super) min_enrolled_ms: i64,
}

impl State {
    pub(super) fn new(index: VectorIndex) -> Self {
        State {
            index,
            slots: Vec::new(),
            by_template: FastMap::default(),
            subject_ids: Vec::new(),
            subject_idx: FastMap::default(),
            live_by_subject: FastMap::default(),
            consents: FastMap::default(),
            consent_ids: Interned::default(),
            purpose_sets: Interned::default(),
            purposes_by_bytes: FastMap::default(),
            models: Interned::default(),
            per_purpose: [0; 64],
            next_template: 1,
            min_expiry_ms: i64::MAX,
            min_enrolled_ms: i64::MAX,
        }
    }

    /// Room for about `n` more templates, subjects and consents at once (a
    /// replay that grows the maps step by step rehashes and re-faults them).
    pub(super) fn reserve(&mut self, n: usize) {
        self.slots.reserve(n);
        self.by_template.reserve(n);
        self.subject_ids.reserve(n);
        self.subject_idx.reserve(n);
        self.live_by_subject.reserve(n);
        self.consents.reserve(n);
        self.consent_ids.items.reserve(n);
        self.consent_ids.index.reserve(n);
    }

    pub(super) fn subject(&mut self, s: &SubjectId) -> u32 {
        if let Some(&i) = self.subject_idx.get(s) {
            return i;
        }
        let i = self.subject_ids.len() as u32;
        self.subject_ids.push(s.clone());
        self.subject_idx.insert(s.clone(), i);
        i
    }

    pub(super) fn people(&self) -> u64 {
        self.live_by_subject.values().filter(|v| !v.is_empty()).count() as u64
    }

    /// The metadata of the template at `slot` (as it was enrolled).
    pub(super) fn meta(&self, slot: u32) -> Option<TemplateMeta> {
        let s = self.slots.get(slot as usize)?;
        Some(TemplateMeta {
            template: s.template,
            subject: self.subject_ids.get(s.subject as usize)?.clone(),
            purposes: self.purpose_sets.items.get(s.purposes as usize)?.clone(),
            enrolled_at_ms: s.enrolled_at_ms,
            expires_at_ms: s.recorded_expiry_ms,
            consent_id: self.consent_ids.items.get(s.consent as usize)?.clone(),
            model_id: self.models.items.get(s.model as usize)?.clone(),
        })
    }

    /// The metadata of a live template.
    pub(super) fn meta_of(&self, template: u64) -> Option<TemplateMeta> {
        self.by_template.get(&template).and_then(|&slot| self.meta(slot))
    }

    /// Register metadata of an enrolment whose vector sits at `slot`.
    pub(super) fn note_enrol(&mut self, cfg: &GalleryConfig, meta: &TemplateMeta, slot: u32) {
        let subject = self.subject(&meta.subject);
        let purposes = self.purpose_sets.get_or_insert(meta.purposes.as_slice());
        self.push_slot(
            cfg,
            meta.template,
            subject,
            purposes,
            meta.consent_id.as_str(),
            meta.model_id.as_str(),
            meta.enrolled_at_ms,
            meta.expires_at_ms,
            slot,
        );
    }

    /// [`State::note_enrol`] from a frame's borrowed metadata: validates and
    /// allocates only what is new (a subject, consent or purpose set not seen before).
    pub(super) fn note_enrol_ref(&mut self, cfg: &GalleryConfig, m: &store::MetaRef<'_>, slot: u32) -> std::result::Result<(), String> {
        let subject = match self.subject_idx.get(m.subject) {
            Some(&i) => i,
            None => self.subject(&SubjectId::new(m.subject).map_err(|e| format!("subject: {e}"))?),
        };
        let purposes = match self.purposes_by_bytes.get(m.purposes_raw) {
            Some(&i) => i,
            None => {
                let i = self.purpose_sets.get_or_insert(m.purposes()?.as_slice());
                self.purposes_by_bytes.insert(m.purposes_raw.to_vec(), i);
                i
            }
        };
        self.push_slot(cfg, m.template, subject, purposes, m.consent_id, m.model_id, m.enrolled_at_ms, m.expires_at_ms, slot);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push_slot(
        &mut self,
        cfg: &GalleryConfig,
        template: u64,
        subject: u32,
        purposes: u32,
        consent_id: &str,
        model_id: &str,
        enrolled_at_ms: i64,
        recorded_expiry_ms: i64,
        slot: u32,
    ) {
        let mut mask = 0u64;
        // Each purpose expires on its own retention (from the current config);
        // the template is kept until its last purpose expires.
        let mut expires: Option<i64> = None;
        for p in &self.purpose_sets.items[purposes as usize] {
            if let Some(b) = cfg.purpose_bit(p) {
                mask |= 1 << b;
                self.per_purpose[b as usize] += 1;
            }
            if let Some(pol) = cfg.purpose(p) {
                let e = enrolled_at_ms.saturating_add(pol.retention_days as i64 * DAY_MS);
                expires = Some(expires.map_or(e, |x| x.max(e)));
            }
        }
        debug_assert_eq!(slot as usize, self.slots.len());
        let expires_at_ms = expires.unwrap_or(recorded_expiry_ms);
        self.min_expiry_ms = self.min_expiry_ms.min(expires_at_ms);
        self.min_enrolled_ms = self.min_enrolled_ms.min(enrolled_at_ms);
        let consent = self.consent_ids.get_or_insert(consent_id);
        let model = self.models.get_or_insert(model_id);
        self.slots.push(Slot { template, subject, mask, enrolled_at_ms, expires_at_ms, recorded_expiry_ms, consent, purposes, model });
        self.by_template.insert(template, slot);
        self.live_by_subject.entry(subject).or_default().push(template);
        self.next_template = self.next_template.max(template + 1);
    }

    /// Forget a template's metadata (the index tombstone is set by the caller).
    pub(super) fn note_delete(&mut self, template: u64) -> Option<u32> {
        let slot = self.by_template.remove(&template)?;
        let s = &self.slots[slot as usize];
        for b in 0..64 {
            if s.mask & (1 << b) != 0 {
                self.per_purpose[b] = self.per_purpose[b].saturating_sub(1);
            }
        }
        if let Some(v) = self.live_by_subject.get_mut(&s.subject) {
            v.retain(|&t| t != template);
        }
        Some(slot)
    }

    /// Heap bytes held by the metadata (an estimate: capacities times entry
    /// sizes, map overhead one control byte per bucket, string bytes).
    pub(super) fn memory_bytes(&self) -> usize {
        fn map<K, V>(m: &FastMap<K, V>) -> usize {
            m.capacity() * (std::mem::size_of::<(K, V)>() + 1)
        }
        let strings = |v: &[String]| v.iter().map(|s| s.capacity() + std::mem::size_of::<String>() * 2).sum::<usize>();
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + map(&self.by_template)
            + self.subject_ids.iter().map(|s| s.as_str().len() * 2).sum::<usize>()
            + self.subject_ids.capacity() * std::mem::size_of::<SubjectId>()
            + map(&self.subject_idx)
            + map(&self.live_by_subject)
            + self.live_by_subject.values().map(|v| v.capacity() * 8).sum::<usize>()
            + map(&self.consents)
            + self.consents.values().map(consent_heap_bytes).sum::<usize>()
            + strings(&self.consent_ids.items)
            + strings(&self.models.items)
    }
}

/// Heap bytes of one consent record and its key in [`State::consents`]
/// (strings and lists; a guardian's record counted at its size).
fn consent_heap_bytes(c: &ConsentRecord) -> usize {
    2 * c.consent_id.capacity()
        + c.subject.as_str().len()
        + c.collected_by.capacity()
        + c.purposes.capacity() * std::mem::size_of::<Purpose>()
        + c.purposes.iter().map(|p| p.as_str().len()).sum::<usize>()
        + c.guardian.as_ref().map_or(0, |_| 128)
}
