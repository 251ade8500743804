//! Cross-checks with iperf3 and sockperf, where they are installed: the same paths measured by
//! tools other than ours.

use std::process::{Command, Stdio};
use std::time::Duration;

use ringtun_benches::report::{self, Results};

use crate::contenders::{Contender, Env, Kind};
use crate::procs::Proc;
use crate::{
    IPERF_DIRECT_PORT, IPERF_PORT, MIB, SERVER_IP, SOCKPERF_DIRECT_PORT, SOCKPERF_PORT, VIP,
};

pub fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

pub fn crosscheck(env: &Env, res: &mut Results, run: usize, c: &Contender, bytes: u64) {
    let ns = &env.topos[c.topo].client;
    let (ip, iperf_port, sp_port) = if matches!(c.kind, Kind::Direct) {
        (
            SERVER_IP.to_string(),
            IPERF_DIRECT_PORT,
            SOCKPERF_DIRECT_PORT,
        )
    } else {
        (VIP.to_string(), IPERF_PORT, SOCKPERF_PORT)
    };
    let mut push = |test: &str, metric: &str, v: f64, hib: bool| {
        if v.is_finite() {
            res.crosscheck.push(report::Sample {
                run,
                contender: c.name.clone(),
                test: test.to_owned(),
                metric: metric.to_owned(),
                value: v,
                higher_is_better: hib,
            });
        }
    };
    if have("iperf3") {
        for (args, test) in [
            (vec![], "iperf3 up 1 stream"),
            (vec!["-R"], "iperf3 down 1 stream"),
            (vec!["-P", "4"], "iperf3 up 4 streams"),
        ] {
            env.progress.step(&format!("{}: {test}", c.name));
            let out = ns
                .exec("timeout")
                .args(["120", "iperf3", "-c", &ip, "-p", &iperf_port.to_string()])
                .args(["-n", &bytes.to_string(), "-J"])
                .args(args)
                .output();
            let bps = out.ok().and_then(|o| {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
                v["end"]["sum_received"]["bits_per_second"].as_f64()
            });
            match bps {
                Some(b) => push(test, "MiB/s", b / 8.0 / MIB, true),
                None => env
                    .progress
                    .step(&format!("iperf3 through {} gave no result", c.name)),
            }
        }
    }
    if have("sockperf") {
        let test = "sockperf ping-pong 64 B";
        env.progress.step(&format!("{}: {test}", c.name));
        let out = ns
            .exec("timeout")
            .args(["60", "sockperf", "ping-pong", "--tcp", "-i", &ip, "-p"])
            .arg(sp_port.to_string())
            .args(["-m", "64", "-t", "2"])
            .output();
        if let Ok(o) = out {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            // sockperf prints one-way latency (RTT/2) percentiles: "---> percentile 50.000 =  12.345"
            for (p, name) in [("50.000", "p50"), ("99.000", "p99"), ("99.900", "p99.9")] {
                let v = text
                    .lines()
                    .find(|l| l.contains(&format!("percentile {p}")))
                    .and_then(|l| l.rsplit('=').next())
                    .and_then(|v| v.trim().parse::<f64>().ok());
                if let Some(v) = v {
                    push(test, &format!("one-way {name} µs"), v, false);
                }
            }
        }
    }
}

pub fn start_servers(env: &Env, keep: &mut Vec<Proc>) {
    for (i, topo) in env.topos.iter().enumerate() {
        if have("iperf3") {
            for port in [IPERF_PORT, IPERF_DIRECT_PORT] {
                let mut cmd = topo.server.exec("iperf3");
                cmd.args(["-s", "-p", &port.to_string()]);
                if let Ok(p) = Proc::spawn(
                    cmd,
                    "iperf3",
                    &env.dir.join(format!("iperf3-{i}-{port}.log")),
                ) {
                    keep.push(p);
                }
            }
        }
        if have("sockperf") {
            for port in [SOCKPERF_PORT, SOCKPERF_DIRECT_PORT] {
                let mut cmd = topo.server.exec("sockperf");
                cmd.args(["server", "--tcp", "-i", "0.0.0.0", "-p", &port.to_string()]);
                if let Ok(p) = Proc::spawn(
                    cmd,
                    "sockperf",
                    &env.dir.join(format!("sockperf-{i}-{port}.log")),
                ) {
                    keep.push(p);
                }
            }
        }
    }
    std::thread::sleep(Duration::from_millis(300));
}
