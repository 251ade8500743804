#!/usr/bin/env python3
"""Fake istiod: the two control-plane APIs a node proxy (ztunnel, ringtun) uses, for tests.

Shares no code with ringtun or ztunnel: the messages come from the .proto files in protos/
(Istio's and Envoy's packages and field numbers), compiled with grpcio-tools at start-up.
Served over TLS (a server certificate this process issues from the test CA at start-up):

  envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources
      Delta ADS with the two types ztunnel subscribes to:
        type.googleapis.com/istio.workload.Address        (workloads and services)
        type.googleapis.com/istio.security.Authorization  (L4 policies)
      As istiod: the first request of a type opens its subscription (no names: wildcard; "*"
      subscribed and unsubscribed: nothing until names are asked for, ztunnel's on-demand
      mode); `initial_resource_versions` tells what a reconnecting client holds, so only what
      changed is sent and what is gone is removed. Every subscription gets a first response,
      even an empty one. Resource names: a workload's uid, a service's `namespace/hostname`, a
      policy's `namespace/name`; workloads and services are also found by their aliases
      `network/IP` (what an on-demand client asks for). On demand, as istiod, a name that
      does not exist is answered as removed, a service asked for brings the workloads behind
      it, and the workloads of the proxy's own node (`node` = its NODE_NAME metadata) come
      unasked.
  istio.v1.auth.IstioCertificateService/CreateCertificate
      signs the CSR with the test CA for the identity in `ImpersonatedIdentity` metadata (a
      node proxy) or else the CSR's URI SAN, for the requested validity (capped by --max-ttl),
      and answers [leaf, root] as istiod does.

Both check `authorization: Bearer <token>` against --token (and fail with UNAUTHENTICATED,
"authentication failure", as istiod does); without --token any caller is accepted.

Resources come from --resources FILE (JSON), re-read when it changes (or on `reload`):

  {"workloads":      [Workload as protobuf JSON; IPs may be written as text],
   "services":       [Service as protobuf JSON],
   "authorizations": [Authorization as protobuf JSON],
   "raw":            [{"type": "address"|"authorization", "name": N, "value": BASE64}]}

`raw` entries are sent as they are (e.g. bytes that do not decode, to provoke a NACK). A
string that parses as an IP in an `address`/`addresses` field is packed into bytes; any other
string there is taken as base64 (so malformed addresses can be written too).

stdin commands, one per line:
  reload          re-read the resources file and push what changed
  close           end every open ADS stream with UNAVAILABLE (clients reconnect)
  close cancelled end them with CANCELLED instead (a routine end: ztunnel counts a Reconnect)
  ca-fail N       fail the next N CreateCertificate calls with UNAVAILABLE
  ca-bundle-add F add the root(s) in PEM file F to the trust bundle sent with every certificate
                  from now on (as istiod does while its root is being rotated)
  quit            stop

Every event is one JSON line on stdout: listening, resources, resources-error, connect,
auth-failed, request, ack, nack, push, disconnect, csr, csr-error, bundle.
"""

import argparse
import base64
import datetime
import hashlib
import ipaddress
import itertools
import json
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent import futures

sys.dont_write_bytecode = True

import grpc  # noqa: E402
from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

ADDRESS_TYPE = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE = "type.googleapis.com/istio.security.Authorization"
TYPES = (ADDRESS_TYPE, AUTHORIZATION_TYPE)
PROTO_FILES = (
    "google/rpc/status.proto",
    "envoy/base.proto",
    "envoy/discovery.proto",
    "istio/workload.proto",
    "istio/authorization.proto",
    "istio/ca.proto",
)

_print_lock = threading.Lock()


def emit(obj):
    with _print_lock:
        sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# Generated messages


