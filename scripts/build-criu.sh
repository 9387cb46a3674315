#!/usr/bin/env bash
# Build CRIU 4.1.1 from Debian trixie's source package and install it to
# /usr/local/sbin/criu (ahead of /usr/sbin in PATH, which is where runc looks).
#
# Why: bookworm's criu 3.17 fails `criu check` on recent kernels with
# "vdso: Unexpected rt vDSO area bounds" (fixed upstream in 4.1).
#
# The system apt configuration is never modified: trixie's deb-src entry lives
# in a private sources list with private state/cache directories. The Debian
# mirror is derived from the machine's own apt sources (override with
# LAMINA_DEBIAN_MIRROR).
#
# Idempotent: the built binary is cached in $LAMINA_CRIU_CACHE (default
# /var/cache/lamina/criu-4.1.1); a re-run only re-installs and verifies it.
set -euo pipefail

CRIU_VERSION="${CRIU_VERSION:-4.1.1}"
CACHE_DIR="${LAMINA_CRIU_CACHE:-/var/cache/lamina/criu-${CRIU_VERSION}}"
PREFIX_BIN="/usr/local/sbin/criu"
SRC_SUITE="${CRIU_SRC_SUITE:-trixie}"

log() { printf '[build-criu] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root"

# --- derive the Debian mirror from the machine's apt config -----------------
debian_mirror() {
    if [[ -n "${LAMINA_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "${LAMINA_DEBIAN_MIRROR%/}"
        return
    fi
    local f
    # deb822 *.sources: a stanza with Types: deb and a plain "bookworm" suite.
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        awk '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && suites ~ /(^| )bookworm( |$)/ && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; suites = ""; uris = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"  { $1 = ""; types = $0 }
            tolower($1) == "suites:" { $1 = ""; suites = $0 }
            tolower($1) == "uris:"   { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
            END { if (!found) flush() }
        ' "$f"
    done
    # one-line style: deb [opts] URI bookworm main ...
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        sed -E -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" \
            | awk '$1 == "deb" && $3 == "bookworm" { print $2 }'
    done
}

criu_looks_good() {
    local bin="$1" out
    out=$("$bin" check 2>&1) || true
    [[ "$out" == *"Looks good"* ]]
}

install_cached() {
    install -D -m 0755 "$CACHE_DIR/criu" "$PREFIX_BIN"
    hash -r
}

verify() {
    local found
    found=$(command -v criu || true)
    [[ "$found" == "$PREFIX_BIN" ]] \
        || die "'command -v criu' is '$found', expected $PREFIX_BIN (check PATH order)"
    # runc runs `criu` via PATH too: check with the PATH a root shell would use.
    found=$(env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        sh -c 'command -v criu')
    [[ "$found" == "$PREFIX_BIN" ]] || die "criu on the default root PATH is '$found'"
    "$PREFIX_BIN" --version | head -n1 >&2
    local out
    out=$("$PREFIX_BIN" check 2>&1) || true
    if [[ "$out" != *"Looks good"* ]]; then
        printf '%s\n' "$out" >&2
        die "criu check does not look good"
    fi
    log "criu check: Looks good."
}

# --- fast path: cached binary ------------------------------------------------
if [[ -x "$CACHE_DIR/criu" ]] && "$CACHE_DIR/criu" --version 2>/dev/null \
        | grep -q "Version: ${CRIU_VERSION}"; then
    log "using cached $CACHE_DIR/criu"
    install_cached
    verify
    exit 0
fi

# --- build dependencies ------------------------------------------------------
BUILD_DEPS=(
    build-essential pkg-config xz-utils dpkg-dev
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
    python3-protobuf libbsd-dev libnftables-dev libcap-dev libnl-3-dev
    libnet1-dev libaio-dev libgnutls28-dev uuid-dev libdrm-dev
)
missing=()
for p in "${BUILD_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
        || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing build deps: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi

# --- fetch the source via a private apt configuration ------------------------
MIRROR=$(debian_mirror | head -n1)
[[ -n "$MIRROR" ]] || die "no bookworm mirror found in apt sources; set LAMINA_DEBIAN_MIRROR"
MIRROR="${MIRROR%/}"
log "mirror: $MIRROR  suite: $SRC_SUITE"

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -f "$KEYRING" ]] || die "missing $KEYRING (install debian-archive-keyring)"

WORK=$(mktemp -d /var/tmp/lamina-criu-build.XXXXXX)
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

APTDIR="$WORK/apt"
mkdir -p "$APTDIR/lists/partial" "$APTDIR/cache/archives/partial" "$APTDIR/sources.d"
cat >"$APTDIR/sources.list" <<EOF
deb-src [signed-by=$KEYRING] $MIRROR $SRC_SUITE main
EOF
APT_OPTS=(
    -o "Dir::Etc::sourcelist=$APTDIR/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::State::Lists=$APTDIR/lists"
    -o "Dir::Cache=$APTDIR/cache"
    -o "APT::Get::List-Cleanup=0"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
)
log "apt-get update (private, $SRC_SUITE deb-src only)"
apt-get "${APT_OPTS[@]}" update -q >&2

SRC="$WORK/src"
mkdir -p "$SRC"
log "apt-get source --download-only criu ($SRC_SUITE; expecting $CRIU_VERSION)"
# The debian.tar.xz part may be missing on some mirrors; the orig tarball is
# all we need, so tolerate a failed download as long as that file arrived.
(cd "$SRC" && apt-get "${APT_OPTS[@]}" source --download-only -q criu >&2) \
    || log "apt-get source reported an error (checking for the orig tarball anyway)"
ORIG=$(find "$SRC" -maxdepth 1 -name "criu_${CRIU_VERSION}.orig.tar.*" -print -quit)
[[ -n "$ORIG" && -s "$ORIG" ]] || die "criu_${CRIU_VERSION}.orig.tar.* was not downloaded"
log "got $(basename "$ORIG")"

# Verify the tarball against the (signature-checked) Sources index.
want=$(apt-get "${APT_OPTS[@]}" source --print-uris -q criu 2>/dev/null \
    | awk -v f="$(basename "$ORIG")" '$2 == f { print $4 }' | head -n1)
if [[ "$want" == SHA256:* ]]; then
    got=$(sha256sum "$ORIG" | awk '{print $1}')
    [[ "$got" == "${want#SHA256:}" ]] || die "checksum mismatch for $ORIG"
    log "sha256 verified"
else
    log "no SHA256 in --print-uris output (apt already verified the download)"
fi

# --- build -------------------------------------------------------------------
tar -C "$WORK" -xf "$ORIG"
TREE=$(find "$WORK" -maxdepth 1 -type d -name "criu-${CRIU_VERSION}*" -print -quit)
[[ -n "$TREE" ]] || die "unpacked tree criu-${CRIU_VERSION} not found"
log "building in $TREE with $(nproc) jobs"
start=$SECONDS
make -C "$TREE" -j"$(nproc)" criu >"$WORK/build.log" 2>&1 || {
    tail -n 60 "$WORK/build.log" >&2
    die "make criu failed"
}
log "built in $((SECONDS - start)) s"
BIN="$TREE/criu/criu"
[[ -x "$BIN" ]] || die "no binary at $BIN"
criu_looks_good "$BIN" || { "$BIN" check >&2 || true; die "freshly built criu fails 'criu check'"; }

mkdir -p "$CACHE_DIR"
install -m 0755 "$BIN" "$CACHE_DIR/criu.tmp"
mv -f "$CACHE_DIR/criu.tmp" "$CACHE_DIR/criu"
install_cached
verify
