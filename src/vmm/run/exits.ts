// vCPU exits: why a vCPU came back from the guest to the VMM (KVM_RUN's kvm_run.exit_reason),
// in one vocabulary for both engines. The loop that handles them is vcpu-loop.ts; the VMM side,
// run-control.ts; the flow is drawn in the README ("How a vCPU exit flows").
//
//   IO             the workload's pass report (kvm: `out` to SYNC_PORT; soft: the interpreter
//                  finished a pass). Handled on the vCPU thread: publish passes, re-enter.
//   HLT            the guest has nothing left to do (idle workload done; kvm: hlt / HALT_PORT).
//                  Handled on the vCPU thread: the vCPU stays halted until paused or stopped.
//   MMIO           an access to no memslot or a write to a read-only one; no device model here,
//                  so the VMM's handler (if any) decides, else the vCPU stops ('mmio').
//   MEMORY_FAULT   { gpa, size, flags } (KVM_EXIT_MEMORY_FAULT): a fault the engine cannot
//                  resolve itself. The VMM's handler provides the page and the vCPU re-enters
//                  and repeats the access; with no handler the vCPU stops ('efault').
//   DIRTY_RING_FULL  the vCPU's dirty ring reached its soft limit: harvest + reset, re-enter.
//   INTR           kicked out of the guest (pause, TLB flush request, stop, a changed allowance):
//                  the loop head re-reads the run-control words.
//   SHUTDOWN / INTERNAL_ERROR   terminal: the vCPU never re-enters.
//
// Plain data; no shared memory here.

export const EXIT_IO = 0;
export const EXIT_HLT = 1;
export const EXIT_MMIO = 2;
export const EXIT_MEMORY_FAULT = 3;
export const EXIT_DIRTY_RING_FULL = 4;
export const EXIT_INTR = 5;
export const EXIT_SHUTDOWN = 6;
export const EXIT_INTERNAL_ERROR = 7;
export const EXIT_REASONS = 8;

export type ExitName = 'io' | 'hlt' | 'mmio' | 'memoryFault' | 'dirtyRingFull' | 'intr' | 'shutdown' | 'internalError';
export const EXIT_NAMES: readonly ExitName[] = ['io', 'hlt', 'mmio', 'memoryFault', 'dirtyRingFull', 'intr', 'shutdown', 'internalError'];

/** KVM_MEMORY_EXIT_FLAG_PRIVATE (uapi/linux/kvm.h): the access was to private (guest_memfd) memory. */
export const KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3;
/** stage2's own MEMORY_FAULT flags (KVM defines only PRIVATE): the access was a write. */
export const MEMORY_FAULT_FLAG_WRITE = 1 << 0;
/**
 * stage2's own: the host page is simply not there yet (a memslot flagged
 * KVM_MEM_EXIT_ON_MISSING, or a missing page in a range registered with the soft userfaultfd
 * model). Providing it (UFFDIO_COPY, or writing it through the VMM's mapping) and re-entering
 * resolves the fault. Without this flag the host could not give the page at all (EFAULT).
 */
export const MEMORY_FAULT_FLAG_MISSING = 1 << 1;

/**
 * The exit record an engine fills on every return from the guest. One per vCPU thread, reused
 * (no allocation per exit): only the fields of `reason` are meaningful.
 */
export class VcpuExit {
  reason = EXIT_INTR;
  /** IO: the pass the guest reported completed. */
  pass = 0;
  /** IO: the guest halts right after this report (idle workload); counted as an HLT exit too. */
  halted = false;
  /** MMIO, MEMORY_FAULT: the guest physical address, size in bytes and flags of the access. */
  gpa = 0;
  size = 0;
  flags = 0;
  /** SHUTDOWN, INTERNAL_ERROR: what the engine knows of the cause, in words. */
  cause = '';
}

/** An exit handed to the VMM's main thread (run-control.ts), as its handler sees it. */
export interface PostedExit {
  vcpu: number;
  reason: ExitName;
  gpa: number;
  size: number;
  flags: number;
}

/**
 * A VMM handler for one exit reason, run on the main thread while the vCPU waits. Returning (or
 * resolving) re-enters the vCPU, which repeats the access; throwing stops the vCPU with the
 * error as its cause.
 */
export type ExitHandler = (exit: PostedExit) => void | Promise<void>;
