// INTERIM (to be replaced by the engines' own Vm.startDemandPaging at merge): a DemandPager
// (vmm/demand-paging.ts) with fault path 'exit' only, built over what the Vm interface offers
// today:
//   - guest RAM memslots get stage2's KVM_MEM_EXIT_ON_MISSING: a vCPU touching a host page that
//     is not populated leaves the guest with MEMORY_FAULT (the soft engine does this; kvm never
//     got exit-on-missing upstream, so this adapter is soft-only in practice);
//   - vm.onExit('memoryFault') handles the exit on the main thread: one request per page (the
//     first toucher's), every other toucher waits on the same promise;
//   - install() is vm.writeGuest, which populates the host page.
//
// What it cannot do: make a populated page missing again (MADV_DONTNEED): the Vm interface has
// no call that drops a host page. So discard() refuses populated pages, and postcopyPaging()
// below keeps the destination's pre-copy pages OUT of guest RAM until post-copy starts: they go
// to a staging copy (heldPage() serves them back to the destination, which installs them like
// any other page). With an engine pager, pre-copy pages go straight into guest RAM and discard()
// drops the stale ones.
//
// Known gap (an engine pager does not have it): writeGuest populates the host page before it
// has copied all 4096 bytes, so a vCPU that touches the very page being installed in that
// window (microseconds, on another thread) may see it partly written. UFFDIO_COPY installs a
// fully written page atomically; the engines' pagers do.
//
// Concurrency: main thread only. vCPU threads reach it only through MEMORY_FAULT exits, which
// the run loop hands to this thread (vm.onExit); the missing bitmap is a plain array read and
// written here alone.
import { KVM_MEM_EXIT_ON_MISSING, PAGE_SIZE, type MemslotInfo, type Vm } from '../../vmm/engine.ts';
import { DemandPagingError, type DemandPager, type DemandPagingConfig, type DemandPagingStats, type InstallResult, type PageRequest, type VcpuPageWaits } from '../../vmm/demand-paging.ts';
import type { PostedExit } from '../../vmm/run/exits.ts';

/** What the post-copy destination uses: the only place that chooses between engine and interim. */
export interface PostcopyPaging {
  /** Write pre-copy pages through this (interim: a staging copy outside guest RAM). */
  readonly vm: Vm;
  start(config: DemandPagingConfig): DemandPager;
  /** Copy the page the destination holds outside guest RAM into dst; false when none is held. */
  heldPage(gpa: number, dst: Uint8Array): boolean;
  /** Free what heldPage served from. */
  release(): void;
}

export function postcopyPaging(vm: Vm): PostcopyPaging {
  if (vm.startDemandPaging) return { vm, start: (c) => vm.startDemandPaging!(c), heldPage: () => false, release: () => undefined };
  return new InterimStaging(vm);
}

interface Staged {
  slot: MemslotInfo;
  bytes: Uint8Array;
}

/** The Vm the destination writes pre-copy pages through, with guest RAM diverted to staging. */
class InterimStaging implements PostcopyPaging {
  readonly vm: Vm;
  private staged: Staged[] | null;

