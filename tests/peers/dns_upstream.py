#!/usr/bin/env python3
"""A small upstream DNS server for ringtun's DNS proxy tests (UDP and TCP, one port).

Shares no code with ringtun: messages are read and written with dnspython. Answers:

  <anything>.test       A 192.0.2.7, TTL 1234 (a TTL ringtun never writes itself)
  big.test              60 A records: over UDP the answer is truncated (TC, no records),
                        over TCP it is whole
  missing.test          NXDOMAIN
  anything else         REFUSED

Every query received is printed as one JSON line: {"proto", "id", "name", "type"}.
Writes --ready FILE once both sockets listen.

Usage: dns_upstream.py --listen IP:PORT --ready FILE
"""
import argparse
import json
import socket
import struct
import sys
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


def answer(wire, proto):
    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    name = q.question[0].name
    text = name.to_text().lower()
    print(json.dumps({"proto": proto, "id": q.id, "name": text,
                      "type": dns.rdatatype.to_text(q.question[0].rdtype)}), flush=True)
    if text == "missing.test.":
        r.set_rcode(dns.rcode.NXDOMAIN)
    elif text == "big.test.":
        if proto == "udp":
            r.flags |= dns.flags.TC
        else:
            ips = ["198.51.100.%d" % i for i in range(1, 61)]
            r.answer.append(dns.rrset.from_text_list(name, 1234, "IN", "A", ips))
    elif text.endswith(".test."):
        if q.question[0].rdtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(name, 1234, "IN", "A", "192.0.2.7"))
    else:
        r.set_rcode(dns.rcode.REFUSED)
    return r.to_wire()


def serve_udp(sock):
    while True:
        data, src = sock.recvfrom(65535)
        try:
            sock.sendto(answer(data, "udp"), src)
        except Exception as e:  # a test server: report and go on
            print(json.dumps({"error": str(e)}), flush=True)


def serve_tcp_conn(conn):
    with conn:
        while True:
            head = conn.recv(2, socket.MSG_WAITALL)
            if len(head) < 2:
                return
            (n,) = struct.unpack("!H", head)
            data = conn.recv(n, socket.MSG_WAITALL)
            out = answer(data, "tcp")
            conn.sendall(struct.pack("!H", len(out)) + out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--ready", required=True)
    a = p.parse_args()
    host, port = a.listen.rsplit(":", 1)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((host, int(port)))
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((host, int(port)))
    tcp.listen(16)
    threading.Thread(target=serve_udp, args=(udp,), daemon=True).start()
    open(a.ready, "w").write("ok\n")
    while True:
        conn, _ = tcp.accept()
        threading.Thread(target=serve_tcp_conn, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
