// Test worker: allocates and frees frames concurrently with other workers, then reports the
// frames it still holds (4 KiB and 2 MiB heads) in its slice of `held`.
import { workerData, parentPort } from 'node:worker_threads';
import { HostMemory, type HostMemoryShared } from '../../../src/soft/hostmem/index.ts';

interface Data {
  mem: HostMemoryShared;
  sync: SharedArrayBuffer;
  held: SharedArrayBuffer;
  worker: number;
  perWorker: number;
  rounds: number;
}

const d = workerData as Data;
const mem = HostMemory.attach(d.mem);
const sync = new Int32Array(d.sync);
const held = new Int32Array(d.held);
Atomics.add(sync, 1, 1);
Atomics.wait(sync, 0, 0);

const small: number[] = [];
const huge: number[] = [];
let rnd = d.worker * 7919 + 1;
const next = () => (rnd = (rnd * 1103515245 + 12345) & 0x7fffffff);
for (let r = 0; r < d.rounds; r++) {
  while (small.length + huge.length < d.perWorker) {
    if (next() % 16 === 0) {
      const h = mem.allocHugeFrame();
      if (h >= 0) huge.push(h);
    } else {
      const p = mem.allocFrame();
      if (p < 0) break;
      // stamp the frame: a frame handed to two owners would lose one of the stamps
      mem.windows[p >>> 18]![(p & 0x3ffff) << 10] = d.worker + 1;
      small.push(p);
    }
  }
  // free a random half, through putPage (the last reference) or freeFrame
  for (let i = small.length - 1; i >= 0; i--) {
    if (next() % 2 === 0) continue;
    const p = small[i]!;
    if (mem.windows[p >>> 18]![(p & 0x3ffff) << 10] !== d.worker + 1) throw new Error(`frame ${p} was overwritten by another owner`);
    if (i % 2 === 0) mem.putPage(p);
    else mem.freeFrame(p);
    small[i] = small[small.length - 1]!;
    small.pop();
  }
  for (let i = huge.length - 1; i >= 0; i--) {
    if (next() % 2 === 0) continue;
    mem.freeHugeFrame(huge[i]!);
    huge[i] = huge[huge.length - 1]!;
    huge.pop();
  }
}
const base = d.worker * (d.perWorker + 1);
held[base] = small.length + huge.length;
let k = 1;
for (const p of small) held[base + k++] = p;
for (const h of huge) held[base + k++] = -h - 1; // negative: a 2 MiB head
parentPort!.postMessage('done');
