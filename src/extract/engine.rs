//! Which backend computes: `--backend` as a type ([`BackendKind`]), what it resolves to on
//! this machine ([`choose`]), and the factory that starts it ([`start`]) on the device that the
//! caller's binding policy picks (the pipeline's, which knows the ranks). Imports `cpu` and
//! `gpu` (its device probe, library checks and backend).

use super::cpu::CpuBackend;
use super::gpu::backend::GpuBackend;
use super::gpu::device::{probe, DeviceInfo};
use super::gpu::GpuError;
use super::Backend;

/// The `--backend` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// A GPU when one works, else the CPU.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// The GPU backend, or an error saying why not.
    Gpu,
}

impl BackendKind {
    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Auto => "auto",
            BackendKind::Cpu => "cpu",
            BackendKind::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<BackendKind, String> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "gpu" => Ok(BackendKind::Gpu),
            other => Err(format!("--backend {other}: expected auto, cpu or gpu")),
        }
    }
}

/// Which backend runs, and why: the decision `--backend` leads to on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The CPU backend, with the reason when a GPU was asked for or looked for.
    Cpu(String),
    /// The GPU backend, on the devices found.
    Gpu(String),
}

/// Resolves `kind`. `Gpu` takes the GPU backend when a device works and fails with the reason
/// otherwise. `Auto` takes it when a device is visible and the CUDA libraries the backend needs
/// load (and, in [`start`], when the backend then starts), else the CPU, saying why.
pub fn choose(kind: BackendKind) -> Result<Choice, GpuError> {
    let found = |devs: &[DeviceInfo]| {
        format!(
            "{} GPU(s): {}",
            devs.len(),
            devs.iter()
                .map(|d| format!("{} sm_{}{}", d.name, d.arch.0, d.arch.1))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    match kind {
        BackendKind::Cpu => Ok(Choice::Cpu("--backend cpu".into())),
        BackendKind::Gpu => match probe() {
            Ok(devs) => Ok(Choice::Gpu(format!("--backend gpu on {}", found(&devs)))),
            Err(e) => Err(GpuError::NoDevice(format!("--backend gpu: {e}"))),
        },
        BackendKind::Auto => Ok(match probe().and_then(|devs| libraries().map(|()| devs)) {
            Ok(devs) => Choice::Gpu(format!("auto: GPU on {}", found(&devs))),
            Err(e) => Choice::Cpu(format!("auto: CPU ({e})")),
        }),
    }
}

/// Whether the CUDA libraries the GPU backend calls load: cuBLAS and cuSOLVER with every
/// routine it uses, and NVRTC.
fn libraries() -> Result<(), GpuError> {
    super::gpu::solve::check_libraries()?;
    super::gpu::ptx::require_nvrtc()
}

/// A started backend, held as what it is: the GPU's (whose device the cuda-aware-mpi path
/// reaches into), or the CPU's.
pub enum Engine {
    /// The GPU backend.
    Gpu(Box<GpuBackend>),
    /// The CPU backend.
    Cpu(CpuBackend),
}

impl Engine {
    /// As a backend.
    pub fn backend(&mut self) -> &mut dyn Backend {
        match self {
            Engine::Gpu(b) => b.as_mut(),
            Engine::Cpu(c) => c,
        }
    }

    /// As an owned backend.
    pub fn boxed(self) -> Box<dyn Backend> {
        match self {
            Engine::Gpu(b) => b,
            Engine::Cpu(c) => Box::new(c),
        }
    }
}

/// Starts `kind`: the CPU backend, or the GPU backend on the visible device that `bind` picks
/// from the number visible (the caller's binding policy; it says why when there is none).
/// Under `Auto`, a GPU backend that does not start leaves the CPU backend, with a warning.
pub fn start(
    kind: BackendKind,
    bind: impl FnOnce(usize) -> Result<usize, String>,
) -> Result<Engine, GpuError> {
    let cpu = || Engine::Cpu(CpuBackend);
    match kind {
        BackendKind::Gpu => {}
        BackendKind::Auto if matches!(choose(kind)?, Choice::Gpu(_)) => {}
        _ => return Ok(cpu()),
    }
    let started = probe()
        .and_then(|devs| bind(devs.len()).map_err(GpuError::NoDevice))
        .and_then(|ordinal| Ok((ordinal, GpuBackend::new(ordinal)?)));
    match started {
        Ok((ordinal, b)) => {
            tracing::info!("GPU {ordinal} ({})", b.device().name);
            Ok(Engine::Gpu(Box::new(b)))
        }
        Err(e) if kind == BackendKind::Auto => {
            tracing::warn!(
                "the GPU backend did not start ({e}); the CPU backend runs instead (auto)"
            );
            Ok(cpu())
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a GPU (CI, most laptops) `auto` falls back to the CPU and says why; `gpu` is an
    /// error naming the reason. With a working GPU and its libraries, both take it.
    #[test]
    fn backend_choice_falls_back_or_fails_clearly() {
        let gpu_works = probe().is_ok() && libraries().is_ok();
        match choose(BackendKind::Auto).unwrap() {
            Choice::Cpu(why) => {
                assert!(
                    !gpu_works,
                    "auto stayed on the CPU beside a working GPU: {why}"
                );
                assert!(why.starts_with("auto: CPU ("), "{why}");
            }
            Choice::Gpu(why) => {
                assert!(gpu_works, "{why}");
                assert!(why.starts_with("auto: GPU on "), "{why}");
            }
        }
        match choose(BackendKind::Gpu) {
            Err(e) => assert!(e.to_string().starts_with("--backend gpu: "), "{e}"),
            Ok(Choice::Gpu(why)) => assert!(why.starts_with("--backend gpu on "), "{why}"),
            Ok(c) => panic!("--backend gpu gave {c:?}"),
        }
        if !gpu_works {
            // Without a working GPU, auto hands out the CPU backend.
            let e = start(BackendKind::Auto, |_| Ok(0)).unwrap();
            assert_eq!(e.boxed().name(), "cpu");
        }
        assert!(choose(BackendKind::Cpu).is_ok());
        assert!("tpu"
            .parse::<BackendKind>()
            .unwrap_err()
            .contains("expected auto, cpu or gpu"));
        for k in [BackendKind::Auto, BackendKind::Cpu, BackendKind::Gpu] {
            assert_eq!(k.name().parse::<BackendKind>().unwrap(), k);
        }
    }
}
