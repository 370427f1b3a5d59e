// The soft engine's VM: memslots, host memory, the stage-2 table, dirty logging and vCPU
// threads behind the engine-neutral Vm interface (vmm/engine.ts).
//
// Threads: a SoftVm is owned by the VMM thread that created it; every method runs there. vCPU
// workers share its state through SharedArrayBuffers (see the files each part lives in).
// Memslot changes and their ordering rules live in memslot-commit.ts; dirty-log calls in
// dirty/dirty-log.ts; vCPU run control in vmm/run/ (shared with the kvm engine; the soft
// thread start and registers in vcpu/threads.ts). This file wires them together.

import {
  type Backing,
  type DirtyGfn,
  type HostMapping,
  type MemoryRegion,
  type MemslotInfo,
  type VcpuState,
  type Vm,
  type VmConfig,
  type VmStats,
} from '../vmm/engine.ts';
import { vcpuTrace, type WorkloadSpec } from '../guest/workload.ts';
import { HostMemory } from './hostmem/host-memory.ts';
import { HostAddressSpace } from './hostmm/host-address-space.ts';
import { MmuLock } from './locking/mmu-lock.ts';
import { Stage2PageTable } from './pgtable/stage2.ts';
import { fillMappingMap } from './pgtable/mapping-map.ts';
import { clearDirtyLog, getDirtyLog, DirtyLogError } from './dirty/dirty-log.ts';
import { VmMemslots, type MemslotMmu } from './memslot-commit.ts';
import { FaultHandler, type SlotSource } from './mmu/fault.ts';
import { SlotLookup, type SlotDesc } from './mmu/slot-table.ts';
import { G_FLUSH_GEN, newControlBlock } from './vcpu/control.ts';
import { S_FAST_RELAX, S_NOTIFIER_INVALIDATIONS, S_REMOTE_FLUSHES, S_WRITE_PROTECTED, VcpuStats } from './vcpu/stats.ts';
import { saveSoftState, startSoftVcpus, writeSoftArch } from './vcpu/threads.ts';
import { VmRunLoop } from '../vmm/run/vm-run.ts';
import { checkSoftVcpuArch } from './vcpu/arch-check.ts';
import { checkVcpuStateEnvelope } from '../vmm/vcpu-state.ts';
import { VmError } from '../vmm/errors.ts';
import { guestSegments } from '../vmm/guest-segments.ts';
import { resolveVmConfig } from '../vmm/vm-config.ts';
import { flushRemoteTlbs } from './vcpu/tlb-flush.ts';
import { VmDirtyRings } from './dirty/vm-rings.ts';
import { HugePageRecovery, type HugeRecoveryStrategy } from './huge/recovery.ts';
import type { StallSummary } from './locking/lock-stall.ts';
import type { MessagePort } from 'node:worker_threads';
import type { DemandPagingConfig } from '../vmm/demand-paging.ts';
import { DemandPagingError } from '../vmm/demand-paging.ts';
import { SoftDemandPager } from './uffd/pager.ts';
import { newSweepStats, type SweepStats } from './dirty/dirty-log.ts';
import { checkSweepChunk, DEFAULT_DIRTY_TUNING, DirtyTuningError, eagerSplitChunkPages, type DirtyLogTuning } from './dirty/dirty-tuning.ts';

export interface SoftVmOptions {
  /** Host RAM to model; default: sized at the first mapHostMemory (2x its size, at least 1 GiB). */
  hostRamBytes?: number;
  maxVcpus: number;
  /** Stage-2 walks check for freed table pages (slower; tests). */
  debug?: boolean;
  /** How huge mappings are re-formed when dirty logging stops (huge/recovery.ts); default 'in-place'. */
  recover?: HugeRecoveryStrategy;
  /** Dirty-log sweeps: chunking, eager split, INITIALLY_SET (dirty/dirty-tuning.ts). */
  dirtyLog?: DirtyLogTuningOptions;
}

/** What callers set (setDirtyLogTuning): the eager split chunk in BYTES (0: off). */
export interface DirtyLogTuningOptions {
  sweepChunkPages?: number;
  eagerSplitChunkBytes?: number;
  initiallySet?: boolean;
}

const BACKING_VMA = { anonymous: 'anonymous', anonymous_thp: 'anonymous_thp', hugetlb: 'hugetlb' } as const;

