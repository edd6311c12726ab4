//! Threads and cores: the worker threads of each compute rank against the cores of the node
//! and the CPU affinity of this process, and the BLAS/OpenMP thread variables, which multiply
//! with the extraction threads. Pure functions of the counts and variables `run` reads through
//! `pipeline::env`; imports nothing but the findings type and `pipeline::env`.

use super::{count, Finding};
use crate::pipeline::env;

/// Where the thread count of a compute rank comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ThreadSource {
    Flag,
    Slurm,
    Affinity,
}

/// The threads a compute rank would run and the cores it would run them on.
pub(super) struct ThreadFacts {
    pub(super) threads: usize,
    pub(super) source: ThreadSource,
    pub(super) ranks_per_node: usize,
    /// Whether `ranks_per_node` is a launch asked about (`--ranks-per-node`), not this one.
    pub(super) hypothetical: bool,
    pub(super) node_cores: usize,
    pub(super) available_cores: usize,
}

pub(super) fn thread_findings(f: &ThreadFacts) -> Vec<Finding> {
    // The ranks of a launch only described on the command line get the cores their binding
    // gives them, which this process cannot know: its own affinity says nothing about them,
    // and without --threads there is no count to add up.
    let unknown = f.hypothetical && f.source == ThreadSource::Affinity;
    let per_rank = if unknown {
        "threads per compute rank: the cores each is bound to (pass --threads to check a count)"
            .to_string()
    } else {
        let source = match f.source {
            ThreadSource::Flag => "from --threads",
            ThreadSource::Slurm => "from SLURM_CPUS_PER_TASK",
            ThreadSource::Affinity => "the cores this process may use",
        };
        format!("{} per compute rank ({source})", count(f.threads, "thread"))
    };
    let mut out = vec![Finding::ok(
        "threads",
        format!(
            "{per_rank}; {} per node; the node has {}, this process may use {}",
            count(f.ranks_per_node, "rank"),
            count(f.node_cores, "core"),
            f.available_cores
        ),
    )];
    if unknown {
        return out;
    }
    if !f.hypothetical && f.threads > f.available_cores {
        out.push(Finding::warn(
            "threads",
            format!(
                "{} per rank, but this process may run on only {} (its CPU affinity): \
                 threads will share cores",
                count(f.threads, "thread"),
                count(f.available_cores, "core")
            ),
            format!(
                "lower --threads to {}, or bind each rank to {} cores (srun --cpus-per-task={}, \
                 mpirun --map-by slot:PE={})",
                f.available_cores, f.threads, f.threads, f.threads
            ),
        ));
    }
    if let Some(msg) = env::oversubscription(f.ranks_per_node, f.threads, f.node_cores) {
        out.push(Finding::warn(
            "threads",
            msg,
            format!(
                "keep ranks per node x threads per rank at or below {} cores",
                f.node_cores
            ),
        ));
    }
    out
}

/// The warning when extract would cut the thread count asked for (see
/// [`env::ThreadCount`]), if it would.
pub(super) fn thread_cut_finding(t: &env::ThreadCount) -> Option<Finding> {
    let why = t.warning()?;
    Some(Finding::warn(
        "threads",
        why,
        format!(
            "ask for at most {} threads per rank (--threads, or srun --cpus-per-task)",
            t.node_cores
        ),
    ))
}

