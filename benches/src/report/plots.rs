//! The HTML report and its SVG plots (made with plotters): throughput, CPU, requests and
//! connection-rate bars, latency CDFs, memory per idle connection; and `results.json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;

use super::{table, Results, Table};
use crate::stats::{self, Summary};

fn render_html_table(t: &Table) -> String {
    let esc = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;");
    let mut out = String::from("<table>\n<tr>");
    for h in &t.header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr>\n");
    for row in &t.rows {
        out.push_str("<tr>");
        for c in row {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n");
    out
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

type PlotResult = Result<String, Box<dyn std::error::Error>>;

/// Grouped bars: one group per test, one bar per contender (median), whiskers min..max.
fn bars(title: &str, ylabel: &str, r: &Results, tests: &[String], metric: &str) -> PlotResult {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let k = r.contenders.len() + 1;
        let n = tests.len().max(1);
        let mut ymax: f64 = 0.0;
        for t in tests {
            for c in &r.contenders {
                for v in r.values(c, t, metric) {
                    ymax = ymax.max(v);
                }
            }
        }
        let ymax = if ymax > 0.0 { ymax * 1.15 } else { 1.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d((0..(n * k) as i32).into_segmented(), 0.0..ymax)?;
        let center = r.contenders.len() as i32 / 2;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n * k + 1)
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) if i % k as i32 == center => tests
                    .get((*i / k as i32) as usize)
                    .cloned()
                    .unwrap_or_default(),
                _ => String::new(),
            })
            .y_desc(ylabel)
            .draw()?;
        for (ci, c) in r.contenders.iter().enumerate() {
            let col = color(ci);
            let mut rects = Vec::new();
            let mut whiskers = Vec::new();
            for (ti, t) in tests.iter().enumerate() {
                let Some(s) = Summary::of(&r.values(c, t, metric)) else {
                    continue;
                };
                let x = (ti * k + ci) as i32;
                rects.push(Rectangle::new(
                    [
                        (SegmentValue::Exact(x), 0.0),
                        (SegmentValue::Exact(x + 1), s.median),
                    ],
                    col.filled(),
                ));
                whiskers.push(PathElement::new(
                    vec![
                        (SegmentValue::CenterOf(x), s.min),
                        (SegmentValue::CenterOf(x), s.max),
                    ],
                    BLACK.stroke_width(1),
                ));
            }
            chart
                .draw_series(rects)?
                .label(c.as_str())
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], col.filled()));
            chart.draw_series(whiskers)?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Latency CDF of one test: one line per contender, all runs pooled, log-scaled x.
fn latency_cdf(title: &str, r: &Results, test: &str) -> PlotResult {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut lo = f64::INFINITY;
        let mut hi: f64 = 0.0;
        let mut series = Vec::new();
        for (ci, c) in r.contenders.iter().enumerate() {
            if let Some(v) = r.raw_rtts.get(&(c.clone(), test.to_owned())) {
                let s = stats::sorted(v);
                if let (Some(a), Some(b)) = (s.first(), s.last()) {
                    lo = lo.min(*a);
                    hi = hi.max(*b);
                }
                series.push((ci, c.clone(), stats::cdf(&s, 400)));
            }
        }
        if series.is_empty() {
            return Ok(String::new());
        }
        let lo = (lo * 0.9).max(0.1);
        let hi = (hi * 1.1).max(lo * 2.0);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("round trip, µs (log scale)")
            .y_desc("fraction ≤ x")
            .draw()?;
        for (ci, name, cdf) in series {
            let col = color(ci);
            chart
                .draw_series(LineSeries::new(
                    cdf.into_iter().map(|(q, v)| (v, q)),
                    col.stroke_width(2),
                ))?
                .label(name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 15, y)], col.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::LowerRight)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// RSS against open idle connections, one line per (contender, side), medians over runs.
fn memory_plot(r: &Results) -> PlotResult {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut lines: BTreeMap<(usize, String, String), BTreeMap<usize, Vec<f64>>> =
            BTreeMap::new();
        for m in &r.memory {
            let ci = r
                .contenders
                .iter()
                .position(|c| *c == m.contender)
                .unwrap_or(0);
            lines
                .entry((ci, m.contender.clone(), m.side.clone()))
                .or_default()
                .entry(m.conns)
                .or_default()
                .push(m.rss_kib as f64 / 1024.0);
        }
        if lines.is_empty() {
            return Ok(String::new());
        }
        let xmax = r.memory.iter().map(|m| m.conns).max().unwrap_or(1).max(1) as f64;
        let ymax = r.memory.iter().map(|m| m.rss_kib).max().unwrap_or(1) as f64 / 1024.0 * 1.15;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "tunnel RSS vs idle tunnelled connections",
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..xmax * 1.05, 0.0..ymax.max(1.0))?;
        chart
            .configure_mesh()
            .x_desc("idle connections open")
            .y_desc("RSS, MiB")
            .draw()?;
        for ((ci, name, side), pts) in lines {
            let col = color(ci);
            let style = if side == "server" {
                col.stroke_width(1)
            } else {
                col.stroke_width(3)
            };
            let pts: Vec<(f64, f64)> = pts
                .into_iter()
                .filter_map(|(n, v)| Summary::of(&v).map(|s| (n as f64, s.median)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), style))?
                .label(format!("{name} {side}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], style));
            chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, col.filled())))?;
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
        root.present()?;
    }
    Ok(svg)
}

