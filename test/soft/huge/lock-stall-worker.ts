// Worker for lock-stall.test.ts: signal readiness, then take the fault lock (and the relax lock)
// once each, through MmuLock, the way a vCPU's fault does.
import { parentPort, workerData } from 'node:worker_threads';
import { MmuLock, type MmuLockShared } from '../../../src/soft/locking/mmu-lock.ts';

const d = workerData as { lock: MmuLockShared; go: SharedArrayBuffer };
const lock = MmuLock.attach(d.lock);
const go = new Int32Array(d.go);
Atomics.store(go, 0, 1);
// Wait until the main thread holds the lock exclusively.
while (Atomics.load(go, 1) === 0) Atomics.wait(go, 1, 0, 5);
lock.faultLock();
lock.faultUnlock();
parentPort!.postMessage('done');
