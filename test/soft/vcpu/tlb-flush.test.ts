// Remote TLB flush under concurrency: once a write-protecting call (clear-dirty-log, get without
// manual protect, logging enable) returns, no vCPU writes through a stale writable soft-TLB
// entry: its next write faults and is logged. Many vCPUs on two cores give random interleavings.
import { afterEach, describe, expect, it } from 'vitest';
import { Worker } from 'node:worker_threads';
import { MMU_LOCK_MODES } from '../../../src/vmm/engine.ts';
import { bitmapPages, makeTestVm, nextPassEverywhere, snapshotWords, type TestVm } from './harness.ts';
import { flushRemoteTlbs } from '../../../src/soft/vcpu/tlb-flush.ts';
import { G_FLUSH_GEN, GuestMode_InGuest, V_FLUSH_ACK, V_MODE, newControlBlock, vcpuBase } from '../../../src/soft/vcpu/control.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

/** xorshift32 for the test's own random choices (not the guest's generator). */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x;
  };
}

describe.each(MMU_LOCK_MODES)('remote TLB flush, lock %s', (lock) => {
  it('random partial clears: every page written after a clear returns is in the next log', async () => {
    const vcpus = 4;
    const t = (current = await makeTestVm({ lock, vcpus, bytesPerVcpu: 64 * 4096, kind: 'random', seed: 3 }));
    const rand = rng(0x5eed + MMU_LOCK_MODES.indexOf(lock) + 1);
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    t.setLogging(true);
    t.vm.allowPasses(Infinity);
    let afterClear = snapshotWords(t);
    let checked = 0;
    for (let round = 0; round < 25; round++) {
      const before = snapshotWords(t);
      const bm = t.vm.getDirtyLog(0);
      const dirty = bitmapPages(bm, t.pages);
      for (let p = 0; p < t.pages; p++) {
        if (before[p] !== afterClear[p]) {
          checked++;
          if (!dirty.has(p)) expect.fail(`round ${round}: page ${p} written after the last clear returned, missing from the log`);
        }
      }
      // Clear a random subset of 64-page chunks, with a random subset of their bits.
      for (let first = 0; first < t.pages; first += 64) {
        if ((rand() & 3) === 0) continue;
        const mask = new Uint32Array(2);
        mask[0] = bm[first >>> 5]! & rand();
        mask[1] = bm[(first >>> 5) + 1]! & rand();
        t.vm.clearDirtyLog(0, first, 64, mask);
      }
      // Pages left dirty stay dirty, so comparing against this snapshot is still exact.
      afterClear = snapshotWords(t);
      if ((round & 3) === 0) await nextPassEverywhere(t); // otherwise back to back: harvests land mid-pass
    }
    expect(checked).toBeGreaterThan(20);
    const st = t.vm.stats();
    expect(st.tlbFlushesAcked).toBeGreaterThan(0);
    expect(st.remoteTlbFlushes).toBeGreaterThan(0);
  });
});

describe('flushRemoteTlbs handshake', () => {
  it('skips vCPUs outside guest mode and ones that already acknowledged', () => {
    const ctl = newControlBlock(2);
    expect(flushRemoteTlbs(ctl, 2)).toBe(1);
    expect(Atomics.load(ctl, G_FLUSH_GEN)).toBe(1);
    Atomics.store(ctl, vcpuBase(0) + V_MODE, GuestMode_InGuest);
    Atomics.store(ctl, vcpuBase(0) + V_FLUSH_ACK, 5);
    expect(flushRemoteTlbs(ctl, 2)).toBe(2);
  });

  it('does not return before a vCPU in guest mode has acknowledged', async () => {
    const ctl = newControlBlock(1);
    const done = new Int32Array(new SharedArrayBuffer(8));
    Atomics.store(ctl, vcpuBase(0) + V_MODE, GuestMode_InGuest);
    // A stand-in vCPU thread: waits until a flush is requested, finishes its "access" (done=1),
    // then acknowledges the generation it saw.
    const w = new Worker(
      `const { workerData } = require('node:worker_threads');
       const ctl = new Int32Array(workerData.ctl); const done = new Int32Array(workerData.done);
       while (Atomics.load(ctl, ${G_FLUSH_GEN}) === 0) {}
       const end = Date.now() + 30; while (Date.now() < end) {}
       Atomics.store(done, 0, 1);
       Atomics.store(ctl, ${vcpuBase(0) + V_FLUSH_ACK}, Atomics.load(ctl, ${G_FLUSH_GEN}));
       Atomics.notify(ctl, ${vcpuBase(0) + V_FLUSH_ACK});`,
      { eval: true, workerData: { ctl: ctl.buffer, done: done.buffer } },
    );
    await new Promise((r) => w.once('online', r));
    flushRemoteTlbs(ctl, 1);
    expect(Atomics.load(done, 0)).toBe(1);
    await w.terminate();
  });
});
