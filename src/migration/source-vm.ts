// Creating the VM a migration starts from: the memstress-style VM of vmm/workload-vm.ts with
// memory populated (first pass done) and, by default, the vCPUs running the workload freely --
// what `stage2 migrate` and `stage2 demo` migrate.
import type { Engine, Vm } from '../vmm/engine.ts';
import { createWorkloadVm, type WorkloadVmParams } from '../vmm/workload-vm.ts';
import type { WorkloadSpec } from '../guest/workload.ts';

export interface SourceVmParams extends WorkloadVmParams {
  /** Run the guest freely (default) or leave it stopped after population. */
  run?: boolean;
}

export async function createSourceVm(engine: Engine, p: SourceVmParams): Promise<{ vm: Vm; spec: WorkloadSpec }> {
  const { vm, spec } = await createWorkloadVm(engine, p);
  try {
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
