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
    /// Also write a bar chart of frames per node-hour here: one bar per report, numbered as the
    /// table's rows, interrupted runs hatched. SVG only (a .svg path): a PNG would need a font
    /// to draw its labels, and spextract ships none.
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

/// The chart's title.
const CAPTION: &str = "Frames per node-hour";
/// Sizes in SVG pixels: text, the title, the page's margin, the least length of the bars'
/// track, and the distance between the lines of a label.
const TEXT_PX: f64 = 13.0;
const CAPTION_PX: f64 = 18.0;
const MARGIN: f64 = 16.0;
const TRACK_W: f64 = 560.0;
const LINE_H: f64 = TEXT_PX * 1.4;
/// The longest line of a label in characters: longer labels wrap, so that one long label
/// does not push the bars off a page.
const LABEL_CHARS: usize = 44;
/// Centres of the lines under the track, below its bottom: the ticks' values, the axis's
/// description, the legend.
const TICKS_Y: f64 = 17.0;
const DESC_Y: f64 = 36.0;
const LEGEND_Y: f64 = 62.0;
/// plotters writes a text of size s with an SVG font-size of s / 1.24.
const PLOTTERS_FONT_SCALE: f64 = 1.24;

/// One report's row of the chart.
struct Bar {
    /// Its label numbered as in the table ("2. GPU nodes"), in lines.
    lines: Vec<String>,
    /// Frames per node-hour; `None` without a report.
    rate: Option<f64>,
    /// What is written beside the bar: its rate, multiple of the baseline's, and marks.
    value: String,
    colour: RGBColor,
    interrupted: bool,
}

/// A legend entry: the name, its colour, and whether its swatch is hatched.
type LegendEntry = (String, RGBColor, bool);

/// Where the chart's parts go, in SVG pixels.
struct Layout {
    width: f64,
    height: f64,
    /// The labels' right edge.
    label_right: f64,
    track_left: f64,
    track_w: f64,
    track_top: f64,
    row_h: f64,
    /// Frames per node-hour at the track's right end, and between ticks.
    x_max: f64,
    step: f64,
    decimals: usize,
}

impl Layout {
    /// Labels on the left as wide as the longest line, the bars' track to their right, long
    /// enough for each bar's value beside it; every text sized by `text_width`, which is at
    /// least its width in the common fonts.
    fn new(bars: &[Bar], legend: &[LegendEntry], x_desc: &str) -> Layout {
        let widest = |texts: &mut dyn Iterator<Item = &String>| {
            texts.map(|t| text_width(t, TEXT_PX)).fold(0.0, f64::max)
        };
        let label_w = widest(&mut bars.iter().flat_map(|b| &b.lines));
        let value_w = widest(&mut bars.iter().map(|b| &b.value));
        let lines = bars.iter().map(|b| b.lines.len()).max().unwrap_or(1);
        let row_h = (lines as f64 * LINE_H + 14.0).max(34.0);
        // The longest value still leaves two thirds of the track to its bar.
        let track_w = TRACK_W.max((value_w + 8.0) * 3.0);
        // A bar of rate r ends at r / x_max of the track, and its value must fit after it.
        let x_max = bars
            .iter()
            .filter_map(|b| {
                let room = track_w - 8.0 - text_width(&b.value, TEXT_PX);
                Some(b.rate? * track_w / room)
            })
            .fold(0.0, f64::max);
        let x_max = if x_max > 0.0 { x_max } else { 1.0 };
        let (step, decimals) = tick_step(x_max, track_w);
        let last_tick = (x_max / step).floor() * step;
        let last_tick = text_width(&format!("{last_tick:.decimals$}"), TEXT_PX);
        let track_left = MARGIN + label_w + 12.0;
        let legend_w: f64 = legend
            .iter()
            .map(|(name, _, _)| 32.0 + text_width(name, TEXT_PX))
            .sum();
        let width = [
            track_left + track_w + last_tick / 2.0,
            track_left + legend_w,
            track_left + text_width(x_desc, TEXT_PX),
            text_width(CAPTION, CAPTION_PX) + MARGIN,
        ]
        .into_iter()
        .fold(0.0, f64::max)
            + MARGIN;
        let track_top = MARGIN + CAPTION_PX * 1.6;
        let height = track_top + bars.len() as f64 * row_h + LEGEND_Y + 12.0 + MARGIN;
        Layout {
            width: width.ceil(),
            height: height.ceil(),
            label_right: MARGIN + label_w,
            track_left,
            track_w,
            track_top,
            row_h,
            x_max,
            step,
            decimals,
        }
    }

