// INTERIM: a DemandPager (vmm/demand-paging.ts) run by the VMM, fault path 'exit' only, over the
// soft engine's modelled host address space (`hostAddressSpace`, a debug accessor). The soft
// engine's own pager (Vm.startDemandPaging, src/soft/uffd/) is merged, but under post-copy it
// kills vCPU threads: its bounded request mailbox overflows when requested pages arrive by push
// while the main thread is busy (test/migration/postcopy/soft-pager-mailbox.test.ts pins it).
// postcopy/paging.ts uses this pager for the soft engine until that test flips; then delete it.
//   - guest RAM memslots get stage2's KVM_MEM_EXIT_ON_MISSING: a vCPU touching a host page that
//     is not populated leaves the guest with MEMORY_FAULT;
//   - vm.onExit('memoryFault') handles the exit on the main thread: one request per page (the
//     first toucher's), every other toucher waits on the same promise;
//   - discard() is the host's MADV_DONTNEED (zapRange: the mmu notifier unmaps stage-2 first);
//   - install() is the host's UFFDIO_COPY (uffdCopy): the page is written into a fresh frame and
//     only then published, so no vCPU ever sees it half written, and a populated page is never
//     overwritten (EEXIST).
//
// Pre-copy pages go straight into guest RAM. (An earlier version kept them in a staging copy
// until post-copy started, because it could not drop a page: a migration that then completed by
// pre-copy started the guest on empty RAM while readGuest still served the staging copy, so the
// guest's writes were invisible and the hash "verified" the stale copy. Nothing is staged now.)
//
// Missing = not populated in the host at start() (after the destination's discards). Nothing
// else populates guest RAM meanwhile: the exit path never allocates (it exits first), and the
// destination writes guest RAM only through install().
//
// Concurrency: main thread only. vCPU threads reach it only through MEMORY_FAULT exits, which
// the run loop hands to this thread (vm.onExit); the missing bitmap is a plain array read and
// written here alone. The host page tables it changes are shared with the vCPU threads and are
// changed only by their own atomic operations (zapRange under the mmu notifier, uffdCopy's cmpxchg).
import { KVM_MEM_EXIT_ON_MISSING, PAGE_SIZE, type MemslotInfo, type Vm } from '../../vmm/engine.ts';
import { DemandPagingError, type DemandPager, type DemandPagingConfig, type DemandPagingStats, type InstallResult, type PageRequest, type VcpuPageWaits } from '../../vmm/demand-paging.ts';
import type { PostedExit } from '../../vmm/run/exits.ts';

/** The modelled host's calls this pager needs (soft engine, hostmm/host-address-space.ts). */
interface HostPages {
  lookupPfn(hva: number): number;
  zapRange(hva: number, bytes: number): void;
  uffdCopy(hva: number, src: Uint8Array): number;
}

const EEXIST = -17;

function hostPagesOf(vm: Vm): HostPages | null {
  let h: unknown;
  try {
    h = (vm as unknown as { hostAddressSpace?: unknown }).hostAddressSpace;
  } catch {
    return null; // no host memory yet
  }
  const c = h as Partial<HostPages> | undefined;
  return c && typeof c.lookupPfn === 'function' && typeof c.zapRange === 'function' && typeof c.uffdCopy === 'function' ? (c as HostPages) : null;
}

/** The interim pager for `vm`, or null when its engine exposes no modelled host address space. */
export function interimExitPager(vm: Vm, config: DemandPagingConfig): DemandPager | null {
  const host = hostPagesOf(vm);
  return host ? new InterimExitPager(vm, host, config) : null;
}

const percentile = (sorted: number[], q: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]! : 0);

class InterimExitPager implements DemandPager {
  readonly config: Readonly<DemandPagingConfig>;
  private readonly slots: MemslotInfo[];
  private readonly missing = new Map<number, Uint8Array>();
  private missingPages = 0;
  private handler: ((r: PageRequest) => void) | null = null;
  private readonly waiters = new Map<number, { promise: Promise<void>; resolve: () => void }>();
  private readonly waitSeconds = new Map<number, number[]>();
  private readonly s: DemandPagingStats = { faults: 0, requests: 0, installed: 0, duplicates: 0, missing: 0 };
  private finished = false;

  constructor(
    private readonly vm: Vm,
    private readonly host: HostPages,
    config: DemandPagingConfig,
  ) {
    if (config.path !== 'exit') throw new DemandPagingError(`the interim pager (migration/postcopy/interim-exit-pager.ts) has fault path 'exit' only, not '${config.path}'`);
    if (config.mode !== 'missing') throw new DemandPagingError(`the interim pager resolves MISSING faults only, not '${config.mode}'`);
    if (config.localSource) throw new DemandPagingError('the interim pager serves post-copy only (no localSource)');
    this.config = { ...config };
    this.slots = vm.memslots().filter((s) => !s.internal);
    for (const s of this.slots) {
      const m = new Uint8Array(s.pages);
      for (let p = 0; p < s.pages; p++) {
        if (host.lookupPfn(s.userspaceAddr + p * PAGE_SIZE) < 0) {
          m[p] = 1;
          this.missingPages++;
        }
      }
      this.missing.set(s.slot, m);
      vm.setUserMemoryRegion({ slot: s.slot, flags: s.flags | KVM_MEM_EXIT_ON_MISSING, guestPhysAddr: s.guestPhysAddr, memorySize: s.memorySize, userspaceAddr: s.userspaceAddr });
    }
    vm.onExit('memoryFault', (x) => this.onFault(x));
  }

