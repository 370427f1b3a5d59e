// The soft engine's guest entry: what the shared run loop (vmm/run/vcpu-loop.ts) calls to enter
// the guest until the next exit. It runs the workload interpreter through the soft TLB, takes
// stage-2 faults on the vCPU's own thread, and turns whatever it cannot resolve into an exit.
//
// Runs on the vCPU's worker thread (or, in tests, any single thread). Concurrency rules are
// those of control.ts: this file writes only its own vCPU line's engine words (V_MODE,
// V_FLUSH_ACK, the R_* registers while stopped or about to be), reads global words with Atomics,
// and stamps its own progress-clock ring every UNIT_PAGE_ACCESSES completed guest accesses
// (vmm/run/progress-clock.ts: one store and one Atomics.store per unit, nothing per page).
// Guest memory is written with plain stores into host frames reached through the soft TLB; the
// VMM reads guest memory only while vCPUs are stopped (Atomics.wait/notify order those
// accesses) or accepts racy snapshots (live migration).
//
// Exits it produces (vmm/run/exits.ts), one per enter():
//   IO            the interpreter finished a pass (the pass report)
//   HLT           the idle workload has written its slice: the guest has nothing left to do
//   INTR          a request (pause, stop, allowance) interrupted the pass, or came before entry
//   DIRTY_RING_FULL  the vCPU's dirty ring reached its soft limit (dirty/dirty-ring.ts): noticed
//                 at the next request check after the push, and again at every entry until the
//                 VMM has reset the ring (kvm_dirty_ring_check_request)
//   MMIO          a fault at no memslot, or a write to a read-only one (the access counts as done
//                 by the device: re-entry continues after it, as after KVM_EXIT_MMIO)
//   MEMORY_FAULT  a fault the handler cannot resolve: the host has no page there (EFAULT), or the
//                 page is missing in an exit-on-missing memslot or a userfaultfd-registered range
//                 (flag MISSING). The interpreter's registers stay at the faulting access, so
//                 the next enter() repeats it.
// Write-protect faults, retries (memslot changed, invalidation in flight) and everything else
// the fault handler resolves never leave enter(): that is the hot path of a dirty pass.

import {
  G_FLUSH_GEN,
  G_FLUSH_WAITERS,
  G_PAUSE,
  G_EXIT,
  G_KICK,
  G_KICK_WAITERS,
  G_REQ,
  GuestMode_InGuest,
  GuestMode_OutsideGuest,
  R_HALTED,
  R_PASS,
  R_POS,
  R_RNG_HI,
  R_RNG_LO,
  R_VALID,
  V_FLUSH_ACK,
  V_HALTED,
  V_MODE,
  V_PASSES,
  vcpuBase,
} from './control.ts';
import { EXIT_DIRTY_RING_FULL, EXIT_HLT, EXIT_INTR, EXIT_IO, EXIT_MEMORY_FAULT, EXIT_MMIO, MEMORY_FAULT_FLAG_MISSING, MEMORY_FAULT_FLAG_WRITE, VcpuExit } from '../../vmm/run/exits.ts';
import type { GuestEntry } from '../../vmm/run/vcpu-loop.ts';
import { PAGE_SIZE } from '../../vmm/engine.ts';
import { FAULT_MISSING, FAULT_MMIO } from '../mmu/fault.ts';
import { acknowledgeFlush } from './tlb-flush.ts';
import { SoftTlb, TLB_R, TLB_W } from './soft-tlb.ts';
import { Interpreter, PASS_DONE, PASS_EXIT, type GuestAccess } from './interpreter.ts';
import { traceEpochRate, type WorkloadSpec } from '../../guest/workload.ts';
import { VcpuStats, S_GUEST_PAGES_WRITTEN, S_GUEST_TIMER_HALTS, S_TLB_FLUSHES, S_TLB_MISSES } from './stats.ts';
import type { SoftDirtyRingProducer } from '../dirty/dirty-ring.ts';
import { GuestClock } from './guest-clock.ts';
import { UNIT_PAGE_ACCESSES, type ProgressStamper } from '../../vmm/run/progress-clock.ts';

