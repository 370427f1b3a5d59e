// Auto-converge's actuator: slow the guest down so that it dirties memory more slowly than the
// link drains it (QEMU's cpu_throttle: every vCPU runs a fixed 10 ms timeslice, then sleeps
// pct / (1 - pct) timeslices). The engine interface has no per-vCPU sleep, so the throttle
// pauses and resumes the whole VM with that duty cycle; pause() is "kick every vCPU out of the
// guest", which is exactly what QEMU's throttle does with async_run_on_cpu.
//
// Concurrency: runs on the VMM's main thread as a timer loop; the migration loop may call
// dirty-log methods at any time (paused or not, both are allowed). stop() must be awaited before
// anyone else pauses or resumes the VM: it leaves the VM running.
import type { Vm } from '../vmm/engine.ts';

/** QEMU's defaults: cpu-throttle-initial 20, cpu-throttle-increment 10, max 99. */
export const THROTTLE_INITIAL_PERCENT = 20;
export const THROTTLE_INCREMENT_PERCENT = 10;
export const THROTTLE_MAX_PERCENT = 99;
const TIMESLICE_MS = 10;

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export class CpuThrottle {
  private pct = 0;
  private loop: Promise<void> | null = null;
  private stopping = false;
  /** Milliseconds the guest spent paused by the throttle. */
  pausedMs = 0;

  constructor(private readonly vm: Vm) {}

  get percent(): number {
    return this.pct;
  }

  /** Raise the throttle one step (20%, then +10% up to 99%). Returns the new percentage. */
  step(): number {
    this.pct = this.pct === 0 ? THROTTLE_INITIAL_PERCENT : Math.min(THROTTLE_MAX_PERCENT, this.pct + THROTTLE_INCREMENT_PERCENT);
    if (!this.loop) this.loop = this.run();
    return this.pct;
  }

  private async run(): Promise<void> {
    let paused = false;
    try {
      while (!this.stopping) {
        const tRun = performance.now();
        await sleep(TIMESLICE_MS);
        if (this.stopping) break;
        // Timers run late on a busy event loop: size the sleep from the time the guest really
        // ran, so the duty cycle holds.
        const ranMs = performance.now() - tRun;
        const sleepMs = (ranMs * this.pct) / (100 - this.pct);
        const t0 = performance.now();
        await this.vm.pause();
        paused = true;
        // Sleep in slices so that stop() does not wait for a 990 ms throttle sleep.
        for (let left = sleepMs; left > 0 && !this.stopping; left -= TIMESLICE_MS) await sleep(Math.min(left, TIMESLICE_MS));
        this.pausedMs += performance.now() - t0;
        if (this.stopping && this.leavePaused) return;
        this.vm.resume();
        paused = false;
      }
      if (this.leavePaused && !paused) await this.vm.pause();
    } catch (e) {
      if (paused && !this.leavePaused) this.vm.resume();
      throw e;
    }
  }

  private leavePaused = false;

  /**
   * End throttling; resolves once the loop has exited, with the VM running, or with it paused
   * when `leavePaused` (stop-and-copy: the guest goes straight from throttled to stopped).
   */
  async stop(leavePaused = false): Promise<void> {
    this.leavePaused = leavePaused;
    this.stopping = true;
    const l = this.loop;
    this.loop = null;
    if (l) await l;
  }
}