/** The soft engine throws the VMM's errors (vmm/errors.ts); the old name stays for callers. */
export { VmError as SoftVmError };

/** Host-side parts created once the VM knows how much memory it needs. */
interface HostParts {
  mem: HostMemory;
  mm: HostAddressSpace;
  pgt: Stage2PageTable;
}

export class SoftVm extends VmRunLoop implements Vm, MemslotMmu {
  readonly engine = 'soft' as const;
  readonly config: Readonly<Required<VmConfig>>;
  readonly lock: MmuLock;
  readonly ctl: Int32Array;
  readonly statsSab: SharedArrayBuffer;
  /** The VMM thread's stats line (index maxVcpus). */
  private readonly vmStats: VcpuStats;
  private readonly slots: VmMemslots;
  private host: HostParts | null = null;
  private spec: WorkloadSpec | null = null;
  private readonly mappings: HostMapping[] = [];
  private destroyed = false;
  private mainFaults: FaultHandler | null = null;
  /** KVM_CAP_DIRTY_LOG_RING (dirty/vm-rings.ts), or null: the VM logs to memslot bitmaps. */
  private readonly rings: VmDirtyRings | null = null;
  private recovery: HugePageRecovery | null = null;
  private recoverStrategy: HugeRecoveryStrategy;
  /** Demand paging (soft/uffd/): the pager while one runs, and each vCPU's attach port. */
  private pager: SoftDemandPager | null = null;
  private readonly uffdPorts: MessagePort[] = [];
  /** Read by dirty/dirty-log.ts and dirty-ring.ts (DirtyLogMmu); replaced whole by setDirtyLogTuning. */
  dirtyTuning: Readonly<DirtyLogTuning> = DEFAULT_DIRTY_TUNING;
  readonly sweepStats: SweepStats = newSweepStats();

  constructor(
    config: VmConfig,
    private readonly opts: SoftVmOptions,
  ) {
    super();
    this.config = resolveVmConfig(config, { manualDirtyLogProtect: true });
    if (this.config.dirtyRingEntries !== 0) this.rings = new VmDirtyRings(this.config.dirtyRingEntries, opts.maxVcpus);
    this.lock = MmuLock.create(this.config.lock);
    this.ctl = newControlBlock(opts.maxVcpus);
    this.statsSab = VcpuStats.newBuffer(opts.maxVcpus + 1);
    this.vmStats = new VcpuStats(this.statsSab, opts.maxVcpus);
    this.slots = new VmMemslots(this.ctl, () => this.vcpuCount, this, this.rings === null);
    this.recoverStrategy = opts.recover ?? 'in-place';
    if (opts.dirtyLog) this.setDirtyLogTuning(opts.dirtyLog);
    if (opts.hostRamBytes !== undefined) this.ensureHost(opts.hostRamBytes);
  }

  get vcpuCount(): number {
    return this.runControl?.count ?? 0;
  }

  // ---- host memory ----

  private ensureHost(bytes: number): HostParts {
    if (this.host) return this.host;
    const ramBytes = this.opts.hostRamBytes ?? Math.max(2 * bytes, 2 ** 30);
    const mem = HostMemory.create({ ramBytes });
    const mm = HostAddressSpace.create(mem);
    // Leaf tables for every host frame plus the levels above, room for MMIO and splits.
    const maxTablePages = Math.ceil(mem.totalFrames / 512) * 2 + 1024;
    const pgt = Stage2PageTable.create({
      maxTablePages,
      maxThreads: this.opts.maxVcpus + 4,
      debug: this.opts.debug ?? false,
      tlbFlush: () => this.flushRemoteTlbs(),
    });
    this.lock.onExclusiveUnlock = () => {
      pgt.reclaim();
    };
    // The W the vCPU write-protect fast path grants is counted in the stats lines (mmu/fault.ts).
    pgt.countWriteGrantsFrom(() => VcpuStats.total(this.statsSab, this.opts.maxVcpus + 1, S_FAST_RELAX));
    mm.addInvalidateNotifier((start, end) => this.onHostInvalidate(start, end));
    this.host = { mem, mm, pgt };
    const slots = this.slots;
    this.recovery = new HugePageRecovery({ lock: this.lock, pgt, mm, mem, inval: slots.inval, currentSlot: (id) => slots.desc(id), flushRemoteTlbs: () => this.flushRemoteTlbs() });
    this.recovery.strategy = this.recoverStrategy;
    return this.host;
  }

