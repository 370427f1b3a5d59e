// The post-copy destination's pager: the engine's own demand paging (Vm.startDemandPaging,
// vmm/demand-paging.ts; the kvm engine's real userfaultfd, the soft engine's userfaultfd model
// and memory-fault exits). Which fault path: the caller's choice, else 'exit' where the engine
// offers it (the vCPU's own thread takes its fault, seed 002's scalable path), else 'uffd'.
//
// Concurrency: main thread only (the pager's contract).
import type { Engine, Vm } from '../../vmm/engine.ts';
import { DemandPagingError, type DemandPager, type FaultPath } from '../../vmm/demand-paging.ts';

export function postcopyFaultPath(engine: Engine, asked?: FaultPath): FaultPath {
  const offered = engine.capabilities().demandPagingPaths ?? [];
  if (asked) {
    if (!offered.includes(asked)) throw new DemandPagingError(`the ${engine.kind} engine cannot page on demand by the '${asked}' path (it offers: ${offered.join(', ') || 'none'})`);
    return asked;
  }
  if (offered.length === 0) throw new DemandPagingError(`the ${engine.kind} engine cannot page guest RAM on demand here: post-copy is impossible`);
  return offered.includes('exit') ? 'exit' : 'uffd';
}

export function startPostcopyPaging(vm: Vm, path: FaultPath): DemandPager {
  const config = { path, mode: 'missing', sharedUffd: true, readers: 1 } as const;
  if (!vm.startDemandPaging) throw new DemandPagingError(`this ${vm.engine} VM has no demand paging (Vm.startDemandPaging): post-copy is impossible`);
  return vm.startDemandPaging(config);
}
