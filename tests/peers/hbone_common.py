"""Shared bits of the independent HBONE test peers (TLS contexts, HTTP/2 settings, helpers).

These peers are deliberately built only on Python's `ssl` module and the `h2` package so that
they check ringtun against an implementation that shares no code with it.
"""

import json
import os
import ssl
import sys

import h2.config
import h2.connection
import h2.settings

# Large HTTP/2 windows so that a 64 MiB transfer is not throttled by round trips; the peers
# acknowledge data as they consume it, so the windows are replenished continuously.
STREAM_WINDOW = 8 * 1024 * 1024
CONNECTION_WINDOW = 32 * 1024 * 1024
# Let the other side send big frames: fewer frames means less Python work per byte.
MAX_FRAME_SIZE = 1024 * 1024
READ_SIZE = 256 * 1024

# Exit codes of hbone_client.py, documented in its --help.
EXIT_OK = 0
EXIT_USAGE = 1
EXIT_CONNECT = 2
EXIT_TLS = 3
EXIT_STATUS = 4
EXIT_STREAM = 5
EXIT_MISMATCH = 6
EXIT_TIMEOUT = 7


def tls_context(server_side, cert, key, ca):
    """A TLS 1.3-only context offering ALPN h2 with a certificate and a CA for the peer."""
    purpose = ssl.Purpose.CLIENT_AUTH if server_side else ssl.Purpose.SERVER_AUTH
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols(["h2"])
    if cert:
        ctx.load_cert_chain(cert, key)
    if ca:
        ctx.load_verify_locations(cafile=ca)
    else:
        ctx.load_default_certs(purpose)
    # SPIFFE certificates carry URI SANs, not host names: the identity is checked by the
    # caller (printed / recorded), the chain by OpenSSL.
    if not server_side:
        ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def uri_sans(peercert):
    """URI subjectAltNames (SPIFFE identities) of a certificate dict from getpeercert()."""
    if not peercert:
        return []
    return [v for (k, v) in peercert.get("subjectAltName", ()) if k == "URI"]


def h2_connection(client_side):
    """An h2 connection with large windows and frames; call initial_bytes() to start it."""
    config = h2.config.H2Configuration(
        client_side=client_side,
        # Keep header names/values as bytes: the report shows exactly what was on the wire.
        header_encoding=None,
    )
    return h2.connection.H2Connection(config=config)


def start(conn):
    """Sends the preface with our settings and a connection window bump."""
    conn.initiate_connection()
    conn.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME_SIZE,
        }
    )
    conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
    # python-h2 checks frame lengths once per receive_data() call against the limit in force
    # before that call, so a SETTINGS ACK and a large DATA frame read together would be refused
    # as "overlong" although the peer sent them in the right order. Accepting our advertised
    # size at once is what RFC 9113 allows (a receiver may accept more than it announced).
    conn.max_inbound_frame_size = MAX_FRAME_SIZE


def parse_hostport(text, default_port=None):
    """'1.2.3.4:80', '[fd77::2]:80', 'host:80' → (host, port); '*:15008' → (None, 15008)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = text, ""
    if not port:
        if default_port is None:
            raise ValueError(f"missing port in {text!r}")
        port = default_port
    if host in ("", "*"):
        host = None
    return host, int(port)


def emit(obj):
    """One JSON object per line on stdout, flushed so a parent process sees it at once."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def write_json_atomic(path, obj):
    """Replaces `path` with `obj` as JSON without readers ever seeing a partial file."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def decode(b):
    return b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b)
