// The control block shared by the VMM thread and the vCPU worker threads of one kvm VM: one
// Int32Array over a SharedArrayBuffer.
//
// Concurrency rules (all accesses through Atomics, so each is sequentially consistent):
//   VM words (VM_*): written by the VMM thread only. After changing any of them the VMM adds 1
//     to DOORBELL and notifies it; a worker that has nothing to do waits on DOORBELL (having
//     read it BEFORE checking the words it waits for, so no change can be missed).
//   vCPU words (VCPU_*, at vcpuBase(v)): written by that vCPU's worker only. Exceptions, both
//     while the worker cannot be writing: the VMM sets PASSES/HALTED in loadVcpuState (worker not
//     started or PAUSED) and FAILED when the worker thread died with an error. After changing any of them the
//     worker adds 1 to EVENTS and notifies it; the VMM waits on EVENTS (Atomics.waitAsync) the
//     same way.
//   kvm_run.immediate_exit (in each vCPU's kvm_run mapping, not here) is written by the VMM
//     (set before PAUSE/STOP is raised, cleared before it is lowered) and read by the kernel.
// A reader may assume: PASSES only grows; PAUSED=1 means the worker is outside KVM_RUN, any
// pending I/O completed (it re-entered once with immediate_exit), and it will not enter again
// until PAUSE is 0.

export const VM_DOORBELL = 0;
/** Passes every vCPU may complete in total (0x7fffffff: no limit). */
export const VM_ALLOWANCE = 1;
export const VM_PAUSE = 2;
export const VM_STOP = 3;
/** Bumped by workers after any change of their words. */
export const VM_EVENTS = 4;

export const VCPU_PASSES = 0;
export const VCPU_HALTED = 1;
export const VCPU_PAUSED = 2;
export const VCPU_STARTED = 3;
/** Non-zero: the worker stopped on an unexpected exit (the KVM exit reason + 1). */
export const VCPU_FAILED = 4;
/** KVM_EXIT_DIRTY_RING_FULL seen; cleared by the worker when the VMM rings the doorbell. */
export const VCPU_RING_FULL = 5;
export const VCPU_EXITS = 6;
export const VCPU_EXITED = 7;
/** pthread id of the worker (two words: lo, hi), for kicks. */
export const VCPU_TID_LO = 8;
export const VCPU_TID_HI = 9;
export const VCPU_TID_VALID = 10;
/** Microseconds this vCPU's thread has spent inside KVM_RUN (two words: lo, hi). */
export const VCPU_RUN_US_LO = 11;
export const VCPU_RUN_US_HI = 12;
/** Linux thread id (gettid) of the worker, for its /proc schedstat; 0 until it starts. */
export const VCPU_LINUX_TID = 13;

const HEADER_WORDS = 16;
const VCPU_WORDS = 16; // 64 bytes: one cache line per vCPU

export const UNLIMITED_PASSES = 0x7fffffff;

export function controlWords(vcpus: number): number {
  return HEADER_WORDS + vcpus * VCPU_WORDS;
}

export function vcpuBase(vcpu: number): number {
  return HEADER_WORDS + vcpu * VCPU_WORDS;
}

export function newControl(vcpus: number): Int32Array {
  return new Int32Array(new SharedArrayBuffer(controlWords(vcpus) * 4));
}

export function ring(control: Int32Array, word: number): void {
  Atomics.add(control, word, 1);
  Atomics.notify(control, word);
}
