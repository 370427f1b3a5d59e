// The VMM side of the run loop, written once for both engines: start the vCPU threads, the pass
// allowance, waiting for passes, pause / resume / stop (kicks), exits handed to the main thread,
// per-reason exit counts, vCPU failures as VcpuError.
//
// Runs on the VMM thread only. It writes the VM-wide words of the control block and answers
// posted exits (V_EXIT_DONE / V_EXIT_VERDICT); the rules are in control-block.ts and the vCPU
// side of the state machine in vcpu-loop.ts. Waiting is asynchronous (Atomics.waitAsync on
// G_EVENT), so the VMM's event loop keeps running while vCPUs work; while any exit handler is
// registered, a pump on that event loop answers posted exits as they come.
//
// An engine adds only how to start one vCPU thread and, if it needs one, how to kick a vCPU out
// of the guest beyond the G_REQ word (kvm: immediate_exit + a signal to the thread).
import type { Worker } from 'node:worker_threads';
import type { VcpuProgress, VmStats } from '../engine.ts';
import { VcpuError } from '../errors.ts';
import {
  EXIT_REASON_CRASH, G_ALLOWANCE, G_EVENT, G_EVENT_WAITERS, G_EXIT, G_PAUSE, G_VMM_EXITS, UNLIMITED_PASSES,
  V_DIRTY_LIMIT_US, V_DIRTY_THROTTLE_MS, V_EXIT_COUNT, V_EXIT_DONE, V_EXIT_FLAGS, V_EXIT_GPA_HI, V_EXIT_POSTED, V_EXIT_REASON, V_EXIT_SIZE,
  V_EXIT_VERDICT, V_HALTED, V_LINUX_TID, V_PASSES, V_STATE, VERDICT_FAIL, VERDICT_RESUME,
  VcpuRunState_Created, VcpuRunState_Exited, VcpuRunState_Paused, VcpuRunState_WaitingForVmm, kickAll,
  loadWide, signalEvent, vcpuBase, wakeStopped,
} from './control-block.ts';
import { newProgressClock, ProgressClock } from './progress-clock.ts';
import { EXIT_DIRTY_RING_FULL, EXIT_INTERNAL_ERROR, EXIT_MEMORY_FAULT, EXIT_MMIO, EXIT_NAMES, EXIT_REASONS, EXIT_SHUTDOWN, type ExitHandler, type ExitName } from './exits.ts';

/** Engine-specific parts of run control. */
export interface RunControlEngine {
  /** Start vCPU v's thread; it runs a VcpuLoop over the same control block. */
  startThread(v: number): Worker;
  /** Make every vCPU leave the guest now (beyond G_REQ, which kickAll bumps). */
  kick?(): void;
  /** Before PAUSE or EXIT is raised (kvm: set immediate_exit so no KVM_RUN starts). */
  beforeStop?(): void;
  /** Before PAUSE is lowered (kvm: clear immediate_exit). */
  beforeResume?(): void;
}

/** A message a vCPU thread posts to the VMM (vcpu-loop.ts reportCause). */
export interface VcpuCauseMessage {
  type: 'vcpu-cause';
  vcpu: number;
  cause: string;
}

type WaitAsync = (a: Int32Array, i: number, v: number, t: number) => { async: boolean; value: Promise<string> | string };

export class VcpuRunControl {
  private readonly workers: Worker[] = [];
  private readonly exited: Promise<void>[] = [];
  private readonly causes: (string | null)[] = [];
  private readonly handlers: (ExitHandler | undefined)[] = new Array(EXIT_REASONS);
  private readonly inFlight: boolean[];
  private started = false;
  private stopping = false;
  private pumping = false;
  /** The guest's progress clock (progress-clock.ts): each thread gets `clock.sab` and stamps its own ring. */
  readonly clock: ProgressClock;

  constructor(
    readonly ctl: Int32Array,
    readonly count: number,
    private readonly engine: RunControlEngine,
  ) {
    this.clock = new ProgressClock(newProgressClock(count), count);
    this.inFlight = new Array(count).fill(false);
    for (let v = 0; v < count; v++) this.causes.push(null);
  }

  get running(): boolean {
    return this.started;
  }

