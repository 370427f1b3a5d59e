#!/usr/bin/env bash
# Re-records the traces shipped in test/data/traces/ (README "Trace replay"). The inputs are
# generated here, deterministically, so a recording can be repeated; the recordings themselves
# vary a little with the installed program versions and the machine's native run time.
# One valgrind run at a time: gzip takes under a minute of one core, xz -6 (193 M instructions)
# about three minutes; lackey runs about 1 M instructions a second.
set -euo pipefail
cd "$(dirname "$0")/.."
out=test/data/traces
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

# A 120 KB text of words (a compressor's input).
python3 - "$tmp/text.txt" <<'PY'
import random, sys
random.seed(7)
vocab = [w for w in "the page table walk of a guest frame maps to host memory while migration copies dirty pages in rounds until the remainder fits the downtime budget and the vcpu resumes on the destination".split()]
vocab += ["%s%d" % (w, i) for i, w in enumerate(vocab * 4)]
out = []
while sum(len(w) + 1 for w in out) < 120_000:
    out.append(random.choice(vocab))
    if random.random() < 0.08: out.append("\n")
open(sys.argv[1], "w").write(" ".join(out)[:120_000])
PY

# A database session: 2000 inserts in a transaction, an index, aggregates, an update, a delete.
python3 - "$tmp/orders.sql" <<'PY'
import random, sys
random.seed(12)
l = ["CREATE TABLE orders(id INTEGER PRIMARY KEY, customer TEXT, amount REAL, day INTEGER);", "BEGIN;"]
for i in range(2000):
    l.append(f"INSERT INTO orders(customer, amount, day) VALUES('c{random.randint(1,300)}', {random.random()*1000:.2f}, {random.randint(1,365)});")
l += ["COMMIT;", "CREATE INDEX by_customer ON orders(customer);",
      "SELECT customer, count(*), sum(amount) FROM orders GROUP BY customer ORDER BY 3 DESC LIMIT 10;",
      "SELECT day, avg(amount) FROM orders WHERE day BETWEEN 100 AND 200 GROUP BY day;",
      "UPDATE orders SET amount = amount * 1.1 WHERE customer LIKE 'c1%';",
      "DELETE FROM orders WHERE amount < 50;", "SELECT count(*), max(amount) FROM orders;"]
open(sys.argv[1], "w").write("\n".join(l) + "\n")
PY

# An interpreter's program: build a dict, JSON round trip, sort.
cat > "$tmp/prog.py" <<'PY'
import json
d = {}
for i in range(3000):
    d["k%d" % (i * 7919 % 3001)] = [i, str(i) * 3]
s = json.dumps(d)
back = json.loads(s)
print(len(s), sorted(back, key=lambda k: back[k][0] % 97)[:3])
PY

# A compiler's input: a small C file.
cat > "$tmp/small.c" <<'C'
#include <stddef.h>
struct node { struct node *next; int key; long value; };
static unsigned hash(int k) { unsigned h = (unsigned)k * 2654435761u; return h ^ (h >> 16); }
long lookup(struct node **table, size_t n, int key) {
  for (struct node *p = table[hash(key) % n]; p; p = p->next) if (p->key == key) return p->value;
  return -1;
}
void insert(struct node **table, size_t n, struct node *e) { size_t b = hash(e->key) % n; e->next = table[b]; table[b] = e; }
long sum(struct node **table, size_t n) { long s = 0; for (size_t i = 0; i < n; i++) for (struct node *p = table[i]; p; p = p->next) s += p->value; return s; }
C

rec() { scripts/record-trace "$@"; }
rec -o "$out/gzip.s2trace" --stdin "$tmp/text.txt" -- gzip -c -9
rec -o "$out/xz.s2trace" --stdin "$tmp/text.txt" -- xz -c -6
rec -o "$out/sqlite3.s2trace" --stdin "$tmp/orders.sql" -- sqlite3 :memory:
# The interpreter binary itself, not a wrapper (a pyenv shim is a shell script).
py=$(python3 -c 'import sys; print(sys.executable)')
rec -o "$out/python3.s2trace" -- "$py" -S "$tmp/prog.py"
cc1=$(gcc -print-prog-name=cc1)
rec -o "$out/cc1.s2trace" -- "$cc1" -quiet -O2 "$tmp/small.c" -o /dev/null