/** What the vCPU needs from the stage-2 MMU (implemented by mmu/vcpu-mmu.ts). */
export interface VcpuMmu {
  /** Entered/left with guest mode: the RCU read section that makes lock-free walks safe. */
  enterGuest(): void;
  exitGuest(): void;
  /**
   * Walk stage 2 for gfn (in guest mode). When the leaf allows the access, fill the TLB and
   * return the host pfn; otherwise return -1 (the caller takes a fault).
   */
  walk(gfn: number, write: boolean, tlb: SoftTlb): number;
  /**
   * Handle a stage-2 fault (user_mem_abort), called outside guest mode. 0 = resolved (retry the
   * access); negative: FAULT_MMIO, FAULT_EFAULT or FAULT_MISSING (mmu/fault.ts), an exit.
   */
  fault(gfn: number, write: boolean): number;
  /** A memslot generation newer than this guest-mode section's has been published. */
  slotsStale(): boolean;
  /** The last walk found a present, write-protected 4 KiB RAM leaf (a fast-path candidate). */
  canFastWrite(): boolean;
  /**
   * Fast path for that leaf, called outside guest mode but still inside the RCU read section:
   * set W by cmpxchg and mark dirty (under the MMU lock's write side in 'global-write' mode, its
   * read side in 'global' mode, lockless in 'parallel' mode, see mmu/fault.ts). Host pfn, or -1
   * (take fault()).
   */
  fastWrite(gfn: number): number;
  /** fastWrite from guest mode; -2 when it would have to wait for the MMU lock ('global*' modes). */
  tryFastWrite(gfn: number): number;
}

export class VcpuRunner implements GuestAccess, GuestEntry {
  readonly base: number;
  readonly tlb = new SoftTlb();
  readonly interp: Interpreter;
  private reqSeen = 0;
  private flushSeen = 0;
  /** The dirty-rate guest's timer (guest-clock.ts); haltUntil > 0: halt until then, outside the guest. */
  private readonly clock: GuestClock;
  private haltUntil = 0;
  private written = 0;
  private windows: Int32Array[];

  constructor(
    readonly ctl: Int32Array,
    readonly vcpu: number,
    spec: WorkloadSpec,
    windows: Int32Array[],
    readonly mmu: VcpuMmu,
    readonly stats: VcpuStats,
    /** This vCPU's dirty ring, when the VM has one (its fault handler pushes to it). */
    private readonly ring: SoftDirtyRingProducer | null = null,
    /** The guest's progress clock: one stamp per UNIT_PAGE_ACCESSES completed accesses. */
    private readonly progress: ProgressStamper | null = null,
  ) {
    this.base = vcpuBase(vcpu);
    this.windows = windows;
    this.interp = new Interpreter(spec, vcpu, this);
    this.clock = new GuestClock(spec.kind === 'dirty-rate' ? spec.dirtyRate / PAGE_SIZE : spec.kind === 'trace' ? traceEpochRate(spec, vcpu) : 0);
    // A push reached the soft limit: make the next request check (at most 32 accesses away)
    // take the slow path, which sees the full ring and leaves the guest.
    if (ring !== null) ring.onSoftFull = () => {
      this.reqSeen = (this.reqSeen + 0x40000000) | 0;
    };
  }

  /** The exit record of the current enter() (the loop's, reused). */
  private x = new VcpuExit();