  private get h(): HostParts {
    if (!this.host) throw new VmError('state', 'no host memory yet: call mapHostMemory first');
    return this.host;
  }

  /** Debug accessors for tests and tools. */
  get hostMemory(): HostMemory {
    return this.h.mem;
  }

  get hostAddressSpace(): HostAddressSpace {
    return this.h.mm;
  }

  get stage2(): Stage2PageTable {
    return this.h.pgt;
  }

  mapHostMemory(bytes: number, backing: Backing): HostMapping {
    this.checkAlive();
    const { mm } = this.ensureHost(bytes);
    const kind = BACKING_VMA[backing];
    if (!kind) throw new VmError('config', `unknown backing '${backing}'`);
    const rounded = backing === 'hugetlb' ? Math.ceil(bytes / 2 ** 21) * 2 ** 21 : bytes;
    const mapped = this.mappings.reduce((a, m) => a + m.bytes, 0);
    const ramBytes = this.h.mem.stats().ramFrames * 4096;
    if (mapped + rounded > ramBytes) {
      throw new VmError('config', `mapHostMemory(${rounded}): the modelled host has ${ramBytes} bytes of RAM and ${mapped} are mapped; create the engine with a larger hostRamBytes`);
    }
    const hva = mm.mmap(rounded, kind);
    const m: HostMapping = { hva, bytes: rounded, backing };
    this.mappings.push(m);
    return m;
  }

  // ---- memslots ----

  setUserMemoryRegion(region: MemoryRegion): void {
    this.checkAlive();
    this.slots.apply(region);
  }

  memslots(): readonly MemslotInfo[] {
    return this.slots.set.toInfo();
  }

  // ---- MemslotMmu ----

  hasHost(): boolean {
    return this.host !== null;
  }

  hostWritable(hva: number): boolean {
    const vma = this.host?.mm.findVma(hva);
    return vma ? !vma.readonly : true;
  }

  countWriteProtected(pages: number): void {
    this.vmStats.add(S_WRITE_PROTECTED, pages);
  }

  loggingStopped(slot: SlotDesc): void {
    this.recovery?.loggingStopped(slot);
  }

  unmapGfns(gfn: number, npages: number): void {
    const { pgt } = this.h;
    this.lock.exclusiveLock();
    try {
      pgt.unmap(gfn, npages);
    } finally {
      this.lock.exclusiveUnlock();
    }
  }

  /** mmu notifier: host [start, end) is going away. */
  private onHostInvalidate(start: number, end: number): void {
    if (this.destroyed || !this.host || this.host.pgt.destroyed) return;
    this.vmStats.add(S_NOTIFIER_INVALIDATIONS, 1);
    this.slots.onHostInvalidate(start, end);
  }

  // ---- huge pages and stalls ----

  /** Choose how huge mappings are re-formed when logging stops (applies to later stops). */
  setHugeRecovery(strategy: HugeRecoveryStrategy, batchRegions?: number): void {
    this.recoverStrategy = strategy;
    if (this.recovery) this.recovery.strategy = strategy;
    if (batchRegions !== undefined) {
      if (!Number.isInteger(batchRegions) || batchRegions < 1) throw new VmError('config', `recovery batch must be a positive number of 2 MiB regions, got ${batchRegions}`);
      if (this.recovery) this.recovery.batchRegions = batchRegions;
    }
  }

  /** The recovery machinery (tests, benchmarks: idle(), stats, pendingRegions). */
  get hugeRecovery(): HugePageRecovery {
    if (!this.recovery) throw new VmError('state', 'no host memory yet: call mapHostMemory first');
    return this.recovery;
  }

  hugeRecoveryIdle(): Promise<void> {
    return this.recovery?.idle() ?? Promise.resolve();
  }

  /** How long vCPU faults waited for the MMU lock since the last reset (locking/lock-stall.ts). */
  lockStalls(): StallSummary {
    return this.lock.stalls!.summary();
  }

  resetLockStalls(): void {
    this.lock.stalls!.reset();
  }

