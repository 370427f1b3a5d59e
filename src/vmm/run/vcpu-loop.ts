// The vCPU thread's run loop, written once for both engines: enter the guest, come back with an
// exit, handle it, enter again (KVM_RUN's contract, Firecracker's vcpu state machine).
//
// Runs on the vCPU's own thread (in tests, any single thread). The engine supplies only
// GuestEntry ("enter until the next exit", its registers); everything else is here. Concurrency
// rules are those of control-block.ts: this file writes only its own vCPU line (V_STATE,
// V_PASSES, V_HALTED, V_EXIT_* except DONE/VERDICT, the exit counters), reads VM-wide words with
// Atomics and waits on G_KICK.
//
// State machine (V_STATE). Every transition is one Atomics.store in setState(), commented where
// it happens:
//   Created --first loop--> Running | WaitingForAllowance | Paused | Halted | Exited
//   Running --IO exit (pass done), allowance used--> WaitingForAllowance   (registers saved)
//   Running --INTR exit, pause requested--> Paused                        (registers saved)
//   Running --HLT exit--> Halted
//   Running --MMIO / MEMORY_FAULT / DIRTY_RING_FULL, a VMM handler registered--> WaitingForVmm
//   (after a DIRTY_RING_FULL, a vCPU over its dirty limit sleeps in Running first: dirtyLimit())
//   WaitingForVmm --VMM answered RESUME--> (loop head: Running | Paused | ...; the access repeats)
//   Running | WaitingForVmm --unhandled or FAIL, SHUTDOWN, INTERNAL_ERROR--> Exited (V_EXIT_REASON)
//   WaitingForAllowance --allowance raised--> Running
//   Paused --resume--> (loop head)
//   any --stop request--> Exited;  any --the thread throws--> Exited (V_EXIT_REASON = CRASH)
// Stopped states (all but Running and Created) save registers on entry and reload them on every
// wake-up: the VMM may load new ones meanwhile (loadVcpuState).
//
// Handlers: IO, HLT and INTR are handled here on the vCPU thread. MMIO, MEMORY_FAULT and
// DIRTY_RING_FULL go first to the engine's on-thread handler (GuestEntry.handleOnThread: e.g.
// a page the engine can fetch itself), then, if the VMM registered a handler for that reason
// (bit in G_VMM_EXITS), are posted to the VMM's main thread while this thread waits; otherwise
// the vCPU stops with that exit as its cause.

import {
  EXIT_REASON_CRASH, G_ALLOWANCE, G_EXIT, G_KICK, G_KICK_WAITERS, G_PAUSE, G_VMM_EXITS, V_EXIT_COUNT,
  V_EXIT_DONE, V_EXIT_FLAGS, V_EXIT_GPA_HI, V_EXIT_POSTED, V_EXIT_REASON, V_EXIT_SIZE, V_EXIT_VERDICT,
  V_DIRTY_LIMIT_US, V_DIRTY_THROTTLE_MS, V_HALTED, V_PASSES, V_STATE, VERDICT_RESUME, VcpuRunState_Exited, VcpuRunState_Halted, VcpuRunState_Paused,
  VcpuRunState_Running, VcpuRunState_WaitingForAllowance, VcpuRunState_WaitingForVmm, signalEvent, storeWide,
  vcpuBase,
} from './control-block.ts';
import { EXIT_DIRTY_RING_FULL, EXIT_HLT, EXIT_INTERNAL_ERROR, EXIT_INTR, EXIT_IO, EXIT_SHUTDOWN, VcpuExit } from './exits.ts';

/** What an engine provides to the loop: entering its guest, and its registers. */
export interface GuestEntry {
  /**
   * Enter the guest and run until the next exit; fill `exit` (reason and its fields). Called in
   * state Running only. After an exit that is not IO/HLT/INTR, entering again repeats the access
   * that exited (the engine keeps its registers at that access).
   */
  enter(exit: VcpuExit): void;
  /** Copy the registers into the control block (the vCPU is about to stop). */
  saveRegs(): void;
  /** Reload them (leaving a stopped state). Also publishes V_PASSES / V_HALTED if it keeps them. */
  loadRegs(): void;
  /** Before reporting Paused (kvm: let KVM_RUN complete pending I/O with immediate_exit). */
  quiesce?(): void;
  /** Resolve an MMIO / MEMORY_FAULT / DIRTY_RING_FULL exit on this thread; true: re-enter. */
  handleOnThread?(exit: VcpuExit): boolean;
  /** enter() threw: leave whatever guest-mode state it holds (soft: V_MODE, so no flusher waits). */
  onCrash?(): void;
}

