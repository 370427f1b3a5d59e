// After a failed or cancelled migration the source must be exactly as if nothing had happened:
// its VM running, dirty logging off on every memslot. This checks it rather than assuming it.
import { KVM_MEM_LOG_DIRTY_PAGES, type Vm } from '../vmm/engine.ts';
import type { WorkloadSpec } from '../guest/workload.ts';

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/**
 * True when no memslot logs dirty pages and, unless the workload has halted (idle), the vCPUs
 * complete another pass within `timeoutMs`.
 */
export async function checkSourceIntact(vm: Vm, workload: WorkloadSpec, timeoutMs = 10_000): Promise<boolean> {
  try {
    if (vm.memslots().some((s) => s.flags & KVM_MEM_LOG_DIRTY_PAGES)) return false;
    const before = vm.progress();
    if (workload.kind === 'idle' || before.every((p) => p.halted)) return true;
    const t0 = Date.now();
    while (Date.now() - t0 < timeoutMs) {
      const now = vm.progress();
      if (now.every((p, i) => p.halted || p.passesCompleted > before[i]!.passesCompleted)) return true;
      await sleep(5);
    }
    return false;
  } catch {
    return false;
  }
}
