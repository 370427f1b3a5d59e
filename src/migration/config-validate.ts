// Field-by-field validation of a received CONFIG record (config.ts says what it means). The
// stream layer only guarantees a JSON object whose memslots have valid slot/pages; everything
// else arrives here as `unknown` and leaves as a MigrationConfig this build can host, or as a
// ConfigFieldError that names the field, the value and the rule. Nothing of the VM is built
// before this passes.
//
// Checked, in this order (the first broken rule is reported):
//   - shape: every field present with its type, no field this build does not know;
//   - ranges: what this build supports (engine kinds, lock modes, page sizes, workload kinds,
//     memslot flags and backings, vCPU count, page alignment);
//   - consistency: pages = memorySize / 4096, ramBytes = sum of memorySize, no two memslots
//     overlap or share an id, the workload's memory lies inside writable guest-RAM memslots.
// What the receiving host can provide (engine capabilities, --max-ram) is checkConfig's job
// (config.ts). Whether the CONFIG equals the one the source sent is END's job: END carries a
// digest of it (state-digest.ts).
//
// Concurrency: pure functions, main thread.
import { KVM_MEM_READONLY, PAGE_SIZE, type Backing, type EngineKind, type GuestPageSize, type MmuLockMode } from '../vmm/engine.ts';
import { DIRTY_PATTERNS, TRACE_RATE_RECORDED, WORKLOAD_KINDS, type WorkloadSpec } from '../guest/workload.ts';
import { CONFIG_VERSION, type MigrationConfig, type MigrationSlot } from './config.ts';
import { describeValue } from '../util/describe-value.ts';

/** A CONFIG field broke a rule; `field` is its path (e.g. `memslots[1].guestPhysAddr`). */
export class ConfigFieldError extends Error {
  constructor(
    readonly field: string,
    readonly rule: string,
  ) {
    super(`CONFIG.${field}: ${rule}`);
    this.name = 'ConfigFieldError';
  }
}

const ENGINES: readonly EngineKind[] = ['soft', 'kvm'];
const BACKINGS: readonly Backing[] = ['anonymous', 'anonymous_thp', 'hugetlb'];
const GUEST_PAGE_SIZES: readonly GuestPageSize[] = [4096, 2097152];
/** Flags a migrated memslot may carry (dirty logging is the source's business, never sent). */
const SLOT_FLAGS = KVM_MEM_READONLY;
/** Guest-physical addresses this build models: 52 bits, like x86-64's MAXPHYADDR limit. */
const MAX_GPA = 2 ** 52;
/** KVM's KVM_USER_MEM_SLOTS on x86 (32767) is far above anything a VMM sends; ids stay 16-bit. */
const MAX_SLOT_ID = 0xffff;
const MAX_MEMSLOTS = 512;
/** Above any engine's maxVcpus (checkConfig then holds it to the receiving engine's). */
const MAX_VCPUS = 4096;
const MAX_DIRTY_RING_ENTRIES = 1 << 16;

type Obj = Record<string, unknown>;


function object(v: unknown, field: string): Obj {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new ConfigFieldError(field, `must be an object, got ${describeValue(v)}`);
  return v as Obj;
}

/** Refuse fields this build does not know: a field it ignored could change what the guest sees. */
function onlyKeys(o: Obj, field: string, keys: readonly string[]): void {
  for (const k of Object.keys(o)) if (!keys.includes(k)) throw new ConfigFieldError(field ? `${field}.${k}` : k, `unknown field (this build knows ${keys.join(', ')})`);
  for (const k of keys) if (!(k in o)) throw new ConfigFieldError(field ? `${field}.${k}` : k, 'missing');
}

function int(v: unknown, field: string, min: number, max: number): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v)) throw new ConfigFieldError(field, `must be an integer, got ${describeValue(v)}`);
  if (v < min || v > max) throw new ConfigFieldError(field, `${v} is outside ${min}..${max}`);
  return v;
}

function pageMultiple(v: unknown, field: string, min: number, max: number): number {
  const n = int(v, field, min, max);
  if (n % PAGE_SIZE !== 0) throw new ConfigFieldError(field, `${n} is not a multiple of ${PAGE_SIZE}`);
  return n;
}

function bool(v: unknown, field: string): boolean {
  if (typeof v !== 'boolean') throw new ConfigFieldError(field, `must be true or false, got ${describeValue(v)}`);
  return v;
}

function oneOf<T>(v: unknown, field: string, allowed: readonly T[]): T {
  if (!allowed.includes(v as T)) throw new ConfigFieldError(field, `${describeValue(v)} is not one of ${allowed.join(', ')}`);
  return v as T;
}

const hex = (n: number) => `0x${n.toString(16)}`;

