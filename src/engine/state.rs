//! The in-memory gallery: template slots, subjects, consents, per-purpose counts.
//!
//! Per-template metadata is one fixed-size [`Slot`] (no heap object per
//! template): the strings a template refers to (its subject, consent, purpose
//! set and model) are stored once in the tables of `tables.rs` and referred
//! to by index; a subject's live templates are a list threaded through the
//! slots. Maps hash with foldhash (randomly seeded, so crafted ids cannot
//! force collisions).

#[cfg(doc)]
use super::tables::StrTable;
use super::tables::{unlink, Consents, Interned, Linked, Subjects, TemplateMap, NONE};
use super::*;

/// A `HashMap` with a fast, randomly seeded hasher.
pub(super) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Clone, Debug)]
pub(super) struct Slot {
    pub(super) template: u64,
    pub(super) mask: u64,
    /// Enrolment time: the template serves purpose `p` while
    /// `enrolled_at_ms > now - retention(p)`.
    pub(super) enrolled_at_ms: i64,
    /// When its last purpose expires (then it is purged).
    pub(super) expires_at_ms: i64,
    /// The expiry recorded at enrolment ([`TemplateMeta::expires_at_ms`]).
    pub(super) recorded_expiry_ms: i64,
    /// Index into [`State::subjects`].
    pub(super) subject: u32,
    /// Index into [`State::consents`] (its id table).
    pub(super) consent: u32,
    /// Index into [`State::purpose_sets`].
    pub(super) purposes: u32,
    /// Index into [`State::models`].
    pub(super) model: u32,
    /// The subject's next live template's slot (its list), or [`NONE`].
    pub(super) next: u32,
}

impl Linked for Slot {
    fn next_mut(&mut self) -> &mut u32 {
        &mut self.next
    }
}

pub(super) struct State {
    pub(super) index: VectorIndex,
    pub(super) slots: Vec<Slot>,
    pub(super) by_template: TemplateMap,
    pub(super) subjects: Subjects,
    pub(super) consents: Consents,
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
    /// Where the next enrolment's consent id probably is (see [`StrTable::intern_near`]).
    consent_hint: u32,
    /// The model of the last enrolment (galleries hold one model).
    last_model: u32,
}

impl State {
    pub(super) fn new(index: VectorIndex) -> Self {
        State {
            index,
            slots: Vec::new(),
            by_template: TemplateMap::default(),
            subjects: Subjects::default(),
            consents: Consents::default(),
            purpose_sets: Interned::default(),
            purposes_by_bytes: FastMap::default(),
            models: Interned::default(),
            per_purpose: [0; 64],
            next_template: 1,
            min_expiry_ms: i64::MAX,
            min_enrolled_ms: i64::MAX,
            consent_hint: 0,
            last_model: 0,
        }
    }

    /// Room for about `n` more templates, subjects and consents at once (a
    /// replay that grows the tables step by step rehashes and re-faults them).
    pub(super) fn reserve(&mut self, n: usize) {
        self.slots.reserve(n);
        self.by_template.reserve(n);
        self.subjects.reserve(n);
        self.consents.reserve(n);
    }

    /// The index of a subject, added if new.
    pub(super) fn subject(&mut self, s: &SubjectId) -> u32 {
        self.subjects.intern(s.as_str())
    }

    /// The index of a subject the gallery knows.
    pub(super) fn subject_index(&self, s: &SubjectId) -> Option<u32> {
        self.subjects.find(s.as_str())
    }

    /// The subject at index `i`.
    pub(super) fn subject_id(&self, i: u32) -> SubjectId {
        self.subjects.id(i)
    }

    pub(super) fn people(&self) -> u64 {
        self.subjects.people
    }

    /// Live template ids of subject index `si`, oldest first.
    pub(super) fn live_templates(&self, si: u32) -> Vec<u64> {
        self.live_slots(si).into_iter().map(|s| self.slots[s as usize].template).collect()
    }

    /// Slots of the live templates of subject index `si`, oldest first.
    pub(super) fn live_slots(&self, si: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut k = self.subjects.first_slot.get(si as usize).copied().unwrap_or(NONE);
        while k != NONE {
            out.push(k);
            k = self.slots[k as usize].next;
        }
        out.reverse();
        out
    }

