//! Test-only: the host twins of the kernels and library calls (plain Rust mirroring each
//! stage's algorithm and data layout, one file per stage, with that stage's tests), the CUDA
//! emulator that runs `kernels/*.cu` on the CPU against them (`emu`), and the stages' shared
//! fixture (`scene`). Nothing here is compiled into the binary. Each stage file re-exports its
//! product module (`pub(super) use super::super::<stage>::*`), so that `twins::<stage>` names
//! both the product's layouts and launchers and the twin. May import anything in the crate.

// The twins index host arrays as the kernels do, with sizes the product's layouts have
// already checked; nothing here crosses into CUDA, which is what the parent's lint guards.
#![allow(clippy::cast_possible_truncation)]

mod backend;
mod chi2;
mod decorrelate;
mod emu;
mod model;
mod normal;
pub(super) mod scene;
mod solve;
mod spots;
mod unit;
