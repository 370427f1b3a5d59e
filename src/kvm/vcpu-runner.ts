// Run control of a kvm VM's vCPU threads, on the VMM thread: starting the workers, the pass
// allowance, waiting for passes, pause (kick) and resume. The protocol with the workers is in
// control.ts (who writes which word) and vcpu-worker.ts (the KVM_RUN loop).
//
// A kick is immediate_exit = 1 in the vCPU's kvm_run, then a signal to its thread: the signal
// makes a blocked KVM_RUN return EINTR, and immediate_exit covers the window in which the
// thread has checked the control words but not yet entered the kernel.
import type { Worker } from 'node:worker_threads';
import type { VcpuProgress } from '../vmm/engine.ts';
import { startWorker } from '../util/worker.ts';
import type { KvmAddon } from './addon.ts';
import { RUN } from './abi.ts';
import {
  UNLIMITED_PASSES, VCPU_EXITED, VCPU_FAILED, VCPU_HALTED, VCPU_PASSES, VCPU_PAUSED, VCPU_RING_FULL,
  VCPU_LINUX_TID, VCPU_STARTED, VCPU_TID_HI, VCPU_TID_LO, VCPU_TID_VALID, VM_ALLOWANCE, VM_DOORBELL, VM_EVENTS, VM_PAUSE, VM_STOP,
  newControl, ring, vcpuBase,
} from './control.ts';
import type { VcpuWorkerData } from './vcpu-worker.ts';

export interface RunnerVcpu {
  fd: number;
  /** The vCPU's kvm_run mapping. */
  run: SharedArrayBuffer;
}

type WaitAsync = (a: Int32Array, i: number, v: number, t?: number) => { async: boolean; value: Promise<string> | string };

export class VcpuRunner {
  readonly control: Int32Array;
  private readonly runBytes: Uint8Array[];
  private readonly workers: (Worker | null)[];
  private readonly failures: (string | null)[];
  private readonly exited: Promise<void>[] = [];
  /** Worker threads exist (they wait outside KVM_RUN while the allowance is 0). */
  private started = false;
  /** allowPasses was called: the vCPUs may be inside KVM_RUN unless paused. */
  private released = false;
  private pausedFlag = false;

  constructor(
    private readonly addon: KvmAddon,
    private readonly vcpus: RunnerVcpu[],
    private readonly haltsAfterFirstPass: boolean,
    /** Called from waitForPasses when a vCPU stopped on KVM_EXIT_DIRTY_RING_FULL. */
    private readonly onRingFull: () => void,
  ) {
    this.control = newControl(vcpus.length);
    this.runBytes = vcpus.map((v) => new Uint8Array(v.run));
    this.workers = vcpus.map(() => null);
    this.failures = vcpus.map(() => null);
  }

  get running(): boolean {
    return this.released && !this.pausedFlag;
  }

  word(v: number, w: number): number {
    return Atomics.load(this.control, vcpuBase(v) + w);
  }

  /** Only while the worker is not started or PAUSED (control.ts). */
  setProgress(v: number, p: VcpuProgress): void {
    Atomics.store(this.control, vcpuBase(v) + VCPU_PASSES, p.passesCompleted);
    Atomics.store(this.control, vcpuBase(v) + VCPU_HALTED, p.halted ? 1 : 0);
  }

  /**
   * Start the worker threads and wait until each has loaded the addon and parked on the
   * doorbell, so thread start-up (~0.1-0.3 s: bundling, isolate, addon) is not charged to the
   * first pass (dirty_log_perf_test likewise starts its vCPU threads before timing populate).
   */
  async startThreads(): Promise<void> {
    this.start();
    for (;;) {
      const seen = Atomics.load(this.control, VM_EVENTS);
      this.throwIfFailed();
      if (this.vcpus.every((_, v) => this.word(v, VCPU_STARTED) === 1)) return;
      await this.nextEvent(seen, 1000);
    }
  }

  private start(): void {
    if (this.started) return;
    this.started = true;
    this.vcpus.forEach((vc, v) => {
      const data: VcpuWorkerData = { vcpu: v, vcpuFd: vc.fd, run: vc.run, control: this.control.buffer as SharedArrayBuffer, haltsAfterFirstPass: this.haltsAfterFirstPass };
      const w = startWorker(new URL('./vcpu-worker.ts', import.meta.url), { ...data });
      this.workers[v] = w;
      w.on('message', (m: { type: string; message: string }) => {
        if (m.type === 'failed') this.failures[v] = m.message;
      });
      w.on('error', (e) => {
        this.failures[v] = `vcpu ${v} worker: ${e.message}`;
        Atomics.store(this.control, vcpuBase(v) + VCPU_FAILED, -1);
        ring(this.control, VM_EVENTS);
      });
      this.exited.push(new Promise((resolve) => w.once('exit', () => resolve())));
    });
  }