export class VcpuLoop {
  readonly base: number;
  readonly exit = new VcpuExit();

  constructor(
    readonly ctl: Int32Array,
    readonly vcpu: number,
    private readonly entry: GuestEntry,
    /** Tell the VMM why this vCPU stopped for good (a message to the main thread). */
    private readonly reportCause: (cause: string) => void = () => {},
  ) {
    this.base = vcpuBase(vcpu);
  }

  private setState(s: number): void {
    Atomics.store(this.ctl, this.base + V_STATE, s);
    signalEvent(this.ctl);
  }

  private state(): number {
    return Atomics.load(this.ctl, this.base + V_STATE);
  }

  /** The whole life of the thread. Returns when asked to stop or after a terminal exit. */
  run(): void {
    const ctl = this.ctl;
    const b = this.base;
    const entry = this.entry;
    const x = this.exit;
    entry.loadRegs();
    try {
      for (;;) {
        // Read the kick counter before testing conditions, so a change made after the tests
        // makes the wait below return at once (no lost wake-up).
        const kick = Atomics.load(ctl, G_KICK);
        if (Atomics.load(ctl, G_EXIT) !== 0) {
          entry.saveRegs();
          this.setState(VcpuRunState_Exited); // any -> Exited: stop() asked us to leave
          return;
        }
        if (Atomics.load(ctl, G_PAUSE) !== 0) {
          if (this.state() !== VcpuRunState_Paused) {
            entry.quiesce?.();
            entry.saveRegs();
            this.setState(VcpuRunState_Paused); // -> Paused: registers saved, the VMM may read/write them
          }
          this.waitKick(kick);
          continue;
        }
        if (Atomics.load(ctl, b + V_HALTED) !== 0) {
          if (this.state() !== VcpuRunState_Halted) this.setState(VcpuRunState_Halted); // -> Halted: the guest is done
          this.waitKick(kick);
          continue;
        }
        if (Atomics.load(ctl, b + V_PASSES) >= Atomics.load(ctl, G_ALLOWANCE)) {
          if (this.state() !== VcpuRunState_WaitingForAllowance) {
            entry.saveRegs();
            this.setState(VcpuRunState_WaitingForAllowance); // -> WaitingForAllowance: passes used up
          }
          this.waitKick(kick);
          continue;
        }
        if (this.state() !== VcpuRunState_Running) this.setState(VcpuRunState_Running); // -> Running: allowance left, no pause
        entry.enter(x);
        const r = x.reason;
        Atomics.add(ctl, b + V_EXIT_COUNT + r, 1);
        if (r === EXIT_IO) {
          // The pass report: publish it; the loop head decides whether to re-enter.
          Atomics.store(ctl, b + V_PASSES, x.pass);
          if (x.halted) {
            Atomics.add(ctl, b + V_EXIT_COUNT + EXIT_HLT, 1);
            Atomics.store(ctl, b + V_HALTED, 1);
          }
          entry.saveRegs();
          signalEvent(ctl);
        } else if (r === EXIT_HLT) {
          Atomics.store(ctl, b + V_HALTED, 1);
          entry.saveRegs();
          signalEvent(ctl);
        } else if (r === EXIT_INTR) {
          // Kicked: the loop head reads what changed (pause, stop, allowance).
        } else if (r === EXIT_SHUTDOWN || r === EXIT_INTERNAL_ERROR) {
          this.terminate(x);
          return;
        } else if (!(entry.handleOnThread?.(x) ?? false) && !this.handToVmm(x)) {
          this.terminate(x);
          return;
        } else if (r === EXIT_DIRTY_RING_FULL) {
          this.dirtyLimit();
        }
      }
    } catch (e) {
      entry.onCrash?.();
      Atomics.store(ctl, b + V_EXIT_REASON, EXIT_REASON_CRASH);
      this.reportCause((e as Error).message);
      this.setState(VcpuRunState_Exited); // any -> Exited: the thread threw
      throw e;
    }
  }

