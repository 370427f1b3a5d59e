// Worker of lock-threads.ts: N read lock+unlock pairs, or N epoch enter+exit pairs, timed.
import { parentPort, workerData } from 'node:worker_threads';
import { EpochDomain, type EpochShared } from '../../locking/epoch.ts';
import { RwLock, type RwLockShared } from '../../locking/rwlock.ts';

const d = workerData as { what: 'rwlock' | 'epoch'; lock: RwLockShared; epoch: EpochShared; n: number; go: SharedArrayBuffer };
const go = new Int32Array(d.go);
const lock = RwLock.attach(d.lock);
const epoch = EpochDomain.attach(d.epoch, () => {});
const slot = epoch.claimSlot();
Atomics.add(go, 1, 1);
Atomics.wait(go, 0, 0);
const t0 = process.hrtime.bigint();
if (d.what === 'rwlock') {
  for (let i = 0; i < d.n; i++) {
    lock.readLock();
    lock.readUnlock();
  }
} else {
  for (let i = 0; i < d.n; i++) {
    epoch.readLock(slot);
    epoch.readUnlock(slot);
  }
}
const wallNs = Number(process.hrtime.bigint() - t0);
epoch.releaseSlot(slot);
parentPort!.postMessage({ wallNs });