def compile_protos():
    """Compiles protos/ into a temporary directory and imports the modules."""
    from grpc_tools import protoc

    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "protos")
    wkt = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    out = tempfile.mkdtemp(prefix="fake-istiod-pb-")
    args = ["protoc", f"-I{here}", f"-I{wkt}", f"--python_out={out}", f"--grpc_python_out={out}"]
    if protoc.main(args + list(PROTO_FILES)) != 0:
        raise SystemExit("fake_istiod: protoc failed on " + here)
    sys.path.insert(0, out)
    # google/ is a namespace package shared with the protobuf runtime: extend its path.
    import google

    google.__path__.append(os.path.join(out, "google"))
    import importlib

    mods = {}
    for name in (
        "google.rpc.status_pb2",
        "envoy.discovery_pb2",
        "envoy.discovery_pb2_grpc",
        "istio.workload_pb2",
        "istio.authorization_pb2",
        "istio.ca_pb2",
        "istio.ca_pb2_grpc",
    ):
        mods[name.split(".")[-1]] = importlib.import_module(name)
    return mods


PB = None  # filled by main(): name -> module


# ---------------------------------------------------------------------------------------------
# Resources


def pack_ips(node):
    """IP strings in `address`/`addresses` fields become base64 of their packed bytes."""

    def conv(s):
        try:
            return base64.b64encode(ipaddress.ip_address(s).packed).decode()
        except ValueError:
            return s

    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("address", "addresses") and isinstance(v, str):
                out[k] = conv(v)
            elif k in ("address", "addresses") and isinstance(v, list):
                out[k] = [conv(x) if isinstance(x, str) else pack_ips(x) for x in v]
            else:
                out[k] = pack_ips(v)
        return out
    if isinstance(node, list):
        return [pack_ips(x) for x in node]
    return node


class Entry:
    """One resource as served: its name, aliases, version and encoded body."""

    def __init__(self, type_url, name, body, aliases=(), node="", services=()):
        self.type_url = type_url
        self.name = name
        self.body = body
        self.aliases = list(aliases)
        # A workload's node and the services (`namespace/hostname`) it backs: what istiod adds
        # to an on-demand subscription unasked.
        self.node = node
        self.services = set(services)
        self.version = hashlib.sha256(body).hexdigest()[:16]


def load_resources(path):
    """Reads the resources file: {type_url: {name: Entry}}."""
    from google.protobuf import json_format

    wl, authz = PB["workload_pb2"], PB["authorization_pb2"]
    with open(path) as f:
        text = f.read()
    doc = json.loads(text) if text.strip() else {}
    out = {t: {} for t in TYPES}
    for w in doc.get("workloads", []):
        msg = json_format.ParseDict(pack_ips(w), wl.Workload())
        ips = []
        for a in msg.addresses:
            try:
                ips.append(str(ipaddress.ip_address(a)))
            except ValueError:
                pass
        aliases = [f"{msg.network}/{ip}" for ip in ips]
        body = wl.Address(workload=msg).SerializeToString()
        out[ADDRESS_TYPE][msg.uid] = Entry(ADDRESS_TYPE, msg.uid, body, aliases, msg.node, msg.services.keys())
    for s in doc.get("services", []):
        msg = json_format.ParseDict(pack_ips(s), wl.Service())
        aliases = []
        for a in msg.addresses:
            try:
                aliases.append(f"{a.network}/{ipaddress.ip_address(a.address)}")
            except ValueError:
                pass
        name = f"{msg.namespace}/{msg.hostname}"
        body = wl.Address(service=msg).SerializeToString()
        out[ADDRESS_TYPE][name] = Entry(ADDRESS_TYPE, name, body, aliases)
    for p in doc.get("authorizations", []):
        msg = json_format.ParseDict(pack_ips(p), authz.Authorization())
        name = f"{msg.namespace}/{msg.name}"
        out[AUTHORIZATION_TYPE][name] = Entry(AUTHORIZATION_TYPE, name, msg.SerializeToString())
    for r in doc.get("raw", []):
        t = {"address": ADDRESS_TYPE, "authorization": AUTHORIZATION_TYPE}.get(r["type"], r["type"])
        out[t][r["name"]] = Entry(t, r["name"], base64.b64decode(r.get("value", "")))
    return out