  private locate(gpa: number): { slot: MemslotInfo; page: number } | null {
    for (const slot of this.slots) {
      const off = gpa - slot.guestPhysAddr;
      if (off >= 0 && off < slot.memorySize) return { slot, page: Math.floor(off / PAGE_SIZE) };
    }
    return null;
  }

  private slotOf(slot: number, what: string): { info: MemslotInfo; m: Uint8Array } {
    const m = this.missing.get(slot);
    const info = this.slots.find((x) => x.slot === slot);
    if (!m || !info) throw new DemandPagingError(`${what}: memslot ${slot} is not guest RAM under demand paging`);
    return { info, m };
  }

  private key(slot: number, page: number): number {
    return slot * 2 ** 32 + page;
  }

  private async onFault(x: PostedExit): Promise<void> {
    const at = this.locate(x.gpa);
    if (!at) throw new DemandPagingError(`MEMORY_FAULT at gpa 0x${x.gpa.toString(16)} outside guest RAM`);
    if (!this.missing.get(at.slot.slot)![at.page]) return; // installed meanwhile: re-enter
    this.s.faults++;
    const k = this.key(at.slot.slot, at.page);
    let w = this.waiters.get(k);
    if (!w) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      w = { promise, resolve };
      this.waiters.set(k, w);
      this.s.requests++;
      if (!this.handler) throw new DemandPagingError('a missing page was touched and no onRequest handler is set');
      this.handler({ slot: at.slot.slot, page: at.page, vcpu: x.vcpu });
    }
    const t0 = process.hrtime.bigint();
    await w.promise;
    const list = this.waitSeconds.get(x.vcpu) ?? [];
    list.push(Number(process.hrtime.bigint() - t0) / 1e9);
    this.waitSeconds.set(x.vcpu, list);
  }

  /** Before the vCPUs run: drop populated pages (MADV_DONTNEED), in runs of adjacent pages. */
  discard(slot: number, pages: Iterable<number>): void {
    const { info, m } = this.slotOf(slot, 'discard');
    let runStart = -1;
    let runEnd = -1;
    const flush = () => {
      if (runStart >= 0) this.host.zapRange(info.userspaceAddr + runStart * PAGE_SIZE, (runEnd - runStart) * PAGE_SIZE);
      runStart = -1;
    };
    for (const p of pages) {
      if (!Number.isInteger(p) || p < 0 || p >= m.length) throw new DemandPagingError(`discard: page ${p} outside memslot ${slot} (${m.length} pages)`);
      if (!m[p]) {
        m[p] = 1;
        this.missingPages++;
      }
      if (p === runEnd) runEnd++;
      else {
        flush();
        runStart = p;
        runEnd = p + 1;
      }
    }
    flush();
  }

  onRequest(handler: (req: PageRequest) => void): void {
    this.handler = handler;
  }

  install(slot: number, page: number, data: Uint8Array): InstallResult {
    const { info, m } = this.slotOf(slot, 'install');
    if (page < 0 || page >= m.length) throw new DemandPagingError(`install: memslot ${slot} page ${page} is outside it (${m.length} pages)`);
    if (data.length !== PAGE_SIZE) throw new DemandPagingError(`install: ${data.length} bytes, a page is ${PAGE_SIZE}`);
    if (!m[page] || this.finished) {
      this.s.duplicates++;
      return 'exists';
    }
    const r = this.host.uffdCopy(info.userspaceAddr + page * PAGE_SIZE, data);
    // Only install() populates a missing page here: EEXIST would mean someone else wrote guest
    // RAM under demand paging, and that write would now be lost or kept by chance.
    if (r === EEXIST) throw new DemandPagingError(`install: memslot ${slot} page ${page} was populated behind the pager's back`);
    if (r !== 0) throw new DemandPagingError(`install: UFFDIO_COPY of memslot ${slot} page ${page} failed (errno ${-r})`);
    m[page] = 0;
    this.missingPages--;
    this.s.installed++;
    const k = this.key(slot, page);
    const w = this.waiters.get(k);
    if (w) {
      this.waiters.delete(k);
      w.resolve();
    }
    return 'installed';
  }

  isMissing(slot: number, page: number): boolean {
    return (this.missing.get(slot)?.[page] ?? 0) === 1;
  }

  missingCount(): number {
    return this.missingPages;
  }

  waits(): VcpuPageWaits[] {
    const out: VcpuPageWaits[] = [];
    for (let v = 0; v < this.vm.vcpuCount; v++) {
      const list = [...(this.waitSeconds.get(v) ?? [])].sort((a, b) => a - b);
      out.push({ vcpu: v, faults: list.length, p50: percentile(list, 0.5), p99: percentile(list, 0.99), max: list.length ? list[list.length - 1]! : 0, total: list.reduce((a, b) => a + b, 0) });
    }
    return out;
  }

  stats(): DemandPagingStats {
    return { ...this.s, missing: this.missingPages };
  }

  finish(): void {
    if (this.finished) return;
    this.finished = true;
    // The memoryFault handler stays: a vCPU may have exited for a page that was installed (the
    // last one) before its exit reached this thread; onFault then finds it present and the vCPU
    // re-enters. Without exit-on-missing no new such exit comes.
    for (const s of this.slots) {
      const now = this.vm.memslots().find((x) => x.slot === s.slot);
      if (now) this.vm.setUserMemoryRegion({ slot: s.slot, flags: now.flags & ~KVM_MEM_EXIT_ON_MISSING, guestPhysAddr: now.guestPhysAddr, memorySize: now.memorySize, userspaceAddr: now.userspaceAddr });
    }
  }
}
