#!/usr/bin/env bash
# Install what building the crate needs beyond Rust: cmake and libclang (the C
# library bindgen loads) for llama-cpp-sys-2, and Python for the model fetch.
# Debian/Ubuntu. Idempotent: a second run finds nothing missing and changes
# nothing. Detection lives in scripts/lib/detect.sh (tested by
# scripts/test-setup.sh).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/detect.sh
source "$here/lib/detect.sh"

pkgs=()
while read -r pkg reason; do
    [ -n "$pkg" ] || continue
    echo "setup: missing $pkg — $reason"
    pkgs+=("$pkg")
done < <(missing_packages /)
# pip comes with python3 on Debian only as a separate package.
if command_present python3 && ! python3 -m pip --version >/dev/null 2>&1; then
    echo "setup: missing python3-pip — the test models are downloaded with pip"
    pkgs+=(python3-pip)
fi
if [ ${#pkgs[@]} -eq 0 ]; then
    echo "setup: build packages present (cmake, libclang: $(libclang_find / || true))"
    exit 0
fi

fail() {
    echo "setup: ERROR: $*" >&2
    echo "setup: install these packages yourself, then run the command again: ${pkgs[*]}" >&2
    exit 1
}
command_present apt-get || fail "apt-get not found (not Debian/Ubuntu?): cannot install ${pkgs[*]}"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command_present sudo && sudo -n true 2>/dev/null; then
        SUDO=(sudo)
    elif command_present sudo; then
        SUDO=(sudo)
        echo "setup: sudo may ask for your password to install ${pkgs[*]}"
    else
        fail "not root and no sudo: cannot install ${pkgs[*]}"
    fi
fi
echo "setup: installing: ${pkgs[*]} (apt-get update + install)"
"${SUDO[@]}" apt-get update -qq || fail "apt-get update failed"
DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null \
    || fail "apt-get install ${pkgs[*]} failed"
# Check again: the install must have produced what the build loads.
still=$(missing_packages / | cut -d' ' -f1 | tr '\n' ' ')
[ -z "${still// /}" ] || fail "still missing after install: $still"
echo "setup: installed ${pkgs[*]}"
