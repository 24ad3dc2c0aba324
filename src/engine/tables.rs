//! Compact tables of the gallery's metadata: strings stored end to end and
//! found by content, subjects with their live templates and consents as
//! lists threaded through fixed-size records, consent records as fixed-size
//! rows. No heap object per template, subject or consent: at a million
//! people this is the difference between ~0.2 and ~0.8 GB (docs/PERFORMANCE.md).

use super::*;
use crate::compliance::{AgeBracket, ConsentBasis, GuardianConsent};
use hashbrown::HashTable;
use std::hash::BuildHasher;

/// "No entry" in the threaded lists and optional indexes.
pub(super) const NONE: u32 = u32::MAX;

/// Distinct strings, stored end to end in one buffer, by index and by content.
#[derive(Default)]
pub(super) struct StrTable {
    bytes: String,
    ends: Vec<u64>,
    index: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl StrTable {
    /// The string at `i` ("" if out of range).
    pub(super) fn get(&self, i: u32) -> &str {
        if i as usize >= self.ends.len() {
            return "";
        }
        stored(&self.bytes, &self.ends, i)
    }

    pub(super) fn find(&self, s: &str) -> Option<u32> {
        let h = self.hasher.hash_one(s);
        self.index.find(h, |&i| self.get(i) == s).copied()
    }

    /// The index of `s`, added if new (one probe of the table).
    pub(super) fn intern(&mut self, s: &str) -> u32 {
        let h = self.hasher.hash_one(s);
        let (bytes, ends, hasher) = (&mut self.bytes, &mut self.ends, &self.hasher);
        let entry = self.index.entry(h, |&j| stored(bytes, ends, j) == s, |&j| hasher.hash_one(stored(bytes, ends, j)));
        match entry {
            hashbrown::hash_table::Entry::Occupied(o) => *o.get(),
            hashbrown::hash_table::Entry::Vacant(v) => {
                let i = ends.len() as u32;
                bytes.push_str(s);
                ends.push(bytes.len() as u64);
                v.insert(i);
                i
            }
        }
    }

    /// [`StrTable::intern`], trying index `hint` first: a replay meets ids
    /// in the order they were added (a batch's consents, then its
    /// enrolments), so the guess saves a probe of a large table.
    pub(super) fn intern_near(&mut self, s: &str, hint: u32) -> u32 {
        if (hint as usize) < self.ends.len() && self.get(hint) == s {
            return hint;
        }
        self.intern(s)
    }

    /// Room for `n` more strings of about `avg` bytes.
    pub(super) fn reserve(&mut self, n: usize, avg: usize) {
        self.bytes.reserve(n.saturating_mul(avg));
        self.ends.reserve(n);
        let (bytes, ends, hasher) = (&self.bytes, &self.ends, &self.hasher);
        self.index.reserve(n, |&j| hasher.hash_one(stored(bytes, ends, j)));
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.bytes.capacity() + self.ends.capacity() * 8 + self.index.capacity() * (4 + 1)
    }
}

/// String `j` (< `ends.len()`) of a table's buffer: whole strings were
/// pushed, so both ends are char boundaries.
fn stored<'a>(bytes: &'a str, ends: &[u64], j: u32) -> &'a str {
    let j = j as usize;
    let start = if j == 0 { 0 } else { ends[j - 1] as usize };
    &bytes[start..ends[j] as usize]
}

/// Distinct values (purpose sets, consent bases, guardians) by index.
pub(super) struct Interned<T: std::hash::Hash + Eq + Clone> {
    pub(super) items: Vec<T>,
    index: HashMap<T, u32, foldhash::fast::RandomState>,
}

impl<T: std::hash::Hash + Eq + Clone> Default for Interned<T> {
    fn default() -> Self {
        Interned { items: Vec::new(), index: HashMap::default() }
    }
}

