// The kvm engine's demand paging on the host's real userfaultfd: a guest touching missing pages
// blocks in KVM_RUN until the page is served (by the native readers from a local source, or by
// install() on this thread after a PageRequest), and its memory is right afterwards.
import { afterEach, describe, expect, it } from 'vitest';
import { DemandPagingError, type DemandPager, type PageRequest } from '../../src/vmm/demand-paging.ts';
import type { Vm } from '../../src/vmm/engine.ts';
import { createWorkloadVm, type WorkloadVm } from '../../src/vmm/workload-vm.ts';
import { openKvmOrReason } from './kvm-env.ts';

const { engine, reason } = await openKvmOrReason();
const live: Vm[] = [];
afterEach(async () => {
  await Promise.all(live.splice(0).map((vm) => vm.destroy()));
});

const PAGE = 4096;
const VCPUS = 2;
const PAGES_PER_VCPU = 64;
const PAGES = VCPUS * PAGES_PER_VCPU;

/** Source contents: every byte of page p is a function of (p, offset), never all zero. */
function source(): SharedArrayBuffer {
  const b = new SharedArrayBuffer(PAGES * PAGE);
  const u = new Uint8Array(b);
  for (let i = 0; i < u.length; i++) u[i] = ((i >>> 12) * 31 + (i & 4095) * 7 + 1) & 0xff;
  return b;
}

async function workloadVm(): Promise<WorkloadVm> {
  const w = await createWorkloadVm(engine!, { vcpus: VCPUS, bytesPerVcpu: PAGES_PER_VCPU * PAGE, backing: 'anonymous', workload: 'sequential' });
  live.push(w.vm);
  return w;
}

/** After one sequential pass: word 0 of each page is the guest's write, the rest the source's. */
function expectServed(w: WorkloadVm, src: SharedArrayBuffer): void {
  const got = new Uint8Array(PAGES * PAGE);
  w.vm.readGuest(w.spec.gpaBase, got);
  const want = new Uint8Array(src);
  for (let p = 0; p < PAGES; p++) {
    const dv = new DataView(got.buffer, p * PAGE, 8);
    const vcpu = Math.floor(p / PAGES_PER_VCPU);
    expect([dv.getUint32(4, true), dv.getUint32(0, true)], `page ${p}: the guest's write`).toEqual([vcpu + 1, 1]);
    const tail = got.subarray(p * PAGE + 8, (p + 1) * PAGE);
    if (!tail.every((b, i) => b === want[p * PAGE + 8 + i])) expect.fail(`page ${p}: not the source's contents`);
  }
}

async function runOnePass(vm: Vm): Promise<void> {
  vm.allowPasses(1);
  await vm.waitForPasses(1, 30_000);
}

describe(`kvm demand paging${engine ? '' : ` — skipped: ${reason}`}`, () => {
  it.skipIf(!engine)("offers path 'uffd' and never 'exit'", () => {
    expect(engine!.capabilities().demandPagingPaths).toEqual(['uffd']);
  });

  it.skipIf(!engine)("path 'exit' is refused saying what the kernel lacks", async () => {
    const w = await workloadVm();
    const err = (() => {
      try {
        w.vm.startDemandPaging!({ path: 'exit', mode: 'missing', sharedUffd: true, readers: 1 });
      } catch (e) {
        return e;
      }
    })();
    expect(err).toBeInstanceOf(DemandPagingError);
    expect((err as Error).message).toMatch(/KVM_MEM_EXIT_ON_MISSING.*never merged upstream/);
  });

  for (const sharedUffd of [true, false]) {
    for (const mode of ['missing', 'minor'] as const) {
      it.skipIf(!engine)(`${mode}, localSource, ${sharedUffd ? 'one uffd' : 'one uffd per vCPU'}, 2 readers: the guest is served from the source`, async () => {
        const w = await workloadVm();
        const src = source();
        const pager = w.vm.startDemandPaging!({ path: 'uffd', mode, sharedUffd, readers: 2, localSource: { buffer: src, delayUs: 0 } });
        expect(pager.missingCount()).toBe(PAGES);
        await runOnePass(w.vm);
        expect(pager.missingCount()).toBe(0);
        const st = pager.stats();
        expect(st.installed).toBe(PAGES);
        expect(st.faults).toBeGreaterThanOrEqual(PAGES);
        const waits = pager.waits();
        expect(waits.map((x) => x.faults)).toEqual([PAGES_PER_VCPU, PAGES_PER_VCPU]);
        pager.finish();
        expectServed(w, src);
      });
    }
  }

  for (const mode of ['missing', 'minor'] as const) {
    it.skipIf(!engine)(`${mode}, onRequest: one request per page, installed on this thread, exactly once`, async () => {
      const w = await workloadVm();
      const src = source();
      const pager: DemandPager = w.vm.startDemandPaging!({ path: 'uffd', mode, sharedUffd: false, readers: 2 });
      // This thread installs: touching a missing page itself would wait on itself.
      expect(() => w.vm.readGuest(w.spec.gpaBase, new Uint8Array(PAGE))).toThrow(/still missing/);
      const reqs: PageRequest[] = [];
      pager.onRequest((req) => {
        reqs.push(req);
        // As if fetched over the network: answered on a later turn of the event loop.
        setImmediate(() => {
          expect(pager.install(req.slot, req.page, new Uint8Array(src, req.page * PAGE, PAGE).slice())).toBe('installed');
          // The same page pushed again (a background push racing the request): installed once.
          expect(pager.install(req.slot, req.page, new Uint8Array(PAGE))).toBe('exists');
        });
      });
      await runOnePass(w.vm);
      expect(reqs.length).toBe(PAGES);
      expect(new Set(reqs.map((r) => r.page)).size).toBe(PAGES);
      for (const r of reqs) expect(r.vcpu, `page ${r.page} is touched by its slice's vCPU`).toBe(Math.floor(r.page / PAGES_PER_VCPU));
      expect(pager.stats()).toMatchObject({ requests: PAGES, installed: PAGES, duplicates: PAGES, missing: 0 });
      const waits = pager.waits();
      for (const x of waits) {
        expect(x.faults).toBe(PAGES_PER_VCPU);
        expect(x.max).toBeGreaterThan(0);
        expect(x.p50).toBeLessThanOrEqual(x.p99);
      }
      pager.finish();
      expectServed(w, src);
    });
  }

  it.skipIf(!engine)('discard makes populated pages missing again; the next pass asks for them', async () => {
    const w = await workloadVm();
    const src = source();
    const pager = w.vm.startDemandPaging!({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 1 });
    const asked: number[] = [];
    pager.onRequest((req) => {
      asked.push(req.page);
      setImmediate(() => pager.install(req.slot, req.page, new Uint8Array(src, req.page * PAGE, PAGE).slice()));
    });
    await runOnePass(w.vm);
    expect(asked.length).toBe(PAGES);
    await w.vm.pause();
    pager.discard(0, [3, 4, 5, PAGES_PER_VCPU + 9]);
    expect(pager.isMissing(0, 4)).toBe(true);
    expect(pager.missingCount()).toBe(4);
    asked.length = 0;
    w.vm.resume();
    w.vm.allowPasses(2);
    await w.vm.waitForPasses(2, 30_000);
    expect(asked.sort((a, b) => a - b)).toEqual([3, 4, 5, PAGES_PER_VCPU + 9]);
    expect(pager.missingCount()).toBe(0);
    pager.finish();
  });
});
