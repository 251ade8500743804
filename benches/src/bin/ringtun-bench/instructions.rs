//! `--instructions`: each tunnel's userspace instructions per unit, counted by callgrind.
//!
//! Timed CPU figures on a shared 2-CPU machine move by ±10% from run to run, so a change worth a
//! few percent of a request cannot be told from noise by them. An instruction count can: this
//! pass starts each tunnel once more under `valgrind --tool=callgrind` and asks it (through
//! `callgrind_control`) for its count before and after each measurement. What one unit costs is
//! the count during the measurement, less the process's idle rate (timers, the control thread)
//! over the same time, divided by the units completed. Valgrind runs one thread at a time and
//! about fifty times slower, so the loads are light ones whose units pass through the tunnel
//! one by one, as at the fixed rate: rr16 at 200 req/s, and pooled connections opened one at a
//! time. It counts userspace only, and ringtun runs on its epoll driver here (valgrind does not
//! run io_uring): the HTTP/2, TLS record and copy work is the same code on both drivers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ringtun_benches::load;
use ringtun_benches::report::Results;

use crate::contenders::{measured, start_tunnel, Contender, Env, Kind};
use crate::options::Plan;
use crate::{CONN_REPLY, CONN_REQ, RR_SIZE};

/// Request rate of the counted rr16 test: every request passes alone even under valgrind.
pub const RATE: f64 = 200.0;
/// How long the idle rate is measured.
const IDLE: Duration = Duration::from_secs(2);

/// Where the pass keeps its files: callgrind's dumps and valgrind's control pipes.
pub struct Pass {
    dir: PathBuf,
}

/// Checks that valgrind and callgrind_control are there, so a run that asks for the pass fails
/// at its start rather than after its other measurements.
pub fn prepare(work: &Path) -> Result<Pass, String> {
    for tool in ["valgrind", "callgrind_control", "vgdb"] {
        let found = Command::new(tool)
            .arg("--help")
            .output()
            .map(|o| o.status.success() || !o.stdout.is_empty() || !o.stderr.is_empty())
            .unwrap_or(false);
        if !found {
            return Err(format!(
                "--instructions needs {tool} (Debian: apt-get install valgrind)"
            ));
        }
    }
    let dir = work.join("callgrind");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Pass { dir })
}

/// What one side's count grew by during one measurement.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Count {
    /// Instructions executed (callgrind's `Ir`), every thread together.
    pub instructions: u64,
    /// How long the measurement took.
    pub secs: f64,
}

impl Count {
    /// Instructions per unit, less what the process spends idle (`idle_rate` per second) over
    /// the same time.
    pub fn per_unit(&self, idle_rate: f64, units: u64) -> f64 {
        (self.instructions as f64 - idle_rate * self.secs).max(0.0) / units.max(1) as f64
    }
}

