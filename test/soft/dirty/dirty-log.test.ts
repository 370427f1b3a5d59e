// Dirty-log primitives: the run collector that batches write-protection, and KVM's argument
// rules for KVM_CLEAR_DIRTY_LOG / KVM_GET_DIRTY_LOG.
import { afterEach, describe, expect, it } from 'vitest';
import { RunCollector, allocDirtyBitmap, markPageDirty } from '../../../src/soft/dirty/dirty-bitmap.ts';
import { DirtyLogError } from '../../../src/soft/dirty/dirty-log.ts';
import { makeTestVm, type TestVm } from '../vcpu/harness.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

describe('RunCollector', () => {
  it('emits maximal runs covering exactly the set bits, merged across words', () => {
    let x = 12345;
    const rnd = () => ((x = (x * 1103515245 + 12345) >>> 0), x);
    for (let trial = 0; trial < 200; trial++) {
      const words = new Uint32Array(8);
      for (let i = 0; i < words.length; i++) {
        const k = rnd() % 4;
        words[i] = k === 0 ? 0 : k === 1 ? 0xffffffff : rnd();
      }
      const covered = new Set<number>();
      const runs: [number, number][] = [];
      const rc = new RunCollector((first, n) => {
        runs.push([first, n]);
        for (let p = first; p < first + n; p++) covered.add(p);
      });
      for (let i = 0; i < words.length; i++) rc.addWord(i, words[i]! | 0);
      rc.flush();
      for (let p = 0; p < 256; p++) {
        if (covered.has(p) !== (((words[p >>> 5]! >>> (p & 31)) & 1) === 1)) expect.fail(`trial ${trial}: page ${p} wrongly ${covered.has(p) ? 'covered' : 'missed'}`);
      }
      for (let i = 1; i < runs.length; i++) expect(runs[i]![0]).toBeGreaterThan(runs[i - 1]![0] + runs[i - 1]![1]); // maximal
    }
  });

  it('markPageDirty sets one bit in KVM layout', () => {
    const bm = allocDirtyBitmap(100);
    expect(bm.length).toBe(4); // rounded to 64-bit longs
    markPageDirty(bm, 33);
    markPageDirty(bm, 33);
    expect([...bm]).toEqual([0, 2, 0, 0]);
  });
});

describe('dirty log argument rules', () => {
  it('rejects clear ranges KVM rejects and logs of slots that do not log', async () => {
    const t = (current = await makeTestVm({ bytesPerVcpu: 100 * 4096, vcpusNow: false }));
    expect(() => t.vm.getDirtyLog(0)).toThrow(DirtyLogError);
    t.setLogging(true);
    const bm = new Uint32Array(4);
    expect(() => t.vm.clearDirtyLog(0, 32, 32, bm)).toThrow(/multiple of 64/);
    expect(() => t.vm.clearDirtyLog(0, 0, 40, bm)).toThrow(/not a multiple of 64/);
    expect(() => t.vm.clearDirtyLog(0, 64, 64, bm)).toThrow(/exceeds memslot/);
    expect(() => t.vm.clearDirtyLog(0, 64, 36, bm)).not.toThrow(); // ends at the slot's end
    expect(() => t.vm.clearDirtyLog(3, 0, 64, bm)).toThrow(/no memslot 3/);
  });

  it('clear write-protects only pages that were dirty and named in the mask', async () => {
    const t = (current = await makeTestVm({ bytesPerVcpu: 128 * 4096 }));
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    t.setLogging(true);
    t.vm.allowPasses(2);
    await t.vm.waitForPasses(2);
    expect(t.vm.stats().writableLeaves).toBe(128);
    const mask = new Uint32Array(4);
    mask[0] = 0b1011; // pages 0, 1, 3
    mask[2] = 1 << 31; // page 95
    t.vm.clearDirtyLog(0, 0, 128, mask);
    expect(t.vm.stats().writableLeaves).toBe(124);
    const log = t.vm.getDirtyLog(0);
    expect(log[0]).toBe(0xfffffff4);
    expect(log[2]).toBe(0x7fffffff);
  });
});
