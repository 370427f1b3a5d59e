// The Vm methods that are run control, written once: both engines' VMs extend VmRunLoop and
// hand it their VcpuRunControl (run-control.ts) once their vCPUs exist. What differs between
// engines (starting a thread, kicking it, its registers) stays in the engine.
//
// VMM thread only (the owner of the Vm, engine.ts).
import type { VcpuProgress, VmStats } from '../engine.ts';
import { VmError } from '../errors.ts';
import type { ExitHandler, ExitName } from './exits.ts';
import type { VcpuRunControl } from './run-control.ts';

export abstract class VmRunLoop {
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

  vcpuThreadIds(): number[] {
    return this.runControl ? this.runControl.vcpuThreadIds() : [];
  }

  async pause(): Promise<void> {
    await this.runControl?.pause();
  }

  resume(): void {
    this.runControl?.resume();
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