class Store:
    """The current resources and the open streams they are pushed to."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()
        self.resources = {t: {} for t in TYPES}
        self.version = 0
        self.streams = set()
        self.stamp = None

    def _stamp(self):
        try:
            st = os.stat(self.path)
            return (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            return None

    def reload(self, force=False):
        if not self.path:
            return
        stamp = self._stamp()
        if not force and stamp == self.stamp:
            return
        self.stamp = stamp
        try:
            res = load_resources(self.path)
        except Exception as e:  # a bad file keeps the previous resources, as a typo would
            emit({"event": "resources-error", "path": self.path, "error": str(e)})
            return
        with self.lock:
            self.resources = res
            self.version += 1
            streams = list(self.streams)
        emit(
            {
                "event": "resources",
                "version": self.version,
                "names": {t: sorted(res[t]) for t in TYPES},
            }
        )
        for s in streams:
            s.push_all()

    def snapshot(self, type_url):
        with self.lock:
            return dict(self.resources.get(type_url, {})), self.version


# ---------------------------------------------------------------------------------------------
# Authentication


class Auth:
    def __init__(self, tokens):
        self.tokens = set(tokens)

    def check(self, context, rpc):
        md = {k: v for k, v in context.invocation_metadata()}
        if not self.tokens:
            return md
        got = md.get("authorization", "")
        if got.startswith("Bearer ") and got[len("Bearer ") :] in self.tokens:
            return md
        reason = "no bearer token" if not got else "unknown token"
        emit({"event": "auth-failed", "rpc": rpc, "peer": context.peer(), "reason": reason})
        context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authentication failure: {reason}")
        return None


# ---------------------------------------------------------------------------------------------
# Delta ADS

CLOSE = object()
_stream_ids = itertools.count(1)
_nonces = itertools.count(1)


class Sub:
    """One type's subscription on one stream."""

    def __init__(self, wildcard):
        self.wildcard = wildcard
        self.names = set()
        # What the client holds: name -> version.
        self.sent = {}


