//! Progress on stderr (a bar only on a terminal, a summary line) and Ctrl-C.

use super::*;

pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// First Ctrl-C: stop intake (the run finishes what is in flight and
/// flushes); the handler resets itself, so a second one kills.
pub(super) fn install_interrupt() -> &'static AtomicBool {
    #[cfg(unix)]
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigint as *const () as usize;
        sa.sa_flags = libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGINT, &sa, std::ptr::null_mut());
    }
    &INTERRUPTED
}

/// Whether a progress bar will be drawn (stderr is a terminal, not `--quiet`).
pub(super) fn shows_bar(o: &BatchOut) -> bool {
    !o.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr())
}

pub(super) struct Reporter {
    pub(super) bar: Option<indicatif::ProgressBar>,
    pub(super) quiet: bool,
    pub(super) what: &'static str,
}

impl Reporter {
    pub(super) fn new(o: &BatchOut, what: &'static str, total: Option<u64>) -> Self {
        let bar = shows_bar(o).then(|| {
            let bar = match total {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let tpl = if total.is_some() {
                "{prefix} {bar:30} {pos}/{len} {per_sec} {msg} [{elapsed_precise}<{eta_precise}]"
            } else {
                "{prefix} {spinner} {pos} {per_sec} {msg} [{elapsed_precise}]"
            };
            bar.set_style(indicatif::ProgressStyle::with_template(tpl).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
            bar.set_prefix(what);
            bar
        });
        Reporter { bar, quiet: o.quiet, what }
    }

    pub(super) fn update(&self, p: &BatchProgress, skipped: u64) {
        if let Some(b) = &self.bar {
            b.set_position(p.done + skipped);
            b.set_message(format!("faces {} matches {} errors {}", p.faces, p.matches, p.failed));
        }
    }

    pub(super) fn finish(&self, p: &BatchProgress, skipped: u64, unit: &str) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        if !self.quiet {
            let secs = p.elapsed.as_secs_f64().max(1e-9);
            eprintln!(
                "{}: {} {unit} in {:.2} s ({:.1}/s), {} failed, {} faces, {} matches{}{}",
                self.what,
                p.done,
                secs,
                p.done as f64 / secs,
                p.failed,
                p.faces,
                p.matches,
                if skipped > 0 { format!(", {skipped} skipped (already answered)") } else { String::new() },
                if p.cancelled { " [interrupted: run again with --resume to carry on]" } else { "" }
            );
        }
    }
}
