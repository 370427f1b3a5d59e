// Creating the VM a migration starts from: one test-memory memslot at the workload's gpaBase,
// vCPUs running the workload freely, memory populated (first pass done) before the migration
// starts -- what `stage2 migrate` and `stage2 demo` migrate.
import type { Backing, Engine, GuestPageSize, MmuLockMode, Vm } from '../vmm/engine.ts';
import { workload, type WorkloadKind, type WorkloadSpec } from '../guest/workload.ts';

export const TEST_MEM_SLOT = 0;

export interface SourceVmParams {
  vcpus: number;
  bytesPerVcpu: number;
  backing: Backing;
  workload: WorkloadKind;
  lock?: MmuLockMode;
  guestPageSize?: GuestPageSize;
  /** Run the guest freely (default) or leave it stopped after population. */
  run?: boolean;
}

export async function createSourceVm(engine: Engine, p: SourceVmParams): Promise<{ vm: Vm; spec: WorkloadSpec }> {
  const caps = engine.capabilities();
  const vm = await engine.createVm({ manualDirtyLogProtect: caps.manualDirtyLogProtect, lock: p.lock ?? 'parallel', guestPageSize: p.guestPageSize ?? 2097152 });
  try {
    const spec = workload(p.workload, p.bytesPerVcpu);
    const bytes = p.vcpus * p.bytesPerVcpu;
    const host = vm.mapHostMemory(bytes, p.backing);
    vm.setUserMemoryRegion({ slot: TEST_MEM_SLOT, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: host.hva });
    await vm.createVcpus(p.vcpus, spec);
    // Populate: the first pass writes every page (idle halts after it).
    vm.allowPasses(1);
    await vm.waitForPasses(1);
    if (p.run ?? true) vm.allowPasses(Infinity);
    return { vm, spec };
  } catch (e) {
    await vm.destroy();
    throw e;
  }
}
