//! Slurm: the job and step a run is in, what it allocated (nodes, tasks, CPUs, GPUs, binding),
//! a job of several tasks without `--cpus-per-task` or with one that is not a count, and a CPU
//! binding asked for but not applied. A pure function of the variables and process facts `run`
//! reads; imports nothing but the findings type.

use super::{count, lookup, Finding};

/// What the process knows of its own threads and cores, to hold Slurm's variables against.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProcessFacts {
    /// The threads a compute rank would start (as the threads finding says).
    pub(super) threads: usize,
    /// The cores this process may run on (its affinity).
    pub(super) available_cores: usize,
    /// The cores of the node.
    pub(super) node_cores: usize,
}

/// The Slurm variables doctor reads.
pub(super) const SLURM_VARS: [&str; 16] = [
    "SLURM_JOB_ID",
    "SLURM_NNODES",
    "SLURM_NTASKS",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE",
    "SLURM_GPUS_PER_NODE",
    "SLURM_GPUS_ON_NODE",
    "SLURM_GPUS_PER_TASK",
    "SLURM_JOB_GPUS",
    "SLURM_STEP_GPUS",
    "SLURM_GPU_BIND",
    "SLURM_CPU_BIND",
    "SLURM_CPU_BIND_TYPE",
    "SLURM_STEP_ID",
];

pub(super) fn slurm_findings(vars: &[(&str, Option<&str>)], p: ProcessFacts) -> Vec<Finding> {
    let Some(job) = lookup(vars, "SLURM_JOB_ID") else {
        return vec![Finding::ok("slurm", "not in a Slurm job")];
    };
    let labels = [
        ("SLURM_NNODES", "nodes"),
        ("SLURM_NTASKS", "tasks"),
        // The layout Slurm made ("4(x2)"); the request (--ntasks-per-node) only when that is
        // missing, since both would say the same twice.
        ("SLURM_TASKS_PER_NODE", "tasks per node"),
        ("SLURM_NTASKS_PER_NODE", "tasks per node"),
        ("SLURM_CPUS_PER_TASK", "cpus/task"),
        ("SLURM_CPUS_ON_NODE", "cpus on node"),
        ("SLURM_GPUS_PER_NODE", "gpus/node"),
        ("SLURM_GPUS_ON_NODE", "gpus on node"),
        ("SLURM_GPUS_PER_TASK", "gpus/task"),
        ("SLURM_JOB_GPUS", "job gpus"),
        ("SLURM_STEP_GPUS", "step gpus"),
        ("SLURM_GPU_BIND", "gpu-bind"),
        ("SLURM_CPU_BIND", "cpu-bind"),
    ];
    let mut parts: Vec<String> = Vec::new();
    for (var, label) in labels {
        if let Some(v) = lookup(vars, var) {
            if !parts.iter().any(|p| p.starts_with(&format!("{label} "))) {
                parts.push(format!("{label} {v}"));
            }
        }
    }
    let step = match lookup(vars, "SLURM_STEP_ID") {
        Some(s) => format!(", step {s}"),
        None => String::new(),
    };
    let details = if parts.is_empty() {
        String::new()
    } else {
        format!(": {}", parts.join(", "))
    };
    let mut out = vec![Finding::ok("slurm", format!("job {job}{step}{details}"))];
    let tasks = lookup(vars, "SLURM_NTASKS").and_then(|v| v.parse::<usize>().ok());
    let threads = count(p.threads, "thread");
    match lookup(vars, "SLURM_CPUS_PER_TASK") {
        Some(v) if !v.parse::<usize>().is_ok_and(|n| n > 0) => out.push(Finding::warn(
            "slurm",
            format!(
                "SLURM_CPUS_PER_TASK={v:?} is not a CPU count: extract ignores it and each \
                 compute rank runs {threads}"
            ),
            "give --cpus-per-task a whole number on sbatch and srun, or unset \
             SLURM_CPUS_PER_TASK and pass --threads N",
        )),
        None if tasks.is_some_and(|t| t > 1) => {
            // What the ranks will do, in the words of the threads finding: one thread when
            // Slurm bound each task to its one CPU, more when nothing bound them.
            let then = if p.threads == 1 {
                "so each rank runs one thread".to_string()
            } else {
                format!(
                    "yet each compute rank would start {threads} (the cores this process may \
                     use), which share the CPUs Slurm allocated"
                )
            };
            out.push(Finding::warn(
                "slurm",
                format!(
                    "SLURM_CPUS_PER_TASK is unset in a job of several tasks: Slurm allocates \
                     one CPU per task by default, {then}"
                ),
                "request cores per rank with --cpus-per-task=N on sbatch and srun (srun of \
                 Slurm 22.05 and later does not inherit it from sbatch: export \
                 SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK)",
            ));
        }
        _ => {}
    }
    out.extend(cpu_bind_finding(vars, p));
    out
}