/// Findings on the BLAS thread variables, `(name, value as the process started with it)`.
pub(super) fn blas_findings(vars: &[(&str, Option<&str>)]) -> Vec<Finding> {
    let mut fine = Vec::new();
    let mut out = Vec::new();
    for &(name, value) in vars {
        let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            fine.push(format!("{name} unset"));
            continue;
        };
        // OpenMP also takes a comma list (one count per nesting level); the first level is
        // the one that multiplies with the extraction threads.
        let first = value.split(',').next().unwrap_or(value).trim();
        let fix = format!("unset {name} (spextract then sets it to 1) or export {name}=1");
        match first.parse::<usize>() {
            Ok(1) => fine.push(format!("{name}=1")),
            Ok(0) => out.push(Finding::warn(
                "blas",
                format!("{name}=0: the library picks its own thread count, usually every core"),
                fix,
            )),
            Ok(n) => out.push(Finding::warn(
                "blas",
                format!(
                    "{name}={value}: every extraction thread may start {n} BLAS threads, \
                     oversubscribing the cores"
                ),
                fix,
            )),
            Err(_) => out.push(Finding::warn(
                "blas",
                format!("{name}={value:?} is not a thread count"),
                fix,
            )),
        }
    }
    if !fine.is_empty() {
        out.insert(
            0,
            Finding::ok(
                "blas",
                format!("{} (spextract sets unset ones to 1)", fine.join(", ")),
            ),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{statuses, with_status, Status};

    #[test]
    fn blas_variables_unset_or_one_are_fine() {
        let f = blas_findings(&[
            ("OMP_NUM_THREADS", None),
            ("OPENBLAS_NUM_THREADS", Some("1")),
            ("MKL_NUM_THREADS", Some("  ")),
        ]);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(
            f[0].found.contains("OMP_NUM_THREADS unset"),
            "{}",
            f[0].found
        );
        assert!(
            f[0].found.contains("OPENBLAS_NUM_THREADS=1"),
            "{}",
            f[0].found
        );
        assert!(
            f[0].found.contains("MKL_NUM_THREADS unset"),
            "{}",
            f[0].found
        );
    }

    #[test]
    fn blas_variables_above_one_zero_or_garbage_warn() {
        let f = blas_findings(&[
            ("OMP_NUM_THREADS", Some("8")),
            ("OPENBLAS_NUM_THREADS", Some("0")),
            ("MKL_NUM_THREADS", Some("four")),
        ]);
        assert_eq!(statuses(&f), [Status::Warn; 3]);
        assert!(f[0].found.contains("OMP_NUM_THREADS=8"), "{}", f[0].found);
        assert!(f[1].found.contains("picks its own"), "{}", f[1].found);
        assert!(f[2].found.contains("not a thread count"), "{}", f[2].found);
        for w in &f {
            let hint = w.hint.as_deref().expect("a warning has a fix");
            assert!(hint.starts_with("unset "), "{hint}");
        }
    }

    #[test]
    fn omp_thread_lists_are_judged_by_their_first_level() {
        let ok = blas_findings(&[("OMP_NUM_THREADS", Some("1,4"))]);
        assert_eq!(statuses(&ok), [Status::Ok]);
        let warn = blas_findings(&[("OMP_NUM_THREADS", Some("4,1"))]);
        assert_eq!(statuses(&warn), [Status::Warn]);
    }

    fn threads(threads: usize, ranks: usize, node: usize, available: usize) -> ThreadFacts {
        ThreadFacts {
            threads,
            source: ThreadSource::Flag,
            ranks_per_node: ranks,
            hypothetical: false,
            node_cores: node,
            available_cores: available,
        }
    }

    #[test]
    fn a_thread_count_extract_would_cut_warns() {
        let cut = env::ThreadCount::new(100_000, None, 2, 2);
        let f = thread_cut_finding(&cut).expect("100000 threads on 2 cores is cut");
        assert_eq!(f.status, Status::Warn);
        assert!(f.found.contains("using 8 threads"), "{}", f.found);
        assert!(thread_cut_finding(&env::ThreadCount::new(8, None, 2, 2)).is_none());
    }

    #[test]
    fn threads_within_the_cores_are_fine() {
        let f = thread_findings(&threads(8, 2, 16, 8));
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0]
            .found
            .contains("8 threads per compute rank (from --threads)"));
        assert!(f[0].found.contains("2 ranks per node"), "{}", f[0].found);
    }

    #[test]
    fn oversubscribed_node_warns_with_the_count() {
        let f = thread_findings(&threads(8, 4, 16, 8));
        let warns = with_status(&f, Status::Warn);
        assert_eq!(warns.len(), 1, "{f:?}");
        assert!(
            warns[0].found.contains("32 threads on 16 cores"),
            "{}",
            warns[0].found
        );
    }

    #[test]
    fn more_threads_than_the_affinity_allows_warns() {
        let f = thread_findings(&threads(8, 1, 64, 2));
        let warns = with_status(&f, Status::Warn);
        assert_eq!(warns.len(), 1, "{f:?}");
        assert!(
            warns[0].found.contains("only 2 cores"),
            "{}",
            warns[0].found
        );
        assert!(warns[0].hint.as_deref().unwrap().contains("--threads to 2"));
    }

    #[test]
    fn hypothetical_launch_without_threads_is_not_added_up() {
        // This process may use all 16 cores, but ranks of the launch asked about would not.
        let mut facts = threads(16, 8, 16, 16);
        facts.source = ThreadSource::Affinity;
        facts.hypothetical = true;
        let f = thread_findings(&facts);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("pass --threads"), "{}", f[0].found);
        // With a count given, the node is added up; this process's affinity is not used.
        let mut facts = threads(4, 8, 16, 1);
        facts.hypothetical = true;
        let warns: Vec<String> = with_status(&thread_findings(&facts), Status::Warn)
            .iter()
            .map(|w| w.found.clone())
            .collect();
        assert_eq!(warns.len(), 1, "{warns:?}");
        assert!(warns[0].contains("32 threads on 16 cores"), "{}", warns[0]);
    }
}
