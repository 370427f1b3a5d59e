// Worker of map-threads.ts: maps its own slice of 4K pages as a fault handler would (fault lock
// around each map), then reports its CPU and wall time.
import { parentPort, workerData } from 'node:worker_threads';
import { MmuLock, type MmuLockShared } from '../../locking/mmu-lock.ts';
import { PROT_RW } from '../pte.ts';
import { EAGAIN, Stage2PageTable, type Stage2Shared } from '../stage2.ts';

const d = workerData as { pgt: Stage2Shared; lock: MmuLockShared; firstGfn: number; pages: number; go: SharedArrayBuffer };
const pgt = Stage2PageTable.attach(d.pgt);
const lock = MmuLock.attach(d.lock);
const shared = lock.faultShared;
const go = new Int32Array(d.go);
Atomics.add(go, 1, 1);
Atomics.wait(go, 0, 0);
const t0 = process.hrtime.bigint();
let retries = 0;
for (let g = d.firstGfn; g < d.firstGfn + d.pages; g++) {
  for (;;) {
    lock.faultLock();
    const r = pgt.map(g, 3, g + 1, PROT_RW, shared);
    lock.faultUnlock();
    if (r !== EAGAIN) break;
    retries++;
  }
}
const wallNs = Number(process.hrtime.bigint() - t0);
pgt.detach();
parentPort!.postMessage({ wallNs, retries, lockSleeps: lock.rw.sleeps });