impl<T: std::hash::Hash + Eq + Clone> Interned<T> {
    pub(super) fn get_or_insert<Q>(&mut self, q: &Q) -> u32
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

/// Subjects: names, how many live templates each has, and the heads of
/// their template list (threaded through [`Slot::next`]) and consent list
/// (threaded through [`Consent::next`]).
#[derive(Default)]
pub(super) struct Subjects {
    pub(super) names: StrTable,
    pub(super) first_slot: Vec<u32>,
    pub(super) live: Vec<u32>,
    pub(super) first_consent: Vec<u32>,
    /// Subjects with at least one live template.
    pub(super) people: u64,
}

impl Subjects {
    pub(super) fn find(&self, s: &str) -> Option<u32> {
        self.names.find(s)
    }

    /// The index of an already validated subject id, added if new.
    pub(super) fn intern(&mut self, s: &str) -> u32 {
        let i = self.names.intern(s);
        if i as usize == self.first_slot.len() {
            self.first_slot.push(NONE);
            self.live.push(0);
            self.first_consent.push(NONE);
        }
        i
    }

    pub(super) fn id(&self, i: u32) -> SubjectId {
        SubjectId::from_trusted(self.names.get(i))
    }

    pub(super) fn reserve(&mut self, n: usize) {
        self.names.reserve(n, 16);
        self.first_slot.reserve(n);
        self.live.reserve(n);
        self.first_consent.reserve(n);
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.names.memory_bytes() + (self.first_slot.capacity() + self.live.capacity() + self.first_consent.capacity()) * 4
    }
}

/// One consent record as a fixed-size row; its id is the row's index in
/// [`Consents::ids`] (shared with the templates' consent references).
#[derive(Clone, Debug)]
pub(super) struct Consent {
    pub(super) subject: u32,
    pub(super) purposes: u32,
    pub(super) basis: u32,
    pub(super) collected_by: u32,
    /// Index into [`Consents::guardians`], or [`NONE`].
    pub(super) guardian: u32,
    /// The subject's next consent, or [`NONE`].
    pub(super) next: u32,
    pub(super) given_at_ms: i64,
    /// `i64::MIN` while not withdrawn.
    pub(super) withdrawn_at_ms: i64,
    pub(super) age: AgeBracket,
    /// False for an id a template names without a record in this gallery.
    pub(super) recorded: bool,
}

/// Consent records by id.
#[derive(Default)]
pub(super) struct Consents {
    pub(super) ids: StrTable,
    pub(super) rows: Vec<Consent>,
    pub(super) purpose_sets: Interned<Vec<Purpose>>,
    pub(super) bases: Interned<ConsentBasis>,
    pub(super) collectors: StrTable,
    pub(super) guardians: Interned<GuardianConsent>,
    pub(super) recorded: u64,
}

impl Consents {
    /// The index of a consent id, added (unrecorded) if new; `hint` as in
    /// [`StrTable::intern_near`].
    pub(super) fn intern_near(&mut self, id: &str, hint: u32) -> u32 {
        let i = self.ids.intern_near(id, hint);
        if i as usize == self.rows.len() {
            self.rows.push(Consent {
                subject: NONE,
                purposes: 0,
                basis: 0,
                collected_by: 0,
                guardian: NONE,
                next: NONE,
                given_at_ms: 0,
                withdrawn_at_ms: i64::MIN,
                age: AgeBracket::Adult,
                recorded: false,
            });
        }
        i
    }

    fn row(&self, id: &str) -> Option<(u32, &Consent)> {
        let i = self.ids.find(id)?;
        let r = &self.rows[i as usize];
        r.recorded.then_some((i, r))
    }