  /** enter() for the run loop: run the current pass until it ends or exits. */
  enter(x: VcpuExit): void {
    this.x = x;
    const i = this.interp;
    if (i.halted) {
      x.reason = EXIT_HLT;
      return;
    }
    // KVM_REQ_DIRTY_RING_SOFT_FULL: no guest entry until the VMM has reset the ring.
    if (this.ring !== null && this.ring.softFull()) {
      x.reason = EXIT_DIRTY_RING_FULL;
      return;
    }
    if (!this.enterGuest()) {
      x.reason = this.leaveReason();
      return;
    }
    const r = i.runPass();
    this.exitGuest();
    if (r === PASS_DONE) {
      x.reason = EXIT_IO;
      x.pass = i.passes;
      x.halted = i.halted;
    } else if (r !== PASS_EXIT) {
      x.reason = this.leaveReason();
      if (this.haltUntil !== 0) this.haltForTimer();
    } else if (x.reason === EXIT_MMIO) {
      // translateSlow filled x. An MMIO access is the device's: it completes with the exit
      // (KVM finishes the instruction on re-entry), so re-entry continues after it.
      i.skipAccess();
    }
    // Other PASS_EXITs (MEMORY_FAULT): re-entry repeats the access.
  }

  /** The thread is dying inside enter(): a flusher must not wait for this vCPU's acknowledgement. */
  onCrash(): void {
    this.leaveGuestMode();
  }

  /** Guest entry: V_MODE = IN_GUEST, then look at requests (flush) before any access. */
  enterGuest(): boolean {
    Atomics.store(this.ctl, this.base + V_MODE, GuestMode_InGuest);
    this.mmu.enterGuest();
    // A flusher bumps G_FLUSH_GEN before G_REQ, so one load of G_REQ after the V_MODE store is
    // enough to see any flush that might have skipped us.
    if (Atomics.load(this.ctl, G_REQ) !== this.reqSeen && this.handleRequests()) {
      this.exitGuest();
      return false;
    }
    return true;
  }

  exitGuest(): void {
    this.mmu.exitGuest();
    this.leaveGuestMode();
  }

  /** V_MODE = OUTSIDE_GUEST, waking a flusher that waits for this vCPU (it no longer needs to). */
  private leaveGuestMode(): void {
    Atomics.store(this.ctl, this.base + V_MODE, GuestMode_OutsideGuest);
    if (Atomics.load(this.ctl, G_FLUSH_WAITERS) !== 0) Atomics.notify(this.ctl, this.base + V_FLUSH_ACK);
  }

  /**
   * Called when G_REQ changed (and on guest entry): flush the TLB if a flush was requested,
   * acknowledge it, and say whether the vCPU must leave the guest (pause or exit).
   */
  handleRequests(): boolean {
    const ctl = this.ctl;
    const req = Atomics.load(ctl, G_REQ);
    const gen = Atomics.load(ctl, G_FLUSH_GEN);
    const flush = gen !== this.flushSeen;
    if (flush) {
      this.tlb.invalidateAll();
      this.stats.add(S_TLB_FLUSHES, 1);
      this.flushSeen = gen;
    }
    if (flush || this.mmu.slotsStale()) {
      // Quiesce the read sections: table pages unlinked before this flush may now go (RCU), and
      // a memslot publisher waiting in synchronize() sees this vCPU on the new generation (SRCU).
      this.mmu.exitGuest();
      this.mmu.enterGuest();
    }
    if (flush) acknowledgeFlush(ctl, this.base, gen);
    if (Atomics.load(ctl, G_PAUSE) !== 0 || Atomics.load(ctl, G_EXIT) !== 0 || (this.ring !== null && this.ring.softFull())) {
      // Keep reqSeen stale so the next access check comes back here until we stop.
      this.reqSeen = (req + 0x40000000) | 0;
      return true;
    }
    this.reqSeen = req;
    return false;
  }

  /**
   * The dirty-rate guest is ahead of its rate: wait outside the guest until its timer fires or
   * the VMM kicks the vCPU (pause, stop: the wait never delays a request), then exit INTR so the
   * loop head looks at the run-control words before re-entering.
   */
  private haltForTimer(): void {
    const ctl = this.ctl;
    const ms = this.haltUntil - performance.now();
    this.haltUntil = 0;
    this.stats.add(S_GUEST_TIMER_HALTS, 1);
    if (ms <= 0) return;
    const kick = Atomics.load(ctl, G_KICK);
    if (Atomics.load(ctl, G_PAUSE) !== 0 || Atomics.load(ctl, G_EXIT) !== 0) return;
    Atomics.add(ctl, G_KICK_WAITERS, 1);
    Atomics.wait(ctl, G_KICK, kick, ms);
    Atomics.sub(ctl, G_KICK_WAITERS, 1);
  }

