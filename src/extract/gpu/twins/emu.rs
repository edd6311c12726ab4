//! The CUDA C kernels themselves, run on the CPU: each kernel file is compiled with the host's
//! C++ compiler against a small emulation layer (`kernels/emu/cuda_emu.h`: blocks one after
//! the other, a block's threads as OS threads, `__syncthreads`/`__syncwarp` as barriers,
//! shuffles, integer atomics, IEEE `__d*_rn` intrinsics, dynamic shared memory poisoned with
//! NaN at every block) and launched with the grid, block and shared memory its launcher uses,
//! on inputs built by the launchers' own layout code. Its outputs, poisoned with NaN
//! beforehand, are compared with the host twins: bit for bit where the twin promises it
//! (normal.cu, chi2.cu, decorrelate.cu), relative to each spot's peak for spots.cu (glibc's
//! `erf` against the `libm` crate's).
//!
//! What this checks that the twin tests do not: that the CUDA source does what its twin does
//! (indexing, barriers, shared-memory carve-up, argument order). What it cannot check: CUDA's
//! own arithmetic (FMA contraction under `--fmad=true`, CUDA's `erf`/`exp`), timing-dependent
//! races that the CPU schedule happens not to show, and anything about the real hardware.
//!
//! Without a C++ compiler the tests skip with a message; with `SPEXTRACT_REQUIRE_EMU=1` (CI)
//! they fail instead. A launch that does not finish within its time limit (a barrier
//! deadlock) fails the test.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::extract::gpu::launch::{KernelParams, KERNELS};
use crate::extract::gpu::ptx::expanded;
use cudarc::driver::LaunchConfig;

/// The emulation layer, written next to each runner program.
const HEADER: &str = include_str!("../../../../kernels/emu/cuda_emu.h");
/// How long one launch may run before it counts as hung.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(180);

/// The C++ compiler and the flags the runners are built with.
struct Toolchain {
    cxx: String,
    flags: Vec<&'static str>,
}

/// The compiler (`$CXX`, else g++, c++, clang++), with AddressSanitizer and UBSan when they
/// link (out-of-bounds reads and writes, of shared memory too, and signed overflow then
/// abort the launch). None when no compiler runs.
fn toolchain() -> Option<&'static Toolchain> {
    static TOOLCHAIN: OnceLock<Option<Toolchain>> = OnceLock::new();
    TOOLCHAIN
        .get_or_init(|| {
            let candidates = std::env::var("CXX")
                .ok()
                .into_iter()
                .chain(["g++", "c++", "clang++"].map(String::from));
            let cxx = candidates.into_iter().find(|c| {
                Command::new(c)
                    .arg("--version")
                    .output()
                    .is_ok_and(|o| o.status.success())
            })?;
            let mut flags = vec!["-std=c++20", "-O1", "-ffp-contract=off", "-pthread", "-g0"];
            let sanitizers = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"];
            let dir = tempfile::tempdir().ok()?;
            let probe = dir.path().join("probe.cc");
            std::fs::write(&probe, "#include <barrier>\nint main() { return 0; }\n").ok()?;
            let links = Command::new(&cxx)
                .args(&flags)
                .args(sanitizers)
                .arg(&probe)
                .arg("-o")
                .arg(dir.path().join("probe"))
                .output()
                .is_ok_and(|o| o.status.success());
            if links {
                flags.extend(sanitizers);
            } else {
                eprintln!("emu: {cxx} cannot link the sanitizers; running without them");
            }
            Some(Toolchain { cxx, flags })
        })
        .as_ref()
}

/// The toolchain, or None after a skip message (a failure when `SPEXTRACT_REQUIRE_EMU=1`).
fn toolchain_or_skip() -> Option<&'static Toolchain> {
    let t = toolchain();
    if t.is_none() {
        assert!(
            std::env::var("SPEXTRACT_REQUIRE_EMU").map_or(true, |v| v != "1"),
            "SPEXTRACT_REQUIRE_EMU=1 but no C++ compiler (g++, c++, clang++ or $CXX) runs"
        );
        eprintln!("skipping: no C++ compiler to run the kernels on the CPU (install g++)");
    }
    t
}

/// A launch argument: an `int`, a buffer (its bytes; written back), or a
/// parameter struct passed by value (its bytes, and where its device addresses go: `(byte
/// offset, argument index of the buffer)`, patched by the runner with the buffer's address).
enum Arg {
    I(i32),
    P(Vec<u8>),
    S(Vec<u8>, Vec<(u32, u32)>),
}

impl Arg {
    fn kind(&self) -> char {
        match self {
            Arg::I(_) => 'i',
            Arg::P(_) => 'p',
            Arg::S(..) => 's',
        }
    }
}

/// What a parameter struct holds for the address of a launch's buffer `k` (its argument
/// index): a value no size, double or real address takes, which the launch turns into a patch.
const BUF_TAG: u64 = 0xB0F0_0000_0000_0000;

/// The argument index of the buffer whose stand-in address a parameter struct holds, for
/// reading it back from [`Out`].
fn at(addr: u64) -> usize {
    assert_eq!(
        addr & !0xffff,
        BUF_TAG,
        "{addr:#x} is not a buffer of this launch"
    );
    (addr & 0xffff) as usize
}

/// The buffers of a struct launch, in the order added; argument 0 is the struct.
#[derive(Default)]
struct Bufs(Vec<Arg>);

impl Bufs {
    /// Adds a buffer (an [`Arg::P`]) and returns the address the parameter struct holds for it.
    fn add(&mut self, buf: Arg) -> u64 {
        assert!(matches!(buf, Arg::P(_)), "only buffers have addresses");
        self.0.push(buf);
        BUF_TAG | self.0.len() as u64
    }
}

/// The bytes of a parameter struct.
fn bytes_of<P: KernelParams>(p: &P) -> Vec<u8> {
    // SAFETY: P is a #[repr(C)] struct of i32, f64 and u64 fields without padding (checked
    // against FIELDS by launch.rs's layout test), so all size_of::<P>() bytes are initialised.
    unsafe { std::slice::from_raw_parts((p as *const P).cast::<u8>(), std::mem::size_of::<P>()) }
        .to_vec()
}

fn int(v: usize) -> Arg {
    Arg::I(i32::try_from(v).expect("an int argument overflows i32"))
}

fn f64s(v: &[f64]) -> Arg {
    Arg::P(v.iter().flat_map(|x| x.to_ne_bytes()).collect())
}

fn i32s(v: &[i32]) -> Arg {
    Arg::P(v.iter().flat_map(|x| x.to_ne_bytes()).collect())
}

fn i64s(v: &[i64]) -> Arg {
    Arg::P(v.iter().flat_map(|x| x.to_ne_bytes()).collect())
}

fn nan(n: usize) -> Arg {
    f64s(&vec![f64::NAN; n])
}

/// One kernel launch.
struct Launch<'a> {
    kernel: &'a str,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    smem: usize,
    args: Vec<Arg>,
}

impl<'a> Launch<'a> {
    /// A launch of `kernel` as its launcher configures it (`cfg`, from the launcher's own
    /// function), passing `params` by value with `bufs` behind its addresses.
    fn with_params<P: KernelParams>(
        kernel: &'a str,
        cfg: &LaunchConfig,
        params: &P,
        bufs: Bufs,
    ) -> Launch<'a> {
        let bytes = bytes_of(params);
        let mut ptrs = Vec::new();
        for (field, off, size) in P::FIELDS {
            if *size != 8 {
                continue;
            }
            let v = u64::from_ne_bytes(bytes[*off..off + 8].try_into().unwrap());
            if v & !0xffff == BUF_TAG {
                let k = at(v);
                assert!(
                    (1..=bufs.0.len()).contains(&k),
                    "{kernel}: {field} is no buffer"
                );
                ptrs.push((*off as u32, k as u32));
            }
        }
        let mut refs: Vec<u32> = ptrs.iter().map(|p| p.1).collect();
        refs.sort_unstable();
        assert_eq!(
            refs,
            (1..=bufs.0.len() as u32).collect::<Vec<_>>(),
            "{kernel}: every buffer is behind exactly one address"
        );
        let mut args = vec![Arg::S(bytes, ptrs)];
        args.extend(bufs.0);
        Launch {
            kernel,
            grid: cfg.grid_dim,
            block: cfg.block_dim,
            smem: cfg.shared_mem_bytes as usize,
            args,
        }
    }
}

/// Every argument after the launch: the buffers as the kernel left them, None for scalars.
struct Out(Vec<Option<Vec<u8>>>);

impl Out {
    fn bytes(&self, k: usize) -> &[u8] {
        self.0[k]
            .as_deref()
            .unwrap_or_else(|| panic!("argument {k} is not a buffer"))
    }

