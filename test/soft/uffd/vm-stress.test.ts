// Demand paging under the run loop: many vCPUs touching pages in a random order while the main
// thread pushes pages, pause / resume while vCPUs sleep on pages (a kick must not be lost), and
// destroy() in the middle of it.
import { describe, it, expect, afterEach } from 'vitest';
import { makeTestVm, type TestVm } from '../vcpu/harness.ts';
import type { FaultPath } from '../../../src/vmm/demand-paging.ts';
import { PAGE, makeSource, sourcePage } from './helpers.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

/** Words 2..1023 of every page equal the source (word 0 is the guest's; random pages vary). */
function expectBodiesEqualSource(t: TestVm, src: SharedArrayBuffer): void {
  const all = new Uint8Array(t.pages * PAGE);
  t.vm.readGuest(t.spec.gpaBase, all);
  const got = new Uint32Array(all.buffer);
  const want = new Uint32Array(src);
  let bad = 0;
  for (let i = 0; i < t.pages; i++) for (let w = 2; w < 1024; w++) if (got[i * 1024 + w] !== want[i * 1024 + w]) { bad++; break; }
  expect(bad).toBe(0);
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('soft demand paging under the run loop', () => {
  for (const path of ['uffd', 'exit'] as FaultPath[]) {
    it(`path ${path}: 8 vCPUs, random order, main-thread pushes racing requests, pause/resume while vCPUs wait`, async () => {
      const vcpus = 8;
      const perVcpu = 96;
      const t = (current = await makeTestVm({ vcpus, bytesPerVcpu: perVcpu * PAGE, kind: 'random', hostRamBytes: 64 * 2 ** 20 }));
      const src = makeSource(t.pages);
      // 300 us per fetch: vCPUs spend most of their time asleep on pages, where pauses land.
      const pager = t.vm.startDemandPaging({ path, mode: 'missing', sharedUffd: path === 'uffd', readers: 2, localSource: { buffer: src, delayUs: 300 } });
      t.vm.allowPasses(3);
      let pushed = 0;
      let pauses = 0;
      const done = t.vm.waitForPasses(3, 120_000).then(() => true);
      let finished = false;
      void done.then(() => (finished = true), () => (finished = true));
      let next = 0;
      while (!finished) {
        for (let k = 0; k < 8 && next < t.pages; k++, next += 5) {
          pager.install(0, next, sourcePage(src, next));
          pushed++;
        }
        if (pauses < 6) {
          await t.vm.pause(); // hangs (and times out) if a vCPU asleep on a page missed its kick
          pauses++;
          // Paused means paused: no vCPU asleep on a page wakes to run on (the readers may
          // still install pages meanwhile), and none waits on the page any more.
          const before = JSON.stringify(t.vm.progress());
          const faultsBefore = pager.stats().faults;
          await sleep(5);
          expect(JSON.stringify(t.vm.progress())).toBe(before);
          expect(pager.stats().faults).toBe(faultsBefore);
          t.vm.resume();
        }
        await sleep(3);
      }
      await done;
      expect(pauses).toBeGreaterThan(0);
      const s = pager.stats();
      expect(s.requests).toBeLessThanOrEqual(t.pages);
      expect(s.installed + s.duplicates).toBe(s.requests + pushed);
      expectBodiesEqualSource(t, src); // also faults in the pages the random walk never touched
      expect(pager.missingCount()).toBe(0);
      expect(pager.stats().installed).toBe(t.pages);
      const w = pager.waits();
      expect(w.length).toBe(vcpus);
      for (const x of w) expect(x.faults).toBeGreaterThan(0);
    }, 180_000);
  }

  it('destroy() while vCPUs sleep on pages nobody will install returns promptly', async () => {
    const t = await makeTestVm({ vcpus: 4, bytesPerVcpu: 16 * PAGE });
    const pager = t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: false, readers: 2 });
    let requests = 0;
    pager.onRequest(() => requests++); // never answered
    t.vm.allowPasses(1);
    const t0 = Date.now();
    while (requests < 4 && Date.now() - t0 < 20_000) await sleep(5);
    expect(requests).toBe(4); // one per vCPU: each waits on its first page
    const t1 = Date.now();
    await t.vm.destroy();
    expect(Date.now() - t1).toBeLessThan(5_000);
  }, 60_000);

  it('pause while vCPUs sleep on unanswered requests; answer while paused; resume completes', async () => {
    const t = (current = await makeTestVm({ vcpus: 3, bytesPerVcpu: 8 * PAGE }));
    const src = makeSource(t.pages);
    const pager = t.vm.startDemandPaging({ path: 'exit', mode: 'missing', sharedUffd: true, readers: 1 });
    const pending: number[] = [];
    pager.onRequest((r) => pending.push(r.page));
    t.vm.allowPasses(1);
    while (pending.length < 3) await sleep(2);
    await t.vm.pause(); // all three are asleep on pages
    for (const p of pending.splice(0)) pager.install(0, p, sourcePage(src, p));
    pager.onRequest((r) => pager.install(0, r.page, sourcePage(src, r.page)));
    t.vm.resume();
    await t.vm.waitForPasses(1, 60_000);
    expect(pager.stats()).toMatchObject({ installed: t.pages, duplicates: 0, missing: 0 });
  }, 60_000);
});
