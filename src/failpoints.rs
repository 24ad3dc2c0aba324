//! Crash points for the crash tests, compiled in only with the `failpoints`
//! cargo feature (never in a deployment build, where `hit` is a constant
//! `false`).
//!
//! A failpoint is a named place in a multi-step write (after staging, after
//! the commit point, ...) where the operation stops as if the process had
//! been killed there: it returns at once, leaving the files exactly as a
//! crash would. Failpoints are per thread, so tests running in parallel do
//! not stop each other's operations.
//!
//! | name | where |
//! |---|---|
//! | `rotate-key/staged` | `Engine::rotate_key`: everything staged in `rotate.new/`, not committed |
//! | `rotate-key/committed` | `Engine::rotate_key`: the commit marker durable, no file moved yet |
//! | `withdraw/recorded` | `Engine::withdraw`: its audit record durable, nothing erased yet |
//! | `enrol/recorded` | `Engine::enrol_batch`: the enrolment records durable, no template stored yet |
//! | `log/enospc` | any template log append fails with "no space left on device" |
//! | `log/crash-mid-append` | an append of several frames stops as a crash would, its first frame durable and half the second written |
//! | `fs/write-atomic` | any atomic replace (manifest, `HEAD` written on this thread, export) fails after writing its temporary file |
//! | `fs/rename` | any rename in a gallery (compaction, snapshot, rotation moves, atomic replaces) fails |
//! | `compact/recorded` | `Engine::compact`: its `compaction-started` record durable, nothing rewritten yet |
//! | `compact/renamed` | `Engine::compact`: the new log renamed in, the manifest not yet rebound |
//! | `audit/write` | the audit commit holding a record this thread submitted fails to write its segment ("no space left") |
//! | `audit/fsync` | that commit's `fdatasync` of the segment fails (the bytes were written) |
//! | `audit/head` | the `HEAD` replace after that commit fails (on the `HEAD` thread; later commits then fail) |
//!
//! The `audit/*` points act on other threads (the audit log's writer, a
//! committing caller, the `HEAD` thread): each record carries the
//! failpoints of the thread that submitted it (`Carried`).

#[cfg(feature = "failpoints")]
mod active {
    use std::cell::RefCell;
    use std::collections::HashSet;

    thread_local! {
        static ACTIVE: RefCell<HashSet<&'static str>> = RefCell::new(HashSet::new());
    }

    /// Make the operation on this thread stop at `name` (see the module table).
    pub fn enable(name: &'static str) {
        ACTIVE.with(|a| a.borrow_mut().insert(name));
    }

    /// Clear every failpoint of this thread.
    pub fn disable_all() {
        ACTIVE.with(|a| a.borrow_mut().clear());
    }

    pub(crate) fn hit(name: &str) -> bool {
        ACTIVE.with(|a| a.borrow().contains(name))
    }

    pub(crate) fn snapshot() -> Option<std::sync::Arc<HashSet<&'static str>>> {
        ACTIVE.with(|a| {
            let a = a.borrow();
            (!a.is_empty()).then(|| std::sync::Arc::new(a.clone()))
        })
    }
}

#[cfg(feature = "failpoints")]
pub use active::{disable_all, enable};

/// The failpoints of the thread that made a piece of work, carried to the
/// thread that does it (an audit record to the writer). Empty, and free,
/// without the `failpoints` feature.
#[derive(Clone, Debug, Default)]
pub(crate) struct Carried {
    #[cfg(feature = "failpoints")]
    points: Option<std::sync::Arc<std::collections::HashSet<&'static str>>>,
}

impl Carried {
    /// The calling thread's failpoints.
    #[inline]
    pub(crate) fn here() -> Carried {
        Carried {
            #[cfg(feature = "failpoints")]
            points: active::snapshot(),
        }
    }

    /// Whether `name` was enabled where this was made.
    #[inline]
    pub(crate) fn hit(&self, name: &str) -> bool {
        #[cfg(feature = "failpoints")]
        {
            self.points.as_ref().is_some_and(|p| p.contains(name))
        }
        #[cfg(not(feature = "failpoints"))]
        {
            let _ = name;
            false
        }
    }
}

/// Whether the failpoint `name` is enabled on this thread.
#[inline]
pub(crate) fn hit(name: &str) -> bool {
    #[cfg(feature = "failpoints")]
    {
        active::hit(name)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = name;
        false
    }
}
