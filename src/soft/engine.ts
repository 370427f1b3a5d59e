// The soft engine: the second-stage MMU implemented in TypeScript (see vm.ts). Stateless; each
// createVm builds an independent SoftVm.
import type { Engine, EngineCapabilities, Vm, VmConfig } from '../vmm/engine.ts';
import { SoftVm } from './vm.ts';
import { DIRTY_RING_MAX_ENTRIES } from '../vmm/dirty-ring.ts';
import type { HugeRecoveryStrategy } from './huge/recovery.ts';
import type { DirtyLogTuningOptions } from './vm.ts';

export interface SoftEngineOptions {
  /** Host RAM each VM models (default: sized from the VM's first mapHostMemory). */
  hostRamBytes?: number;
  /** Largest vCPU count (KVM_CAP_MAX_VCPUS). */
  maxVcpus?: number;
  /** Stage-2 walks check for freed table pages (slower). */
  debug?: boolean;
  /** How huge mappings are re-formed when dirty logging stops (default 'in-place'). */
  recover?: HugeRecoveryStrategy;
  /** Dirty-log sweeps: lock-dropping chunk, eager split, INITIALLY_SET (dirty/dirty-tuning.ts). */
  dirtyLog?: DirtyLogTuningOptions;
}

export class SoftEngine implements Engine {
  readonly kind = 'soft' as const;

  constructor(private readonly opts: SoftEngineOptions = {}) {}

  capabilities(): EngineCapabilities {
    return {
      kind: 'soft',
      manualDirtyLogProtect: true,
      dirtyRingMaxEntries: DIRTY_RING_MAX_ENTRIES,
      memoryFaultExit: true,
      // The host model's userfaultfd (soft/uffd/): both fault paths of demand paging.
      userfaultfd: true,
      demandPagingPaths: ['uffd', 'exit'],
      backings: ['anonymous', 'anonymous_thp', 'hugetlb'],
      maxVcpus: this.opts.maxVcpus ?? 64,
    };
  }

  async createVm(config: VmConfig = {}): Promise<Vm> {
    return this.createSoftVm(config);
  }

  /** createVm with the concrete type (tests and tools use its debug accessors). */
  createSoftVm(config: VmConfig = {}): SoftVm {
    const vmOpts: ConstructorParameters<typeof SoftVm>[1] = { maxVcpus: this.opts.maxVcpus ?? 64 };
    if (this.opts.hostRamBytes !== undefined) vmOpts.hostRamBytes = this.opts.hostRamBytes;
    if (this.opts.debug !== undefined) vmOpts.debug = this.opts.debug;
    if (this.opts.recover !== undefined) vmOpts.recover = this.opts.recover;
    if (this.opts.dirtyLog !== undefined) vmOpts.dirtyLog = this.opts.dirtyLog;
    return new SoftVm(config, vmOpts);
  }
}