  /** Start one thread per vCPU; resolves once every one has left the Created state. */
  async start(): Promise<void> {
    const ctl = this.ctl;
    for (let v = 0; v < this.count; v++) Atomics.store(ctl, vcpuBase(v) + V_STATE, VcpuRunState_Created);
    for (let v = 0; v < this.count; v++) {
      const w = this.engine.startThread(v);
      w.on('message', (m: VcpuCauseMessage) => {
        if (m && m.type === 'vcpu-cause') this.causes[v] = m.cause;
      });
      this.exited.push(
        new Promise<void>((resolve) => {
          w.on('error', (e) => {
            this.causes[v] = e.message;
          });
          w.on('exit', () => {
            // A thread that died before or outside its run loop still reads as Exited.
            const b = vcpuBase(v);
            if (Atomics.load(ctl, b + V_STATE) !== VcpuRunState_Exited) {
              Atomics.store(ctl, b + V_EXIT_REASON, EXIT_REASON_CRASH);
              Atomics.store(ctl, b + V_STATE, VcpuRunState_Exited);
              signalEvent(ctl);
            }
            resolve();
          });
        }),
      );
      this.workers.push(w);
    }
    this.started = true;
    this.startPump();
    await this.waitUntil(() => {
      for (let v = 0; v < this.count; v++) if (Atomics.load(ctl, vcpuBase(v) + V_STATE) === VcpuRunState_Created) return false;
      return true;
    }, 30_000, 'vCPU threads to start', true);
  }

  // ---- exit handlers (main thread) ----

  /**
   * Serve `reason` exits on this (main) thread: the vCPU waits in WaitingForVmm until `handler`
   * returns, then re-enters. `undefined` removes the handler (the exit then stops the vCPU).
   */
  onExit(reason: ExitName, handler: ExitHandler | undefined): void {
    const r = EXIT_NAMES.indexOf(reason);
    if (r !== EXIT_MMIO && r !== EXIT_MEMORY_FAULT && r !== EXIT_DIRTY_RING_FULL) {
      throw new RangeError(`onExit: '${reason}' exits are not handed to the VMM (only mmio, memoryFault, dirtyRingFull; the run loop handles the others itself)`);
    }
    this.handlers[r] = handler;
    let mask = 0;
    this.handlers.forEach((h, i) => {
      if (h) mask |= 1 << i;
    });
    Atomics.store(this.ctl, G_VMM_EXITS, mask);
    kickAll(this.ctl);
    this.startPump();
  }

  /** Answer exits the vCPUs posted (each at most once at a time); returns once all are started. */
  private servicePosted(): void {
    const ctl = this.ctl;
    for (let v = 0; v < this.count; v++) {
      const b = vcpuBase(v);
      const seq = Atomics.load(ctl, b + V_EXIT_POSTED);
      if (seq === Atomics.load(ctl, b + V_EXIT_DONE) || this.inFlight[v]) continue;
      const reason = Atomics.load(ctl, b + V_EXIT_REASON);
      const h = this.handlers[reason];
      const exit = { vcpu: v, reason: EXIT_NAMES[reason]!, gpa: loadWide(ctl, b + V_EXIT_GPA_HI), size: Atomics.load(ctl, b + V_EXIT_SIZE), flags: Atomics.load(ctl, b + V_EXIT_FLAGS) };
      this.inFlight[v] = true;
      const answer = (verdict: number, cause?: string): void => {
        if (cause !== undefined) this.causes[v] = cause;
        Atomics.store(ctl, b + V_EXIT_VERDICT, verdict);
        Atomics.store(ctl, b + V_EXIT_DONE, seq);
        this.inFlight[v] = false;
        wakeStopped(ctl);
      };
      if (!h) {
        answer(VERDICT_FAIL, `no handler for ${exit.reason} exits`);
        continue;
      }
      try {
        const p = h(exit);
        if (p && typeof (p as Promise<void>).then === 'function') {
          (p as Promise<void>).then(
            () => answer(VERDICT_RESUME),
            (e: unknown) => answer(VERDICT_FAIL, (e as Error)?.message ?? String(e)),
          );
        } else answer(VERDICT_RESUME);
      } catch (e) {
        answer(VERDICT_FAIL, (e as Error)?.message ?? String(e));
      }
    }
  }

  /** While handlers are registered and threads run: answer posted exits as G_EVENT announces them. */
  private startPump(): void {
    if (this.pumping || !this.started || Atomics.load(this.ctl, G_VMM_EXITS) === 0) return;
    this.pumping = true;
    void (async () => {
      try {
        while (!this.stopping && Atomics.load(this.ctl, G_VMM_EXITS) !== 0) {
          const ev = Atomics.load(this.ctl, G_EVENT);
          this.servicePosted();
          await this.nextEvent(ev, 100);
        }
      } finally {
        this.pumping = false;
      }
    })();
  }

