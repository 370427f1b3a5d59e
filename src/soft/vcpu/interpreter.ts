// The soft engine's guest: interprets a WorkloadSpec exactly as src/guest/workload.ts specifies
// (page order, value written, xorshift64 draws, pass accounting), one guest access at a time.
//
// Thread-confined: one Interpreter per vCPU thread. Its registers (passes, pos, rng, halted)
// are copied to and from the shared control block by runner.ts whenever the vCPU stops.
// The loops below are the hot path: no allocation, one shape per call site.

import { pagesPerVcpu, workingSetPages, guestWriteValue, initialRngState, randomPageIndex, vcpuTrace, xorshift64Step, type WorkloadSpec } from '../../guest/workload.ts';
import { traceEpoch } from '../../guest/trace-replay.ts';
import { PAGE_SHIFT } from '../../vmm/engine.ts';

/** What the interpreter needs from its vCPU: request checks and guest memory accesses. */
export interface GuestAccess {
  /** True when the vCPU must stop before the next access (pause or exit requested). */
  checkRequests(): boolean;
  /** Guest store of a 64-bit word at offset 0 of page gfn; false = the vCPU exits. */
  write64(gfn: number, lo: number, hi: number): boolean;
  /** Guest load at offset 0 of page gfn; false = the vCPU exits. */
  read32(gfn: number): boolean;
  /**
   * The dirty-rate guest's clock: it has written `written` pages in all. True when it is ahead
   * of its rate and must halt until its timer before the next write.
   */
  pace(written: number): boolean;
  /**
   * The trace guest's clock: it has replayed `epochs` epochs. True when the next epoch is not due
   * yet and it must halt until its timer.
   */
  paceEpoch(epochs: number): boolean;
}

export const PASS_DONE = 0;
export const PASS_INTERRUPTED = 1;
/** An access exited to the VMM; pos and the generator are at that access, so re-entry repeats it. */
export const PASS_EXIT = 2;

/**
 * The vCPU looks at its request word every 32 accesses (and on every guest entry, i.e. after
 * every fault that left guest mode). A flusher waits for the acknowledgement, so a request only
 * waits up to 32 accesses longer; no access after the flush returns can use a stale entry.
 */
const REQUEST_CHECK_MASK = 31;

const KIND_SEQUENTIAL = 0;
const KIND_RANDOM = 1;
const KIND_IDLE = 2;
const KIND_RWMIX = 3;
const KIND_DIRTY_RATE = 4;
const KIND_TRACE = 5;

const NO_PAGES = new Uint32Array(0);

export class Interpreter {
  /** Registers. */
  passes = 0;
  pos = 0;
  rng: { hi: number; lo: number };
  halted = false;

  private readonly kind: number;
  private readonly pages: number;
  private readonly baseGfn: number;
  private readonly hi: number;
  private readonly writePercent: number;
  private readonly workingSet: number;
  private readonly randomPattern: boolean;
  /** dirty-rate: pages written since the vCPU started (the guest's own counter, for its clock). */
  private written = 0;
  /** trace: this vCPU's trace (trace-replay.ts), its epoch count and first epoch. */
  private readonly tracePages: Uint32Array = NO_PAGES;
  private readonly traceOffsets: Uint32Array = NO_PAGES;
  private readonly traceEpochs: number = 0;
  private readonly traceShift: number = 0;

  constructor(
    spec: WorkloadSpec,
    readonly vcpu: number,
    private readonly access: GuestAccess,
  ) {
    this.kind = { sequential: KIND_SEQUENTIAL, random: KIND_RANDOM, idle: KIND_IDLE, rwmix: KIND_RWMIX, 'dirty-rate': KIND_DIRTY_RATE, trace: KIND_TRACE }[spec.kind];
    if (spec.kind === 'trace') {
      const t = vcpuTrace(spec, vcpu);
      this.tracePages = t.flat;
      this.traceOffsets = t.offsets;
      this.traceEpochs = t.trace.writes.length;
      this.traceShift = spec.traceShift;
    }
    this.workingSet = workingSetPages(spec);
    this.randomPattern = spec.pattern === 'random';
    this.pages = pagesPerVcpu(spec);
    this.baseGfn = (spec.gpaBase + vcpu * spec.bytesPerVcpu) / 2 ** PAGE_SHIFT;
    if (!Number.isInteger(this.baseGfn) || this.baseGfn + this.pages >= 2 ** 31) {
      throw new RangeError(`vCPU ${vcpu}: test memory must be page aligned and below 8 TiB`);
    }
    this.hi = guestWriteValue(vcpu, 1).hi;
    this.writePercent = spec.writePercent;
    this.rng = initialRngState(spec, vcpu);
  }

  /** Run (or continue) pass passes+1 from pos. */
  runPass(): number {
    const pass = this.passes + 1;
    const lo = guestWriteValue(this.vcpu, pass).lo;
    let r: number;
    switch (this.kind) {
      case KIND_SEQUENTIAL:
        r = this.sequential(lo);
        break;
      case KIND_IDLE:
        r = this.sequential(lo);
        if (r === PASS_DONE) this.halted = true;
        break;
      case KIND_RANDOM:
        r = this.random(lo);
        break;
      case KIND_DIRTY_RATE:
        r = this.dirtyRate(lo);
        break;
      case KIND_TRACE:
        r = this.trace(lo, pass);
        break;
      default:
        r = this.rwmix(lo);
    }
    if (r === PASS_DONE) {
      this.passes = pass;
      this.pos = 0;
    }
    return r;
  }