    fn f64s(&self, k: usize) -> Vec<f64> {
        self.bytes(k)
            .chunks_exact(8)
            .map(|c| f64::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i32s(&self, k: usize) -> Vec<i32> {
        self.bytes(k)
            .chunks_exact(4)
            .map(|c| i32::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn i64s(&self, k: usize) -> Vec<i64> {
        self.bytes(k)
            .chunks_exact(8)
            .map(|c| i64::from_ne_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// `extern __shared__ T name[];` (dynamic shared memory, which a function static cannot
/// express) rewritten to a pointer into the launch's dynamic shared memory.
fn rewrite_dynamic_shared(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    for line in src.lines() {
        let t = line.trim_start();
        if let Some(decl) = t.strip_prefix("extern __shared__ ") {
            let indent = &line[..line.len() - t.len()];
            let (ty, name) = decl
                .trim()
                .strip_suffix("[];")
                .and_then(|d| d.rsplit_once(char::is_whitespace))
                .unwrap_or_else(|| panic!("unexpected dynamic shared memory line: {line}"));
            out += &format!(
                "{indent}{ty}* const {name} = reinterpret_cast<{ty}*>(emu_dynamic_smem());\n"
            );
        } else {
            out += line;
            out.push('\n');
        }
    }
    out
}

/// The runner program: the emulation header, the kernel source, and a `main` that reads a
/// launch description, calls entry point `name` with its arguments (kinds `i` int, `p` buffer;
/// "s" for one parameter struct) on every thread of the grid and writes the buffers back.
fn runner_source(source: &str, entries: &[(String, String)]) -> String {
    let mut s = String::from("#include \"cuda_emu.h\"\n#line 1 \"kernel.cu\"\n");
    s += source;
    s += "\n// ---- generated runner ----\nint main(int argc, char** argv)\n{\n";
    s += "    if (argc != 3) { std::fprintf(stderr, \"usage: runner IN OUT\\n\"); return 2; }\n";
    s += "    FILE* in = std::fopen(argv[1], \"rb\");\n";
    s += "    if (!in) { std::perror(argv[1]); return 2; }\n";
    s += "    EmuLaunch l = emu_read_launch(in);\n    std::fclose(in);\n";
    for (name, kinds) in entries {
        if kinds == "s" {
            // One parameter struct: emu_call takes its type from the kernel's signature.
            s += &format!(
                "    if (l.name == \"{name}\") {{\n        emu_call({name}, l);\n    }} else\n"
            );
            continue;
        }
        let n = kinds.len();
        s += &format!("    if (l.name == \"{name}\") {{\n");
        s += &format!(
            "        if (l.args.size() != {n}) {{ std::fprintf(stderr, \"cuda_emu: {name} takes \
             {n} arguments\\n\"); return 5; }}\n"
        );
        for (k, c) in kinds.chars().enumerate() {
            s += &format!("        const auto a{k} = l.{c}({k});\n");
        }
        let call: Vec<String> = (0..n).map(|k| format!("a{k}")).collect();
        s += &format!(
            "        emu_launch(l.grid, l.block, l.smem, [&] {{ {name}({}); }});\n    }} else\n",
            call.join(", ")
        );
    }
    s += "    { std::fprintf(stderr, \"cuda_emu: no kernel %s\\n\", l.name.c_str()); return 7; }\n";
    s += "    FILE* out = std::fopen(argv[2], \"wb\");\n";
    s += "    if (!out) { std::perror(argv[2]); return 2; }\n";
    s += "    emu_write_buffers(out, l);\n    return std::fclose(out) == 0 ? 0 : 2;\n}\n";
    s
}

/// A compiled runner in a temporary directory (removed with it).
struct Program {
    dir: tempfile::TempDir,
    exe: PathBuf,
    entries: Vec<(String, String)>,
}

/// Runners alive in this process, by source hash, so that tests running at the same time
/// compile a source once. Weak: a runner's directory goes when its last user drops it.
type Compiled = Arc<Mutex<Weak<Program>>>;

fn compiled() -> &'static Mutex<HashMap<u64, Compiled>> {
    static CACHE: OnceLock<Mutex<HashMap<u64, Compiled>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

impl Program {
    /// Compiles `source` (a kernel file's text, includes expanded) with entry points
    /// `entries` (name, argument kinds as the runner takes them); cached by source within the process.
    fn build(
        tc: &Toolchain,
        source: &str,
        entries: &[(&str, &str)],
    ) -> Result<Arc<Program>, String> {
        let entries: Vec<(String, String)> = entries
            .iter()
            .map(|(n, k)| (n.to_string(), k.to_string()))
            .collect();
        let text = runner_source(&rewrite_dynamic_shared(source), &entries);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        std::hash::Hash::hash(&(&text, HEADER, &tc.flags), &mut h);
        let key = std::hash::Hasher::finish(&h);
        let slot = compiled().lock().unwrap().entry(key).or_default().clone();
        let mut slot = slot.lock().unwrap();
        if let Some(p) = slot.upgrade() {
            return Ok(p);
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        std::fs::write(dir.path().join("cuda_emu.h"), HEADER).map_err(|e| e.to_string())?;
        let src = dir.path().join("runner.cc");
        std::fs::write(&src, &text).map_err(|e| e.to_string())?;
        let exe = dir.path().join("runner");
        let t0 = Instant::now();
        let out = Command::new(&tc.cxx)
            .args(&tc.flags)
            .arg("-I")
            .arg(dir.path())
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .map_err(|e| format!("{}: {e}", tc.cxx))?;
        if !out.status.success() {
            return Err(format!(
                "{} could not compile the runner:\n{}",
                tc.cxx,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        eprintln!(
            "emu: compiled {} in {:.1} s",
            names.join(", "),
            t0.elapsed().as_secs_f64()
        );
        let p = Arc::new(Program { dir, exe, entries });
        *slot = Arc::downgrade(&p);
        Ok(p)
    }

    /// The runner of kernel file `file` (every entry point launch::KERNELS lists for it),
    /// its text passed through `edit` first (the tests plant bugs that way).
    fn kernel_file(
        tc: &Toolchain,
        file: &str,
        edit: impl Fn(String) -> String,
    ) -> Result<Arc<Program>, String> {
        let src = edit(expanded(file).map_err(|e| e.to_string())?);
        let entries: Vec<(&str, &str)> = KERNELS
            .iter()
            .filter(|k| k.0 == file)
            .map(|k| (k.1, "s"))
            .collect();
        assert!(!entries.is_empty(), "{file} is not in launch::KERNELS");
        Program::build(tc, &src, &entries)
    }

    /// [`Program::kernel_file`] with `good`, which must occur `count` times in the file,
    /// replaced by `bad`: a planted bug, or another value of a constant.
    fn kernel_file_with(
        tc: &Toolchain,
        file: &str,
        (good, count): (&str, usize),
        bad: &str,
    ) -> Result<Arc<Program>, String> {
        Program::kernel_file(tc, file, |s| {
            assert_eq!(
                s.matches(good).count(),
                count,
                "{file} changed: update what the test replaces ({good})"
            );
            s.replace(good, bad)
        })
    }

    /// Runs `l` and returns every argument as the kernel left it; Err with the runner's
    /// messages when it fails (a trap, a sanitizer report) or runs past `timeout`.
    fn run(&self, l: &Launch, timeout: Duration) -> Result<Out, String> {
        let mut kinds: String = l.args.iter().map(Arg::kind).collect();
        if kinds.starts_with('s') && kinds[1..].chars().all(|c| c == 'p') {
            // A struct's buffers are behind its addresses, not parameters of the kernel.
            kinds.truncate(1);
        }
        match self.entries.iter().find(|(n, _)| n == l.kernel) {
            Some((_, k)) if *k == kinds => {}
            Some((_, k)) => panic!(
                "{}: arguments of kinds {kinds}, the kernel takes {k}",
                l.kernel
            ),
            None => panic!("no entry point {} in this program", l.kernel),
        }
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let path = |what: &str| self.dir.path().join(format!("{what}-{seq}"));
        let (inp, outp, errp) = (path("in"), path("out"), path("err"));
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(&inp).map_err(|e| e.to_string())?);
        let mut put = |b: &[u8]| f.write_all(b).map_err(|e| e.to_string());
        put(&(l.kernel.len() as u32).to_ne_bytes())?;
        put(l.kernel.as_bytes())?;
        for v in [
            l.grid.0, l.grid.1, l.grid.2, l.block.0, l.block.1, l.block.2,
        ] {
            put(&v.to_ne_bytes())?;
        }
        put(&(l.smem as u64).to_ne_bytes())?;
        put(&(l.args.len() as u32).to_ne_bytes())?;
        for a in &l.args {
            put(&[a.kind() as u8])?;
            match a {
                Arg::I(v) => put(&v.to_ne_bytes())?,
                Arg::P(b) => {
                    put(&(b.len() as u64).to_ne_bytes())?;
                    put(b)?;
                }
                Arg::S(b, ptrs) => {
                    put(&(b.len() as u64).to_ne_bytes())?;
                    put(b)?;
                    put(&(ptrs.len() as u32).to_ne_bytes())?;
                    for (off, k) in ptrs {
                        put(&off.to_ne_bytes())?;
                        put(&k.to_ne_bytes())?;
                    }
                }
            }
        }
        f.flush().map_err(|e| e.to_string())?;
        drop(f);
        let t0 = Instant::now();
        let mut child = Command::new(&self.exe)
            .arg(&inp)
            .arg(&outp)
            .env("ASAN_OPTIONS", "detect_leaks=0:abort_on_error=0")
            .env("UBSAN_OPTIONS", "print_stacktrace=1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errp).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| e.to_string())?;
        let status = loop {
            if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
                break s;
            }
            if t0.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{}: no result after {timeout:?} (a barrier deadlock?)",
                    l.kernel
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stderr = std::fs::read_to_string(&errp).unwrap_or_default();
        if !status.success() {
            return Err(format!(
                "{}: the runner failed ({status}):\n{stderr}",
                l.kernel
            ));
        }
        let bytes = std::fs::read(&outp).map_err(|e| e.to_string())?;
        for p in [&inp, &outp, &errp] {
            let _ = std::fs::remove_file(p);
        }
        let mut at = 0usize;
        let mut out = Vec::with_capacity(l.args.len());
        for a in &l.args {
            out.push(match a {
                Arg::P(b) => {
                    let n = u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap()) as usize;
                    assert_eq!(n, b.len(), "{}: a buffer came back resized", l.kernel);
                    at += 8 + n;
                    Some(bytes[at - n..at].to_vec())
                }
                _ => None,
            });
        }
        assert_eq!(at, bytes.len(), "{}: trailing output", l.kernel);
        Ok(Out(out))
    }
}

/// Differences between an emulated output and the twin's.
#[derive(Debug, Default, Clone, Copy)]
struct Diff {
    count: usize,
    /// Elements whose bits differ (NaN matches any NaN).
    differ: usize,
    /// Largest |a − b| relative to the largest finite |b|.
    rel: f64,
    /// NaN where the twin has a number: left as poisoned, or computed from poisoned memory.
    nan: usize,
}

impl Diff {
    fn of(got: &[f64], want: &[f64]) -> Diff {
        assert_eq!(got.len(), want.len());
        let scale = want
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(f64::MIN_POSITIVE);
        let mut d = Diff {
            count: got.len(),
            ..Diff::default()
        };
        for (a, b) in got.iter().zip(want) {
            if a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) {
                continue;
            }
            d.differ += 1;
            d.nan += usize::from(a.is_nan());
            d.rel = d.rel.max(if a.is_finite() && b.is_finite() {
                (a - b).abs() / scale
            } else {
                f64::INFINITY
            });
        }
        d
    }

    fn add(&mut self, o: Diff) {
        self.count += o.count;
        self.differ += o.differ;
        self.rel = self.rel.max(o.rel);
        self.nan += o.nan;
    }

    fn same(&self) -> bool {
        self.differ == 0
    }
}

impl std::fmt::Display for Diff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{} differ (max rel {:.1e}, {} NaN)",
            self.differ, self.count, self.rel, self.nan
        )
    }
}

mod harness {
    //! The emulation layer's own semantics, on small kernels written for it.
    use super::*;

    const SOURCE: &str = r#"
// Warp shuffles (a tree sum into lane 0, then a broadcast), then `rounds` __syncthreads_or
// whose only candidate thread is sel[r], with threads t >= cut leaving after round `leave`.
extern "C" __global__ void emu_selftest(int rounds, int cut, int leave,
                                        const int* __restrict__ sel, int* __restrict__ ors,
                                        double* __restrict__ sums)
{
    const int t = threadIdx.x;
    double x = (double)(blockIdx.x * blockDim.x + t);
    for (int off = 16; off > 0; off >>= 1) {
        x += __shfl_down_sync(0xffffffffu, x, off);
    }
    sums[blockIdx.x * blockDim.x + t] = __shfl_sync(0xffffffffu, x, 0);
    for (int r = 0; r < rounds; ++r) {
        if (r == leave && t >= cut) {
            return;
        }
        const int v = __syncthreads_or(t == sel[r]);
        if (t == 0) {
            ors[blockIdx.x * rounds + r] = v;
        }
    }
}

// Reads dynamic shared memory nobody wrote.
extern "C" __global__ void emu_poison(double* __restrict__ out)
{
    extern __shared__ double dyn[];
    out[threadIdx.x] = dyn[threadIdx.x];
}

// Never finishes.
extern "C" __global__ void emu_hang(int n, int* __restrict__ out)
{
    __shared__ int flag;
    if (threadIdx.x == 0) {
        flag = 0;
    }
    __syncthreads();
    while (flag == 0) {
        __syncthreads();
    }
    out[threadIdx.x] = n;
}
"#;

    #[test]
    fn barriers_shuffles_and_shared_memory_behave_as_on_a_gpu() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let entries = [
            ("emu_selftest", "iiippp"),
            ("emu_poison", "p"),
            ("emu_hang", "ip"),
        ];
        let prog = Program::build(tc, SOURCE, &entries).unwrap();
        let (nt, nb, rounds, cut, leave) = (96usize, 3usize, 40usize, 40usize, 17usize);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let sel: Vec<i32> = (0..rounds).map(|_| rng.gen_range(-5..110)).collect();
        let l = Launch {
            kernel: "emu_selftest",
            grid: (nb as u32, 1, 1),
            block: (nt as u32, 1, 1),
            smem: 0,
            args: vec![
                int(rounds),
                int(cut),
                int(leave),
                i32s(&sel),
                i32s(&vec![-1; nb * rounds]),
                nan(nb * nt),
            ],
        };
        let out = prog.run(&l, LAUNCH_TIMEOUT).unwrap();
        let ors = out.i32s(4);
        for b in 0..nb {
            for (r, &s) in sel.iter().enumerate() {
                let alive = (0..nt as i32).contains(&s) && (r < leave || s < cut as i32);
                assert_eq!(ors[b * rounds + r], i32::from(alive), "block {b} round {r}");
            }
        }
        assert!(ors.contains(&1) && ors.contains(&0));
        let sums = out.f64s(5);
        for (i, &s) in sums.iter().enumerate() {
            let w0 = i / 32 * 32;
            let want: usize = (w0..w0 + 32).sum();
            assert_eq!(s, want as f64, "thread {i}");
        }
        let l = Launch {
            kernel: "emu_poison",
            grid: (2, 1, 1),
            block: (64, 1, 1),
            smem: 64 * 8,
            args: vec![f64s(&vec![0.0; 64])],
        };
        let out = prog.run(&l, LAUNCH_TIMEOUT).unwrap();
        assert!(out.f64s(0).iter().all(|v| v.is_nan()));
        let l = Launch {
            kernel: "emu_hang",
            grid: (1, 1, 1),
            block: (64, 1, 1),
            smem: 0,
            args: vec![int(1), i32s(&[0; 64])],
        };
        let err = prog
            .run(&l, Duration::from_secs(2))
            .map(|_| ())
            .unwrap_err();
        assert!(err.contains("deadlock"), "{err}");
    }
}

/// Which rows of the windows the scenes' layouts exercise.
#[derive(Debug, Default)]
struct Coverage {
    cut_top: usize,
    cut_bottom: usize,
    outside: usize,
    padded_patches: usize,
}

fn coverage(layout: &super::normal::BatchLayout) -> Coverage {
    let ny = layout.ny as i32;
    let mut c = Coverage::default();
    for b in 0..layout.npatch {
        c.padded_patches += usize::from(layout.n(b) < layout.nmax);
        for u in 0..layout.n(b) {
            let g = &layout.geom[4 * (b * layout.nmax + u)..][..4];
            c.cut_top += usize::from(g[2] > 0 && g[2] < g[3]);
            c.cut_bottom += usize::from(g[3] < ny && g[2] < g[3]);
            c.outside += usize::from(g[3] <= g[2]);
        }
    }
    c
}

/// The scenes the pixel-stage tests run on: the toy bundle (3 subbundles of 5, 6 and 5 solved
/// fibers: mixed sizes, so padded unknowns), three of its patches and a trimmed copy of the
/// second (spots cut at the top and bottom of its window, some wholly outside), the first
/// patch with one spot wholly masked; as a batch of copies and as a batch indexing the scene's
/// pixels and spots where they lie (rows `ld` > window width apart, `spot_off` into the set).
mod scenes {
    use super::super::normal::{BatchLayout, Resident, ResidentSpots};
    use super::super::scene::{Bundle, Recipe, Scene};
    use crate::extract::PatchInput;
    use crate::extract::{HeldPixels, PixelLoad};
    use crate::psf::SpotSet;

    pub(super) fn scene(recipe: Recipe, seed: u64) -> Scene {
        Bundle::toy(3)
            .pick(Some(&[0, 5, 11]))
            .into_scene(seed, recipe)
    }

    /// The layout of `scene` with the batch's own copies.
    pub(super) fn copies(scene: &Scene) -> (BatchLayout, Vec<PatchInput<'_>>) {
        let inputs = scene.inputs();
        (BatchLayout::new(&inputs).unwrap(), inputs)
    }

    /// The layout of `scene` indexing its pixels and spots in place, with the arrays the
    /// device would hold filled in. `geometry` is the scene's spot set without values.
    pub(super) fn resident<'a>(
        scene: &'a Scene,
        geometry: &'a SpotSet,
    ) -> (BatchLayout, Vec<PatchInput<'a>>) {
        let held = HeldPixels::mint(scene.pix.nrows(), scene.pix.ncols());
        let inputs: Vec<PatchInput<'a>> = scene
            .items
            .iter()
            .map(|(p, w)| {
                let mut inp = PatchInput::from_region(
                    *p,
                    *w,
                    *w,
                    scene.pix.view(),
                    scene.ivar.view(),
                    scene.origin,
                    geometry,
                );
                inp.loaded = PixelLoad::Held(held).place(*w, scene.origin);
                inp
            })
            .collect();
        let key = ResidentSpots {
            held: geometry.held().expect("a held set"),
            len: scene.spots.values().len(),
        };
        let resident = Resident {
            pixels: Some(held),
            spots: Some(&key),
        };
        let mut layout = BatchLayout::with_resident(&inputs, &resident).unwrap();
        assert!(layout.pixels_resident && layout.spots_resident);
        assert!((0..layout.npatch).all(|b| layout.patch[4 * b + 3] > layout.patch[4 * b + 2]));
        layout.pix = scene.pix.iter().copied().collect();
        layout.ivar = scene.ivar.iter().copied().collect();
        layout.spots = scene.spots.values().to_vec();
        (layout, inputs)
    }

    pub(super) fn geometry_of(scene: &Scene) -> SpotSet {
        let mut g = scene.spots.clone();
        g.values = crate::psf::SpotValues::Held(crate::psf::HeldSpots::mint());
        g
    }
}

mod normal_cu {
    //! normal.cu against `normal::twin`, which promises the kernel's bits.
    use super::super::normal::{
        dense_config, regularize_config, twin, BatchLayout, HostDense, NormalDenseParams,
        NormalRegularizeParams,
    };
    use super::super::scene::{Masked, Pixels, Recipe, Trim};
    use super::*;

    /// normal_dense then normal_regularize as `normal::build_into` launches them
    /// (`dense_config`, `regularize_config`); every output poisoned with NaN first.
    fn run(prog: &Program, l: &BatchLayout, reg: f64, eps: f64) -> Result<HostDense, String> {
        let (npatch, nmax) = (l.npatch, l.nmax);
        let mut bufs = Bufs::default();
        let p = NormalDenseParams {
            nmax: nmax as i32,
            ny: l.ny as i32,
            nx: l.nx as i32,
            pad0: 0,
            patch: bufs.add(i32s(&l.patch)),
            win_off: bufs.add(i64s(&l.win_off)),
            pix: bufs.add(f64s(&l.pix)),
            ivar: bufs.add(f64s(&l.ivar)),
            spots: bufs.add(f64s(&l.spots)),
            spot_off: bufs.add(i64s(&l.spot_off)),
            geom: bufs.add(i32s(&l.geom)),
            ata: bufs.add(nan(npatch * nmax * nmax)),
            atp: bufs.add(nan(npatch * nmax)),
            atw1: bufs.add(nan(npatch * nmax)),
        };
        let cfg = dense_config(npatch, nmax, l.ny, l.nx).unwrap();
        let out = prog.run(
            &Launch::with_params("normal_dense", &cfg, &p, bufs),
            LAUNCH_TIMEOUT,
        )?;
        let (atp, atw1) = (out.f64s(at(p.atp)), out.f64s(at(p.atw1)));
        let mut bufs = Bufs::default();
        let p = NormalRegularizeParams {
            nmax: nmax as i32,
            pad0: 0,
            patch: bufs.add(i32s(&l.patch)),
            atw1: bufs.add(f64s(&atw1)),
            regularize: reg,
            epsilon: eps,
            ata: bufs.add(f64s(&out.f64s(at(p.ata)))),
        };
        let regularize = Launch::with_params(
            "normal_regularize",
            &regularize_config(npatch).unwrap(),
            &p,
            bufs,
        );
        let out = prog.run(&regularize, LAUNCH_TIMEOUT)?;
        Ok(HostDense {
            npatch,
            nmax,
            ata: out.f64s(at(p.ata)),
            atp,
            atw1,
        })
    }

    fn compare(got: &HostDense, want: &HostDense) -> [Diff; 3] {
        [
            Diff::of(&got.ata, &want.ata),
            Diff::of(&got.atp, &want.atp),
            Diff::of(&got.atw1, &want.atw1),
        ]
    }

    #[test]
    fn normal_cu_matches_its_twin_bit_for_bit() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file(tc, "normal.cu", |s| s).unwrap();
        let recipe = Recipe {
            trim: Some(Trim::Rows(1)),
            pixels: Pixels::Random,
            masked: Some(Masked::MiddleBin),
        };
        let scene = scenes::scene(recipe, 3);
        let geometry = scenes::geometry_of(&scene);
        let cases = [
            ("copies", scenes::copies(&scene), 0.0, 1e-15),
            ("resident", scenes::resident(&scene, &geometry), 0.05, 1e-8),
        ];
        for (what, (layout, _inputs), reg, eps) in cases {
            let c = coverage(&layout);
            assert!(
                c.cut_top > 0 && c.cut_bottom > 0 && c.outside > 0 && c.padded_patches > 0,
                "{c:?}"
            );
            let t0 = Instant::now();
            let got = run(&prog, &layout, reg, eps).unwrap();
            let want = twin(&layout, reg, eps);
            // The wholly masked spot's AᵀW1 = 0 takes the regularisation's first branch.
            assert!(want.atw1.contains(&0.0));
            let d = compare(&got, &want);
            eprintln!(
                "normal.cu (emulated) vs twin, {what}, {} patches, nmax {}, {:.1} s: AᵀWA {}, \
                 AᵀWp {}, AᵀW1 {}",
                layout.npatch,
                layout.nmax,
                t0.elapsed().as_secs_f64(),
                d[0],
                d[1],
                d[2]
            );
            assert!(d.iter().all(Diff::same), "{what}: {d:?}");
            assert!(got.ata.iter().all(|v| v.is_finite()));
        }
    }
}

mod model_cu {
    //! model_image (chi2.cu) against `model::twin`, which promises the kernel's bits.
    use super::super::chi2::Chi2Layout;
    use super::super::model::{
        launch_config, lay_out_columns, twin, HostColumns, ModelBatch, ModelImageParams,
    };
    use super::super::normal::BatchLayout;
    use super::super::scene::{Masked, Pixels, Recipe, Trim};
    use super::*;
    use crate::extract::PatchInput;

    /// The kernel as `model::launch` launches it, the outputs poisoned with NaN first.
    fn run(
        prog: &Program,
        l: &BatchLayout,
        dims: &Chi2Layout,
        x: &[f64],
        columns: Option<HostColumns<'_>>,
    ) -> Result<ModelBatch<Vec<f64>>, String> {
        let (cfg, scalars) = launch_config(dims, columns.map_or(0, |c| c.ld)).unwrap();
        let mut bufs = Bufs::default();
        let npix = dims.npix;
        let (cov, cov_off, leverage) = match columns {
            Some(c) => (
                bufs.add(f64s(c.z)),
                bufs.add(i64s(c.off)),
                bufs.add(nan(npix)),
            ),
            None => (0, 0, 0),
        };
        let p = ModelImageParams {
            patch: bufs.add(i32s(&l.patch)),
            dims: bufs.add(i32s(&dims.dims)),
            win_off: bufs.add(i64s(&l.win_off)),
            scr_off: bufs.add(i64s(&l.scr_off)),
            ivar: bufs.add(f64s(&l.ivar)),
            spots: bufs.add(f64s(&l.spots)),
            spot_off: bufs.add(i64s(&l.spot_off)),
            geom: bufs.add(i32s(&l.geom)),
            x: bufs.add(f64s(x)),
            cov,
            cov_off,
            image: bufs.add(nan(npix)),
            leverage,
            ..scalars
        };
        let launch = Launch::with_params("model_image", &cfg, &p, bufs);
        let out = prog.run(&launch, LAUNCH_TIMEOUT)?;
        Ok(ModelBatch {
            image: out.f64s(at(p.image)),
            leverage: columns.map(|_| out.f64s(at(p.leverage))),
        })
    }

    /// Random solutions on every unknown and random columns (`ld = nmax + 3`, patches in
    /// reverse order), NaN wherever the kernel must not read (padding unknowns, the rows past
    /// a patch's unknowns), so that a stray read poisons an output.
    fn inputs(l: &BatchLayout, dims: &Chi2Layout, seed: u64) -> (Vec<f64>, Vec<f64>, Vec<i64>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let nmax = l.nmax;
        let mut x = vec![f64::NAN; l.npatch * nmax];
        for b in 0..l.npatch {
            for v in &mut x[b * nmax..b * nmax + l.n(b)] {
                *v = rng.gen_range(-20.0..400.0);
            }
        }
        let (z, off) = lay_out_columns(dims, nmax + 3, (0..l.npatch).rev(), |_, _, _| {
            rng.gen_range(-1e-3..1e-3)
        });
        (x, z, off)
    }

    /// The comparison catches a kernel bug: the columns indexed from the patch's first
    /// unknown instead of its first core unknown (right only where no fiber precedes the
    /// core ones).
    #[test]
    fn a_planted_column_bug_in_model_image_is_caught() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        // In both of the kernel's ways to the sum (the list of covering unknowns, and the
        // scan where a pixel has more of them).
        let prog = Program::kernel_file_with(
            tc,
            "chi2.cu",
            ("(long long)(u - k0) * args.cov_ld", 2),
            "(long long)(u - core0) * args.cov_ld",
        )
        .unwrap();
        let scene = scenes::scene(
            Recipe {
                trim: None,
                pixels: Pixels::Exposure,
                masked: None,
            },
            33,
        );
        let (layout, batch) = scenes::copies(&scene);
        let dims = Chi2Layout::new(&batch, &layout).unwrap();
        let (x, z, off) = inputs(&layout, &dims, 34);
        let cols = HostColumns {
            z: &z,
            off: &off,
            ld: layout.nmax + 3,
        };
        let got = run(&prog, &layout, &dims, &x, Some(cols)).unwrap();
        let want = twin(&layout, &dims, &x, Some(cols));
        assert!(Diff::of(&got.image, &want.image).same());
        let d = Diff::of(&got.leverage.unwrap(), &want.leverage.unwrap());
        eprintln!("model_image with a planted bug: leverage {d}");
        assert!(!d.same(), "the planted bug went unnoticed");
    }

    /// The kernel as written (every pixel's covering unknowns in its list), and with a list
    /// of 3 (most pixels then take the scan): the same bits as the twin either way.
    #[test]
    fn model_image_matches_its_twin_bit_for_bit() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let list = ("#define COVER_MAX 64", 1);
        let short = Program::kernel_file_with(tc, "chi2.cu", list, "#define COVER_MAX 3").unwrap();
        let full = Program::kernel_file(tc, "chi2.cu", |s| s).unwrap();
        for (size, prog) in [("64", &full), ("3", &short)] {
            eprintln!("model_image with a list of {size}:");
            compare_on_scenes(prog);
        }
    }

    /// model_image against its twin on copies and on resident pixels and spots, with and
    /// without the leverage.
    fn compare_on_scenes(prog: &Program) {
        let recipe = Recipe {
            trim: Some(Trim::IntoKept(1)),
            pixels: Pixels::Exposure,
            masked: Some(Masked::MiddleKeptBin),
        };
        let scene = scenes::scene(recipe, 31);
        let geometry = scenes::geometry_of(&scene);
        let cases = [
            ("copies", scenes::copies(&scene)),
            ("resident", scenes::resident(&scene, &geometry)),
        ];
        for (what, (layout, batch)) in &cases {
            let batch: &Vec<PatchInput<'_>> = batch;
            let dims = Chi2Layout::new(batch, layout).unwrap();
            assert!(batch.iter().any(|i| i.patch.core_fiber_offset() > 0));
            let (x, z, off) = inputs(layout, &dims, 32);
            let cols = HostColumns {
                z: &z,
                off: &off,
                ld: layout.nmax + 3,
            };
            for columns in [None, Some(cols)] {
                let t0 = Instant::now();
                let got = run(prog, layout, &dims, &x, columns).unwrap();
                let want = twin(layout, &dims, &x, columns);
                let image = Diff::of(&got.image, &want.image);
                let lev = match (&got.leverage, &want.leverage) {
                    (Some(g), Some(w)) => Some(Diff::of(g, w)),
                    (None, None) => None,
                    _ => panic!("leverage written without columns, or missing with them"),
                };
                eprintln!(
                    "model_image (emulated) vs twin, {what}, leverage {}, {} patches, {:.1} \
                     s: image {image}, leverage {lev:?}",
                    columns.is_some(),
                    layout.npatch,
                    t0.elapsed().as_secs_f64()
                );
                assert!(want.image.iter().all(|v| v.is_finite()));
                assert!(image.same(), "{what}: image {image}");
                if let Some(d) = lev {
                    assert!(want.leverage.unwrap().iter().all(|v| v.is_finite()));
                    assert!(d.same(), "{what}: leverage {d}");
                }
            }
        }
    }
}

mod chi2_cu {
    //! chi2.cu against `chi2::twin`, which promises the kernels' bits.
    use super::super::chi2::{
        pixels_launch, project_launch, twin, Chi2Layout, Chi2PixelsParams, Chi2ProjectParams,
        HostChi2,
    };
    use super::super::normal::BatchLayout;
    use super::super::scene::{Masked, Pixels, Recipe, Trim};
    use super::*;
    use crate::extract::PatchInput;