  private async nextEvent(seen: number, timeoutMs: number): Promise<void> {
    const ctl = this.ctl;
    Atomics.add(ctl, G_EVENT_WAITERS, 1);
    try {
      const r = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync(ctl, G_EVENT, seen, timeoutMs);
      if (r.async) await r.value;
    } finally {
      Atomics.sub(ctl, G_EVENT_WAITERS, 1);
    }
  }

  // ---- run control ----

  allowPasses(passes: number): void {
    const n = passes === Infinity || passes >= UNLIMITED_PASSES ? UNLIMITED_PASSES : Math.max(0, Math.floor(passes));
    Atomics.store(this.ctl, G_ALLOWANCE, n);
    kickAll(this.ctl);
  }

  get allowance(): number {
    return Atomics.load(this.ctl, G_ALLOWANCE);
  }

  async waitForPasses(passes: number, timeoutMs = 600_000): Promise<void> {
    await this.waitUntil(
      () => {
        for (let v = 0; v < this.count; v++) {
          const b = vcpuBase(v);
          this.throwIfFailed(v);
          if (Atomics.load(this.ctl, b + V_HALTED) !== 0) continue;
          if (Atomics.load(this.ctl, b + V_PASSES) < passes) return false;
        }
        return true;
      },
      timeoutMs,
      `every vCPU to complete ${passes} passes`,
      true,
    );
  }

  vcpuThreadIds(): number[] {
    return Array.from({ length: this.count }, (_, v) => Atomics.load(this.ctl, vcpuBase(v) + V_LINUX_TID));
  }

  progress(): VcpuProgress[] {
    const out: VcpuProgress[] = [];
    for (let v = 0; v < this.count; v++) {
      const b = vcpuBase(v);
      out.push({ vcpu: v, passesCompleted: Atomics.load(this.ctl, b + V_PASSES), halted: Atomics.load(this.ctl, b + V_HALTED) !== 0 });
    }
    return out;
  }

  /** Only while the vCPU is stopped (loadVcpuState): its published progress. */
  setProgress(v: number, p: VcpuProgress): void {
    Atomics.store(this.ctl, vcpuBase(v) + V_PASSES, p.passesCompleted);
    Atomics.store(this.ctl, vcpuBase(v) + V_HALTED, p.halted ? 1 : 0);
  }

  /**
   * Kick every vCPU out of the guest and resolve once each is outside it for good: Paused,
   * Exited, or WaitingForVmm (registers saved; it goes to Paused once its exit is answered).
   */
  async pause(): Promise<void> {
    this.engine.beforeStop?.();
    Atomics.store(this.ctl, G_PAUSE, 1);
    kickAll(this.ctl);
    this.engine.kick?.();
    await this.waitUntil(
      () => {
        for (let v = 0; v < this.count; v++) {
          const s = Atomics.load(this.ctl, vcpuBase(v) + V_STATE);
          if (s !== VcpuRunState_Paused && s !== VcpuRunState_Exited && s !== VcpuRunState_WaitingForVmm) return false;
        }
        return true;
      },
      60_000,
      'vCPUs to pause',
      false,
    );
  }

  resume(): void {
    this.engine.beforeResume?.();
    Atomics.store(this.ctl, G_PAUSE, 0);
    kickAll(this.ctl);
  }

  get paused(): boolean {
    return Atomics.load(this.ctl, G_PAUSE) !== 0;
  }

  /** The vCPU is stopped with its registers saved (or was never started). */
  isStopped(v: number): boolean {
    const s = Atomics.load(this.ctl, vcpuBase(v) + V_STATE);
    return s === VcpuRunState_Paused || s === VcpuRunState_Exited || s === VcpuRunState_WaitingForVmm || (s === VcpuRunState_Created && !this.started);
  }

  /** Ask every thread to leave and wait for them. */
  async stop(): Promise<void> {
    if (!this.started) return;
    this.stopping = true;
    this.engine.beforeStop?.();
    Atomics.store(this.ctl, G_EXIT, 1);
    kickAll(this.ctl);
    this.engine.kick?.();
    await Promise.all(this.exited);
    this.started = false;
  }