  /** Record a terminal exit and leave: Running | WaitingForVmm -> Exited. */
  private terminate(x: VcpuExit): void {
    this.publishExit(x);
    if (x.cause !== '') this.reportCause(x.cause);
    this.entry.saveRegs();
    this.setState(VcpuRunState_Exited); // -> Exited: an exit nobody resolves (V_EXIT_REASON says which)
  }

  private publishExit(x: VcpuExit): void {
    const ctl = this.ctl;
    const b = this.base;
    Atomics.store(ctl, b + V_EXIT_REASON, x.reason);
    storeWide(ctl, b + V_EXIT_GPA_HI, x.gpa);
    Atomics.store(ctl, b + V_EXIT_SIZE, x.size);
    Atomics.store(ctl, b + V_EXIT_FLAGS, x.flags);
  }

  /**
   * Post the exit to the VMM's main thread and wait for its verdict. False: the VMM has no
   * handler for it, or its handler failed (the caller terminates). True also when a stop request
   * came first (the loop head leaves).
   */
  private handToVmm(x: VcpuExit): boolean {
    const ctl = this.ctl;
    const b = this.base;
    if ((Atomics.load(ctl, G_VMM_EXITS) & (1 << x.reason)) === 0) return false;
    this.publishExit(x);
    this.entry.saveRegs();
    const seq = (Atomics.load(ctl, b + V_EXIT_POSTED) + 1) | 0;
    Atomics.store(ctl, b + V_EXIT_POSTED, seq);
    this.setState(VcpuRunState_WaitingForVmm); // Running -> WaitingForVmm: exit posted, registers saved
    for (;;) {
      const kick = Atomics.load(ctl, G_KICK);
      if (Atomics.load(ctl, G_EXIT) !== 0) return true;
      if (Atomics.load(ctl, b + V_EXIT_DONE) === seq) break;
      this.waitKick(kick);
    }
    this.entry.loadRegs();
    // WaitingForVmm -> (loop head) on RESUME; -> Exited (terminate) on FAIL.
    return Atomics.load(ctl, b + V_EXIT_VERDICT) === VERDICT_RESUME;
  }

  /** When this vCPU's last DIRTY_RING_FULL exit was resolved (this thread's clock), or -1. */
  private lastRingFull = -1;

  /**
   * Dirty-limit (QEMU 8.1's dirty-limit capability): a vCPU dirties one ring's soft limit of pages
   * between two DIRTY_RING_FULL exits, so a limit of R bytes/s is a least interval between them
   * (V_DIRTY_LIMIT_US, set by the VMM from R and the ring size). A vCPU that came back sooner
   * sleeps the difference, here on its own thread, outside the guest; a kick (pause, stop, a new
   * limit) ends the sleep at once. Only vCPUs that dirty faster than the limit ever sleep.
   */
  private dirtyLimit(): void {
    const ctl = this.ctl;
    const now = performance.now();
    const last = this.lastRingFull;
    this.lastRingFull = now;
    if (last < 0) return;
    // G_KICK is VM-wide (the VMM answering another vCPU's exit bumps it too): wait again until
    // the deadline unless the kick was for this vCPU's business (pause, stop, a changed limit).
    let waited = false;
    for (;;) {
      const kick = Atomics.load(ctl, G_KICK);
      if (Atomics.load(ctl, G_PAUSE) !== 0 || Atomics.load(ctl, G_EXIT) !== 0) break;
      const intervalMs = Atomics.load(ctl, this.base + V_DIRTY_LIMIT_US) / 1000;
      const left = last + intervalMs - performance.now();
      if (intervalMs === 0 || left <= 0) break;
      waited = true;
      Atomics.add(ctl, G_KICK_WAITERS, 1);
      Atomics.wait(ctl, G_KICK, kick, left);
      Atomics.sub(ctl, G_KICK_WAITERS, 1);
    }
    if (!waited) return;
    const after = performance.now();
    Atomics.add(ctl, this.base + V_DIRTY_THROTTLE_MS, Math.round(after - now));
    this.lastRingFull = after;
  }

  /**
   * Block while stopped. Registers were saved when the vCPU stopped; the VMM may have loaded
   * new ones meanwhile (loadVcpuState), so reload them on every wake-up.
   */
  private waitKick(kick: number): void {
    Atomics.add(this.ctl, G_KICK_WAITERS, 1);
    Atomics.wait(this.ctl, G_KICK, kick);
    Atomics.sub(this.ctl, G_KICK_WAITERS, 1);
    this.entry.loadRegs();
  }
}
