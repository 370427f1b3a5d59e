// `bench demand-paging --host-uffd`: demand_paging_test's shape on the host kernel's real
// userfaultfd (the addon), no VM and no KVM: `vcpus` touching threads each write one word to
// every 4 KiB page of their own `bytesPerVcpu` slice once; every first touch is a fault that
// `readers` native pthreads per uffd (one uffd for all slices with sharedUffd, demand_paging_test
// -a, else one per slice) resolve after `delayUs` by COPY from a source buffer (MISSING,
// anonymous memory) or by writing the page through a second mapping of the memfd and CONTINUE
// (MINOR, shared memory). The rates read the same way as demand_paging_test's lines:
// per-vCPU = its pages / its own time; overall = all pages / the slowest thread's time.
//
// Concurrency: touching threads (workers) write only their own slice of the registered mapping
// and their own slot of `timing` (Atomics); they start together when the main thread bumps the
// start word. Reader pthreads read the source (written before the start, never after) and, for
// MINOR, the alias mapping's page at the faulting offset, which no toucher reaches before the
// CONTINUE that wakes it. The main thread reads registered memory only after every toucher is
// done and every reader is stopped.
import { Worker } from 'node:worker_threads';
import { Userfaultfd, anonymousMemory, sharedMemoryPair, type NativeUffdHandler } from '../uffd/userfaultfd.ts';

export interface HostUffdBenchOptions { vcpus: number; bytesPerVcpu: number; mode: 'missing' | 'minor'; sharedUffd: boolean; readers: number; delayUs: number; }
export interface HostUffdBenchResult { vcpus: number; pages: number; seconds: number; perVcpuPagesPerSec: number[]; overallPagesPerSec: number; handler: string /* e.g. 'native-pthread' */; }

const PAGE = 4096;

/** A touching thread: waits for the start word, writes word 1 of each page of its slice, reports its time (ns). */
const TOUCHER = `
const { workerData, parentPort } = require('node:worker_threads');
const { buffer, firstPage, pages, timing, slot } = workerData;
const words = new Int32Array(buffer);
const t = new Float64Array(timing);
const start = new Int32Array(timing, 0, 1);
parentPort.postMessage('ready');
Atomics.wait(start, 0, 0);
const t0 = process.hrtime.bigint();
for (let p = firstPage, end = firstPage + pages; p < end; p++) words[p * 1024 + 1] = p;
t[1 + slot] = Number(process.hrtime.bigint() - t0);
parentPort.postMessage('done');
`;

function check(o: HostUffdBenchOptions): void {
  if (!Number.isInteger(o.vcpus) || o.vcpus < 1 || o.vcpus > 512) throw new RangeError(`host-uffd: vcpus must be 1..512, got ${o.vcpus}`);
  if (!Number.isInteger(o.bytesPerVcpu) || o.bytesPerVcpu < PAGE || o.bytesPerVcpu % PAGE !== 0) throw new RangeError(`host-uffd: bytesPerVcpu must be a positive multiple of ${PAGE}, got ${o.bytesPerVcpu}`);
  if (!Number.isInteger(o.readers) || o.readers < 1 || o.readers > 64) throw new RangeError(`host-uffd: readers must be 1..64, got ${o.readers}`);
  if (!(o.delayUs >= 0)) throw new RangeError(`host-uffd: delayUs must be >= 0, got ${o.delayUs}`);
  if (o.mode !== 'missing' && o.mode !== 'minor') throw new RangeError(`host-uffd: mode must be missing or minor, got ${String(o.mode)}`);
}