    /// Record (or replace) a consent of subject `subject` (an index of
    /// [`Subjects`]). Returns whether it is new to this table.
    pub(super) fn put(&mut self, subjects: &mut Subjects, subject: u32, c: &ConsentRecord) -> bool {
        let i = self.intern_near(&c.consent_id, self.rows.len() as u32);
        let purposes = self.purpose_sets.get_or_insert(c.purposes.as_slice());
        let basis = self.bases.get_or_insert(&c.basis);
        let collected_by = self.collectors.intern(&c.collected_by);
        let guardian = c.guardian.as_ref().map_or(NONE, |g| self.guardians.get_or_insert(g));
        let row = &mut self.rows[i as usize];
        let new = !row.recorded;
        if new {
            self.recorded += 1;
        }
        // A consent id belongs to one subject (checked when recorded); a row
        // that changes hands anyway (a log written elsewhere) moves lists.
        if row.subject != subject {
            if row.subject != NONE {
                unlink(&mut subjects.first_consent[row.subject as usize], &mut self.rows, i);
            }
            let row = &mut self.rows[i as usize];
            row.next = subjects.first_consent[subject as usize];
            subjects.first_consent[subject as usize] = i;
        }
        let row = &mut self.rows[i as usize];
        row.subject = subject;
        row.purposes = purposes;
        row.basis = basis;
        row.collected_by = collected_by;
        row.guardian = guardian;
        row.given_at_ms = c.given_at_ms;
        row.withdrawn_at_ms = c.withdrawn_at_ms.unwrap_or(i64::MIN);
        row.age = c.age_bracket;
        row.recorded = true;
        new
    }

    /// The record of consent `i` (`None` if not recorded).
    pub(super) fn record_at(&self, subjects: &Subjects, i: u32) -> Option<ConsentRecord> {
        let r = self.rows.get(i as usize).filter(|r| r.recorded)?;
        Some(ConsentRecord {
            consent_id: self.ids.get(i).to_string(),
            subject: subjects.id(r.subject),
            basis: self.bases.items.get(r.basis as usize)?.clone(),
            purposes: self.purpose_sets.items.get(r.purposes as usize)?.clone(),
            given_at_ms: r.given_at_ms,
            collected_by: self.collectors.get(r.collected_by).to_string(),
            age_bracket: r.age,
            guardian: (r.guardian != NONE).then(|| self.guardians.items.get(r.guardian as usize).cloned()).flatten(),
            withdrawn_at_ms: (r.withdrawn_at_ms != i64::MIN).then_some(r.withdrawn_at_ms),
        })
    }

    pub(super) fn get(&self, subjects: &Subjects, id: &str) -> Option<ConsentRecord> {
        let (i, _) = self.row(id)?;
        self.record_at(subjects, i)
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.row(id).is_some()
    }

    /// The subject index a recorded consent belongs to.
    pub(super) fn owner(&self, id: &str) -> Option<u32> {
        self.row(id).map(|(_, r)| r.subject)
    }

    /// Mark a recorded consent withdrawn at `at`.
    pub(super) fn set_withdrawn(&mut self, id: &str, at: i64) {
        if let Some((i, _)) = self.row(id) {
            self.rows[i as usize].withdrawn_at_ms = at;
        }
    }

    /// Indexes of a subject's recorded consents, oldest recorded first.
    pub(super) fn of_subject(&self, subjects: &Subjects, subject: u32) -> Vec<u32> {
        let mut out = Vec::new();
        let mut k = subjects.first_consent.get(subject as usize).copied().unwrap_or(NONE);
        while k != NONE {
            out.push(k);
            k = self.rows[k as usize].next;
        }
        out.retain(|&k| self.rows[k as usize].recorded);
        out.reverse();
        out
    }

