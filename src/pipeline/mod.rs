//! Running extractions: one frame end to end (`frame`), and later the ranks and roles of an MPI
//! job.

pub mod frame;
