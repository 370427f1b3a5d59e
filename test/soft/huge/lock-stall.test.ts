// The MMU-lock stall recorder: what it reports, reset by generation, and that only a contended
// acquisition records anything.
import { describe, expect, it } from 'vitest';
import { startWorker } from '../../../src/util/worker.ts';
import { LockStallRecorder } from '../../../src/soft/locking/lock-stall.ts';
import { MmuLock } from '../../../src/soft/locking/mmu-lock.ts';

describe('LockStallRecorder', () => {
  it('sums, maxes and finds the 99th percentile of the waits; reset forgets them', () => {
    const r = new LockStallRecorder(LockStallRecorder.newBuffer());
    for (let i = 0; i < 990; i++) r.record(1000); // 1 us
    for (let i = 0; i < 10; i++) r.record(5_000_000); // 5 ms
    let s = r.summary();
    expect(s.waits).toBe(1000);
    expect(s.maxSeconds).toBeCloseTo(0.005, 9);
    expect(s.sumSeconds).toBeCloseTo(990e-6 + 0.05, 9);
    // p99 falls in the 1 us bucket (bucket bounds are within 19%).
    expect(s.p99Seconds).toBeGreaterThanOrEqual(1e-6);
    expect(s.p99Seconds).toBeLessThan(1.2e-6);
    r.reset();
    expect(r.summary().waits).toBe(0);
    r.record(2000);
    s = r.summary();
    expect(s.waits).toBe(1);
    expect(s.maxSeconds).toBeCloseTo(2e-6, 9);
  });

  it('an uncontended fault lock records nothing; one that waits for an exclusive holder records the wait', async () => {
    const lock = MmuLock.create('parallel');
    lock.faultLock();
    lock.faultUnlock();
    lock.relaxLock();
    lock.relaxUnlock();
    expect(lock.stalls!.summary().waits).toBe(0);
    const go = new Int32Array(new SharedArrayBuffer(8));
    const w = startWorker(new URL('./lock-stall-worker.ts', import.meta.url), { lock: lock.shared, go: go.buffer });
    const done = new Promise((resolve, reject) => {
      w.once('message', resolve);
      w.once('error', reject);
    });
    try {
      while (Atomics.load(go, 0) === 0) await new Promise((r) => setTimeout(r, 1));
      lock.exclusiveLock();
      Atomics.store(go, 1, 1);
      Atomics.notify(go, 1);
      const t0 = performance.now();
      while (performance.now() - t0 < 30) {
        /* hold the lock ~30 ms: the worker's faultLock must wait */
      }
      lock.exclusiveUnlock();
      await done;
    } finally {
      await w.terminate();
    }
    const s = lock.stalls!.summary();
    expect(s.waits).toBe(1);
    expect(s.maxSeconds).toBeGreaterThan(0.005);
    expect(s.maxSeconds).toBeLessThan(5);
    expect(s.perThread.length).toBe(1);
  });
});
