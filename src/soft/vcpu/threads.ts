// The VMM side of the vCPU threads: start the workers, drive their run control (allowance,
// pause/resume, exit), wait for progress, read and write their registers.
//
// Runs on the VMM thread only. It writes the global control words (allowance, pause, exit) and
// the R_* registers of stopped vCPUs; see control.ts for the rules and runner.ts for the vCPU
// side of the state machine. Waiting is asynchronous (Atomics.waitAsync on G_EVENT), so the
// VMM's event loop keeps running while vCPUs work.
import type { MessagePort } from 'node:worker_threads';
import { MessageChannel, type Worker } from 'node:worker_threads';
import type { WorkloadSpec } from '../../guest/workload.ts';
import { initialRngState } from '../../guest/workload.ts';
import { startWorker } from '../../util/worker.ts';
import type { VcpuProgress, VcpuState } from '../../vmm/engine.ts';
import type { HostMemoryShared } from '../hostmem/host-memory.ts';
import type { HostAddressSpaceShared } from '../hostmm/host-address-space.ts';
import type { MmuLockShared } from '../locking/mmu-lock.ts';
import type { Stage2Shared } from '../pgtable/stage2.ts';
import type { SlotGeneration, SlotPublisher } from '../mmu/slot-table.ts';
import {
  G_ALLOWANCE,
  G_EVENT,
  G_EVENT_WAITERS,
  G_EXIT,
  G_PAUSE,
  R_HALTED,
  R_PASS,
  R_POS,
  R_RNG_HI,
  R_RNG_LO,
  R_VALID,
  UNLIMITED_PASSES,
  V_EXIT_GPA_HI,
  V_EXIT_GPA_LO,
  V_EXIT_REASON,
  V_HALTED,
  V_LINUX_TID,
  V_PASSES,
  V_STATE,
  VcpuExitReason_Crash,
  VcpuExitReason_Efault,
  VcpuExitReason_Mmio,
  VcpuExitReason_None,
  VcpuRunState_Created,
  VcpuRunState_Exited,
  VcpuRunState_Paused,
  kickAll,
  signalEvent,
  vcpuBase,
} from './control.ts';

/** Everything a vCPU worker attaches to (structured-clonable). */
export interface VcpuWorkerData {
  vcpu: number;
  vcpus: number;
  spec: WorkloadSpec;
  ctl: SharedArrayBuffer;
  stats: SharedArrayBuffer;
  mem: HostMemoryShared;
  mm: HostAddressSpaceShared;
  pgt: Stage2Shared;
  lock: MmuLockShared;
  inval: SharedArrayBuffer;
  slots: SlotGeneration;
  port: MessagePort;
}

export type SharedVmParts = Omit<VcpuWorkerData, 'vcpu' | 'vcpus' | 'spec' | 'slots' | 'port'>;

/** Soft engine registers of one vCPU (VcpuState.arch). */
export interface SoftVcpuArch {
  passes: number;
  pos: number;
  rngHi: number;
  rngLo: number;
  halted: boolean;
}

export class VcpuError extends Error {
  constructor(
    readonly vcpu: number,
    readonly reason: 'mmio' | 'efault' | 'crash' | 'timeout',
    message: string,
  ) {
    super(message);
    this.name = 'VcpuError';
  }
}

export class VcpuThreads {
  private readonly workers: Worker[] = [];
  private readonly exited: Promise<void>[] = [];
  private readonly crashes: (Error | null)[] = [];
  private started = false;

  /** The workload every vCPU runs (set by start()). */
  spec!: WorkloadSpec;

  constructor(
    private readonly ctl: Int32Array,
    readonly count: number,
  ) {}