    /// The two kernels as `chi2::launch` launches them, every output poisoned with NaN first.
    fn run(
        prog: &Program,
        l: &BatchLayout,
        dims: &Chi2Layout,
        x: &[f64],
        psferr: f64,
    ) -> Result<HostChi2, String> {
        let (npix, nslot) = (dims.npix, dims.npatch * dims.slots());
        let (cfg, scalars) = pixels_launch(dims, psferr).unwrap();
        let mut bufs = Bufs::default();
        let p = Chi2PixelsParams {
            patch: bufs.add(i32s(&l.patch)),
            dims: bufs.add(i32s(&dims.dims)),
            win_off: bufs.add(i64s(&l.win_off)),
            scr_off: bufs.add(i64s(&l.scr_off)),
            pix: bufs.add(f64s(&l.pix)),
            ivar: bufs.add(f64s(&l.ivar)),
            spots: bufs.add(f64s(&l.spots)),
            spot_off: bufs.add(i64s(&l.spot_off)),
            geom: bufs.add(i32s(&l.geom)),
            x: bufs.add(f64s(x)),
            model: bufs.add(nan(npix)),
            chi2: bufs.add(nan(npix)),
            valid: bufs.add(nan(npix)),
            ..scalars
        };
        let pixels = Launch::with_params("chi2_pixels", &cfg, &p, bufs);
        let out = prog.run(&pixels, LAUNCH_TIMEOUT)?;
        let (model, chi2, valid) = (
            out.f64s(at(p.model)),
            out.f64s(at(p.chi2)),
            out.f64s(at(p.valid)),
        );
        let (cfg, scalars) = project_launch(dims).unwrap();
        let mut bufs = Bufs::default();
        let p = Chi2ProjectParams {
            patch: bufs.add(i32s(&l.patch)),
            dims: bufs.add(i32s(&dims.dims)),
            win_off: bufs.add(i64s(&l.win_off)),
            scr_off: bufs.add(i64s(&l.scr_off)),
            ivar: bufs.add(f64s(&l.ivar)),
            spots: bufs.add(f64s(&l.spots)),
            spot_off: bufs.add(i64s(&l.spot_off)),
            geom: bufs.add(i32s(&l.geom)),
            chi2: bufs.add(f64s(&chi2)),
            valid: bufs.add(f64s(&valid)),
            chi2pix: bufs.add(nan(nslot)),
            pixmask: bufs.add(nan(nslot)),
            ..scalars
        };
        let project = Launch::with_params("chi2_project", &cfg, &p, bufs);
        let out = prog.run(&project, LAUNCH_TIMEOUT)?;
        Ok(HostChi2 {
            model,
            chi2,
            valid,
            chi2pix: out.f64s(at(p.chi2pix)),
            pixmask: out.f64s(at(p.pixmask)),
        })
    }