    pub(super) fn reserve(&mut self, n: usize) {
        self.ids.reserve(n, 24);
        self.rows.reserve(n);
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.ids.memory_bytes() + self.rows.capacity() * std::mem::size_of::<Consent>() + self.collectors.memory_bytes()
    }
}

/// Template id -> slot. Ids the engine hands out are dense (1, 2, 3, ...):
/// those sit in a vector indexed by id (4 bytes each, no hashing); ids far
/// beyond (chosen by a caller) go to a hash map, so a huge id costs an entry,
/// not a huge vector.
#[derive(Default)]
pub(super) struct TemplateMap {
    dense: Vec<u32>,
    sparse: HashMap<u64, u32, foldhash::fast::RandomState>,
    len: usize,
}

impl TemplateMap {
    pub(super) fn get(&self, t: &u64) -> Option<&u32> {
        if let Some(s) = usize::try_from(*t).ok().and_then(|i| self.dense.get(i)) {
            if *s != NONE {
                return Some(s);
            }
        }
        // An id may have gone to the map before the vector grew past it.
        if self.sparse.is_empty() {
            None
        } else {
            self.sparse.get(t)
        }
    }

    pub(super) fn contains_key(&self, t: &u64) -> bool {
        self.get(t).is_some()
    }

    pub(super) fn insert(&mut self, t: u64, slot: u32) {
        if let Some(x) = self.sparse.get_mut(&t) {
            *x = slot;
            return;
        }
        // Dense while at least about half of the vector would be in use.
        let limit = 2 * (self.len as u64 + 1) + 65_536;
        match usize::try_from(t) {
            Ok(i) if i < self.dense.len() || t < limit => {
                if i >= self.dense.len() {
                    self.dense.resize(i + 1, NONE);
                }
                if self.dense[i] == NONE {
                    self.len += 1;
                }
                self.dense[i] = slot;
            }
            _ => {
                self.sparse.insert(t, slot);
                self.len += 1;
            }
        }
    }

    pub(super) fn remove(&mut self, t: &u64) -> Option<u32> {
        if let Some(s) = usize::try_from(*t).ok().and_then(|i| self.dense.get_mut(i)) {
            if *s != NONE {
                self.len -= 1;
                return Some(std::mem::replace(s, NONE));
            }
        }
        let r = if self.sparse.is_empty() { None } else { self.sparse.remove(t) };
        if r.is_some() {
            self.len -= 1;
        }
        r
    }

    /// Every (template, slot), in no particular order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        let dense = self.dense.iter().enumerate().filter(|(_, &s)| s != NONE).map(|(t, &s)| (t as u64, s));
        dense.chain(self.sparse.iter().map(|(&t, &s)| (t, s)))
    }

    pub(super) fn reserve(&mut self, n: usize) {
        self.dense.reserve(n);
    }

    pub(super) fn memory_bytes(&self) -> usize {
        self.dense.capacity() * 4 + self.sparse.capacity() * (std::mem::size_of::<(u64, u32)>() + 1)
    }
}

/// A record threaded into a per-subject list.
pub(super) trait Linked {
    fn next_mut(&mut self) -> &mut u32;
}

impl Linked for Consent {
    fn next_mut(&mut self) -> &mut u32 {
        &mut self.next
    }
}

