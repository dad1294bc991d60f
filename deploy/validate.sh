#!/usr/bin/env bash
# Offline validation of the deployment material (used by CI):
#   (a) deploy/kubernetes/*.yaml against the Kubernetes JSON schemas (kubernetes-validate --strict)
#   (b) systemd-analyze verify on deploy/systemd/tlsplice.service
#   (c) the ConfigMap's embedded tlsplice.toml equals deploy/examples/node.toml byte for byte
#   (d) the live-upgrade (takeover) wiring of the DaemonSet and of the systemd template
#
# Usage: deploy/validate.sh [PATH_TO_TLSPLICE_BINARY]
#   The binary only has to exist and be executable: systemd-analyze checks ExecStart's path.
#   Default: target/release/tlsplice, else target/debug/tlsplice.
#
# The first run creates a venv with kubernetes-validate under
# ${TLSPLICE_CACHE:-$HOME/.cache/tlsplice} (needs the package index once); later runs need no
# network. Prints one line per check (ok/FAIL) and exits non-zero if any failed.
set -euo pipefail

KV_VERSION=1.37.0   # kubernetes-validate, pinned
K8S_VERSION=1.33.0  # schemas validated against (bundled with kubernetes-validate 1.37.0)
# Its dependencies, pinned too so that CI runs are reproducible (known good on Python 3.11).
KV_DEPS=(PyYAML==6.0.4 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
    rpds-py==2026.9.1 attrs==26.1.0 importlib_resources==7.1.0 packaging==26.4
    typing_extensions==4.16.0)

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cache=${TLSPLICE_CACHE:-$HOME/.cache/tlsplice}
venv=$cache/venv-kubernetes-validate
failed=0

ok() { printf 'ok   %s\n' "$1"; }
fail() {
    printf 'FAIL %s\n' "$1"
    failed=1
}
# Indented detail under a check line.
detail() { sed 's/^/     | /'; }

# --- (a) Kubernetes manifests ------------------------------------------------------------
ensure_venv() {
    if [[ -x $venv/bin/kubernetes-validate ]] &&
        [[ $("$venv/bin/python" -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null) == "$KV_VERSION" ]]; then
        return 0
    fi
    echo "setting up $venv (kubernetes-validate==$KV_VERSION)" >&2
    if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        # Debian/Ubuntu ship venv's ensurepip in a separate package.
        if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
            echo "python3 venv support missing: running apt-get install -y python3-venv" >&2
            apt-get update -qq >&2 && apt-get install -y -qq python3-venv >&2
        else
            echo "python3 venv support missing: install python3-venv (as root)" >&2
            return 1
        fi
    fi
    mkdir -p "$cache"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 &&
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "kubernetes-validate==$KV_VERSION" "${KV_DEPS[@]}" >&2
}

