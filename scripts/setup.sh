#!/usr/bin/env bash
# Prepare a Debian bookworm machine (as root) for lamina development and CI.
#
#   bash scripts/setup.sh
#
# Idempotent and fast on an already set-up machine:
#   1. apt packages (apt-get update + install only when something is missing),
#      without leaving containerd / docker-registry services running: the tests
#      start their own private containerd instances.
#   2. the project itself, editable, with dev extras, into the machine's python3
#      (re-done whenever this checkout or pyproject.toml changed).
#   3. CRIU >= 4.1 (scripts/build-criu.sh) when `criu check` is not happy.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
STATE_DIR=/var/cache/lamina
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
mkdir -p "$STATE_DIR"

# --- 1. apt packages ---------------------------------------------------------
PACKAGES=(
    # runtime tools the tests drive
    containerd runc criu umoci skopeo docker-registry debootstrap
    zstd pigz xz-utils tar iproute2 git python3-venv ca-certificates
    util-linux mount e2fsprogs attr libcap2-bin procps kmod
    debian-archive-keyring
    # CRIU build dependencies (scripts/build-criu.sh)
    build-essential pkg-config dpkg-dev
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
    python3-protobuf libbsd-dev libnftables-dev libcap-dev libnl-3-dev
    libnet1-dev libaio-dev libgnutls28-dev uuid-dev libdrm-dev
)
SERVICES=(containerd docker-registry)

have_systemd() { [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null; }

mapfile -t installed < <(dpkg-query -W -f='${Package} ${Status}\n' "${PACKAGES[@]}" 2>/dev/null \
    | awk '$NF == "installed" && $(NF-1) == "ok" { print $1 }')
missing=()
for p in "${PACKAGES[@]}"; do
    [[ " ${installed[*]} " == *" $p "* ]] || missing+=("$p")
done

if ((${#missing[@]})); then
    log "installing: ${missing[*]}"
    # Forbid maintainer scripts from starting services (Debian's policy-rc.d
    # mechanism, honoured by invoke-rc.d and deb-systemd-invoke).
    created_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 0755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    remove_policy() { if ((created_policy)); then rm -f /usr/sbin/policy-rc.d; fi; }
    trap remove_policy EXIT
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
    remove_policy
    trap - EXIT
else
    log "apt packages: all present"
fi

# Make sure no system containerd / registry is (or will be) running.
if have_systemd; then
    for s in "${SERVICES[@]}"; do
        if systemctl is-enabled --quiet "$s" 2>/dev/null \
                || systemctl is-active --quiet "$s" 2>/dev/null; then
            log "disabling system service $s"
            systemctl disable --now "$s" >/dev/null 2>&1 || true
        fi
    done
else
    # No systemd: sysvinit scripts may have started something.
    for s in "${SERVICES[@]}"; do
        if [[ -x /etc/init.d/$s ]] && /etc/init.d/"$s" status >/dev/null 2>&1; then
            log "stopping system service $s"
            /etc/init.d/"$s" stop >/dev/null 2>&1 || true
        fi
    done
fi
if [[ -S /run/containerd/containerd.sock ]] && ! have_systemd; then
    log "note: /run/containerd/containerd.sock exists (a system containerd may be running)"
fi

# --- 2. the project ----------------------------------------------------------
command -v "$PY" >/dev/null || die "$PY not found"
# Resolve shims (pyenv) once, from the repo dir, to the real interpreter.
PY=$(cd "$REPO" && "$PY" -c 'import sys; print(sys.executable)')
"$PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "$PY must be Python >= 3.11"
stamp_key=$(printf '%s\n%s\n%s\n' "$REPO" "$("$PY" -c 'import sys; print(sys.prefix)')" \
    "$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" | sha256sum | cut -d' ' -f1)
stamp="$STATE_DIR/pip-$stamp_key"
lamina_dir() {
    (cd / && "$PY" -c 'import lamina, os; print(os.path.dirname(lamina.__file__))')
}
installed_from=$(lamina_dir 2>/dev/null) || installed_from=""
if [[ -f "$stamp" && "$installed_from" == "$REPO/src/lamina" ]]; then
    log "python: lamina already installed editable from $REPO"
else
    log "python: pip install -e '${REPO}[dev]'"
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
        "$PY" -m pip install -q -e "${REPO}[dev]"
    installed_from=$(lamina_dir)
    [[ "$installed_from" == "$REPO/src/lamina" ]] \
        || die "lamina imports from $installed_from, expected $REPO/src/lamina"
    touch "$stamp"
fi
# An editable install ships no bytecode; compile it once so every `lamina` start
# does not recompile the package (matters where PYTHONDONTWRITEBYTECODE is set).
"$PY" -m compileall -q "$REPO/src/lamina" >/dev/null

# --- 3. CRIU -----------------------------------------------------------------
hash -r
if criu check 2>&1 | grep -q "Looks good"; then
    log "criu: $(command -v criu) looks good"
else
    log "criu: '$(command -v criu || echo none)' fails 'criu check'; building CRIU"
    bash "$REPO/scripts/build-criu.sh"
fi

log "done"
