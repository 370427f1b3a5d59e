// The soft engine's words of the run-control block (vmm/run/control-block.ts): the remote-TLB-
// flush handshake, memslot generation reader slots and each vCPU's architectural registers, in
// the engine-owned ranges (from G_ENGINE and V_ENGINE). The run-control words themselves
// (allowance, pause, exit, kick, event, state, passes, exits) are the shared ones, re-exported.
//
// Concurrency rules for the words here (every word is accessed with Atomics):
// - G_FLUSH_GEN / G_FLUSH_WAITERS: bumped by whichever thread flushes remote TLBs (the VMM or a
//   vCPU in its fault handler), see tlb-flush.ts. G_SLOTS_GEN / G_SLOTS_WAITERS: the memslot
//   publisher on the VMM thread (mmu/slot-table.ts).
// - G_REQ (shared) is the one word a vCPU reads before every guest access: any request (flush,
//   pause, exit, a new memslot generation) bumps it after publishing its own word, so a vCPU
//   that sees G_REQ unchanged may keep using its TLB and keep running.
// - Per-vCPU engine words are written by their own vCPU only, except the register words R_*,
//   which the VMM writes while the vCPU is provably stopped (not started, or in a stopped state
//   of vcpu-loop.ts); the vCPU reloads them whenever it leaves a stopped state.
// - V_MODE is the guest-mode word of kvm_vcpu.mode: IN_GUEST while the vCPU may access guest
//   memory through its soft TLB, OUTSIDE_GUEST otherwise (a fault that may block, waiting,
//   paused). A write-protect fault whose MMU try-lock succeeds is fixed without leaving.
//   The flusher and the vCPU form a Dekker pair over (V_MODE, G_FLUSH_GEN): the vCPU stores
//   IN_GUEST then reads G_FLUSH_GEN; the flusher bumps G_FLUSH_GEN then reads V_MODE. With
//   sequentially consistent Atomics at least one of them sees the other's write.
import { G_ENGINE, V_ENGINE } from '../../vmm/run/control-block.ts';

export {
  G_ALLOWANCE,
  G_EVENT,
  G_EVENT_WAITERS,
  G_EXIT,
  G_KICK,
  G_KICK_WAITERS,
  G_PAUSE,
  G_REQ,
  GLOBAL_WORDS,
  UNLIMITED_PASSES,
  V_HALTED,
  V_LINUX_TID,
  V_PASSES,
  V_STATE,
  VCPU_LINE_WORDS,
  controlWords,
  kickAll,
  newControlBlock,
  notifyIfWaiting,
  signalEvent,
  vcpuBase,
} from '../../vmm/run/control-block.ts';

export const GuestMode_OutsideGuest = 0;
export const GuestMode_InGuest = 1;

// VM-wide engine words.
export const G_FLUSH_GEN = G_ENGINE + 0; // remote TLB flush generation
export const G_FLUSH_WAITERS = G_ENGINE + 1; // flushers blocked waiting for acknowledgements
export const G_SLOTS_GEN = G_ENGINE + 2; // memslot generation currently published (see mmu/slot-table.ts)
export const G_SLOTS_WAITERS = G_ENGINE + 3; // VMM blocked in synchronizeSlots

// Per-vCPU engine words.
export const V_MODE = V_ENGINE + 0;
export const V_FLUSH_ACK = V_ENGINE + 1; // last G_FLUSH_GEN this vCPU acknowledged (TLB empty since)
export const V_SLOTS_READER = V_ENGINE + 2; // memslot generation this vCPU is reading (0 = none): SRCU slot
// Registers (the interpreter's architectural state), valid whenever the vCPU is stopped.
export const R_PASS = V_ENGINE + 3; // passes completed (mirror of V_PASSES at the time of saving)
export const R_POS = V_ENGINE + 4; // position within the current pass
export const R_RNG_HI = V_ENGINE + 5;
export const R_RNG_LO = V_ENGINE + 6;
export const R_HALTED = V_ENGINE + 7;
export const R_VALID = V_ENGINE + 8; // 1 once registers were written (by the VMM or a stopped vCPU)
