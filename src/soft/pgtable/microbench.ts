// Microbenchmarks of the stage-2 table and its locks (single thread, uncontended).
//   node --import tsx src/soft/pgtable/microbench.ts [--pages 131072] [--reps 5] [--json]
// Prints the median of `reps` runs per figure, in ns per operation, measured as process CPU time
// (process.cpuUsage: on a shared, oversubscribed machine wall time mostly measures waiting for a
// core), with wall time beside it and a calibration line (one uncontended Atomics.load).

import { EpochDomain } from '../locking/epoch.ts';
import { RwLock } from '../locking/rwlock.ts';
import { PROT_RW, PROT_R, PROT_W } from './pte.ts';
import { Stage2PageTable, newLeafLookup } from './stage2.ts';

function arg(name: string, dflt: number): number {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? Number(process.argv[i + 1]) : dflt;
}
const PAGES = arg('pages', 131072);
const REPS = arg('reps', 5);
const JSON_OUT = process.argv.includes('--json');

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[s.length >> 1]!;
}

const runCpu0 = process.cpuUsage();
const runWall0 = process.hrtime.bigint();
/** CPU nanoseconds spent in fn. */
function timeNs(fn: () => void): number {
  const c0 = process.cpuUsage();
  fn();
  const c = process.cpuUsage(c0);
  return (c.user + c.system) * 1000;
}

let rngState = 0x12345678;
function rand(): number {
  rngState ^= rngState << 13;
  rngState ^= rngState >>> 17;
  rngState ^= rngState << 5;
  return (rngState >>> 0) / 4294967296;
}

const results: Record<string, number> = {};
let sink = 0;

// --- map: PAGES 4K pages, sequential gfns spread over a 4 GiB-aligned area (allocates tables).
for (const shared of [false, true]) {
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    const pgt = Stage2PageTable.create({ maxTablePages: Math.ceil(PAGES / 512) + 64 });
    runs.push(timeNs(() => {
      for (let g = 0; g < PAGES; g++) pgt.map(g, 3, g + 1000, PROT_RW, shared);
    }) / PAGES);
    pgt.destroy();
  }
  results[shared ? 'mapNsPer4kShared' : 'mapNsPer4kExclusive'] = median(runs);
}

// --- getLeaf at random addresses over PAGES mapped 4K pages.
const pgt = Stage2PageTable.create({ maxTablePages: Math.ceil(PAGES / 512) + 64 });
for (let g = 0; g < PAGES; g++) pgt.map(g, 3, g + 1000, PROT_RW, false);
const LOOKUPS = 1 << 20;
const gfns = new Float64Array(LOOKUPS);
for (let i = 0; i < LOOKUPS; i++) gfns[i] = Math.floor(rand() * PAGES);
const out = newLeafLookup();
{
  const runs: number[] = [];
  for (let r = 0; r < REPS + 1; r++) {
    runs.push(timeNs(() => {
      let s = 0;
      for (let i = 0; i < LOOKUPS; i++) s += pgt.getLeaf(gfns[i]!, out);
      sink += s;
    }) / LOOKUPS);
  }
  results.getLeafNsRandom4k = median(runs.slice(1));
}

// --- getLeaf inside an RCU section per lookup (what a lock-free TLB fill that enters per miss pays).
{
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    runs.push(timeNs(() => {
      let s = 0;
      for (let i = 0; i < LOOKUPS; i++) {
        pgt.rcuReadLock();
        s += pgt.getLeaf(gfns[i]!, out);
        pgt.rcuReadUnlock();
      }
      sink += s;
    }) / LOOKUPS);
  }
  results.getLeafWithRcuSectionNs = median(runs);
}

// --- relaxPerms (shared: RCU section + lookup + cmpxchg) on write-protected pages.
for (const shared of [true, false]) {
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    pgt.writeProtect(0, PAGES);
    runs.push(timeNs(() => {
      for (let i = 0; i < PAGES; i++) pgt.relaxPerms(gfns[i]!, PROT_W, shared);
    }) / PAGES);
  }
  results[shared ? 'relaxPermsNsShared' : 'relaxPermsNsExclusive'] = median(runs);
}