    /// Where `rate` is on the track.
    fn x(&self, rate: f64) -> f64 {
        self.track_left + rate / self.x_max * self.track_w
    }

    fn row_top(&self, row: usize) -> f64 {
        self.track_top + row as f64 * self.row_h
    }
}

/// The ticks' spacing along an axis from 0 to `x_max` drawn `track_w` pixels long, and the
/// decimals their values need: 1, 2 or 5 times a power of ten, at most 6 ticks after 0, with
/// room between their values.
fn tick_step(x_max: f64, track_w: f64) -> (f64, usize) {
    let mut magnitude = 10f64.powf((x_max / 10.0).log10().floor());
    loop {
        for m in [1.0, 2.0, 5.0] {
            let step = m * magnitude;
            let decimals = if step >= 1.0 {
                0
            } else {
                (-step.log10()).ceil() as usize
            };
            let last = (x_max / step).floor() * step;
            let value_w = text_width(&format!("{last:.decimals$}"), TEXT_PX);
            if last / step <= 6.0 && step / x_max * track_w >= value_w + 16.0 {
                return (step, decimals);
            }
        }
        magnitude *= 10.0;
    }
}

/// `text` in lines of at most `width` (> 0) characters, broken at spaces; a word longer than
/// a line fills the line it starts on and goes on in the next.
fn wrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = String::new();
    for mut word in text.split_whitespace() {
        loop {
            let used = line.chars().count();
            let space = usize::from(used > 0);
            let len = word.chars().count();
            if used + space + len <= width {
                line.push_str(&" ".repeat(space));
                line.push_str(word);
                break;
            }
            if len > width && used + space < width {
                let room = width - used - space;
                let cut = word.char_indices().nth(room).map_or(word.len(), |(i, _)| i);
                line.push_str(&" ".repeat(space));
                line.push_str(&word[..cut]);
                word = &word[cut..];
            }
            lines.push(std::mem::take(&mut line));
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// A rate as the chart writes it: whole frames from 10 up, else two decimals.
fn rate_text(rate: f64) -> String {
    if rate >= 9.5 {
        format!("{rate:.0}")
    } else {
        format!("{rate:.2}")
    }
}

/// The chart's rows, one per report in order.
fn chart_bars(reports: &[Entry], base: Option<f64>) -> Vec<Bar> {
    reports
        .iter()
        .enumerate()
        .map(|(i, (path, rep))| {
            let lines = wrap(
                &format!("{}. {}", i + 1, label(path, rep.as_ref())),
                LABEL_CHARS,
            );
            let Some(rep) = rep else {
                return Bar {
                    lines,
                    rate: None,
                    value: "no report".into(),
                    colour: RGBColor(0x66, 0x66, 0x66),
                    interrupted: false,
                };
            };
            let rate = rep.frames_per_node_hour;
            let mut value = rate_text(rate);
            if let Some(base) = base {
                let _ = write!(value, " ({})", ratio(rate / base));
            }
            if rep.interrupted {
                value.push_str(", interrupted");
            }
            Bar {
                lines,
                rate: Some(rate),
                value,
                colour: backend_colour(&rep.backend),
                interrupted: rep.interrupted,
            }
        })
        .collect()
}

/// The bar chart as SVG: one horizontal bar per report, labelled on the left with its row
/// number in the table and its label, coloured by backend, its rate and multiple of the
/// baseline's written after it. An interrupted run's bar is hatched and its value says
/// "interrupted"; a report that does not exist is a row without a bar that says "no report".
pub fn chart_svg(reports: &[Entry], baseline: usize) -> Result<String> {
    let base = baseline_rate(reports, baseline)?;
    let bars = chart_bars(reports, base);
    let mut backends: Vec<&str> = reports
        .iter()
        .filter_map(|(_, r)| r.as_ref().map(|r| r.backend.as_str()))
        .collect();
    backends.sort_unstable();
    backends.dedup();
    let mut legend: Vec<LegendEntry> = backends
        .iter()
        .map(|b| {
            let name = if b.is_empty() { "?" } else { b };
            (name.to_string(), backend_colour(b), false)
        })
        .collect();
    if bars.iter().any(|b| b.interrupted) {
        legend.push(("interrupted".into(), RGBColor(0x55, 0x55, 0x55), true));
    }
    let x_desc = match base {
        Some(_) => format!(
            "frames per node-hour; in brackets, the multiple of run {}'s",
            baseline + 1
        ),
        None => "frames per node-hour".to_string(),
    };
    let layout = Layout::new(&bars, &legend, &x_desc);
    let mut svg = String::new();
    {
        let size = (layout.width as u32, layout.height as u32);
        let root = SVGBackend::with_string(&mut svg, size).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        root.draw(&Text::new(
            CAPTION,
            at(layout.width / 2.0, MARGIN + CAPTION_PX * 0.7),
            text_style(CAPTION_PX, HPos::Center, BLACK),
        ))
        .map_err(draw_err)?;
        draw_axis(&root, &layout, bars.len(), &x_desc)?;
        for (row, bar) in bars.iter().enumerate() {
            draw_bar(&root, &layout, row, bar)?;
        }
        draw_legend(
            &root,
            &legend,
            layout.track_left,
            layout.row_top(bars.len()) + LEGEND_Y,
        )?;
        root.present().map_err(draw_err)?;
    }
    Ok(svg)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// The track's grid, its axes, ticks and their values, and the axis's description.
fn draw_axis(root: &Area, layout: &Layout, rows: usize, x_desc: &str) -> Result<()> {
    let (top, bottom) = (layout.track_top, layout.row_top(rows));
    let grid = RGBColor(0xdd, 0xdd, 0xdd);
    // The last tick at or before the track's end.
    let ticks = (layout.x_max / layout.step * (1.0 + 1e-9)).floor() as usize;
    for k in 0..=ticks {
        let value = k as f64 * layout.step;
        let x = layout.x(value);
        root.draw(&PathElement::new(vec![at(x, top), at(x, bottom)], grid))
            .map_err(draw_err)?;
        root.draw(&PathElement::new(
            vec![at(x, bottom), at(x, bottom + 5.0)],
            BLACK,
        ))
        .map_err(draw_err)?;
        root.draw(&Text::new(
            format!("{value:.*}", layout.decimals),
            at(x, bottom + TICKS_Y),
            text_style(TEXT_PX, HPos::Center, BLACK),
        ))
        .map_err(draw_err)?;
    }
    let (left, right) = (layout.track_left, layout.track_left + layout.track_w);
    root.draw(&PathElement::new(
        vec![at(left, top), at(left, bottom), at(right, bottom)],
        BLACK,
    ))
    .map_err(draw_err)?;
    root.draw(&Text::new(
        x_desc.to_string(),
        at(left, bottom + DESC_Y),
        text_style(TEXT_PX, HPos::Left, BLACK),
    ))
    .map_err(draw_err)?;
    Ok(())
}

/// Row `row`: the label's lines right-aligned before the track, the bar, and its value.
fn draw_bar(root: &Area, layout: &Layout, row: usize, bar: &Bar) -> Result<()> {
    let top = layout.row_top(row);
    let centre = top + layout.row_h / 2.0;
    let text_colour = if bar.rate.is_some() {
        BLACK
    } else {
        bar.colour
    };
    let first = centre - (bar.lines.len() - 1) as f64 * LINE_H / 2.0;
    for (k, line) in bar.lines.iter().enumerate() {
        root.draw(&Text::new(
            line.as_str(),
            at(layout.label_right, first + k as f64 * LINE_H),
            text_style(TEXT_PX, HPos::Right, text_colour),
        ))
        .map_err(draw_err)?;
    }
    let end = match bar.rate {
        Some(rate) => {
            let (x0, x1) = (layout.track_left, layout.x(rate));
            let (y0, y1) = (top + 7.0, top + layout.row_h - 7.0);
            draw_swatch(root, (x0, y0), (x1, y1), bar.colour, bar.interrupted)?;
            x1
        }
        None => layout.track_left,
    };
    root.draw(&Text::new(
        bar.value.as_str(),
        at(end + 8.0, centre),
        text_style(TEXT_PX, HPos::Left, text_colour),
    ))
    .map_err(draw_err)?;
    Ok(())
}

/// A filled rectangle, or for an interrupted run a pale one hatched and outlined.
fn draw_swatch(
    root: &Area,
    (x0, y0): (f64, f64),
    (x1, y1): (f64, f64),
    colour: RGBColor,
    hatched: bool,
) -> Result<()> {
    if !hatched {
        return root
            .draw(&Rectangle::new([at(x0, y0), at(x1, y1)], colour.filled()))
            .map_err(draw_err);
    }
    root.draw(&Rectangle::new(
        [at(x0, y0), at(x1, y1)],
        colour.mix(0.3).filled(),
    ))
    .map_err(draw_err)?;
    // Lines x + y = c, 6 px apart, cut to the rectangle.
    let mut c = x0 + y0 + 6.0;
    while c < x1 + y1 {
        let (xa, xb) = (x0.max(c - y1), x1.min(c - y0));
        if xa < xb {
            root.draw(&PathElement::new(
                vec![at(xa, c - xa), at(xb, c - xb)],
                colour.stroke_width(1),
            ))
            .map_err(draw_err)?;
        }
        c += 6.0;
    }
    root.draw(&Rectangle::new(
        [at(x0, y0), at(x1, y1)],
        colour.stroke_width(1),
    ))
    .map_err(draw_err)
}

/// The legend in one line from `x`, centred on `y`: a swatch and a name per entry.
fn draw_legend(root: &Area, legend: &[LegendEntry], mut x: f64, y: f64) -> Result<()> {
    for (name, colour, hatched) in legend {
        draw_swatch(root, (x, y - 6.0), (x + 16.0, y + 6.0), *colour, *hatched)?;
        root.draw(&Text::new(
            name.as_str(),
            at(x + 22.0, y),
            text_style(TEXT_PX, HPos::Left, BLACK),
        ))
        .map_err(draw_err)?;
        x += 32.0 + text_width(name, TEXT_PX);
    }
    Ok(())
}

/// A point in the backend's whole pixels.
fn at(x: f64, y: f64) -> (i32, i32) {
    (x.round() as i32, y.round() as i32)
}

/// Text of `px` SVG pixels, centred vertically on its point and anchored by `h`.
fn text_style(px: f64, h: HPos, colour: RGBColor) -> TextStyle<'static> {
    TextStyle {
        font: FontDesc::new(
            FontFamily::SansSerif,
            px * PLOTTERS_FONT_SCALE,
            FontStyle::Normal,
        ),
        color: colour.to_backend_color(),
        pos: Pos::new(h, VPos::Center),
    }
}

/// A width at least that of `text` at `px` pixels in the common sans-serif fonts (DejaVu Sans,
/// the widest, Liberation Sans, Arial, Helvetica): an SVG names its font but cannot measure its
/// text, and a label wider than the room left for it would run into its neighbour or off the
/// page. Widths are in em, rounded up from DejaVu Sans's advances.
fn text_width(text: &str, px: f64) -> f64 {
    let em: f64 = text
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '\'' | '|' | '!' | '.' | ',' | ':' | ';' => 0.42,
            ' ' | '(' | ')' | '[' | ']' | 'f' | 't' | 'r' | 'I' | 'J' | '-' | '/' | '"' => 0.5,
            'm' | 'w' | 'M' | 'W' | '%' | '@' => 1.05,
            'a'..='z' | '0'..='9' | '$' | '_' | '?' | '*' => 0.68,
            'A'..='Z' | '#' | '&' | '<' | '>' | '=' | '+' | '~' => 0.85,
            // Other scripts and symbols: as wide as the widest Latin letters.
            _ => 1.1,
        })
        .sum();
    em * px
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
        let texts = chart_texts(&svg);
        assert!(
            texts.iter().any(|t| t == "2. gpu") && texts.iter().any(|t| t == "no report"),
            "{texts:?}"
        );
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
        let texts = chart_texts(&chart_svg(&runs, 1).unwrap());
        assert!(texts.iter().any(|t| t == "no report"), "{texts:?}");
        // Without a baseline the rates stand alone.
        assert!(texts.iter().any(|t| t == "20"), "{texts:?}");
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
        assert!(svg.contains(">\n1. CPU nodes\n<"), "{svg}");
        assert!(svg.contains("2. GPU &lt;A100&gt; &amp; co"), "{svg}");
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

    /// Five runs with the labels operators give: long, two the same, one interrupted, one of
    /// a job that left no report.
    fn five_long_runs() -> Vec<Entry> {
        let runs = two_runs();
        let (cpu, gpu) = (runs[0].1.clone().unwrap(), runs[1].1.clone().unwrap());
        let gpu = RunReport {
            interrupted: false,
            ..gpu
        };
        let with = |r: &RunReport, label: &str, rate: f64, interrupted: bool| RunReport {
            label: label.into(),
            frames_per_node_hour: rate,
            interrupted,
            ..r.clone()
        };
        vec![
            (
                "cpu.json".into(),
                Some(with(
                    &cpu,
                    "Perlmutter CPU: 2 nodes, 32 ranks x 8",
                    20.0,
                    false,
                )),
            ),
            (
                "gpu.json".into(),
                Some(with(
                    &gpu,
                    "Perlmutter GPU: 2 nodes, 4 A100 each",
                    240.0,
                    false,
                )),
            ),
            (
                "gpu-again.json".into(),
                Some(with(
                    &gpu,
                    "Perlmutter GPU: 2 nodes, 4 A100 each",
                    226.5,
                    true,
                )),
            ),
            (
                "wide.json".into(),
                Some(with(
                    &cpu,
                    "WIDE MMWW LABEL: Ångström µ × 8, with a tail far too long for one line \
                     of any chart",
                    31.7,
                    false,
                )),
            ),
            ("runs/gpu-4-nodes.json".into(), None),
        ]
    }

    /// A `<text>` of the chart and the box its glyphs may cover, in SVG pixels.
    #[derive(Debug)]
    struct TextBox {
        text: String,
        x0: f64,
        y0: f64,
        x1: f64,
        y1: f64,
    }

    impl TextBox {
        fn overlaps(&self, o: &TextBox) -> bool {
            self.x0 < o.x1 && o.x0 < self.x1 && self.y0 < o.y1 && o.y0 < self.y1
        }
    }

    fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
        let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
        let len = tag[start..].find('"')?;
        Some(&tag[start..start + len])
    }

    fn num(tag: &str, name: &str) -> f64 {
        attr(tag, name)
            .and_then(|v| v.trim_end_matches("px").parse().ok())
            .unwrap_or_else(|| panic!("no number {name} in {tag}"))
    }

    /// The chart's width and height.
    fn svg_size(svg: &str) -> (f64, f64) {
        let tag = &svg[svg.find("<svg").unwrap()..];
        let tag = &tag[..tag.find('>').unwrap()];
        (num(tag, "width"), num(tag, "height"))
    }

    /// The boxes of every `<text>` in `svg`, from its position, anchor, font size and a width
    /// at least that of the common sans-serif fonts (`text_width`). Vertically a box spans the
    /// font's ascent (at most 0.95 em above the baseline) and descent (0.3 em below).
    fn text_boxes(svg: &str) -> Vec<TextBox> {
        let mut boxes = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find("<text") {
            rest = &rest[start..];
            let tag_end = rest.find('>').unwrap();
            let tag = &rest[..tag_end];
            let close = rest.find("</text>").unwrap();
            let text = rest[tag_end + 1..close]
                .trim()
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&");
            rest = &rest[close..];
            let (x, y, px) = (num(tag, "x"), num(tag, "y"), num(tag, "font-size"));
            let dy = attr(tag, "dy").unwrap_or("0");
            let baseline = y + if let Some(em) = dy.strip_suffix("em") {
                em.parse::<f64>().unwrap() * px
            } else if let Some(ex) = dy.strip_suffix("ex") {
                // 1 ex is about half an em (0.55 em in DejaVu Sans, 0.5 em in resvg).
                ex.parse::<f64>().unwrap() * 0.5 * px
            } else {
                dy.parse::<f64>().unwrap()
            };
            let w = text_width(&text, px);
            let x0 = match attr(tag, "text-anchor").unwrap_or("start") {
                "middle" => x - w / 2.0,
                "end" => x - w,
                _ => x,
            };
            let (mut x0, mut y0, mut x1, mut y1) =
                (x0, baseline - 0.95 * px, x0 + w, baseline + 0.3 * px);
            // plotters turns text by rotate(angle, x, y).
            if let Some(t) = attr(tag, "transform") {
                let args: Vec<f64> = t
                    .trim_start_matches("rotate(")
                    .trim_end_matches(')')
                    .split(',')
                    .map(|a| a.trim().parse().unwrap())
                    .collect();
                let (s, c) = args[0].to_radians().sin_cos();
                let turn = |px: f64, py: f64| {
                    let (dx, dy) = (px - args[1], py - args[2]);
                    (args[1] + dx * c - dy * s, args[2] + dx * s + dy * c)
                };
                let corners = [turn(x0, y0), turn(x1, y0), turn(x0, y1), turn(x1, y1)];
                x0 = corners.iter().map(|p| p.0).fold(f64::MAX, f64::min);
                x1 = corners.iter().map(|p| p.0).fold(f64::MIN, f64::max);
                y0 = corners.iter().map(|p| p.1).fold(f64::MAX, f64::min);
                y1 = corners.iter().map(|p| p.1).fold(f64::MIN, f64::max);
            }
            boxes.push(TextBox {
                text,
                x0,
                y0,
                x1,
                y1,
            });
        }
        boxes
    }

    /// The texts of the chart, unescaped, in the order drawn.
    fn chart_texts(svg: &str) -> Vec<String> {
        text_boxes(svg).into_iter().map(|b| b.text).collect()
    }

    /// Text boxes that leave the chart or overlap another, as readable lines.
    fn text_box_problems(svg: &str) -> Vec<String> {
        let (w, h) = svg_size(svg);
        let boxes = text_boxes(svg);
        let mut problems = Vec::new();
        for (i, b) in boxes.iter().enumerate() {
            if b.x0 < 0.0 || b.y0 < 0.0 || b.x1 > w || b.y1 > h {
                problems.push(format!("cut off ({w} x {h}): {b:?}"));
            }
            for o in &boxes[i + 1..] {
                if b.overlaps(o) {
                    problems.push(format!("overlap: {b:?} and {o:?}"));
                }
            }
        }
        problems
    }

    /// The text boxes of the chart as the SVG places them: on the page, none on another.
    #[test]
    fn chart_text_of_five_long_labels_neither_overlaps_nor_leaves_the_page() {
        let runs = five_long_runs();
        // Small rates, a zero one, and a label that is one long word.
        let mut small = two_runs();
        small[0].1.as_mut().unwrap().frames_per_node_hour = 0.37;
        small[1].1.as_mut().unwrap().frames_per_node_hour = 0.0;
        small[1].1.as_mut().unwrap().label = "x".repeat(100);
        for (runs, baseline) in [(&runs, 0), (&runs, 4), (&two_runs(), 1), (&small, 0)] {
            let svg = chart_svg(runs, baseline).unwrap();
            let problems = text_box_problems(&svg);
            assert!(problems.is_empty(), "{}\n{svg}", problems.join("\n"));
        }
        // Runs of one label are told apart by the table's row numbers; the interrupted run and
        // the one without a report are marked.
        let svg = chart_svg(&runs, 0).unwrap();
        let texts = chart_texts(&svg);
        for want in [
            "1. Perlmutter CPU: 2 nodes, 32 ranks x 8",
            "2. Perlmutter GPU: 2 nodes, 4 A100 each",
            "3. Perlmutter GPU: 2 nodes, 4 A100 each",
            "5. gpu-4-nodes",
            "240 (12.0x)",
            "226 (11.3x), interrupted",
            "no report",
            "interrupted",
        ] {
            assert!(texts.iter().any(|t| t == want), "no {want:?} in {texts:?}");
        }
        // The long label is wrapped, not cut: its words are all there, in order.
        let wide: Vec<&str> = texts
            .iter()
            .skip_while(|t| !t.starts_with("4. WIDE"))
            .take(3)
            .map(String::as_str)
            .collect();
        assert!(wide.len() > 1, "{texts:?}");
        assert!(
            wide.join(" ").starts_with(
                "4. WIDE MMWW LABEL: Ångström µ × 8, with a tail far too long for one line of \
                 any chart"
            ),
            "{wide:?}"
        );
    }

    /// Every text box of `g` and its groups, in canvas pixels, in document order.
    fn rendered_text_boxes(g: &resvg::usvg::Group, out: &mut Vec<resvg::usvg::Rect>) {
        for node in g.children() {
            match node {
                resvg::usvg::Node::Group(g) => rendered_text_boxes(g, out),
                resvg::usvg::Node::Text(t) => out.push(t.abs_bounding_box()),
                _ => {}
            }
        }
    }

    /// The chart drawn to PNG with this machine's fonts, as a browser would (resvg): nothing
    /// touches the page's edge, and each text is laid out inside the box that the SVG check
    /// above allows it, so that check holds for real fonts. SPEXTRACT_CHART_PNG=path keeps the
    /// picture to look at.
    #[test]
    fn chart_renders_to_png_with_every_text_inside_its_box() {
        use resvg::{tiny_skia, usvg};
        let svg = chart_svg(&five_long_runs(), 0).unwrap();
        let mut options = usvg::Options::default();
        let fonts = options.fontdb_mut();
        fonts.load_system_fonts();
        // fontdb maps "sans-serif" to Arial; a browser asks fontconfig, which on Linux most
        // often answers DejaVu Sans.
        let installed = |family: &str| {
            fonts
                .faces()
                .any(|f| f.families.iter().any(|(name, _)| name == family))
        };
        if let Some(family) = ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"]
            .into_iter()
            .find(|f| installed(f))
        {
            fonts.set_sans_serif_family(family);
        }
        let tree = usvg::Tree::from_str(&svg, &options).unwrap();
        let size = tree.size().to_int_size();
        let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height()).unwrap();
        resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
        if let Some(path) = std::env::var_os("SPEXTRACT_CHART_PNG") {
            pixmap.save_png(&path).unwrap();
        }
        let (w, h) = (size.width() as usize, size.height() as usize);
        let white = |x: usize, y: usize| {
            let p = pixmap.pixels()[y * w + x];
            (p.red(), p.green(), p.blue()) == (255, 255, 255)
        };
        let edge = (0..w)
            .flat_map(|x| [(x, 0), (x, h - 1)])
            .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]));
        for (x, y) in edge {
            assert!(white(x, y), "drawn at the page's edge, ({x}, {y})");
        }

        let boxes = text_boxes(&svg);
        let mut laid_out = Vec::new();
        rendered_text_boxes(tree.root(), &mut laid_out);
        if laid_out.len() != boxes.len() {
            eprintln!(
                "skipping the check of rendered text: {} of {} texts drawn (no sans-serif font \
                 on this machine?)",
                laid_out.len(),
                boxes.len()
            );
            return;
        }
        for (r, b) in laid_out.iter().zip(&boxes) {
            let (left, right) = (f64::from(r.left()), f64::from(r.right()));
            let (top, bottom) = (f64::from(r.top()), f64::from(r.bottom()));
            assert!(
                left >= b.x0 - 0.5
                    && right <= b.x1 + 0.5
                    && top >= b.y0 - 0.5
                    && bottom <= b.y1 + 0.5,
                "{:?} is laid out at {r:?}, outside its box {b:?}",
                b.text
            );
            // And it was drawn: some dark pixel inside.
            let inked = (left as usize..right.ceil() as usize)
                .flat_map(|x| (top as usize..bottom.ceil() as usize).map(move |y| (x, y)))
                .any(|(x, y)| {
                    let p = pixmap.pixels()[y * w + x];
                    p.red() < 160 && p.green() < 160 && p.blue() < 160
                });
            assert!(inked, "{:?} not drawn", b.text);
        }
    }

    #[test]
    fn labels_wrap_at_spaces_and_cut_only_words_longer_than_a_line() {
        assert_eq!(wrap("1. CPU nodes", 44), ["1. CPU nodes"]);
        assert_eq!(wrap("1. one two  three", 7), ["1. one", "two", "three"]);
        assert_eq!(wrap("2. abcdefghij", 6), ["2. abc", "defghi", "j"]);
        assert_eq!(wrap("ab Ångström", 5), ["ab Ån", "gströ", "m"]);
        assert_eq!(wrap("", 5), [""]);
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
