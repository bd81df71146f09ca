#!/usr/bin/env bash
# Installs the system programs WhisperHub needs (apt-get when run as root),
# or names them when it cannot. Usage: install_system.sh run|test
set -euo pipefail

need=(ffmpeg:ffmpeg ffprobe:ffmpeg redis-server:redis-server)
if [ "${1:-run}" = test ]; then
  need+=(espeak-ng:espeak-ng chromium:chromium)
fi

missing=()
for pair in "${need[@]}"; do
  prog=${pair%%:*}; pkg=${pair#*:}
  command -v "$prog" >/dev/null 2>&1 || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

# unique package names
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "WhisperHub needs these system packages: ${missing[*]}" >&2
  echo "Install them (for example: sudo apt-get install ${missing[*]}) and run make again." >&2
  exit 1
fi
