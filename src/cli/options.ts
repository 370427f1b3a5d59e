// Parsing of the options every stage2 command shares (DESIGN.md "CLI").
import { HUGE_RECOVERY_STRATEGIES, type HugeRecoveryStrategy } from '../soft/huge/recovery.ts';
import { InvalidArgumentError, type Command } from 'commander';
import { MMU_LOCK_MODES, type Backing, type GuestPageSize, type MmuLockMode } from '../vmm/engine.ts';
import type { EngineChoice } from '../vmm/factory.ts';
import type { WorkloadVmParams } from '../vmm/workload-vm.ts';
import { DIRTY_RING_MAX_ENTRIES, dirtyRingSizeProblem } from '../vmm/dirty-ring.ts';
import { DIRTY_PATTERNS, TRACE_RATE_RECORDED, WORKLOAD_KINDS, type DirtyPattern, type WorkloadKind, type WorkloadSpec } from '../guest/workload.ts';
import { traceRef, TraceFileError, type TraceRef } from '../guest/trace-replay.ts';
import { FAULT_PATHS, UFFD_MODES, type FaultPath, type UffdMode } from '../vmm/demand-paging.ts';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** The page size every size that backs guest memory must be a multiple of. */
export const PAGE_BYTES = 4096;

// Every parser below checks one option's value on its own: its syntax and its range. Commander
// calls it while parsing, so a bad value is refused before anything starts, and main.ts prints
// the message after the option's name: each message says what the value must be. Rules that span
// options, or depend on the engine or the machine, are in validate.ts.

/** "512M", "1G", "64k", "4096" -> bytes (any whole number of bytes, 0 included). */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?$/.exec(text.trim());
  if (!m) throw new InvalidArgumentError(`not a size: use bytes or a number with K, M, G or T, e.g. 4096, 64K, 512M, 1G`);
  const bytes = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(bytes)) {
    throw new InvalidArgumentError(Number.isInteger(bytes) ? `too large: at most ${formatBytes(Number.MAX_SAFE_INTEGER)}` : `not a whole number of bytes`);
  }
  return bytes;
}

/** A size that backs guest memory: positive and a multiple of 4 KiB (-b, --max-ram). */
export function parseMemorySize(text: string): number {
  const bytes = parseSize(text);
  if (bytes <= 0) throw new InvalidArgumentError(`must be a positive multiple of 4 KiB, e.g. 4K, 512M, 1G`);
  if (bytes % PAGE_BYTES !== 0) {
    const down = Math.floor(bytes / PAGE_BYTES) * PAGE_BYTES;
    const up = down + PAGE_BYTES;
    throw new InvalidArgumentError(`must be a multiple of 4 KiB (4096 bytes): use ${down > 0 ? `${formatBytes(down)} or ` : ''}${formatBytes(up)}`);
  }
  return bytes;
}

/** --recover sync|async|in-place (huge/recovery.ts). */
export function parseRecover(text: string): HugeRecoveryStrategy {
  if (!(HUGE_RECOVERY_STRATEGIES as readonly string[]).includes(text)) throw new InvalidArgumentError(`must be one of ${HUGE_RECOVERY_STRATEGIES.join(', ')}`);
  return text as HugeRecoveryStrategy;
}

/** --eager-split [CHUNK]: a power of two from 2M to 1G (a block size; KVM_CAP_ARM_EAGER_SPLIT_CHUNK_SIZE). */
export function parseEagerSplitChunk(text: string): number {
  const bytes = parseSize(text);
  if (bytes < 2 ** 21 || bytes > 2 ** 30 || (bytes & (bytes - 1)) !== 0) throw new InvalidArgumentError(`must be a power of two from 2M to 1G (a block size), e.g. 2M`);
  return bytes;
}

/** 1536 -> "1536", 65536 -> "64K", 3 * 2 ** 30 -> "3G": the largest unit that divides it. */
export function formatBytes(bytes: number): string {
  for (const u of ['T', 'G', 'M', 'K'] as const) {
    if (bytes >= UNITS[u]! && bytes % UNITS[u]! === 0) return `${bytes / UNITS[u]!}${u}`;
  }
  return String(bytes);
}

