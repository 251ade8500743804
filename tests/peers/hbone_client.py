#!/usr/bin/env python3
"""Independent HBONE client: HTTP/2 CONNECT over mutual TLS 1.3, for testing ringtun's inbound.

Connects to HOST:PORT (15008 by default) with a client certificate, sends one CONNECT (or, to
test refusals, a GET) and prints one JSON object per line on stdout:

  {"event": "tls", "version": "TLSv1.3", "alpn": "h2", "server_identities": ["spiffe://..."]}
  {"event": "response", "status": 200, "headers": [[name, value], ...]}
  {"event": "result", "bytes_sent": N, "bytes_received": N, "sha256_sent": "...",
   "sha256_received": "...", "end": "end_stream" | "reset:<code>" | ...}
  {"event": "error", "kind": "connect" | "tls" | "status" | "stream" | "mismatch" | "timeout",
   "detail": "..."}

After a 200 it streams --bytes random bytes, half-closes (END_STREAM), reads the echo until the
server ends the stream and compares checksums.

Exit codes: 0 success; 1 usage/internal error; 2 TCP connect failed; 3 TLS handshake failed or
refused (including a TLS 1.3 post-handshake alert or a close before any HTTP/2 frame); 4 response
status other than 200 (the status is printed); 5 stream reset or connection error mid-transfer;
6 echo differs from what was sent; 7 timeout.
"""

import argparse
import asyncio
import hashlib
import os
import ssl
import sys

import h2.events
import h2.exceptions

# Keep the source tree clean: no __pycache__ next to the peers when they import their helper.
sys.dont_write_bytecode = True

from hbone_common import (  # noqa: E402 - after the bytecode switch on purpose
    EXIT_CONNECT,
    EXIT_MISMATCH,
    EXIT_OK,
    EXIT_STATUS,
    EXIT_STREAM,
    EXIT_TIMEOUT,
    EXIT_TLS,
    EXIT_USAGE,
    decode,
    emit,
    h2_connection,
    parse_hostport,
    start,
    tls_context,
    uri_sans,
)

# How much DATA to queue before waiting for the transport to drain.
SEND_BATCH = 1024 * 1024


class Failure(Exception):
    """Ends the run with an exit code and an error line."""

    def __init__(self, code, kind, detail):
        super().__init__(detail)
        self.code = code
        self.kind = kind
        self.detail = detail


