//! The memory `stats` reports is the memory an open gallery holds: a
//! counting allocator measures what opening allocated and kept, and the
//! index and metadata figures of `stats` must account for it within 25%.

mod common;
use common::*;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

use facematch::compliance::{AgeBracket, ConsentBasis, ConsentRecord};
use facematch::config::GalleryConfig;
use facematch::engine::{EngineBuilder, Enrolment};
use facematch::store::MasterKey;

/// Bytes currently allocated through the global allocator.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn stats_accounts_for_the_memory_an_open_gallery_holds() {
    let d = tempfile::tempdir().unwrap();
    let key = MasterKey::generate();
    let n = 20_000u64;
    let dim = 128;
    {
        let cfg = GalleryConfig { dim, ..config() };
        let e = EngineBuilder::new(d.path()).key(key.clone()).clock(clock()).create(cfg).unwrap();
        for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
            let consents = chunk
                .iter()
                .map(|i| {
                    ConsentRecord::new(
                        format!("consent-{i}"),
                        &format!("person-{i}"),
                        ConsentBasis::SeparateConsent,
                        vec![purpose("door-access")],
                        "clerk",
                        AgeBracket::Adult,
                    )
                })
                .collect();
            e.record_consents(&op(), consents).unwrap();
            let batch = chunk
                .iter()
                .map(|&i| {
                    let v: Vec<f32> = (0..dim).map(|j| ((i as usize * 31 + j * 7) % 97) as f32 - 48.0).collect();
                    Enrolment::new(subject(&format!("person-{i}")), format!("consent-{i}"), vec![purpose("door-access")], v)
                })
                .collect();
            e.import_batch(&op(), batch).unwrap();
        }
        e.close().unwrap();
    }
    let before = LIVE.load(Ordering::SeqCst);
    let e = open(d.path(), &key, clock()).unwrap();
    let held = (LIVE.load(Ordering::SeqCst) - before) as f64;
    let s = e.stats();
    let reported = (s.index_memory_bytes + s.metadata_memory_bytes) as f64;
    let ratio = reported / held;
    eprintln!(
        "open holds {:.1} MB; stats reports {:.1} MB (index {:.1}, metadata {:.1}): ratio {ratio:.2}",
        held / 1e6,
        reported / 1e6,
        s.index_memory_bytes as f64 / 1e6,
        s.metadata_memory_bytes as f64 / 1e6
    );
    assert!((0.75..=1.25).contains(&ratio), "stats reports {reported} bytes, the open gallery holds {held}");
}
