// Test worker: attaches host memory and the host address space, waits for the start signal, then
// touches pages through getUserPage in the mode the test asks for.
import { workerData, parentPort } from 'node:worker_threads';
import { HostMemory, type HostMemoryShared } from '../../../src/soft/hostmem/index.ts';
import { HostAddressSpace, GupResult, type HostAddressSpaceShared } from '../../../src/soft/hostmm/index.ts';

interface Data {
  mem: HostMemoryShared;
  as: HostAddressSpaceShared;
  hva: number;
  pages: number;
  /** Int32: [0] = start flag; per-worker results follow. */
  sync: SharedArrayBuffer;
  results: SharedArrayBuffer;
  worker: number;
  mode: 'touch' | 'race-munmap' | 'uffd-copy' | 'fault-loop';
}

const d = workerData as Data;
const mem = HostMemory.attach(d.mem);
const as = HostAddressSpace.attach(d.as, mem);
const sync = new Int32Array(d.sync);
const results = new Int32Array(d.results);
const out = new GupResult();

Atomics.add(sync, 1, 1); // ready
Atomics.wait(sync, 0, 0);

if (d.mode === 'touch') {
  // Each worker walks the pages in a different order so first touches collide.
  for (let n = 0; n < d.pages; n++) {
    const i = d.worker % 2 === 0 ? n : d.pages - 1 - n;
    const pfn = as.getUserPage(d.hva + i * 4096 + 8, true, out);
    results[d.worker * d.pages + i] = pfn;
    if (pfn >= 0) {
      mem.windows[pfn >>> 18]![((pfn & 0x3ffff) << 10) + d.worker] = i + 1;
      mem.releasePfn(pfn);
    }
  }
} else if (d.mode === 'uffd-copy') {
  // Every worker copies its own pattern into every page; exactly one copy per page may win.
  const page = new Uint8Array(4096).fill(d.worker + 1);
  for (let i = 0; i < d.pages; i++) results[d.worker * d.pages + i] = as.uffdCopy(d.hva + i * 4096, page);
} else if (d.mode === 'fault-loop') {
  // Fault protocol over and over until the main thread sets sync[3]; the main thread zaps and
  // splits meanwhile. Counts ok / retry / error in results.
  let ok = 0;
  let retries = 0;
  let errors = 0;
  for (let round = 0; Atomics.load(sync, 3) === 0; round++) {
    const i = (round * 7 + d.worker * 131) % d.pages;
    const seq = as.notifierSeq();
    const pfn = as.getUserPage(d.hva + i * 4096, (round & 1) === 0, out);
    if (pfn < 0) {
      errors++;
      continue;
    }
    if (as.retryNeeded(seq)) retries++;
    else ok++;
    mem.releasePfn(pfn);
    if (round === 1000) Atomics.add(sync, 2, 1);
  }
  results[d.worker * 3] = ok;
  results[d.worker * 3 + 1] = retries;
  results[d.worker * 3 + 2] = errors;
} else {
  // The KVM fault protocol against a concurrent munmap: seq, gup, check retry, release.
  let ok = 0;
  let retries = 0;
  let efaults = 0;
  for (let round = 0; efaults === 0 && round < 50_000_000; round++) { // the cap only stops a hang
    const i = round % d.pages;
    const seq = as.notifierSeq();
    const pfn = as.getUserPage(d.hva + i * 4096, true, out);
    if (pfn < 0) {
      efaults++;
      break;
    }
    if (as.retryNeeded(seq)) retries++;
    else ok++;
    mem.releasePfn(pfn);
    if (round === 2000) Atomics.add(sync, 2, 1); // tell main this worker is mid-stream
  }
  results[d.worker * 3] = ok;
  results[d.worker * 3 + 1] = retries;
  results[d.worker * 3 + 2] = efaults;
}
parentPort!.postMessage('done');
