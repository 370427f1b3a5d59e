// Parsing of the options every stage2 command shares (DESIGN.md "CLI").
import { InvalidArgumentError, type Command } from 'commander';
import { MMU_LOCK_MODES, type Backing, type GuestPageSize, type MmuLockMode } from '../vmm/engine.ts';
import type { EngineChoice } from '../vmm/factory.ts';
import { WORKLOAD_KINDS, type WorkloadKind } from '../guest/workload.ts';

const UNITS: Record<string, number> = { '': 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

/** "512M", "1G", "64k", "4096" -> bytes. */
export function parseSize(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kKmMgGtT]?)(?:i?[bB])?$/.exec(text.trim());
  if (!m) throw new InvalidArgumentError(`not a size: "${text}" (use e.g. 4096, 64K, 512M, 1G)`);
  const bytes = Number(m[1]) * UNITS[m[2]!.toUpperCase()]!;
  if (!Number.isSafeInteger(bytes)) throw new InvalidArgumentError(`size out of range: "${text}"`);
  return bytes;
}

export function parsePositiveInt(text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1) throw new InvalidArgumentError(`not a positive integer: "${text}"`);
  return n;
}

export function parseIntList(text: string): number[] {
  return text.split(',').map((t) => parsePositiveInt(t.trim()));
}

function oneOf<T extends string>(allowed: readonly T[], what: string) {
  return (text: string): T => {
    if (!(allowed as readonly string[]).includes(text)) {
      throw new InvalidArgumentError(`${what} must be one of ${allowed.join(', ')} (got "${text}")`);
    }
    return text as T;
  };
}

export const parseEngine = oneOf<EngineChoice>(['soft', 'kvm', 'default'], '--engine');
export const parseBacking = oneOf<Backing>(['anonymous', 'anonymous_thp', 'hugetlb'], '--backing');
export const parseLock = oneOf<MmuLockMode>(MMU_LOCK_MODES, '--lock');
export const parseWorkload = oneOf<WorkloadKind>(WORKLOAD_KINDS, '--workload');

export function parseGuestPageSize(text: string): GuestPageSize {
  const bytes = parseSize(text);
  if (bytes !== 4096 && bytes !== 2097152) throw new InvalidArgumentError(`--guest-page-size must be 4K or 2M (got "${text}")`);
  return bytes;
}

export interface CommonOptions {
  engine: EngineChoice;
  vcpus: number;
  bytesPerVcpu: number;
  backing: Backing;
  iterations: number;
  workload: WorkloadKind;
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
    .option('-b, --bytes-per-vcpu <size>', 'guest memory per vCPU (accepts 512M, 1G)', parseSize, parseSize(defaults.bytesPerVcpu))
    .option('-s, --backing <backing>', 'anonymous | anonymous_thp | hugetlb', parseBacking, 'anonymous')
    .option('--workload <kind>', 'sequential | random | idle | rwmix', parseWorkload, 'sequential')
    .option('--lock <mode>', `soft engine MMU lock: ${MMU_LOCK_MODES.join(' | ')}`, parseLock, 'parallel')
    .option('--guest-page-size <size>', 'kvm guest page size: 4K | 2M', parseGuestPageSize, 2097152 as GuestPageSize)
    .option('--json', 'print one JSON object on stdout and nothing else there', false);
}

/** Human output: stderr when --json owns stdout, else stdout. */
export function humanOut(json: boolean): (line: string) => void {
  return json ? (line) => process.stderr.write(line + '\n') : (line) => process.stdout.write(line + '\n');
}
