// A kvm engine VM: memslots, guest memory, vCPU workers, dirty logging, vCPU state.
//
// Threading: a KvmVm is used from the VMM thread that created it (engine.ts contract). vCPU
// workers share with it only the control block (control.ts), their kvm_run mappings and the
// guest memory that the guest itself writes; their rules are in control.ts and vcpu-worker.ts.
import {
  MemslotError, PAGE_SIZE, type Backing, type DirtyGfn, type HostMapping, type MemoryRegion,
  type MemslotInfo, type VcpuState, type Vm, type VmConfig, type VmStats,
} from '../vmm/engine.ts';
import { newBitmap } from '../vmm/dirty-bitmap.ts';
import { pagesPerVcpu, type WorkloadSpec } from '../guest/workload.ts';
import { isSysError, type AddonBacking, type KvmAddon } from './addon.ts';
import { CAP, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET, encodeEnableCap, encodeMemoryRegion } from './abi.ts';
import { kvmRunMicros } from './control.ts';
import { startKvmVcpus, type RunnerVcpu } from './vcpu-runner.ts';
import { VmRunLoop } from '../vmm/run/vm-run.ts';
import { BinaryStats } from './binary-stats.ts';
import { DIRTY_GFN_BYTES, DIRTY_GFN_WORDS, DirtyRingCollector, dirtyRingSizeProblem } from '../vmm/dirty-ring.ts';
import { INTERNAL_SLOT } from './guest/layout.ts';
import { setUpGuest } from './guest-setup.ts';
import { checkKvmArchState, loadArchState, probeMsrs, saveArchState, type VcpuStateFeatures } from './vcpu-state.ts';
import { checkVcpuStateEnvelope } from '../vmm/vcpu-state.ts';
import { VmError } from '../vmm/errors.ts';
import { guestSegments } from '../vmm/guest-segments.ts';
import { resolveVmConfig } from '../vmm/vm-config.ts';
import { MemslotTable } from './memslot-table.ts';
import type { KvmEngine } from './engine.ts';
import type { DemandPager, DemandPagingConfig } from '../vmm/demand-paging.ts';
import { DemandPagingError } from '../vmm/demand-paging.ts';
import { KvmDemandPager, startKvmDemandPaging } from './demand-pager.ts';

interface Mapping extends HostMapping {
  buffer: SharedArrayBuffer;
}

interface Vcpu extends RunnerVcpu {
  ring: DirtyRingCollector | null;
}

export class KvmVm extends VmRunLoop implements Vm {
  readonly engine = 'kvm' as const;
  private readonly addon: KvmAddon;
  private readonly mappings: Mapping[] = [];
  private readonly slots: MemslotTable;
  private vcpus: Vcpu[] = [];
  private features: VcpuStateFeatures | null = null;
  private destroyed = false;
  private readonly pendingRing: DirtyGfn[] = [];
  private ringMaxBatch = 0;
  private ringResets = 0;
  private readonly stats_: BinaryStats | null;
  private pager: KvmDemandPager | null = null;

  private constructor(
    private readonly kvm: KvmEngine,
    private readonly vmFd: number,
    readonly config: Readonly<Required<VmConfig>>,
    private readonly irqchip: boolean,
  ) {
    super();
    this.addon = kvm.addon;
    this.slots = new MemslotTable({ maxSlots: kvm.checkExtension(CAP.NR_MEMSLOTS), readonlySupported: kvm.checkExtension(CAP.READONLY_MEM) > 0, exitOnMissingSupported: false });
    let stats: BinaryStats | null = null;
    try {
      if (kvm.checkExtension(CAP.BINARY_STATS_FD) > 0) stats = new BinaryStats(this.addon.ioctl(vmFd, 'KVM_GET_STATS_FD', 0));
    } catch {
      stats = null;
    }
    this.stats_ = stats;
  }

