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

/** The pause a vCPU over its limit should feel at most, where the ring allows (dirtyRingForLimit). */
export const DIRTY_LIMIT_STALL_TARGET_MS = 100;
/** KVM's smallest dirty ring (4 KiB of 16-byte entries) and the reserve below its soft limit. */
const RING_MIN = 256;
const RING_RESERVE = 64;
const RING_MAX = 4096;

/**
 * Dirty-ring entries per vCPU for a limit: the limit is enforced once per ring (a vCPU over it
 * dirties entries - 64 pages at full speed, then sleeps until that many pages at the limit would
 * have taken), so that sleep, which its guest perceives as a stall, is (entries - 64) * 4 KiB /
 * limit. The largest power of two that keeps it within DIRTY_LIMIT_STALL_TARGET_MS, between
 * KVM's minimum of 256 entries and 4096 (more only adds pages pending at switchover): 256 up to
 * ~8 MiB/s (a 94 ms stall at 8 MiB/s, 750 ms at QEMU's default 1 MiB/s: the ring cannot do
 * better), 4096 from ~160 MiB/s. Measured (README, bench migration): at 8 MiB/s a 4096-entry
 * ring stalled the guest 610-770 ms, a 256-entry one 90-141 ms.
 */
export function dirtyRingForLimit(bytesPerSecond: number): number {
  const pages = (bytesPerSecond * DIRTY_LIMIT_STALL_TARGET_MS) / 1000 / 4096;
  let entries = RING_MIN;
  while (entries * 2 <= RING_MAX && entries * 2 - RING_RESERVE <= pages) entries *= 2;
  return entries;
}

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