/// Remove `item` from the list that starts at `head` and runs through `rows`.
pub(super) fn unlink<T: Linked>(head: &mut u32, rows: &mut [T], item: u32) {
    let (mut prev, mut k) = (NONE, *head);
    while k != NONE && k != item {
        prev = k;
        k = *rows[k as usize].next_mut();
    }
    if k == NONE {
        return;
    }
    let after = std::mem::replace(rows[item as usize].next_mut(), NONE);
    if prev == NONE {
        *head = after;
    } else {
        *rows[prev as usize].next_mut() = after;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_are_found_by_content_after_growth() {
        let mut t = StrTable::default();
        let ids: Vec<u32> = (0..5000).map(|i| t.intern(&format!("s{i}"))).collect();
        assert_eq!(ids, (0..5000).collect::<Vec<u32>>());
        assert_eq!(t.intern("s4321"), 4321);
        assert_eq!(t.get(17), "s17");
        assert_eq!(t.find("nope"), None);
        assert_eq!(t.get(99_999), "");
    }

    #[derive(Debug)]
    struct R(u32);
    impl Linked for R {
        fn next_mut(&mut self) -> &mut u32 {
            &mut self.0
        }
    }

    #[test]
    fn template_ids_dense_or_not_map_to_their_slots() {
        let mut m = TemplateMap::default();
        for t in 1..=1000u64 {
            m.insert(t, t as u32 * 2);
        }
        m.insert(u64::MAX - 1, 7); // far beyond: a hash map entry, not a huge vector
        m.insert(1 << 40, 8);
        assert!(m.dense.len() <= 1001 + 65_536 * 2, "{}", m.dense.len());
        assert_eq!(
            (m.get(&500), m.get(&(u64::MAX - 1)), m.get(&(1 << 40)), m.get(&0), m.get(&5000)),
            (Some(&1000), Some(&7), Some(&8), None, None)
        );
        assert_eq!(m.remove(&500), Some(1000));
        assert_eq!(m.remove(&500), None);
        assert_eq!(m.remove(&(u64::MAX - 1)), Some(7));
        assert!(!m.contains_key(&500));
        m.insert(3, 99); // replace
        assert_eq!(m.get(&3), Some(&99));
        // An id that went to the map stays found after the vector grows past it.
        let far = m.dense.len() as u64 + 200_000;
        m.insert(far, 5);
        for t in 1001..far + 10 {
            if t != far {
                m.insert(t, 1);
            }
        }
        assert!(m.dense.len() as u64 > far);
        assert_eq!(m.get(&far), Some(&5));
        m.insert(far, 6);
        assert_eq!(m.remove(&far), Some(6));
        assert_eq!(m.get(&far), None);
        for t in 1001..far + 10 {
            m.remove(&t);
        }
        let mut all: Vec<(u64, u32)> = m.iter().collect();
        all.sort_unstable();
        assert_eq!(all.len(), 1000);
        assert_eq!(m.len, 1000);
        assert_eq!(all.last(), Some(&(1 << 40, 8)));
    }

    #[test]
    fn unlink_removes_head_middle_tail_and_ignores_strangers() {
        // list 3 -> 1 -> 0
        let mut rows = vec![R(NONE), R(0), R(NONE), R(1)];
        let mut head = 3;
        unlink(&mut head, &mut rows, 2); // not in the list
        assert_eq!((head, rows[3].0, rows[1].0), (3, 1, 0));
        unlink(&mut head, &mut rows, 1);
        assert_eq!((head, rows[3].0, rows[1].0), (3, 0, NONE));
        unlink(&mut head, &mut rows, 3);
        assert_eq!((head, rows[3].0), (0, NONE));
        unlink(&mut head, &mut rows, 0);
        assert_eq!(head, NONE);
    }

    #[test]
    fn consents_round_trip_and_replacement_keeps_one_row() {
        let mut subjects = Subjects::default();
        let mut cs = Consents::default();
        let p = Purpose::new("door").unwrap();
        let mut c =
            ConsentRecord::new("c1", "alice", ConsentBasis::LegalBasis("art. 5".into()), vec![p.clone()], "desk", AgeBracket::Under14);
        c.guardian = Some(GuardianConsent { guardian: "bob".into(), relationship: "parent".into() });
        c.given_at_ms = 42;
        let a = subjects.intern("alice");
        assert!(cs.put(&mut subjects, a, &c));
        assert_eq!(cs.get(&subjects, "c1").as_ref(), Some(&c));
        // An unrecorded id named by a template is not a consent.
        cs.intern_near("c-unrecorded", 0);
        assert!(!cs.contains("c-unrecorded"));
        c.withdrawn_at_ms = Some(77);
        assert!(!cs.put(&mut subjects, a, &c));
        assert_eq!(cs.recorded, 1);
        assert_eq!(cs.of_subject(&subjects, a).len(), 1);
        assert_eq!(cs.get(&subjects, "c1").and_then(|r| r.withdrawn_at_ms), Some(77));
        assert_eq!(subjects.names.get(cs.owner("c1").unwrap()), "alice");
    }
}
