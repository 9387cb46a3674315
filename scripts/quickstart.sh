#!/usr/bin/env bash
# README command 1: install everything (scripts/setup.sh), then run lamina's main job
# end to end on the default root (scripts/demo.sh). Run as root on Debian bookworm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
# The demo runs the lamina (and CRIU) setup just installed, even where PATH has
# another one first (a pyenv shim left by an older install, say).
export PATH="/usr/local/sbin:/usr/local/bin:$PATH"
hash -r
bash scripts/demo.sh