  static async create(kvm: KvmEngine, config: VmConfig): Promise<KvmVm> {
    const caps = kvm.capabilities();
    const full = resolveVmConfig(config, caps);
    if (full.manualDirtyLogProtect && !caps.manualDirtyLogProtect) throw new VmError('config', 'KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 missing on this host');
    const ringEntries = full.dirtyRingEntries;
    const ringProblem = ringEntries > 0 ? dirtyRingSizeProblem(ringEntries, caps.dirtyRingMaxEntries) : null;
    if (ringProblem !== null) throw new VmError('config', ringProblem);
    const a = kvm.addon;
    const vmFd = a.ioctl(kvm.kvmFd, 'KVM_CREATE_VM', 0);
    try {
      // Where VMX keeps its real-mode TSS (QEMU's choice); below the 4 GiB hole, clear of our slots.
      if (kvm.checkExtension(CAP.SET_TSS_ADDR) > 0) a.ioctl(vmFd, 'KVM_SET_TSS_ADDR', 0xfffbd000);
      let irqchip = false;
      if (kvm.checkExtension(CAP.IRQCHIP) > 0) {
        a.ioctl(vmFd, 'KVM_CREATE_IRQCHIP', 0);
        irqchip = true;
      }
      if (full.manualDirtyLogProtect) a.ioctl(vmFd, 'KVM_ENABLE_CAP', encodeEnableCap(CAP.MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE));
      if (ringEntries > 0) {
        const cap = kvm.checkExtension(CAP.DIRTY_LOG_RING_ACQ_REL) > 0 ? CAP.DIRTY_LOG_RING_ACQ_REL : CAP.DIRTY_LOG_RING;
        a.ioctl(vmFd, 'KVM_ENABLE_CAP', encodeEnableCap(cap, ringEntries * DIRTY_GFN_BYTES));
      }
      return new KvmVm(kvm, vmFd, full, irqchip);
    } catch (e) {
      a.close(vmFd);
      throw e;
    }
  }

  get vcpuCount(): number {
    return this.vcpus.length;
  }

  mapHostMemory(bytes: number, backing: Backing): HostMapping {
    const { hva, backing: b } = this.map(bytes, backing);
    return { hva, bytes, backing: b };
  }

  private map(bytes: number, backing: AddonBacking): Mapping {
    if (bytes <= 0 || bytes % PAGE_SIZE !== 0) throw new RangeError(`mapHostMemory: ${bytes} bytes is not a positive multiple of ${PAGE_SIZE}`);
    let mapped: { hva: number; buffer: SharedArrayBuffer };
    try {
      mapped = this.addon.mmapGuest(bytes, backing);
    } catch (e) {
      if (backing === 'hugetlb' && isSysError(e) && e.code === 'ENOMEM') {
        throw new Error(`${e.message}: not enough free 2 MiB hugetlb pages for ${bytes} bytes (reserve them with /proc/sys/vm/nr_hugepages)`);
      }
      throw e;
    }
    const { hva, buffer } = mapped;
    const m: Mapping = { hva, bytes, backing: backing === 'memfd' ? 'anonymous' : backing, buffer };
    this.mappings.push(m);
    return m;
  }

  setUserMemoryRegion(region: MemoryRegion): void {
    if (region.slot === INTERNAL_SLOT) throw new MemslotError('slot', `slot ${INTERNAL_SLOT} is the kvm engine's own memslot`);
    this.applyRegion(region, false);
  }

  private applyRegion(region: MemoryRegion, internal: boolean): void {
    const commit = this.slots.validate(region, internal);
    if (region.memorySize !== 0 && !this.mappingOf(region.userspaceAddr, region.memorySize)) {
      throw new MemslotError('hva', `slot ${region.slot}: [0x${region.userspaceAddr.toString(16)}, +0x${region.memorySize.toString(16)}) is not inside one mapping from mapHostMemory`);
    }
    this.addon.ioctl(this.vmFd, 'KVM_SET_USER_MEMORY_REGION', encodeMemoryRegion(region));
    commit();
  }

  memslots(): readonly MemslotInfo[] {
    return this.slots.list();
  }

  private mappingOf(hva: number, bytes: number): Mapping | undefined {
    return this.mappings.find((m) => hva >= m.hva && hva + bytes <= m.hva + m.bytes);
  }

