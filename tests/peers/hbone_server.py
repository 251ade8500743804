#!/usr/bin/env python3
"""Independent HBONE server: accepts HTTP/2 CONNECT over mutual TLS 1.3, for testing ringtun's
outbound side.

Listens (15008 by default), requires a client certificate from --ca, answers every CONNECT with
--status (200 by default; anything else is answered 400) and echoes the stream's bytes back,
ending its side when the client half-closes. Everything it sees is written to the JSON --report
file, rewritten atomically after every change, so a test can read it at any time:

  {"listen": "...", "pid": N,
   "tls_errors": [{"peer_addr": "...", "error": "..."}],
   "connections": [{"peer_addr": "ip:port", "peer_identities": ["spiffe://..."],
                    "tls_version": "TLSv1.3", "alpn": "h2", "closed": bool, "error": "...",
                    "goaway": <error code, if the client sent GOAWAY>,
                    "streams": [{"stream_id": 1, "method": "CONNECT", "authority": "...",
                                 "path": null, "headers": [[name, value], ...], "status": 200,
                                 "bytes_received": N, "sha256_received": "...",
                                 "bytes_sent": N, "sha256_sent": "...",
                                 "end": "open" | "end_stream" | "reset:<code>"
                                        | "sent_reset:<code>" | "closed"}]}]}

The report exists (with no connections) as soon as the server listens.
"""

import argparse
import asyncio
import hashlib
import os
import signal
import socket
import ssl
import sys

import h2.events
import h2.exceptions

# Keep the source tree clean: no __pycache__ next to the peers when they import their helper.
sys.dont_write_bytecode = True

from hbone_common import (  # noqa: E402 - after the bytecode switch on purpose
    decode,
    emit,
    h2_connection,
    parse_hostport,
    start,
    tls_context,
    uri_sans,
    write_json_atomic,
)


def fmt_addr(peer):
    if not peer:
        return None
    host, port = peer[0], peer[1]
    # A dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d; report them as plain IPv4.
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Stream:
    def __init__(self, record, echo):
        self.rec = record
        self.echo = echo
        self.out = bytearray()
        # Flow-controlled bytes received but not yet handed back to the peer's window: we only
        # acknowledge what has been echoed, so a slow reader throttles the sender end to end.
        self.unacked = 0
        self.recv_hash = hashlib.sha256()
        self.sent_hash = hashlib.sha256()
        self.remote_ended = False
        self.local_ended = False

    def finish(self, end):
        if self.rec["end"] == "open":
            self.rec["end"] = end
        self.rec["sha256_received"] = self.recv_hash.hexdigest()
        self.rec["sha256_sent"] = self.sent_hash.hexdigest()


