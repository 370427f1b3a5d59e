// Remote TLB flush (kvm_flush_remote_tlbs / kvm_make_all_cpus_request(KVM_REQ_TLB_FLUSH)).
//
// Guarantee: once flushRemoteTlbs returns, no vCPU can access guest memory through a soft-TLB
// entry filled before the call started. Protocol over the control block (see control.ts):
// - flusher: gen = ++G_FLUSH_GEN; ++G_REQ; then for every other vCPU wait until it is outside
//   guest mode (V_MODE) or has acknowledged gen (V_FLUSH_ACK >= gen).
// - vCPU: every few guest accesses (interpreter.ts) it compares G_REQ with the value it last
//   handled; on a change it empties its TLB and stores V_FLUSH_ACK = G_FLUSH_GEN. Until it does,
//   the flusher waits: every access with a stale entry happens before the flush returns. On
//   guest entry it stores V_MODE = IN_GUEST first and then does the same check, so a vCPU the
//   flusher skipped because it was outside guest mode cannot re-enter with stale entries
//   (Dekker pair, seq-cst Atomics).
// - Accesses in progress when the flusher bumps the generation complete before the vCPU
//   acknowledges, i.e. before flushRemoteTlbs returns; that is the same window hardware has
//   between a PTE update and the TLBI completing, and callers order their work accordingly
//   (dirty bits are harvested before write-protecting, see dirty/dirty-log.ts).
// A flusher never holds anything a vCPU in guest mode waits for: a vCPU leaves guest mode before
// it blocks on the MMU lock (in guest mode it only try-locks, for the write-protect fast path in
// the 'global' and 'global-write' modes, or takes no MMU lock at all, 'parallel' mode; it never
// waits on one there), so a flusher holding the MMU lock cannot deadlock with a faulting vCPU.

import {
  G_FLUSH_GEN,
  G_FLUSH_WAITERS,
  G_REQ,
  GuestMode_InGuest,
  V_FLUSH_ACK,
  V_MODE,
  vcpuBase,
} from './control.ts';

const SPINS_BEFORE_SLEEP = 2000;

/**
 * Flush every vCPU's soft TLB. `selfVcpu` is the calling vCPU (-1 for the VMM thread): it is
 * outside guest mode and flushes its own TLB on re-entry. Returns the generation flushed.
 */
export function flushRemoteTlbs(ctl: Int32Array, vcpus: number, selfVcpu = -1): number {
  const gen = (Atomics.add(ctl, G_FLUSH_GEN, 1) + 1) | 0;
  Atomics.add(ctl, G_REQ, 1);
  for (let v = 0; v < vcpus; v++) {
    if (v === selfVcpu) continue;
    const base = vcpuBase(v);
    let spins = 0;
    for (;;) {
      if (Atomics.load(ctl, base + V_MODE) !== GuestMode_InGuest) break;
      const ack = Atomics.load(ctl, base + V_FLUSH_ACK);
      if (((ack - gen) | 0) >= 0) break;
      if (++spins < SPINS_BEFORE_SLEEP) continue;
      // The vCPU may be descheduled (2 cores, many threads): sleep until it acknowledges.
      Atomics.add(ctl, G_FLUSH_WAITERS, 1);
      Atomics.wait(ctl, base + V_FLUSH_ACK, ack, 1);
      Atomics.sub(ctl, G_FLUSH_WAITERS, 1);
    }
  }
  return gen;
}

/** vCPU side: record that this vCPU's TLB holds nothing older than `gen`, waking flushers. */
export function acknowledgeFlush(ctl: Int32Array, base: number, gen: number): void {
  Atomics.store(ctl, base + V_FLUSH_ACK, gen);
  if (Atomics.load(ctl, G_FLUSH_WAITERS) !== 0) Atomics.notify(ctl, base + V_FLUSH_ACK);
}
