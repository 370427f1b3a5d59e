#!/usr/bin/env bash
# Builds KVM's own selftests (dirty_log_perf_test, dirty_log_test, demand_paging_test) from
# Debian's linux-source-6.12 package, for side-by-side comparison with `stage2 bench`.
# The kernel tree is unpacked into .selftests/ (git-ignored); no kernel code is ever committed.
#
#   scripts/selftests/build.sh            # install packages (root), unpack, build
#   .selftests/kvm/dirty_log_perf_test -v 1 -b 512M -i 3
#
# The binaries are linked into .selftests/kvm/ so commands stay short.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="$root/.selftests"
src_tar=/usr/src/linux-source-6.12.tar.xz

if [[ ! -f "$src_tar" ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "need root to apt-get install linux-source-6.12 (or install it yourself)" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    linux-source-6.12 libnuma-dev flex bison bc libelf-dev pkg-config rsync make gcc >/dev/null
fi

mkdir -p "$dest"
tree=$(ls -d "$dest"/linux-source-6.12 2>/dev/null || true)
if [[ -z "$tree" ]]; then
  echo "unpacking $src_tar into $dest" >&2
  tar xf "$src_tar" -C "$dest"
  tree="$dest/linux-source-6.12"
fi

jobs=$(nproc)
make -C "$tree" headers -j"$jobs" >/dev/null
# Only the binaries we compare against (lib.mk names targets by their absolute output path);
# fall back to the whole suite if this kernel's Makefile lays them out differently.
kvmdir="$tree/tools/testing/selftests/kvm"
make -C "$kvmdir" -j"$jobs" "$kvmdir/dirty_log_perf_test" "$kvmdir/dirty_log_test" "$kvmdir/demand_paging_test" >/dev/null 2>&1 ||
  make -C "$kvmdir" -j"$jobs" >/dev/null

mkdir -p "$dest/kvm"
for t in dirty_log_perf_test dirty_log_test demand_paging_test; do
  bin=$(find "$tree/tools/testing/selftests/kvm" -type f -name "$t" -perm -u+x | head -1)
  if [[ -n "$bin" ]]; then ln -sf "$bin" "$dest/kvm/$t"; echo "built $dest/kvm/$t"; else echo "missing $t" >&2; fi
done
