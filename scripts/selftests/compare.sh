#!/usr/bin/env bash
# Side-by-side: KVM's dirty_log_perf_test vs `stage2 bench dirty-log --engine kvm`, same vCPUs,
# memory per vCPU, backing and 4 KiB guest pages, runs alternating so host load hits both alike.
#   scripts/selftests/compare.sh [runs=3] [bytes=512M] [vcpus=1] [iterations=3] [backing=anonymous]
# Prints every run's per-iteration dirty-memory times and the medians. Needs build.sh first.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
runs=${1:-3} bytes=${2:-512M} vcpus=${3:-1} iters=${4:-3} backing=${5:-anonymous}
# DIRTY_LOG_PERF_TEST=path runs another build of the C test (e.g. a locally modified guest).
c="${DIRTY_LOG_PERF_TEST:-$root/.selftests/kvm/dirty_log_perf_test}"
[[ -x "$c" ]] || { echo "run scripts/selftests/build.sh first" >&2; exit 1; }
out=$(mktemp -d)
for r in $(seq 1 "$runs"); do
  "$c" -v "$vcpus" -b "$bytes" -i "$iters" -s "$backing" >"$out/c.$r" 2>&1
  grep -E "Iteration [0-9]+ dirty memory time" "$out/c.$r" | awk '{print $NF}' | tr -d s >>"$out/c.iters"
  grep -E "Populate memory time" "$out/c.$r" | awk '{print $NF}' | tr -d s >>"$out/c.pop"
  node "$root/bin/stage2.mjs" bench dirty-log --engine kvm -v "$vcpus" -b "$bytes" -i "$iters" -s "$backing" --guest-page-size 4K >"$out/s.$r" 2>&1
  grep -E "Iteration [0-9]+ dirty memory time" "$out/s.$r" | awk '{print $NF}' | tr -d s >>"$out/s.iters"
  grep -E "Populate memory time" "$out/s.$r" | awk '{print $NF}' | tr -d s >>"$out/s.pop"
  echo "run $r: C iterations $(grep -E 'Iteration [0-9]+ dirty memory time' "$out/c.$r" | awk '{printf "%s ", $NF}')| stage2 iterations $(grep -E 'Iteration [0-9]+ dirty memory time' "$out/s.$r" | awk '{printf "%s ", $NF}')"
done
median() { sort -n "$1" | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2}'; }
mc=$(median "$out/c.iters") ms=$(median "$out/s.iters")
echo "populate median: C $(median "$out/c.pop")s stage2 $(median "$out/s.pop")s"
echo "dirty pass median: C ${mc}s stage2 ${ms}s ratio stage2/C $(awk -v a="$ms" -v b="$mc" 'BEGIN {printf "%.4f", a/b}')"
echo "raw outputs in $out"
