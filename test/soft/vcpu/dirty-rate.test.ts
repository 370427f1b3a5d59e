// The dirty-rate guest (guest/workload.ts): which pages it writes with which values (pass by
// pass, against the reference model, pages outside its working set untouched), and that its
// own clock paces it: never faster than asked, halted vCPUs still pause at once.
import { afterEach, describe, expect, it } from 'vitest';
import { bitmapPages, harvest, makeTestVm, snapshotWords, WorkloadModel, type TestVm } from './harness.ts';

let t: TestVm | null = null;
afterEach(async () => {
  await t?.vm.destroy();
  t = null;
});

describe('dirty-rate guest', () => {
  it.each(['sequential', 'random'] as const)('pattern %s: each harvest is exactly the model\'s pages, with its values; the rest of the slice stays zero', async (pattern) => {
    const vcpus = 2;
    const bytesPerVcpu = 256 * 4096;
    t = await makeTestVm({ vcpus, bytesPerVcpu, kind: 'dirty-rate', seed: 3, workloadOptions: { pattern, workingSetBytes: 96 * 4096 } });
    const model = new WorkloadModel(t.spec, vcpus);
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1);
    model.step();
    t.setLogging(true);
    for (let pass = 2; pass <= 5; pass++) {
      t.vm.allowPasses(pass);
      await t.vm.waitForPasses(pass);
      const written = model.step();
      const got = bitmapPages(harvest(t), t.pages);
      expect([...got].sort((a, b) => a - b)).toEqual([...written].sort((a, b) => a - b));
      const words = snapshotWords(t);
      for (let p = 0; p < t.pages; p++) if (words[p] !== model.expected(p)) expect.fail(`page ${p}: ${words[p]} != ${model.expected(p)}`);
    }
    const words = snapshotWords(t);
    for (let v = 0; v < vcpus; v++) for (let p = 96; p < 256; p++) expect(words[v * 256 + p]).toBe(0);
  });

  it('paces itself: never faster than asked, and a vCPU halted on its timer pauses at once', async () => {
    const vcpus = 2;
    // 2 MiB/s per vCPU = 512 pages/s; a 64-page working set: a pass every 125 ms.
    t = await makeTestVm({ vcpus, bytesPerVcpu: 64 * 4096, kind: 'dirty-rate', workloadOptions: { dirtyRate: 2 * 2 ** 20 } });
    t.vm.allowPasses(Infinity);
    await t.vm.waitForPasses(1);
    const s0 = t.vm.stats();
    const t0 = performance.now();
    await new Promise((r) => setTimeout(r, 1000));
    const s1 = t.vm.stats();
    const seconds = (performance.now() - t0) / 1000;
    const pagesPerSec = (s1.guestPagesWritten! - s0.guestPagesWritten!) / seconds;
    // 1024 pages/s asked for both; the clock only ever holds a vCPU back. On a loaded machine a
    // starved vCPU may fall behind, so only a gross shortfall fails.
    expect(pagesPerSec).toBeLessThan(1024 * 1.1);
    expect(pagesPerSec).toBeGreaterThan(1024 * 0.5);
    expect(s1.guestTimerHalts! - s0.guestTimerHalts!).toBeGreaterThan(10);
    const p0 = performance.now();
    await t.vm.pause();
    expect(performance.now() - p0).toBeLessThan(500);
    const frozen = t.vm.stats().guestPagesWritten;
    await new Promise((r) => setTimeout(r, 100));
    expect(t.vm.stats().guestPagesWritten).toBe(frozen);
    t.vm.resume();
  });
});
