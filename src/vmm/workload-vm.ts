// A VM laid out the way KVM's memstress selftests lay one out: one test memslot at the
// workload's gpaBase holding every vCPU's slice, and the vCPUs created (not yet running).
// The benchmarks and the migration source both start from it.
import type { Backing, Engine, GuestPageSize, MmuLockMode, Vm } from './engine.ts';
import { workload, type WorkloadKind, type WorkloadSpec } from '../guest/workload.ts';
import { DEFAULT_GUEST_PAGE_SIZE } from './vm-config.ts';

export const TEST_MEM_SLOT = 0;

export interface WorkloadVmParams {
  vcpus: number;
  bytesPerVcpu: number;
  backing: Backing;
  workload: WorkloadKind;
  /** The workload's knobs (seed, writePercent, dirty-rate fields); defaults: workload(). */
  workloadOptions?: Partial<WorkloadSpec>;
  lock?: MmuLockMode;
  guestPageSize?: GuestPageSize;
  /** KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2; default: where the engine supports it. */
  manualProtect?: boolean;
  /** KVM_CAP_DIRTY_LOG_RING entries per vCPU; 0 (default): the memslot bitmap. */
  dirtyRingEntries?: number;
}

export interface WorkloadVm {
  vm: Vm;
  spec: WorkloadSpec;
  /** The test memslot's region (flags 0), for turning dirty logging on and off. */
  testRegion: { slot: number; guestPhysAddr: number; memorySize: number; userspaceAddr: number };
}

export async function createWorkloadVm(engine: Engine, p: WorkloadVmParams): Promise<WorkloadVm> {
  const caps = engine.capabilities();
  const vm = await engine.createVm({
    manualDirtyLogProtect: (p.manualProtect ?? true) && caps.manualDirtyLogProtect,
    lock: p.lock ?? 'parallel',
    guestPageSize: p.guestPageSize ?? DEFAULT_GUEST_PAGE_SIZE,
    dirtyRingEntries: p.dirtyRingEntries ?? 0,
  });
  try {
    const spec = workload(p.workload, p.bytesPerVcpu, p.workloadOptions);
    const bytes = p.vcpus * p.bytesPerVcpu;
    const host = vm.mapHostMemory(bytes, p.backing);
    const testRegion = { slot: TEST_MEM_SLOT, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: host.hva };
    vm.setUserMemoryRegion({ ...testRegion, flags: 0 });
    await vm.createVcpus(p.vcpus, spec);
    return { vm, spec, testRegion };
  } catch (e) {
    await vm.destroy();
    throw e;
  }
}
