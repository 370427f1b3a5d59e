// The soft engine's per-2 MiB mapping map (Vm.mappingMap, soft/pgtable/mapping-map.ts) against
// its own mapping counters: huge mappings after population, split to 4 KiB tables once dirty
// logging is on and the guest writes, re-formed after logging stops -- what the dashboard's
// mapping panel shows.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { KVM_MEM_LOG_DIRTY_PAGES, MAPPING_2M, MAPPING_4K, MAPPING_NONE, type Vm } from '../../src/vmm/engine.ts';
import { openEngine } from '../../src/vmm/factory.ts';
import { createSourceVm } from '../../src/migration/source-vm.ts';

const MiB = 2 ** 20;

function counts(map: Uint8Array): Record<number, number> {
  const c: Record<number, number> = { [MAPPING_NONE]: 0, [MAPPING_4K]: 0, [MAPPING_2M]: 0 };
  for (const v of map) c[v] = (c[v] ?? 0) + 1;
  return c;
}

async function until(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('soft engine: mappingMap', () => {
  let vm: Vm;
  beforeAll(async () => {
    const engine = await openEngine('soft', undefined, { recover: 'in-place' });
    ({ vm } = await createSourceVm(engine, { vcpus: 2, bytesPerVcpu: 16 * MiB, backing: 'anonymous_thp', workload: 'sequential' }));
  });
  afterAll(async () => vm?.destroy());

  it('follows huge pages through split (logging on) and re-form (logging off)', async () => {
    const [slot] = vm.memslots();
    const map = () => vm.mappingMap!(slot!.guestPhysAddr, slot!.memorySize);
    expect(map().length).toBe(16);
    // Populated with THP backing: every 2 MiB is one block, as the counters say.
    expect(counts(map())[MAPPING_2M]).toBe(16);
    expect(vm.stats().pages_2m).toBe(16);

    // Logging on: the running guest's writes split every block into a table of 4 KiB pages.
    vm.setUserMemoryRegion({ slot: slot!.slot, flags: slot!.flags | KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: slot!.guestPhysAddr, memorySize: slot!.memorySize, userspaceAddr: slot!.userspaceAddr });
    await until(() => counts(map())[MAPPING_4K] === 16, 'every block split');
    expect(vm.stats().pages_2m).toBe(0);

    // Logging off: the recovery re-forms them.
    vm.setUserMemoryRegion({ slot: slot!.slot, flags: slot!.flags, guestPhysAddr: slot!.guestPhysAddr, memorySize: slot!.memorySize, userspaceAddr: slot!.userspaceAddr });
    await vm.hugeRecoveryIdle!();
    await until(() => counts(map())[MAPPING_2M] === vm.stats().pages_2m && vm.stats().pages_2m! > 0, 'blocks back, map and counters agreeing');
    expect(counts(map())[MAPPING_2M] + counts(map())[MAPPING_4K]).toBe(16);
  });

  it('is empty outside memory and refuses an unaligned start', () => {
    expect([...vm.mappingMap!(0, 8 * MiB)]).toEqual([MAPPING_NONE, MAPPING_NONE, MAPPING_NONE, MAPPING_NONE]);
    expect(() => vm.mappingMap!(4096, 2 * MiB)).toThrow(/not 2 MiB aligned/);
  });
});
