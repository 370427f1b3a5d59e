// The Vm methods that are run control, written once: both engines' VMs extend VmRunLoop and
// hand it their VcpuRunControl (run-control.ts) once their vCPUs exist. What differs between
// engines (starting a thread, kicking it, its registers) stays in the engine.
//
// VMM thread only (the owner of the Vm, engine.ts).
import { PAGE_SIZE, type VcpuProgress, type VmConfig, type VmStats } from '../engine.ts';
import { DIRTY_RING_RSVD_ENTRIES } from '../dirty-ring.ts';
import { VmError } from '../errors.ts';
import type { ExitHandler, ExitName } from './exits.ts';
import type { VcpuRunControl } from './run-control.ts';
import type { ProgressClock } from './progress-clock.ts';

export abstract class VmRunLoop {
  abstract readonly config: Readonly<Required<VmConfig>>;
  /** Set by the engine's createVcpus once the vCPU threads are started. */
  protected runControl: VcpuRunControl | null = null;

  protected get rc(): VcpuRunControl {
    if (!this.runControl) throw new VmError('state', 'no vCPUs: call createVcpus first');
    return this.runControl;
  }

  allowPasses(passes: number): void {
    this.rc.allowPasses(passes);
  }

  waitForPasses(passes: number, timeoutMs?: number): Promise<void> {
    return this.rc.waitForPasses(passes, timeoutMs);
  }

  progress(): VcpuProgress[] {
    return this.runControl ? this.runControl.progress() : [];
  }

  progressClock(): ProgressClock | null {
    return this.runControl?.clock ?? null;
  }

  vcpuThreadIds(): number[] {
    return this.runControl ? this.runControl.vcpuThreadIds() : [];
  }

  async pause(): Promise<void> {
    await this.runControl?.pause();
  }

  resume(): void {
    this.runControl?.resume();
  }

  /**
   * set-vcpu-dirty-limit (QEMU 8.1): hold `vcpu` (every vCPU when omitted) to at most
   * `bytesPerSecond` of newly dirtied memory, 0 to lift the limit. Enforced at its DIRTY_RING_FULL
   * exits (vcpu-loop.ts dirtyLimit), so only on a VM created with a dirty ring: one ring's soft
   * limit of pages per exit gives the least interval between two exits.
   */
  setVcpuDirtyLimit(bytesPerSecond: number, vcpu?: number): void {
    const entries = this.config.dirtyRingEntries;
    if (entries === 0) throw new VmError('config', 'setVcpuDirtyLimit: the dirty limit is enforced through the dirty ring; create the VM with dirtyRingEntries');
    if (!Number.isFinite(bytesPerSecond) || bytesPerSecond < 0) throw new VmError('config', `setVcpuDirtyLimit: ${bytesPerSecond} is not a rate in bytes per second`);
    const rc = this.rc;
    if (vcpu !== undefined && (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= rc.count)) throw new VmError('state', `setVcpuDirtyLimit: no vCPU ${vcpu}`);
    const pagesPerExit = entries - DIRTY_RING_RSVD_ENTRIES;
    const intervalUs = bytesPerSecond === 0 ? 0 : Math.min(2 ** 31 - 1, Math.round(((pagesPerExit * PAGE_SIZE) / bytesPerSecond) * 1e6));
    for (let v = 0; v < rc.count; v++) if (vcpu === undefined || v === vcpu) rc.setDirtyLimitInterval(v, intervalUs);
  }

  /** Serve `reason` exits on the VMM thread (engine.ts Vm.onExit). */
  onExit(reason: ExitName, handler: ExitHandler | undefined): void {
    this.rc.onExit(reason, handler);
  }

  /**
   * Registers may be read or written only while the vCPU is stopped, or before the first
   * allowance (every vCPU then waits for one and reloads its registers when it wakes).
   */
  protected requireStopped(vcpu: number, what: string): void {
    const rc = this.rc;
    if (!Number.isInteger(vcpu) || vcpu < 0 || vcpu >= rc.count) throw new VmError('state', `${what}: no vCPU ${vcpu}`);
    if (!rc.isStopped(vcpu) && rc.allowance !== 0) throw new VmError('state', `${what}: vCPU ${vcpu} is running; pause() first`);
  }

  /** Exit counts per reason and per vCPU (run-control.ts exitStats), empty before vCPUs exist. */
  protected exitStats(): VmStats {
    return this.runControl ? this.runControl.exitStats() : {};
  }
}