  constructor(private readonly real: Vm) {
    this.staged = real.memslots().filter((s) => !s.internal).map((slot) => ({ slot, bytes: new Uint8Array(slot.memorySize) }));
    const find = (gpa: number, len: number): { s: Staged; off: number } | null => {
      for (const s of this.staged ?? []) {
        const off = gpa - s.slot.guestPhysAddr;
        if (off >= 0 && off + len <= s.slot.memorySize) return { s, off };
      }
      return null;
    };
    // Every member of the real Vm, bound, except the two guest-RAM accessors.
    const proxy = Object.create(null) as Record<string, unknown>;
    for (let o: object | null = real; o && o !== Object.prototype; o = Object.getPrototypeOf(o)) {
      for (const k of Object.getOwnPropertyNames(o)) {
        if (k in proxy || k === 'constructor' || k === 'writeGuest' || k === 'readGuest') continue;
        Object.defineProperty(proxy, k, { get: () => { const v = (real as unknown as Record<string, unknown>)[k]; return typeof v === 'function' ? v.bind(real) : v; } });
      }
    }
    proxy.writeGuest = (gpa: number, src: Uint8Array) => {
      const at = find(gpa, src.length);
      if (at) at.s.bytes.set(src, at.off);
      else real.writeGuest(gpa, src);
    };
    proxy.readGuest = (gpa: number, dst: Uint8Array) => {
      const at = find(gpa, dst.length);
      if (at) dst.set(at.s.bytes.subarray(at.off, at.off + dst.length));
      else real.readGuest(gpa, dst);
    };
    this.vm = proxy as unknown as Vm;
  }

  heldPage(gpa: number, dst: Uint8Array): boolean {
    for (const s of this.staged ?? []) {
      const off = gpa - s.slot.guestPhysAddr;
      if (off >= 0 && off + PAGE_SIZE <= s.slot.memorySize) {
        dst.set(s.bytes.subarray(off, off + PAGE_SIZE));
        return true;
      }
    }
    return false;
  }

  release(): void {
    this.staged = null;
  }

  start(config: DemandPagingConfig): DemandPager {
    return new InterimExitPager(this.real, config);
  }
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
    config: DemandPagingConfig,
  ) {
    if (config.path !== 'exit') throw new DemandPagingError(`the interim pager (migration/postcopy/interim-exit-pager.ts) has fault path 'exit' only, not '${config.path}'`);
    if (config.localSource) throw new DemandPagingError('the interim pager serves post-copy only (no localSource)');
    this.config = { ...config };
    this.slots = vm.memslots().filter((s) => !s.internal);
    // The staging above kept every guest RAM page unpopulated: all of them are missing.
    for (const s of this.slots) {
      this.missing.set(s.slot, new Uint8Array(s.pages).fill(1));
      this.missingPages += s.pages;
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

  discard(slot: number, pages: Iterable<number>): void {
    const m = this.missing.get(slot);
    if (!m) throw new DemandPagingError(`discard: memslot ${slot} is not guest RAM under demand paging`);
    for (const p of pages) {
      if (!Number.isInteger(p) || p < 0 || p >= m.length) throw new DemandPagingError(`discard: page ${p} outside memslot ${slot} (${m.length} pages)`);
      if (!m[p]) throw new DemandPagingError(`discard: memslot ${slot} page ${p} is populated and the interim pager cannot drop a page (no MADV_DONTNEED through the Vm interface)`);
    }
  }

  onRequest(handler: (req: PageRequest) => void): void {
    this.handler = handler;
  }

  install(slot: number, page: number, data: Uint8Array): InstallResult {
    const m = this.missing.get(slot);
    if (!m || page < 0 || page >= m.length) throw new DemandPagingError(`install: memslot ${slot} page ${page} is not guest RAM under demand paging`);
    if (data.length !== PAGE_SIZE) throw new DemandPagingError(`install: ${data.length} bytes, a page is ${PAGE_SIZE}`);
    if (!m[page] || this.finished) {
      this.s.duplicates++;
      return 'exists';
    }
    const s = this.slots.find((x) => x.slot === slot)!;
    this.vm.writeGuest(s.guestPhysAddr + page * PAGE_SIZE, data);
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
    this.vm.onExit('memoryFault', undefined);
    for (const s of this.slots) {
      const now = this.vm.memslots().find((x) => x.slot === s.slot);
      if (now) this.vm.setUserMemoryRegion({ slot: s.slot, flags: now.flags & ~KVM_MEM_EXIT_ON_MISSING, guestPhysAddr: now.guestPhysAddr, memorySize: now.memorySize, userspaceAddr: now.userspaceAddr });
    }
  }
}
