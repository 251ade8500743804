//! relay: a plain TCP relay built from ringtun's own parts, to run as ringtun-bench's other
//! tunnel and measure what any two-relay tunnel costs on the benchmark topology.
//!
//! It is ringtun without TLS and HTTP/2: one monoio shard on io_uring, the same accept loop
//! shape, `net::connect_marked` and the `copy::tcp_tcp` loop. The client side listens on the
//! capture port (15001) and forwards every connection to the server side's 15008; the server
//! side forwards to the benchmark's load server. Run in both namespaces it carries exactly the
//! two extra TCP legs a tunnel pair adds, so its figures bound from above what userspace TLS and
//! HTTP/2 can reach there (benches/README.md).
//!
//! ```text
//! relay client   # 0.0.0.0:15001 -> 10.77.0.2:15008, marked 0x539
//! relay server   # 0.0.0.0:15008 -> 10.77.0.2:5201
//! ```

use std::process::ExitCode;
use std::time::Duration;

use ringtun::net::connect_marked;
use ringtun::proxy::copy::tcp_tcp;
use ringtun::proxy::live::Conn;
use ringtun_benches::relay_plan::plan;

fn main() -> ExitCode {
    let side = std::env::args().nth(1).unwrap_or_default();
    let Some((listen, to, mark)) = plan(&side) else {
        eprintln!("usage: relay client|server");
        return ExitCode::from(2);
    };
    let rt = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .enable_timer()
        .build();
    let mut rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("relay: io_uring runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let listener = match monoio::net::TcpListener::bind(listen) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("relay: bind {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!("relay {side}: {listen} -> {to}");
        loop {
            let (a, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("relay: accept: {e}");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = a.set_nodelay(true);
            monoio::spawn(async move {
                match connect_marked(to, mark, Duration::from_secs(5)).await {
                    // No idle timeout: the benchmark closes every connection it opens.
                    Ok(b) => drop(tcp_tcp(a, b, Conn::new(Duration::ZERO, None)).await),
                    Err(e) => eprintln!("relay: connect {to}: {e}"),
                }
            });
        }
    })
}
