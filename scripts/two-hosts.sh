#!/usr/bin/env bash
# Two "hosts" on this machine: network namespaces NAME-a and NAME-b joined by a veth pair, with
# the link rate-shaped by tc's token bucket filter (tbf) on both ends. Root only.
#
#   scripts/two-hosts.sh up [NAME]     # env RATE (tc rate, e.g. 1gbit, 10gbit; empty: unshaped)
#   scripts/two-hosts.sh down [NAME]
#
# Addresses live only inside the namespaces: NAME-a has 10.77.0.1/24, NAME-b 10.77.0.2/24 (env
# SUBNET=10.77.0 to change), and each has its own loopback. Run a command on a host with
#   ip netns exec NAME-b node bin/stage2.mjs receive --listen 10.77.0.2:4444 --auth-token-file F
#   ip netns exec NAME-a node bin/stage2.mjs migrate --to 10.77.0.2:4444 --auth-token-file F
# This kernel has no netem (no delay, no loss); the host tests add those with a proxy
# (test/hosts/link-proxy.mjs). `up` prints one line: "NAME-a 10.77.0.1 NAME-b 10.77.0.2".
set -euo pipefail
cmd=${1:-}
name=${2:-s2h}
subnet=${SUBNET:-10.77.0}
rate=${RATE:-}
a="$name-a"
b="$name-b"
# Interface names: at most 15 characters; each lives in its own namespace only.
if [ ${#name} -gt 12 ]; then echo "two-hosts.sh: NAME '$name' is longer than 12 characters" >&2; exit 2; fi

# tbf's bucket must hold what the link sends between two timer ticks: 2 ms of the rate, at
# least 64 KiB. `latency` bounds the queue (a link's buffer), not the delay of an empty link.
burst_for() {
  local r=$1 n unit
  n=${r%%[kKmMgG]*}; unit=${r#$n}
  case "${unit,,}" in
    kbit) n=$((n * 1000)) ;; mbit) n=$((n * 1000000)) ;; gbit) n=$((n * 1000000000)) ;; bit) ;;
    *) echo "two-hosts.sh: RATE '$r': use kbit, mbit or gbit, e.g. 1gbit" >&2; exit 2 ;;
  esac
  local bytes=$((n / 8 / 500))
  echo $((bytes > 65536 ? bytes : 65536))
}

down() {
  ip netns del "$a" 2>/dev/null || true # deleting a namespace deletes its veth end, and the pair
  ip netns del "$b" 2>/dev/null || true
}

case "$cmd" in
  up)
    down
    trap 'down' ERR
    ip netns add "$a"
    ip netns add "$b"
    ip link add "${name}a" netns "$a" type veth peer name "${name}b" netns "$b"
    ip -n "$a" addr add "$subnet.1/24" dev "${name}a"
    ip -n "$b" addr add "$subnet.2/24" dev "${name}b"
    for ns in "$a" "$b"; do ip -n "$ns" link set lo up; done
    ip -n "$a" link set "${name}a" up
    ip -n "$b" link set "${name}b" up
    if [ -n "$rate" ]; then
      burst=$(burst_for "$rate")
      ip netns exec "$a" tc qdisc replace dev "${name}a" root tbf rate "$rate" burst "$burst" latency 20ms
      ip netns exec "$b" tc qdisc replace dev "${name}b" root tbf rate "$rate" burst "$burst" latency 20ms
    fi
    trap - ERR
    echo "$a $subnet.1 $b $subnet.2"
    ;;
  down) down ;;
  *) echo "usage: two-hosts.sh up|down [NAME]   (env RATE=1gbit, SUBNET=10.77.0)" >&2; exit 2 ;;
esac
