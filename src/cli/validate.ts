// CLI validation that spans options or depends on the engine and the machine. The rules for one
// value on its own (its syntax and range: sizes are positive multiples of 4 KiB, counts are whole
// numbers in range, HOST:PORT) are the option parsers in options.ts, which commander runs while
// parsing. Everything here runs at the top of a command's action, before any VM, receiver or
// connection exists. A broken rule throws UsageError, whose message is one line that names the
// option and says what to change; main.ts prints it and exits 1.
import type { SoftEngineOptions } from '../soft/engine.ts';
import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import type { Backing, Engine, EngineCapabilities } from '../vmm/engine.ts';
import { openEngine, type EngineChoice } from '../vmm/factory.ts';
import { formatAmount, formatBytes } from './options.ts';
import type { WorkloadKind } from '../guest/workload.ts';

/** A command line this build refuses; the message is one line for the user. */
export class UsageError extends Error {
  override name = 'UsageError';
}

/** True when the user gave option `key` on the command line (not its default). */
function given(cmd: Command | undefined, key: string): boolean {
  return cmd?.getOptionValueSource(key) === 'cli';
}

/**
 * `migrate`: exactly one destination, `--to HOST:PORT` or `--local`; the options that only
 * shape the receiver `--local` spawns are refused with `--to` (they would be silently ignored).
 */
export function checkMigrateOptions(opts: { local: boolean; to?: unknown; dirtyRing?: number; converge?: string }, cmd?: Command): void {
  if (opts.local && opts.to) throw new UsageError('--local and --to exclude each other: give --to HOST:PORT to migrate to a running `stage2 receive`, or --local to spawn one here');
  if (!opts.local && !opts.to) throw new UsageError('migrate needs a destination: give --to HOST:PORT (a `stage2 receive` listening there) or --local');
  if (opts.to) {
    for (const [key, flag] of [['destRunMs', '--dest-run-ms'], ['destPrealloc', '--dest-prealloc/--no-dest-prealloc']] as const) {
      if (given(cmd, key)) throw new UsageError(`${flag} shapes the receiver that --local spawns: with --to, give it to \`stage2 receive\` there instead (--run-ms, --prealloc)`);
    }
  }
  if (opts.dirtyRing !== undefined && opts.converge !== 'dirty-limit') throw new UsageError('--dirty-ring sizes the dirty rings --converge dirty-limit logs to: give --converge dirty-limit too, or leave --dirty-ring out');
}

/** `bench scaling`: the vCPU counts to run. `-v N` alone runs [N]; with --vcpu-counts it is refused. */
export function scalingVcpuCounts(opts: { vcpus: number; vcpuCounts?: number[] }, cmd?: Command, command = 'bench scaling', byDefault: number[] = [1, 2, 4, 8]): number[] {
  if (opts.vcpuCounts && given(cmd, 'vcpus')) throw new UsageError(`-v/--vcpus and --vcpu-counts exclude each other in ${command}: give the list with --vcpu-counts, e.g. --vcpu-counts 1,2,4`);
  if (opts.vcpuCounts) return opts.vcpuCounts;
  return given(cmd, 'vcpus') ? [opts.vcpus] : byDefault;
}

/**
 * `bench demand-paging`: the engine must page on demand by the fault path asked for (its
 * capabilities' demandPagingPaths), the soft model pages 4 KiB pages (no hugetlb), and every
 * vCPU touches each page of its slice once (the sequential workload, as demand_paging_test).
 */
export function checkDemandPagingOptions(caps: EngineCapabilities, opts: { mode: string; backing: Backing; workload: string }, cmd?: Command): void {
  const paths = caps.demandPagingPaths ?? [];
  if (!paths.includes(opts.mode as never)) {
    throw new UsageError(`--mode ${opts.mode}: the ${caps.kind} engine ${paths.length ? `pages on demand only by ${paths.join(' or ')} here; use --mode ${paths[0]}` : 'cannot page guest memory on demand in this build; use --engine soft'}`);
  }
  if (caps.kind === 'soft' && opts.backing === 'hugetlb') throw new UsageError('-s hugetlb: the soft userfaultfd model pages 4 KiB pages; use -s anonymous or anonymous_thp');
  if (given(cmd, 'workload') && opts.workload !== 'sequential') throw new UsageError(`--workload ${opts.workload}: bench demand-paging touches every page of each vCPU's slice once (sequential), like demand_paging_test; leave --workload out`);
}

/** What this machine can give a new guest, from /proc/meminfo and sysfs. */
export interface MachineMemory {
  memAvailableBytes: number;
  swapFreeBytes: number;
  /** Free 2 MiB hugetlb pages (what the kvm engine's MAP_HUGE_2MB draws on). */
  hugePages2MFree: number;
}

export function parseMeminfo(text: string): MachineMemory {
  const kib = (field: string): number => {
    const m = new RegExp(`^${field}:\\s+(\\d+)`, 'm').exec(text);
    return m ? Number(m[1]) * 1024 : 0;
  };
  const hugePageBytes = kib('Hugepagesize');
  const m = /^HugePages_Free:\s+(\d+)/m.exec(text);
  return {
    memAvailableBytes: kib('MemAvailable'),
    swapFreeBytes: kib('SwapFree'),
    hugePages2MFree: m && hugePageBytes === 2 ** 21 ? Number(m[1]) : 0,
  };
}

/** Ordinary memory a new guest can have: MemAvailable plus free swap (every page gets touched). */
export function machineRamAvailable(m: MachineMemory): number {
  return m.memAvailableBytes + m.swapFreeBytes;
}