    /// Live template ids of a subject, oldest first (empty if unknown).
    pub(super) fn templates_of(&self, s: &SubjectId) -> Vec<u64> {
        self.subject_index(s).map(|si| self.live_templates(si)).unwrap_or_default()
    }

    /// Subject indexes with at least one live template.
    pub(super) fn live_subjects(&self) -> impl Iterator<Item = u32> + '_ {
        self.subjects.live.iter().enumerate().filter(|(_, &n)| n > 0).map(|(i, _)| i as u32)
    }

    /// The metadata of the template at `slot` (as it was enrolled).
    pub(super) fn meta(&self, slot: u32) -> Option<TemplateMeta> {
        let s = self.slots.get(slot as usize)?;
        Some(TemplateMeta {
            template: s.template,
            subject: self.subjects.id(s.subject),
            purposes: self.purpose_sets.items.get(s.purposes as usize)?.clone(),
            enrolled_at_ms: s.enrolled_at_ms,
            expires_at_ms: s.recorded_expiry_ms,
            consent_id: self.consents.ids.get(s.consent).to_string(),
            model_id: self.models.items.get(s.model as usize)?.clone(),
        })
    }

    /// The metadata of a live template.
    pub(super) fn meta_of(&self, template: u64) -> Option<TemplateMeta> {
        self.by_template.get(&template).and_then(|&slot| self.meta(slot))
    }

    // --- consents ---------------------------------------------------------------

    /// A recorded consent by id (withdrawn or not).
    pub(super) fn consent(&self, id: &str) -> Option<ConsentRecord> {
        self.consents.get(&self.subjects, id)
    }

    pub(super) fn has_consent(&self, id: &str) -> bool {
        self.consents.contains(id)
    }

    /// Whose a recorded consent is.
    pub(super) fn consent_owner(&self, id: &str) -> Option<&str> {
        self.consents.owner(id).map(|si| self.subjects.names.get(si))
    }

    /// Record (or replace, e.g. with its withdrawal) a consent.
    pub(super) fn put_consent(&mut self, c: &ConsentRecord) {
        let si = self.subjects.intern(c.subject.as_str());
        self.consents.put(&mut self.subjects, si, c);
    }

    pub(super) fn set_withdrawn(&mut self, id: &str, at: i64) {
        self.consents.set_withdrawn(id, at);
    }

    /// A subject's consent records, withdrawn ones included, oldest first.
    pub(super) fn consents_of(&self, s: &SubjectId) -> Vec<ConsentRecord> {
        let Some(si) = self.subject_index(s) else { return Vec::new() };
        self.consents.of_subject(&self.subjects, si).into_iter().filter_map(|i| self.consents.record_at(&self.subjects, i)).collect()
    }

    pub(super) fn consent_count(&self) -> u64 {
        self.consents.recorded
    }

    /// Every recorded consent, by id.
    pub(super) fn all_consents(&self) -> Vec<ConsentRecord> {
        let mut all: Vec<ConsentRecord> =
            (0..self.consents.rows.len() as u32).filter_map(|i| self.consents.record_at(&self.subjects, i)).collect();
        all.sort_by(|a, b| a.consent_id.cmp(&b.consent_id));
        all
    }

    // --- templates --------------------------------------------------------------

    /// Register metadata of an enrolment whose vector sits at `slot`.
    pub(super) fn note_enrol(&mut self, cfg: &GalleryConfig, meta: &TemplateMeta, slot: u32) {
        let consent = self.consents.intern_near(&meta.consent_id, self.consent_hint);
        let subject = self.subject(&meta.subject);
        let purposes = self.purpose_sets.get_or_insert(meta.purposes.as_slice());
        self.push_slot(cfg, meta.template, subject, purposes, consent, &meta.model_id, meta.enrolled_at_ms, meta.expires_at_ms, slot);
    }

    /// [`State::note_enrol`] from a frame's borrowed metadata: validates and
    /// allocates only what is new (a subject, consent or purpose set not seen before).
    pub(super) fn note_enrol_ref(&mut self, cfg: &GalleryConfig, m: &store::MetaRef<'_>, slot: u32) -> std::result::Result<(), String> {
        // The consent names its subject: no lookup of the subject when they agree.
        let consent = self.consents.intern_near(m.consent_id, self.consent_hint);
        let owner = self.consents.rows[consent as usize].subject;
        let subject = if owner != NONE && self.subjects.names.get(owner) == m.subject {
            owner
        } else {
            match self.subjects.find(m.subject) {
                Some(i) => i,
                None => self.subject(&SubjectId::new(m.subject).map_err(|e| format!("subject: {e}"))?),
            }
        };
        let purposes = match self.purposes_by_bytes.get(m.purposes_raw) {
            Some(&i) => i,
            None => {
                let i = self.purpose_sets.get_or_insert(m.purposes()?.as_slice());
                self.purposes_by_bytes.insert(m.purposes_raw.to_vec(), i);
                i
            }
        };
        self.push_slot(cfg, m.template, subject, purposes, consent, m.model_id, m.enrolled_at_ms, m.expires_at_ms, slot);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn push_slot(
        &mut self,
        cfg: &GalleryConfig,
        template: u64,
        subject: u32,
        purposes: u32,
        consent: u32,
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
        self.consent_hint = consent + 1;
        let model = match self.models.items.get(self.last_model as usize) {
            Some(m) if m == model_id => self.last_model,
            _ => self.models.get_or_insert(model_id),
        };
        self.last_model = model;
        let next = self.link_live(subject, slot);
        self.slots.push(Slot {
            template,
            mask,
            enrolled_at_ms,
            expires_at_ms,
            recorded_expiry_ms,
            subject,
            consent,
            purposes,
            model,
            next,
        });
        self.by_template.insert(template, slot);
        self.next_template = self.next_template.max(template + 1);
    }

    /// Put `slot` at the head of its subject's live list; returns the old head.
    fn link_live(&mut self, subject: u32, slot: u32) -> u32 {
        let si = subject as usize;
        let next = std::mem::replace(&mut self.subjects.first_slot[si], slot);
        self.subjects.live[si] += 1;
        if self.subjects.live[si] == 1 {
            self.subjects.people += 1;
        }
        next
    }

    /// Forget a template's metadata (the index tombstone is set by the caller).
    pub(super) fn note_delete(&mut self, template: u64) -> Option<u32> {
        let slot = self.by_template.remove(&template)?;
        let s = &self.slots[slot as usize];
        let (mask, si) = (s.mask, s.subject as usize);
        for b in 0..64 {
            if mask & (1 << b) != 0 {
                self.per_purpose[b] = self.per_purpose[b].saturating_sub(1);
            }
        }
        unlink(&mut self.subjects.first_slot[si], &mut self.slots, slot);
        self.subjects.live[si] = self.subjects.live[si].saturating_sub(1);
        if self.subjects.live[si] == 0 {
            self.subjects.people = self.subjects.people.saturating_sub(1);
        }
        Some(slot)
    }

    /// Replace the slots (renumbered by a compaction, all live) and rebuild
    /// what refers to slot numbers.
    pub(super) fn renumber(&mut self, slots: Vec<Slot>) {
        self.by_template = TemplateMap::default();
        for (i, s) in slots.iter().enumerate() {
            self.by_template.insert(s.template, i as u32);
        }
        self.min_expiry_ms = slots.iter().map(|s| s.expires_at_ms).min().unwrap_or(i64::MAX);
        self.min_enrolled_ms = slots.iter().map(|s| s.enrolled_at_ms).min().unwrap_or(i64::MAX);
        self.slots = slots;
        self.subjects.first_slot.iter_mut().for_each(|h| *h = NONE);
        self.subjects.live.iter_mut().for_each(|n| *n = 0);
        self.subjects.people = 0;
        for i in 0..self.slots.len() {
            let si = self.slots[i].subject;
            self.slots[i].next = self.link_live(si, i as u32);
        }
    }

    /// Heap bytes held by the metadata (an estimate: capacities times entry
    /// sizes, map overhead one control byte per bucket, string bytes).
    pub(super) fn memory_bytes(&self) -> usize {
        self.slots.capacity() * std::mem::size_of::<Slot>()
            + self.by_template.memory_bytes()
            + self.subjects.memory_bytes()
            + self.consents.memory_bytes()
            + self.models.items.iter().map(|s| s.capacity() + std::mem::size_of::<String>() * 2).sum::<usize>()
    }
}
