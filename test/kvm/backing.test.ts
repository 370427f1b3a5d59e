// Guest RAM backings on the kvm engine: plain anonymous, THP (madvise) and hugetlb (2 MiB pages
// reserved here through /proc/sys/vm/nr_hugepages when we may, and given back afterwards).
import { describe, it, expect, afterAll } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, type Backing } from '../../src/vmm/engine.ts';
import { countBits } from '../../src/vmm/dirty-bitmap.ts';
import { workload } from '../../src/guest/workload.ts';
import { WorkloadModel, diffPages, firstWords } from '../conformance/model.ts';
import { openKvmOrReason } from './kvm-env.ts';

const { engine, reason } = await openKvmOrReason();
const NR = '/proc/sys/vm/nr_hugepages';
const HUGE_PAGES_NEEDED = 4; // 2 vCPUs x 2 MiB of test memory
let restoreHugepages: number | null = null;

function reserveHugepages(): string {
  try {
    const free = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    if (free >= HUGE_PAGES_NEEDED) return '';
    const now = Number(readFileSync(NR, 'utf8'));
    writeFileSync(NR, String(now + HUGE_PAGES_NEEDED - free));
    restoreHugepages = now;
    const after = Number(/HugePages_Free:\s+(\d+)/.exec(readFileSync('/proc/meminfo', 'utf8'))?.[1] ?? 0);
    return after >= HUGE_PAGES_NEEDED ? '' : `only ${after} free 2 MiB pages after asking for ${HUGE_PAGES_NEEDED}`;
  } catch (e) {
    return `cannot reserve hugetlb pages: ${(e as Error).message}`;
  }
}

afterAll(() => {
  if (restoreHugepages !== null) writeFileSync(NR, String(restoreHugepages));
});

describe(`kvm backings${engine ? '' : ` — skipped: ${reason}`}`, () => {
  for (const backing of ['anonymous', 'anonymous_thp', 'hugetlb'] as Backing[]) {
    it.skipIf(!engine)(`${backing}: the guest writes land in the mapping and are dirty-logged`, async (ctx) => {
      if (backing === 'hugetlb') {
        const why = reserveHugepages();
        if (why) {
          console.log(`[test/kvm/backing] hugetlb skipped: ${why}`);
          ctx.skip(why);
          return;
        }
      }
      const vm = await engine!.createVm({ manualDirtyLogProtect: true });
      try {
        const spec = workload('sequential', 2 << 20);
        const bytes = 2 * spec.bytesPerVcpu;
        const host = vm.mapHostMemory(bytes, backing);
        expect(host.backing).toBe(backing);
        const region = { slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: host.hva };
        vm.setUserMemoryRegion(region);
        await vm.createVcpus(2, spec);
        vm.allowPasses(1);
        await vm.waitForPasses(1, 30_000);
        vm.setUserMemoryRegion({ ...region, flags: KVM_MEM_LOG_DIRTY_PAGES });
        vm.allowPasses(2);
        await vm.waitForPasses(2, 30_000);
        expect(countBits(vm.getDirtyLog(0))).toBe(bytes / PAGE_SIZE);
        const model = new WorkloadModel(spec, 2);
        model.run(2);
        const got = firstWords((g, d) => vm.readGuest(g, d), spec.gpaBase, bytes / PAGE_SIZE);
        expect(diffPages(got.words, model.memory)).toEqual([]);
      } finally {
        await vm.destroy();
      }
    });
  }
});
