//! `spextract report`: compares the run summaries that `extract --report` writes — what each run
//! did, its frames per node-hour against a baseline run (CPU nodes against GPU nodes, one build
//! against another), where each role's time went, and optionally a bar chart.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::pipeline::report::RunReport;

/// `spextract report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Run reports written by `extract --report`, in the order of the table and the chart.
    #[arg(required = true, num_args = 1..)]
    pub reports: Vec<PathBuf>,
    /// Which report the ratios are relative to: 1 for the first, 2 for the second, ...
    #[arg(long, default_value_t = 1)]
    pub baseline: usize,
    /// Also write a bar chart of frames per node-hour here, one bar per report. SVG only (a .svg
    /// path): a PNG would need a font to draw its labels, and spextract ships none.
    #[arg(long)]
    pub chart: Option<PathBuf>,
}

/// A report given on the command line: its file, and what it holds unless it does not exist
/// (the run never started, or died before writing it).
pub type Entry = (PathBuf, Option<RunReport>);

/// Prints the comparison table and each report's time split, and writes the chart. A report
/// file that does not exist is a row marked "no report" rather than the end of the comparison
/// (a job that died at start-up leaves none, and the other runs still have rates to show);
/// returns false when any was missing.
pub fn run(args: &ReportArgs) -> Result<bool> {
    if args.baseline == 0 || args.baseline > args.reports.len() {
        bail!(
            "--baseline {}: give a number from 1 to {} (the reports' positions)",
            args.baseline,
            args.reports.len()
        );
    }
    // A chart format that cannot be written fails the command before any output, not after
    // the table.
    if let Some(path) = &args.chart {
        check_chart_path(path)?;
    }
    let reports = args
        .reports
        .iter()
        .map(|path| {
            if std::fs::metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
                return Ok((path.clone(), None));
            }
            let rep = RunReport::read_json(path).map_err(|e| anyhow!(e))?;
            Ok((path.clone(), Some(rep)))
        })
        .collect::<Result<Vec<Entry>>>()?;
    if reports.iter().all(|(_, r)| r.is_none()) {
        let names: Vec<String> = reports
            .iter()
            .map(|(p, _)| p.display().to_string())
            .collect();
        bail!("no such report: {}", names.join(", "));
    }
    let baseline = args.baseline - 1;
    print!("{}", table(&reports, baseline)?);
    print!("{}", role_split(&reports));
    if let Some(path) = &args.chart {
        write_chart(path, &reports, baseline)?;
        println!("chart: {}", path.display());
    }
    Ok(reports.iter().all(|(_, r)| r.is_some()))
}

/// The comparison: one row per report, each rate as a multiple of the baseline's (0-based
/// `baseline`), then one sentence per other report and notes on missing, interrupted or
/// failing runs.
pub fn table(reports: &[Entry], baseline: usize) -> Result<String> {
    let base = baseline_rate(reports, baseline)?;
    let base_label = name(reports, baseline);
    let header = [
        "#",
        "label",
        "backend",
        "nodes",
        "ranks",
        "threads/rank",
        "written",
        "skipped",
        "failed",
        "abandoned",
        "wall s",
        "frames/node-hour",
        "vs baseline",
    ];
    let mut rows = vec![header.iter().map(|s| s.to_string()).collect::<Vec<_>>()];
    for (i, (path, rep)) in reports.iter().enumerate() {
        let mut row = vec![(i + 1).to_string(), label(path, rep.as_ref())];
        let Some(rep) = rep else {
            row.extend(std::iter::repeat_n("-".to_string(), header.len() - 3));
            row.push("no report".into());
            rows.push(row);
            continue;
        };
        let mark = if i == baseline { " (baseline)" } else { "" };
        row.extend([
            rep.backend.clone(),
            rep.nodes.to_string(),
            rep.ranks.to_string(),
            rep.threads_per_rank.to_string(),
            rep.frames.written.to_string(),
            rep.frames.skipped.to_string(),
            rep.frames.failed.to_string(),
            rep.frames.abandoned.to_string(),
            format!("{:.1}", rep.wall_s),
            format!("{:.1}", rep.frames_per_node_hour),
            match base {
                Some(base) => format!("{}{mark}", ratio(rep.frames_per_node_hour / base)),
                None => "-".into(),
            },
        ]);
        rows.push(row);
    }
    // Text columns left, numbers right.
    let mut out = render(&rows, &[1, 2]);
    out.push('\n');
    for (i, (_, rep)) in reports.iter().enumerate() {
        if let (Some(rep), Some(base)) = (rep, base) {
            if i != baseline {
                writeln!(
                    out,
                    "{} {} {base_label} in frames per node-hour",
                    name(reports, i),
                    ratio(rep.frames_per_node_hour / base)
                )?;
            }
        }
    }
    for (path, rep) in reports {
        let Some(rep) = rep else {
            writeln!(
                out,
                "not run: {}: no such report (its run did not start, or ended before writing \
                 it: see its job's output)",
                path.display()
            )?;
            continue;
        };
        if rep.interrupted {
            writeln!(
                out,
                "note: {} ({}) was interrupted with {} of {} frames abandoned; its rate counts \
                 the frames written before the stop",
                rep_label(path, rep),
                path.display(),
                rep.frames.abandoned,
                rep.frames.listed
            )?;
        }
        for f in &rep.failures {
            writeln!(
                out,
                "failed in {}: {} -> {}: {}",
                rep_label(path, rep),
                f.image.display(),
                f.output.display(),
                f.error
            )?;
        }
    }
    if base.is_none() {
        writeln!(
            out,
            "no ratios: the baseline, {}, has no report; choose another with --baseline",
            reports[baseline].0.display()
        )?;
    }
    Ok(out)
}