  allowPasses(passes: number): void {
    this.start();
    this.released = true;
    Atomics.store(this.control, VM_ALLOWANCE, Number.isFinite(passes) ? Math.min(passes, UNLIMITED_PASSES) : UNLIMITED_PASSES);
    ring(this.control, VM_DOORBELL);
  }

  private throwIfFailed(): void {
    this.vcpus.forEach((_, v) => {
      if (this.word(v, VCPU_FAILED) !== 0) throw new Error(this.failures[v] ?? `vcpu ${v} failed`);
    });
  }

  /** Await any change of a worker's words (or the timeout). */
  private async nextEvent(seen: number, timeoutMs: number): Promise<void> {
    const r = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync(this.control, VM_EVENTS, seen, timeoutMs);
    if (r.async) await r.value;
  }

  private allHalted(): boolean {
    return this.vcpus.every((_, v) => this.word(v, VCPU_HALTED) === 1);
  }

  async waitForPasses(passes: number, timeoutMs = Infinity): Promise<void> {
    const allowance = Atomics.load(this.control, VM_ALLOWANCE);
    if (passes > allowance && !this.allHalted()) {
      throw new Error(`waitForPasses(${passes}): only ${allowance} passes allowed (call allowPasses first)`);
    }
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const seen = Atomics.load(this.control, VM_EVENTS);
      this.throwIfFailed();
      if (this.vcpus.some((_, v) => this.word(v, VCPU_RING_FULL) === 1)) this.onRingFull();
      if (this.vcpus.every((_, v) => this.word(v, VCPU_PASSES) >= passes || this.word(v, VCPU_HALTED) === 1)) return;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`waitForPasses(${passes}): timed out after ${timeoutMs} ms at ${JSON.stringify(this.progress())}`);
      await this.nextEvent(seen, Math.min(left, 1000));
    }
  }

  /** Let workers waiting on the doorbell re-read the control words (after a ring reset). */
  ringDoorbell(): void {
    ring(this.control, VM_DOORBELL);
  }

  vcpuThreadIds(): number[] {
    return this.vcpus.map((_, v) => this.word(v, VCPU_LINUX_TID));
  }

  progress(): VcpuProgress[] {
    return this.vcpus.map((_, v) => ({ vcpu: v, passesCompleted: this.word(v, VCPU_PASSES), halted: this.word(v, VCPU_HALTED) === 1 }));
  }

  private kickAll(): void {
    this.vcpus.forEach((_, v) => {
      Atomics.store(this.runBytes[v]!, RUN.immediateExit, 1);
      if (this.word(v, VCPU_TID_VALID) === 1 && this.word(v, VCPU_EXITED) === 0) {
        const tid = (BigInt(this.word(v, VCPU_TID_HI) >>> 0) << 32n) | BigInt(this.word(v, VCPU_TID_LO) >>> 0);
        this.addon.kick(tid);
      }
    });
  }

  async pause(): Promise<void> {
    this.pausedFlag = true;
    if (!this.released) return;
    this.runBytes.forEach((r) => Atomics.store(r, RUN.immediateExit, 1));
    Atomics.store(this.control, VM_PAUSE, 1);
    ring(this.control, VM_DOORBELL);
    this.kickAll();
    for (;;) {
      const seen = Atomics.load(this.control, VM_EVENTS);
      this.throwIfFailed();
      if (this.vcpus.every((_, v) => this.word(v, VCPU_PAUSED) === 1 || this.word(v, VCPU_EXITED) === 1)) return;
      await this.nextEvent(seen, 1000);
    }
  }

  resume(): void {
    this.pausedFlag = false;
    if (!this.released) return;
    this.runBytes.forEach((r) => Atomics.store(r, RUN.immediateExit, 0));
    Atomics.store(this.control, VM_PAUSE, 0);
    ring(this.control, VM_DOORBELL);
  }

  /** Stop every worker and wait until its thread has exited. */
  async stop(): Promise<void> {
    Atomics.store(this.control, VM_STOP, 1);
    ring(this.control, VM_DOORBELL);
    this.kickAll();
    await Promise.all(this.exited);
  }
}