function validateSlot(v: unknown, i: number): MigrationSlot {
  const f = `memslots[${i}]`;
  const o = object(v, f);
  onlyKeys(o, f, ['slot', 'flags', 'guestPhysAddr', 'memorySize', 'pages', 'internal', 'backing']);
  const slot = int(o.slot, `${f}.slot`, 0, MAX_SLOT_ID);
  const flags = int(o.flags, `${f}.flags`, 0, 0xffff_ffff);
  if ((flags & ~SLOT_FLAGS) !== 0) throw new ConfigFieldError(`${f}.flags`, `${hex(flags)} has bits outside ${hex(SLOT_FLAGS)} (KVM_MEM_READONLY)`);
  const guestPhysAddr = pageMultiple(o.guestPhysAddr, `${f}.guestPhysAddr`, 0, MAX_GPA - PAGE_SIZE);
  const memorySize = pageMultiple(o.memorySize, `${f}.memorySize`, PAGE_SIZE, MAX_GPA);
  if (guestPhysAddr + memorySize > MAX_GPA) throw new ConfigFieldError(`${f}.memorySize`, `the slot ends at ${hex(guestPhysAddr + memorySize)}, beyond the ${hex(MAX_GPA)} guest-physical limit`);
  const pages = int(o.pages, `${f}.pages`, 1, MAX_GPA / PAGE_SIZE);
  if (pages !== memorySize / PAGE_SIZE) throw new ConfigFieldError(`${f}.pages`, `${pages} but memorySize ${memorySize} is ${memorySize / PAGE_SIZE} pages`);
  const internal = bool(o.internal, `${f}.internal`);
  const backing = oneOf(o.backing, `${f}.backing`, BACKINGS);
  return { slot, flags, guestPhysAddr, memorySize, pages, internal, backing };
}

/**
 * The trace workload's fields (guest/trace-replay.ts). Whether the files exist here with the
 * same digests is the receiving host's business (checkConfig).
 */
function validateTraceFields(w: Obj): Pick<WorkloadSpec, 'traces' | 'traceRate' | 'traceShift'> {
  if (!Array.isArray(w.traces)) throw new ConfigFieldError('workload.traces', `must be an array, got ${describeValue(w.traces)}`);
  if (w.traces.length > MAX_VCPUS) throw new ConfigFieldError('workload.traces', `${w.traces.length} traces, more than ${MAX_VCPUS}`);
  const traces = w.traces.map((t, i) => {
    const f = `workload.traces[${i}]`;
    const o = object(t, f);
    onlyKeys(o, f, ['path', 'digest']);
    if (typeof o.path !== 'string' || !o.path.startsWith('/')) throw new ConfigFieldError(`${f}.path`, `must be an absolute path, got ${describeValue(o.path)}`);
    if (typeof o.digest !== 'string' || !/^[0-9a-f]{64}$/.test(o.digest)) throw new ConfigFieldError(`${f}.digest`, `must be a sha256 in hex, got ${describeValue(o.digest)}`);
    return { path: o.path, digest: o.digest };
  });
  const traceRate = w.traceRate;
  if (typeof traceRate !== 'number' || !Number.isFinite(traceRate) || (traceRate < 0 && traceRate !== TRACE_RATE_RECORDED)) {
    throw new ConfigFieldError('workload.traceRate', `must be epochs per second >= 0 or ${TRACE_RATE_RECORDED} (recorded real time), got ${describeValue(traceRate)}`);
  }
  return { traces, traceRate, traceShift: int(w.traceShift, 'workload.traceShift', 0, 2 ** 32) };
}

/**
 * `raw` (CONFIG's parsed JSON) as a MigrationConfig this build can host, or ConfigFieldError.
 * `lockModes`: the MMU lock modes this build's engines accept.
 */
