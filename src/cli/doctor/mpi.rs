//! The MPI library: its name and standard, whether it is CUDA-aware (and whether that fits how
//! spextract was built), the thread level it grants, and how the ranks of the launch sit on
//! nodes. The facts come from `pipeline::env`, which owns every MPI call; this file only
//! judges them, and imports nothing but the findings type and `pipeline::env`.

use std::collections::BTreeMap;

use super::{count, Finding};
use crate::pipeline::env::{self, Threading};

/// Whether the MPI library accepts device buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CudaAware {
    Yes,
    No,
    /// The library exports no `MPIX_Query_cuda_support` (not Open MPI): nothing to ask.
    NotExported,
    /// Exported, but it may only be called after MPI_Init, which a single process skips.
    NotQueried,
}

/// How the ranks of a launch sit on nodes, from their hostnames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct HostLayout {
    pub(super) ranks: usize,
    nodes: usize,
    min_per_node: usize,
    max_per_node: usize,
    /// Ranks on rank 0's node.
    pub(super) on_first_node: usize,
}

pub(super) fn layout_from_hosts(hosts: &[String]) -> HostLayout {
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for h in hosts {
        *per_host.entry(h.as_str()).or_default() += 1;
    }
    HostLayout {
        ranks: hosts.len(),
        nodes: per_host.len(),
        min_per_node: per_host.values().copied().min().unwrap_or(0),
        max_per_node: per_host.values().copied().max().unwrap_or(0),
        on_first_node: hosts.first().map_or(0, |h| per_host[h.as_str()]),
    }
}

/// What the MPI library says about itself and the launch.
pub(super) struct MpiFacts {
    /// `MPI_Get_library_version`, or why it could not be read.
    pub(super) library: Result<String, String>,
    /// `MPI_Get_version`: the MPI standard implemented.
    pub(super) standard: (i32, i32),
    pub(super) cuda_aware: CudaAware,
    /// The thread level MPI_Init_thread granted, when MPI was initialised.
    pub(super) threading: Option<Threading>,
    /// The ranks, when a launcher started this process (MPI is then initialised).
    pub(super) layout: Option<HostLayout>,
}

pub(super) fn mpi_findings(facts: &MpiFacts, built_cuda_aware: bool) -> Vec<Finding> {
    let mut out = Vec::new();
    let (major, minor) = facts.standard;
    out.push(match &facts.library {
        Ok(text) => {
            // MPICH spreads its version over several lines; the first names it.
            let first = text
                .lines()
                .map(|l| l.trim_matches(|c: char| c == '\0' || c.is_whitespace()))
                .find(|l| !l.is_empty())
                .unwrap_or("unnamed library");
            Finding::ok("mpi", format!("{first} (MPI standard {major}.{minor})"))
        }
        Err(e) => Finding::warn(
            "mpi",
            format!("the MPI library's version string is unreadable: {e}"),
            "check which libmpi the binary loads (ldd target/release/spextract | grep mpi)",
        ),
    });
    out.push(match &facts.layout {
        None => Finding::ok(
            "launch",
            "single process: no mpirun/srun variables, MPI not initialised (run doctor under \
             mpirun or srun to see the ranks)",
        ),
        Some(l) => {
            let per_node = if l.min_per_node == l.max_per_node {
                format!("{} per node", l.max_per_node)
            } else {
                format!("{} to {} per node", l.min_per_node, l.max_per_node)
            };
            Finding::ok(
                "launch",
                format!(
                    "{} on {}, {per_node}",
                    count(l.ranks, "rank"),
                    count(l.nodes, "node")
                ),
            )
        }
    });
    if let Some(level) = facts.threading {
        let name = match level {
            Threading::Single => "MPI_THREAD_SINGLE",
            Threading::Funneled => "MPI_THREAD_FUNNELED",
            Threading::Serialized => "MPI_THREAD_SERIALIZED",
            Threading::Multiple => "MPI_THREAD_MULTIPLE",
        };
        out.push(if level >= Threading::Funneled {
            Finding::ok(
                "mpi",
                format!("thread level {name} (extract needs FUNNELED)"),
            )
        } else {
            Finding::fail(
                "mpi",
                format!("thread level {name} only: extract needs MPI_THREAD_FUNNELED"),
                "use an MPI library built with thread support (Open MPI and MPICH are by \
                 default)",
            )
        });
    }
    let feature = if built_cuda_aware {
        "built with the cuda-aware-mpi feature"
    } else {
        "built without the cuda-aware-mpi feature: GPU results travel through host memory"
    };
    out.push(match (facts.cuda_aware, built_cuda_aware) {
        (CudaAware::Yes, _) => Finding::ok("cuda-aware", format!("MPI is CUDA-aware; {feature}")),
        (CudaAware::No, false) => {
            Finding::ok("cuda-aware", format!("MPI is not CUDA-aware; {feature}"))
        }
        (CudaAware::No, true) => Finding::fail(
            "cuda-aware",
            format!("MPI is not CUDA-aware but spextract was {feature}"),
            "device buffers handed to this MPI crash the run: rebuild without \
             --features cuda-aware-mpi, or load a CUDA-aware MPI",
        ),
        (CudaAware::NotExported, false) => Finding::ok(
            "cuda-aware",
            format!("unknown (no MPIX_Query_cuda_support: not Open MPI); {feature}"),
        ),
        (CudaAware::NotExported, true) => Finding::warn(
            "cuda-aware",
            format!("unknown (no MPIX_Query_cuda_support: not Open MPI); spextract was {feature}"),
            "confirm in the MPI library's documentation that it takes device buffers, or \
             rebuild without --features cuda-aware-mpi",
        ),
        (CudaAware::NotQueried, false) => Finding::ok(
            "cuda-aware",
            format!("not asked: MPIX_Query_cuda_support needs MPI_Init; {feature}"),
        ),
        (CudaAware::NotQueried, true) => Finding::warn(
            "cuda-aware",
            format!("not asked (MPIX_Query_cuda_support needs MPI_Init); spextract was {feature}"),
            "run `mpirun -n 1 spextract doctor` to ask the library",
        ),
    });
    out
}

