//! Frames to spectra at scale: one frame in memory (`frame`), the list of frames a run must
//! do (`frames`), the process environment (`env`), and the end-of-run summary (`report`).

pub mod env;
pub mod frame;
pub mod frames;
pub mod report;
pub mod run;
