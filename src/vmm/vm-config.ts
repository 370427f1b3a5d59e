// One default per VmConfig setting, for both engines (KVM_CREATE_VM + KVM_ENABLE_CAP at
// creation). An engine passes what it supports; the defaults and the reasons:
//
//   manualDirtyLogProtect  true where the engine supports it: get and clear of the dirty log as
//                          separate calls is what QEMU and dirty_log_perf_test use, and it lets
//                          a harvest re-protect only what it copies.
//   dirtyRingEntries       0: the bitmap. A ring has to be sized for the workload; asking for one
//                          is a choice, never a default.
//   lock                   'parallel': seed 003's parallel faults, the kernel's behaviour today.
//                          (The kvm engine has no choice; the host kernel decides. It reports
//                          the value it was given.)
//   guestPageSize          2 MiB: the granularity of the guest's own page tables. On kvm 4 KiB
//                          guest tables make populate ~10x slower (MEASURED.md) and change
//                          nothing the MMU under test sees; the soft interpreter has no guest
//                          page tables, so there it only labels the run. One value on both
//                          engines keeps a CONFIG record meaning the same on either.
//
// Pure: no engine imported.
import type { EngineCapabilities, VmConfig } from './engine.ts';

export type ResolvedVmConfig = Readonly<Required<VmConfig>>;

export const DEFAULT_GUEST_PAGE_SIZE = 2097152 as const;

export function resolveVmConfig(config: VmConfig, caps: Pick<EngineCapabilities, 'manualDirtyLogProtect'>): ResolvedVmConfig {
  return Object.freeze({
    manualDirtyLogProtect: config.manualDirtyLogProtect ?? caps.manualDirtyLogProtect,
    dirtyRingEntries: config.dirtyRingEntries ?? 0,
    lock: config.lock ?? 'parallel',
    guestPageSize: config.guestPageSize ?? DEFAULT_GUEST_PAGE_SIZE,
  });
}
