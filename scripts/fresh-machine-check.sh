#!/usr/bin/env bash
# Runs a README command as on a fresh machine (docs/FRESH_MACHINE.md): a fresh
# clone, an empty cargo target dir, and — in a private mount namespace — the
# libclang C library and cmake hidden from the build, dpkg's database without
# them, and a recording stub `apt-get` first on PATH. The stub logs what setup
# asks for and "installs" by lifting the hiding layers, so the build goes on
# with the machine's real packages only when setup asked for them.
#
# Usage (root): scripts/fresh-machine-check.sh WORKDIR demo|test [ARGS...]
#   e.g. scripts/fresh-machine-check.sh /tmp/fresh demo --headless --seconds 60
# Prints the stub's log and the command's exit code and duration at the end.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="${1:?WORKDIR}"; what="${2:?demo|test}"; shift 2
[ "$(id -u)" -eq 0 ] || { echo "fresh-machine-check: needs root (unshare -m, mount)" >&2; exit 1; }
if [ "${FRESH_INNER:-}" != 1 ]; then
    rm -rf "$work"; mkdir -p "$work"
    git clone -q "$repo" "$work/clone"
    mkdir -p "$work/target"   # empty cargo target dir
    exec env FRESH_INNER=1 unshare -m --propagation private "$0" "$work" "$what" "$@"
fi
# --- inside the private mount namespace ---
# shellcheck source=lib/detect.sh
source "$repo/scripts/lib/detect.sh"
layers="$work/layers"; mkdir -p "$layers"
mount -t tmpfs tmpfs "$layers"
hidden=()
hide_in() {  # hide_in DIR NAME... : overlay DIR with whiteouts for NAMEs
    local dir="$1"; shift
    local id; id=$(echo "$dir" | tr / _)
    mkdir -p "$layers/$id/u" "$layers/$id/w"
    local n
    for n in "$@"; do mknod "$layers/$id/u/$n" c 0 0; done
    mount -t overlay overlay -o "lowerdir=$dir,upperdir=$layers/$id/u,workdir=$layers/$id/w" "$dir"
    hidden+=("$dir")
}
for dir in /usr/lib /usr/lib64 /usr/local/lib /usr/lib/x86_64-linux-gnu /usr/lib/llvm-*/lib; do
    [ -d "$dir" ] || continue
    names=()
    for f in "$dir"/libclang*; do
        [ -e "$f" ] || [ -L "$f" ] || continue
        libclang_name_ok "${f##*/}" && names+=("${f##*/}")
    done
    [ ${#names[@]} -gt 0 ] && hide_in "$dir" "${names[@]}"
done
cmake_names=()
for b in cmake ctest cpack; do
    [ -e "/usr/bin/$b" ] && cmake_names+=("$b")
done
[ ${#cmake_names[@]} -gt 0 ] && hide_in /usr/bin "${cmake_names[@]}"
# dpkg's database without the packages we hide.
awk 'BEGIN{RS="";ORS="\n\n"} !/^Package: (cmake|cmake-data|libclang-dev|libclang-[0-9]+-dev|libclang1-[0-9]+|libclang-common-[0-9]+-dev)\n/' \
    /var/lib/dpkg/status > "$layers/dpkg-status"
mount --bind "$layers/dpkg-status" /var/lib/dpkg/status
# The recording stub apt-get.
mkdir -p "$layers/bin"
log="$work/apt-get.log"; : > "$log"
cat > "$layers/bin/apt-get" <<STUB
#!/usr/bin/env bash
echo "apt-get \$*" >> "$log"
if [ "\$1" = install ] || [[ " \$* " == *" install "* ]]; then
    # "Install": lift the layers that hide the real packages.
    for d in $(printf '%q ' "${hidden[@]}") /var/lib/dpkg/status; do umount -l "\$d" 2>/dev/null || true; done
fi
exit 0
STUB
chmod +x "$layers/bin/apt-get"
echo "fresh-machine-check: hidden: ${hidden[*]}; before setup, libclang found: $(libclang_find / || echo none); cmake: $(command -v cmake || echo none)"
cd "$work/clone"
start=$(date +%s); rc=0
env PATH="$layers/bin:$PATH" CARGO_TARGET_DIR="$work/target" bash "scripts/$what.sh" "$@" || rc=$?
echo "fresh-machine-check: apt-get calls:"; sed 's/^/  /' "$log"
echo "fresh-machine-check: scripts/$what.sh exited $rc after $(( $(date +%s) - start )) s"
exit $rc