class Stream:
    def __init__(self, store, peer):
        self.id = next(_stream_ids)
        self.store = store
        self.peer = peer
        self.out = queue.Queue()
        self.subs = {}
        self.lock = threading.Lock()
        self.node_logged = False
        # The proxy's NODE_NAME (node metadata): its node's workloads come unasked on demand.
        self.node_name = ""

    def handle(self, req):
        ev = {
            "event": "request",
            "stream": self.id,
            "type_url": req.type_url,
            "subscribe": list(req.resource_names_subscribe),
            "unsubscribe": list(req.resource_names_unsubscribe),
            "initial": dict(req.initial_resource_versions),
            "nonce": req.response_nonce,
        }
        if req.HasField("node") and not self.node_logged:
            from google.protobuf import json_format

            self.node_logged = True
            ev["node"] = req.node.id
            v = req.node.metadata.fields.get("NODE_NAME")
            self.node_name = v.string_value if v is not None else ""
            ev["metadata"] = json_format.MessageToDict(req.node.metadata)
        emit(ev)
        if req.response_nonce:
            kind = "nack" if req.HasField("error_detail") else "ack"
            ack = {"event": kind, "stream": self.id, "type_url": req.type_url, "nonce": req.response_nonce}
            if kind == "nack":
                ack["error"] = req.error_detail.message
            emit(ack)
        with self.lock:
            sub = self.subs.get(req.type_url)
            forced = set()
            if sub is None:
                subscribe = set(req.resource_names_subscribe)
                unsubscribe = set(req.resource_names_unsubscribe)
                wildcard = (not subscribe and not unsubscribe) or ("*" in subscribe and "*" not in unsubscribe)
                sub = self.subs[req.type_url] = Sub(wildcard)
                # As istiod: what a reconnecting client holds is subscribed to as well.
                sub.names = (subscribe | set(req.initial_resource_versions)) - {"*"} - unsubscribe
                sub.sent = dict(req.initial_resource_versions)
                # Only names asked for now are answered whatever the client holds.
                self.push(req.type_url, sub, subscribe - {"*"} - unsubscribe, first=True)
                return
            for n in req.resource_names_subscribe:
                if n == "*":
                    sub.wildcard = True
                else:
                    sub.names.add(n)
                    forced.add(n)
            for n in req.resource_names_unsubscribe:
                if n == "*":
                    sub.wildcard = False
                else:
                    sub.names.discard(n)
            if forced or req.resource_names_unsubscribe:
                self.push(req.type_url, sub, forced)

    def push_all(self):
        with self.lock:
            for t, sub in self.subs.items():
                self.push(t, sub, set())

    def push(self, type_url, sub, forced, first=False):
        """Sends what changed for one subscription (caller holds self.lock)."""
        entries, version = self.store.snapshot(type_url)
        by_alias = {}
        for e in entries.values():
            for a in e.aliases:
                by_alias.setdefault(a, e)
        if sub.wildcard:
            visible = dict(entries)
        else:
            visible = {}
            for n in sub.names:
                e = entries.get(n) or by_alias.get(n)
                if e is not None:
                    visible[e.name] = e
            # As istiod's AdditionalPodSubscriptions: the workloads behind a service asked for,
            # and every workload on the proxy's own node; the client is subscribed to them (and
            # to the names the aliases it asked for resolved to) from now on.
            for e in list(visible.values()):
                for w in entries.values():
                    if e.name in w.services:
                        visible[w.name] = w
            if self.node_name:
                for w in entries.values():
                    if w.node == self.node_name:
                        visible[w.name] = w
            sub.names |= set(visible)
        send = [e for e in visible.values() if sub.sent.get(e.name) != e.version or e.name in forced]
        for n in forced:
            e = entries.get(n) or by_alias.get(n)
            if e is not None and e not in send:
                send.append(e)
        # An alias the client holds (a name it asked for) stays while what it names is visible.
        aliased = {a for e in visible.values() for a in e.aliases}
        removed = sorted(n for n in sub.sent if n not in visible and n not in aliased)
        # An explicitly asked-for name that does not exist is answered as removed.
        removed += sorted(n for n in forced if n not in entries and n not in by_alias and n not in removed)
        if not send and not removed and not first:
            return
        for e in send:
            sub.sent[e.name] = e.version
        for n in removed:
            sub.sent.pop(n, None)
        d = PB["discovery_pb2"]
        from google.protobuf import any_pb2

        nonce = f"n{next(_nonces)}"
        resp = d.DeltaDiscoveryResponse(
            system_version_info=str(version),
            type_url=type_url,
            nonce=nonce,
            removed_resources=removed,
            resources=[
                d.Resource(
                    name=e.name,
                    version=e.version,
                    aliases=e.aliases,
                    resource=any_pb2.Any(type_url=type_url, value=e.body),
                )
                for e in sorted(send, key=lambda e: e.name)
            ],
        )
        emit(
            {
                "event": "push",
                "stream": self.id,
                "type_url": type_url,
                "nonce": nonce,
                "version": version,
                "resources": sorted(e.name for e in send),
                "removed": removed,
            }
        )
        self.out.put(resp)