    /// Random solutions on every unknown; NaN on the padding unknowns, which the kernels
    /// must not read, so that a stray read poisons an output.
    fn solutions(l: &BatchLayout, seed: u64) -> Vec<f64> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let nmax = l.nmax;
        let mut x = vec![f64::NAN; l.npatch * nmax];
        for b in 0..l.npatch {
            for v in &mut x[b * nmax..b * nmax + l.n(b)] {
                *v = rng.gen_range(-20.0..400.0);
            }
        }
        x
    }

    /// [model, χ² and valid, chi2pix, pixmask] of the kernels against the twin.
    fn compare(
        prog: &Program,
        l: &BatchLayout,
        inputs: &[PatchInput<'_>],
        seed: u64,
    ) -> Result<[Diff; 4], String> {
        let dims = Chi2Layout::new(inputs, l).unwrap();
        let x = solutions(l, seed);
        let psferr = 0.01;
        let got = run(prog, l, &dims, &x, psferr)?;
        let want = twin(l, &dims, &x, psferr);
        let mut c2 = Diff::of(&got.chi2, &want.chi2);
        c2.add(Diff::of(&got.valid, &want.valid));
        Ok([
            Diff::of(&got.model, &want.model),
            c2,
            Diff::of(&got.chi2pix, &want.chi2pix),
            Diff::of(&got.pixmask, &want.pixmask),
        ])
    }

    fn report(d: &[Diff; 4]) -> String {
        let names = ["model", "chi2/valid", "chi2pix", "pixmask"];
        let parts: Vec<String> = names
            .iter()
            .zip(d)
            .map(|(n, d)| format!("{n} {d}"))
            .collect();
        parts.join(", ")
    }

    /// A simulated exposure, a trimmed copy cutting kept core spots, one kept core spot
    /// wholly masked (its chi2pix has no valid pixel).
    fn recipe() -> Recipe {
        Recipe {
            trim: Some(Trim::IntoKept(1)),
            pixels: Pixels::Exposure,
            masked: Some(Masked::MiddleKeptBin),
        }
    }

    #[test]
    fn chi2_cu_matches_its_twin_bit_for_bit() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file(tc, "chi2.cu", |s| s).unwrap();
        let scene = scenes::scene(recipe(), 11);
        let geometry = scenes::geometry_of(&scene);
        let cases = [
            ("copies", scenes::copies(&scene)),
            ("resident", scenes::resident(&scene, &geometry)),
        ];
        for (what, (layout, inputs)) in &cases {
            let c = coverage(layout);
            assert!(
                c.cut_top > 0 && c.cut_bottom > 0 && c.outside > 0 && c.padded_patches > 0,
                "{c:?}"
            );
            assert!(inputs
                .iter()
                .any(|i| i.patch.nwave_keep < i.patch.nwavetot - 2 * i.patch.wavepad));
            let t0 = Instant::now();
            let d = compare(&prog, layout, inputs, 12).unwrap();
            eprintln!(
                "chi2.cu (emulated) vs twin, {what}, {} patches, {:.1} s: {}",
                layout.npatch,
                t0.elapsed().as_secs_f64(),
                report(&d)
            );
            assert!(d.iter().all(Diff::same), "{what}: {d:?}");
        }
    }