/// The name of report `i` in sentences: its label, with its file when another report shares
/// the label (runs compared with themselves, a rerun or another build, often do).
fn name(reports: &[Entry], i: usize) -> String {
    let (path, rep) = &reports[i];
    let l = label(path, rep.as_ref());
    let shared = reports
        .iter()
        .filter(|(p, r)| label(p, r.as_ref()) == l)
        .count();
    if shared > 1 {
        format!("{l} ({})", path.display())
    } else {
        l
    }
}

/// Seconds per role, summed over each report's ranks of that role.
pub fn role_split(reports: &[Entry]) -> String {
    let mut out = String::new();
    for (path, rep) in reports {
        let Some(rep) = rep else { continue };
        let _ = writeln!(
            out,
            "\n{} ({}): seconds summed over the ranks of each role",
            rep_label(path, rep),
            path.display()
        );
        if rep.roles.is_empty() {
            out.push_str("  no per-rank times in this report\n");
            continue;
        }
        // Keyed so that the rows follow the data: readers, compute ranks, writers, then any
        // combined roles of runs too small to give each its own rank.
        let mut sums: BTreeMap<(u8, &str), [f64; 6]> = BTreeMap::new();
        for r in &rep.roles {
            let order = match r.role.as_str() {
                "reader" => 0,
                "compute" => 1,
                "writer" => 2,
                _ => 3,
            };
            let s = sums.entry((order, r.role.as_str())).or_default();
            s[0] += 1.0;
            s[1] += r.read_s;
            s[2] += r.transfer_s;
            s[3] += r.compute_s;
            s[4] += r.write_s;
            s[5] += r.idle_s;
        }
        let mut rows = vec![[
            "role", "ranks", "read", "transfer", "compute", "write", "idle",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()];
        for ((_, role), s) in &sums {
            let mut row = vec![role.to_string(), format!("{}", s[0] as usize)];
            row.extend(s[1..].iter().map(|v| format!("{v:.1}")));
            rows.push(row);
        }
        for line in render(&rows, &[0]).lines() {
            let _ = writeln!(out, "  {line}");
        }
    }
    out
}

/// Refuses a `--chart` path whose extension is not `.svg`, the one format written.
fn check_chart_path(path: &Path) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => Ok(()),
        Some("png") => bail!(
            "--chart {}: PNG is not supported: drawing its text needs a font, which spextract \
             does not ship; write a .svg (any browser shows it; `rsvg-convert -o chart.png \
             chart.svg` makes a PNG)",
            path.display()
        ),
        Some(other) => bail!(
            "--chart {}: unknown chart format '.{other}'; use a .svg path",
            path.display()
        ),
        None => bail!(
            "--chart {}: no extension to tell the format; use a .svg path",
            path.display()
        ),
    }
}

