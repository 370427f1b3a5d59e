// The soft engine's demand paging (issue 10, seed 002): both fault paths (userfaultfd queue with
// reader threads, memory-fault exits handled on the vCPU's own thread), both modes (MISSING:
// COPY; MINOR: shared-mapping write + CONTINUE), requests to the main thread, readGuest of a
// missing page, and memory equal to the source afterwards.
import { describe, it, expect, afterEach } from 'vitest';
import { makeTestVm, type TestVm } from '../vcpu/harness.ts';
import { DemandPagingError, type FaultPath, type UffdMode } from '../../../src/vmm/demand-paging.ts';
import { KVM_MEM_EXIT_ON_MISSING } from '../../../src/vmm/engine.ts';
import { PAGE, expectMemoryEqualsSource, makeSource, sourcePage } from './helpers.ts';

let current: TestVm | null = null;
afterEach(async () => {
  await current?.vm.destroy();
  current = null;
});

const cases: [FaultPath, UffdMode, boolean][] = [
  ['uffd', 'missing', true],
  ['uffd', 'missing', false],
  ['uffd', 'minor', true],
  ['exit', 'missing', true],
  ['exit', 'minor', false],
];

describe('soft demand paging from a local source', () => {
  for (const [path, mode, sharedUffd] of cases) {
    it(`path ${path}, mode ${mode}, ${sharedUffd ? 'one uffd' : 'a uffd per vCPU'}: every page fetched once, memory equals the source`, async () => {
      const vcpus = 3;
      const perVcpu = 64;
      const t = (current = await makeTestVm({ vcpus, bytesPerVcpu: perVcpu * PAGE }));
      const src = makeSource(t.pages);
      const pager = t.vm.startDemandPaging({ path, mode, sharedUffd, readers: 2, localSource: { buffer: src, delayUs: 0 } });
      expect(pager.missingCount()).toBe(t.pages);
      expect(t.vm.hostAddressSpace.findVma(t.region.userspaceAddr)?.userfault).toBe(true);
      if (path === 'exit') expect(t.vm.memslots()[0]!.flags & KVM_MEM_EXIT_ON_MISSING).toBe(KVM_MEM_EXIT_ON_MISSING);
      t.vm.allowPasses(2);
      await t.vm.waitForPasses(2, 60_000);
      const s = pager.stats();
      expect(s).toMatchObject({ requests: t.pages, installed: t.pages, duplicates: 0, missing: 0 });
      expect(pager.missingCount()).toBe(0);
      const waits = pager.waits();
      expect(waits.map((w) => w.faults)).toEqual([perVcpu, perVcpu, perVcpu]);
      for (const w of waits) expect(w.max).toBeGreaterThanOrEqual(w.p50);
      const exits = t.vm.stats().exitsMemoryFault;
      expect(exits).toBe(t.pages); // each first touch left the guest once (both paths, see vcpu-entry.ts)
      pager.finish();
      expect(t.vm.memslots()[0]!.flags & KVM_MEM_EXIT_ON_MISSING).toBe(0);
      expect(t.vm.hostAddressSpace.findVma(t.region.userspaceAddr)?.userfault).toBeUndefined();
      expectMemoryEqualsSource(t, src, 2, perVcpu);
    });
  }
});

describe('soft demand paging through the main thread (onRequest)', () => {
  for (const path of ['uffd', 'exit'] as const) {
    it(`path ${path}: requests reach onRequest once per page; install() resumes the vCPUs`, async () => {
      const t = (current = await makeTestVm({ vcpus: 2, bytesPerVcpu: 32 * PAGE }));
      const src = makeSource(t.pages);
      const pager = t.vm.startDemandPaging({ path, mode: 'missing', sharedUffd: false, readers: 1 });
      const seen = new Set<number>();
      pager.onRequest((r) => {
        expect(r.slot).toBe(0);
        expect(seen.has(r.page)).toBe(false);
        seen.add(r.page);
        expect(r.vcpu).toBe(Math.floor(r.page / 32));
        // answer later, as a network would
        setImmediate(() => expect(pager.install(r.slot, r.page, sourcePage(src, r.page))).toBe('installed'));
      });
      t.vm.allowPasses(1);
      await t.vm.waitForPasses(1, 60_000);
      expect(seen.size).toBe(t.pages);
      expect(pager.stats()).toMatchObject({ requests: t.pages, installed: t.pages, duplicates: 0, missing: 0 });
      expectMemoryEqualsSource(t, src, 1, 32);
    });
  }
});

