#!/usr/bin/env python3
"""An independent DNS client for ringtun's DNS proxy tests (dnspython; no ringtun code).

  dns_query.py --server IP --port P --name NAME [--type A] [--tcp] [--edns SIZE] [--source IP]
  dns_query.py --server IP --port P --raw HEX        send these bytes over UDP as they are

Prints one JSON line: {"id", "rcode", "aa", "tc", "answers": [{"name", "type", "ttl", "value"}]}
or {"error": ...} (exit 2) when nothing came back in 3 s.
"""
import argparse
import json
import socket
import sys

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype


def describe(m):
    out = {"id": m.id, "rcode": dns.rcode.to_text(m.rcode()),
           "aa": bool(m.flags & dns.flags.AA), "tc": bool(m.flags & dns.flags.TC),
           "ra": bool(m.flags & dns.flags.RA), "answers": []}
    for rrset in m.answer:
        for rd in rrset:
            out["answers"].append({"name": rrset.name.to_text(),
                                   "type": dns.rdatatype.to_text(rrset.rdtype),
                                   "ttl": rrset.ttl, "value": rd.to_text()})
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--server", required=True)
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--name")
    p.add_argument("--type", default="A")
    p.add_argument("--tcp", action="store_true")
    p.add_argument("--edns", type=int)
    p.add_argument("--raw")
    p.add_argument("--source", help="the address to send from")
    a = p.parse_args()
    try:
        if a.raw is not None:
            fam = socket.AF_INET6 if ":" in a.server else socket.AF_INET
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.settimeout(3)
            s.sendto(bytes.fromhex(a.raw), (a.server, a.port))
            data, _ = s.recvfrom(65535)
            m = dns.message.from_wire(data)
            out = describe(m)
            out["questions"] = len(m.question)
        else:
            q = dns.message.make_query(a.name, a.type, use_edns=a.edns is not None,
                                       payload=a.edns or 512)
            if a.tcp:
                m = dns.query.tcp(q, a.server, port=a.port, timeout=3, source=a.source)
            else:
                m = dns.query.udp(q, a.server, port=a.port, timeout=3, source=a.source)
            out = describe(m)
            out["query_id"] = q.id
    except (dns.exception.Timeout, socket.timeout, OSError) as e:
        print(json.dumps({"error": "%s: %s" % (type(e).__name__, e)}))
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
