//! The kernel's TCP counters of a topology's two namespaces around a measurement: how many
//! segments a request (a connection, a GiB) took, how many ACKs were delayed, how much the
//! stack coalesced. Two runs of one test at different speeds are told apart here without
//! disturbing them (tracepoints and `perf` slow the run they watch).

use ringtun_testbed::Netns;

/// The counters taken, as `(table, name)` in `/proc/net/snmp` or `/proc/net/netstat`.
pub const COUNTERS: [(&str, &str); 8] = [
    // Every segment sent, data or not.
    ("Tcp", "OutSegs"),
    // Segments that carried new data.
    ("TcpExt", "TCPOrigDataSent"),
    // ACKs that carried nothing else, received on TCP's slow path only (a window change, SACK,
    // …); the fast path's are not counted apart. OutSegs minus TCPOrigDataSent is what was
    // sent without new data: pure ACKs, retransmissions, SYNs and FINs.
    ("TcpExt", "TCPPureAcks"),
    // ACKs sent after the delayed-ACK timer, not with data or at once.
    ("TcpExt", "DelayedACKs"),
    // Small writes held back while the previous one was still queued below TCP.
    ("TcpExt", "TCPAutoCorking"),
    // Segments merged into the previous one in the receive queue.
    ("TcpExt", "TCPRcvCoalesce"),
    // Segments that arrived while the socket was owned by a reader or writer, and were
    // merged in its backlog.
    ("TcpExt", "TCPBacklogCoalesce"),
    // Segments handled on the fast path after a prediction.
    ("TcpExt", "TCPHPHits"),
];

/// Values of [`COUNTERS`] in one namespace.
pub type Values = [u64; COUNTERS.len()];

/// [`COUNTERS`] read in `ns` (its own TCP stack's totals).
pub fn read(ns: &Netns) -> Result<Values, String> {
    let text = ns
        .enter(|| {
            // `thread-self`: the entering thread's namespace, not the process's.
            let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp")?;
            let netstat = std::fs::read_to_string("/proc/thread-self/net/netstat")?;
            Ok::<_, std::io::Error>(snmp + &netstat)
        })
        .map_err(|e| format!("{}: {e}", ns.name()))?
        .map_err(|e| format!("{}: reading its TCP counters: {e}", ns.name()))?;
    parse(&text).map_err(|e| format!("{}: {e}", ns.name()))
}

/// [`COUNTERS`] in the text of `/proc/net/snmp` and `/proc/net/netstat`: each table is a line
/// of names and a line of values, both starting with `Table:`.
pub fn parse(text: &str) -> Result<Values, String> {
    let mut out = [0u64; COUNTERS.len()];
    let mut found = [false; COUNTERS.len()];
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        let (Some((table, names)), Some((table2, values))) =
            (names.split_once(':'), values.split_once(':'))
        else {
            return Err(format!("not a counter table: {names:?}"));
        };
        if table != table2 {
            return Err(format!("{table}'s names followed by {table2}'s values"));
        }
        for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
            if let Some(i) = COUNTERS.iter().position(|&c| c == (table, name)) {
                // Some Tcp fields are signed (MaxConn is -1); the ones taken here only grow.
                out[i] = value
                    .parse()
                    .map_err(|_| format!("{table} {name}: {value:?} is not a count"))?;
                found[i] = true;
            }
        }
    }
    match found.iter().position(|f| !f) {
        Some(i) => Err(format!(
            "{} {} missing from the kernel's counters",
            COUNTERS[i].0, COUNTERS[i].1
        )),
        None => Ok(out),
    }
}

/// What grew between two readings of one namespace.
pub fn delta(before: &Values, after: &Values) -> Values {
    std::array::from_fn(|i| after[i].saturating_sub(before[i]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_counters_from_their_tables() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
            Tcp: RtoAlgorithm MaxConn OutSegs InSegs\nTcp: 1 -1 500 400\n\
            TcpExt: DelayedACKs TCPPureAcks TCPAutoCorking TCPRcvCoalesce TCPBacklogCoalesce TCPHPHits TCPOrigDataSent\n\
            TcpExt: 7 20 3 11 2 90 300\n\
            IpExt: InOctets\nIpExt: 12345\n";
        assert_eq!(parse(text), Ok([500, 300, 20, 7, 3, 11, 2, 90]));
        let less = text.replace(" TCPHPHits", "");
        assert!(parse(&less).is_err_and(|e| e.contains("TCPHPHits")));
        assert!(parse("Tcp: OutSegs\nTcpExt: 4\n").is_err());
        assert_eq!(
            delta(&[5, 6, 7, 8, 9, 10, 11, 12], &[6, 6, 9, 8, 9, 10, 11, 20]),
            [1, 0, 2, 0, 0, 0, 0, 8]
        );
    }
}