    /// The comparison catches a kernel bug: chi2_pixels reading the pixels with the window's
    /// width as row stride instead of `ld` (right for a batch of copies, wrong where the
    /// windows index a unit's pixels).
    #[test]
    fn a_planted_stride_bug_in_chi2_cu_is_caught() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file_with(
            tc,
            "chi2.cu",
            ("const long long p = off + (long long)r * ld + c;", 1),
            "const long long p = off + (long long)r * wnx + c;",
        )
        .unwrap();
        let scene = scenes::scene(recipe(), 13);
        let geometry = scenes::geometry_of(&scene);
        let (layout, inputs) = scenes::copies(&scene);
        let d = compare(&prog, &layout, &inputs, 14).unwrap();
        assert!(d.iter().all(Diff::same), "copies: {d:?}");
        let (layout, inputs) = scenes::resident(&scene, &geometry);
        let d = compare(&prog, &layout, &inputs, 14).unwrap();
        eprintln!("chi2.cu with a planted bug, resident: {}", report(&d));
        assert!(
            !d[1].same() && !d[2].same(),
            "the planted bug went unnoticed"
        );
    }
}

mod decorrelate_cu {
    //! decorrelate.cu against `decorrelate::twin`, which means to give the kernel's bits (the
    //! same rotations in the same order, the same fma and rounding, the same per-thread sums).
    use super::super::decorrelate::{
        launch_config, twin, twin_eigen, Block, DecorrLayout, DecorrelateEigenParams,
        DecorrelateParams, HostDecorr, Status, MAX_SWEEPS,
    };
    use super::*;
    use crate::extract::cpu::lapack::{syevd, SyevdWork};