/// What the library says of device buffers: asked only once MPI is initialised, the one
/// precondition Open MPI documents for `MPIX_Query_cuda_support`.
pub(super) fn cuda_aware(mpi_initialised: bool) -> CudaAware {
    if env::mpix_query_cuda_support().is_none() {
        return CudaAware::NotExported;
    }
    if !mpi_initialised {
        return CudaAware::NotQueried;
    }
    match env::mpi_is_cuda_aware() {
        Some(true) => CudaAware::Yes,
        Some(false) => CudaAware::No,
        None => CudaAware::NotExported,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{statuses, with_status, Status};

    fn mpi(cuda_aware: CudaAware, layout: Option<HostLayout>) -> MpiFacts {
        MpiFacts {
            library: Ok("MPICH Version:\t4.1\nMPICH Release date: 2023\n".to_string()),
            standard: (4, 0),
            cuda_aware,
            threading: None,
            layout,
        }
    }

    #[test]
    fn mpi_library_is_named_by_its_first_line() {
        let f = mpi_findings(&mpi(CudaAware::NotExported, None), false);
        assert_eq!(f[0].found, "MPICH Version:\t4.1 (MPI standard 4.0)");
        assert!(f[1].found.starts_with("single process"), "{}", f[1].found);
        assert_eq!(statuses(&f), [Status::Ok; 3]);
        assert!(f[2].found.starts_with("unknown"), "{}", f[2].found);
    }

    #[test]
    fn cuda_aware_build_on_a_plain_mpi_fails() {
        let f = mpi_findings(&mpi(CudaAware::No, None), true);
        assert_eq!(f[2].status, Status::Fail);
        assert!(f[2].hint.as_deref().unwrap().contains("cuda-aware-mpi"));
        let unasked = mpi_findings(&mpi(CudaAware::NotQueried, None), true);
        assert_eq!(unasked[2].status, Status::Warn);
        assert!(unasked[2].hint.as_deref().unwrap().contains("mpirun -n 1"));
        let fine = mpi_findings(&mpi(CudaAware::Yes, None), true);
        assert_eq!(fine[2].status, Status::Ok);
    }

    #[test]
    fn mpi_without_funneled_threads_fails() {
        let mut facts = mpi(CudaAware::NotExported, None);
        facts.threading = Some(Threading::Single);
        let f = mpi_findings(&facts, false);
        let fails = with_status(&f, Status::Fail);
        assert_eq!(fails.len(), 1, "{f:?}");
        assert!(
            fails[0].found.contains("MPI_THREAD_SINGLE only"),
            "{}",
            fails[0].found
        );
        facts.threading = Some(Threading::Multiple);
        let f = mpi_findings(&facts, false);
        assert!(with_status(&f, Status::Fail).is_empty());
        assert!(f.iter().any(|x| x.found.contains("MPI_THREAD_MULTIPLE")));
    }

    #[test]
    fn layout_counts_nodes_and_ranks_per_node() {
        let hosts: Vec<String> = ["a", "a", "b", "a", "b", "c"]
            .iter()
            .map(|h| h.to_string())
            .collect();
        let l = layout_from_hosts(&hosts);
        assert_eq!(
            l,
            HostLayout {
                ranks: 6,
                nodes: 3,
                min_per_node: 1,
                max_per_node: 3,
                on_first_node: 3
            }
        );
        let f = mpi_findings(&mpi(CudaAware::Yes, Some(l)), false);
        assert_eq!(f[1].found, "6 ranks on 3 nodes, 1 to 3 per node");
    }
}