/// The `totals:` (or, failing that, `summary:`) line of a callgrind dump.
pub fn parse_totals(dump: &str) -> Option<u64> {
    let field = |key: &str| {
        dump.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    field("totals:").or_else(|| field("summary:"))
}

/// One side under callgrind: its pid, its dump file prefix and how many dumps it made.
struct Side {
    pid: u32,
    prefix: PathBuf,
    dumps: u32,
}

impl Side {
    fn control(&self, vgdb: &Path, what: &str) -> Result<(), String> {
        let out = Command::new("callgrind_control")
            .arg(format!("--vgdb-prefix={}", vgdb.display()))
            .arg(what)
            .arg(self.pid.to_string())
            .output()
            .map_err(|e| format!("callgrind_control: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "callgrind_control {what} {}: {}",
                self.pid,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Has callgrind write what it counted since the last dump (which starts it from zero).
    fn dump(&mut self, vgdb: &Path) -> Result<u64, String> {
        self.control(vgdb, "-d")?;
        self.dumps += 1;
        let file = PathBuf::from(format!("{}.{}", self.prefix.display(), self.dumps));
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        parse_totals(&text).ok_or_else(|| format!("{}: no totals line", file.display()))
    }
}

/// Both sides of a tunnel under callgrind.
struct Counted {
    sides: [Side; 2],
    vgdb: PathBuf,
}

impl Counted {
    /// Runs `f` and returns what each side (client, server) counted meanwhile.
    fn around<T>(
        &mut self,
        f: impl FnOnce() -> Result<T, String>,
    ) -> Result<(T, [Count; 2]), String> {
        for s in &mut self.sides {
            s.dump(&self.vgdb)?;
        }
        let start = Instant::now();
        let r = f()?;
        let secs = start.elapsed().as_secs_f64();
        let mut counts = [Count::default(); 2];
        for (s, c) in self.sides.iter_mut().zip(&mut counts) {
            *c = Count {
                instructions: s.dump(&self.vgdb)?,
                secs,
            };
        }
        Ok((r, counts))
    }
}

/// The contender as the pass runs it, or `None` where it has nothing to count: direct (no
/// tunnel), in-pod contenders (a node agent in front), and ringtun variants on the epoll driver
/// already (under valgrind every ringtun runs on it, so they would count ringtun twice).
fn under_callgrind(pass: &Pass, c: &Contender) -> Option<Contender> {
    let kind = match &c.kind {
        Kind::Direct | Kind::InPod { .. } => return None,
        Kind::Ringtun { extra } if extra.iter().any(|a| a == "--io-driver") => return None,
        Kind::Ringtun { extra } => {
            let mut extra = extra.clone();
            extra.extend(["--io-driver".into(), "legacy".into()]);
            Kind::Ringtun { extra }
        }
        other => other.clone(),
    };
    let file = pass.dir.join(format!("{}.%p", c.name));
    Some(Contender {
        name: c.name.clone(),
        kind,
        topo: c.topo,
        target: c.target.clone(),
        wrap: vec![
            "valgrind".into(),
            "--tool=callgrind".into(),
            format!("--vgdb-prefix={}", pass.dir.join("vgdb").display()),
            format!("--callgrind-out-file={}", file.display()),
        ],
    })
}

impl Pass {
    /// Counts every contender that has a tunnel, one after the other, and adds the figures to
    /// `res` (as run 0: a count repeats within about 1%, so one pass is enough).
    pub fn count(
        &self,
        env: &Env,
        plan: &Plan,
        contenders: &[Contender],
        workers: usize,
        res: &mut Results,
    ) -> Result<(), String> {
        let secs = plan.secs.max(1.0);
        let conns = if plan.conns >= 2000 { 300 } else { 100 };
        for c in contenders {
            let Some(wrapped) = under_callgrind(self, c) else {
                continue;
            };
            env.progress
                .stage(format!("instructions: {} under callgrind", c.name));
            env.progress.step("starting its tunnel under valgrind");
            let Some(tunnel) = start_tunnel(env, &wrapped, workers, &[], None, "-callgrind")?
            else {
                continue;
            };
            let side = |p: &crate::procs::Proc| Side {
                pid: p.pid(),
                prefix: self.dir.join(format!("{}.{}", c.name, p.pid())),
                dumps: 0,
            };
            let mut counted = Counted {
                sides: [side(&tunnel.client), side(&tunnel.server)],
                vgdb: self.dir.join("vgdb"),
            };

            env.progress.step(&format!("{}: idle", c.name));
            let ((), idle) = counted.around(|| {
                std::thread::sleep(IDLE);
                Ok(())
            })?;
            let idle_rate = [0, 1].map(|i| idle[i].instructions as f64 / idle[i].secs);
            let test = "idle, callgrind";
            push_sides(res, &c.name, test, "instructions per s", idle_rate);

            let test = format!("rr16 at {RATE:.0} req/s 1 KiB, callgrind");
            env.progress.step(&format!("{}: {test}", c.name));
            let d = Duration::from_secs_f64(secs);
            let (r, counts) = counted.around(|| {
                measured(env, &wrapped, None, false, move |t| {
                    load::request_response(t, 16, RR_SIZE, d, Some(RATE))
                })
                .map(|(r, _)| r)
            })?;
            let per = [0, 1].map(|i| counts[i].per_unit(idle_rate[i], r.completed));
            push_sides(res, &c.name, &test, "instructions per req", per);

            let test = "conn rate pooled one at a time, callgrind";
            env.progress.step(&format!("{}: {test}", c.name));
            let (r, counts) = counted.around(|| {
                measured(env, &wrapped, None, false, move |t| {
                    load::connection_rate(t, conns, 1, CONN_REQ, CONN_REPLY, &[])
                })
                .map(|(r, _)| r)
            })?;
            r.any_completed(&c.name, test)?;
            let per = [0, 1].map(|i| counts[i].per_unit(idle_rate[i], r.completed));
            push_sides(res, &c.name, test, "instructions per conn", per);
        }
        res.notes.push(format!(
            "Instructions (--instructions): userspace instructions counted by callgrind, ringtun on its epoll driver (valgrind does not run io_uring); per unit = (count during the test − the idle rate × its duration) / units; rr16 at {RATE:.0} req/s for {secs} s, {conns} pooled connections one at a time."
        ));
        Ok(())
    }
}

/// `metric (client)`, `(server)` and `(pair)` rows; fewer is better.
fn push_sides(res: &mut Results, name: &str, test: &str, metric: &str, v: [f64; 2]) {
    res.push(0, name, test, &format!("{metric} (client)"), v[0], false);
    res.push(0, name, test, &format!("{metric} (server)"), v[1], false);
    res.push(
        0,
        name,
        test,
        &format!("{metric} (pair)"),
        v[0] + v[1],
        false,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_come_from_the_totals_line_or_else_the_summary() {
        let dump =
            "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 0\ntotals: 123456\n";
        assert_eq!(parse_totals(dump), Some(123456));
        assert_eq!(parse_totals("events: Ir\nsummary: 77\n"), Some(77));
        assert_eq!(parse_totals("events: Ir\n"), None);
        assert_eq!(parse_totals("totals: lots\n"), None);
    }

    #[test]
    fn a_unit_costs_the_count_less_the_idle_rate_over_the_same_time() {
        let c = Count {
            instructions: 1_000_000,
            secs: 2.0,
        };
        // 100,000 a second idle: 200,000 of the million were not the units'.
        assert_eq!(c.per_unit(100_000.0, 400), 2000.0);
        // Never below zero, and no division by zero units.
        assert_eq!(c.per_unit(1e9, 400), 0.0);
        assert_eq!(c.per_unit(0.0, 0), 1_000_000.0);
    }
}