/// Writes the bar chart to `path`, which must name an SVG file.
pub fn write_chart(path: &Path, reports: &[Entry], baseline: usize) -> Result<()> {
    check_chart_path(path)?;
    let svg = chart_svg(reports, baseline)?;
    std::fs::write(path, svg)
        .with_context(|| format!("--chart {}: cannot write the chart", path.display()))
}

/// The bar chart as SVG: one bar per report, coloured by backend, each annotated with its rate
/// and its multiple of the baseline's; a report that does not exist is an empty slot labelled
/// "no report".
pub fn chart_svg(reports: &[Entry], baseline: usize) -> Result<String> {
    let base = baseline_rate(reports, baseline)?;
    let labels: Vec<String> = reports
        .iter()
        .map(|(p, r)| match r {
            Some(r) => rep_label(p, r),
            None => format!("{} (no report)", label(p, None)),
        })
        .collect();
    let rates: Vec<Option<f64>> = reports
        .iter()
        .map(|(_, r)| r.as_ref().map(|r| r.frames_per_node_hour))
        .collect();
    // Headroom above the tallest bar for its annotation and the legend.
    let top = rates
        .iter()
        .flatten()
        .copied()
        .fold(base.unwrap_or(0.0), f64::max)
        .max(1.0)
        * 1.35;
    let n = reports.len();
    // Wide enough for a label of about 20 characters under each bar.
    let width = (140 + 160 * n).max(480) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Frames per node-hour", ("sans-serif", 22))
            .margin(20)
            .x_label_area_size(40)
            .y_label_area_size(80)
            // Bar i spans [i, i + 1).
            .build_cartesian_2d(0.0..n as f64, 0.0..top)
            .map_err(draw_err)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            // plotters places numeric ticks where it likes and a segmented axis over 0..n has
            // n + 1 slots; the labels are drawn under the bars' centres below instead.
            .x_labels(0)
            .y_label_style(("sans-serif", 14))
            .light_line_style(TRANSPARENT)
            .y_desc("frames per node-hour")
            .axis_desc_style(("sans-serif", 15))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(draw_err)?;
        // One series per backend so that the legend explains the colours.
        let mut backends: Vec<&str> = reports
            .iter()
            .filter_map(|(_, r)| r.as_ref().map(|r| r.backend.as_str()))
            .collect();
        backends.sort_unstable();
        backends.dedup();
        for backend in backends {
            let colour = backend_colour(backend);
            let bars = reports.iter().enumerate().filter_map(|(i, (_, r))| {
                r.as_ref()
                    .filter(|r| r.backend == backend)
                    .map(|r| (i, r.frames_per_node_hour))
            });
            chart
                .draw_series(bars.map(|(i, rate)| {
                    let x = i as f64;
                    Rectangle::new([(x + 0.15, 0.0), (x + 0.85, rate)], colour.filled())
                }))
                .map_err(draw_err)?
                .label(if backend.is_empty() { "?" } else { backend })
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 6), (x + 14, y + 6)], colour.filled())
                });
        }
        let under = ("sans-serif", 15)
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Top));
        for (i, text) in labels.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            root.draw(&Text::new(text.as_str(), (x, y + 10), under.clone()))
                .map_err(draw_err)?;
        }
        let above = ("sans-serif", 15)
            .into_text_style(&root)
            .pos(Pos::new(HPos::Center, VPos::Bottom));
        chart
            .draw_series(rates.iter().enumerate().filter_map(|(i, &rate)| {
                let rate = rate?;
                let text = match base {
                    Some(base) => format!("{rate:.0} ({})", ratio(rate / base)),
                    None => format!("{rate:.0}"),
                };
                Some(Text::new(
                    text,
                    (i as f64 + 0.5, rate + top * 0.01),
                    above.clone(),
                ))
            }))
            .map_err(draw_err)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .draw()
            .map_err(draw_err)?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

fn draw_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {e}")
}

fn backend_colour(backend: &str) -> RGBColor {
    match backend {
        "cpu" => RGBColor(0x1f, 0x77, 0xb4),
        "gpu" => RGBColor(0x2c, 0xa0, 0x2c),
        _ => RGBColor(0x7f, 0x7f, 0x7f),
    }
}