class Ads:
    """The AggregatedDiscoveryService servicer."""

    def __init__(self, store, auth):
        self.store = store
        self.auth = auth

    def DeltaAggregatedResources(self, request_iterator, context):
        md = self.auth.check(context, "ads")
        if md is None:
            return
        stream = Stream(self.store, context.peer())
        emit({"event": "connect", "stream": stream.id, "peer": context.peer(), "clusterid": md.get("clusterid", "")})
        with self.store.lock:
            self.store.streams.add(stream)
        context.add_callback(lambda: stream.out.put(None))

        def read():
            reason = "client closed"
            try:
                for req in request_iterator:
                    stream.handle(req)
            except Exception as e:  # the client cancelled or the connection broke
                reason = f"read: {e.__class__.__name__}"
            stream.out.put(None)
            emit({"event": "disconnect", "stream": stream.id, "reason": reason})

        threading.Thread(target=read, name=f"ads-{stream.id}", daemon=True).start()
        try:
            while True:
                item = stream.out.get()
                if item is None:
                    return
                if isinstance(item, tuple) and item[0] is CLOSE:
                    code = item[1]
                    emit({"event": "disconnect", "stream": stream.id, "reason": "closed by command",
                          "code": code.name})
                    context.abort(code, "fake istiod: stream closed")
                yield item
        finally:
            with self.store.lock:
                self.store.streams.discard(stream)


# ---------------------------------------------------------------------------------------------
# CA