manifests=("$here"/kubernetes/*.yaml)
setup_rc=0
setup_log=$(ensure_venv 2>&1) || setup_rc=$?
if [[ $setup_rc != 0 ]]; then
    fail "kubernetes: could not set up kubernetes-validate in $venv"
    printf '%s\n' "$setup_log" | detail
else
    # First run only: say what was set up (on stderr, before the check's line).
    if [[ -n $setup_log ]]; then printf '%s\n' "$setup_log" >&2; fi
fi
if [[ $setup_rc != 0 ]]; then
    :
elif out=$("$venv/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${manifests[@]}" 2>&1); then
    # It exits 0 on success; also refuse any line that is not an INFO success line.
    if bad=$(printf '%s\n' "$out" | grep -v '^INFO ' | grep -v '^$'); then
        fail "kubernetes: kubernetes-validate $KV_VERSION --strict -k $K8S_VERSION printed unexpected output"
        printf '%s\n' "$bad" | detail
    else
        ok "kubernetes: ${#manifests[@]} manifest file(s), $(printf '%s\n' "$out" | grep -c '^INFO ') resource(s) valid (kubernetes-validate $KV_VERSION --strict, Kubernetes $K8S_VERSION)"
    fi
else
    fail "kubernetes: kubernetes-validate $KV_VERSION --strict -k $K8S_VERSION"
    printf '%s\n' "$out" | detail
fi

# --- (b) systemd unit ----------------------------------------------------------------------
bin=${1:-}
if [[ -z $bin ]]; then
    for c in "$root/target/release/tlsplice" "$root/target/debug/tlsplice"; do
        if [[ -x $c ]]; then
            bin=$c
            break
        fi
    done
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# unit file, and the name it is verified under (a template is verified as an instance)
for pair in "tlsplice.service:tlsplice.service" "tlsplice@.service:tlsplice@a.service"; do
    file=${pair%%:*} name=${pair##*:}
    unit=$here/systemd/$file
    if ! command -v systemd-analyze >/dev/null; then
        fail "systemd: systemd-analyze not found"
    elif [[ -z $bin || ! -x $bin ]]; then
        fail "systemd: no executable tlsplice binary (${bin:-none found}); pass its path as \$1"
    else
        bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
        # The unit's name is kept; only ExecStart's binary is swapped.
        sed "s|^ExecStart=/usr/local/bin/tlsplice |ExecStart=$bin |" "$unit" >"$tmp/$file"
        if [[ $file != "$name" ]]; then ln -sf "$tmp/$file" "$tmp/$name"; fi
        if ! grep -q "^ExecStart=$bin " "$tmp/$file"; then
            fail "systemd: ExecStart in $unit is not /usr/local/bin/tlsplice ..."
        else
            rc=0
            out=$(cd "$tmp" && systemd-analyze verify "$tmp/$name" 2>&1) || rc=$?
            # systemd-analyze exits 0 on many warnings (unknown keys, bad values): any line
            # about the unit is a failure.
            if [[ $rc != 0 ]] || printf '%s\n' "$out" | grep -q 'tlsplice@\?a\?\.service'; then
                fail "systemd: systemd-analyze verify $name (rc=$rc)"
                printf '%s\n' "$out" | detail
            else
                ok "systemd: systemd-analyze verify $name (ExecStart=$bin)"
            fi
        fi
    fi
done

# --- (c) ConfigMap embeds deploy/examples/node.toml ------------------------------------------
# Extract the ConfigMap's tlsplice.toml with the same YAML parser the venv has (PyYAML).
py=$venv/bin/python
[[ -x $py ]] || py=python3
if out=$("$py" - "$here/kubernetes/tlsplice.yaml" "$here/examples/node.toml" 2>&1 <<'PY'
import sys, yaml
manifest, example = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(manifest, encoding="utf-8")) if d]
cms = [d for d in docs if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "tlsplice-config"]
if len(cms) != 1:
    sys.exit(f"expected one ConfigMap tlsplice-config, found {len(cms)}")
embedded = cms[0].get("data", {}).get("tlsplice.toml")
if embedded is None:
    sys.exit("ConfigMap tlsplice-config has no key tlsplice.toml")
want = open(example, "rb").read()
got = embedded.encode("utf-8")
if got != want:
    import difflib
    diff = difflib.unified_diff(want.decode().splitlines(True), embedded.splitlines(True),
                                "deploy/examples/node.toml", "ConfigMap tlsplice-config tlsplice.toml")
    sys.exit("".join(diff) or f"differ in bytes only (lengths {len(want)} vs {len(got)})")
PY
); then
    ok "configmap: tlsplice-config tlsplice.toml equals deploy/examples/node.toml"
else
    fail "configmap: tlsplice-config tlsplice.toml differs from deploy/examples/node.toml"
    printf '%s\n' "$out" | detail
fi

# --- (d) live-upgrade (takeover) wiring -------------------------------------------------
if out=$("$py" - "$here/kubernetes/tlsplice.yaml" 2>&1 <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1], encoding="utf-8")) if d]
ds = [d for d in docs if d.get("kind") == "DaemonSet"]
if len(ds) != 1:
    sys.exit(f"expected one DaemonSet, found {len(ds)}")
spec = ds[0]["spec"]
problems = []
update = spec.get("updateStrategy", {})
rolling = update.get("rollingUpdate", {})
if update.get("type") != "RollingUpdate" or rolling.get("maxSurge") != 1 or rolling.get("maxUnavailable") != 0:
    problems.append(f"updateStrategy must be RollingUpdate with maxSurge 1, maxUnavailable 0: {update}")
pod = spec["template"]["spec"]
container = [c for c in pod["containers"] if c["name"] == "tlsplice"][0]
if container.get("ports"):
    problems.append("the container declares ports: with hostNetwork they are host ports and block the surge pod")
env = {e["name"]: e.get("value") for e in container.get("env", [])}
offer, take = env.get("TLSPLICE_TAKEOVER_SOCKET"), env.get("TLSPLICE_TAKEOVER")
if not offer or offer != take:
    problems.append(f"TLSPLICE_TAKEOVER_SOCKET ({offer}) and TLSPLICE_TAKEOVER ({take}) must name the same socket")
if env.get("TLSPLICE_AFTER_TAKEOVER") != "wait":
    problems.append("TLSPLICE_AFTER_TAKEOVER must be wait (an exited container would be restarted)")
volumes = {v["name"]: v for v in pod.get("volumes", [])}
mounted = [m for m in container.get("volumeMounts", [])
           if offer and offer.startswith(m["mountPath"].rstrip("/") + "/")
           and "hostPath" in volumes.get(m["name"], {})]
if not mounted:
    problems.append(f"the takeover socket {offer} is not inside a hostPath volume both pods share")
if problems:
    sys.exit("\n".join(problems))
PY
); then
    ok "takeover: the DaemonSet surges one pod, shares the takeover socket on a hostPath and waits after a takeover"
else
    fail "takeover: the DaemonSet's live-upgrade wiring"
    printf '%s\n' "$out" | detail
fi
template=$here/systemd/tlsplice@.service
exec_start=$(grep '^ExecStart=' "$template" || true)
offer=$(printf '%s\n' "$exec_start" | sed -n 's/.*--takeover-socket \([^ ]*\).*/\1/p')
take=$(printf '%s\n' "$exec_start" | sed -n 's/.*--takeover \([^ ]*\).*/\1/p')
runtime=$(sed -n 's/^RuntimeDirectory=//p' "$template")
if [[ -n $offer && $offer == "$take" && $offer == /run/$runtime/* ]] &&
    grep -q '^RuntimeDirectoryPreserve=yes$' "$template" &&
    sh -n "$here/systemd/tlsplice-upgrade"; then
    ok "takeover: tlsplice@.service offers and takes over through $offer in its preserved RuntimeDirectory; tlsplice-upgrade parses"
else
    fail "takeover: tlsplice@.service must pass the same --takeover-socket and --takeover inside /run/\$RuntimeDirectory with RuntimeDirectoryPreserve=yes, and tlsplice-upgrade must parse (sh -n)"
fi

# The alerting rules: promtool (from Debian's prometheus package; `cargo xtask bootstrap`
# installs it) parses every expression. That each metric they and the dashboard use is one the
# agent exports is checked against a live agent (tests/tests/policy.rs).
rules=$here/monitoring/tlsplice-alerts.yaml
if out=$(promtool check rules "$rules" 2>&1); then
    ok "monitoring: promtool check rules: $(printf '%s\n' "$out" | grep -o '[0-9]* rules found')"
else
    fail "monitoring: promtool check rules $rules"
    printf '%s\n' "$out" | detail
fi
if out=$(python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"], "no panels"; print(len(d["panels"]))' "$here/monitoring/tlsplice-dashboard.json" 2>&1); then
    ok "monitoring: the Grafana dashboard parses ($out panels)"
else
    fail "monitoring: deploy/monitoring/tlsplice-dashboard.json"
    printf '%s\n' "$out" | detail
fi

exit "$failed"
