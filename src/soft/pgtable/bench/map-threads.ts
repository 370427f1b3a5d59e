// Populate-style map throughput with N threads, global vs parallel MMU lock (seed 003's "time to
// populate", for the table alone: no host memory, no vCPU).
//   node --import tsx src/soft/pgtable/bench/map-threads.ts [--pages-per-thread 65536] [--threads 1,2]
import { MmuLock, type MmuLockMode } from '../../locking/mmu-lock.ts';
import { Stage2PageTable } from '../stage2.ts';
import { startWorker } from '../../../util/worker.ts';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : dflt;
}
const PAGES = Number(arg('pages-per-thread', '65536'));
const THREADS = arg('threads', '1,2').split(',').map(Number);

interface Res {
  wallNs: number;
  retries: number;
  lockSleeps: number;
}

async function run(threads: number, mode: MmuLockMode): Promise<Record<string, number | string>> {
  const pgt = Stage2PageTable.create({ maxTablePages: Math.ceil((threads * PAGES) / 512) * 2 + 64, maxThreads: threads + 2 });
  const lock = MmuLock.create(mode);
  const go = new SharedArrayBuffer(8);
  const gw = new Int32Array(go);
  const entry = new URL('./map-threads-worker.ts', import.meta.url);
  // Threads interleave 2M blocks so they share upper tables (and race to create them).
  const workers = Array.from({ length: threads }, (_, t) => startWorker(entry, { pgt: pgt.shared, lock: lock.shared, firstGfn: t * PAGES, pages: PAGES, go }));
  const done = workers.map((w) => new Promise<Res>((res, rej) => {
    w.once('message', res);
    w.once('error', rej);
  }));
  while (Atomics.load(gw, 1) < threads) await new Promise((r) => setTimeout(r, 5));
  const t0 = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  Atomics.store(gw, 0, 1);
  Atomics.notify(gw, 0);
  const res = await Promise.all(done);
  const cpu = process.cpuUsage(cpu0);
  const processCpuNs = (cpu.user + cpu.system) * 1000;
  const wallNs = Number(process.hrtime.bigint() - t0);
  await Promise.all(workers.map((w) => w.terminate()));
  lock.exclusiveLock();
  pgt.destroy();
  lock.exclusiveUnlock();
  const total = threads * PAGES;
  return {
    threads,
    mode,
    pages: total,
    seconds: wallNs / 1e9,
    mapsPerSecond: Math.round(total / (wallNs / 1e9)),
    // process.cpuUsage is process-wide: CPU of all threads (workers, main, GC) per map.
    processCpuNsPerMap: Math.round(processCpuNs / total),
    eagainRetries: res.reduce((s, r) => s + r.retries, 0),
    lockSleeps: res.reduce((s, r) => s + r.lockSleeps, 0),
  };
}

const rows = [];
for (const threads of THREADS) for (const mode of ['global', 'parallel'] as const) rows.push(await run(threads, mode));
console.table(rows);