  /** Why a request check made the vCPU leave: a pause or stop (INTR) first, else its full ring. */
  private leaveReason(): number {
    const ctl = this.ctl;
    if (Atomics.load(ctl, G_PAUSE) !== 0 || Atomics.load(ctl, G_EXIT) !== 0) return EXIT_INTR;
    return this.ring !== null && this.ring.softFull() ? EXIT_DIRTY_RING_FULL : EXIT_INTR;
  }

  // ---- GuestAccess: what the interpreter calls for each guest access ----

  /** True when the vCPU must stop before its next access (pause/exit requested). */
  checkRequests(): boolean {
    return Atomics.load(this.ctl, G_REQ) !== this.reqSeen && this.handleRequests();
  }

  /** Store a 64-bit word (lo, hi) at offset 0 of guest page gfn. False: the vCPU must exit. */
  write64(gfn: number, lo: number, hi: number): boolean {
    let pfn = this.tlb.lookupWrite(gfn);
    if (pfn < 0) {
      pfn = this.translateSlow(gfn, true);
      if (pfn < 0) return false;
    }
    const w = this.windows[pfn >>> 18]!;
    const off = (pfn & 0x3ffff) << 10;
    w[off] = lo;
    w[off + 1] = hi;
    if (--this.unitLeft === 0) this.unitDone();
    return true;
  }

  /** Accesses left until the current unit of progress is complete. */
  private unitLeft = UNIT_PAGE_ACCESSES;

  private unitDone(): void {
    this.unitLeft = UNIT_PAGE_ACCESSES;
    this.progress?.stamp();
  }

  /** Load the low word at offset 0 of guest page gfn (rwmix reads). -1 result + exit flag on failure. */
  read32(gfn: number): boolean {
    let pfn = this.tlb.lookupRead(gfn);
    if (pfn < 0) {
      pfn = this.translateSlow(gfn, false);
      if (pfn < 0) return false;
    }
    this.lastRead = this.windows[pfn >>> 18]![(pfn & 0x3ffff) << 10]!;
    if (--this.unitLeft === 0) this.unitDone();
    return true;
  }

  lastRead = 0;

  /** The dirty-rate guest's clock check (interpreter.ts): count its writes, halt when ahead. */
  pace(written: number): boolean {
    this.stats.add(S_GUEST_PAGES_WRITTEN, written - this.written);
    this.written = written;
    this.haltUntil = this.clock.haltUntil(written);
    return this.haltUntil !== 0;
  }

  /** The trace guest's clock check (interpreter.ts): halt until epoch `epochs` is due. */
  paceEpoch(epochs: number): boolean {
    this.haltUntil = this.clock.haltUntil(epochs);
    return this.haltUntil !== 0;
  }