  /**
   * Dirty-log sweeps (issue 11 parts 2-4): lock-dropping chunk, eager split when logging starts
   * (chunk in bytes, 0 = off), KVM_DIRTY_LOG_INITIALLY_SET. Unset fields keep their value.
   * Applies to later enables / harvests.
   */
  setDirtyLogTuning(o: DirtyLogTuningOptions): void {
    const t = { ...this.dirtyTuning };
    try {
      if (o.sweepChunkPages !== undefined) t.sweepChunkPages = checkSweepChunk(o.sweepChunkPages);
      if (o.eagerSplitChunkBytes !== undefined) t.eagerSplitChunkPages = o.eagerSplitChunkBytes === 0 ? 0 : eagerSplitChunkPages(o.eagerSplitChunkBytes);
    } catch (e) {
      if (e instanceof DirtyTuningError) throw new VmError('config', e.message);
      throw e;
    }
    if (o.initiallySet !== undefined) {
      // KVM: KVM_DIRTY_LOG_INITIALLY_SET is a flag of KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, for bitmaps.
      if (o.initiallySet && !this.config.manualDirtyLogProtect) throw new VmError('config', 'KVM_DIRTY_LOG_INITIALLY_SET needs manual dirty-log protect');
      if (o.initiallySet && this.rings !== null) throw new VmError('config', 'KVM_DIRTY_LOG_INITIALLY_SET applies to dirty bitmaps; this VM logs to dirty rings');
      t.initiallySet = o.initiallySet;
    }
    this.dirtyTuning = Object.freeze(t);
  }

  // ---- DirtyLogMmu ----

  splitHugePages(gfn: number, npages: number): number {
    return this.h.pgt.splitHugePages(gfn, npages, false);
  }

  writeProtect(gfn: number, npages: number): void {
    this.h.pgt.writeProtect(gfn, npages, false);
  }

  flushRemoteTlbs(): void {
    this.vmStats.add(S_REMOTE_FLUSHES, 1);
    flushRemoteTlbs(this.ctl, this.vcpuCount, -1);
  }

  // ---- dirty log ----

  private loggingSlot(slot: number): SlotDesc {
    const d = this.slots.desc(slot);
    if (!d) throw new DirtyLogError('ENOENT', `no memslot ${slot}`);
    return d;
  }

  /** With a dirty ring there is no bitmap to get or clear (kvm_use_dirty_bitmap: ENXIO). */
  private requireBitmaps(call: string): void {
    if (this.rings !== null) throw new DirtyLogError('ENXIO', `${call}: this VM logs dirty pages to its dirty rings (harvestDirtyRings), not to bitmaps`);
  }

  getDirtyLog(slot: number): Uint32Array {
    this.checkAlive();
    this.requireBitmaps('KVM_GET_DIRTY_LOG');
    const d = this.loggingSlot(slot);
    if (!this.host) return new Uint32Array(0);
    const r = getDirtyLog(this, d, this.config.manualDirtyLogProtect);
    this.vmStats.add(S_WRITE_PROTECTED, r.protectedPages);
    return r.bitmap;
  }

  clearDirtyLog(slot: number, firstPage: number, numPages: number, bitmap: Uint32Array): void {
    this.checkAlive();
    this.requireBitmaps('KVM_CLEAR_DIRTY_LOG');
    if (!this.config.manualDirtyLogProtect) throw new DirtyLogError('EINVAL', 'KVM_CLEAR_DIRTY_LOG needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2');
    const d = this.loggingSlot(slot);
    const n = clearDirtyLog(this, d, firstPage, numPages, bitmap);
    this.vmStats.add(S_WRITE_PROTECTED, n);
  }

  // ---- dirty rings ----

  /** Collect + reset every ring (harvestDirtyRings), or one vCPU's (its DIRTY_RING_FULL exit). */
  private drainRings(onlyVcpu?: number): void {
    this.vmStats.add(S_WRITE_PROTECTED, this.rings!.drain((id) => this.slots.desc(id), this.host ? this : null, onlyVcpu));
  }

  harvestDirtyRings(): DirtyGfn[] {
    this.checkAlive();
    if (this.rings === null) throw new VmError('state', 'harvestDirtyRings: VM created without dirtyRingEntries');
    this.drainRings();
    return this.rings.takePending();
  }

  // ---- guest memory through the VMM's mapping ----

  readGuest(gpa: number, dst: Uint8Array): void {
    const { mm } = this.h;
    // A missing page is fetched (or waited for), never read as zeros.
    if (this.pager?.active) this.pager.faultIn(gpa, dst.length);
    for (const g of guestSegments(this.slots.set, gpa, dst.length)) mm.read(g.hva, dst.subarray(g.done, g.done + g.bytes));
  }