class Session:
    """One HTTP/2 connection carrying one request, driven by a reader task."""

    def __init__(self, reader, writer, stream_id, conn):
        self.reader = reader
        self.writer = writer
        self.conn = conn
        self.sid = stream_id
        loop = asyncio.get_running_loop()
        self.response = loop.create_future()
        self.ended = loop.create_future()
        for fut in (self.response, self.ended):
            # Failures are reported through whichever future is awaited first; mark the other
            # one's exception as seen so asyncio does not warn about it at exit.
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.window = asyncio.Event()
        self.frames_seen = False
        self.received = 0
        self.recv_hash = hashlib.sha256()

    def _fail(self, failure):
        for fut in (self.response, self.ended):
            if not fut.done():
                fut.set_exception(failure)
        self.window.set()

    async def read_loop(self):
        while True:
            try:
                data = await self.reader.read(256 * 1024)
            except (ssl.SSLError, ConnectionError, OSError) as e:
                # With TLS 1.3 the client finishes its handshake before the server has checked
                # the client certificate, so a refusal shows up here as an alert or a reset.
                if not self.frames_seen:
                    self._fail(Failure(EXIT_TLS, "tls", f"refused after handshake: {e!r}"))
                else:
                    self._fail(Failure(EXIT_STREAM, "stream", f"connection error: {e!r}"))
                return
            if not data:
                if not self.frames_seen:
                    self._fail(Failure(EXIT_TLS, "tls", "closed before any HTTP/2 frame"))
                else:
                    self._fail(Failure(EXIT_STREAM, "stream", "connection closed (EOF)"))
                return
            self.frames_seen = True
            try:
                events = self.conn.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                self._fail(Failure(EXIT_STREAM, "stream", f"HTTP/2 protocol error: {e!r}"))
                return
            for ev in events:
                self._on_event(ev)
            out = self.conn.data_to_send()
            if out:
                self.writer.write(out)

    def _on_event(self, ev):
        if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == self.sid:
            if not self.response.done():
                self.response.set_result([(decode(k), decode(v)) for k, v in ev.headers])
        elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == self.sid:
            self.recv_hash.update(ev.data)
            self.received += len(ev.data)
            # Hand the window back as soon as the bytes are consumed (hashed).
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == self.sid:
            if not self.ended.done():
                self.ended.set_result("end_stream")
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == self.sid:
            fail = Failure(EXIT_STREAM, "stream", f"stream reset, error code {ev.error_code}")
            if not self.response.done():
                self.response.set_exception(fail)
            if not self.ended.done():
                self.ended.set_result(f"reset:{int(ev.error_code)}")
            self.window.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._fail(
                Failure(
                    EXIT_STREAM,
                    "stream",
                    f"GOAWAY error code {ev.error_code} last stream {ev.last_stream_id}",
                )
            )
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()

    async def flush(self):
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
        await self.writer.drain()

    async def send_body(self, payload):
        """Sends `payload` respecting the peer's flow-control windows, then END_STREAM."""
        view = memoryview(payload)
        off = 0
        while off < len(payload):
            if self.ended.done():
                # Surface the reader's diagnosis (reset code, TLS alert…) if it has one.
                exc = self.ended.exception()
                raise exc or Failure(EXIT_STREAM, "stream", f"{self.ended.result()} while sending")
            queued = 0
            while off < len(payload) and queued < SEND_BATCH:
                try:
                    room = min(
                        self.conn.local_flow_control_window(self.sid),
                        self.conn.max_outbound_frame_size,
                        len(payload) - off,
                    )
                except h2.exceptions.StreamClosedError as e:
                    raise Failure(EXIT_STREAM, "stream", f"stream closed: {e!r}") from e
                if room <= 0:
                    break
                self.conn.send_data(self.sid, bytes(view[off : off + room]))
                off += room
                queued += room
            await self.flush()
            if queued == 0:
                # Window exhausted: wait for a WINDOW_UPDATE (the reader task sets the event).
                self.window.clear()
                await self.window.wait()
        self.conn.end_stream(self.sid)
        await self.flush()


async def run(args):
    host, port = parse_hostport(args.connect, 15008)
    try:
        ctx = tls_context(False, args.cert, args.key, args.ca)
    except (OSError, ssl.SSLError) as e:
        raise Failure(EXIT_USAGE, "usage", f"loading certificates: {e!r}") from e
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port), args.timeout
        )
    except asyncio.TimeoutError as e:
        raise Failure(EXIT_CONNECT, "connect", f"TCP connect to {args.connect} timed out") from e
    except OSError as e:
        raise Failure(EXIT_CONNECT, "connect", f"TCP connect to {args.connect}: {e!r}") from e
    # TCP first, TLS second, so that a refused handshake is never mistaken for a dead port.
    try:
        await asyncio.wait_for(
            writer.start_tls(ctx, server_hostname=args.sni), args.timeout
        )
    except asyncio.TimeoutError as e:
        raise Failure(EXIT_TLS, "tls", "TLS handshake timed out") from e
    except (ssl.SSLError, ConnectionError, OSError, EOFError) as e:
        raise Failure(EXIT_TLS, "tls", f"handshake failed: {e!r}") from e
    tls = writer.get_extra_info("ssl_object")
    try:
        info = {
            "event": "tls",
            "version": tls.version(),
            "alpn": tls.selected_alpn_protocol(),
            "server_identities": uri_sans(tls.getpeercert()),
        }
    except (ValueError, OSError, AttributeError) as e:
        # The server's refusal (a TLS 1.3 alert right after our Finished) can tear the
        # connection down before we even look at it.
        raise Failure(EXIT_TLS, "tls", f"refused right after handshake: {e!r}") from e
    emit(info)
    if info["alpn"] != "h2":
        raise Failure(EXIT_TLS, "tls", f"ALPN {info['alpn']!r}, expected h2")

    conn = h2_connection(client_side=True)
    start(conn)
    sid = conn.get_next_available_stream_id()
    if args.method == "CONNECT":
        headers = [(":method", "CONNECT"), (":authority", args.authority)]
    else:
        headers = [
            (":method", args.method),
            (":scheme", "https"),
            (":authority", args.authority),
            (":path", args.path),
        ]
    for h in args.header:
        name, sep, value = h.partition(":")
        if not sep:
            raise Failure(EXIT_USAGE, "usage", f"--header {h!r} is not 'name: value'")
        headers.append((name.strip().lower(), value.strip()))
    conn.send_headers(sid, headers, end_stream=args.method != "CONNECT")
    session = Session(reader, writer, sid, conn)
    reader_task = asyncio.create_task(session.read_loop())
    try:
        return await converse(args, session)
    except (ssl.SSLError, ConnectionError, OSError) as e:
        # A write can hit the refusal before the reader sees it: same diagnosis as the reader's.
        if not session.frames_seen:
            raise Failure(EXIT_TLS, "tls", f"refused after handshake: {e!r}") from e
        raise Failure(EXIT_STREAM, "stream", f"connection error: {e!r}") from e
    finally:
        reader_task.cancel()
        writer.close()