  async createVcpus(count: number, spec: WorkloadSpec): Promise<void> {
    if (this.vcpus.length > 0) throw new VmError('state', 'createVcpus: vCPUs already created');
    if (count < 1) throw new VmError('config', 'createVcpus: count must be >= 1');
    if (spec.kind === 'dirty-rate') throw new VmError('config', "createVcpus: the 'dirty-rate' workload runs on the soft engine only (the kvm guest has no clock to pace itself by)");
    if (spec.kind === 'trace') throw new VmError('config', "createVcpus: the 'trace' workload runs on the soft engine only (the kvm guest has no clock to pace epochs by, and no code generator for a data-driven page list yet)");
    if (pagesPerVcpu(spec) >= 2 ** 32) throw new RangeError('createVcpus: a slice must have fewer than 2^32 pages');
    const a = this.addon;
    const guest = setUpGuest(count, spec, this.config.guestPageSize, this.kvm.guestCpl, (bytes) => this.map(bytes, 'anonymous_thp'));
    this.applyRegion(guest.region, true);
    const runBytes = a.ioctl(this.kvm.kvmFd, 'KVM_GET_VCPU_MMAP_SIZE', 0);
    const cpuid = supportedCpuid(a, this.kvm.kvmFd);
    for (let v = 0; v < count; v++) {
      const fd = a.ioctl(this.vmFd, 'KVM_CREATE_VCPU', v);
      const run = a.mmapFd(fd, 0, runBytes);
      const ringMap = this.config.dirtyRingEntries > 0 ? a.mmapFd(fd, KVM_DIRTY_LOG_PAGE_OFFSET, this.config.dirtyRingEntries * DIRTY_GFN_BYTES) : null;
      this.vcpus.push({ fd, run, ring: ringMap ? new DirtyRingCollector(new Int32Array(ringMap), ringMap.byteLength / (DIRTY_GFN_WORDS * 4), this.vcpus.length) : null });
      a.ioctl(fd, 'KVM_SET_CPUID2', cpuid);
      guest.initVcpu(a, fd, v);
    }
    const xsave2 = this.kvm.checkExtension(CAP.XSAVE2);
    this.features = {
      xsaveBytes: xsave2 > 4096 ? xsave2 : this.kvm.checkExtension(CAP.XSAVE) > 0 ? 4096 : 0,
      xcrs: this.kvm.checkExtension(CAP.XCRS) > 0,
      lapic: this.irqchip,
      debugregs: this.kvm.checkExtension(CAP.DEBUGREGS) > 0,
      msrIndices: probeMsrs(a, this.vcpus[0]!.fd),
    };
    // One throw-away save while no vCPU runs yet: the first save in a process costs ~0.5 ms
    // more than later ones (cold code), and the real one sits on a migration's downtime path.
    saveArchState(a, this.vcpus[0]!.fd, this.features);
    this.runControl = await startKvmVcpus(a, this.vcpus, spec.kind === 'idle');
    // KVM_EXIT_DIRTY_RING_FULL: harvest on the VMM thread, then the vCPU re-enters.
    if (this.config.dirtyRingEntries > 0) this.runControl.onExit('dirtyRingFull', (x) => this.drainRings(x.vcpu));
  }

  private slotPages(slot: number): number {
    const s = this.slots.get(slot);
    if (!s) throw new MemslotError('unknown-slot', `slot ${slot} does not exist`);
    return s.pages;
  }

  getDirtyLog(slot: number): Uint32Array {
    const bitmap = newBitmap(this.slotPages(slot));
    this.addon.dirtyLog(this.vmFd, false, slot, 0, 0, bitmap);
    return bitmap;
  }

  clearDirtyLog(slot: number, firstPage: number, numPages: number, bitmap: Uint32Array): void {
    this.slotPages(slot);
    this.addon.dirtyLog(this.vmFd, true, slot, firstPage, numPages, bitmap);
  }

  /** Collect every vCPU's ring (or only `onlyVcpu`'s, its DIRTY_RING_FULL exit), then reset. */
  private drainRings(onlyVcpu?: number): void {
    for (const vc of onlyVcpu === undefined ? this.vcpus : [this.vcpus[onlyVcpu]!]) {
      // KVM promises a vCPU exits once its ring holds soft_limit = size - 64 (or fewer)
      // entries; the largest batch seen shows whether the host kept that promise.
      const n = vc.ring?.collect(this.pendingRing) ?? 0;
      this.ringMaxBatch = Math.max(this.ringMaxBatch, n);
    }
    this.addon.ioctl(this.vmFd, 'KVM_RESET_DIRTY_RINGS', 0);
    this.ringResets++;
  }

  harvestDirtyRings(): DirtyGfn[] {
    if (this.config.dirtyRingEntries === 0) throw new VmError('state', 'harvestDirtyRings: VM created without dirtyRingEntries');
    this.drainRings();
    return this.pendingRing.splice(0);
  }

  /** The host view of one piece of a guest range (guest-segments.ts cuts it at memslot ends). */
  private hostView(hva: number, bytes: number): Uint8Array {
    const m = this.mappingOf(hva, bytes)!;
    return new Uint8Array(m.buffer, hva - m.hva, bytes);
  }

