//! How a rank is stopped and watched: stop signals counted for the event loop (once: no new
//! frames; twice: abandon those in flight), and a watchdog thread that reports a rank that
//! has stopped making progress, then ends it rather than let the job hang.
//!
//! SIGUSR1 and SIGUSR2 always drain: Open MPI's mpirun forwards them to every rank and ends
//! nothing. SIGTERM and SIGINT drain too where they reach the rank directly (no launcher, or
//! srun, which Slurm's `--signal` reaches), but an MPI launcher that passes them on ends the
//! ranks soon after, so there the log says the frames in flight may be lost.
//!
//! Imports nothing of the pipeline but its error type and `env` (the signal's route).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::RunError;
use crate::pipeline::env::{signal_route, SignalRoute};

/// Stop signals received (SIGTERM, SIGINT, SIGUSR1, SIGUSR2): 1 stops handing out frames,
/// 2 abandons what is in flight.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicUsize>);

impl StopSignal {
    /// Counts SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 from now on.
    pub fn install() -> Result<StopSignal, RunError> {
        use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
        let route = signal_route();
        let rank = crate::pipeline::env::launch().rank;
        let count = Arc::new(AtomicUsize::new(0));
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGUSR2])
            .map_err(RunError::Signals)?;
        let c = count.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    let name = match sig {
                        SIGTERM => "SIGTERM",
                        SIGINT => "SIGINT",
                        SIGUSR1 => "SIGUSR1",
                        _ => "SIGUSR2",
                    };
                    // Every rank is signalled: rank 0 says it on stderr, the others in
                    // their own logs only, so that a thousand ranks do not repeat it.
                    let message = stop_message(name, n, route);
                    if rank == 0 {
                        warn!("{message}");
                    } else {
                        info!("{message}");
                    }
                }
            })
            .map_err(RunError::SignalThread)?;
        Ok(StopSignal(count))
    }

    pub(super) fn level(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// What a rank logs on the `n`-th stop signal, `name` being that signal, promising only what
/// the way the signal came (`route`) lets it keep.
fn stop_message(name: &str, n: usize, route: SignalRoute) -> String {
    if n > 1 {
        return format!("{name} again: abandoning the frames in flight");
    }
    let drains = matches!(name, "SIGUSR1" | "SIGUSR2");
    match route {
        SignalRoute::Launcher(launcher) if !drains => {
            // Open MPI's mpirun is known to end them about a second later; of other
            // launchers only that they may.
            let (ends, instead) = if launcher == "mpirun" {
                (
                    "ends",
                    "send SIGUSR1 to mpirun instead: it forwards SIGUSR1 and SIGUSR2 to every \
                     rank without ending them"
                        .to_string(),
                )
            } else {
                (
                    "may end",
                    format!(
                        "send SIGUSR1 or SIGUSR2 instead, if {launcher} forwards it to every \
                         rank without ending them, as Open MPI's mpirun does"
                    ),
                )
            };
            format!(
                "{name}: no new frames will be started, and the frames in flight may be lost: \
                 {launcher} {ends} the ranks soon after it passes {name} on (to have them \
                 finished and written, {instead})"
            )
        }
        _ => format!(
            "{name}: no new frames will be started; frames in flight are finished and written \
             (send it again to abandon them)"
        ),
    }
}

/// The last moment a rank made progress, and what it waits on, for the watchdog.
#[derive(Debug)]
pub(super) struct Heartbeat {
    start: Instant,
    last_ms: AtomicU64,
    waiting: Mutex<String>,
}

impl Heartbeat {
    /// A heartbeat that last beat at `start`.
    pub(super) fn new(start: Instant) -> Heartbeat {
        Heartbeat {
            start,
            last_ms: AtomicU64::new(0),
            waiting: Mutex::new(String::new()),
        }
    }

    pub(super) fn beat(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub(super) fn waiting_on(&self, what: String) {
        if let Ok(mut w) = self.waiting.lock() {
            *w = what;
        }
    }
}

/// Reports when nothing has moved for `period`; after `abort_after` periods it ends the
/// process loudly (an MPI launcher then takes the job down) rather than hanging.
pub(super) fn start_watchdog(hb: Arc<Heartbeat>, roles: String, period: f64, abort_after: u32) {
    if !(period > 0.0) {
        return;
    }
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            let mut reported = 0u32;
            loop {
                std::thread::sleep(Duration::from_secs_f64((period / 4.0).max(0.05)));
                let idle = hb.start.elapsed().as_secs_f64()
                    - hb.last_ms.load(Ordering::Relaxed) as f64 / 1e3;
                let periods = (idle / period) as u32;
                if periods == 0 {
                    reported = 0;
                    continue;
                }
                if periods > reported {
                    reported = periods;
                    let what = hb.waiting.lock().map(|w| w.clone()).unwrap_or_default();
                    // The log line names the rank.
                    warn!("watchdog ({roles}): no progress for {idle:.0} s; {what}");
                    if periods >= abort_after {
                        error!(
                            "watchdog ({roles}): giving up after {idle:.0} s without progress; \
                             ending the job"
                        );
                        std::process::exit(3);
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Under an MPI launcher only SIGUSR1/SIGUSR2 promise the frames in flight; SIGTERM says
    /// they may be lost and names the signal that drains. Without one, or under srun, every
    /// stop signal drains.
    #[test]
    fn the_stop_message_promises_only_what_the_launcher_allows() {
        let mpirun = SignalRoute::Launcher("mpirun");
        let promise = "frames in flight are finished and written";
        for sig in ["SIGTERM", "SIGINT"] {
            let m = stop_message(sig, 1, mpirun);
            assert!(!m.contains(promise), "{m}");
            assert!(
                m.contains("may be lost") && m.contains("send SIGUSR1 to mpirun"),
                "{m}"
            );
            assert!(stop_message(sig, 1, SignalRoute::Direct).contains(promise));
        }
        for sig in ["SIGUSR1", "SIGUSR2"] {
            assert!(stop_message(sig, 1, mpirun).contains(promise));
            assert!(stop_message(sig, 1, SignalRoute::Direct).contains(promise));
        }
        assert!(stop_message("SIGUSR1", 2, mpirun).contains("abandoning the frames in flight"));
    }
}