class Server:
    def __init__(self, args):
        self.args = args
        self.ctx = tls_context(True, args.cert, args.key, args.ca)
        self.report = {"listen": args.listen, "pid": os.getpid(), "tls_errors": [], "connections": []}

    def save(self):
        write_json_atomic(self.args.report, self.report)

    async def handle(self, sock, addr):
        peer = fmt_addr(addr)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=1 << 20)
        protocol = asyncio.StreamReaderProtocol(reader)
        # The handshake is awaited here (rather than inside start_server) so that failures,
        # e.g. a refused client certificate, are recorded instead of only logged by asyncio.
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=self.ctx, ssl_handshake_timeout=15
            )
        except Exception as e:  # noqa: BLE001 - every failure is a finding to report
            self.report["tls_errors"].append({"peer_addr": peer, "error": repr(e)})
            self.save()
            sock.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        tls = writer.get_extra_info("ssl_object")
        crec = {
            "peer_addr": peer,
            "peer_identities": uri_sans(tls.getpeercert()),
            "tls_version": tls.version(),
            "alpn": tls.selected_alpn_protocol(),
            "closed": False,
            "error": None,
            "streams": [],
        }
        self.report["connections"].append(crec)
        self.save()
        conn = h2_connection(client_side=False)
        start(conn)
        writer.write(conn.data_to_send())
        streams = {}
        try:
            await self.serve(reader, writer, conn, crec, streams)
        except (ConnectionError, OSError, ssl.SSLError) as e:
            crec["error"] = repr(e)
        finally:
            for st in streams.values():
                st.finish("closed")
            crec["closed"] = True
            self.save()
            writer.close()

    async def serve(self, reader, writer, conn, crec, streams):
        while True:
            data = await reader.read(256 * 1024)
            if not data:
                return
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                crec["error"] = f"HTTP/2 protocol error: {e!r}"
                writer.write(conn.data_to_send())
                return
            changed = False
            for ev in events:
                changed |= self.on_event(conn, crec, streams, ev)
            changed |= self.pump(conn, streams)
            if changed:
                self.save()
            out = conn.data_to_send()
            if out:
                writer.write(out)
                await writer.drain()

    def on_event(self, conn, crec, streams, ev):
        """Handles one h2 event; returns whether the report changed."""
        if isinstance(ev, h2.events.RequestReceived):
            headers = [[decode(k), decode(v)] for k, v in ev.headers]
            pseudo = {k: v for k, v in headers if k.startswith(":")}
            method = pseudo.get(":method")
            status = self.args.status if method == "CONNECT" else 400
            rec = {
                "stream_id": ev.stream_id,
                "method": method,
                "authority": pseudo.get(":authority"),
                "path": pseudo.get(":path"),
                "headers": headers,
                "status": status,
                "bytes_received": 0,
                "bytes_sent": 0,
                "sha256_received": None,
                "sha256_sent": None,
                "end": "open",
            }
            crec["streams"].append(rec)
            st = Stream(rec, echo=status == 200)
            streams[ev.stream_id] = st
            conn.send_headers(ev.stream_id, [(":status", str(status))], end_stream=status != 200)
            if status != 200:
                st.local_ended = True
                st.finish(f"refused:{status}")
            return True
        st = streams.get(getattr(ev, "stream_id", None))
        if isinstance(ev, h2.events.DataReceived) and st:
            st.recv_hash.update(ev.data)
            st.rec["bytes_received"] += len(ev.data)
            if st.echo and not st.local_ended:
                st.out += ev.data
                st.unacked += ev.flow_controlled_length
            else:
                conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded) and st:
            st.remote_ended = True
        elif isinstance(ev, h2.events.StreamReset) and st:
            st.out.clear()
            st.local_ended = True
            st.finish(f"reset:{int(ev.error_code)}")
            return True
        elif isinstance(ev, h2.events.ConnectionTerminated):
            crec["goaway"] = int(ev.error_code)
            if ev.error_code:
                crec["error"] = f"GOAWAY error code {ev.error_code}"
            return True
        return False

    def pump(self, conn, streams):
        """Echoes buffered bytes as far as the windows allow; returns whether a stream ended."""
        changed = False
        for sid, st in streams.items():
            if st.local_ended:
                continue
            while st.out:
                try:
                    room = min(
                        conn.local_flow_control_window(sid),
                        conn.max_outbound_frame_size,
                        len(st.out),
                    )
                except h2.exceptions.StreamClosedError:
                    st.out.clear()
                    break
                if room <= 0:
                    break
                chunk = bytes(st.out[:room])
                del st.out[:room]
                conn.send_data(sid, chunk)
                st.sent_hash.update(chunk)
                st.rec["bytes_sent"] += room
                ack = min(st.unacked, room)
                st.unacked -= ack
                self.ack(conn, sid, ack)
            if not st.out and st.remote_ended:
                self.ack(conn, sid, st.unacked)
                st.unacked = 0
                code = self.args.end_with_reset
                try:
                    if code is None:
                        conn.end_stream(sid)
                    else:
                        conn.reset_stream(sid, error_code=code)
                except h2.exceptions.StreamClosedError:
                    pass
                st.local_ended = True
                st.finish("end_stream" if code is None else f"sent_reset:{code}")
                changed = True
        return changed

    @staticmethod
    def ack(conn, sid, n):
        # h2 credits the connection window even when the stream is already closed.
        if n > 0:
            conn.acknowledge_received_data(n, sid)


def listen_socket(host, port):
    """A listening socket; no host means every IPv4 and IPv6 address (dual stack)."""
    if host is None:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        addr = ("::", port)
    else:
        family, _, _, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def amain(args):
    server = Server(args)
    host, port = parse_hostport(args.listen, 15008)
    lsock = listen_socket(host, port)
    server.save()
    emit({"event": "listening", "address": fmt_addr(lsock.getsockname())})
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = set()

    async def accept_loop():
        while True:
            sock, addr = await loop.sock_accept(lsock)
            task = asyncio.create_task(server.handle(sock, addr))
            # Keep a reference: the loop only holds weak ones to running tasks.
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept_loop())
    await stop.wait()
    acceptor.cancel()
    server.save()
    lsock.close()


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--listen", default="*:15008", help="HOST:PORT ('*' = all addresses)")
    p.add_argument("--cert", required=True, help="server certificate chain (PEM)")
    p.add_argument("--key", required=True, help="server private key (PEM)")
    p.add_argument("--ca", required=True, help="CA bundle that client certificates must chain to")
    p.add_argument("--report", required=True, help="JSON report file")
    p.add_argument("--status", type=int, default=200, help="status answered to CONNECT")
    p.add_argument(
        "--end-with-reset",
        type=int,
        default=None,
        metavar="CODE",
        help="end each echoed stream with RST_STREAM(CODE) instead of END_STREAM",
    )
    args = p.parse_args()
    try:
        asyncio.run(amain(args))
    except (OSError, ssl.SSLError) as e:
        print(f"hbone_server: {e!r}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
