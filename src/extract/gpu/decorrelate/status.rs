//! What the decorrelation reports and how it runs: [`EigenRoute`], the route to each block's
//! eigenpairs, and [`Status`], the outcome of one block (the kernels' codes). Plain data;
//! imports nothing.

/// Where the decorrelation takes each block's eigenpairs from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EigenRoute {
    /// This crate's Jacobi kernel (`decorrelate`): eigenpairs and readout in one launch.
    Jacobi,
    /// cuSOLVER's `XsyevBatched` on the solve's covariance slots, in place, then the readout
    /// kernel (`decorrelate_eigen`).
    Syev,
}

impl EigenRoute {
    /// The route the backend takes where cuSOLVER has `XsyevBatched`: the faster of the two
    /// on an H200 at the real size (`spextract bench`'s library choices; BENCHMARKS.md).
    pub const PREFERRED: EigenRoute = EigenRoute::Syev;

    /// The other route.
    pub fn other(self) -> EigenRoute {
        match self {
            EigenRoute::Jacobi => EigenRoute::Syev,
            EigenRoute::Syev => EigenRoute::Jacobi,
        }
    }

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            EigenRoute::Jacobi => "Jacobi kernel",
            EigenRoute::Syev => "XsyevBatched + readout kernel",
        }
    }
}

/// What happened to one block (`status[b]` of the kernel).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Decorrelated.
    Ok,
    /// A non-finite entry in the lower triangle of `C_ff`.
    NonfiniteInput,
    /// An eigenvalue not positive or not finite: the CPU's `DecorrFailure::BadCovariance`.
    BadEigenvalue,
    /// The Jacobi did not converge within the sweeps allowed (no CPU counterpart: dsyevd has
    /// no such limit; the backend should treat it as a failed patch).
    NotConverged,
    /// A kept bin's flux or fluxivar is not finite: the check after which `cpu::solve` gives
    /// up on the attempt. Unlike the other failures, the outputs are left as computed.
    NonfiniteOutput,
}

impl Status {
    /// The kernel's code (`DECORR_*` in the kernel).
    pub fn code(self) -> i32 {
        match self {
            Status::Ok => 0,
            Status::NonfiniteInput => 1,
            Status::BadEigenvalue => 2,
            Status::NotConverged => 3,
            Status::NonfiniteOutput => 4,
        }
    }

    /// The status of code `c`, None for a code the kernel never writes.
    pub fn from_code(c: i32) -> Option<Status> {
        [
            Status::Ok,
            Status::NonfiniteInput,
            Status::BadEigenvalue,
            Status::NotConverged,
            Status::NonfiniteOutput,
        ]
        .into_iter()
        .find(|s| s.code() == c)
    }
}
