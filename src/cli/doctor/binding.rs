//! The GPU binding a launch would produce: the roles of a node's ranks as the pipeline assigns
//! them (`pipeline::run::Layout`), and the device each compute rank takes
//! (`pipeline::env::gpu_binding`), with a warning for compute ranks left without a GPU.
//! Imports the findings type, the GPU probe of `gpu` (for the devices' labels) and those two.

use super::gpu::GpuProbe;
use super::{count, Finding};
use crate::pipeline::env;
use crate::pipeline::run::Layout;

/// The launch whose GPU binding is shown.
pub(super) struct BindingPlan {
    /// Ranks per node; `None` for a single process, which reads, computes and writes itself.
    pub(super) ranks_per_node: Option<usize>,
    /// Whether the layout is one asked about (`--ranks-per-node`) rather than this launch.
    pub(super) hypothetical: bool,
    pub(super) readers: usize,
    pub(super) writers: usize,
    pub(super) ranks_per_gpu: usize,
    /// A label for each GPU this process sees, in CUDA's device order.
    pub(super) gpus: Vec<String>,
    /// Whether Slurm gives each task its own GPUs.
    pub(super) per_task: bool,
}

/// A label for each GPU the probe found: its index, the CUDA_VISIBLE_DEVICES entry it comes
/// from (`cuda_visible` is the variable, None when unset) and its name.
pub(super) fn gpu_labels(probe: &GpuProbe, cuda_visible: Option<&str>) -> Vec<String> {
    let entries = cuda_visible.map(|v| env::parse_cuda_visible_devices(v).devices);
    (0..probe.device_count())
        .map(|i| {
            let mut label = i.to_string();
            if let Some(entry) = entries.as_ref().and_then(|e| e.get(i)) {
                label.push_str(&format!(" = CUDA_VISIBLE_DEVICES entry {entry}"));
            }
            if let Some(name) = probe.device_name(i) {
                label.push_str(&format!(" ({name})"));
            }
            label
        })
        .collect()
}

fn range_text(first: usize, last: usize) -> String {
    if first == last {
        first.to_string()
    } else {
        format!("{first}-{last}")
    }
}