  writeGuest(gpa: number, src: Uint8Array): void {
    const { mm } = this.h;
    // The VMM's writes ignore the uffd registration: fault the page in first, or the rest of
    // it would be zeros and its waiters never woken.
    if (this.pager?.active) this.pager.faultIn(gpa, src.length);
    for (const g of guestSegments(this.slots.set, gpa, src.length)) mm.write(g.hva, src.subarray(g.done, g.done + g.bytes));
  }

  // ---- vCPUs ----

  async createVcpus(count: number, workload: WorkloadSpec): Promise<void> {
    this.checkAlive();
    if (this.spec) throw new VmError('state', 'vCPUs were already created');
    if (!Number.isInteger(count) || count < 1 || count > this.opts.maxVcpus) throw new VmError('config', `vCPU count must be 1..${this.opts.maxVcpus}, got ${count}`);
    // A trace the workload replays must load here (its digest checked) before any thread does:
    // a missing or different file is the caller's error, not a vCPU thread's crash.
    if (workload.kind === 'trace') for (let v = 0; v < Math.min(count, workload.traces.length); v++) vcpuTrace(workload, v);
    const { mem, mm, pgt } = this.ensureHost(count * workload.bytesPerVcpu);
    this.spec = workload;
    this.runControl = await startSoftVcpus(
      this.ctl,
      count,
      workload,
      {
        ctl: this.ctl.buffer as SharedArrayBuffer,
        stats: this.statsSab,
        mem: mem.shared,
        mm: mm.shared,
        pgt: pgt.shared,
        lock: this.lock.shared,
        inval: this.slots.inval.sab,
        dirtyRings: this.rings?.shared() ?? null,
      },
      this.slots.publisher,
      { kick: () => this.pager?.kick(), uffdPorts: this.uffdPorts },
    );
    // KVM_EXIT_DIRTY_RING_FULL: harvest on the VMM thread, then the vCPU re-enters.
    if (this.rings !== null) this.runControl.onExit('dirtyRingFull', (x) => this.drainRings(x.vcpu));
  }

  // ---- demand paging (vmm/demand-paging.ts; the model is soft/uffd/) ----

  startDemandPaging(config: DemandPagingConfig): SoftDemandPager {
    this.checkAlive();
    if (this.pager?.active) throw new DemandPagingError('demand paging is already running on this VM: finish() it first');
    if (!this.runControl) throw new DemandPagingError('startDemandPaging needs the vCPUs: call createVcpus first');
    const { mm, mem } = this.h;
    this.pager = new SoftDemandPager(
      {
        mm,
        mem,
        vcpus: this.vcpuCount,
        ports: this.uffdPorts,
        memslots: () => this.memslots().filter((m) => !m.internal),
        // Not this.setUserMemoryRegion: finish() also runs inside destroy().
        setUserMemoryRegion: (r) => this.slots.apply(r),
      },
      config,
    );
    return this.pager;
  }

  saveVcpuState(vcpu: number): VcpuState {
    this.requireStopped(vcpu, 'saveVcpuState');
    return saveSoftState(this.ctl, vcpu);
  }

  loadVcpuState(state: VcpuState): void {
    const rc = this.rc;
    if (state.engine !== 'soft') throw new VmError('config', `loadVcpuState: state from a '${state.engine}' vCPU cannot load into the soft engine`);
    this.requireStopped(state.vcpu, 'loadVcpuState');
    // Every field is checked before any register is written (VcpuStateError names the field).
    checkVcpuStateEnvelope(state, 'soft', rc.count);
    writeSoftArch(this.ctl, state.vcpu, checkSoftVcpuArch(state, this.spec!));
  }

  // ---- stats ----