/// A CPU binding srun was asked for that left this rank free to run on every core of the node:
/// Slurm's task plugin did not bind (task/none, or a plugin that failed), so ranks and their
/// threads share all cores, whatever `--cpu-bind` says.
fn cpu_bind_finding(vars: &[(&str, Option<&str>)], p: ProcessFacts) -> Option<Finding> {
    let bind = lookup(vars, "SLURM_CPU_BIND_TYPE").or_else(|| lookup(vars, "SLURM_CPU_BIND"))?;
    let kinds = [
        "cores", "threads", "sockets", "ldoms", "rank", "map_cpu", "mask_cpu",
    ];
    let asked = bind
        .split([',', ':'])
        .any(|k| kinds.contains(&k.trim_end_matches('_')));
    let per_node_tasks = lookup(vars, "SLURM_NTASKS")
        .and_then(|t| t.parse::<usize>().ok())
        .unwrap_or(1)
        .div_ceil(
            lookup(vars, "SLURM_NNODES")
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(1)
                .max(1),
        );
    (asked && per_node_tasks > 1 && p.available_cores >= p.node_cores && p.node_cores > 1).then(
        || {
            Finding::warn(
                "binding",
                format!(
                    "srun was asked to bind CPUs ({bind}), but this rank may run on all {} of \
                     the node: nothing was bound",
                    count(p.node_cores, "core")
                ),
                "Slurm's TaskPlugin does not bind here (task/none; scontrol show config | grep \
                 TaskPlugin): ask for task/affinity or task/cgroup, or give --threads so that \
                 ranks x threads stays within the cores",
            )
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{statuses, Status};

    /// One thread on one core of a 16-core node: what a bound single-CPU task sees.
    const BOUND: ProcessFacts = ProcessFacts {
        threads: 1,
        available_cores: 1,
        node_cores: 16,
    };

    #[test]
    fn outside_slurm_is_noted() {
        let f = slurm_findings(
            &[("SLURM_JOB_ID", None), ("SLURM_NTASKS", Some("4"))],
            BOUND,
        );
        assert_eq!(f, [Finding::ok("slurm", "not in a Slurm job")]);
    }

    #[test]
    fn slurm_job_is_summarised_and_a_missing_cpus_per_task_warns() {
        let mut vars = vec![
            ("SLURM_JOB_ID", Some("4242")),
            ("SLURM_NNODES", Some("2")),
            ("SLURM_NTASKS", Some("8")),
            ("SLURM_TASKS_PER_NODE", Some("4(x2)")),
            ("SLURM_GPUS_ON_NODE", Some("4")),
            ("SLURM_CPUS_PER_TASK", None),
        ];
        let f = slurm_findings(&vars, BOUND);
        assert_eq!(statuses(&f), [Status::Ok, Status::Warn]);
        assert!(
            f[0].found.starts_with("job 4242: nodes 2, tasks 8"),
            "{}",
            f[0].found
        );
        assert!(
            f[0].found.contains("tasks per node 4(x2)"),
            "{}",
            f[0].found
        );
        assert!(f[0].found.contains("gpus on node 4"), "{}", f[0].found);
        assert!(f[1].hint.as_deref().unwrap().contains("SRUN_CPUS_PER_TASK"));
        vars[5].1 = Some("16");
        let f = slurm_findings(&vars, BOUND);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("cpus/task 16"), "{}", f[0].found);
    }

    /// `srun -n 2` without `-c` where nothing binds: the threads line says 2 threads per rank,
    /// and the Slurm line must not say one; the layout is named once.
    #[test]
    fn without_cpus_per_task_the_warning_says_what_the_ranks_will_run() {
        let vars = [
            ("SLURM_JOB_ID", Some("7")),
            ("SLURM_NTASKS", Some("2")),
            ("SLURM_NTASKS_PER_NODE", Some("2")),
            ("SLURM_TASKS_PER_NODE", Some("2")),
        ];
        let free = ProcessFacts {
            threads: 2,
            available_cores: 2,
            node_cores: 2,
        };
        let f = slurm_findings(&vars, free);
        assert_eq!(statuses(&f), [Status::Ok, Status::Warn]);
        assert_eq!(
            f[0].found.matches("tasks per node").count(),
            1,
            "{}",
            f[0].found
        );
        assert!(!f[0].found.contains("tasks/node"), "{}", f[0].found);
        assert!(
            f[1].found
                .contains("each compute rank would start 2 threads")
                && !f[1].found.contains("one thread"),
            "{}",
            f[1].found
        );
        // Bound to the one CPU each, the ranks do run one thread.
        let f = slurm_findings(&vars, BOUND);
        assert!(
            f[1].found.contains("each rank runs one thread"),
            "{}",
            f[1].found
        );
        // The request alone still names the layout.
        let f = slurm_findings(&vars[..3], BOUND);
        assert!(f[0].found.contains("tasks per node 2"), "{}", f[0].found);
    }

    #[test]
    fn a_cpus_per_task_that_is_not_a_count_warns() {
        for bad in ["abc", "0", "-4"] {
            let vars = [
                ("SLURM_JOB_ID", Some("7")),
                ("SLURM_NTASKS", Some("4")),
                ("SLURM_CPUS_PER_TASK", Some(bad)),
            ];
            let f = slurm_findings(&vars, BOUND);
            assert_eq!(statuses(&f), [Status::Ok, Status::Warn], "{bad}: {f:?}");
            assert!(
                f[1].found
                    .contains(&format!("SLURM_CPUS_PER_TASK=\"{bad}\" is not a CPU count")),
                "{}",
                f[1].found
            );
        }
    }

    /// `srun --cpu-bind=cores` under TaskPlugin=task/none: the variable says cores, the
    /// affinity says the whole node.
    #[test]
    fn a_cpu_binding_that_bound_nothing_warns() {
        let vars = [
            ("SLURM_JOB_ID", Some("7")),
            ("SLURM_NNODES", Some("1")),
            ("SLURM_NTASKS", Some("2")),
            ("SLURM_CPUS_PER_TASK", Some("1")),
            ("SLURM_CPU_BIND", Some("quiet,cores")),
            ("SLURM_CPU_BIND_TYPE", Some("cores,")),
        ];
        let unbound = ProcessFacts {
            threads: 1,
            available_cores: 2,
            node_cores: 2,
        };
        let f = slurm_findings(&vars, unbound);
        assert_eq!(statuses(&f), [Status::Ok, Status::Warn], "{f:?}");
        assert_eq!(f[1].topic, "binding");
        assert!(f[1].found.contains("nothing was bound"), "{}", f[1].found);
        assert!(f[1].hint.as_deref().unwrap().contains("TaskPlugin"));
        // Bound: this rank sees its own core only.
        let bound = ProcessFacts {
            available_cores: 1,
            ..unbound
        };
        assert_eq!(statuses(&slurm_findings(&vars, bound)), [Status::Ok]);
        // No binding asked for: nothing to miss.
        let mut none = vars;
        none[4].1 = Some("none");
        none[5].1 = Some("none");
        assert_eq!(statuses(&slurm_findings(&none, unbound)), [Status::Ok]);
    }
}
