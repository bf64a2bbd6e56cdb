#!/usr/bin/env bash
# Tests scripts/lib/detect.sh against temporary trees, independent of what this
# machine has installed. Run by scripts/test.sh before cargo.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib/detect.sh
source "$here/lib/detect.sh"
unset LIBCLANG_PATH
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fails=0; n=0
expect() {  # expect present|missing DESCRIPTION FILE...
    local want="$1" what="$2"; shift 2
    local root="$tmp/$n"; n=$((n + 1))
    mkdir -p "$root/usr/lib/x86_64-linux-gnu" "$root/usr/lib/llvm-14/lib"
    local f; for f in "$@"; do mkdir -p "$root/$(dirname "$f")"; : > "$root/$f"; done
    local got=missing; libclang_find "$root" >/dev/null && got=present
    if [ "$got" = "$want" ]; then echo "  ok: $what → $got"; else echo "  FAIL: $what → $got, expected $want"; fails=$((fails + 1)); fi
}
echo "test-setup: libclang detection"
expect missing "empty tree"
expect missing "only libclang-cpp.so.14 (the C++ library)" usr/lib/x86_64-linux-gnu/libclang-cpp.so.14
expect missing "libclang-cpp in llvm dir" usr/lib/llvm-14/lib/libclang-cpp.so.14 usr/lib/llvm-14/lib/libclang-cpp.so
expect missing "static archives only" usr/lib/llvm-14/lib/libclangAST.a usr/lib/llvm-14/lib/libclangBasic.a
expect missing "a name that merely starts with libclang" usr/lib/x86_64-linux-gnu/libclangx.so.1
expect present "libclang-14.so.1 (Debian libclang1-14)" usr/lib/x86_64-linux-gnu/libclang-14.so.1
expect present "libclang.so (libclang-dev symlink)" usr/lib/llvm-14/lib/libclang.so
expect present "libclang.so.1 in llvm dir" usr/lib/llvm-14/lib/libclang.so.1
expect present "libclang-14.so beside libclang-cpp" usr/lib/x86_64-linux-gnu/libclang-cpp.so.14 usr/lib/x86_64-linux-gnu/libclang-14.so
expect present "libclang-14.so.14.0.6" usr/lib/x86_64-linux-gnu/libclang-14.so.14.0.6
expect present "/usr/lib/libclang.so" usr/lib/libclang.so
for name in libclang-cpp.so.14 libclang-cpp.so libclangAST.a libclang.a; do
    if libclang_name_ok "$name"; then echo "  FAIL: name $name accepted"; fails=$((fails + 1)); else echo "  ok: name $name rejected"; fi
done
# The package list setup.sh would install for a tree with only libclang-cpp.
mkdir -p "$tmp/cpp/usr/lib/x86_64-linux-gnu"; : > "$tmp/cpp/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"
if missing_packages "$tmp/cpp" | grep -q '^libclang-dev '; then echo "  ok: setup asks for libclang-dev when only libclang-cpp is present"
else echo "  FAIL: setup would not install libclang-dev"; fails=$((fails + 1)); fi
if [ "$fails" -ne 0 ]; then echo "test-setup: $fails FAILED"; exit 1; fi
echo "test-setup: all passed"
