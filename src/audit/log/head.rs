//! The companion thread that keeps `HEAD` (the keyed tail pointer) near the end of the log.

use super::*;

/// Latest state for `HEAD` and how far the durable `HEAD` has got.
pub(super) struct HeadState {
    pub(super) want: Option<(u32, u64, String)>,
    pub(super) written: u64,
    /// Someone waits in `ensure`: skip the interval.
    pub(super) urgent: bool,
    pub(super) error: Option<String>,
    pub(super) closing: bool,
    /// Failpoint `audit/head`: the next replacement fails.
    pub(super) fail_next: bool,
}

/// Replaces `HEAD` on its own thread, so that its two fsyncs (temp file,
/// directory) overlap the next commit's write and fsync instead of adding
/// to every commit. It is only ever given states whose records are already
/// durable, so `HEAD` never runs ahead of the log; it trails it by at most
/// the commit in flight (which verification accepts, as after a crash).
pub(super) struct HeadWriter {
    pub(super) state: Arc<(Mutex<HeadState>, Condvar)>,
    pub(super) handle: Option<JoinHandle<()>>,
}

impl HeadWriter {
    pub(super) fn start(shared: Arc<Shared>, written: u64) -> Result<HeadWriter> {
        let state = Arc::new((
            Mutex::new(HeadState { want: None, written, urgent: false, error: None, closing: false, fail_next: false }),
            Condvar::new(),
        ));
        let st = Arc::clone(&state);
        let handle = std::thread::Builder::new()
            .name("facematch-audit-head".into())
            .spawn(move || {
                let (m, cv) = &*st;
                let interval = Duration::from_millis(shared.cfg.head_interval_ms);
                let mut last_write: Option<Instant> = None;
                loop {
                    let (next, fail) = {
                        let mut g = m.lock();
                        loop {
                            while g.want.is_none() && !g.closing {
                                cv.wait(&mut g);
                            }
                            // Pace routine replacements; flush/close (urgent) do not wait.
                            let due = last_write.map(|t| t + interval);
                            match due {
                                Some(due) if !g.urgent && !g.closing && Instant::now() < due => {
                                    let _ = cv.wait_until(&mut g, due);
                                }
                                _ => break,
                            }
                        }
                        g.urgent = false;
                        match g.want.take() {
                            // Already covered by the write that just finished.
                            Some(w) if w.1 <= g.written => continue,
                            Some(w) => (w, std::mem::take(&mut g.fail_next)),
                            None => return,
                        }
                    };
                    last_write = Some(Instant::now());
                    let r = if fail {
                        Err(Error::io(shared.dir.join(crate::audit::format::HEAD_FILE), std::io::Error::from_raw_os_error(libc::ENOSPC)))
                    } else {
                        write_head(&shared.dir, &shared.key, next.0, next.1, &next.2, true)
                    };
                    let mut g = m.lock();
                    match r {
                        Ok(()) => g.written = g.written.max(next.1),
                        Err(e) => {
                            g.error = Some(e.to_string());
                            cv.notify_all();
                            return;
                        }
                    }
                    cv.notify_all();
                }
            })
            .map_err(|e| Error::Audit(format!("starting the audit HEAD thread: {e}")))?;
        Ok(HeadWriter { state, handle: Some(handle) })
    }

    /// Ask for `HEAD` to say (segment, records, hash); newer requests replace older ones.
    pub(super) fn post(&self, segment: u32, records: u64, hash: &str) {
        let (m, cv) = &*self.state;
        m.lock().want = Some((segment, records, hash.to_string()));
        cv.notify_all();
    }

    /// Make the next replacement fail (failpoint `audit/head`).
    pub(super) fn fail_next(&self) {
        self.state.0.lock().fail_next = true;
    }

    pub(super) fn error(&self) -> Option<String> {
        self.state.0.lock().error.clone()
    }

    /// Make sure a durable `HEAD` covers `records` (asking for it if no
    /// request is pending) and block until it does.
    pub(super) fn ensure(&self, segment: u32, records: u64, hash: &str) -> Result<()> {
        let (m, cv) = &*self.state;
        let mut g = m.lock();
        if g.written < records {
            if g.want.as_ref().is_none_or(|w| w.1 < records) {
                g.want = Some((segment, records, hash.to_string()));
            }
            g.urgent = true;
            cv.notify_all();
        }
        while g.written < records {
            if let Some(e) = &g.error {
                return Err(Error::Audit(format!("replacing audit HEAD: {e}")));
            }
            cv.wait(&mut g);
        }
        Ok(())
    }

    pub(super) fn stop(&mut self) {
        {
            let (m, cv) = &*self.state;
            m.lock().closing = true;
            cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
