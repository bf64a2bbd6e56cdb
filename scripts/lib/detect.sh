# Detection of the system packages the build needs. Sourced by setup.sh and by
# scripts/test-setup.sh; every check takes a root directory (default /) so
# tests can run it against a temporary tree instead of this machine.
#
# bindgen (through clang-sys) loads the *C* library libclang: files named
# libclang.so, libclang.so.<N>, libclang-<N>.so or libclang-<N>.so.<M>.
# libclang-cpp.so.<N> (Debian's libclang-cpp<N>) is the C++ library: bindgen
# cannot use it, so it never counts.

# Prints the first libclang C library found under ROOT and returns 0, or
# returns 1 when there is none.
libclang_find() {
    local root="${1:-/}"
    root="${root%/}"
    local dirs=(
        "$root/usr/lib" "$root/usr/lib64" "$root/usr/local/lib"
        "$root/usr/lib/x86_64-linux-gnu" "$root/usr/lib/aarch64-linux-gnu"
    )
    local d
    for d in "$root"/usr/lib/llvm-*/lib "$root"/usr/lib/llvm/*/lib; do
        [ -d "$d" ] && dirs+=("$d")
    done
    if [ -n "${LIBCLANG_PATH:-}" ] && [ "$root" = "" ]; then
        dirs=("$LIBCLANG_PATH" "${dirs[@]}")
    fi
    local f name
    for d in "${dirs[@]}"; do
        [ -d "$d" ] || continue
        for f in "$d"/libclang*; do
            [ -e "$f" ] || continue
            name="${f##*/}"
            if libclang_name_ok "$name"; then
                printf '%s\n' "$f"
                return 0
            fi
        done
    done
    return 1
}

# Whether a file name is one bindgen loads as libclang (never libclang-cpp*).
libclang_name_ok() {
    local name="$1"
    case "$name" in
        libclang-cpp*) return 1 ;;
    esac
    [[ "$name" =~ ^libclang(-[0-9]+(\.[0-9]+)*)?\.so(\.[0-9]+)*$ ]]
}

# Whether a command is on PATH (ROOT ignored: PATH is what the build uses).
command_present() {
    command -v "$1" >/dev/null 2>&1
}

# Prints, one per line as "package reason", the Debian packages the build
# still needs on ROOT.
missing_packages() {
    local root="${1:-/}"
    command_present cmake || echo "cmake llama.cpp is built with CMake (llama-cpp-sys-2's build script)"
    libclang_find "$root" >/dev/null || echo "libclang-dev bindgen needs the C library libclang (libclang.so / libclang-<N>.so); libclang-cpp is not it"
    command_present python3 || echo "python3 the test models are fetched from PyPI with Python"
    true
}
