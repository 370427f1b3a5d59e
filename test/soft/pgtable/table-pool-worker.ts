// Worker for table-pool.test.ts: allocate and free pages at random, stamping each page it holds
// with its id and checking nobody else got the same page meanwhile.
import { parentPort, workerData } from 'node:worker_threads';
import { TablePool, type TablePoolShared } from '../../../src/soft/pgtable/table-pool.ts';

const d = workerData as { pool: TablePoolShared; id: number; ops: number; seed: number };
const pool = TablePool.attach(d.pool);
let s = d.seed >>> 0 || 1;
const rnd = (): number => {
  s ^= s << 13;
  s ^= s >>> 17;
  s ^= s << 5;
  return (s >>> 0) / 4294967296;
};
const held: number[] = [];
let errors = 0;
let exhausted = 0;
for (let i = 0; i < d.ops; i++) {
  if (held.length === 0 || (held.length < 64 && rnd() < 0.5)) {
    const p = pool.zallocTablePage();
    if (p < 0) {
      exhausted++;
      continue;
    }
    // A fresh page is all zero; stamp words 0 and 511 with our id.
    if (Atomics.load(pool.words, p * 512) !== 0 || Atomics.load(pool.words, p * 512 + 511) !== 0) errors++;
    Atomics.store(pool.words, p * 512, d.id);
    Atomics.store(pool.words, p * 512 + 511, d.id);
    held.push(p);
  } else {
    const k = Math.floor(rnd() * held.length);
    const p = held[k]!;
    held[k] = held[held.length - 1]!;
    held.pop();
    if (Atomics.load(pool.words, p * 512) !== d.id || Atomics.load(pool.words, p * 512 + 511) !== d.id) errors++;
    pool.freeTablePage(p);
  }
}
for (const p of held) pool.freeTablePage(p);
parentPort!.postMessage({ errors, exhausted });