  /** Demand paging on the host's real userfaultfd (demand-pager.ts); path 'exit' is refused there. */
  startDemandPaging(config: DemandPagingConfig): DemandPager {
    if (this.destroyed) throw new VmError('state', 'startDemandPaging: VM destroyed');
    if (this.pager?.active) throw new DemandPagingError('startDemandPaging: demand paging is already on (finish() it first)');
    if (this.vcpus.length === 0) throw new DemandPagingError('startDemandPaging: create the vCPUs first (readers name the vCPU that faulted by its thread)');
    const slots = this.slots.list().filter((s) => !s.internal && s.memorySize > 0).map((s) => {
      const m = this.mappingOf(s.userspaceAddr, s.memorySize)!;
      return { slot: s.slot, gpa: s.guestPhysAddr, hva: s.userspaceAddr, bytes: s.memorySize, backing: m.backing };
    });
    const pager = startKvmDemandPaging(
      { slots, vcpuCount: this.vcpus.length, vcpuThreadIds: () => this.vcpuThreadIds(), memoryFaultInfo: this.kvm.checkExtension(CAP.MEMORY_FAULT_INFO) > 0 },
      config,
    );
    this.pager = pager;
    return pager;
  }

  readGuest(gpa: number, dst: Uint8Array): void {
    if (this.pager?.active) this.pager.checkHostAccess(gpa, dst.length, 'readGuest');
    for (const g of guestSegments(this.slots.set, gpa, dst.length)) dst.set(this.hostView(g.hva, g.bytes), g.done);
  }

  writeGuest(gpa: number, src: Uint8Array): void {
    if (this.pager?.active) this.pager.checkHostAccess(gpa, src.length, 'writeGuest');
    for (const g of guestSegments(this.slots.set, gpa, src.length)) this.hostView(g.hva, g.bytes).set(src.subarray(g.done, g.done + g.bytes));
  }

  saveVcpuState(vcpu: number): VcpuState {
    this.requireStopped(vcpu, 'saveVcpuState');
    const arch = saveArchState(this.addon, this.vcpus[vcpu]!.fd, this.features!);
    return { engine: 'kvm', vcpu, progress: this.rc.progress()[vcpu]!, arch };
  }

  loadVcpuState(state: VcpuState): void {
    this.requireStopped(state.vcpu, 'loadVcpuState');
    // Every field is checked before the first KVM_SET_* (VcpuStateError names the field).
    checkVcpuStateEnvelope(state, 'kvm', this.vcpus.length);
    const arch = checkKvmArchState(state, this.features!);
    loadArchState(this.addon, this.vcpus[state.vcpu]!.fd, this.features!, arch);
    this.rc.setProgress(state.vcpu, state.progress);
  }

  stats(): VmStats {
    const out: VmStats = { ...(this.stats_ ? this.stats_.read() : {}), ...this.exitStats() };
    const rc = this.runControl;
    // Summed over vCPU threads: time spent inside KVM_RUN (guest + KVM), not in the VMM.
    out.kvmRunMicros = rc ? this.vcpus.reduce((t, _, v) => t + kvmRunMicros(rc.ctl, v), 0) : 0;
    out.guestCpl = this.kvm.guestCpl;
    out.passesCompleted = this.progress().reduce((t, p) => t + p.passesCompleted, 0);
    if (this.config.dirtyRingEntries > 0) {
      out.dirtyRingResets = this.ringResets;
      out.dirtyRingMaxEntriesPerHarvest = this.ringMaxBatch;
    }
    return out;
  }

  async destroy(): Promise<void> {
    if (this.destroyed) return;
    this.destroyed = true;
    // Before stopping: closing the uffds wakes any vCPU still waiting for a page in KVM_RUN.
    if (this.pager?.active) {
      try {
        this.pager.finish();
      } catch {
        /* the VM is going away; the pager's own failure is of no use now */
      }
    }
    await this.runControl?.stop();
    for (const vc of this.vcpus) this.addon.close(vc.fd);
    this.stats_?.close();
    this.addon.close(this.vmFd);
    for (const m of this.mappings) this.addon.releaseGuest(m.hva, m.bytes);
    this.mappings.length = 0;
    this.vcpus = [];
  }
}

/** KVM_GET_SUPPORTED_CPUID as a struct kvm_cpuid2 ready for KVM_SET_CPUID2. */
function supportedCpuid(a: KvmAddon, kvmFd: number): Uint8Array {
  for (let nent = 128; ; nent *= 2) {
    const buf = new Uint8Array(8 + 40 * nent);
    new DataView(buf.buffer).setUint32(0, nent, true);
    const r = a.ioctl(kvmFd, 'KVM_GET_SUPPORTED_CPUID', buf, [7 /* E2BIG */]);
    if (r >= 0) return buf;
    if (nent > 4096) throw new Error('KVM_GET_SUPPORTED_CPUID: too many entries');
  }
}