/// The baseline's frames per node-hour (`None` when it has no report), after checking that
/// every rate can be compared.
fn baseline_rate(reports: &[Entry], baseline: usize) -> Result<Option<f64>> {
    let Some((base_path, base)) = reports.get(baseline) else {
        bail!(
            "baseline {}: only {} reports given",
            baseline + 1,
            reports.len()
        );
    };
    for (path, rep) in reports {
        let Some(rep) = rep else { continue };
        if !(rep.frames_per_node_hour >= 0.0) || !rep.frames_per_node_hour.is_finite() {
            bail!(
                "{}: frames_per_node_hour is {}, not a rate",
                path.display(),
                rep.frames_per_node_hour
            );
        }
    }
    let Some(base) = base else {
        return Ok(None);
    };
    if !(base.frames_per_node_hour > 0.0) {
        bail!(
            "{}: the baseline run has 0 frames per node-hour ({} frames written in {:.1} s on {} \
             nodes), so nothing can be compared with it; choose another with --baseline",
            base_path.display(),
            base.frames.written,
            base.wall_s,
            base.nodes
        );
    }
    Ok(Some(base.frames_per_node_hour))
}

/// The report's label, or its file name when the label is empty or there is no report.
fn label(path: &Path, rep: Option<&RunReport>) -> String {
    match rep {
        Some(rep) if !rep.label.trim().is_empty() => rep.label.clone(),
        _ => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string()),
    }
}

fn rep_label(path: &Path, rep: &RunReport) -> String {
    label(path, Some(rep))
}

/// A multiple to three significant figures: "0.084x", "1.00x", "12.3x", "250x".
fn ratio(r: f64) -> String {
    if r >= 99.95 {
        format!("{r:.0}x")
    } else if r >= 9.995 {
        format!("{r:.1}x")
    } else if r >= 0.9995 {
        format!("{r:.2}x")
    } else {
        format!("{r:.3}x")
    }
}

