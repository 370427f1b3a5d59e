// Worker for rwlock-threads.test.ts: readers check an invariant writers break only while they
// hold the write lock; writers bump two plain (non-atomic) counters with a pause in between.
import { parentPort, workerData } from 'node:worker_threads';
import { RwLock, type RwLockShared } from '../../../src/soft/locking/rwlock.ts';

const d = workerData as { role: 'reader' | 'writer'; lock: RwLockShared; data: SharedArrayBuffer; durationMs: number; writerIters: number };
const lock = RwLock.attach(d.lock);
// [0], [1]: the pair writers keep equal outside their critical section; [2]: readers inside; [3]: stop;
// [4]: readers that have taken the lock once (writers start only when all have, so worker start-up
// jitter on a loaded box cannot let the writers finish alone); [5]: writers still running.
const w = new Int32Array(d.data);
const READERS = 3;
let violations = 0;
let ops = 0;
let opsDuringWriters = 0;
const t0 = Date.now();
let maxWriteWaitMs = 0;

if (d.role === 'reader') {
  while (Atomics.load(w, 3) === 0 && Date.now() - t0 < d.durationMs * 4) {
    lock.readLock();
    Atomics.add(w, 2, 1);
    const a = w[0]!;
    for (let i = 0; i < 50; i++) Atomics.load(w, 3); // hold the lock a little: readers overlap
    if (w[1] !== a || w[0] !== a) violations++;
    Atomics.sub(w, 2, 1);
    lock.readUnlock();
    if (ops++ === 0) Atomics.add(w, 4, 1);
    if (Atomics.load(w, 5) > 0) opsDuringWriters++;
  }
} else {
  while (Atomics.load(w, 4) < READERS) Atomics.wait(w, 3, 0, 1);
  for (let i = 0; i < d.writerIters; i++) {
    const t = Date.now();
    lock.writeLock();
    maxWriteWaitMs = Math.max(maxWriteWaitMs, Date.now() - t);
    if (Atomics.load(w, 2) !== 0) violations++;
    const v = w[0]! + 1;
    w[0] = v;
    for (let k = 0; k < 20; k++) Atomics.load(w, 3);
    w[1] = v;
    lock.writeUnlock();
    ops++;
  }
  Atomics.sub(w, 5, 1);
}
parentPort!.postMessage({ violations, ops, opsDuringWriters, maxWriteWaitMs, sleeps: lock.sleeps });