/** 25165824 -> "24.0 MiB": an amount for a person to read (not to type back). */
export function formatAmount(bytes: number): string {
  if (bytes < 2 ** 10) return `${bytes} bytes`;
  const [unit, div] = bytes >= 2 ** 40 ? ['TiB', 2 ** 40] : bytes >= 2 ** 30 ? ['GiB', 2 ** 30] : bytes >= 2 ** 20 ? ['MiB', 2 ** 20] : ['KiB', 2 ** 10];
  return `${(bytes / div).toFixed(1)} ${unit}`;
}

/** A whole number in decimal digits, nothing else ("1e3", "0x10", "" and "-1" are not). */
function wholeNumber(text: string, rule: string): number {
  const t = text.trim();
  const n = /^\d+$/.test(t) ? Number(t) : NaN;
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(rule);
  return n;
}

/** A parser for a whole number in [min, max]; `rule` overrides the message ("must be ..."). */
export function parseIntInRange(min: number, max: number = Number.MAX_SAFE_INTEGER, rule?: string): (text: string) => number {
  const why = rule ?? (max === Number.MAX_SAFE_INTEGER ? `must be a whole number, at least ${min}` : `must be a whole number from ${min} to ${max}`);
  return (text) => {
    const n = wholeNumber(text, why);
    if (n < min || n > max) throw new InvalidArgumentError(why);
    return n;
  };
}

export const parsePositiveInt = parseIntInRange(1);

/** Milliseconds and other counts where 0 means something (0, 1, 2, ...). */
export const parseNonNegativeInt = parseIntInRange(0);

/** A non-negative finite decimal number ("0", "2.5"; not "abc", "-1", "1e3", "Infinity"). */
export function parseNonNegativeNumber(text: string): number {
  const t = text.trim();
  const n = /^\d+(?:\.\d+)?$/.test(t) ? Number(t) : NaN;
  if (!Number.isFinite(n)) throw new InvalidArgumentError(`must be a number, 0 or more (e.g. 300 or 2.5)`);
  return n;
}

/** Dirty-ring entries per vCPU: a power of two KVM accepts (256 .. 65536). */
export function parseDirtyRingEntries(text: string): number {
  const n = wholeNumber(text, 'must be a power of two from 256 to 65536 (entries per vCPU)');
  const problem = dirtyRingSizeProblem(n, DIRTY_RING_MAX_ENTRIES);
  if (problem !== null) throw new InvalidArgumentError(`must be a power of two from 256 to 65536 (entries per vCPU), got ${n}`);
  return n;
}

/** "1,2,4" -> [1, 2, 4]: a non-empty list of positive whole numbers. */
export function parseIntList(text: string): number[] {
  const items = text.split(',').map((t) => t.trim());
  if (items.some((t) => !/^\d+$/.test(t) || Number(t) < 1 || !Number.isSafeInteger(Number(t)))) {
    throw new InvalidArgumentError(`must be a comma-separated list of positive whole numbers, e.g. 1,2,4,8`);
  }
  return items.map(Number);
}

export interface HostPort {
  host: string;
  port: number;
}

function hostPort(text: string, minPort: number): HostPort {
  const m = /^(.*):(\d+)$/.exec(text.trim());
  const port = m ? Number(m[2]) : NaN;
  const host = m ? m[1]!.replace(/^\[(.*)\]$/, '$1') : '';
  if (!m || !host || !(port >= minPort && port <= 65535)) {
    throw new InvalidArgumentError(`must be HOST:PORT with a port from ${minPort} to 65535, e.g. 127.0.0.1:4444${minPort === 0 ? ' (port 0: the kernel picks one)' : ''}`);
  }
  return { host, port };
}