  /**
   * TLB miss: walk; a write-protect fault on a 4 KiB leaf is fixed here without leaving guest
   * mode; any other stage-2 fault leaves guest mode, is handled, and the walk is retried.
   *
   * Performance (the dirty pass's hot path: every page misses the TLB and takes the
   * write-protect fast path): this function must stay out of line. V8 (Node 20) never inlines a
   * function of more than 460 bytecodes into its caller; this one is ~500, so the interpreter's
   * loop calls it once per miss and it is optimized on its own, with its own inlining budget
   * spent on the fast path (walk, tryFastWrite -> fastWriteLockless). When it was smaller
   * (~380-450 bytecodes), the optimizer often inlined it into the loop with no budget left for
   * the fast path: +30% CPU per dirty pass in most runs (bench dirty-log -b 512M, 12 runs each).
   * Keep its slow branches inline; check `node --print-bytecode --print-bytecode-filter=
   * translateSlow` after changing it.
   */
  private translateSlow(gfn: number, write: boolean): number {
    // The interpreter keeps every gfn below 2^31 (interpreter.ts), which the TLB's index assumes.
    if (gfn < 0 || gfn >= 0x80000000) throw new RangeError(`vCPU ${this.vcpu}: gfn ${gfn} is outside the guest's 2^31 pages`);
    const ctl = this.ctl;
    const modeWord = this.base + V_MODE;
    this.stats.add(S_TLB_MISSES, 1);
    for (;;) {
      const pfn = this.mmu.walk(gfn, write, this.tlb);
      if (pfn >= 0) return pfn;
      if (write && this.mmu.canFastWrite()) {
        // Write-protect fault on a 4 KiB leaf. Uncontended: fix it without leaving guest mode.
        let p = this.mmu.tryFastWrite(gfn);
        if (p === -2) {
          // Lock busy: a short exit that keeps the RCU read section while we block on it.
          this.leaveGuestMode();
          p = this.mmu.fastWrite(gfn);
          Atomics.store(ctl, modeWord, GuestMode_InGuest);
          // Guest entry check (Dekker with the flusher, see tlb-flush.ts): if any request came
          // in while we were out, what we learned may be stale: handle it and walk again.
          if (Atomics.load(ctl, G_REQ) !== this.reqSeen) {
            this.handleRequests();
            continue;
          }
        }
        if (p >= 0) {
          this.tlb.fillSmall(gfn, p, TLB_R | TLB_W);
          return p;
        }
        // -1: the leaf changed under us or the slot does not allow it: the full fault decides.
      }
      this.exitGuest();
      const r = this.mmu.fault(gfn, write);
      // Re-enter before touching the TLB again; a flush that ran meanwhile is seen here. A
      // pause request is noted (reqSeen kept stale) and honoured after this access completes.
      Atomics.store(ctl, modeWord, GuestMode_InGuest);
      this.mmu.enterGuest();
      if (Atomics.load(ctl, G_REQ) !== this.reqSeen) this.handleRequests();
      if (r < 0) {
        // A fault the handler cannot resolve: this enter()'s exit (the interpreter stays at
        // this access; see enter()).
        const x = this.x;
        x.reason = r === FAULT_MMIO ? EXIT_MMIO : EXIT_MEMORY_FAULT;
        x.gpa = gfn * PAGE_SIZE;
        x.size = PAGE_SIZE;
        x.flags = (write ? MEMORY_FAULT_FLAG_WRITE : 0) | (r === FAULT_MISSING ? MEMORY_FAULT_FLAG_MISSING : 0);
        return -1;
      }
    }
  }

  // ---- registers ----

  saveRegs(): void {
    const ctl = this.ctl;
    const b = this.base;
    const i = this.interp;
    Atomics.store(ctl, b + R_PASS, i.passes);
    Atomics.store(ctl, b + R_POS, i.pos);
    Atomics.store(ctl, b + R_RNG_HI, i.rng.hi | 0);
    Atomics.store(ctl, b + R_RNG_LO, i.rng.lo | 0);
    Atomics.store(ctl, b + R_HALTED, i.halted ? 1 : 0);
    Atomics.store(ctl, b + R_VALID, 1);
  }

  loadRegs(): void {
    const ctl = this.ctl;
    const b = this.base;
    if (Atomics.load(ctl, b + R_VALID) === 0) return;
    const i = this.interp;
    i.passes = Atomics.load(ctl, b + R_PASS);
    i.pos = Atomics.load(ctl, b + R_POS);
    i.rng.hi = Atomics.load(ctl, b + R_RNG_HI) >>> 0;
    i.rng.lo = Atomics.load(ctl, b + R_RNG_LO) >>> 0;
    i.halted = Atomics.load(ctl, b + R_HALTED) !== 0;
    Atomics.store(ctl, b + V_PASSES, i.passes);
    Atomics.store(ctl, b + V_HALTED, i.halted ? 1 : 0);
  }
}
