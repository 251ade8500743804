#!/usr/bin/env python3
"""Fake istio-cni node agent: the server side of ZDS, for testing ztunnel and ringtun in-pod mode.

Shares no code with ringtun or ztunnel: protobuf is encoded by hand here, from istio/ztunnel's
`proto/zds.proto`. The agent listens on a SOCK_SEQPACKET unix socket (one protobuf message per
packet, as istio-cni does); the proxy connects and speaks first with `ZdsHello{version: V1}`;
the agent then sends `WorkloadRequest`s one at a time and waits for each `WorkloadResponse{ack}`
(an empty `error` is success) before the next, as istio-cni does. `add` carries the pod's
network namespace fd in an SCM_RIGHTS control message.

Usage: node_agent.py --socket PATH [-c 'CMD; CMD ...']

Commands (one per line on stdin, after those given with -c; `#` starts a comment); each prints
exactly one JSON object on stdout when it is done:

  accept [SECS]                   wait for the proxy to connect and read its hello
                                  -> {"event": "hello", "version": 1} | "timeout" | "error"
  add UID NETNS NS NAME SA        add a pod: NETNS is a path (/run/netns/X, /proc/PID/ns/net)
                                  whose fd is sent; the pod is remembered for `replay`
  keep UID                        keep a pod the agent has no netns for (before the snapshot)
  del UID                         delete a pod (forgotten for `replay`)
  snapshot                        snapshot_sent: every pod the proxy should have was announced
  replay                          what istio-cni does on a new connection: add every remembered
                                  pod, then snapshot_sent (one "ack" per message, then "replayed")
  close                           close the connection (the proxy should reconnect)
  expect-close [SECS]             wait for the proxy to close -> {"event": "closed"} | "open"
  sleep SECS                      pause
  quit                            close everything and exit

Deliberately bad messages, for negative tests:

  garbage HEX                     arbitrary bytes as one packet (HEX may be empty: "")
  raw HEX [PATH]                  arbitrary bytes, with PATH's fd attached when given
  add-nofd UID NS NAME SA         an add without the netns fd
  add-fd UID PATH NS NAME SA      an add whose fd is PATH's (e.g. /dev/null: not a netns)
  add-noinfo UID NETNS            an add without workload_info
  add-twofds UID NETNS NS NAME SA an add with the netns fd attached twice
  del-fd UID PATH                 a del with an (unexpected) fd attached
  oversized BYTES                 a syntactically valid add of about BYTES bytes (huge uid)

After every sent message the agent waits for one response and prints
  {"event": "ack", "cmd": CMD, "uid": UID, "error": "", "ms": MS}
                              (error non-empty on a NACK; MS: milliseconds from the send to the
                              response, what an istio-cni agent waits per pod)
  {"event": "closed", "cmd": CMD, ...}                      the proxy closed instead
  {"event": "timeout", "cmd": CMD, ...}                     nothing within --ack-timeout
  {"event": "bad-response", "cmd": CMD, "hex": ...}         a response that is not an Ack
Usage errors print {"event": "error", "detail": ...} and the agent keeps going. The first line
printed is {"event": "listening", "socket": PATH}.
"""

import argparse
import array
import json
import os
import select
import shlex
import socket
import sys
import time

sys.dont_write_bytecode = True

# Receive buffer for the proxy's responses: far above any Ack, so truncation means a broken peer.
RECV_SIZE = 64 * 1024

# ---------------------------------------------------------------------------------------------
# protobuf, by hand (proto3 wire format: varint keys, varint and length-delimited fields)

WT_VARINT = 0
WT_LEN = 2


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field_bytes(num, data):
    return varint((num << 3) | WT_LEN) + varint(len(data)) + data


def field_str(num, s):
    # proto3 omits empty strings; so does Go's encoder in istio-cni.
    return field_bytes(num, s.encode()) if s else b""


def field_msg(num, body):
    # A present sub-message is written even when empty (oneof members, workload_info).
    return field_bytes(num, body)


def workload_info(ns, name, sa):
    # WorkloadInfo: name = 1, namespace = 2, service_account = 3.
    return field_str(1, name) + field_str(2, ns) + field_str(3, sa)


def req_add(uid, info):
    # WorkloadRequest.add = 1: AddWorkload { uid = 1, workload_info = 2 }.
    body = field_str(1, uid)
    if info is not None:
        body += field_msg(2, info)
    return field_msg(1, body)


def req_keep(uid):
    # WorkloadRequest.keep = 5: KeepWorkload { uid = 1 }.
    return field_msg(5, field_str(1, uid))


def req_del(uid):
    # WorkloadRequest.del = 2: DelWorkload { uid = 2 } (sic: field 2 in zds.proto).
    return field_msg(2, field_str(2, uid))


def req_snapshot_sent():
    # WorkloadRequest.snapshot_sent = 3: SnapshotSent {}.
    return field_msg(3, b"")