    /// The five outputs of both kernels, poisoned: flux, fluxivar, resolution (NaN), status
    /// and sweeps (-1); their addresses in that order.
    fn poisoned_outputs(l: &DecorrLayout, bufs: &mut Bufs) -> [u64; 5] {
        let (nb, ncol, nd2) = (l.nblock, l.ncol, l.nd2);
        [
            bufs.add(nan(nb * ncol)),
            bufs.add(nan(nb * ncol)),
            bufs.add(nan(nb * nd2 * ncol)),
            bufs.add(i32s(&vec![-1; nb])),
            bufs.add(i32s(&vec![-1; nb])),
        ]
    }

    /// Those five outputs (addresses `o`) as the kernel left them.
    fn outputs(out: &Out, l: &DecorrLayout, o: [u64; 5]) -> HostDecorr {
        HostDecorr {
            nblock: l.nblock,
            ncol: l.ncol,
            nd2: l.nd2,
            flux: out.f64s(at(o[0])),
            fluxivar: out.f64s(at(o[1])),
            resolution: out.f64s(at(o[2])),
            status: out.i32s(at(o[3])),
            sweeps: out.i32s(at(o[4])),
        }
    }

    /// The kernel as `decorrelate::decorrelate_into` launches it (`launch_config`); outputs
    /// poisoned (NaN, status and sweeps -1).
    fn run(
        prog: &Program,
        l: &DecorrLayout,
        cov: &[f64],
        x: &[f64],
        max_sweeps: u32,
    ) -> Result<HostDecorr, String> {
        let mut bufs = Bufs::default();
        let (params, offs) = (bufs.add(i32s(&l.params)), bufs.add(i64s(&l.offs)));
        let (cov, x, basis) = (
            bufs.add(f64s(cov)),
            bufs.add(f64s(x)),
            bufs.add(f64s(&l.basis)),
        );
        let o = poisoned_outputs(l, &mut bufs);
        let p = DecorrelateParams {
            ld: l.ld as i32,
            ncol: l.ncol as i32,
            nd2: l.nd2 as i32,
            max_sweeps: max_sweeps as i32,
            params,
            offs,
            cov,
            x,
            basis,
            flux: o[0],
            fluxivar: o[1],
            resolution: o[2],
            status: o[3],
            sweeps: o[4],
        };
        let launch = Launch::with_params("decorrelate", &launch_config(l).unwrap(), &p, bufs);
        Ok(outputs(&prog.run(&launch, LAUNCH_TIMEOUT)?, l, o))
    }

    /// `decorrelate_eigen` as `decorrelate::decorrelate_eigen_into` launches it, from the
    /// eigenpairs `evec`, `eval` and `einfo`; outputs poisoned.
    fn run_eigen(
        prog: &Program,
        l: &DecorrLayout,
        evec: &[f64],
        eval: &[f64],
        einfo: &[i32],
        x: &[f64],
    ) -> Result<HostDecorr, String> {
        let mut bufs = Bufs::default();
        let (params, offs) = (bufs.add(i32s(&l.params)), bufs.add(i64s(&l.offs)));
        let (evec, eval, einfo, x) = (
            bufs.add(f64s(evec)),
            bufs.add(f64s(eval)),
            bufs.add(i32s(einfo)),
            bufs.add(f64s(x)),
        );
        let o = poisoned_outputs(l, &mut bufs);
        let p = DecorrelateEigenParams {
            ld: l.ld as i32,
            ncol: l.ncol as i32,
            nd2: l.nd2 as i32,
            params,
            offs,
            evec,
            eval,
            einfo,
            x,
            flux: o[0],
            fluxivar: o[1],
            resolution: o[2],
            status: o[3],
            sweeps: o[4],
            ..DecorrelateEigenParams::default()
        };
        let launch = Launch::with_params("decorrelate_eigen", &launch_config(l).unwrap(), &p, bufs);
        Ok(outputs(&prog.run(&launch, LAUNCH_TIMEOUT)?, l, o))
    }

