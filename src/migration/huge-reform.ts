// After a migration stops dirty logging on the source (failed, cancelled), the engine re-forms
// the huge mappings logging split (soft: huge/recovery.ts, run by the memslot commit that turns
// logging off; kvm: the host kernel). This waits for that work and says how many 2 MiB block
// mappings came back, for the migration's JSON. Engine-neutral: it uses Vm.hugeRecoveryIdle when
// the engine has one and the `pages_2m` counter (0 where an engine does not count mappings).
import type { Vm } from '../vmm/engine.ts';

/** Block mappings now, before logging is turned off (pass the result to hugePagesReformed). */
export function blockMappings(vm: Vm): number {
  return vm.stats().pages_2m ?? 0;
}

/** Wait for the engine's recovery (bounded), then the 2 MiB mappings gained since `before`. */
export async function hugePagesReformed(vm: Vm, before: number, timeoutMs = 10_000): Promise<number> {
  if (vm.hugeRecoveryIdle) {
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([vm.hugeRecoveryIdle(), new Promise<void>((r) => (timer = setTimeout(r, timeoutMs)))]);
    clearTimeout(timer);
  }
  return Math.max(0, blockMappings(vm) - before);
}
