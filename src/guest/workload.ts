// Guest workloads as engine-neutral descriptions. The soft engine interprets them on its vCPU
// worker threads; the kvm engine compiles them to x86-64 long-mode code. Both must produce the
// same memory contents and the same dirty pages for the same spec, pass by pass (the
// differential test holds them to it), so every detail that decides which page is written with
// which value lives here and nowhere else.
//
// Memory layout (like KVM's memstress / perf_test_util): the test memory starts at
// `gpaBase`; vCPU v owns the slice [gpaBase + v * bytesPerVcpu, gpaBase + (v+1) * bytesPerVcpu).
// A "pass" (the selftests' iteration) touches `pagesPerVcpu` pages of the vCPU's own slice:
//   sequential: every 4 KiB page in order, page 0 .. pagesPerVcpu-1;
//   random:     pagesPerVcpu pages drawn with the vCPU's xorshift64 generator (repeats allowed);
//   idle:       like sequential once, then the vCPU halts (memory populated and non-zero);
//   rwmix:      every page in order, written when the generator's next draw % 100 <
//               writePercent, read otherwise;
//   dirty-rate: the memory dirtier QEMU developers use: a pass writes the vCPU's working set
//               (its first workingSetPages pages; the rest of the slice stays untouched, so
//               zero pages occur) once, in order (pattern sequential) or as that many draws
//               (pattern random), paced to dirtyRate bytes per second per vCPU by the guest's
//               own clock: ahead of schedule it halts until its timer (0 = unpaced). Timing
//               never changes which page gets which value, so the pass-by-pass model holds;
//               only the soft engine runs it (the kvm guest has no clock to pace itself by).
//   trace:      replays real programs' page-level write traces (trace-format.ts,
//               trace-replay.ts): a pass is one epoch of the trace; vCPU v replays
//               traces[v % traces.length] from epoch v * traceShift, wrapping around, and writes
//               page (index mod pagesPerVcpu) of its slice for each page the epoch lists, in
//               ascending index order; paced to traceRate epochs per second by the guest's clock
//               like dirty-rate (TRACE_RATE_RECORDED: each trace at its program's native speed).
//               Soft engine only.
// Each write stores one little-endian 64-bit word at offset 0 of the page:
//   guestWriteValue(vcpu, pass) = (vcpu + 1) * 2^32 + pass, with pass counted from 1.
// After each pass the vCPU reports to the VMM (soft: a shared counter; kvm: `out` to
// SYNC_PORT, like ucall) and waits while the VMM's pass allowance is used up.

import { PAGE_SIZE } from '../vmm/engine.ts';
import { loadTrace, traceEpoch, type LoadedTrace, type TraceRef } from './trace-replay.ts';

export type WorkloadKind = 'sequential' | 'random' | 'idle' | 'rwmix' | 'dirty-rate' | 'trace';

/** trace: replay each trace at the speed its program ran natively (the recorded real time). */
export const TRACE_RATE_RECORDED = -1;

export type DirtyPattern = 'sequential' | 'random';
export const DIRTY_PATTERNS: readonly DirtyPattern[] = ['sequential', 'random'];

export interface WorkloadSpec {
  kind: WorkloadKind;
  /** First guest-physical address of the test memory (page aligned). */
  gpaBase: number;
  /** Bytes of test memory each vCPU owns (multiple of 4 KiB). */
  bytesPerVcpu: number;
  /** Seed of the per-vCPU generators (random, rwmix). */
  seed: number;
  /** rwmix: percentage of accesses that are writes (0..100). */
  writePercent: number;
  /** dirty-rate: bytes each vCPU dirties per second (0: as fast as it can). */
  dirtyRate: number;
  /** dirty-rate: bytes of its slice each vCPU writes (a multiple of 4 KiB, at most bytesPerVcpu). */
  workingSetBytes: number;
  /** dirty-rate: the order of the working set's writes. */
  pattern: DirtyPattern;
  /** trace: the traces replayed (vCPU v replays traces[v % traces.length]). */
  traces: TraceRef[];
  /** trace: epochs per second per vCPU; 0: as fast as it can; TRACE_RATE_RECORDED: real time. */
  traceRate: number;
  /** trace: epochs between the starting points of consecutive vCPUs. */
  traceShift: number;
}

/** I/O port the kvm guest writes after every pass (the value written is the pass number). */
export const SYNC_PORT = 0x5c2;

/** Where the VMM puts test memory by default: at 4 GiB, clear of the kvm engine's own slot. */
export const DEFAULT_TEST_MEM_GPA = 2 ** 32;

export const WORKLOAD_KINDS: readonly WorkloadKind[] = ['sequential', 'random', 'idle', 'rwmix', 'dirty-rate', 'trace'];

export function workload(kind: WorkloadKind, bytesPerVcpu: number, opts: Partial<WorkloadSpec> = {}): WorkloadSpec {
  return {
    kind,
    gpaBase: opts.gpaBase ?? DEFAULT_TEST_MEM_GPA,
    bytesPerVcpu,
    seed: opts.seed ?? 1,
    writePercent: opts.writePercent ?? 50,
    dirtyRate: opts.dirtyRate ?? 0,
    workingSetBytes: Math.min(opts.workingSetBytes ?? bytesPerVcpu, bytesPerVcpu),
    pattern: opts.pattern ?? 'sequential',
    traces: opts.traces ?? [],
    traceRate: opts.traceRate ?? TRACE_RATE_RECORDED,
    traceShift: opts.traceShift ?? 0,
  };
}

