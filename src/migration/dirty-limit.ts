// Dirty-limit's actuator (QEMU 8.1's dirty-limit migration capability): instead of slowing the
// whole guest (auto-converge, cpu-throttle.ts), hold every vCPU to `vcpu-dirty-limit` bytes of
// newly dirtied memory per second. The engine enforces it per vCPU at its DIRTY_RING_FULL exits
// (Vm.setVcpuDirtyLimit, vmm/run/vcpu-loop.ts), so only the vCPUs that dirty faster than the
// limit ever wait; the rest run untouched. It needs a VM with a dirty ring.
//
// Concurrency: the VMM's main thread only. stop() lifts the limit (a failed or cancelled
// migration leaves the guest running at full speed).
import type { Vm } from '../vmm/engine.ts';
import type { Throttle } from './convergence.ts';

/** QEMU's default vcpu-dirty-limit: 1 MB/s. */
export const DEFAULT_VCPU_DIRTY_LIMIT = 2 ** 20;

export class DirtyLimitThrottle implements Throttle {
  private active = false;
  /** The pre-copy round in which the limit went on (0: never). */
  activatedAtRound = 0;

  constructor(
    private readonly vm: Vm,
    readonly bytesPerSecond: number,
    private readonly currentRound: () => number,
  ) {
    if (vm.config.dirtyRingEntries === 0) throw new Error('dirty-limit needs a VM created with a dirty ring (it is enforced at DIRTY_RING_FULL exits)');
  }

  /** Convergence asked for more: put the limit on (it stays; QEMU's dirty-limit does not step). */
  step(): number {
    if (!this.active) {
      this.vm.setVcpuDirtyLimit(this.bytesPerSecond);
      this.active = true;
      this.activatedAtRound = this.currentRound();
    }
    return 0;
  }

  stop(): void {
    if (!this.active) return;
    this.active = false;
    this.vm.setVcpuDirtyLimit(0);
  }

  /** What the migration JSON reports: the limit, when it went on, how long each vCPU slept. */
  report(): { bytesPerSecond: number; activatedAtRound: number; vcpuSleepMs: number[] } {
    const st = this.vm.stats();
    const vcpuSleepMs = Array.from({ length: this.vm.vcpuCount }, (_, v) => st[`vcpu${v}.dirtyLimitSleepMs`] ?? 0);
    return { bytesPerSecond: this.bytesPerSecond, activatedAtRound: this.activatedAtRound, vcpuSleepMs };
  }
}
