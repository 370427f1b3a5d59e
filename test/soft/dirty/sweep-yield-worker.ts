// Worker for sweep-yield.test.ts: stands in for a vCPU fault. Waits for the go word, takes the
// MMU lock the way a MAP fault does (faultLock records the contended wait), notes in `got` how
// many sweep chunks the VMM had done when it got in, and releases.
import { parentPort, workerData } from 'node:worker_threads';
import { MmuLock, type MmuLockShared } from '../../../src/soft/locking/mmu-lock.ts';

const d = workerData as { lock: MmuLockShared; words: SharedArrayBuffer };
const lock = MmuLock.attach(d.lock);
// [0] go, [1] chunks the sweep has done (VMM writes), [2] chunks done when this thread got the lock + 1
const w = new Int32Array(d.words);
Atomics.wait(w, 0, 0);
lock.faultLock();
Atomics.store(w, 2, Atomics.load(w, 1) + 1);
lock.faultUnlock();
parentPort!.postMessage('done');