  /** Start one worker per vCPU; resolves once every one has left the Created state. */
  async start(spec: WorkloadSpec, parts: SharedVmParts, publisher: SlotPublisher): Promise<void> {
    const ctl = this.ctl;
    this.spec = spec;
    for (let v = 0; v < this.count; v++) {
      // Initial registers: pass 0, position 0, the spec's generator state.
      const rng = initialRngState(spec, v);
      const b = vcpuBase(v);
      Atomics.store(ctl, b + R_PASS, 0);
      Atomics.store(ctl, b + R_POS, 0);
      Atomics.store(ctl, b + R_RNG_HI, rng.hi | 0);
      Atomics.store(ctl, b + R_RNG_LO, rng.lo | 0);
      Atomics.store(ctl, b + R_HALTED, 0);
      Atomics.store(ctl, b + R_VALID, 1);
      Atomics.store(ctl, b + V_STATE, VcpuRunState_Created);
    }
    for (let v = 0; v < this.count; v++) {
      const { port1, port2 } = new MessageChannel();
      publisher.addPort(port1);
      const data: VcpuWorkerData = { ...parts, vcpu: v, vcpus: this.count, spec, slots: publisher.current, port: port2 };
      const w = startWorker(new URL('./worker.ts', import.meta.url), data as unknown as Record<string, unknown>, { transferList: [port2] });
      this.crashes.push(null);
      this.exited.push(
        new Promise<void>((resolve) => {
          w.on('error', (e) => {
            this.crashes[v] = e;
          });
          w.on('exit', () => {
            // A thread that died before or outside its run loop still reads as Exited.
            const b = vcpuBase(v);
            if (Atomics.load(ctl, b + V_STATE) !== VcpuRunState_Exited) {
              Atomics.store(ctl, b + V_EXIT_REASON, VcpuExitReason_Crash);
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
    await this.waitUntil(() => {
      for (let v = 0; v < this.count; v++) {
        if (Atomics.load(ctl, vcpuBase(v) + V_STATE) === VcpuRunState_Created) return false;
      }
      return true;
    }, 30_000, 'vCPU threads to start', true);
  }

  get running(): boolean {
    return this.started;
  }

  allowPasses(passes: number): void {
    const n = passes === Infinity || passes >= UNLIMITED_PASSES ? UNLIMITED_PASSES : Math.max(0, Math.floor(passes));
    Atomics.store(this.ctl, G_ALLOWANCE, n);
    kickAll(this.ctl);
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

  async pause(): Promise<void> {
    Atomics.store(this.ctl, G_PAUSE, 1);
    kickAll(this.ctl);
    await this.waitUntil(
      () => {
        for (let v = 0; v < this.count; v++) {
          const s = Atomics.load(this.ctl, vcpuBase(v) + V_STATE);
          if (s !== VcpuRunState_Paused && s !== VcpuRunState_Exited) return false;
        }
        return true;
      },
      60_000,
      'vCPUs to pause',
      false,
    );
  }

  resume(): void {
    Atomics.store(this.ctl, G_PAUSE, 0);
    kickAll(this.ctl);
  }

  get paused(): boolean {
    return Atomics.load(this.ctl, G_PAUSE) !== 0;
  }

  /** The vCPU is stopped with its registers in the control block. */
  isStopped(v: number): boolean {
    const s = Atomics.load(this.ctl, vcpuBase(v) + V_STATE);
    return s === VcpuRunState_Paused || s === VcpuRunState_Exited || (s === VcpuRunState_Created && !this.started);
  }

  readArch(v: number): SoftVcpuArch {
    const b = vcpuBase(v);
    const c = this.ctl;
    return {
      passes: Atomics.load(c, b + R_PASS),
      pos: Atomics.load(c, b + R_POS),
      rngHi: Atomics.load(c, b + R_RNG_HI) >>> 0,
      rngLo: Atomics.load(c, b + R_RNG_LO) >>> 0,
      halted: Atomics.load(c, b + R_HALTED) !== 0,
    };
  }

  /** Write registers of a stopped vCPU; it reloads them when it next wakes. */
  writeArch(v: number, a: SoftVcpuArch): void {
    const b = vcpuBase(v);
    const c = this.ctl;
    Atomics.store(c, b + R_PASS, a.passes);
    Atomics.store(c, b + R_POS, a.pos);
    Atomics.store(c, b + R_RNG_HI, a.rngHi | 0);
    Atomics.store(c, b + R_RNG_LO, a.rngLo | 0);
    Atomics.store(c, b + R_HALTED, a.halted ? 1 : 0);
    Atomics.store(c, b + R_VALID, 1);
    Atomics.store(c, b + V_PASSES, a.passes);
    Atomics.store(c, b + V_HALTED, a.halted ? 1 : 0);
  }

  saveState(v: number): VcpuState {
    const arch = this.readArch(v);
    return { engine: 'soft', vcpu: v, progress: { vcpu: v, passesCompleted: arch.passes, halted: arch.halted }, arch };
  }

  /** Ask every thread to leave and wait for them. */
  async stop(): Promise<void> {
    if (!this.started) return;
    Atomics.store(this.ctl, G_EXIT, 1);
    kickAll(this.ctl);
    await Promise.all(this.exited);
    this.started = false;
  }

  private throwIfFailed(v: number): void {
    const b = vcpuBase(v);
    if (Atomics.load(this.ctl, b + V_STATE) !== VcpuRunState_Exited) return;
    if (Atomics.load(this.ctl, G_EXIT) !== 0) return;
    const reason = Atomics.load(this.ctl, b + V_EXIT_REASON);
    const gpa = Atomics.load(this.ctl, b + V_EXIT_GPA_HI) * 2 ** 32 + (Atomics.load(this.ctl, b + V_EXIT_GPA_LO) >>> 0);
    const at = `gpa 0x${gpa.toString(16)}`;
    if (reason === VcpuExitReason_Mmio) throw new VcpuError(v, 'mmio', `vCPU ${v} exited: MMIO access at ${at} (no memslot, or a write to a read-only one)`);
    if (reason === VcpuExitReason_Efault) throw new VcpuError(v, 'efault', `vCPU ${v} exited: the host could not provide the page at ${at}`);
    if (reason === VcpuExitReason_Crash || reason === VcpuExitReason_None) {
      throw new VcpuError(v, 'crash', `vCPU ${v} thread failed: ${this.crashes[v]?.message ?? 'unknown error'}`);
    }
  }

  /** Poll `done` whenever a vCPU signals G_EVENT, until it holds or the timeout passes. */
  private async waitUntil(done: () => boolean, timeoutMs: number, what: string, failFast: boolean): Promise<void> {
    const ctl = this.ctl;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const ev = Atomics.load(ctl, G_EVENT);
      let ok = false;
      try {
        ok = done();
      } catch (e) {
        if (!failFast) throw e;
      }
      if (ok) return;
      if (failFast) {
        for (let v = 0; v < this.count; v++) {
          // A crashed thread's 'error' event may still be on its way: let it arrive first.
          if (Atomics.load(ctl, vcpuBase(v) + V_STATE) === VcpuRunState_Exited && Atomics.load(ctl, vcpuBase(v) + V_EXIT_REASON) === VcpuExitReason_Crash && this.crashes[v] === null) {
            await Promise.race([this.exited[v], new Promise((r) => setTimeout(r, 1000))]);
          }
          this.throwIfFailed(v);
        }
      }
      const left = deadline - Date.now();
      if (left <= 0) throw new VcpuError(-1, 'timeout', `timed out after ${timeoutMs} ms waiting for ${what}`);
      Atomics.add(ctl, G_EVENT_WAITERS, 1);
      try {
        const r = (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number, t: number): { async: boolean; value: Promise<string> | string } }).waitAsync(ctl, G_EVENT, ev, Math.min(left, 200));
        if (r.async) await r.value;
      } finally {
        Atomics.sub(ctl, G_EVENT_WAITERS, 1);
      }
    }
  }
}