// --- writeProtect sweep per 4K leaf.
{
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    for (let g = 0; g < PAGES; g++) pgt.relaxPerms(g, PROT_W, false);
    runs.push(timeNs(() => void pgt.writeProtect(0, PAGES)) / PAGES);
  }
  results.writeProtectNsPer4k = median(runs);
}

// --- writeProtect of single random pages (a clear-dirty-log run of one page).
{
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    for (let g = 0; g < PAGES; g++) pgt.relaxPerms(g, PROT_W, false);
    runs.push(timeNs(() => {
      for (let i = 0; i < PAGES; i++) pgt.writeProtect(gfns[i]!, 1);
    }) / PAGES);
  }
  results.writeProtectNsSinglePage = median(runs);
}

// --- split of 2M blocks into 4K pages, per block.
{
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    const p2 = Stage2PageTable.create({ maxTablePages: 2 * Math.ceil(PAGES / 512) + 64 });
    for (let g = 0; g < PAGES; g += 512) p2.map(g, 2, g, PROT_R, false);
    runs.push(timeNs(() => void p2.splitHugePages(0, PAGES, true)) / (PAGES / 512));
    p2.destroy();
  }
  results.splitNsPer2mBlock = median(runs);
}
pgt.destroy();

// --- rwlock read lock + unlock, write lock + unlock (uncontended).
{
  const lock = RwLock.create();
  const N = 1 << 21;
  const rr: number[] = [];
  const ww: number[] = [];
  for (let r = 0; r < REPS; r++) {
    rr.push(timeNs(() => {
      for (let i = 0; i < N; i++) {
        lock.readLock();
        lock.readUnlock();
      }
    }) / N);
    ww.push(timeNs(() => {
      for (let i = 0; i < N; i++) {
        lock.writeLock();
        lock.writeUnlock();
      }
    }) / N);
  }
  results.rwlockReadLockUnlockNs = median(rr);
  results.rwlockWriteLockUnlockNs = median(ww);
}

// --- epoch enter + exit.
{
  const d = EpochDomain.create({ maxSlots: 64, capacity: 16 }, () => {});
  const slot = d.claimSlot();
  const N = 1 << 21;
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    runs.push(timeNs(() => {
      for (let i = 0; i < N; i++) {
        d.readLock(slot);
        d.readUnlock(slot);
      }
    }) / N);
  }
  results.epochEnterExitNs = median(runs);
  const rc: number[] = [];
  for (let r = 0; r < REPS; r++) {
    rc.push(timeNs(() => {
      for (let i = 0; i < 1000; i++) {
        d.deferFree(i % 16);
        d.reclaim();
      }
    }) / 1000);
  }
  results.epochDeferFreeReclaimNs = median(rc);
}

// Calibration: one Atomics.load (7-10 ns on an idle machine of this kind, MEASURED.md).
{
  const w = new Int32Array(new SharedArrayBuffer(4096));
  const N = 1 << 22;
  const runs: number[] = [];
  for (let r = 0; r < REPS; r++) {
    runs.push(timeNs(() => {
      let s = 0;
      for (let i = 0; i < N; i++) s += Atomics.load(w, i & 1023);
      sink += s;
    }) / N);
  }
  results.calibrationAtomicsLoadNs = median(runs);
}
{
  // Wall time over CPU time for the whole run: ~1 on an idle machine, more when cores are shared.
  const c = process.cpuUsage(runCpu0);
  results.wallOverCpuRatio = Number(process.hrtime.bigint() - runWall0) / ((c.user + c.system) * 1000);
}

const rounded = Object.fromEntries(Object.entries(results).map(([k, v]) => [k, Math.round(v * 10) / 10]));
if (JSON_OUT) {
  process.stdout.write(`${JSON.stringify({ params: { pages: PAGES, reps: REPS, node: process.version }, ns: rounded })}\n`);
} else {
  console.log(`stage-2 microbench (${PAGES} pages, median of ${REPS}, node ${process.version})`);
  for (const [k, v] of Object.entries(rounded)) console.log(`  ${k.padEnd(28)} ${String(v).padStart(8)}${k.endsWith('Ratio') ? '' : ' ns'}`);
}
if (sink === 0.5) console.log(sink);