  stats(): VmStats {
    const out: VmStats = { ...VcpuStats.sum(this.statsSab, this.opts.maxVcpus + 1), ...this.exitStats() };
    // Counted where entries change (pgtable/mapping-counters.ts), not walked.
    const m = this.host ? this.host.pgt.mappingCounts() : null;
    out.pages_4k = m?.leaves4k ?? 0;
    out.pages_2m = m?.leaves2m ?? 0;
    out.pages_1g = m?.leaves1g ?? 0;
    out.writableLeaves = m?.writableLeaves ?? 0;
    out.deviceLeaves = m?.deviceLeaves ?? 0;
    out.tablePages = this.host ? this.host.pgt.liveTablePages() : 0;
    if (this.host && typeof this.host.pgt.stats === 'function') {
      const ps = this.host.pgt.stats();
      out.pgtableBreaks = ps.breaks;
      out.pgtableBlockSplits = ps.blockSplits;
      out.pgtableCollapses = ps.collapses;
      out.pgtableTablesRetired = ps.tablesRetired;
      out.pgtableMapEagain = ps.mapEagain;
    }
    out.tlbFlushGeneration = Atomics.load(this.ctl, G_FLUSH_GEN);
    out.memslotGeneration = this.slots.publisher.current.gen;
    this.rings?.addStats(out);
    if (this.recovery) {
      const r = this.recovery.stats;
      out.hugeRecoveredInPlace = r.collapsedInPlace;
      out.hugeRecoveryZapped = r.zapped;
      out.hugeRecoveryBatches = r.batches;
      out.hugeRecoveryPendingRegions = this.recovery.pendingRegions;
    }
    const sw = this.sweepStats;
    out.dirtySweepLockBreaks = sw.breaks;
    out.dirtySweepMaxHoldSeconds = sw.maxHoldSeconds;
    out.eagerSplitBlocks = sw.eagerSplitBlocks;
    out.dirtyLogEnableSeconds = sw.lastEnableSeconds;
    const st = this.lock.stalls!.summary();
    out.lockStallWaits = st.waits;
    out.lockStallMaxSeconds = st.maxSeconds;
    out.lockStallSumSeconds = st.sumSeconds;
    return out;
  }

  mappingMap(gpa: number, bytes: number): Uint8Array {
    if (gpa % 2 ** 21 !== 0) throw new VmError('config', `mappingMap: gpa 0x${gpa.toString(16)} is not 2 MiB aligned`);
    if (!(bytes >= 0) || !Number.isSafeInteger(bytes)) throw new VmError('config', `mappingMap: ${bytes} is not a byte count`);
    const out = new Uint8Array(Math.ceil(bytes / 2 ** 21));
    // Before the first memslot there is no table: nothing is mapped.
    if (this.host && !this.host.pgt.destroyed) fillMappingMap(this.host.pgt, gpa / 4096, out);
    return out;
  }

  /** A fault handler on the VMM thread (tests construct races with its hooks). */
  mainThreadFaultHandler(): FaultHandler {
    if (this.mainFaults) return this.mainFaults;
    const { mem, mm, pgt } = this.h;
    const lookup = new SlotLookup();
    const pub = this.slots.publisher;
    const src: SlotSource = {
      readLock: () => {
        lookup.set(pub.current.slots);
        return lookup;
      },
      readUnlock: () => {},
      // The VMM thread publishes generations itself, never while it uses one of them.
      stale: () => false,
      peek: () => {
        lookup.set(pub.current.slots);
        return lookup;
      },
    };
    const sink = this.rings?.vmmProducer();
    this.mainFaults = new FaultHandler(mem, mm, pgt, this.lock, src, this.slots.inval, this.vmStats, sink);
    return this.mainFaults;
  }

  // ---- teardown ----

  private checkAlive(): void {
    if (this.destroyed) throw new VmError('state', 'VM was destroyed');
  }

  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    // First: no recovery batch may start once teardown has begun.
    this.recovery?.cancel();
    try {
      await this.runControl?.stop();
    } finally {
      // After the vCPUs (a stop wakes those asleep on a page), before the memslots go.
      await this.pager?.close();
      for (const p of this.uffdPorts) p.close();
      this.slots.close();
      if (this.host) {
        const { mm, pgt } = this.host;
        this.lock.onExclusiveUnlock = undefined;
        this.lock.exclusiveLock();
        try {
          if (!pgt.destroyed) pgt.destroy();
        } finally {
          this.lock.exclusiveUnlock();
          // Host memory goes even if the table could not be torn down (a crashed vCPU thread
          // left its RCU read section open): nothing maps it once the VM is gone.
          for (const m of this.mappings) mm.munmap(m.hva, m.bytes);
          this.mappings.length = 0;
        }
      }
    }
  }
}

export { VcpuError } from '../vmm/errors.ts';