  /**
   * Dirty-limit: vCPU `vcpu` may come back from one DIRTY_RING_FULL exit no sooner than
   * `intervalUs` after the previous one (0: no limit); a kick makes a sleeping vCPU see it.
   */
  setDirtyLimitInterval(vcpu: number, intervalUs: number): void {
    Atomics.store(this.ctl, vcpuBase(vcpu) + V_DIRTY_LIMIT_US, intervalUs);
    kickAll(this.ctl);
  }

  /** Exit counts, per reason (`exitsMemoryFault`) and per vCPU (`vcpu0.exitsMemoryFault`), plus `vcpuExits`. */
  exitStats(): VmStats {
    const out: VmStats = {};
    let total = 0;
    for (let r = 0; r < EXIT_REASONS; r++) out[exitStatName(r)] = 0;
    for (let v = 0; v < this.count; v++) {
      for (let r = 0; r < EXIT_REASONS; r++) {
        const n = Atomics.load(this.ctl, vcpuBase(v) + V_EXIT_COUNT + r);
        out[`vcpu${v}.${exitStatName(r)}`] = n;
        out[exitStatName(r)]! += n;
        total += n;
      }
    }
    out.vcpuExits = total;
    let throttled = 0;
    for (let v = 0; v < this.count; v++) {
      const ms = Atomics.load(this.ctl, vcpuBase(v) + V_DIRTY_THROTTLE_MS);
      out[`vcpu${v}.dirtyLimitSleepMs`] = ms;
      throttled += ms;
    }
    out.dirtyLimitSleepMs = throttled;
    return out;
  }

  private throwIfFailed(v: number): void {
    const b = vcpuBase(v);
    if (Atomics.load(this.ctl, b + V_STATE) !== VcpuRunState_Exited) return;
    if (Atomics.load(this.ctl, G_EXIT) !== 0) return;
    throw this.failure(v);
  }

  /** The VcpuError for a vCPU that stopped for good. */
  private failure(v: number): VcpuError {
    const b = vcpuBase(v);
    const reason = Atomics.load(this.ctl, b + V_EXIT_REASON);
    const at = `gpa 0x${loadWide(this.ctl, b + V_EXIT_GPA_HI).toString(16)}`;
    const cause = this.causes[v];
    const why = cause ? `: ${cause}` : '';
    if (reason === EXIT_MMIO) return new VcpuError(v, 'mmio', `vCPU ${v} exited: MMIO access at ${at} (no memslot, or a write to a read-only one)${why}`);
    if (reason === EXIT_MEMORY_FAULT) return new VcpuError(v, 'efault', `vCPU ${v} exited: the host could not provide the page at ${at}${why}`);
    if (reason === EXIT_SHUTDOWN) return new VcpuError(v, 'shutdown', `vCPU ${v} exited: the guest shut down${why}`);
    if (reason === EXIT_INTERNAL_ERROR) return new VcpuError(v, 'internal', `vCPU ${v} exited: internal error${why}`);
    return new VcpuError(v, 'crash', `vCPU ${v} thread failed: ${cause ?? 'unknown error'}`);
  }

  /** Poll `done` whenever a vCPU signals G_EVENT, until it holds or the timeout passes. */
  private async waitUntil(done: () => boolean, timeoutMs: number, what: string, failFast: boolean): Promise<void> {
    const ctl = this.ctl;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const ev = Atomics.load(ctl, G_EVENT);
      this.servicePosted();
      let ok = false;
      try {
        ok = done();
      } catch (e) {
        if (!failFast) throw e;
      }
      if (ok) return;
      if (failFast) {
        for (let v = 0; v < this.count; v++) {
          // A dying thread's cause (message or 'error' event) may still be on its way: let it arrive.
          const b = vcpuBase(v);
          if (Atomics.load(ctl, b + V_STATE) === VcpuRunState_Exited && Atomics.load(ctl, G_EXIT) === 0 && this.causes[v] === null) {
            const r = Atomics.load(ctl, b + V_EXIT_REASON);
            if (r === EXIT_REASON_CRASH || r === EXIT_INTERNAL_ERROR || r === EXIT_SHUTDOWN) await Promise.race([this.exited[v], new Promise((res) => setTimeout(res, 1000))]);
          }
          this.throwIfFailed(v);
        }
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new VcpuError(-1, 'timeout', `timed out after ${timeoutMs} ms waiting for ${what}`);
      await this.nextEvent(ev, Math.min(left, 200));
    }
  }
}

export function exitStatName(reason: number): string {
  const n = EXIT_NAMES[reason]!;
  return `exits${n[0]!.toUpperCase()}${n.slice(1)}`;
}
