// The vCPU control block: one SharedArrayBuffer of Int32 words shared by the VMM thread and every
// vCPU worker. It carries run control (pass allowance, pause, exit), the remote-TLB-flush
// handshake, memslot generation reader slots and each vCPU's architectural registers.
//
// Concurrency rules (every word is accessed with Atomics unless noted):
// - Global words (line 0) are written by the VMM thread only, except G_EVENT (bumped by any vCPU
//   when it completes a pass or changes run state) and G_FLUSH_GEN/G_REQ (bumped by whichever
//   thread flushes remote TLBs: the VMM or a vCPU in its fault handler).
// - G_REQ is the one word a vCPU reads before every guest access: any request (flush, pause,
//   exit, a new memslot generation) bumps it after publishing its own word, so a vCPU that sees G_REQ unchanged may keep
//   using its TLB and keep running.
// - Per-vCPU lines (V_* offsets, 32 words = 128 bytes apart so vCPUs do not share cache lines)
//   are written by their own vCPU only, except the register words R_*, which the VMM writes
//   while the vCPU is provably stopped (not started, or PAUSED); the vCPU reloads them whenever
//   it leaves a stopped state.
// - V_MODE is the guest-mode word of kvm_vcpu.mode: IN_GUEST while the vCPU may access guest
//   memory through its soft TLB, OUTSIDE_GUEST otherwise (a fault that may block, waiting,
//   paused). A write-protect fault whose MMU try-lock succeeds is fixed without leaving.
//   The flusher and the vCPU form a Dekker pair over (V_MODE, G_FLUSH_GEN): the vCPU stores
//   IN_GUEST then reads G_FLUSH_GEN; the flusher bumps G_FLUSH_GEN then reads V_MODE. With
//   sequentially consistent Atomics at least one of them sees the other's write.

/** Run states of a vCPU thread (V_STATE). Transitions are commented where they happen (runner.ts). */
/** Created, thread not yet running the guest. */
export const VcpuRunState_Created = 0;
/** Passes completed == allowance: blocked on G_KICK until allowPasses raises it. */
export const VcpuRunState_WaitingForAllowance = 1;
/** Executing the workload (guest mode or handling its own fault). */
export const VcpuRunState_Running = 2;
/** Stopped by pause(): registers saved in R_*, no guest access until resume(). */
export const VcpuRunState_Paused = 3;
/** The idle workload finished its slice: never runs again (a halted guest). */
export const VcpuRunState_Halted = 4;
/** Thread is leaving (destroy) or left after an unrecoverable exit. */
export const VcpuRunState_Exited = 5;

export const GuestMode_OutsideGuest = 0;
export const GuestMode_InGuest = 1;

/** Why a vCPU stopped running the guest for good (V_EXIT_REASON). */
export const VcpuExitReason_None = 0;
/** A guest access hit no memslot or a write hit a READONLY slot: an MMIO exit with no device. */
export const VcpuExitReason_Mmio = 1;
/** The host could not provide a page (getUserPage failed). */
export const VcpuExitReason_Efault = 2;
/** The worker threw. */
export const VcpuExitReason_Crash = 3;

// Global words (line 0).
export const G_ALLOWANCE = 0; // passes every vCPU may complete (0x7fffffff = unlimited)
export const G_PAUSE = 1; // 1 while pause() is in force
export const G_EXIT = 2; // 1 once destroy() asked the threads to leave
export const G_KICK = 3; // bumped with every change of ALLOWANCE/PAUSE/EXIT; stopped vCPUs wait on it
export const G_KICK_WAITERS = 4; // vCPUs blocked on G_KICK (saves notify calls)
export const G_REQ = 5; // bumped after any request word changes (flush, pause, exit, memslots)
export const G_FLUSH_GEN = 6; // remote TLB flush generation
export const G_FLUSH_WAITERS = 7; // flushers blocked waiting for acknowledgements
export const G_EVENT = 8; // bumped (and notified) by vCPUs on progress/state changes
export const G_EVENT_WAITERS = 9;
export const G_SLOTS_GEN = 10; // memslot generation currently published (see mmu/slot-table.ts)
export const G_SLOTS_WAITERS = 11; // VMM blocked in synchronizeSlots
export const GLOBAL_WORDS = 32;

// Per-vCPU line offsets.
export const V_STATE = 0;
export const V_MODE = 1;
export const V_FLUSH_ACK = 2; // last G_FLUSH_GEN this vCPU acknowledged (TLB empty since)
export const V_PASSES = 3; // passes completed
export const V_HALTED = 4;
export const V_EXIT_REASON = 5;
export const V_EXIT_GPA_HI = 6;
export const V_EXIT_GPA_LO = 7;
export const V_SLOTS_READER = 8; // memslot generation this vCPU is reading (0 = none): SRCU slot
export const V_LINUX_TID = 9; // Linux thread id of the vCPU thread, stored once at start (0 before)
// Registers (the interpreter's architectural state), valid whenever the vCPU is stopped.
export const R_PASS = 16; // passes completed (mirror of V_PASSES at the time of saving)
export const R_POS = 17; // position within the current pass
export const R_RNG_HI = 18;
export const R_RNG_LO = 19;
export const R_HALTED = 20;
export const R_VALID = 21; // 1 once registers were written (by the VMM or a stopped vCPU)
export const VCPU_LINE_WORDS = 32;

export const UNLIMITED_PASSES = 0x7fffffff;

export function controlWords(vcpus: number): number {
  return GLOBAL_WORDS + vcpus * VCPU_LINE_WORDS;
}

export function vcpuBase(vcpu: number): number {
  return GLOBAL_WORDS + vcpu * VCPU_LINE_WORDS;
}

export function newControlBlock(maxVcpus: number): Int32Array {
  return new Int32Array(new SharedArrayBuffer(controlWords(maxVcpus) * 4));
}

/** Wake threads blocked on a word only when someone waits there (notify with no waiter costs ~80 ns). */
export function notifyIfWaiting(ctl: Int32Array, word: number, waitersWord: number): void {
  if (Atomics.load(ctl, waitersWord) !== 0) Atomics.notify(ctl, word);
}

/** Bump G_KICK and G_REQ so running vCPUs notice at their next access and stopped ones wake. */
export function kickAll(ctl: Int32Array): void {
  Atomics.add(ctl, G_KICK, 1);
  Atomics.add(ctl, G_REQ, 1);
  notifyIfWaiting(ctl, G_KICK, G_KICK_WAITERS);
}

/** Signal the VMM that some vCPU made progress or changed state. */
export function signalEvent(ctl: Int32Array): void {
  Atomics.add(ctl, G_EVENT, 1);
  notifyIfWaiting(ctl, G_EVENT, G_EVENT_WAITERS);
}