describe('the VMM reading and writing missing pages', () => {
  it('readGuest of a missing page fetches it through the uffd (not zeros); a push after that gets exists', async () => {
    const t = (current = await makeTestVm({ vcpus: 1, bytesPerVcpu: 16 * PAGE }));
    const src = makeSource(t.pages);
    const pager = t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 1, localSource: { buffer: src, delayUs: 100 } });
    const got = new Uint8Array(2 * PAGE);
    t.vm.readGuest(t.spec.gpaBase + 5 * PAGE, got);
    expect(got).toEqual(new Uint8Array(src, 5 * PAGE, 2 * PAGE));
    expect(pager.isMissing(0, 5)).toBe(false);
    expect(pager.isMissing(0, 7)).toBe(true);
    expect(pager.missingCount()).toBe(14);
    expect(pager.install(0, 5, sourcePage(src, 0))).toBe('exists');
    expect(pager.stats()).toMatchObject({ installed: 2, duplicates: 1 });
    const again = new Uint8Array(PAGE);
    t.vm.readGuest(t.spec.gpaBase + 5 * PAGE, again);
    expect(again).toEqual(new Uint8Array(src, 5 * PAGE, PAGE)); // the duplicate changed nothing
  });

  it('readGuest of a missing page without a local source is a clear error; writeGuest too', async () => {
    const t = (current = await makeTestVm({ vcpus: 1, bytesPerVcpu: 8 * PAGE }));
    const pager = t.vm.startDemandPaging({ path: 'exit', mode: 'missing', sharedUffd: true, readers: 1 });
    expect(() => t.vm.readGuest(t.spec.gpaBase, new Uint8Array(8))).toThrow(DemandPagingError);
    expect(() => t.vm.writeGuest(t.spec.gpaBase + PAGE, new Uint8Array(8))).toThrow(/install\(\) it first/);
    pager.install(0, 0, new Uint8Array(PAGE).fill(7));
    const b = new Uint8Array(4);
    t.vm.readGuest(t.spec.gpaBase + 8, b);
    expect([...b]).toEqual([7, 7, 7, 7]);
  });

  it('discard makes populated pages missing again; they are fetched again on touch', async () => {
    const t = (current = await makeTestVm({ vcpus: 1, bytesPerVcpu: 16 * PAGE, vcpusNow: false }));
    t.vm.writeGuest(t.spec.gpaBase, new Uint8Array(t.pages * PAGE).fill(0xee)); // all populated (stale)
    await t.vm.createVcpus(1, t.spec);
    const src = makeSource(t.pages);
    const pager = t.vm.startDemandPaging({ path: 'uffd', mode: 'minor', sharedUffd: true, readers: 1, localSource: { buffer: src, delayUs: 0 } });
    expect(pager.missingCount()).toBe(0);
    pager.discard(0, [...Array(t.pages).keys()]);
    expect(pager.missingCount()).toBe(t.pages);
    t.vm.allowPasses(1);
    await t.vm.waitForPasses(1, 60_000);
    expect(pager.stats()).toMatchObject({ installed: t.pages, missing: 0 });
    expectMemoryEqualsSource(t, src, 1, 16);
  });

  it('bad configurations and pages are refused with clear errors', async () => {
    const t = (current = await makeTestVm({ vcpus: 1, bytesPerVcpu: 8 * PAGE }));
    expect(() => t.vm.startDemandPaging({ path: 'poll' as FaultPath, mode: 'missing', sharedUffd: true, readers: 1 })).toThrow(/path must be one of uffd, exit/);
    expect(() => t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 0 })).toThrow(/readers/);
    expect(() => t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 1, localSource: { buffer: new SharedArrayBuffer(PAGE), delayUs: 0 } })).toThrow(/guest RAM is 32768/);
    const pager = t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 1 });
    expect(() => t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 1 })).toThrow(/already running/);
    expect(() => pager.install(0, 8, new Uint8Array(PAGE))).toThrow(/no page 8 in demand-paged memslot 0/);
    expect(() => pager.install(3, 0, new Uint8Array(PAGE))).toThrow(/memslot 3/);
    expect(() => pager.install(0, 0, new Uint8Array(100))).toThrow(/4096 bytes/);
  });

  it('hugetlb backing is refused: the model pages 4 KiB', async () => {
    const t = (current = await makeTestVm({ vcpus: 1, bytesPerVcpu: 2 ** 21, backing: 'hugetlb' }));
    expect(() => t.vm.startDemandPaging({ path: 'uffd', mode: 'missing', sharedUffd: true, readers: 1 })).toThrow(/hugetlb/);
  });
});