def parse_fields(data):
    """(field number, wire type, value) of a message; value is int or bytes. Raises ValueError."""
    out = []
    i = 0

    def read_varint():
        nonlocal i
        shift = 0
        n = 0
        while True:
            if i >= len(data) or shift > 63:
                raise ValueError("truncated varint")
            b = data[i]
            i += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return n

    while i < len(data):
        key = read_varint()
        num, wt = key >> 3, key & 7
        if wt == WT_VARINT:
            out.append((num, wt, read_varint()))
        elif wt == WT_LEN:
            n = read_varint()
            if i + n > len(data):
                raise ValueError("truncated field")
            out.append((num, wt, bytes(data[i : i + n])))
            i += n
        elif wt == 1:
            i += 8
            out.append((num, wt, None))
        elif wt == 5:
            i += 4
            out.append((num, wt, None))
        else:
            raise ValueError(f"wire type {wt}")
    if i != len(data):
        raise ValueError("truncated fixed field")
    return out


def parse_hello(data):
    """ZdsHello { version = 1 } -> version (0 when absent)."""
    version = 0
    for num, wt, val in parse_fields(data):
        if num == 1 and wt == WT_VARINT:
            version = val
    return version


def parse_response(data):
    """WorkloadResponse { ack = 1: Ack { error = 1 } } -> error string, or None if no ack."""
    error = None
    for num, wt, val in parse_fields(data):
        if num == 1 and wt == WT_LEN:
            error = ""
            for n2, w2, v2 in parse_fields(val):
                if n2 == 1 and w2 == WT_LEN:
                    error = v2.decode("utf-8", "replace")
    return error


# ---------------------------------------------------------------------------------------------


def emit(obj):
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


class Agent:
    def __init__(self, path, ack_timeout):
        self.path = path
        self.ack_timeout = ack_timeout
        self.conn = None
        # uid -> (netns path, ns, name, sa): what istio-cni keeps in its cache and replays.
        self.pods = {}
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(path)
        self.listener.listen(8)

    # -- connection ---------------------------------------------------------------------------

    def accept(self, secs=10.0):
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        ready, _, _ = select.select([self.listener], [], [], secs)
        if not ready:
            return {"event": "timeout", "cmd": "accept"}
        conn, _ = self.listener.accept()
        self.conn = conn
        # ztunnel speaks first: ZdsHello, before any request.
        data = self.recv(secs)
        if data is None:
            return {"event": "timeout", "cmd": "accept"}
        if data == b"":
            self.conn = None
            return {"event": "closed", "cmd": "accept"}
        try:
            return {"event": "hello", "version": parse_hello(data), "hex": data.hex()}
        except ValueError as e:
            detail = f"bad hello: {e}"
            return {"event": "error", "cmd": "accept", "detail": detail, "hex": data.hex()}

    def recv(self, secs):
        """One packet; b"" when the peer closed, None on timeout."""
        ready, _, _ = select.select([self.conn], [], [], secs)
        if not ready:
            return None
        try:
            data, _, flags, _ = self.conn.recvmsg(RECV_SIZE)
        except ConnectionResetError:
            return b""
        if flags & socket.MSG_TRUNC:
            raise ValueError("response truncated")
        return data

    def send(self, data, fds=()):
        if fds:
            rights = (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))
            self.conn.sendmsg([data], [rights])
        else:
            self.conn.sendmsg([data])

    def request(self, cmd, data, uid="", paths=()):
        """Sends one request (with the fds of `paths`) and waits for its response."""
        if self.conn is None:
            return {"event": "error", "cmd": cmd, "uid": uid, "detail": "not connected"}
        fds = []
        sent = time.monotonic()
        try:
            for p in paths:
                fds.append(os.open(p, os.O_RDONLY | os.O_CLOEXEC))
            try:
                self.send(data, fds)
            except (BrokenPipeError, ConnectionResetError):
                return {"event": "closed", "cmd": cmd, "uid": uid}
        except OSError as e:
            return {"event": "error", "cmd": cmd, "uid": uid, "detail": str(e)}
        finally:
            # The receiver got its own copies; ours are closed at once so none leak.
            for fd in fds:
                os.close(fd)
        resp = self.recv(self.ack_timeout)
        if resp is None:
            return {"event": "timeout", "cmd": cmd, "uid": uid}
        if resp == b"":
            return {"event": "closed", "cmd": cmd, "uid": uid}
        try:
            error = parse_response(resp)
        except ValueError:
            error = None
        if error is None:
            return {"event": "bad-response", "cmd": cmd, "uid": uid, "hex": resp.hex()}
        ms = round((time.monotonic() - sent) * 1000.0, 3)
        return {"event": "ack", "cmd": cmd, "uid": uid, "error": error, "ms": ms}

    def expect_close(self, secs):
        if self.conn is None:
            return {"event": "closed"}
        deadline = time.monotonic() + secs
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return {"event": "open"}
            data = self.recv(left)
            if data is None:
                return {"event": "open"}
            if data == b"":
                self.conn.close()
                self.conn = None
                return {"event": "closed"}
            emit({"event": "unexpected", "hex": data.hex()})

    # -- commands -----------------------------------------------------------------------------

    def run(self, line):
        args = shlex.split(line, comments=True)
        if not args:
            return None
        cmd, rest = args[0], args[1:]
        handler = COMMANDS.get(cmd)
        if handler is None:
            return {"event": "error", "cmd": cmd, "detail": "unknown command"}
        arity, fn = handler
        if len(rest) not in arity:
            return {"event": "error", "cmd": cmd, "detail": f"takes {sorted(arity)} arguments"}
        try:
            return fn(self, *rest)
        except (OSError, ValueError) as e:
            return {"event": "error", "cmd": cmd, "detail": str(e)}


