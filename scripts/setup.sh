#!/usr/bin/env bash
# Prepare a Debian bookworm machine (as root) for lamina development and CI.
#
#   bash scripts/setup.sh
#
# Idempotent and fast on an already set-up machine:
#   1. apt packages (apt-get update + install only when something is missing),
#      without leaving containerd / docker-registry services running: the tests
#      start their own private containerd instances.
#   2. the project itself, editable, with dev extras, into its own venv /opt/lamina
#      made with Debian's /usr/bin/python3; /usr/local/bin/lamina links to its
#      console script (re-done whenever this checkout or pyproject.toml changed).
#      Its bash completion and man page (lamina(1)) are installed with it.
#   3. CRIU >= 4.1 (scripts/build-criu.sh) when `criu check` is not happy.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_DIR=/var/cache/lamina
export DEBIAN_FRONTEND=noninteractive

log() { printf '[setup] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"
mkdir -p "$STATE_DIR"

# --- 1. apt packages ---------------------------------------------------------
PACKAGES=(
    # runtime tools the tests drive
    containerd runc criu umoci skopeo docker-registry debootstrap erofs-utils strace
    containernetworking-plugins  # CNI for the CRI tests (bridge, host-local, loopback)
    zstd pigz xz-utils tar iproute2 git python3-venv ca-certificates
    util-linux mount e2fsprogs attr libcap2-bin procps kmod
    debian-archive-keyring systemd uidmap
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
# lamina lives in its own virtual environment, made with Debian's interpreter
# (/usr/bin/python3, explicitly: not whichever python3 comes first on PATH, such
# as a pyenv shim), so neither PEP 668 nor a missing pip matters; the console
# script is linked into /usr/local/bin, which Debian's PATH for root contains.
#
# The install is editable: the venv imports lamina from this checkout's src/.
# The tests run in-process from src/ (pytest's pythonpath) *and* start
# `python -m lamina` subprocesses with the venv's interpreter; an editable
# install makes both the same code, so an edit is tested without re-installing.
# The price: /opt/lamina follows the checkout it was installed from; running
# setup from another checkout (CI's clone) re-points it (the check below).
VENV=${LAMINA_VENV:-/opt/lamina}
SYS_PY=/usr/bin/python3
[[ -x $SYS_PY ]] || die "$SYS_PY not found (apt-get install python3)"
"$SYS_PY" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "$SYS_PY must be Python >= 3.11"
VPY=$VENV/bin/python
sys_version=$("$SYS_PY" -c 'import sys; print(sys.version)')
venv_ok() {
    [[ -x $VPY ]] && grep -qx 'home = /usr/bin' "$VENV/pyvenv.cfg" 2>/dev/null \
        && [[ $("$VPY" -c 'import sys; print(sys.version)' 2>/dev/null) == "$sys_version" ]] \
        && "$VPY" -m pip --version >/dev/null 2>&1
}
if ! venv_ok; then
    log "python: creating $VENV with $SYS_PY ($("$SYS_PY" --version))"
    rm -rf "$VENV"
    "$SYS_PY" -m venv "$VENV"
fi
stamp_key=$(printf '%s\n%s\n%s\n' "$REPO" "$sys_version" \
    "$(sha256sum "$REPO/pyproject.toml" | cut -d' ' -f1)" | sha256sum | cut -d' ' -f1)
stamp="$STATE_DIR/venv-$stamp_key"
lamina_dir() {
    (cd / && env -u PYTHONPATH "$VPY" -c 'import lamina, os; print(os.path.dirname(lamina.__file__))')
}
installed_from=$(lamina_dir 2>/dev/null) || installed_from=""
if [[ -f "$stamp" && "$installed_from" == "$REPO/src/lamina" && -x $VENV/bin/lamina ]]; then
    log "python: lamina already installed in $VENV (editable, from $REPO)"
else
    log "python: $VENV/bin/pip install -e '${REPO}[dev]'"
    rm -f "$STATE_DIR"/venv-*
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PIP_NO_INPUT=1 \
        "$VPY" -m pip install -q -e "${REPO}[dev]"
    installed_from=$(lamina_dir)
    [[ "$installed_from" == "$REPO/src/lamina" ]] \
        || die "lamina imports from $installed_from, expected $REPO/src/lamina"
    touch "$stamp"
fi
ln -sfn "$VENV/bin/lamina" /usr/local/bin/lamina
hash -r
# Debian's PATH for root (/etc/profile) has /usr/local/bin; so has sudo's secure_path.
[[ $(env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        sh -c 'command -v lamina') == /usr/local/bin/lamina ]] \
    || die "lamina on the default root PATH is not /usr/local/bin/lamina"
# An editable install ships no bytecode; compile it once so every `lamina` start
# does not recompile the package (matters where PYTHONDONTWRITEBYTECODE is set).
"$VPY" -m compileall -q "$REPO/src/lamina" >/dev/null

# bash completion (made from the parser: it follows the checkout) and the man page
# (docs/lamina.1, made by scripts/manpage.py), where this machine keeps them.
for dir in /usr/share/bash-completion/completions /etc/bash_completion.d; do
    if [[ -d $dir ]]; then
        "$VENV/bin/lamina" completion bash >"$STATE_DIR/lamina.bash"
        install -m 0644 "$STATE_DIR/lamina.bash" "$dir/lamina"
        break
    fi
done
install -D -m 0644 "$REPO/docs/lamina.1" /usr/local/share/man/man1/lamina.1

# --- 3. CRIU -----------------------------------------------------------------
hash -r
if criu check 2>&1 | grep -q "Looks good"; then
    log "criu: $(command -v criu) looks good"
else
    log "criu: '$(command -v criu || echo none)' fails 'criu check'; building CRIU"
    bash "$REPO/scripts/build-criu.sh"
fi

# --- 4. the service (systemd machines only) -----------------------------------
# lamina.service runs `lamina serve` (Type=notify); containerd's drop-in makes
# containerd start after it; contrib/containerd/lamina.toml (what
# `lamina config containerd` prints) is imported by containerd's config.toml.
# Installed, not enabled: this machine's tests run their own servers.
if have_systemd; then
    install -D -m 0644 "$REPO/contrib/systemd/lamina.service" /etc/systemd/system/lamina.service
    install -D -m 0644 "$REPO/contrib/systemd/containerd.service.d/lamina.conf" \
        /etc/systemd/system/containerd.service.d/lamina.conf
    install -D -m 0644 "$REPO/contrib/containerd/lamina.toml" /etc/containerd/conf.d/lamina.toml
    cfg=/etc/containerd/config.toml
    if [[ -f $cfg ]] && ! grep -q '^imports *=' "$cfg"; then
        # top-level keys must come before the first table: put it first
        { echo 'imports = ["/etc/containerd/conf.d/*.toml"]'; cat "$cfg"; } >"$cfg.lamina-tmp"
        mv "$cfg.lamina-tmp" "$cfg"
    elif [[ -f $cfg ]] && ! grep -q 'conf\.d' "$cfg"; then
        log "note: $cfg has its own imports; add /etc/containerd/conf.d/lamina.toml to them"
    fi
    systemctl daemon-reload
    log "service: lamina.service installed (start it: systemctl enable --now lamina)"
else
    log "service: no systemd here; units not installed (they are in contrib/systemd)"
fi

log "done"