export async function runHostUffdBench(o: HostUffdBenchOptions): Promise<HostUffdBenchResult> {
  check(o);
  const bytes = o.vcpus * o.bytesPerVcpu;
  const pagesPerVcpu = o.bytesPerVcpu / PAGE;
  // The source: page p holds p + 1 in its first word (the touch writes word 1, so both show).
  const source = new Uint8Array(bytes);
  const srcWords = new Int32Array(source.buffer);
  for (let p = 0; p < bytes / PAGE; p++) srcWords[p * 1024] = p + 1;

  let mem: { hva: number; buffer: SharedArrayBuffer; aliasHva?: number };
  if (o.mode === 'missing') {
    mem = anonymousMemory(bytes);
  } else {
    const shm = sharedMemoryPair(bytes);
    // Every page in the page cache first, so a touch through `hva` is a MINOR fault.
    new Uint8Array(shm.alias).fill(0);
    mem = shm;
  }
  const uffds: Userfaultfd[] = [];
  const handlers: NativeUffdHandler[] = [];
  const workers: Worker[] = [];
  try {
    const slices = o.sharedUffd ? [{ off: 0, len: bytes }] : Array.from({ length: o.vcpus }, (_, v) => ({ off: v * o.bytesPerVcpu, len: o.bytesPerVcpu }));
    const srcAddr = Userfaultfd.addressOf(source);
    for (const s of slices) {
      const u = Userfaultfd.open();
      uffds.push(u);
      u.register(mem.hva + s.off, s.len, [o.mode]);
      const range = { dst: mem.hva + s.off, len: s.len, src: srcAddr + s.off, ...(mem.aliasHva !== undefined ? { alias: mem.aliasHva + s.off } : {}) };
      handlers.push(u.startHandler({ mode: o.mode === 'missing' ? 'copy' : 'continue', readers: o.readers, delayUs: o.delayUs, ranges: [range] }));
    }

    const timing = new SharedArrayBuffer(8 * (1 + o.vcpus));
    const done: Promise<void>[] = [];
    const ready: Promise<void>[] = [];
    for (let v = 0; v < o.vcpus; v++) {
      const w = new Worker(TOUCHER, { eval: true, workerData: { buffer: mem.buffer, firstPage: v * pagesPerVcpu, pages: pagesPerVcpu, timing, slot: v } });
      workers.push(w);
      ready.push(new Promise((res, rej) => { w.once('message', () => res()); w.once('error', rej); }));
      done.push(new Promise((res, rej) => {
        w.on('message', (m) => { if (m === 'done') res(); });
        w.once('error', rej);
        w.once('exit', (c) => (c === 0 ? res() : rej(new Error(`host-uffd: touching thread ${v} exited with ${c}`))));
      }));
    }
    await Promise.all(ready);
    const start = new Int32Array(timing, 0, 1);
    const t0 = process.hrtime.bigint();
    Atomics.store(start, 0, 1);
    Atomics.notify(start, 0);
    await untilDoneOrReaderFails(done, handlers, uffds);
    const wall = Number(process.hrtime.bigint() - t0) / 1e9;
    let faults = 0;
    for (const h of handlers) faults += h.stop().resolved;
    handlers.length = 0;
    const times = new Float64Array(timing, 8, o.vcpus);
    const pages = bytes / PAGE;
    if (faults !== pages) throw new Error(`host-uffd: ${faults} pages resolved, expected ${pages} (every page faults exactly once)`);
    // `source` is used here last: it must stay reachable (not collected and unmapped) for as
    // long as the readers copy from its address.
    verify(mem.buffer, srcWords, pages);
    const slowest = Math.max(...times) / 1e9;
    return {
      vcpus: o.vcpus,
      pages,
      seconds: slowest || wall,
      perVcpuPagesPerSec: Array.from(times, (ns) => pagesPerVcpu / (ns / 1e9)),
      overallPagesPerSec: pages / (slowest || wall),
      handler: 'native-pthread',
    };
  } finally {
    for (const h of handlers) {
      try { h.stop(); } catch { /* already failing */ }
    }
    await Promise.all(workers.map((w) => w.terminate()));
    for (const u of uffds) u.close();
  }
}

/** Every page came from the source (word 0) and kept the toucher's write (word 1). */
function verify(buffer: SharedArrayBuffer, src: Int32Array, pages: number): void {
  const w = new Int32Array(buffer);
  for (let p = 0; p < pages; p++) {
    if (w[p * 1024] !== src[p * 1024] || w[p * 1024 + 1] !== p) throw new Error(`host-uffd: page ${p} is wrong after the run (words ${w[p * 1024]}, ${w[p * 1024 + 1]})`);
  }
}

/**
 * Wait for the touching threads; if a reader fails, its fault is never resolved and the thread
 * that took it would sleep forever: close the uffds (which wakes every waiter, who then faults
 * as if nothing was registered) and throw the reader's error (op + errno).
 */
async function untilDoneOrReaderFails(done: Promise<void>[], handlers: NativeUffdHandler[], uffds: Userfaultfd[]): Promise<void> {
  const all = Promise.all(done);
  for (;;) {
    const finished = await Promise.race([all.then(() => true), new Promise<false>((r) => setTimeout(() => r(false), 100))]);
    if (finished) return;
    if (handlers.some((h) => h.counters().errors > 0)) {
      const errs: unknown[] = [];
      for (const h of handlers) {
        try {
          h.stop();
        } catch (e) {
          errs.push(e);
        }
      }
      uffds.forEach((u) => u.close());
      await all.catch(() => undefined);
      throw errs[0];
    }
  }
}
