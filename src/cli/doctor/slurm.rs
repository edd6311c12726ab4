//! Slurm: the job and step a run is in, what it allocated (nodes, tasks, CPUs, GPUs, binding),
//! and a job of several tasks without `--cpus-per-task`. A pure function of the variables
//! `run` reads; imports nothing but the findings type.

use super::{lookup, Finding};

/// The Slurm variables doctor reads.
pub(super) const SLURM_VARS: [&str; 15] = [
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
    "SLURM_STEP_ID",
];

pub(super) fn slurm_findings(vars: &[(&str, Option<&str>)]) -> Vec<Finding> {
    let Some(job) = lookup(vars, "SLURM_JOB_ID") else {
        return vec![Finding::ok("slurm", "not in a Slurm job")];
    };
    let labels = [
        ("SLURM_NNODES", "nodes"),
        ("SLURM_NTASKS", "tasks"),
        ("SLURM_NTASKS_PER_NODE", "tasks/node"),
        ("SLURM_TASKS_PER_NODE", "tasks per node"),
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
    let parts: Vec<String> = labels
        .iter()
        .filter_map(|(var, label)| lookup(vars, var).map(|v| format!("{label} {v}")))
        .collect();
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
    if tasks.is_some_and(|t| t > 1) && lookup(vars, "SLURM_CPUS_PER_TASK").is_none() {
        out.push(Finding::warn(
            "slurm",
            "SLURM_CPUS_PER_TASK is unset in a job of several tasks: each task then gets one \
             CPU by default, so each rank runs one thread",
            "request cores per rank with --cpus-per-task=N on sbatch and srun (srun of Slurm \
             22.05 and later does not inherit it from sbatch: export \
             SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK)",
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{statuses, Status};

    #[test]
    fn outside_slurm_is_noted() {
        let f = slurm_findings(&[("SLURM_JOB_ID", None), ("SLURM_NTASKS", Some("4"))]);
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
        let f = slurm_findings(&vars);
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
        let f = slurm_findings(&vars);
        assert_eq!(statuses(&f), [Status::Ok]);
        assert!(f[0].found.contains("cpus/task 16"), "{}", f[0].found);
    }
}