/// Writes `results.json`, the SVG plots and `report.html` (table and plots) into `dir`;
/// returns the paths written.
pub fn write_all(dir: &Path, r: &Results) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    let json = dir.join("results.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(r).map_err(std::io::Error::other)?,
    )?;
    written.push(json);

    let tests_with = |prefix: &str, metric: &str| -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for s in &r.samples {
            if s.test.starts_with(prefix) && s.metric == metric && !v.contains(&s.test) {
                v.push(s.test.clone());
            }
        }
        v
    };
    let mut plots: Vec<(&str, String)> = Vec::new();
    let mut add = |name: &'static str, svg: PlotResult| match svg {
        Ok(s) if !s.is_empty() => plots.push((name, s)),
        Ok(_) => {}
        Err(e) => eprintln!("plot {name}: {e}"),
    };
    add(
        "throughput.svg",
        bars(
            "bulk throughput (median, whiskers min–max)",
            "MiB/s",
            r,
            &tests_with("bulk", "MiB/s"),
            "MiB/s",
        ),
    );
    add(
        "cpu-per-gib.svg",
        bars(
            "tunnel CPU per GiB moved (both tunnel processes)",
            "CPU s / GiB",
            r,
            &tests_with("bulk", "CPU s/GiB (pair)"),
            "CPU s/GiB (pair)",
        ),
    );
    add(
        "requests.svg",
        bars(
            "request rate, 16 kept-alive connections",
            "req/s",
            r,
            &tests_with("rr16", "req/s"),
            "req/s",
        ),
    );
    add(
        "connections.svg",
        bars(
            "new connections per second",
            "conn/s",
            r,
            &tests_with("conn", "conn/s"),
            "conn/s",
        ),
    );
    let mut lat_tests: Vec<String> = Vec::new();
    for l in &r.latency {
        if !lat_tests.contains(&l.test) {
            lat_tests.push(l.test.clone());
        }
    }
    let mut lat_svgs = Vec::new();
    for (i, t) in lat_tests.iter().enumerate() {
        match latency_cdf(&format!("round-trip latency CDF: {t}"), r, t) {
            Ok(s) if !s.is_empty() => lat_svgs.push((format!("latency-{i}.svg"), s)),
            Ok(_) => {}
            Err(e) => eprintln!("latency plot {t}: {e}"),
        }
    }
    add("memory.svg", memory_plot(r));
    add(
        "scaling-throughput.svg",
        bars(
            "scaling: bulk throughput by shards",
            "MiB/s",
            r,
            &tests_with("shards", "MiB/s"),
            "MiB/s",
        ),
    );
    add(
        "scaling-connections.svg",
        bars(
            "scaling: connection rate by shards",
            "conn/s",
            r,
            &tests_with("shards", "conn/s"),
            "conn/s",
        ),
    );

    let mut html = String::from(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>ringtun-bench report</title>\n\
         <style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}\
         td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,td:nth-child(2){text-align:left}\
         pre{background:#f4f4f4;padding:8px}</style></head><body>\n<h1>ringtun-bench</h1>\n",
    );
    let m = &r.meta;
    let _ = writeln!(
        html,
        "<p>{} · kernel {} · {} × {} · ringtun {}</p>\n<pre>{}</pre>",
        m.date, m.kernel, m.cores, m.cpu, m.ringtun_commit, m.command
    );
    html.push_str("<h2>Figures</h2>\n<p>median (min–max) over runs; ratios are of medians.</p>\n");
    html.push_str(&render_html_table(&table(r, &r.samples)));
    if !r.crosscheck.is_empty() {
        html.push_str("<h2>Cross-checks (iperf3, sockperf)</h2>\n");
        html.push_str(&render_html_table(&table(r, &r.crosscheck)));
    }
    if !r.notes.is_empty() {
        html.push_str("<h2>Notes</h2>\n<ul>\n");
        for n in &r.notes {
            let _ = writeln!(html, "<li>{}</li>", n.replace('<', "&lt;"));
        }
        html.push_str("</ul>\n");
    }
    html.push_str("<h2>Plots</h2>\n");
    for (name, svg) in plots
        .iter()
        .map(|(n, s)| (n.to_string(), s))
        .chain(lat_svgs.iter().map(|(n, s)| (n.clone(), s)))
    {
        let path = dir.join(&name);
        std::fs::write(&path, svg)?;
        written.push(path);
        let _ = writeln!(html, "<div>{svg}</div>");
    }
    html.push_str("</body></html>\n");
    let path = dir.join("report.html");
    std::fs::write(&path, html)?;
    written.push(path);
    Ok(written)
}
