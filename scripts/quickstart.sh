#!/usr/bin/env bash
# README command 1: install everything (scripts/setup.sh), then run lamina's main job
# end to end on the default root (scripts/demo.sh). Run as root on Debian bookworm.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
bash scripts/demo.sh
