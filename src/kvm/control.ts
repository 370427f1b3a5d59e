// The kvm engine's words of the run-control block (vmm/run/control-block.ts, shared with the
// soft engine): the vCPU thread's pthread id (for kicks) and its time inside KVM_RUN, in the
// engine-owned part of each vCPU line. Run control itself (allowance, pause, stop, state,
// passes, exits) is the shared block's.
//
// Concurrency rules: each word here is written by its own vCPU thread only, with Atomics, and
// read by the VMM thread. TID_VALID is stored after TID_LO/TID_HI, so a reader that sees it 1
// sees the whole id. kvm_run.immediate_exit (in each vCPU's kvm_run mapping, not here) is written
// by the VMM (set before PAUSE/EXIT is raised, cleared before PAUSE is lowered: vcpu-runner.ts)
// and read by the kernel.
import { V_ENGINE, loadWide, vcpuBase } from '../vmm/run/control-block.ts';

/** pthread id of the worker (two words: hi, lo), for kicks. */
export const VCPU_TID_HI = V_ENGINE + 0;
export const VCPU_TID_LO = V_ENGINE + 1;
export const VCPU_TID_VALID = V_ENGINE + 2;
/** Microseconds this vCPU's thread has spent inside KVM_RUN (two words: hi, lo). */
export const VCPU_RUN_US_HI = V_ENGINE + 3;
export const VCPU_RUN_US_LO = V_ENGINE + 4;

export function kvmRunMicros(ctl: Int32Array, v: number): number {
  return loadWide(ctl, vcpuBase(v) + VCPU_RUN_US_HI);
}
