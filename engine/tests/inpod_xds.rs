//! In-pod mode with istiod as the config source: ringtun in shared mode (PROXY_MODE=shared)
//! with `XDS_ADDRESS` and no local config is ready only once both the node agent's first
//! snapshot is acknowledged and istiod's first config is in force, whichever comes last. Here
//! the agent's snapshot comes first, with istiod not yet up: readiness must wait for istiod.

mod common;
mod inpod_common;
mod xds_common;

use std::time::{Duration, Instant};

use common::*;
use inpod_common::node::*;
use inpod_common::*;
use ringtun_testbed::Process;
use xds_common::*;

#[test]
fn in_pod_with_xds_is_ready_only_once_istiods_config_is_in_too() {
    let dir = TempDir::new("inpod-xds");
    let node = netns("ixn");
    let pod = netns("ixp");
    let ca = NodeCa::generate(&dir.join("ca"));
    write_token(dir.path(), TOKEN);
    let mut agent = NodeAgent::start(&dir.join("zds.sock"), dir.path());

    let mut cmd = node.exec(ringtun_bin());
    cmd.current_dir(dir.path())
        .arg("run")
        .arg("--cert-chain")
        .arg(&ca.chain)
        .arg("--key")
        .arg(&ca.chain_key)
        .arg("--roots")
        .arg(&ca.cert)
        .arg("--ca-cert")
        .arg(&ca.cert)
        .arg("--ca-key")
        .arg(&ca.key)
        .args(["--workers", "2", "--no-pin"])
        .env("PROXY_MODE", "shared")
        .env("INPOD_UDS", &agent.socket)
        .env("XDS_ADDRESS", "https://127.0.0.1:15012")
        .env("XDS_ROOT_CA", &ca.cert)
        .env("INSTANCE_IP", "127.0.0.1")
        .env("POD_NAME", "ztunnel")
        .env("POD_NAMESPACE", "istio-system")
        .env_remove("LOCAL_XDS_PATH")
        .env(
            "RINGTUN_LOG",
            std::env::var("RINGTUN_E2E_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("NO_COLOR", "1");
    let log = dir.join("ringtun.log");
    let mut ringtun = Process::spawn(cmd, "ringtun (shared, xDS)", &log).expect("spawn ringtun");

    // The agent's snapshot first: the pod is served, but istiod has sent nothing yet.
    assert_eq!(agent.accept(), 1, "ringtun announces ZDS V1");
    assert_eq!(agent.ack(&add_pod("pod-client", &pod, "client")), "");
    assert_eq!(agent.ack("snapshot"), "");
    wait_ports(&pod, "the pod's listeners", |p| p.contains(&15008));
    ringtun
        .wait_log_line(
            &[
                "node agent snapshot complete",
                "control plane's first config",
            ],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("no line saying what readiness waits for: {e}"));
    // Not ready while istiod is missing, for as long as it is: looked at for a second.
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        assert_ne!(
            readiness(&node),
            200,
            "ready with the agent's snapshot but no config from istiod:\n{}",
            ringtun.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // istiod comes up; ringtun's next attempt gets its config, and only now is it ready.
    let mut args = IstiodArgs::new(&ca.cert, &ca.key);
    args.listen = "127.0.0.1:15012";
    args.sans = vec!["127.0.0.1".into()];
    let _istiod = FakeIstiod::start(Some(&node), dir.path(), args, &mesh_resources());
    wait_ready(&mut ringtun, &node);
    assert!(
        ringtun.log().contains("ringtun ready"),
        "the last of the two says so:\n{}",
        ringtun.log()
    );
}