    /// An AR(1) covariance of neighbouring bins with a smooth σ and a small symmetric
    /// perturbation (the shape of the real blocks), column-major.
    fn covariance(n: usize, rng: &mut impl Rng) -> Vec<f64> {
        let (amp, phase): (f64, f64) = (rng.gen_range(0.1..0.5), rng.gen_range(0.0..6.3));
        let sigma: Vec<f64> = (0..n)
            .map(|i| 1.0 + amp * (0.2 * i as f64 + phase).sin())
            .collect();
        let rho: f64 = rng.gen_range(0.5..0.9);
        let mut c = vec![0.0; n * n];
        for j in 0..n {
            for i in j..n {
                let noise = if i == j {
                    0.0
                } else {
                    rng.gen_range(-0.003..0.003)
                };
                let v = sigma[i] * sigma[j] * (rho.powi((i - j) as i32) + noise);
                c[j * n + i] = v;
                c[i * n + j] = v;
            }
        }
        c
    }

    /// Blocks of odd and even sizes (the odd ones padded), leading dimensions above their
    /// sizes with NaN around and above the diagonal (only the lower triangle may be read),
    /// then the failures: a negative diagonal entry (not positive definite), a NaN in the
    /// lower triangle, a diagonal matrix, and an infinite x.
    fn batch() -> (Vec<Block>, Vec<f64>, Vec<f64>, Vec<Status>) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
        let (mut blocks, mut cov, mut x, mut want) = (vec![], vec![], vec![], vec![]);
        let sizes = [1usize, 2, 3, 7, 20, 33, 74, 20, 20, 20, 20];
        for (k, &n) in sizes.iter().enumerate() {
            let mut c = covariance(n, &mut rng);
            let mut xs: Vec<f64> = (0..n).map(|_| rng.gen_range(-50.0..500.0)).collect();
            let status = match k {
                7 => {
                    c[0] = -c[0];
                    Status::BadEigenvalue
                }
                8 => {
                    c[3 * n + 11] = f64::NAN;
                    Status::NonfiniteInput
                }
                9 => {
                    for (e, v) in c.iter_mut().enumerate() {
                        *v = if e % n == e / n {
                            1.0 + (e / n) as f64
                        } else {
                            0.0
                        };
                    }
                    Status::Ok
                }
                10 => {
                    xs[9] = f64::INFINITY;
                    Status::NonfiniteOutput
                }
                _ => Status::Ok,
            };
            let wavepad = n / 4;
            let ndiag = wavepad.min(2);
            let nstep = n - 2 * wavepad;
            let nkeep = nstep - usize::from(nstep > 1);
            let cov_ld = n + 3;
            let cov_off = cov.len() + 5;
            cov.resize(cov_off + n * cov_ld, f64::NAN);
            for j in 0..n {
                for i in j..n {
                    cov[cov_off + j * cov_ld + i] = c[j * n + i];
                }
            }
            let x_off = x.len() + 2;
            x.resize(x_off, f64::NAN);
            x.extend(xs);
            blocks.push(Block {
                n,
                cov_off,
                cov_ld,
                x_off,
                row_lo: wavepad - ndiag,
                row_hi: (wavepad + nstep + ndiag).min(n),
                wavepad,
                nstep,
                nkeep,
                ndiag,
            });
            want.push(status);
        }
        (blocks, cov, x, want)
    }

    fn compare(got: &HostDecorr, want: &HostDecorr) -> [Diff; 3] {
        [
            Diff::of(&got.flux, &want.flux),
            Diff::of(&got.fluxivar, &want.fluxivar),
            Diff::of(&got.resolution, &want.resolution),
        ]
    }

    #[test]
    fn decorrelate_cu_matches_its_twin_bit_for_bit() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file(tc, "decorrelate.cu", |s| s).unwrap();
        let (blocks, cov, x, statuses) = batch();
        let layout = DecorrLayout::new(&blocks).unwrap();
        for max_sweeps in [MAX_SWEEPS, 2] {
            let t0 = Instant::now();
            let got = run(&prog, &layout, &cov, &x, max_sweeps).unwrap();
            let elapsed = t0.elapsed().as_secs_f64();
            let want = twin(&layout, &cov, &x, max_sweeps);
            if max_sweeps == MAX_SWEEPS {
                let st: Vec<Status> = (0..layout.nblock)
                    .map(|b| want.status(b).unwrap())
                    .collect();
                assert_eq!(st, statuses, "the batch's cases");
            } else {
                assert!(want.status.contains(&Status::NotConverged.code()));
            }
            let d = compare(&got, &want);
            eprintln!(
                "decorrelate.cu (emulated) vs twin, {} blocks (n up to {}), max_sweeps \
                 {max_sweeps}, {elapsed:.1} s: flux {}, fluxivar {}, resolution {}; sweeps {:?}",
                layout.nblock, layout.ld, d[0], d[1], d[2], got.sweeps
            );
            assert_eq!(got.status, want.status, "status");
            assert_eq!(got.sweeps, want.sweeps, "sweeps");
            assert!(d.iter().all(Diff::same), "{d:?}");
        }
    }

    /// The batch's blocks moved into the solve's slots (one `l × l` slot each, `l` three
    /// above the largest block, zeros around each block), their eigenpairs by LAPACK as
    /// XsyevBatched would give them (one slot's info set as a failed syev), and
    /// decorrelate_eigen emulated against `twin_eigen`: every status, and the values bit for bit.
    #[test]
    fn decorrelate_eigen_cu_matches_its_twin_bit_for_bit() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file(tc, "decorrelate.cu", |s| s).unwrap();
        let (blocks, cov, x, _) = batch();
        let l = blocks.iter().map(|b| b.n).max().unwrap() + 3;
        let mut slots = vec![0.0; blocks.len() * l * l];
        let slotted: Vec<Block> = blocks
            .iter()
            .enumerate()
            .map(|(s, b)| {
                for j in 0..b.n {
                    for i in j..b.n {
                        let v = cov[b.cov_off + j * b.cov_ld + i];
                        slots[s * l * l + j * l + i] = v;
                        slots[s * l * l + i * l + j] = v;
                    }
                }
                Block {
                    cov_off: s * l * l,
                    cov_ld: l,
                    ..*b
                }
            })
            .collect();
        let layout = DecorrLayout::new(&slotted).unwrap();
        let mut eval = vec![0.0; blocks.len() * l];
        let mut work = SyevdWork::default();
        let mut einfo: Vec<i32> = slots
            .chunks_mut(l * l)
            .zip(eval.chunks_mut(l))
            .map(|(a, w)| syevd(l, a, w, &mut work))
            .collect();
        einfo[4] = 3;
        let want = twin_eigen(&layout, &slots, &eval, &einfo, &x);
        let st: Vec<Status> = (0..layout.nblock)
            .map(|b| want.status(b).unwrap())
            .collect();
        for (b, s) in st.iter().enumerate() {
            let expect = match b {
                4 => Status::NotConverged,
                7 | 8 => Status::BadEigenvalue,
                10 => Status::NonfiniteOutput,
                _ => Status::Ok,
            };
            assert_eq!(*s, expect, "block {b}: {st:?}");
        }
        let got = run_eigen(&prog, &layout, &slots, &eval, &einfo, &x).unwrap();
        let d = compare(&got, &want);
        eprintln!(
            "decorrelate_eigen (emulated) vs twin_eigen, {} blocks in slots of {l}: flux {}, \
             fluxivar {}, resolution {}",
            layout.nblock, d[0], d[1], d[2]
        );
        assert_eq!(got.status, want.status, "status");
        assert_eq!(got.sweeps, want.sweeps, "sweeps");
        assert!(d.iter().all(Diff::same), "{d:?}");
    }
}

mod spots_cu {
    //! spots.cu against `spots::twin`: x, y and the corners bit for bit; the values to ~1e-13
    //! of each spot's peak (the emulation's erf is glibc's, the twin's the `libm` crate's; the
    //! exp is glibc's on both sides, and -ffp-contract=off keeps the kernel's unfused
    //! expressions as the twin writes them).
    use super::super::spots::{flatten, launch_config, twin, SpotInputs, SpotsParams};
    use super::*;
    use crate::psf::SpotSet;

    /// The kernel as `SpotsKernel::launch` launches it (`launch_config`), outputs poisoned.
    fn run(prog: &Program, inp: &SpotInputs) -> Result<SpotSet, String> {
        let sh = &inp.shape;
        let n = sh.nspot();
        let (cfg, stride) = launch_config(sh).map_err(|e| e.to_string())?;
        let mut bufs = Bufs::default();
        let p = SpotsParams {
            xtrace: bufs.add(f64s(&inp.xtrace)),
            ytrace: bufs.add(f64s(&inp.ytrace)),
            params: bufs.add(f64s(&inp.params)),
            ranges: bufs.add(f64s(&inp.ranges)),
            waves: bufs.add(f64s(&inp.waves)),
            values: bufs.add(nan(n * sh.ny() * sh.nx())),
            xc: bufs.add(i64s(&vec![i64::MIN; n])),
            yc: bufs.add(i64s(&vec![i64::MIN; n])),
            xs: bufs.add(nan(n)),
            ys: bufs.add(nan(n)),
            ..SpotsParams::sizes(sh, stride).unwrap()
        };
        let launch = Launch::with_params("spots", &cfg, &p, bufs);
        let out = prog.run(&launch, LAUNCH_TIMEOUT)?;
        let mut set = twin(inp);
        set.values = crate::psf::SpotValues::Host(out.f64s(at(p.values)));
        set.xc = out.i64s(at(p.xc));
        set.yc = out.i64s(at(p.yc));
        set.x = out.f64s(at(p.xs));
        set.y = out.f64s(at(p.ys));
        Ok(set)
    }