async def converse(args, session):
    """Request, response, body and echo on an established session."""
    conn = session.conn
    await session.flush()
    resp = await session.response
    status = int(dict(resp).get(":status", "0"))
    emit({"event": "response", "status": status, "headers": resp})
    if status != 200:
        raise Failure(EXIT_STATUS, "status", f"status {status}")
    payload = os.urandom(args.bytes)
    sent_hash = hashlib.sha256(payload).hexdigest()
    await session.send_body(payload)
    end = await session.ended
    result = {
        "event": "result",
        "bytes_sent": len(payload),
        "bytes_received": session.received,
        "sha256_sent": sent_hash,
        "sha256_received": session.recv_hash.hexdigest(),
        "end": end,
    }
    emit(result)
    if end != "end_stream":
        raise Failure(EXIT_STREAM, "stream", f"stream ended with {end}")
    if args.echo and result["sha256_sent"] != result["sha256_received"]:
        raise Failure(
            EXIT_MISMATCH,
            "mismatch",
            f"sent {len(payload)} bytes, got back {session.received} with another digest",
        )
    try:
        conn.close_connection()
        await session.flush()
    except (ConnectionError, OSError):
        pass
    return EXIT_OK


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--connect", required=True, help="HOST:PORT of the HBONE server")
    p.add_argument("--cert", required=True, help="client certificate chain (PEM)")
    p.add_argument("--key", required=True, help="client private key (PEM)")
    p.add_argument("--ca", required=True, help="CA bundle to verify the server (PEM)")
    p.add_argument("--sni", default=None, help="TLS server name to send (none by default)")
    p.add_argument("--authority", required=True, help=":authority, e.g. 10.77.0.2:5201")
    p.add_argument("--method", default="CONNECT", help="CONNECT (default) or e.g. GET")
    p.add_argument("--path", default="/", help=":path for non-CONNECT methods")
    p.add_argument(
        "--header", action="append", default=[], help="extra request header 'name: value'"
    )
    p.add_argument("--bytes", type=int, default=1024 * 1024, help="payload size after 200")
    p.add_argument(
        "--no-echo", dest="echo", action="store_false", help="do not require an exact echo"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="overall timeout in seconds")
    args = p.parse_args()
    try:
        code = asyncio.run(asyncio.wait_for(run(args), args.timeout))
    except Failure as f:
        emit({"event": "error", "kind": f.kind, "detail": f.detail})
        code = f.code
    except asyncio.TimeoutError:
        emit({"event": "error", "kind": "timeout", "detail": f"no result in {args.timeout}s"})
        code = EXIT_TIMEOUT
    sys.exit(code)


if __name__ == "__main__":
    main()