  private sequential(lo: number): number {
    const a = this.access;
    const base = this.baseGfn;
    const hi = this.hi;
    const pages = this.pages;
    for (let p = this.pos; p < pages; p++) {
      if ((p & REQUEST_CHECK_MASK) === 0 && a.checkRequests()) {
        this.pos = p;
        return PASS_INTERRUPTED;
      }
      if (!a.write64(base + p, lo, hi)) {
        this.pos = p;
        return PASS_EXIT;
      }
    }
    return PASS_DONE;
  }

  private random(lo: number): number {
    const a = this.access;
    const base = this.baseGfn;
    const hi = this.hi;
    const pages = this.pages;
    const rng = this.rng;
    for (let p = this.pos; p < pages; p++) {
      if ((p & REQUEST_CHECK_MASK) === 0 && a.checkRequests()) {
        this.pos = p;
        return PASS_INTERRUPTED;
      }
      // The draw happens after the request check, so an interrupted pass resumes at the same
      // generator state; an access that exits puts the draw back, so re-entry repeats it.
      const rhi = rng.hi;
      const rlo = rng.lo;
      const page = randomPageIndex(xorshift64Step(rng), pages);
      if (!a.write64(base + page, lo, hi)) return this.exitAt(p, rhi, rlo);
    }
    return PASS_DONE;
  }

  private rwmix(lo: number): number {
    const a = this.access;
    const base = this.baseGfn;
    const hi = this.hi;
    const pages = this.pages;
    const rng = this.rng;
    const wp = this.writePercent;
    for (let p = this.pos; p < pages; p++) {
      if ((p & REQUEST_CHECK_MASK) === 0 && a.checkRequests()) {
        this.pos = p;
        return PASS_INTERRUPTED;
      }
      const rhi = rng.hi;
      const rlo = rng.lo;
      const ok = xorshift64Step(rng) % 100 < wp ? a.write64(base + p, lo, hi) : a.read32(base + p);
      if (!ok) return this.exitAt(p, rhi, rlo);
    }
    return PASS_DONE;
  }

  /**
   * dirty-rate: the working set once (in order or as draws); before every 32nd write the guest
   * looks at its clock (pace) as well as at requests, and halts when ahead of its rate.
   */
  private dirtyRate(lo: number): number {
    const a = this.access;
    const base = this.baseGfn;
    const hi = this.hi;
    const ws = this.workingSet;
    const rng = this.rng;
    const random = this.randomPattern;
    for (let p = this.pos; p < ws; p++) {
      if ((p & REQUEST_CHECK_MASK) === 0 && (a.checkRequests() || a.pace(this.written))) {
        this.pos = p;
        return PASS_INTERRUPTED;
      }
      const rhi = rng.hi;
      const rlo = rng.lo;
      const page = random ? randomPageIndex(xorshift64Step(rng), ws) : p;
      if (!a.write64(base + page, lo, hi)) return this.exitAt(p, rhi, rlo);
      this.written++;
    }
    return PASS_DONE;
  }

  /**
   * trace: the pages of this pass's epoch, each modulo the slice. Before the first write (even
   * of an empty epoch) the guest looks at its clock, and halts until the epoch is due.
   */
  private trace(lo: number, pass: number): number {
    const a = this.access;
    if (this.pos === 0 && a.paceEpoch(pass - 1)) return PASS_INTERRUPTED;
    const base = this.baseGfn;
    const hi = this.hi;
    const pages = this.pages;
    const flat = this.tracePages;
    const e = traceEpoch(this.traceEpochs, this.traceShift, this.vcpu, pass);
    const start = this.traceOffsets[e]!;
    const n = this.traceOffsets[e + 1]! - start;
    for (let p = this.pos; p < n; p++) {
      if ((p & REQUEST_CHECK_MASK) === 0 && a.checkRequests()) {
        this.pos = p;
        return PASS_INTERRUPTED;
      }
      if (!a.write64(base + (flat[start + p]! % pages), lo, hi)) {
        this.pos = p;
        return PASS_EXIT;
      }
    }
    return PASS_DONE;
  }

  /**
   * The access at pos was completed outside the guest (an MMIO exit: as KVM completes the
   * emulated instruction on the next KVM_RUN, it is not repeated): step past it.
   */
  skipAccess(): void {
    if (this.kind === KIND_RANDOM || this.kind === KIND_RWMIX || (this.kind === KIND_DIRTY_RATE && this.randomPattern)) xorshift64Step(this.rng);
    this.pos++;
  }

  /** An access exited: put the draw back and stay at it, so re-entry repeats it (vcpu-loop.ts). */
  private exitAt(p: number, rhi: number, rlo: number): number {
    this.rng.hi = rhi;
    this.rng.lo = rlo;
    this.pos = p;
    return PASS_EXIT;
  }
}
