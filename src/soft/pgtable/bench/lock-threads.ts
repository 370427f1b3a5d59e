// Read lock+unlock and epoch enter+exit from T threads at once (what every parallel fault pays):
// the rwlock's readers share one word (its cache line bounces), epoch slots are 128 bytes apart.
//   node --import tsx src/soft/pgtable/bench/lock-threads.ts [--threads 1,2] [--n 2000000]
import { EpochDomain } from '../../locking/epoch.ts';
import { RwLock } from '../../locking/rwlock.ts';
import { startWorker } from '../../../util/worker.ts';

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1]! : dflt;
}
const N = Number(arg('n', '2000000'));
const THREADS = arg('threads', '1,2').split(',').map(Number);

const rows = [];
for (const what of ['rwlock', 'epoch'] as const) {
  for (const threads of THREADS) {
    const lock = RwLock.create();
    const epoch = EpochDomain.create({ maxSlots: 16, capacity: 1 }, () => {});
    const go = new SharedArrayBuffer(8);
    const gw = new Int32Array(go);
    const entry = new URL('./lock-threads-worker.ts', import.meta.url);
    const workers = Array.from({ length: threads }, () => startWorker(entry, { what, lock: lock.shared, epoch: epoch.shared, n: N, go }));
    const done = workers.map((w) => new Promise<{ wallNs: number }>((ok, bad) => {
      w.once('message', ok);
      w.once('error', bad);
    }));
    while (Atomics.load(gw, 1) < threads) await new Promise((r) => setTimeout(r, 5));
    const cpu0 = process.cpuUsage();
    Atomics.store(gw, 0, 1);
    Atomics.notify(gw, 0);
    const res = await Promise.all(done);
    const cpu = process.cpuUsage(cpu0);
    const processCpuNs = (cpu.user + cpu.system) * 1000;
    await Promise.all(workers.map((w) => w.terminate()));
    rows.push({
      what,
      threads,
      // process.cpuUsage is process-wide: CPU of all threads per pair.
      processCpuNsPerPair: Math.round((processCpuNs / (threads * N)) * 10) / 10,
      wallNsPerPairPerThread: Math.round((Math.max(...res.map((r) => r.wallNs)) / N) * 10) / 10,
    });
  }
}
console.table(rows);