    /// Shapes that catch transposed or mis-strided indices (as the twin's own test): LEGDEG
    /// ≠ the traces' 7 terms, ghdegx ≠ ghdegy, hsizex ≠ hsizey, a pure Gaussian along x,
    /// and a spot wide enough (81 edges) for the Gaussian at every edge; spot counts that
    /// leave the last block with idle warps; and a PSF with tails (five more parameter rows,
    /// a longer `par`, the tail added before clipping).
    #[test]
    fn spots_cu_matches_its_twin() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file(tc, "spots.cu", |s| s).unwrap();
        let none = [0.0; 5];
        let tails = [0.004, 1.5, 1.0, 1.3, 1.2];
        let shapes = [
            (4, 8, 5, 4, 6, none),
            (0, 40, 3, 0, 2, none),
            (6, 3, 9, 5, 1, none),
            (4, 8, 5, 4, 6, tails),
        ];
        for (legdeg, hsizex, hsizey, ghdegx, ghdegy, tail) in shapes {
            let shape = (legdeg, hsizex, hsizey, ghdegx, ghdegy);
            let psf = super::super::spots::shaped_psf(12, shape, tail);
            let (lo, hi) = psf.wave_range();
            // Past both ends of the range too.
            let nwave = 23;
            let waves: Vec<f64> = (0..nwave)
                .map(|i| lo - 15.0 + (hi - lo + 30.0) * i as f64 / (nwave - 1) as f64)
                .collect();
            let inp = flatten(&psf, 3, 3, &waves).unwrap();
            assert_eq!(inp.shape.tail, tail[0] != 0.0);
            let (cfg, _) = launch_config(&inp.shape).unwrap();
            let warps = cfg.block_dim.0 as usize / 32;
            assert_ne!(
                inp.shape.nspot() % warps,
                0,
                "no idle warp in the last block"
            );
            let t0 = Instant::now();
            let got = run(&prog, &inp).unwrap();
            let elapsed = t0.elapsed().as_secs_f64();
            let want = twin(&inp);
            assert_eq!(got.xc, want.xc, "xc");
            assert_eq!(got.yc, want.yc, "yc");
            assert_eq!(Diff::of(&got.x, &want.x).differ, 0, "x");
            assert_eq!(Diff::of(&got.y, &want.y).differ, 0, "y");
            let npix = inp.shape.ny() * inp.shape.nx();
            let (mut worst, mut differ) = (0.0f64, 0usize);
            for (a, b) in got.values().chunks(npix).zip(want.values().chunks(npix)) {
                let peak = b.iter().fold(0.0f64, |m, v| m.max(*v));
                assert!(peak > 0.0);
                for (p, q) in a.iter().zip(b) {
                    assert!(p.is_finite(), "a value left unwritten");
                    differ += usize::from(p.to_bits() != q.to_bits());
                    worst = worst.max((p - q).abs() / peak);
                }
            }
            eprintln!(
                "spots.cu (emulated) vs twin, LEGDEG {legdeg} HSIZE {hsizex}x{hsizey} GHDEG \
                 {ghdegx}x{ghdegy} tails {}, {} spots in {} blocks of {warps} warps, {elapsed:.1} s: \
                 x, y, corners identical; values {differ}/{} differ, max |diff|/peak {worst:.1e}",
                inp.shape.tail,
                inp.shape.nspot(),
                cfg.grid_dim.0,
                got.values().len()
            );
            assert!(worst <= 1e-13, "{worst:e}");
        }
    }
}

mod unit_cu {
    //! unit.cu against `unit::twin`, bit for bit, on a chunk whose blocks include a patch that
    //! did not factor and a block that did not decorrelate (both left alone), a short last
    //! patch, and unit cells that no block covers (left as they were: NaN here).
    use super::super::unit::{twin, HostChunk, UnitShape};
    use super::*;
    use crate::extract::gpu::unit::{scatter_config, UnitScatterParams};

    #[test]
    fn unit_cu_matches_its_twin_bit_for_bit() {
        let Some(tc) = toolchain_or_skip() else {
            return;
        };
        let prog = Program::kernel_file(tc, "unit.cu", |s| s).unwrap();
        let (npatch, ncmax, nkmax, ncol, nd2) = (4usize, 3usize, 8usize, 9usize, 3usize);
        let shape = UnitShape {
            specmin: 40,
            nspec: 9,
            nwave: 30,
            nd2,
        };
        // Patch b: fibers 3·(b % 3).., bins 10·(b / 3).., 8 kept bins (5 for the last).
        let mut place = Vec::new();
        for b in 0..npatch {
            for c in 0..ncmax {
                let nk = if b == npatch - 1 { 5 } else { 8 };
                place.extend([b, c, 3 * (b % 3) + c, 10 * (b / 3), nk].map(|v| v as i32));
            }
        }
        let nblock = place.len() / 5;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let mut random = |n: usize| {
            (0..n)
                .map(|_| rng.gen_range(-2.0..2.0))
                .collect::<Vec<f64>>()
        };
        let info = vec![0, 1, 0, 0];
        let mut status = vec![0; nblock];
        status[7] = 2;
        let (flux, fluxivar) = (random(nblock * ncol), random(nblock * ncol));
        let resolution = random(nblock * nd2 * ncol);
        let (chi2pix, pixmask) = (
            random(npatch * ncmax * nkmax),
            random(npatch * ncmax * nkmax),
        );
        let lens = shape.part_lens();
        let mut bufs = Bufs::default();
        let as_i32 = |v: usize| i32::try_from(v).unwrap();
        let params = UnitScatterParams {
            nblock: as_i32(nblock),
            ncol: as_i32(ncol),
            nd2: as_i32(nd2),
            nwave: as_i32(shape.nwave),
            ncmax: as_i32(ncmax),
            nkmax: as_i32(nkmax),
            place: bufs.add(i32s(&place)),
            info: bufs.add(i32s(&info)),
            status: bufs.add(i32s(&status)),
            flux: bufs.add(f64s(&flux)),
            fluxivar: bufs.add(f64s(&fluxivar)),
            resolution: bufs.add(f64s(&resolution)),
            chi2pix: bufs.add(f64s(&chi2pix)),
            pixmask: bufs.add(f64s(&pixmask)),
            u_flux: bufs.add(nan(lens[0])),
            u_ivar: bufs.add(nan(lens[1])),
            u_resolution: bufs.add(nan(lens[2])),
            u_chi2pix: bufs.add(nan(lens[3])),
            u_pixmask: bufs.add(nan(lens[4])),
        };
        let cfg = scatter_config(nblock).unwrap();
        let l = Launch::with_params("unit_scatter", &cfg, &params, bufs);
        let out = prog.run(&l, LAUNCH_TIMEOUT).unwrap();
        let chunk = HostChunk {
            info: &info,
            status: &status,
            ncol,
            flux: &flux,
            fluxivar: &fluxivar,
            resolution: &resolution,
            chi2pix: &chi2pix,
            pixmask: &pixmask,
            ncmax,
            nkmax,
        };
        let mut want = lens.map(|n| vec![f64::NAN; n]);
        twin(&place, &chunk, &shape, &mut want);
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut written = 0;
        let written_to = [
            params.u_flux,
            params.u_ivar,
            params.u_resolution,
            params.u_chi2pix,
            params.u_pixmask,
        ];
        for (i, w) in want.iter().enumerate() {
            let got = out.f64s(at(written_to[i]));
            assert_eq!(bits(&got), bits(w), "array {i}");
            written += w.iter().filter(|v| !v.is_nan()).count();
        }
        // Patch 1 did not factor and block 7 (patch 2, fiber 1) did not decorrelate; patch 3
        // keeps 5 bins; the rest 8: (2·3 − 1)·8 + 3·5 cells of each of the four arrays, nd2
        // times as many of the resolution.
        let cells = 5 * 8 + 3 * 5;
        assert_eq!(written, cells * (4 + nd2));
        eprintln!(
            "unit.cu (emulated) vs twin: {nblock} blocks, {written} values written, identical"
        );
    }
}