export function validateConfig(raw: unknown, lockModes: readonly MmuLockMode[]): MigrationConfig {
  const o = object(raw, 'CONFIG');
  onlyKeys(o, '', ['version', 'engine', 'vmConfig', 'vcpus', 'workload', 'memslots', 'ramBytes']);
  const version = int(o.version, 'version', 0, 0xffff);
  if (version !== CONFIG_VERSION) throw new ConfigFieldError('version', `${version}, this receiver understands ${CONFIG_VERSION}`);
  const engine = oneOf(o.engine, 'engine', ENGINES);

  const vc = object(o.vmConfig, 'vmConfig');
  onlyKeys(vc, 'vmConfig', ['manualDirtyLogProtect', 'dirtyRingEntries', 'lock', 'guestPageSize']);
  const dirtyRingEntries = int(vc.dirtyRingEntries, 'vmConfig.dirtyRingEntries', 0, MAX_DIRTY_RING_ENTRIES);
  if (dirtyRingEntries & (dirtyRingEntries - 1)) throw new ConfigFieldError('vmConfig.dirtyRingEntries', `${dirtyRingEntries} is not 0 or a power of two`);
  const vmConfig = {
    manualDirtyLogProtect: bool(vc.manualDirtyLogProtect, 'vmConfig.manualDirtyLogProtect'),
    dirtyRingEntries,
    lock: oneOf(vc.lock, 'vmConfig.lock', lockModes),
    guestPageSize: oneOf(vc.guestPageSize, 'vmConfig.guestPageSize', GUEST_PAGE_SIZES),
  };

  const vcpus = int(o.vcpus, 'vcpus', 1, MAX_VCPUS);

  const w = object(o.workload, 'workload');
  onlyKeys(w, 'workload', ['kind', 'gpaBase', 'bytesPerVcpu', 'seed', 'writePercent', 'dirtyRate', 'workingSetBytes', 'pattern', 'traces', 'traceRate', 'traceShift']);
  const bytesPerVcpu = pageMultiple(w.bytesPerVcpu, 'workload.bytesPerVcpu', PAGE_SIZE, MAX_GPA);
  const workload = {
    kind: oneOf(w.kind, 'workload.kind', WORKLOAD_KINDS),
    gpaBase: pageMultiple(w.gpaBase, 'workload.gpaBase', 0, MAX_GPA - PAGE_SIZE),
    bytesPerVcpu,
    seed: int(w.seed, 'workload.seed', 0, 0xffff_ffff),
    writePercent: int(w.writePercent, 'workload.writePercent', 0, 100),
    // The dirty-rate fields came after the other workload fields: absent, they take the
    // defaults workload() gives (no pacing, the whole slice, in order).
    dirtyRate: w.dirtyRate === undefined ? 0 : int(w.dirtyRate, 'workload.dirtyRate', 0, MAX_GPA),
    workingSetBytes: w.workingSetBytes === undefined ? bytesPerVcpu : pageMultiple(w.workingSetBytes, 'workload.workingSetBytes', PAGE_SIZE, bytesPerVcpu),
    pattern: w.pattern === undefined ? ('sequential' as const) : oneOf(w.pattern, 'workload.pattern', DIRTY_PATTERNS),
    ...validateTraceFields(w),
  };
  if (workload.kind === 'trace' && workload.traces.length === 0) throw new ConfigFieldError('workload.traces', 'the trace workload needs at least one trace');

  if (!Array.isArray(o.memslots)) throw new ConfigFieldError('memslots', `must be an array, got ${describeValue(o.memslots)}`);
  if (o.memslots.length < 1 || o.memslots.length > MAX_MEMSLOTS) throw new ConfigFieldError('memslots', `${o.memslots.length} memslots, expected 1..${MAX_MEMSLOTS}`);
  const memslots = o.memslots.map(validateSlot);
  const byGpa = [...memslots].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
  for (let i = 1; i < byGpa.length; i++) {
    const prev = byGpa[i - 1]!;
    const cur = byGpa[i]!;
    if (cur.guestPhysAddr < prev.guestPhysAddr + prev.memorySize) {
      throw new ConfigFieldError(`memslots[${memslots.indexOf(cur)}].guestPhysAddr`, `${hex(cur.guestPhysAddr)} overlaps memslot ${prev.slot} [${hex(prev.guestPhysAddr)}, ${hex(prev.guestPhysAddr + prev.memorySize)})`);
    }
  }
  const ids = new Set<number>();
  memslots.forEach((s, i) => {
    if (ids.has(s.slot)) throw new ConfigFieldError(`memslots[${i}].slot`, `memslot id ${s.slot} appears twice`);
    ids.add(s.slot);
  });
  const sum = memslots.reduce((a, s) => a + s.memorySize, 0);
  const ramBytes = int(o.ramBytes, 'ramBytes', PAGE_SIZE, Number.MAX_SAFE_INTEGER);
  if (ramBytes !== sum) throw new ConfigFieldError('ramBytes', `${ramBytes} disagrees with the memslots' sizes (${sum})`);

  // Every byte the guest writes must be writable guest RAM, or it dies on the destination.
  const end = workload.gpaBase + vcpus * workload.bytesPerVcpu;
  if (end > MAX_GPA) throw new ConfigFieldError('workload.bytesPerVcpu', `${vcpus} vCPUs x ${workload.bytesPerVcpu} bytes from ${hex(workload.gpaBase)} end beyond ${hex(MAX_GPA)}`);
  for (let gpa = workload.gpaBase; gpa < end; ) {
    const s = memslots.find((m) => !m.internal && gpa >= m.guestPhysAddr && gpa < m.guestPhysAddr + m.memorySize);
    if (!s) throw new ConfigFieldError('workload.gpaBase', `the workload's memory [${hex(workload.gpaBase)}, ${hex(end)}) is not all guest RAM: ${hex(gpa)} is in no guest-RAM memslot`);
    if (s.flags & KVM_MEM_READONLY) throw new ConfigFieldError(`memslots[${memslots.indexOf(s)}].flags`, `KVM_MEM_READONLY on memslot ${s.slot}, which the workload writes`);
    gpa = s.guestPhysAddr + s.memorySize;
  }
  return { version, engine, vmConfig, vcpus, workload, memslots, ramBytes };
}
