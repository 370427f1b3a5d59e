// The CONFIG record: everything the destination needs to build an empty copy of the source VM
// before any page arrives (QEMU sends the machine type and the RAM block list in its setup
// phase). Building the source-side description and checking it on the destination both live
// here, so the two cannot drift.
import type { Backing, Engine, EngineKind, MemslotInfo, Vm, VmConfig } from '../vmm/engine.ts';
import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE } from '../vmm/engine.ts';
import { vcpuTrace, type WorkloadSpec } from '../guest/workload.ts';
import { TraceFileError } from '../guest/trace-replay.ts';

export const CONFIG_VERSION = 1;

export interface MigrationSlot {
  slot: number;
  /** Flags without KVM_MEM_LOG_DIRTY_PAGES (logging is the source's business). */
  flags: number;
  guestPhysAddr: number;
  memorySize: number;
  /** memorySize / 4096 (the stream format's layout check reads it). */
  pages: number;
  internal: boolean;
  backing: Backing;
}

export interface MigrationConfig {
  version: number;
  engine: EngineKind;
  vmConfig: Required<VmConfig>;
  vcpus: number;
  workload: WorkloadSpec;
  memslots: MigrationSlot[];
  /** Sum of memorySize over memslots. */
  ramBytes: number;
}

/** The guest's RAM does not fit what the receiver can host. */
export class IncompatibleConfigError extends Error {
  constructor(message: string) {
    super(`cannot host this VM: ${message}`);
    this.name = 'IncompatibleConfigError';
  }
}

export function describeVm(vm: Vm, workload: WorkloadSpec, backing: Backing): MigrationConfig {
  const memslots = vm.memslots().map((s) => ({
    slot: s.slot,
    flags: s.flags & ~KVM_MEM_LOG_DIRTY_PAGES,
    guestPhysAddr: s.guestPhysAddr,
    memorySize: s.memorySize,
    pages: s.memorySize / PAGE_SIZE,
    internal: s.internal,
    backing: s.internal ? ('anonymous' as Backing) : backing,
  }));
  return {
    version: CONFIG_VERSION,
    engine: vm.engine,
    vmConfig: { ...vm.config },
    vcpus: vm.vcpuCount,
    workload,
    memslots,
    ramBytes: memslots.reduce((a, s) => a + s.memorySize, 0),
  };
}

export interface HostLimits {
  /** Largest guest RAM this receiver accepts, bytes. */
  maxRamBytes: number;
  /** Memory this host can give a new guest right now (read when CONFIG arrives), bytes. */
  availableRamBytes?: () => number;
}

/**
 * Throw IncompatibleConfigError naming the first thing this engine/host cannot provide. `cfg`
 * has passed validateConfig (config-validate.ts): its shape and consistency are not rechecked.
 */
export function checkConfig(cfg: MigrationConfig, engine: Engine, limits: HostLimits): void {
  if (cfg.engine !== engine.kind) throw new IncompatibleConfigError(`the source runs the ${cfg.engine} engine, this receiver the ${engine.kind} engine (vCPU state is engine-specific)`);
  const caps = engine.capabilities();
  if (!Number.isSafeInteger(cfg.vcpus) || cfg.vcpus < 1 || cfg.vcpus > caps.maxVcpus) throw new IncompatibleConfigError(`${cfg.vcpus} vCPUs, this engine supports 1..${caps.maxVcpus}`);
  if (cfg.ramBytes > limits.maxRamBytes) throw new IncompatibleConfigError(`${cfg.ramBytes} bytes of guest RAM, this receiver accepts at most ${limits.maxRamBytes} (--max-ram)`);
  const available = limits.availableRamBytes?.();
  if (available !== undefined && cfg.ramBytes > available) throw new IncompatibleConfigError(`${cfg.ramBytes} bytes of guest RAM, this host has ${available} available (MemAvailable + free swap)`);
  if (cfg.vmConfig.manualDirtyLogProtect && !caps.manualDirtyLogProtect) throw new IncompatibleConfigError('the source uses manual dirty-log protect, this engine lacks it');
  if (cfg.vmConfig.dirtyRingEntries > caps.dirtyRingMaxEntries) throw new IncompatibleConfigError(`the source uses a dirty ring of ${cfg.vmConfig.dirtyRingEntries} entries, this engine offers at most ${caps.dirtyRingMaxEntries}`);
  if (cfg.workload.kind === 'trace') checkTraces(cfg.workload);
  for (const s of cfg.memslots) {
    if (!s.internal && !caps.backings.includes(s.backing)) throw new IncompatibleConfigError(`memslot ${s.slot} needs ${s.backing} backing, this host offers ${caps.backings.join(', ')}`);
  }
}

/** The trace workload replays files the source named: this host must have the same ones. */
function checkTraces(spec: WorkloadSpec): void {
  for (let i = 0; i < spec.traces.length; i++) {
    try {
      vcpuTrace(spec, i);
    } catch (e) {
      if (e instanceof TraceFileError) throw new IncompatibleConfigError(`the guest replays ${e.message}; copy the source's trace file to the same path here`);
      throw e;
    }
  }
}

/**
 * Build the destination VM: guest RAM memslots, then vCPUs (which create the engine-internal
 * slots), not running. The engine-internal slots must come out exactly as on the source.
 * `whileVcpusStart` runs on this thread while the engine starts the vCPU threads (kvm: hundreds
 * of ms mostly spent off this thread), with the guest RAM memslots in place; it may be async
 * (then awaited) and may throw (the VM is destroyed).
 */
export async function buildDestinationVm(cfg: MigrationConfig, engine: Engine, whileVcpusStart?: (vm: Vm) => void | Promise<void>): Promise<Vm> {
  const vm = await engine.createVm(cfg.vmConfig);
  try {
    for (const s of cfg.memslots.filter((m) => !m.internal)) {
      const host = vm.mapHostMemory(s.memorySize, s.backing);
      vm.setUserMemoryRegion({ slot: s.slot, flags: s.flags, guestPhysAddr: s.guestPhysAddr, memorySize: s.memorySize, userspaceAddr: host.hva });
    }
    const vcpus = vm.createVcpus(cfg.vcpus, cfg.workload);
    try {
      await whileVcpusStart?.(vm);
    } finally {
      await vcpus;
    }
    const have = new Map<number, MemslotInfo>(vm.memslots().map((s) => [s.slot, s]));
    for (const s of cfg.memslots) {
      const h = have.get(s.slot);
      if (!h || h.guestPhysAddr !== s.guestPhysAddr || h.memorySize !== s.memorySize) {
        throw new IncompatibleConfigError(`memslot ${s.slot} (gpa 0x${s.guestPhysAddr.toString(16)}, ${s.memorySize} bytes) does not exist here after createVcpus`);
      }
    }
    if (have.size !== cfg.memslots.length) throw new IncompatibleConfigError(`the destination has ${have.size} memslots, the source ${cfg.memslots.length}`);
    return vm;
  } catch (e) {
    await vm.destroy();
    throw e;
  }
}
