// Checking a soft vCPU's registers (VcpuState.arch) that came from outside before they are
// loaded (vmm/vcpu-state.ts checks the envelope). A register a soft vCPU could never hold is
// refused here, while the vCPU is stopped, so the guest never runs on it.
//
// Concurrency: pure function.
import { pagesPerVcpu, type WorkloadSpec } from '../../guest/workload.ts';
import type { VcpuState } from '../../vmm/engine.ts';
import { MAX_PASSES, VcpuStateError, stateBool, stateInt, stateObject, stateOnlyKeys } from '../../vmm/vcpu-state.ts';
import type { SoftVcpuArch } from './threads.ts';

/** `state.arch` as SoftVcpuArch for a vCPU running `spec`, or VcpuStateError. */
export function checkSoftVcpuArch(state: VcpuState, spec: WorkloadSpec): SoftVcpuArch {
  const a = stateObject(state.arch, 'arch');
  stateOnlyKeys(a, 'arch', ['passes', 'pos', 'rngHi', 'rngLo', 'halted']);
  const arch: SoftVcpuArch = {
    passes: stateInt(a.passes, 'arch.passes', 0, MAX_PASSES),
    // pos is where the current pass resumes: 0..pages (pages = the pass is done).
    pos: stateInt(a.pos, 'arch.pos', 0, pagesPerVcpu(spec)),
    rngHi: stateInt(a.rngHi, 'arch.rngHi', 0, 0xffff_ffff),
    rngLo: stateInt(a.rngLo, 'arch.rngLo', 0, 0xffff_ffff),
    halted: stateBool(a.halted, 'arch.halted'),
  };
  // xorshift64 never reaches the all-zero state; a zero generator would write page 0 forever.
  if (arch.rngHi === 0 && arch.rngLo === 0) throw new VcpuStateError('arch.rngLo', 'the generator state (rngHi, rngLo) is zero, which xorshift64 never reaches');
  if (arch.halted && spec.kind !== 'idle') throw new VcpuStateError('arch.halted', `true, but only an idle workload halts (this one is ${spec.kind})`);
  if (state.progress.passesCompleted !== arch.passes) throw new VcpuStateError('progress.passesCompleted', `${state.progress.passesCompleted} disagrees with arch.passes ${arch.passes}`);
  if (state.progress.halted !== arch.halted) throw new VcpuStateError('progress.halted', `${state.progress.halted} disagrees with arch.halted ${arch.halted}`);
  return arch;
}
