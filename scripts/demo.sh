#!/usr/bin/env bash
# lamina's main job, end to end, on the default root (/var/lib/lamina, or $LAMINA_ROOT):
#   1. snapshots by hand: prepare -> mount -> write -> commit, three layers, then a view
#   2. images: build two tiny images from this machine's binaries, import and unpack them
#   3. containers: run one; upgrade a container keeping its writes; roll it back
#   4. checkpoint a counting container with CRIU and restore it
#   5. clean up and garbage-collect
# Run as root after scripts/setup.sh (scripts/quickstart.sh does both).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
ID=demo-$(date +%s)
PY=${LAMINA_PYTHON:-/opt/lamina/bin/python}  # the interpreter lamina is installed in
WORK=$(mktemp -d /var/tmp/lamina-demo.XXXXXX)
MNT=$WORK/mnt
mkdir -p "$MNT"
cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    lamina task delete --force "$ID-svc" "$ID-count" "$ID-restored" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# Nothing references hand-made snapshots, so they carry containerd's gc.root label:
# without it, the garbage collection that `container rm` runs would take them.
KEEP=(--label containerd.io/gc.root=demo)
say "1. three layers by hand (root: $(lamina snapshot ls >/dev/null; echo "${LAMINA_ROOT:-/var/lib/lamina}"))"
run lamina snapshot prepare "$ID-1-active"
run lamina snapshot mount "$MNT" "$ID-1-active"
echo "hello from layer 1" > "$MNT/hello"; mkdir "$MNT/etc"; echo 1 > "$MNT/etc/version"
run lamina snapshot unmount "$MNT"
run lamina snapshot commit "${KEEP[@]}" "$ID-1" "$ID-1-active"
run lamina snapshot prepare "$ID-2-active" "$ID-1"
run lamina snapshot mount "$MNT" "$ID-2-active"
echo 2 > "$MNT/etc/version"; rm "$MNT/hello"; echo "added in layer 2" > "$MNT/two"
run lamina snapshot unmount "$MNT"
run lamina snapshot commit "${KEEP[@]}" "$ID-2" "$ID-2-active"
run lamina snapshot prepare "$ID-3-active" "$ID-2"
run lamina snapshot mount "$MNT" "$ID-3-active"
mkdir -p "$MNT/data"; seq 1 1000 > "$MNT/data/numbers"
run lamina snapshot unmount "$MNT"
run lamina snapshot commit "${KEEP[@]}" "$ID-3" "$ID-3-active"
run lamina snapshot view "${KEEP[@]}" "$ID-view" "$ID-3"
run lamina snapshot mount "$MNT" "$ID-view"
run ls -l "$MNT"
printf 'etc/version = %s (layer 2 overrides layer 1); hello removed by layer 2: %s\n' \
    "$(cat "$MNT/etc/version")" "$([ -e "$MNT/hello" ] && echo no || echo yes)"
if touch "$MNT/nope" 2>/dev/null; then echo "ERROR: a view was writable"; exit 1; fi
echo "writing into the view fails: read-only file system (as it must)"
run lamina snapshot unmount "$MNT"
run lamina snapshot tree
run lamina snapshot usage "$ID-1" "$ID-2" "$ID-3"
run lamina snapshot diff --print-descriptor "$ID-3" "$ID-1"

say "2. images"
run "$PY" scripts/demo_image.py "$WORK/v1.tar" demo:v1 --file /etc/motd="image v1"
run "$PY" scripts/demo_image.py "$WORK/v2.tar" demo:v2 --file /etc/motd="image v2" \
    --file /usr/share/new-in-v2="only in v2"
run lamina image import "$WORK/v1.tar"
run lamina image import "$WORK/v2.tar"
run lamina image ls

say "3. containers"
run lamina run --rm --name "$ID-hello" demo:v1 /bin/sh -c 'echo "hello from a lamina container"; cat /etc/motd'
run lamina container create demo:v1 "$ID-svc" \
    /bin/sh -c 'date >> /state; echo "state has $(cat /state | wc -l) line(s)"; cat /etc/motd'
run lamina task start "$ID-svc"
run lamina container upgrade "$ID-svc" demo:v2
run lamina task start "$ID-svc"
run lamina container revisions "$ID-svc"
run lamina container rollback "$ID-svc"   # back to v1 with v1's writes (one line) only
run lamina task start "$ID-svc"

say "4. checkpoint and restore"
if criu check >/dev/null 2>&1; then
    run lamina container create demo:v1 "$ID-count" \
        /bin/sh -c 'i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.1; done'
    run lamina task start -d "$ID-count"
    sleep 1.5
    run lamina task exec "$ID-count" /bin/cat /count
    run lamina container checkpoint --exit "$ID-count" "checkpoint/$ID:1"
    run lamina container restore "checkpoint/$ID:1" "$ID-restored"
    sleep 1
    run lamina task exec "$ID-restored" /bin/cat /count
    run lamina task kill --signal KILL "$ID-restored"
    lamina task wait "$ID-restored" >/dev/null 2>&1 || true
    run lamina task delete --force "$ID-restored"
    run lamina container rm --force "$ID-count" "$ID-restored"
    run lamina image rm "checkpoint/$ID:1"
else
    echo "skipped: criu check fails on this machine (scripts/setup.sh builds CRIU 4.1)"
fi

say "5. clean up"
run lamina container rm "$ID-svc"
run lamina snapshot rm "$ID-view" "$ID-3" "$ID-2" "$ID-1"
run lamina image rm demo:v1 demo:v2
run lamina gc
run lamina check
say "done"