/** Where to listen (`receive --listen`): port 0 lets the kernel pick a free port. */
export function parseListenAddress(text: string): HostPort {
  return hostPort(text, 0);
}

/** A peer to connect to (`migrate --to`): a real port, 1..65535. */
export function parsePeerAddress(text: string): HostPort {
  return hostPort(text, 1);
}

function oneOf<T extends string>(allowed: readonly T[]) {
  return (text: string): T => {
    if (!(allowed as readonly string[]).includes(text)) {
      throw new InvalidArgumentError(`must be one of ${allowed.join(', ')}`);
    }
    return text as T;
  };
}

export const parseEngine = oneOf<EngineChoice>(['soft', 'kvm', 'default']);
export const parseBacking = oneOf<Backing>(['anonymous', 'anonymous_thp', 'hugetlb']);
export const parseLock = oneOf<MmuLockMode>(MMU_LOCK_MODES);
export const parseWorkload = oneOf<WorkloadKind>(WORKLOAD_KINDS);
export const parsePattern = oneOf<DirtyPattern>(DIRTY_PATTERNS);

/** demand_paging_test's -u: MISSING | MINOR (any case) -> 'missing' | 'minor'. */
export function parseUffdMode(text: string): UffdMode {
  const t = text.trim().toLowerCase();
  if (!(UFFD_MODES as readonly string[]).includes(t)) throw new InvalidArgumentError(`must be MISSING or MINOR`);
  return t as UffdMode;
}

export const parseFaultPath = oneOf<FaultPath>(FAULT_PATHS);

export function parseGuestPageSize(text: string): GuestPageSize {
  const bytes = parseSize(text);
  if (bytes !== 4096 && bytes !== 2097152) throw new InvalidArgumentError(`must be 4K or 2M`);
  return bytes;
}

/** --trace: comma-separated trace files, each opened and checked now (guest/trace-replay.ts). */
export function parseTraceFiles(text: string): TraceRef[] {
  const files = text.split(',').map((f) => f.trim());
  if (files.some((f) => f === '')) throw new InvalidArgumentError('must be FILE[,FILE...] with no empty name');
  return files.map((f) => {
    try {
      return traceRef(f);
    } catch (e) {
      if (e instanceof TraceFileError) throw new InvalidArgumentError(e.message);
      throw e;
    }
  });
}

/** --trace-rate: epochs per second per vCPU, `recorded` (real time, the default) or `max` (unpaced). */
export function parseTraceRate(text: string): number {
  const t = text.trim();
  if (t === 'recorded') return TRACE_RATE_RECORDED;
  if (t === 'max') return 0;
  const n = /^\d+(?:\.\d+)?$/.test(t) ? Number(t) : NaN;
  if (!Number.isFinite(n) || n <= 0) throw new InvalidArgumentError('must be epochs per second above 0, recorded or max');
  return n;
}

export interface CommonOptions {
  engine: EngineChoice;
  vcpus: number;
  bytesPerVcpu: number;
  backing: Backing;
  iterations: number;
  workload: WorkloadKind;
  seed: number;
  writePercent: number;
  /** dirty-rate: bytes per second the whole guest dirties (split evenly over the vCPUs). */
  dirtyRate?: number;
  /** dirty-rate: bytes of guest RAM written (split evenly over the vCPUs); default: all of it. */
  workingSet?: number;
  pattern: DirtyPattern;
  /** trace: the traces replayed (vCPU v replays trace v % n). */
  trace?: TraceRef[];
  traceRate: number;
  traceShift: number;
  lock: MmuLockMode;
  guestPageSize: GuestPageSize;
  json: boolean;
}

/**
 * Add the options DESIGN.md lists as common to every command. `-i/--iterations` only where the
 * command has iterations (the benchmarks): give `defaults.iterations` there.
 */