/** trace: the trace vCPU `vcpu` replays (loaded once per thread). */
export function vcpuTrace(spec: WorkloadSpec, vcpu: number): LoadedTrace {
  if (spec.traces.length === 0) throw new RangeError("the 'trace' workload needs at least one trace file");
  return loadTrace(spec.traces[vcpu % spec.traces.length]!);
}

/** trace: the epochs per second vCPU `vcpu` replays at (0: unpaced). */
export function traceEpochRate(spec: WorkloadSpec, vcpu: number): number {
  return spec.traceRate === TRACE_RATE_RECORDED ? vcpuTrace(spec, vcpu).recordedEpochsPerSecond : spec.traceRate;
}

export function pagesPerVcpu(spec: WorkloadSpec): number {
  return Math.floor(spec.bytesPerVcpu / PAGE_SIZE);
}

/** Pages a dirty-rate pass writes (or draws) per vCPU: its working set. */
export function workingSetPages(spec: WorkloadSpec): number {
  return Math.floor(spec.workingSetBytes / PAGE_SIZE);
}

/** The 64-bit value vCPU `vcpu` writes during pass `pass` (1-based), as hi/lo 32-bit halves. */
export function guestWriteValue(vcpu: number, pass: number): { hi: number; lo: number } {
  return { hi: vcpu + 1, lo: pass >>> 0 };
}

/**
 * xorshift64 state of vCPU `vcpu`, never zero. Kept as two uint32 halves so that both the
 * interpreter and the code generator can reproduce it exactly.
 */
export function initialRngState(spec: WorkloadSpec, vcpu: number): { hi: number; lo: number } {
  // splitmix-style scramble of (seed, vcpu) into 64 bits, done in BigInt once per vCPU.
  let z = (BigInt(spec.seed >>> 0) << 32n) ^ BigInt(vcpu + 1) ^ 0x9e3779b97f4a7c15n;
  z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
  z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
  z = z ^ (z >> 31n);
  if (z === 0n) z = 1n;
  return { hi: Number(z >> 32n), lo: Number(z & 0xffffffffn) };
}

/**
 * One xorshift64 step (x ^= x << 13; x ^= x >> 7; x ^= x << 17) on a {hi, lo} pair, in place;
 * returns the new low 32 bits. Pure 32-bit arithmetic so the hot loop allocates nothing.
 */
export function xorshift64Step(s: { hi: number; lo: number }): number {
  let hi = s.hi >>> 0;
  let lo = s.lo >>> 0;
  // x ^= x << 13
  hi = (hi ^ ((hi << 13) | (lo >>> 19))) >>> 0;
  lo = (lo ^ (lo << 13)) >>> 0;
  // x ^= x >> 7
  lo = (lo ^ ((lo >>> 7) | (hi << 25))) >>> 0;
  hi = (hi ^ (hi >>> 7)) >>> 0;
  // x ^= x << 17
  hi = (hi ^ ((hi << 17) | (lo >>> 15))) >>> 0;
  lo = (lo ^ (lo << 17)) >>> 0;
  s.hi = hi;
  s.lo = lo;
  return lo;
}

/** Page index within the vCPU's slice for a random draw: low 32 bits modulo the slice size. */
export function randomPageIndex(draw: number, pages: number): number {
  return (draw >>> 0) % pages;
}

/**
 * Reference model: the page indices (within the vCPU's slice) that pass `pass` of vCPU `vcpu`
 * writes, given the generator state at the start of the pass (advanced in place). Used by tests
 * and the differential check, and as the specification the engines' fast paths must match.
 * Only the trace workload depends on `vcpu` (the others draw it from the generator state).
 */
export function pagesWrittenInPass(spec: WorkloadSpec, rng: { hi: number; lo: number }, pass: number, vcpu = 0): number[] {
  const pages = pagesPerVcpu(spec);
  const out: number[] = [];
  switch (spec.kind) {
    case 'sequential':
      for (let p = 0; p < pages; p++) out.push(p);
      break;
    case 'idle':
      if (pass === 1) for (let p = 0; p < pages; p++) out.push(p);
      break;
    case 'random':
      for (let i = 0; i < pages; i++) out.push(randomPageIndex(xorshift64Step(rng), pages));
      break;
    case 'rwmix':
      for (let p = 0; p < pages; p++) if (xorshift64Step(rng) % 100 < spec.writePercent) out.push(p);
      break;
    case 'dirty-rate': {
      const ws = workingSetPages(spec);
      if (spec.pattern === 'sequential') for (let p = 0; p < ws; p++) out.push(p);
      else for (let i = 0; i < ws; i++) out.push(randomPageIndex(xorshift64Step(rng), ws));
      break;
    }
    case 'trace': {
      const t = vcpuTrace(spec, vcpu);
      const e = traceEpoch(t.trace.writes.length, spec.traceShift, vcpu, pass);
      for (const p of t.trace.writes[e]!) out.push(p % pages);
      break;
    }
  }
  return out;
}
