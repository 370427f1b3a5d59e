// The soft engine's vCPU threads on the VMM side: what a worker attaches to, its initial
// registers, and reading / writing the registers of a stopped vCPU. Run control itself (the
// allowance, pause / resume / stop, waiting, posted exits, failures) is the shared
// vmm/run/run-control.ts; this file only tells it how to start a soft vCPU thread.
//
// Runs on the VMM thread only. It writes the R_* registers of stopped vCPUs (control.ts rules)
// and, once, the initial registers before any thread starts.
import type { MessagePort } from 'node:worker_threads';
import { MessageChannel } from 'node:worker_threads';
import type { WorkloadSpec } from '../../guest/workload.ts';
import { initialRngState } from '../../guest/workload.ts';
import { startWorker } from '../../util/worker.ts';
import type { VcpuState } from '../../vmm/engine.ts';
import { VcpuRunControl } from '../../vmm/run/run-control.ts';
import type { HostMemoryShared } from '../hostmem/host-memory.ts';
import type { HostAddressSpaceShared } from '../hostmm/host-address-space.ts';
import type { MmuLockShared } from '../locking/mmu-lock.ts';
import type { Stage2Shared } from '../pgtable/stage2.ts';
import type { SlotGeneration, SlotPublisher } from '../mmu/slot-table.ts';
import { R_HALTED, R_PASS, R_POS, R_RNG_HI, R_RNG_LO, R_VALID, V_HALTED, V_PASSES, vcpuBase } from './control.ts';

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
  /** The VM's dirty rings (dirty/dirty-ring.ts), or null when it logs to bitmaps. */
  dirtyRings: { sab: SharedArrayBuffer; lines: number; entries: number } | null;
  slots: SlotGeneration;
  port: MessagePort;
  /** Demand paging's attach messages (soft/uffd/vcpu-entry.ts). */
  uffdPort: MessagePort;
  /** The guest's progress clock (vmm/run/progress-clock.ts): this vCPU stamps its own ring. */
  progressClock: SharedArrayBuffer;
}

export type SharedVmParts = Omit<VcpuWorkerData, 'vcpu' | 'vcpus' | 'spec' | 'slots' | 'port' | 'uffdPort' | 'progressClock'>;

/** Demand paging's hooks into run control (soft/uffd/pager.ts). */
export interface SoftVcpuHooks {
  /** After pause / stop raised their word: wake vCPUs asleep on a missing page. */
  kick(): void;
  /** vCPU v's end of its demand-paging port. */
  uffdPorts: MessagePort[];
}

/** Soft engine registers of one vCPU (VcpuState.arch). */
export interface SoftVcpuArch {
  passes: number;
  pos: number;
  rngHi: number;
  rngLo: number;
  halted: boolean;
}

/** Start the soft vCPU threads of a VM under the shared run control. */
export async function startSoftVcpus(ctl: Int32Array, count: number, spec: WorkloadSpec, parts: SharedVmParts, publisher: SlotPublisher, hooks: SoftVcpuHooks): Promise<VcpuRunControl> {
  for (let v = 0; v < count; v++) {
    // Initial registers: pass 0, position 0, the spec's generator state.
    const rng = initialRngState(spec, v);
    writeSoftArch(ctl, v, { passes: 0, pos: 0, rngHi: rng.hi, rngLo: rng.lo, halted: false });
  }
  const rc = new VcpuRunControl(ctl, count, {
    startThread(v) {
      const { port1, port2 } = new MessageChannel();
      publisher.addPort(port1);
      const uffd = new MessageChannel();
      hooks.uffdPorts[v] = uffd.port1;
      const data: VcpuWorkerData = { ...parts, vcpu: v, vcpus: count, spec, slots: publisher.current, port: port2, uffdPort: uffd.port2, progressClock: rc.clock.sab };
      return startWorker(new URL('./worker.ts', import.meta.url), data as unknown as Record<string, unknown>, { transferList: [port2, uffd.port2] });
    },
    kick: () => hooks.kick(),
  });
  await rc.start();
  return rc;
}

export function readSoftArch(c: Int32Array, v: number): SoftVcpuArch {
  const b = vcpuBase(v);
  return {
    passes: Atomics.load(c, b + R_PASS),
    pos: Atomics.load(c, b + R_POS),
    rngHi: Atomics.load(c, b + R_RNG_HI) >>> 0,
    rngLo: Atomics.load(c, b + R_RNG_LO) >>> 0,
    halted: Atomics.load(c, b + R_HALTED) !== 0,
  };
}

/** Write registers of a stopped vCPU; it reloads them when it next wakes. */
export function writeSoftArch(c: Int32Array, v: number, a: SoftVcpuArch): void {
  const b = vcpuBase(v);
  Atomics.store(c, b + R_PASS, a.passes);
  Atomics.store(c, b + R_POS, a.pos);
  Atomics.store(c, b + R_RNG_HI, a.rngHi | 0);
  Atomics.store(c, b + R_RNG_LO, a.rngLo | 0);
  Atomics.store(c, b + R_HALTED, a.halted ? 1 : 0);
  Atomics.store(c, b + R_VALID, 1);
  Atomics.store(c, b + V_PASSES, a.passes);
  Atomics.store(c, b + V_HALTED, a.halted ? 1 : 0);
}

export function saveSoftState(c: Int32Array, v: number): VcpuState {
  const arch = readSoftArch(c, v);
  return { engine: 'soft', vcpu: v, progress: { vcpu: v, passesCompleted: arch.passes, halted: arch.halted }, arch };
}