class Ca:
    def __init__(self, cert_path, key_path, max_ttl):
        with open(cert_path, "rb") as f:
            self.root_pem = f.read()
        with open(key_path, "rb") as f:
            self.key = serialization.load_pem_private_key(f.read(), password=None)
        self.cert = x509.load_pem_x509_certificate(self.root_pem)
        self.max_ttl = max_ttl
        self.fail_next = 0
        self.extra_roots = b""
        self.lock = threading.Lock()

    def issue(self, public_key, sans, ttl, server=False, subject=None):
        now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
        eku = [ExtendedKeyUsageOID.SERVER_AUTH] + ([] if server else [ExtendedKeyUsageOID.CLIENT_AUTH])
        b = (
            x509.CertificateBuilder()
            .subject_name(subject or x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(seconds=ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_encipherment=True,
                    content_commitment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(eku), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=subject is None)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        return b.sign(self.key, hashes.SHA256())

    def server_material(self, names):
        """A serving certificate for istiod's names (DNS or IP), and its key."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "istiod")])
        cert = self.issue(key.public_key(), sans, 10 * 365 * 86400, server=True, subject=subject)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return key_pem, cert.public_bytes(serialization.Encoding.PEM)


class CertService:
    """The IstioCertificateService servicer."""

    def __init__(self, ca, auth):
        self.ca = ca
        self.auth = auth

    def CreateCertificate(self, request, context):
        md = self.auth.check(context, "ca")
        if md is None:
            return None
        with self.ca.lock:
            failing = self.ca.fail_next > 0
            if failing:
                self.ca.fail_next -= 1
        if failing:
            emit({"event": "csr-error", "peer": context.peer(), "error": "injected failure"})
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake istiod: injected CA failure")
        try:
            csr = x509.load_pem_x509_csr(request.csr.encode())
            if not csr.is_signature_valid:
                raise ValueError("CSR signature does not verify")
        except Exception as e:
            emit({"event": "csr-error", "peer": context.peer(), "error": f"bad CSR: {e}"})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad CSR: {e}")
        impersonated = ""
        if request.HasField("metadata"):
            v = request.metadata.fields.get("ImpersonatedIdentity")
            if v is not None:
                impersonated = v.string_value
        identity = impersonated
        if not identity:
            try:
                ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                uris = ext.value.get_values_for_type(x509.UniformResourceIdentifier)
                identity = uris[0] if uris else ""
            except x509.ExtensionNotFound:
                identity = ""
        if not identity.startswith("spiffe://"):
            emit({"event": "csr-error", "peer": context.peer(), "error": "no SPIFFE identity"})
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the CSR names no spiffe:// identity")
        ttl = request.validity_duration if request.validity_duration > 0 else 86400
        if self.ca.max_ttl:
            ttl = min(ttl, self.ca.max_ttl)
        cert = self.ca.issue(csr.public_key(), [x509.UniformResourceIdentifier(identity)], ttl)
        emit(
            {
                "event": "csr",
                "peer": context.peer(),
                "identity": identity,
                "impersonated": bool(impersonated),
                "requested_ttl": request.validity_duration,
                "ttl": ttl,
                "serial": format(cert.serial_number, "x"),
                "not_after": cert.not_valid_after_utc.isoformat(),
            }
        )
        leaf = cert.public_bytes(serialization.Encoding.PEM).decode()
        root = self.ca.root_pem if self.ca.root_pem.endswith(b"\n") else self.ca.root_pem + b"\n"
        with self.ca.lock:
            bundle = root + self.ca.extra_roots
        return PB["ca_pb2"].IstioCertificateResponse(cert_chain=[leaf, bundle.decode()])


# ---------------------------------------------------------------------------------------------


def main():
    global PB
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default="0.0.0.0:15012", help="address to serve on (port 0: any)")
    p.add_argument("--ca-cert", required=True, help="the test CA's certificate (PEM)")
    p.add_argument("--ca-key", required=True, help="the test CA's private key (PEM)")
    p.add_argument(
        "--san",
        action="append",
        default=[],
        help="a DNS name or IP of the serving certificate (repeatable; "
        "default istiod.istio-system.svc, localhost, 127.0.0.1)",
    )
    p.add_argument("--resources", default="", help="JSON file of the resources to serve (watched)")
    p.add_argument("--token", action="append", default=[], help="an accepted bearer token (repeatable)")
    p.add_argument("--max-ttl", type=int, default=0, help="cap on certificate lifetimes, seconds (0: none)")
    args = p.parse_args()

    PB = compile_protos()
    ca = Ca(args.ca_cert, args.ca_key, args.max_ttl)
    sans = args.san or ["istiod.istio-system.svc", "localhost", "127.0.0.1"]
    key_pem, cert_pem = ca.server_material(sans)
    store = Store(args.resources)
    store.reload(force=True)
    auth = Auth(args.token)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    PB["discovery_pb2_grpc"].add_AggregatedDiscoveryServiceServicer_to_server(Ads(store, auth), server)
    PB["ca_pb2_grpc"].add_IstioCertificateServiceServicer_to_server(CertService(ca, auth), server)
    port = server.add_secure_port(args.listen, grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    if port == 0:
        raise SystemExit(f"fake_istiod: cannot listen on {args.listen}")
    server.start()
    host = args.listen.rsplit(":", 1)[0]
    emit({"event": "listening", "addr": f"{host}:{port}", "sans": sans})

    stop = threading.Event()

    def watch():
        while not stop.wait(0.1):
            store.reload()

    threading.Thread(target=watch, name="watch", daemon=True).start()
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "reload":
            store.reload(force=True)
        elif words[0] == "close" and len(words) <= 2:
            code = grpc.StatusCode.UNAVAILABLE
            if len(words) == 2:
                code = {"cancelled": grpc.StatusCode.CANCELLED}.get(words[1])
            if code is None:
                emit({"event": "error", "detail": f"unknown close code: {words[1]}"})
                continue
            with store.lock:
                streams = list(store.streams)
            for s in streams:
                s.out.put((CLOSE, code))
        elif words[0] == "ca-fail" and len(words) == 2:
            with ca.lock:
                ca.fail_next = int(words[1])
        elif words[0] == "ca-bundle-add" and len(words) == 2:
            with open(words[1], "rb") as f:
                extra = f.read()
            with ca.lock:
                ca.extra_roots += extra if extra.endswith(b"\n") else extra + b"\n"
            emit({"event": "bundle", "roots": ca.extra_roots.count(b"BEGIN CERTIFICATE") + 1})
        elif words[0] == "quit":
            break
        else:
            emit({"event": "error", "detail": f"unknown command: {line.strip()}"})
    # `quit`, or stdin closed (whoever started this is gone): stop.
    stop.set()
    server.stop(grace=0.5).wait()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        time.sleep(0)
