//! The report: derived figures, the table on stdout, and the files (`table.md`,
//! `results.json`, `report.html` and its plots).

use std::path::Path;

use ringtun_benches::report::{self, Results, DIRECT};

/// Derived figures: how much a tunnel adds to the one-way latency (half the round trip) over
/// direct in the same run.
fn added_latency(res: &mut Results, runs: usize) {
    let tests: Vec<String> = res.latency.iter().map(|l| l.test.clone()).collect();
    let mut add = Vec::new();
    for run in 0..runs {
        for test in tests.iter().collect::<std::collections::BTreeSet<_>>() {
            for p in ["p50", "p99"] {
                let metric = format!("RTT {p} µs");
                let get = |c: &str| {
                    res.samples
                        .iter()
                        .find(|s| {
                            s.run == run
                                && s.contender == c
                                && &s.test == test
                                && s.metric == metric
                        })
                        .map(|s| s.value)
                };
                let Some(d) = get(DIRECT) else { continue };
                for c in res.contenders.iter().filter(|c| *c != DIRECT) {
                    if let Some(v) = get(c) {
                        add.push((
                            run,
                            c.clone(),
                            test.clone(),
                            format!("added one-way {p} µs"),
                            (v - d) / 2.0,
                        ));
                    }
                }
            }
        }
    }
    for (run, c, test, metric, v) in add {
        res.push(run, &c, &test, &metric, v, false);
    }
}

/// Adds the derived figures, prints the table, the cross-checks and the notes, and writes the
/// report's files into `out`.
pub fn finish(res: &mut Results, runs: usize, header: &str, out: &Path) -> Result<(), String> {
    added_latency(res, runs);

    let t = report::table(res, &res.samples);
    println!("\n{header}");
    println!(
        "{} · kernel {} · {} CPUs · {}\nmedian (min–max) over runs; ratios are of medians\n",
        res.meta.cpu, res.meta.kernel, res.meta.cores, res.meta.date
    );
    print!("{}", report::render_text(&t));
    if !res.crosscheck.is_empty() {
        println!("\ncross-checks (iperf3, sockperf):");
        print!(
            "{}",
            report::render_text(&report::table(res, &res.crosscheck))
        );
    }
    for n in &res.notes {
        println!("note: {n}");
    }
    std::fs::write(out.join("table.md"), report::render_markdown(&t)).map_err(|e| e.to_string())?;
    let written = report::write_all(out, res).map_err(|e| e.to_string())?;
    println!(
        "\nwrote {} and {} other files in {}",
        out.join("report.html").display(),
        written.len(),
        out.display()
    );
    Ok(())
}
