#!/usr/bin/env bash
# Set up the WebGPU test environment (tests/test_webgpu.py), best effort:
#   1. Mesa >= 25 software Vulkan (lavapipe) from Debian bookworm-backports (Debian 12's own
#      Mesa 22 is rejected by Dawn), when apt is usable as root;
#   2. .venv-webgpu: onnxruntime-webgpu (it conflicts with onnxruntime, hence its own venv)
#      plus the runtime's other dependencies; the repo is put on its path, not installed.
# Whatever cannot be installed makes the test skip with the reason; this script never fails
# the caller. Re-running it is cheap (it skips what is there).
set -u
cd "$(dirname "$0")/.."
log() { echo "[setup_webgpu] $*" >&2; }

if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && grep -q bookworm /etc/os-release 2>/dev/null; then
  if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 || \
     ! dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -qE '^(2[5-9]|[3-9][0-9])'; then
    src=/etc/apt/sources.list.d/agevlm-bookworm-backports.sources
    if [ ! -f "$src" ]; then
      printf 'Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm-backports\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' > "$src"
    fi
    log "installing mesa-vulkan-drivers from bookworm-backports"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        -t bookworm-backports mesa-vulkan-drivers libvulkan1 >/dev/null; } \
      || log "apt install failed; the WebGPU test will skip"
  fi
else
  log "not root on Debian bookworm with apt: Mesa from backports not installed"
fi

if [ ! -x .venv-webgpu/bin/python ]; then
  log "creating .venv-webgpu"
  { python3 -m venv .venv-webgpu && \
    .venv-webgpu/bin/pip install -q -c constraints.txt onnxruntime-webgpu numpy tokenizers Pillow click; } \
    || { log "pip install onnxruntime-webgpu failed; the WebGPU test will skip"; rm -rf .venv-webgpu; }
fi
exit 0
