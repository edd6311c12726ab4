//! How a rank is stopped and watched: SIGTERM/SIGINT counted for the event loop (once: no new
//! frames; twice: abandon those in flight), and a watchdog thread that reports a rank that
//! has stopped making progress, then ends it rather than let the job hang.
//!
//! Imports nothing of the pipeline but its error type.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, warn};

use super::RunError;

/// Signals received (SIGTERM, SIGINT): 1 stops handing out frames, 2 abandons what is in
/// flight.
#[derive(Debug, Clone, Default)]
pub struct StopSignal(Arc<AtomicUsize>);

impl StopSignal {
    /// Counts SIGTERM and SIGINT from now on.
    pub fn install() -> Result<StopSignal, RunError> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let count = Arc::new(AtomicUsize::new(0));
        let mut signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(RunError::Signals)?;
        let c = count.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                    let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
                    if n == 1 {
                        warn!(
                            "{name}: no new frames will be started; frames in flight are \
                             finished and written (send it again to abandon them)"
                        );
                    } else {
                        warn!("{name} again: abandoning the frames in flight");
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
pub(super) fn start_watchdog(
    hb: Arc<Heartbeat>,
    rank: usize,
    roles: String,
    period: f64,
    abort_after: u32,
) {
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
                    warn!("watchdog: rank {rank} ({roles}) has made no progress for {idle:.0} s; {what}");
                    if periods >= abort_after {
                        error!(
                            "watchdog: rank {rank} gives up after {idle:.0} s without progress; \
                             ending the job"
                        );
                        std::process::exit(3);
                    }
                }
            }
        });
}
