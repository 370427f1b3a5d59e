// The one family of errors the VMM layer throws, for both engines. Every error a caller can act
// on is a VmError with a `kind`, so code above the engine line can tell "you called this at the
// wrong time" from "the guest did something the VMM cannot serve" without parsing messages.
// (Firecracker's vstate errors are typed the same way: one enum per layer, one variant per cause.)
//
//   kind 'state'    a call made in the wrong run state (no vCPUs yet, vCPUs running, destroyed)
//   kind 'config'   a VmConfig, vCPU count or backing this engine refuses
//   kind 'address'  a guest physical address in no memslot (the VMM's own guest memory access)
//   kind 'vcpu'     a vCPU stopped for good on an exit nobody handled (VcpuError, below)
//   kind 'timeout'  a wait for vCPUs ran past its limit
//
// MemslotError and EngineUnavailableError (engine.ts) belong to the same family.
//
// This file imports nothing.

export type VmErrorKind = 'state' | 'config' | 'address' | 'vcpu' | 'timeout';

export class VmError extends Error {
  constructor(
    readonly kind: VmErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'VmError';
  }
}

/**
 * Why a vCPU stopped for good: the terminal exit it took (see vmm/run/exits.ts) or how its
 * thread died.
 *   'mmio'          an access to no memslot, or a write to a read-only one, and no device model
 *   'efault'        a MEMORY_FAULT exit that no handler resolved (the host could not give the page)
 *   'shutdown'      the guest shut down (triple fault)
 *   'internal'      the engine could not run the guest (KVM_EXIT_INTERNAL_ERROR, FAIL_ENTRY, ...)
 *   'crash'         the vCPU thread threw
 *   'timeout'       a wait for the vCPUs timed out (vcpu -1: not one vCPU's fault)
 */
export type VcpuErrorReason = 'mmio' | 'efault' | 'shutdown' | 'internal' | 'crash' | 'timeout';

export class VcpuError extends VmError {
  constructor(
    readonly vcpu: number,
    readonly reason: VcpuErrorReason,
    message: string,
  ) {
    super(reason === 'timeout' ? 'timeout' : 'vcpu', message);
    this.name = 'VcpuError';
  }
}
