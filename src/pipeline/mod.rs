//! Frames to spectra at scale: one frame in memory (`frame`), the list of frames a run must
//! do (`joblist`) and what each was asked for (`request`), the variance from the model
//! (`ivar_model`), the process environment (`env`), work units (`unit`), the ranks and their
//! messages (`run`, `comm`; `device_path` in the cuda-aware-mpi build, where a GPU rank's
//! units travel in device memory), the end-of-run summary (`report`) and
//! what an operator reads meanwhile (`progress`).

pub mod comm;
#[cfg(feature = "cuda-aware-mpi")]
pub mod device_path;
pub mod env;
pub mod frame;
pub mod ivar_model;
pub mod joblist;
pub mod prepare;
pub mod progress;
pub mod report;
pub mod request;
pub mod run;
pub mod unit;