export function addCommonOptions(cmd: Command, defaults: { bytesPerVcpu: string; vcpus: number; iterations?: number }): Command {
  if (defaults.iterations !== undefined) cmd.option('-i, --iterations <n>', 'dirty-logging iterations', parsePositiveInt, defaults.iterations);
  return cmd
    .option('--engine <engine>', 'soft | kvm (default: kvm when /dev/kvm works, else soft)', parseEngine, 'default')
    .option('-v, --vcpus <n>', 'number of vCPUs', parsePositiveInt, defaults.vcpus)
    .option('-b, --bytes-per-vcpu <size>', 'guest memory per vCPU, a multiple of 4 KiB (accepts 512M, 1G)', parseMemorySize, parseMemorySize(defaults.bytesPerVcpu))
    .option('-s, --backing <backing>', 'anonymous | anonymous_thp | hugetlb', parseBacking, 'anonymous')
    .option('--workload <kind>', WORKLOAD_KINDS.join(' | '), parseWorkload, 'sequential')
    .option('--seed <n>', 'seed of the random and rwmix generators', parseIntInRange(0, 0xffff_ffff), 1)
    .option('--write-percent <n>', 'rwmix: percentage of accesses that write', parseIntInRange(0, 100), 50)
    .option('--dirty-rate <size>', 'dirty-rate: bytes per second the guest dirties, all vCPUs together (e.g. 200M)', parseMemorySize)
    .option('--working-set <size>', 'dirty-rate: bytes of guest RAM it writes, all vCPUs together (default: all; the rest stays zero)', parseMemorySize)
    .option('--pattern <order>', 'dirty-rate: sequential | random', parsePattern, 'sequential' as DirtyPattern)
    .option('--trace <files>', 'trace: FILE[,FILE...] page write traces to replay (vCPU v replays file v % n)', parseTraceFiles)
    .option('--trace-rate <rate>', 'trace: epochs per second per vCPU, recorded (real time) or max', parseTraceRate, TRACE_RATE_RECORDED)
    .option('--trace-shift <epochs>', 'trace: epochs between the starting points of consecutive vCPUs', parseIntInRange(0, 2 ** 32), 0)
    .option('--lock <mode>', `soft engine MMU lock: ${MMU_LOCK_MODES.join(' | ')}`, parseLock, 'parallel')
    .option('--guest-page-size <size>', 'kvm guest page size: 4K | 2M', parseGuestPageSize, 2097152 as GuestPageSize)
    .option('--json', 'print one JSON object on stdout and nothing else there', false);
}

/** Human output: stderr when --json owns stdout, else stdout. */
export function humanOut(json: boolean): (line: string) => void {
  return json ? (line) => process.stderr.write(line + '\n') : (line) => process.stdout.write(line + '\n');
}

/**
 * The workload's per-vCPU knobs from the command line: --dirty-rate and --working-set are for
 * the whole guest (what a user measures and asks for), split evenly over `vcpus` (the working
 * set in whole pages; at least one page per vCPU).
 */
export function workloadOptions(opts: CommonOptions, vcpus: number): Partial<WorkloadSpec> {
  const out: Partial<WorkloadSpec> = { seed: opts.seed, writePercent: opts.writePercent, pattern: opts.pattern, traceRate: opts.traceRate, traceShift: opts.traceShift };
  if (opts.trace !== undefined) out.traces = opts.trace;
  if (opts.dirtyRate !== undefined) out.dirtyRate = opts.dirtyRate / vcpus;
  if (opts.workingSet !== undefined) out.workingSetBytes = Math.max(PAGE_BYTES, Math.floor(opts.workingSet / vcpus / PAGE_BYTES) * PAGE_BYTES);
  return out;
}

/** The workload VM the common options describe (vmm/workload-vm.ts), as every command builds it. */
export function workloadVmParams(opts: CommonOptions): WorkloadVmParams {
  return {
    vcpus: opts.vcpus,
    bytesPerVcpu: opts.bytesPerVcpu,
    backing: opts.backing,
    workload: opts.workload,
    workloadOptions: workloadOptions(opts, opts.vcpus),
    lock: opts.lock,
    guestPageSize: opts.guestPageSize,
  };
}
