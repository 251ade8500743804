#!/usr/bin/env python3
"""HBONE peer that resets an established CONNECT stream with an error code.

Either end of one CONNECT, over mutual TLS 1.3 and HTTP/2 (Python `ssl` + `h2`, no code shared
with ringtun), for comparing what an application behind a proxy sees when the peer sends
RST_STREAM(CODE) mid-stream:

  --role server   listen on --listen; answer each CONNECT 200, send --bytes bytes on it, wait
                  --pause seconds, then RST_STREAM(--code). (The proxy is the HBONE client.)
  --role client   connect to --connect, CONNECT --authority, on 200 send --bytes bytes, wait
                  --pause seconds, then RST_STREAM(--code). (The proxy is the HBONE server.)

The connection stays open afterwards (the reset is a stream's, not the connection's); the
client role exits --linger seconds after the reset. One JSON line per stream on stdout:
  {"event": "reset_sent", "role": ..., "bytes_sent": N, "code": CODE}
Exits 0 when the reset was sent, 1 otherwise.
"""

import argparse
import os
import socket
import ssl
import sys
import threading
import time

import h2.events

sys.dont_write_bytecode = True

from hbone_common import emit, h2_connection, parse_hostport, tls_context  # noqa: E402

READ = 64 * 1024


def send_all(tls, conn, lock):
    with lock:
        data = conn.data_to_send()
    if data:
        tls.sendall(data)


def reader(tls, conn, lock, on_event, stop):
    """Feeds every received byte to h2 (answering its PINGs and SETTINGS) until EOF."""
    while not stop.is_set():
        try:
            data = tls.recv(READ)
        except (OSError, ssl.SSLError):
            return
        if not data:
            return
        with lock:
            events = conn.receive_data(data)
            for ev in events:
                if isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                on_event(ev)
        try:
            send_all(tls, conn, lock)
        except OSError:
            return


def reset_after(tls, conn, lock, sid, args, role):
    """Sends --bytes on stream `sid`, waits, then resets it with --code."""
    payload = os.urandom(args.bytes)
    with lock:
        conn.send_data(sid, payload)
    send_all(tls, conn, lock)
    time.sleep(args.pause)
    with lock:
        conn.reset_stream(sid, error_code=args.code)
    send_all(tls, conn, lock)
    emit({"event": "reset_sent", "role": role, "bytes_sent": len(payload), "code": args.code})


def serve_one(raw, ctx, args):
    try:
        tls = ctx.wrap_socket(raw, server_side=True)
    except (OSError, ssl.SSLError) as e:
        emit({"event": "tls_error", "detail": repr(e)})
        raw.close()
        return
    conn = h2_connection(client_side=False)
    lock = threading.Lock()
    conn.initiate_connection()
    send_all(tls, conn, lock)
    stop = threading.Event()

    def on_event(ev):
        if isinstance(ev, h2.events.RequestReceived):
            conn.send_headers(ev.stream_id, [(":status", "200")])
            threading.Thread(
                target=lambda: (
                    time.sleep(0.1),
                    reset_after(tls, conn, lock, ev.stream_id, args, "server"),
                ),
                daemon=True,
            ).start()

    reader(tls, conn, lock, on_event, stop)
    tls.close()


def server(args):
    host, port = parse_hostport(args.listen)
    ctx = tls_context(True, args.cert, args.key, args.ca)
    sock = socket.create_server((host or "", port), reuse_port=False)
    emit({"event": "listening", "port": port})
    while True:
        raw, _ = sock.accept()
        threading.Thread(target=serve_one, args=(raw, ctx, args), daemon=True).start()


def client(args):
    host, port = parse_hostport(args.connect, 15008)
    ctx = tls_context(False, args.cert, args.key, args.ca)
    raw = socket.create_connection((host, port), timeout=args.timeout)
    tls = ctx.wrap_socket(raw, server_hostname=None)
    conn = h2_connection(client_side=True)
    lock = threading.Lock()
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(":method", "CONNECT"), (":authority", args.authority)])
    send_all(tls, conn, lock)
    status = {}
    got = threading.Event()

    def on_event(ev):
        if isinstance(ev, h2.events.ResponseReceived):
            status["status"] = int(dict(ev.headers).get(b":status", b"0"))
            got.set()

    stop = threading.Event()
    threading.Thread(target=reader, args=(tls, conn, lock, on_event, stop), daemon=True).start()
    if not got.wait(args.timeout) or status.get("status") != 200:
        emit({"event": "error", "detail": f"no 200: {status}"})
        return 1
    reset_after(tls, conn, lock, sid, args, "client")
    time.sleep(args.linger)
    stop.set()
    return 0


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", choices=["server", "client"], required=True)
    p.add_argument("--listen", default="*:15008", help="server: HOST:PORT")
    p.add_argument("--connect", default="10.77.0.2:15008", help="client: HOST:PORT")
    p.add_argument("--authority", default="10.77.0.2:5201", help="client: CONNECT authority")
    p.add_argument("--cert", required=True)
    p.add_argument("--key", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--code", type=int, required=True, help="RST_STREAM error code")
    p.add_argument("--bytes", type=int, default=32 * 1024, help="data sent before the reset")
    p.add_argument("--pause", type=float, default=0.5, help="seconds between data and reset")
    p.add_argument("--linger", type=float, default=2.0, help="client: seconds kept open after")
    p.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args()
    if args.role == "server":
        server(args)
        return 0
    return client(args)


if __name__ == "__main__":
    sys.exit(main())