/// The binding table of one node: roles as [`Layout::new`] assigns them to the node's ranks
/// (readers first, then writers, then compute ranks), and the device of each compute rank.
pub(super) fn binding_findings(p: &BindingPlan) -> Vec<Finding> {
    let Some(ranks) = p.ranks_per_node else {
        let on = match p.gpus.first() {
            Some(g) => format!("on GPU {g}"),
            None => "on the CPU".to_string(),
        };
        return vec![Finding::ok(
            "binding",
            format!("single process: it reads, computes {on} and writes"),
        )];
    };
    let layout = Layout::new(vec![(0..ranks).collect()], p.readers, p.writers);
    let (readers, writers, computes) =
        (&layout.readers[0], &layout.writers[0], &layout.computes[0]);
    let whose = if p.hypothetical {
        "--ranks-per-node"
    } else {
        "this launch"
    };
    let gpus = if p.per_task {
        "each rank gets its own GPUs from Slurm (per-task binding)".to_string()
    } else if p.gpus.is_empty() {
        "no GPU visible".to_string()
    } else {
        format!(
            "{} visible, up to {} each",
            count(p.gpus.len(), "GPU"),
            count(p.ranks_per_gpu, "compute rank")
        )
    };
    let mut out = vec![Finding::ok(
        "binding",
        format!(
            "{whose}: {} per node: {}, {}, {}; {gpus}",
            count(ranks, "rank"),
            count(readers.len(), "reader"),
            count(writers.len(), "writer"),
            count(computes.len(), "compute rank")
        ),
    )];
    let place = |c: usize| -> Option<String> {
        if p.per_task {
            Some("device 0 of its own CUDA_VISIBLE_DEVICES".to_string())
        } else if p.gpus.is_empty() {
            Some("the CPU".to_string())
        } else {
            env::gpu_binding(c, p.gpus.len(), p.ranks_per_gpu).map(|d| format!("GPU {}", p.gpus[d]))
        }
    };
    // Rows of consecutive compute-only ranks on the same place (the CPU, or each rank's own
    // GPU) are folded into one; ranks spread over GPUs get a row each.
    struct Row {
        first: usize,
        last: usize,
        roles: String,
        compute: Option<usize>,
        placed: String,
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut unbound = Vec::new();
    for local in 0..ranks {
        let mut roles = Vec::new();
        if readers.contains(&local) {
            roles.push("reader");
        }
        if writers.contains(&local) {
            roles.push("writer");
        }
        let compute = computes.iter().position(|&r| r == local);
        if compute.is_some() {
            roles.push("compute");
        }
        let roles = roles.join("+");
        let placed = compute.map(|c| {
            place(c).unwrap_or_else(|| {
                unbound.push(local);
                "no GPU left".to_string()
            })
        });
        let placed = placed.unwrap_or_default();
        if let Some(row) = rows.last_mut() {
            if roles == "compute" && row.roles == "compute" && row.placed == placed {
                row.last = local;
                continue;
            }
        }
        rows.push(Row {
            first: local,
            last: local,
            roles,
            compute,
            placed,
        });
    }
    for Row {
        first,
        last,
        roles,
        compute,
        placed,
    } in rows
    {
        let found = match compute {
            None => format!("local rank {first}: {roles}"),
            Some(c) if first == last => format!("local rank {first}: {roles} {c} -> {placed}"),
            Some(c) => format!(
                "local ranks {}: {roles} {} -> {placed}",
                range_text(first, last),
                range_text(c, c + last - first)
            ),
        };
        out.push(Finding::ok("binding", found));
    }
    if let (Some(&first), Some(&last)) = (unbound.first(), unbound.last()) {
        let slots = p.gpus.len() * p.ranks_per_gpu;
        out.push(Finding::warn(
            "binding",
            format!(
                "{} per node but {} x {} per GPU = {slots} places: {} no GPU",
                count(computes.len(), "compute rank"),
                count(p.gpus.len(), "GPU"),
                count(p.ranks_per_gpu, "rank"),
                if first == last {
                    format!("local rank {first} gets")
                } else {
                    format!("local ranks {first}-{last} get")
                }
            ),
            format!(
                "launch {} ranks per node, or raise --ranks-per-gpu to {} if the GPU memory \
                 allows",
                ranks - unbound.len(),
                computes.len().div_ceil(p.gpus.len())
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::doctor::{with_status, Status};

    fn plan(ranks: Option<usize>, gpus: usize, ranks_per_gpu: usize) -> BindingPlan {
        BindingPlan {
            ranks_per_node: ranks,
            hypothetical: true,
            readers: 1,
            writers: 1,
            ranks_per_gpu,
            gpus: (0..gpus).map(|i| format!("{i} (H100)")).collect(),
            per_task: false,
        }
    }

    fn rows(findings: &[Finding]) -> Vec<&str> {
        findings
            .iter()
            .filter(|f| f.found.starts_with("local rank"))
            .map(|f| f.found.as_str())
            .collect()
    }

    #[test]
    fn binding_table_maps_local_ranks_to_gpus() {
        let f = binding_findings(&plan(Some(6), 4, 1));
        assert_eq!(
            f[0].found,
            "--ranks-per-node: 6 ranks per node: 1 reader, 1 writer, 4 compute ranks; 4 GPUs \
             visible, up to 1 compute rank each"
        );
        assert_eq!(
            rows(&f),
            [
                "local rank 0: reader",
                "local rank 1: writer",
                "local rank 2: compute 0 -> GPU 0 (H100)",
                "local rank 3: compute 1 -> GPU 1 (H100)",
                "local rank 4: compute 2 -> GPU 2 (H100)",
                "local rank 5: compute 3 -> GPU 3 (H100)",
            ]
        );
        assert!(with_status(&f, Status::Warn).is_empty());
    }

    #[test]
    fn more_compute_ranks_than_gpu_places_warns() {
        let f = binding_findings(&plan(Some(7), 2, 2));
        assert_eq!(
            rows(&f)[2..],
            [
                "local rank 2: compute 0 -> GPU 0 (H100)",
                "local rank 3: compute 1 -> GPU 1 (H100)",
                "local rank 4: compute 2 -> GPU 0 (H100)",
                "local rank 5: compute 3 -> GPU 1 (H100)",
                "local rank 6: compute 4 -> no GPU left",
            ]
        );
        let warns = with_status(&f, Status::Warn);
        assert_eq!(warns.len(), 1, "{f:?}");
        assert_eq!(
            warns[0].found,
            "5 compute ranks per node but 2 GPUs x 2 ranks per GPU = 4 places: local rank 6 \
             gets no GPU"
        );
        let hint = warns[0].hint.as_deref().unwrap();
        assert!(hint.contains("launch 6 ranks per node"), "{hint}");
        assert!(hint.contains("--ranks-per-gpu to 3"), "{hint}");
    }

    #[test]
    fn binding_on_the_cpu_or_per_task_gpus_folds_compute_ranks() {
        let cpu = binding_findings(&plan(Some(10), 0, 1));
        assert_eq!(
            rows(&cpu),
            [
                "local rank 0: reader",
                "local rank 1: writer",
                "local ranks 2-9: compute 0-7 -> the CPU",
            ]
        );
        let mut per_task = plan(Some(4), 1, 1);
        per_task.per_task = true;
        let f = binding_findings(&per_task);
        assert_eq!(
            rows(&f)[2],
            "local ranks 2-3: compute 0-1 -> device 0 of its own CUDA_VISIBLE_DEVICES"
        );
    }

    #[test]
    fn small_launches_share_roles_as_the_pipeline_does() {
        // Two ranks: one reads and writes, the other computes; one rank does everything.
        let two = binding_findings(&plan(Some(2), 4, 1));
        assert_eq!(
            rows(&two),
            [
                "local rank 0: reader+writer",
                "local rank 1: compute 0 -> GPU 0 (H100)",
            ]
        );
        let one = binding_findings(&plan(Some(1), 0, 1));
        assert_eq!(
            rows(&one),
            ["local rank 0: reader+writer+compute 0 -> the CPU"]
        );
        assert!(with_status(&one, Status::Warn).is_empty());
        let single = binding_findings(&plan(None, 1, 1));
        assert_eq!(single.len(), 1);
        assert_eq!(
            single[0].found,
            "single process: it reads, computes on GPU 0 (H100) and writes"
        );
    }
}