export function readMachineMemory(): MachineMemory {
  const mem = parseMeminfo(readFileSync('/proc/meminfo', 'utf8'));
  try {
    // The 2 MiB pool itself, whatever the default huge page size is.
    mem.hugePages2MFree = Number(readFileSync('/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages', 'utf8').trim()) || 0;
  } catch {
    /* no 2 MiB pool in sysfs: keep /proc/meminfo's figure */
  }
  return mem;
}

/** The guest memory a command is about to create. */
export interface GuestDemand {
  /** The vCPU counts it runs (one VM at a time: the largest is what must fit). */
  vcpuCounts: readonly number[];
  /** How the user gave them, for the message: '-v/--vcpus' or '--vcpu-counts'. */
  vcpusFlag: string;
  bytesPerVcpu: number;
  backing: Backing;
  /** 2 when the source and a --local receiver both hold the guest's RAM on this machine. */
  copies: 1 | 2;
}

const HUGE_PAGE_BYTES = 2 ** 21;

/**
 * Refuse a guest the engine or the machine cannot provide. Only guest RAM is counted (the soft
 * engine's page tables and frame metadata add well under 1% more; a few MiB per vCPU thread).
 *
 * Memory available: MemAvailable plus free swap. Every workload touches every page of guest RAM
 * (and the receiver preallocates or receives all of it), so the whole amount must exist; the
 * kernel can give it out of RAM and, beyond that, by swapping, which is slow but works. Past
 * RAM + swap nothing can: Linux's heuristic overcommit refuses the mapping, or the OOM killer
 * ends the process midway (the "spawn ENOMEM" a tester saw for 2 x 64 GiB). hugetlb on the kvm
 * engine draws on the reserved 2 MiB pool instead, which MemAvailable does not include; the soft
 * engine models hugetlb in ordinary memory.
 */
export function checkGuestFits(caps: EngineCapabilities, d: GuestDemand, machine: MachineMemory): void {
  const vcpus = Math.max(...d.vcpuCounts);
  if (caps.maxVcpus > 0 && vcpus > caps.maxVcpus) throw new UsageError(`${d.vcpusFlag} ${vcpus}: the ${caps.kind} engine runs at most ${caps.maxVcpus} vCPUs; use ${caps.maxVcpus} or fewer`);
  const guestBytes = vcpus * d.bytesPerVcpu;
  const asked = `${formatAmount(guestBytes * d.copies)} (${d.copies === 2 ? '2 x ' : ''}${vcpus} vCPUs x -b ${formatBytes(d.bytesPerVcpu)}${d.copies === 2 ? ': the source and the --local receiver both run here' : ''})`;
  if (caps.kind === 'kvm' && d.backing === 'hugetlb') {
    if (guestBytes % HUGE_PAGE_BYTES !== 0) {
      throw new UsageError(`-s hugetlb on the kvm engine maps 2 MiB pages: guest RAM (${vcpus} vCPUs x -b ${formatBytes(d.bytesPerVcpu)}) must be a multiple of 2M; use -b ${formatBytes(Math.ceil(d.bytesPerVcpu / HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES)}`);
    }
    const pages = (guestBytes / HUGE_PAGE_BYTES) * d.copies;
    if (pages > machine.hugePages2MFree) {
      throw new UsageError(`-s hugetlb: guest RAM ${asked} needs ${pages} free 2 MiB huge pages, this machine has ${machine.hugePages2MFree}; reserve more (echo N > /proc/sys/vm/nr_hugepages), lower -v or -b, or use -s anonymous`);
    }
    return;
  }
  const available = machineRamAvailable(machine);
  if (guestBytes * d.copies > available) {
    const swap = machine.swapFreeBytes > 0 ? ` (MemAvailable ${formatAmount(machine.memAvailableBytes)} + free swap ${formatAmount(machine.swapFreeBytes)})` : ' (MemAvailable; no free swap)';
    throw new UsageError(`guest RAM ${asked} is more than this machine can provide: ${formatAmount(available)} available${swap}; lower -v or -b`);
  }
}

/**
 * The engine a workload can run on: the dirty-rate and trace guests pace themselves by a clock
 * only the soft engine's guest has, so they pick soft unless the user named kvm, which is refused.
 */
export function engineForWorkload(opts: { engine: EngineChoice; workload: WorkloadKind; trace?: readonly unknown[] }): EngineChoice {
  if (opts.workload === 'trace' && opts.trace === undefined) throw new UsageError('--workload trace needs --trace FILE[,FILE...] (e.g. test/data/traces/gzip.s2trace)');
  if (opts.workload !== 'trace' && opts.trace !== undefined) throw new UsageError(`--trace is for --workload trace, not ${opts.workload}`);
  if (opts.workload !== 'dirty-rate' && opts.workload !== 'trace') return opts.engine;
  if (opts.engine === 'kvm') throw new UsageError(`--workload ${opts.workload} runs on the soft engine only (the kvm guest has no clock to pace itself by); use --engine soft`);
  return 'soft';
}

/**
 * Open the engine the user chose and check the guest fits it and this machine, before any VM
 * exists. The fallback note ("kvm unavailable; using soft") is reported only once the checks
 * pass, so a refused command line prints its one error line and nothing else.
 */
export async function openCheckedEngine(choice: EngineChoice, demand: GuestDemand, onFallback: (why: string) => void, soft?: SoftEngineOptions): Promise<Engine> {
  let fallback: string | undefined;
  const engine = await openEngine(choice, (why) => (fallback = why), soft);
  checkGuestFits(engine.capabilities(), demand, readMachineMemory());
  if (fallback !== undefined) onFallback(fallback);
  return engine;
}