def c_add(a, uid, netns, ns, name, sa):
    a.pods[uid] = (netns, ns, name, sa)
    return a.request("add", req_add(uid, workload_info(ns, name, sa)), uid, [netns])


def c_del(a, uid):
    a.pods.pop(uid, None)
    return a.request("del", req_del(uid), uid)


def c_replay(a):
    for uid, (netns, ns, name, sa) in list(a.pods.items()):
        r = a.request("add", req_add(uid, workload_info(ns, name, sa)), uid, [netns])
        emit(r)
        if r["event"] != "ack":
            return {"event": "replay-failed", "uid": uid}
    emit(a.request("snapshot", req_snapshot_sent()))
    return {"event": "replayed", "pods": sorted(a.pods)}


def c_oversized(a, size):
    uid = "x" * max(int(size), 1)
    return a.request("oversized", req_add(uid, workload_info("default", "big", "big")), "", ())


def c_close(a):
    if a.conn is not None:
        a.conn.close()
        a.conn = None
    return {"event": "closed-by-agent"}


def c_sleep(_a, secs):
    time.sleep(float(secs))
    return {"event": "slept"}


COMMANDS = {
    "accept": ({0, 1}, lambda a, secs="10": a.accept(float(secs))),
    "add": ({5}, c_add),
    "keep": ({1}, lambda a, uid: a.request("keep", req_keep(uid), uid)),
    "del": ({1}, c_del),
    "snapshot": ({0}, lambda a: a.request("snapshot", req_snapshot_sent())),
    "replay": ({0}, c_replay),
    "close": ({0}, c_close),
    "expect-close": ({0, 1}, lambda a, secs="5": a.expect_close(float(secs))),
    "sleep": ({1}, c_sleep),
    "garbage": ({1}, lambda a, hx: a.request("garbage", bytes.fromhex(hx))),
    "raw": ({1, 2}, lambda a, hx, *p: a.request("raw", bytes.fromhex(hx), "", p)),
    "add-nofd": (
        {4},
        lambda a, uid, ns, name, sa: a.request(
            "add-nofd", req_add(uid, workload_info(ns, name, sa)), uid
        ),
    ),
    "add-fd": (
        {5},
        lambda a, uid, path, ns, name, sa: a.request(
            "add-fd", req_add(uid, workload_info(ns, name, sa)), uid, [path]
        ),
    ),
    "add-noinfo": (
        {2},
        lambda a, uid, netns: a.request("add-noinfo", req_add(uid, None), uid, [netns]),
    ),
    "add-twofds": (
        {5},
        lambda a, uid, netns, ns, name, sa: a.request(
            "add-twofds", req_add(uid, workload_info(ns, name, sa)), uid, [netns, netns]
        ),
    ),
    "del-fd": ({2}, lambda a, uid, path: a.request("del-fd", req_del(uid), uid, [path])),
    "oversized": ({1}, c_oversized),
}


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--socket", required=True, help="path of the SOCK_SEQPACKET socket to listen on")
    p.add_argument("-c", "--commands", default="", help="commands to run first, separated by ';'")
    p.add_argument(
        "--ack-timeout", type=float, default=10.0, help="seconds to wait for each response"
    )
    args = p.parse_args()
    agent = Agent(args.socket, args.ack_timeout)
    emit({"event": "listening", "socket": args.socket})
    lines = [c for c in args.commands.split(";") if c.strip()]
    try:
        for line in lines:
            if line.split()[0] == "quit":
                return 0
            r = agent.run(line)
            if r is not None:
                emit(r)
        for line in sys.stdin:
            if line.strip() == "quit":
                break
            r = agent.run(line)
            if r is not None:
                emit(r)
    finally:
        if agent.conn is not None:
            agent.conn.close()
        agent.listener.close()
        try:
            os.unlink(args.socket)
        except FileNotFoundError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
