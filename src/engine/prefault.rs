//! Faulting in a large fresh allocation on a thread of its own, ahead of the
//! code that fills it: the kernel zeroes every page on its first touch
//! (about a second per GB on this kind of VM), and a replay filling gigabytes
//! of vectors would otherwise pay that on its one busy thread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Below this, faulting in on the filling thread costs too little to matter.
const MIN_BYTES: usize = 64 << 20;

/// A running prefault; stopped and joined when dropped.
pub(super) struct PrefaultAhead {
    handle: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl PrefaultAhead {
    /// Start faulting in `spare` (the unused capacity of a vector about to be
    /// filled), front to back. Linux only; elsewhere, or for a small range, nothing.
    pub(super) fn start<T>(spare: &mut [std::mem::MaybeUninit<T>]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let bytes = std::mem::size_of_val(spare);
        if bytes < MIN_BYTES || !cfg!(target_os = "linux") {
            return PrefaultAhead { handle: None, stop };
        }
        let (addr, flag) = (spare.as_mut_ptr() as usize, stop.clone());
        let handle = std::thread::Builder::new().name("facematch-prefault".into()).spawn(move || populate(addr, bytes, &flag)).ok();
        PrefaultAhead { handle, stop }
    }
}

impl Drop for PrefaultAhead {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(target_os = "linux")]
fn populate(addr: usize, bytes: usize, stop: &AtomicBool) {
    const PAGE: usize = 4096;
    const STEP: usize = 32 << 20;
    let (mut p, end) = (addr.next_multiple_of(PAGE), (addr + bytes) / PAGE * PAGE);
    while p < end && !stop.load(Ordering::Relaxed) {
        let n = STEP.min(end - p);
        // SAFETY: a kernel call on an address range, no access from Rust. The
        // range is inside an allocation the caller keeps while this thread runs
        // (joined on drop; were it freed early, the call fails or faults in
        // pages another owner holds, changing no data). MADV_POPULATE_WRITE
        // maps pages that are absent as a first write would (zero-filled) and
        // leaves present pages, and any data in them, untouched.
        let r = unsafe { libc::madvise(p as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) };
        if r != 0 {
            return; // an older kernel: the filler faults the pages in itself
        }
        p += n;
    }
}

#[cfg(not(target_os = "linux"))]
fn populate(_addr: usize, _bytes: usize, _stop: &AtomicBool) {}
