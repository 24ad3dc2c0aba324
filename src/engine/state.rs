//! The in-memory gallery: template slots, subjects, consents, per-purpose counts.

use super::*;

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
}

pub(super) struct State {
    pub(super) index: VectorIndex,
    pub(super) slots: Vec<Slot>,
    pub(super) metas: HashMap<u64, TemplateMeta>,
    pub(super) by_template: HashMap<u64, u32>,
    pub(super) subject_ids: Vec<SubjectId>,
    pub(super) subject_idx: HashMap<SubjectId, u32>,
    pub(super) live_by_subject: HashMap<u32, Vec<u64>>,
    pub(super) consents: HashMap<String, ConsentRecord>,
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
            metas: HashMap::new(),
            by_template: HashMap::new(),
            subject_ids: Vec::new(),
            subject_idx: HashMap::new(),
            live_by_subject: HashMap::new(),
            consents: HashMap::new(),
            per_purpose: [0; 64],
            next_template: 1,
            min_expiry_ms: i64::MAX,
            min_enrolled_ms: i64::MAX,
        }
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

    /// Register metadata of an enrolment whose vector sits at `slot`.
    pub(super) fn note_enrol(&mut self, cfg: &GalleryConfig, meta: TemplateMeta, slot: u32) {
        let subject = self.subject(&meta.subject);
        let mut mask = 0u64;
        for p in &meta.purposes {
            if let Some(b) = cfg.purpose_bit(p) {
                mask |= 1 << b;
                self.per_purpose[b as usize] += 1;
            }
        }
        debug_assert_eq!(slot as usize, self.slots.len());
        // Each purpose expires on its own retention (from the current config);
        // the template is kept until its last purpose expires.
        let expires_at_ms = meta
            .purposes
            .iter()
            .filter_map(|p| cfg.purpose(p))
            .map(|pol| meta.enrolled_at_ms.saturating_add(pol.retention_days as i64 * DAY_MS))
            .max()
            .unwrap_or(meta.expires_at_ms);
        self.min_expiry_ms = self.min_expiry_ms.min(expires_at_ms);
        self.min_enrolled_ms = self.min_enrolled_ms.min(meta.enrolled_at_ms);
        self.slots.push(Slot { template: meta.template, subject, mask, enrolled_at_ms: meta.enrolled_at_ms, expires_at_ms });
        self.by_template.insert(meta.template, slot);
        self.live_by_subject.entry(subject).or_default().push(meta.template);
        self.next_template = self.next_template.max(meta.template + 1);
        self.metas.insert(meta.template, meta);
    }

    /// Forget a template's metadata (the index tombstone is set by the caller).
    pub(super) fn note_delete(&mut self, template: u64) -> Option<u32> {
        let slot = self.by_template.remove(&template)?;
        self.metas.remove(&template);
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
}
