// The run-control block: one SharedArrayBuffer of Int32 words shared by the VMM thread and every
// vCPU thread of one VM, the same layout on both engines. Line 0 holds VM-wide words, then one
// 32-word (128-byte) line per vCPU, so vCPUs never share a cache line. Words from G_ENGINE and
// V_ENGINE up belong to the engine (soft: TLB-flush handshake, memslot SRCU, registers; kvm:
// pthread id, time in KVM_RUN); each engine documents its own.
//
// Concurrency rules (every word through Atomics, so each access is sequentially consistent):
// - G_ALLOWANCE, G_PAUSE, G_EXIT, G_VMM_EXITS: written by the VMM thread only. After changing
//   any of them it bumps G_KICK and G_REQ (kickAll): G_KICK wakes vCPUs waiting in a stopped
//   state (they read G_KICK BEFORE testing the words, so no change is missed); G_REQ is the word
//   a running soft vCPU polls between guest accesses (see soft/vcpu/control.ts).
// - G_EVENT: bumped by any vCPU after it changes a word of its line the VMM waits for
//   (V_STATE, V_PASSES, V_HALTED, a posted exit); the VMM reads it BEFORE testing, then waits on it.
// - *_WAITERS: how many threads wait on the word before it (a notify with nobody waiting costs
//   ~80 ns; notifyIfWaiting skips it).
// - A vCPU line is written by its own vCPU thread only, except: V_DIRTY_LIMIT_US (the VMM sets a
//   limit; the vCPU reads it after each DIRTY_RING_FULL exit), V_EXIT_DONE and V_EXIT_VERDICT
//   (the VMM answering a posted exit, the vCPU waiting for exactly that), V_PASSES and V_HALTED
//   (the VMM loading vCPU state while the vCPU is provably stopped), and V_STATE/V_EXIT_REASON
//   when the VMM finds the thread dead (it can no longer write).
// - A posted exit: the vCPU writes V_EXIT_* fields, then V_EXIT_POSTED (a new sequence number),
//   then V_STATE = WaitingForVmm and bumps G_EVENT. The VMM reads V_EXIT_POSTED, then the fields
//   (published before it), handles, writes V_EXIT_VERDICT, then V_EXIT_DONE = the sequence, and
//   bumps G_KICK. The vCPU reads V_EXIT_DONE, then V_EXIT_VERDICT.
// A reader may assume: V_PASSES only grows while the vCPU runs; V_STATE Paused, Halted,
// WaitingForAllowance, WaitingForVmm or Exited means the thread does not touch guest memory and
// its registers (engine words) are saved, until the VMM changes a G_ word.

// ---- VM-wide words (line 0) ----
export const G_ALLOWANCE = 0; // passes every vCPU may complete (UNLIMITED_PASSES = no limit)
export const G_PAUSE = 1; // 1 while pause() is in force
export const G_EXIT = 2; // 1 once stop() asked the threads to leave
export const G_KICK = 3; // bumped with every change of the words above; stopped vCPUs wait on it
export const G_KICK_WAITERS = 4;
export const G_REQ = 5; // bumped after any request word changes (soft vCPUs poll it in the guest)
export const G_EVENT = 6; // bumped (and notified) by vCPUs on progress/state changes
export const G_EVENT_WAITERS = 7;
export const G_VMM_EXITS = 8; // bit (1 << reason): the VMM has a main-thread handler for that exit
/** First VM-wide word an engine may use for itself. */
export const G_ENGINE = 9;
export const GLOBAL_WORDS = 32;

// ---- per-vCPU line ----
export const V_STATE = 0; // VcpuRunState
export const V_PASSES = 1; // passes completed
export const V_HALTED = 2; // 1 once the guest halted for good
export const V_LINUX_TID = 3; // Linux thread id of the vCPU thread (0 before it starts)
export const V_EXIT_REASON = 4; // the last posted or terminal exit (EXIT_*), -1 = the thread died
export const V_EXIT_GPA_HI = 5;
export const V_EXIT_GPA_LO = 6;
export const V_EXIT_SIZE = 7;
export const V_EXIT_FLAGS = 8;
export const V_EXIT_POSTED = 9; // sequence number of the last exit handed to the VMM
export const V_EXIT_DONE = 10; // sequence number the VMM has answered (VMM writes)
export const V_EXIT_VERDICT = 11; // VERDICT_* for V_EXIT_DONE (VMM writes)
export const V_EXIT_COUNT = 12; // EXIT_REASONS counters, one per reason (vCPU adds)
// Dirty-limit (QEMU's set-vcpu-dirty-limit, enforced at DIRTY_RING_FULL exits, vcpu-loop.ts):
export const V_DIRTY_LIMIT_US = 20; // least microseconds between two ring-full exits (0: no limit; VMM writes)
export const V_DIRTY_THROTTLE_MS = 21; // milliseconds this vCPU slept to keep under its limit (vCPU adds)
/** First per-vCPU word an engine may use for itself (up to VCPU_LINE_WORDS). */
export const V_ENGINE = 22;
export const VCPU_LINE_WORDS = 32;

export const VERDICT_RESUME = 0;
export const VERDICT_FAIL = 1;
export const EXIT_REASON_CRASH = -1;

/** Run states of a vCPU thread (V_STATE); transitions in vcpu-loop.ts. */
export const VcpuRunState_Created = 0;
export const VcpuRunState_WaitingForAllowance = 1;
export const VcpuRunState_Running = 2;
export const VcpuRunState_Paused = 3;
export const VcpuRunState_Halted = 4;
export const VcpuRunState_Exited = 5;
export const VcpuRunState_WaitingForVmm = 6;

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

/** Wake stopped vCPUs only (an answered exit): running ones need not look at their requests. */
export function wakeStopped(ctl: Int32Array): void {
  Atomics.add(ctl, G_KICK, 1);
  notifyIfWaiting(ctl, G_KICK, G_KICK_WAITERS);
}

/** Signal the VMM that some vCPU made progress or changed state. */
export function signalEvent(ctl: Int32Array): void {
  Atomics.add(ctl, G_EVENT, 1);
  notifyIfWaiting(ctl, G_EVENT, G_EVENT_WAITERS);
}

/** A 2^53-safe number split over two words (hi, lo). */
export function storeWide(ctl: Int32Array, hiWord: number, value: number): void {
  Atomics.store(ctl, hiWord, Math.floor(value / 2 ** 32));
  Atomics.store(ctl, hiWord + 1, value >>> 0);
}

export function loadWide(ctl: Int32Array, hiWord: number): number {
  return Atomics.load(ctl, hiWord) * 2 ** 32 + (Atomics.load(ctl, hiWord + 1) >>> 0);
}
