// A test thread for the same-page race (same-page-race.test.ts): attach to the userfaultfd model
// and fault every page in a random order, checking each page's contents once it is in.
import { parentPort, workerData } from 'node:worker_threads';
import { HostMemory, type HostMemoryShared } from '../../../src/soft/hostmem/host-memory.ts';
import { HostAddressSpace, type HostAddressSpaceShared } from '../../../src/soft/hostmm/host-address-space.ts';
import { SoftUserfaultfd, type UffdShared } from '../../../src/soft/uffd/userfaultfd.ts';

interface Data {
  shared: UffdShared;
  mem: HostMemoryShared;
  mm: HostAddressSpaceShared;
  thread: number;
  seed: number;
  /** Fault the pages in order of this many distinct "hot" pages first (they race hardest). */
  hot: number;
}

const d = workerData as Data;
const mem = HostMemory.attach(d.mem);
const mm = HostAddressSpace.attach(d.mm, mem);
const u = new SoftUserfaultfd(d.shared, mm, mem, null);
const n = d.shared.layout.totalPages;
let x = d.seed >>> 0 || 1;
const rnd = (k: number) => {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return (x >>> 0) % k;
};
// Hot pages first (every thread starts on them together), then all pages in a random order.
const order: number[] = [...Array(d.hot).keys()];
const rest = [...Array(n).keys()];
for (let i = n - 1; i > 0; i--) {
  const j = rnd(i + 1);
  [rest[i], rest[j]] = [rest[j]!, rest[i]!];
}
order.push(...rest);
const buf = new Uint32Array(1024);
const bytes = new Uint8Array(buf.buffer);
const src = new Uint32Array(d.shared.source!);
let wrong = 0;
let notResumed = 0;
for (const i of order) {
  if (!u.fault(i, d.thread)) notResumed++;
  mm.read(u.hva(i), bytes);
  for (let w = 0; w < 1024; w++) {
    if (buf[w] !== src[i * 1024 + w]) {
      wrong++;
      break;
    }
  }
}
parentPort!.postMessage({ wrong, notResumed, faults: order.length });