/// Rows as a Markdown table padded to column width, so that it reads in a terminal and pastes
/// into a document; columns in `left` are left-aligned, the others right-aligned.
fn render(rows: &[Vec<String>], left: &[usize]) -> String {
    let ncol = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..ncol)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (k, row) in rows.iter().enumerate() {
        out.push('|');
        for (c, w) in widths.iter().enumerate() {
            let cell = row.get(c).map(String::as_str).unwrap_or("");
            let pad = w - cell.chars().count();
            if left.contains(&c) {
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            } else {
                let _ = write!(out, " {}{cell} |", " ".repeat(pad));
            }
        }
        out.push('\n');
        if k == 0 {
            out.push('|');
            for (c, w) in widths.iter().enumerate() {
                if left.contains(&c) {
                    let _ = write!(out, "{}|", "-".repeat(w + 2));
                } else {
                    let _ = write!(out, "{}:|", "-".repeat(w + 1));
                }
            }
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::report::{FrameCounts, FrameFailure, RoleTimes, REPORT_VERSION};

    fn role(rank: usize, role: &str, read: f64, compute: f64, write: f64, idle: f64) -> RoleTimes {
        RoleTimes {
            rank,
            role: role.into(),
            read_s: read,
            transfer_s: 0.5,
            compute_s: compute,
            write_s: write,
            idle_s: idle,
            ..Default::default()
        }
    }

    /// 40 frames on 2 CPU nodes in 3600 s (20 frames per node-hour) and 120 frames on 1 GPU
    /// node in 1800 s (240 per node-hour: 12x).
    fn two_runs() -> Vec<Entry> {
        let cpu = RunReport {
            version: REPORT_VERSION,
            label: "CPU nodes".into(),
            backend: "cpu".into(),
            nodes: 2,
            ranks: 16,
            threads_per_rank: 8,
            wall_s: 3600.0,
            frames: FrameCounts {
                listed: 45,
                written: 40,
                skipped: 3,
                failed: 2,
                abandoned: 0,
            },
            frames_per_node_hour: RunReport::compute_rate(40, 3600.0, 2),
            roles: vec![
                role(0, "reader", 10.0, 0.0, 0.0, 3590.0),
                role(1, "writer", 0.0, 0.0, 20.0, 3580.0),
                role(2, "compute", 0.0, 3000.0, 0.0, 100.0),
                role(3, "compute", 0.0, 3100.0, 0.0, 50.0),
            ],
            failures: vec![FrameFailure {
                image: "bad.fits".into(),
                output: "frame-bad.fits".into(),
                error: "IMAGE HDU missing".into(),
            }],
            ..Default::default()
        };
        let gpu = RunReport {
            version: REPORT_VERSION,
            label: "GPU nodes".into(),
            backend: "gpu".into(),
            nodes: 1,
            ranks: 6,
            threads_per_rank: 2,
            wall_s: 1800.0,
            frames: FrameCounts {
                listed: 125,
                written: 120,
                abandoned: 5,
                ..Default::default()
            },
            frames_per_node_hour: RunReport::compute_rate(120, 1800.0, 1),
            interrupted: true,
            roles: vec![role(0, "reader+writer", 30.0, 0.0, 40.0, 1700.0)],
            ..Default::default()
        };
        vec![
            ("cpu.json".into(), Some(cpu)),
            ("gpu.json".into(), Some(gpu)),
        ]
    }

    /// The cells of the table row whose first cell is `index`.
    fn row(text: &str, index: &str) -> Vec<String> {
        text.lines()
            .map(|l| {
                l.split('|')
                    .map(|c| c.trim().to_string())
                    .collect::<Vec<_>>()
            })
            .find(|cells| cells.len() > 2 && cells[1] == index)
            .unwrap_or_else(|| panic!("no row {index} in:\n{text}"))
    }

    #[test]
    fn table_holds_each_run_and_its_rate_against_the_baseline() {
        let runs = two_runs();
        let text = table(&runs, 0).unwrap();
        let cpu = row(&text, "1");
        let gpu = row(&text, "2");
        assert_eq!(
            &cpu[2..14],
            &[
                "CPU nodes",
                "cpu",
                "2",
                "16",
                "8",
                "40",
                "3",
                "2",
                "0",
                "3600.0",
                "20.0",
                "1.00x (baseline)"
            ]
        );
        assert_eq!(
            &gpu[2..14],
            &[
                "GPU nodes",
                "gpu",
                "1",
                "6",
                "2",
                "120",
                "0",
                "0",
                "5",
                "1800.0",
                "240.0",
                "12.0x"
            ]
        );
        assert!(
            text.contains("GPU nodes 12.0x CPU nodes in frames per node-hour"),
            "{text}"
        );
        assert!(
            text.contains("GPU nodes (gpu.json) was interrupted with 5 of 125"),
            "{text}"
        );
        assert!(text.contains("failed in CPU nodes: bad.fits -> frame-bad.fits: IMAGE HDU missing"));

        // Runs of the same label are told apart by their files.
        let mut same = runs.clone();
        same[1].1.as_mut().unwrap().label = "CPU nodes".into();
        let text = table(&same, 0).unwrap();
        assert!(
            text.contains("CPU nodes (gpu.json) 12.0x CPU nodes (cpu.json) in"),
            "{text}"
        );

        // The other way round the ratio inverts.
        let text = table(&runs, 1).unwrap();
        assert_eq!(row(&text, "1")[13], "0.083x");
        assert_eq!(row(&text, "2")[13], "1.00x (baseline)");
        assert!(text.contains("CPU nodes 0.083x GPU nodes"), "{text}");
    }

    #[test]
    fn role_split_sums_ranks_of_each_role() {
        let text = role_split(&two_runs());
        assert!(
            text.contains("CPU nodes (cpu.json): seconds summed"),
            "{text}"
        );
        let compute = row(&text, "compute");
        // 2 ranks: read 0, transfer 0.5 + 0.5, compute 3000 + 3100, write 0, idle 100 + 50.
        assert_eq!(
            &compute[2..8],
            &["2", "0.0", "1.0", "6100.0", "0.0", "150.0"]
        );
        assert_eq!(&row(&text, "reader")[2..4], &["1", "10.0"]);
        assert_eq!(row(&text, "writer")[6], "20.0");
        // Readers come before compute ranks, which come before writers.
        let at = |s: &str| text.find(&format!("\n  | {s} ")).unwrap();
        assert!(at("reader") < at("compute") && at("compute") < at("writer"));
        assert_eq!(
            &row(&text, "reader+writer")[2..8],
            &["1", "30.0", "0.5", "0.0", "40.0", "1700.0"]
        );
    }

    #[test]
    fn zero_baseline_rate_is_an_error_naming_the_file() {
        let mut runs = two_runs();
        runs[0].1.as_mut().unwrap().frames.written = 0;
        runs[0].1.as_mut().unwrap().frames_per_node_hour = 0.0;
        let err = table(&runs, 0).unwrap_err().to_string();
        assert!(
            err.starts_with("cpu.json: the baseline run has 0 frames per node-hour"),
            "{err}"
        );
        assert!(err.contains("--baseline"), "{err}");
        assert!(chart_svg(&runs, 0).is_err());
        // A zero rate is fine in a run that is not the baseline.
        let text = table(&runs, 1).unwrap();
        assert_eq!(row(&text, "1")[13], "0.000x");
    }

    #[test]
    fn baseline_out_of_range_and_bad_rates_are_errors() {
        let mut runs = two_runs();
        let err = table(&runs, 2).unwrap_err().to_string();
        assert!(err.contains("only 2 reports"), "{err}");
        runs[1].1.as_mut().unwrap().frames_per_node_hour = -1.0;
        let err = table(&runs, 0).unwrap_err().to_string();
        assert!(
            err.starts_with("gpu.json: frames_per_node_hour is -1"),
            "{err}"
        );
    }

    #[test]
    fn run_names_the_file_of_a_missing_or_invalid_report() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.json");
        let args = |reports: Vec<PathBuf>| ReportArgs {
            reports,
            baseline: 1,
            chart: None,
        };
        let err = run(&args(vec![missing.clone()])).unwrap_err().to_string();
        assert!(err.contains("missing.json"), "{err}");

        let invalid = dir.path().join("invalid.json");
        std::fs::write(&invalid, "{\"version\": 1, \"label\": ").unwrap();
        let err = run(&args(vec![invalid])).unwrap_err().to_string();
        assert!(
            err.contains("invalid.json: not a spextract report"),
            "{err}"
        );

        let old = dir.path().join("old.json");
        let rep = RunReport {
            version: REPORT_VERSION + 1,
            ..two_runs()[0].1.clone().unwrap()
        };
        rep.write_json(&old).unwrap();
        let err = run(&args(vec![old])).unwrap_err().to_string();
        assert!(err.contains("old.json: report version"), "{err}");

        let good = dir.path().join("good.json");
        two_runs()[0].1.as_ref().unwrap().write_json(&good).unwrap();
        let err = run(&ReportArgs {
            reports: vec![good.clone()],
            baseline: 2,
            chart: None,
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("--baseline 2"), "{err}");
        assert!(run(&args(vec![good])).unwrap());
    }

    /// A run whose job died at start-up leaves no report: the others keep their rows and the
    /// chart its bar, the missing one is marked, and the command says so by its exit status.
    #[test]
    fn a_missing_report_is_a_marked_row_not_the_end_of_the_comparison() {
        let dir = tempfile::tempdir().unwrap();
        let cpu = dir.path().join("cpu.json");
        two_runs()[0].1.as_ref().unwrap().write_json(&cpu).unwrap();
        let gpu = dir.path().join("gpu.json");
        let chart = dir.path().join("compare.svg");
        let args = |reports: Vec<PathBuf>, baseline| ReportArgs {
            reports,
            baseline,
            chart: Some(chart.clone()),
        };
        assert!(!run(&args(vec![cpu.clone(), gpu.clone()], 1)).unwrap());
        let svg = std::fs::read_to_string(&chart).unwrap();
        assert!(svg.contains("gpu (no report)"), "{svg}");
        assert!(svg.contains("20 (1.00x)"), "{svg}");

        let runs = vec![
            (cpu.clone(), Some(two_runs()[0].1.clone().unwrap())),
            (gpu.clone(), None),
        ];
        let text = table(&runs, 0).unwrap();
        assert_eq!(row(&text, "1")[13], "1.00x (baseline)");
        assert_eq!(&row(&text, "2")[2..4], &["gpu", "-"]);
        assert_eq!(row(&text, "2")[13], "no report");
        assert!(
            text.contains(&format!("not run: {}: no such report", gpu.display())),
            "{text}"
        );
        // The missing run as the baseline: rates without ratios, and a note saying why.
        let text = table(&runs, 1).unwrap();
        assert_eq!(row(&text, "1")[12], "20.0");
        assert_eq!(row(&text, "1")[13], "-");
        assert!(text.contains("no ratios: the baseline"), "{text}");
        assert!(chart_svg(&runs, 1).unwrap().contains("gpu (no report)"));
        // Nothing to show at all is an error naming the files.
        let err = run(&args(vec![gpu.clone()], 1)).unwrap_err().to_string();
        assert!(
            err.contains("no such report") && err.contains("gpu.json"),
            "{err}"
        );
    }

    /// Whether every element of `svg` is closed in order: a small check in place of an XML
    /// parser, enough to catch truncated or interleaved output.
    fn tags_balance(svg: &str) -> bool {
        let mut stack = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let Some(len) = rest[start..].find('>') else {
                return false;
            };
            let tag = &rest[start + 1..start + len];
            rest = &rest[start + len + 1..];
            if tag.starts_with('?') || tag.starts_with('!') || tag.ends_with('/') {
                continue;
            }
            let name = tag.split_whitespace().next().unwrap_or("");
            if let Some(closing) = name.strip_prefix('/') {
                if stack.pop() != Some(closing) {
                    return false;
                }
            } else {
                stack.push(name);
            }
        }
        stack.is_empty()
    }

    #[test]
    fn chart_is_a_well_formed_svg_with_every_label() {
        let dir = tempfile::tempdir().unwrap();
        let mut runs = two_runs();
        // Characters that must be escaped in XML.
        runs[1].1.as_mut().unwrap().label = "GPU <A100> & co".into();
        let path = dir.path().join("compare.svg");
        write_chart(&path, &runs, 0).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg") || svg.starts_with("<?xml"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(tags_balance(&svg), "{svg}");
        assert!(
            svg.contains(">\nCPU nodes\n<") || svg.contains(">CPU nodes<"),
            "{svg}"
        );
        assert!(svg.contains("GPU &lt;A100&gt; &amp; co"), "{svg}");
        assert!(!svg.contains("<A100>"));
        // The bars' annotations and the legend.
        assert!(
            svg.contains("240 (12.0x)") && svg.contains("20 (1.00x)"),
            "{svg}"
        );
        assert!(
            svg.contains(">\ncpu\n<") && svg.contains(">\ngpu\n<"),
            "{svg}"
        );
        // Each bar is drawn in its backend's colour.
        assert!(svg.contains("#1F77B4") && svg.contains("#2CA02C"), "{svg}");

        // The upper case extension is the same format.
        let upper = dir.path().join("compare.SVG");
        write_chart(&upper, &runs, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&upper).unwrap(), svg);
    }

    #[test]
    fn chart_refuses_other_formats_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let runs = two_runs();
        for name in ["chart.png", "chart.pdf", "chart"] {
            let path = dir.path().join(name);
            let err = write_chart(&path, &runs, 0).unwrap_err().to_string();
            assert!(err.contains(name) && err.contains(".svg"), "{err}");
            assert!(!path.exists());
        }
        let err = write_chart(&dir.path().join("no/such/dir/c.svg"), &runs, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.svg: cannot write the chart"), "{err}");
        // The format is checked before the reports are read.
        let err = run(&ReportArgs {
            reports: vec![dir.path().join("missing.json")],
            baseline: 1,
            chart: Some(dir.path().join("c.png")),
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("c.png: PNG is not supported"), "{err}");
    }

    #[test]
    fn ratio_keeps_three_significant_figures() {
        assert_eq!(ratio(12.0), "12.0x");
        assert_eq!(ratio(12.34), "12.3x");
        assert_eq!(ratio(1.0), "1.00x");
        assert_eq!(ratio(1.0 / 12.0), "0.083x");
        assert_eq!(ratio(250.4), "250x");
    }
}
