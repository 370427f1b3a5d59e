// The soft engine's DemandPager (vmm/demand-paging.ts): the main thread's side of the
// userfaultfd model. It registers guest RAM (UFFDIO_REGISTER on every demand-paged memslot's
// VMA; KVM_MEM_EXIT_ON_MISSING on the memslots for path 'exit'), fills the MINOR mode's page
// cache, starts the uffd reader threads, serves page requests to onRequest, installs pages, and
// undoes it all in finish().
//
// Threads: every method runs on the VM's owning (main) thread, except what userfaultfd.ts does
// on vCPU and reader threads over the shared memory it documents. Ordering at start: the shared
// state is complete and ACTIVE before the attach message goes to each vCPU, and that message is
// posted before any VMA is registered or memslot flagged, so no thread can take a MISSING fault
// it cannot attach for. At finish: ACTIVE is cleared first (faulters stop queueing and return),
// then the VMAs are unregistered and the flags dropped, then sleepers are kicked and the queues
// stopped (readers leave).

import type { MessagePort, Worker } from 'node:worker_threads';
import {
  DemandPagingError, FAULT_PATHS, UFFD_MODES, type DemandPager, type DemandPagingConfig, type DemandPagingStats,
  type InstallResult, type PageRequest, type VcpuPageWaits,
} from '../../vmm/demand-paging.ts';
import { KVM_MEM_EXIT_ON_MISSING, type MemoryRegion, type MemslotInfo } from '../../vmm/engine.ts';
import { startWorker } from '../../util/worker.ts';
import type { HostMemory } from '../hostmem/host-memory.ts';
import { HostFaultError, type HostAddressSpace } from '../hostmm/host-address-space.ts';
import { makeLayout, pageOfGfn, pageOfSlot, slotOfPage } from './layout.ts';
import { SoftUserfaultfd, createUffdShared } from './userfaultfd.ts';
import type { UffdAttachMessage } from './vcpu-entry.ts';
import type { UffdReaderData } from './reader-worker.ts';

const PAGE = 4096;

/** What the pager needs from the SoftVm that owns it. */
export interface PagerVm {
  mm: HostAddressSpace;
  mem: HostMemory;
  vcpus: number;
  ports: MessagePort[];
  memslots(): readonly MemslotInfo[];
  setUserMemoryRegion(r: MemoryRegion): void;
}

export function checkDemandPagingConfig(c: DemandPagingConfig, totalPages: number): void {
  if (!FAULT_PATHS.includes(c.path)) throw new DemandPagingError(`path must be one of ${FAULT_PATHS.join(', ')}, got ${String(c.path)}`);
  if (!UFFD_MODES.includes(c.mode)) throw new DemandPagingError(`mode must be one of ${UFFD_MODES.join(', ')}, got ${String(c.mode)}`);
  if (!Number.isInteger(c.readers) || c.readers < 1 || c.readers > 64) throw new DemandPagingError(`readers must be a whole number from 1 to 64, got ${c.readers}`);
  if (c.localSource) {
    const { buffer, delayUs } = c.localSource;
    if (!(buffer instanceof SharedArrayBuffer)) throw new DemandPagingError('localSource.buffer must be a SharedArrayBuffer (every resolving thread reads it)');
    if (buffer.byteLength < totalPages * PAGE) throw new DemandPagingError(`localSource.buffer holds ${buffer.byteLength} bytes; guest RAM is ${totalPages * PAGE}`);
    if (!Number.isFinite(delayUs) || delayUs < 0) throw new DemandPagingError(`localSource.delayUs must be a number, 0 or more, got ${delayUs}`);
  }
}

export class SoftDemandPager implements DemandPager {
  readonly config: Readonly<DemandPagingConfig>;
  readonly uffd: SoftUserfaultfd;
  private readonly regs: { hva: number; bytes: number }[] = [];
  private readonly flagged: MemoryRegion[] = [];
  private readonly readers: Promise<void>[] = [];
  private handler: ((req: PageRequest) => void) | null = null;
  private finished = false;
  /** The first error onRequest threw (the request is dropped; its vCPU keeps waiting). */
  requestError: unknown = null;

  constructor(
    private readonly vm: PagerVm,
    config: DemandPagingConfig,
  ) {
    this.config = { ...config };
    if (vm.vcpus < 1) throw new DemandPagingError('startDemandPaging needs the vCPUs: call createVcpus first');
    const slots = vm.memslots().filter((s) => s.memorySize > 0);
    if (slots.length === 0) throw new DemandPagingError('startDemandPaging: the VM has no memslots');
    const layout = makeLayout(slots, config.sharedUffd ? 1 : vm.vcpus);
    checkDemandPagingConfig(config, layout.totalPages);
    for (const s of slots) {
      const vma = vm.mm.findVma(s.userspaceAddr);
      if (!vma) throw new DemandPagingError(`memslot ${s.slot}: no host mapping at hva 0x${s.userspaceAddr.toString(16)}`);
      if (vma.kind !== 'anonymous' && vma.kind !== 'anonymous_thp') {
        throw new DemandPagingError(`memslot ${s.slot} is backed by ${vma.kind}: the soft userfaultfd model pages 4 KiB pages of anonymous / anonymous_thp memory (MINOR mode models a shared-memory file over them); hugetlb's 2 MiB granule is not modelled`);
      }
      if (!this.regs.some((r) => r.hva === vma.start)) this.regs.push({ hva: vma.start, bytes: vma.end - vma.start });
    }
    const sh = createUffdShared({
      path: config.path,
      mode: config.mode,
      readers: config.readers,
      layout,
      vcpus: vm.vcpus,
      source: config.localSource?.buffer ?? null,
      delayUs: config.localSource?.delayUs ?? 0,
    });
    const u = (this.uffd = new SoftUserfaultfd(sh, vm.mm, vm.mem, null));
    // Every page not populated yet is missing; MINOR: the page cache holds a (stale) page for it.
    const present = u.presentAll();
    if (u.pcache) for (let i = 0; i < layout.totalPages; i++) if (!present.map[i]) this.fillPageCache(i);
    u.addMissing(layout.totalPages - present.count);
    u.setActive(true);
    const attach: UffdAttachMessage = { type: 'uffd-attach', shared: sh };
    for (const p of vm.ports) p.postMessage(attach);
    try {
      for (const r of this.regs) vm.mm.setUserfault(r.hva, r.bytes, true);
    } catch (e) {
      this.finish();
      if (e instanceof HostFaultError) throw new DemandPagingError(`UFFDIO_REGISTER: ${e.message} (a demand-paged memslot must cover whole host mappings)`);
      throw e;
    }
    if (config.path === 'exit') {
      for (const s of slots) {
        const r: MemoryRegion = { slot: s.slot, flags: s.flags, guestPhysAddr: s.guestPhysAddr, memorySize: s.memorySize, userspaceAddr: s.userspaceAddr };
        vm.setUserMemoryRegion({ ...r, flags: r.flags | KVM_MEM_EXIT_ON_MISSING });
        this.flagged.push(r);
      }
    }
    if (config.path === 'uffd') {
      for (let q = 0; q < layout.uffds; q++) {
        for (let k = 0; k < config.readers; k++) this.readers.push(this.startReader(q));
      }
    }
    void this.pump();
  }

  private fillPageCache(i: number): void {
    const pfn = this.vm.mem.allocFrame();
    if (pfn < 0) throw new DemandPagingError(`MINOR mode: no host frame left for the page cache of guest page ${i}`);
    Atomics.store(this.uffd.pcache!, i, pfn + 1);
  }

  /** Resolves once every reader thread runs (demand_paging_test starts its uffd threads before the vCPUs). */
  ready(): Promise<void> {
    return Promise.all(this.readersReady).then(() => {});
  }

  private readonly readersReady: Promise<void>[] = [];

  private startReader(q: number): Promise<void> {
    const data: UffdReaderData = { shared: this.uffd.sh, mem: this.vm.mem.shared, mm: this.vm.mm.shared, uffd: q };
    const w: Worker = startWorker(new URL('./reader-worker.ts', import.meta.url), data as unknown as Record<string, unknown>);
    this.readersReady.push(new Promise<void>((resolve) => {
      w.once('message', () => resolve());
      w.once('exit', () => resolve());
    }));
    return new Promise<void>((resolve) => {
      w.on('error', (e) => {
        this.requestError ??= e;
      });
      w.on('exit', () => resolve());
    });
  }

  /** Hand queued page requests to onRequest as the mailbox announces them. */
  private async pump(): Promise<void> {
    const mb = this.uffd.mailbox;
    while (!this.finished) {
      const seq = mb.seq();
      if (this.handler) {
        for (let i = mb.pop(); i >= 0; i = mb.pop()) {
          const s = slotOfPage(this.uffd.sh.layout, i);
          try {
            this.handler({ slot: s.slot, page: i - s.first, vcpu: mb.vcpu });
          } catch (e) {
            this.requestError ??= e;
          }
        }
      }
      await mb.nextAsync(seq, 1000);
    }
  }

  private page(slot: number, page: number, what: string): number {
    const i = pageOfSlot(this.uffd.sh.layout, slot, page);
    if (i < 0) throw new DemandPagingError(`${what}: no page ${page} in demand-paged memslot ${slot}`);
    return i;
  }

  /**
   * MADV_DONTNEED on these pages of `slot` (ascending order zaps fastest): each run of
   * consecutive present pages goes in one zapRange, so the stage-2 unmap and its TLB flush happen
   * once a run, not once a page (the post-copy switchover drops up to every page of a slot here,
   * on the downtime path).
   */
  discard(slot: number, pages: Iterable<number>): void {
    this.checkLive('discard');
    const u = this.uffd;
    const list = Array.from(pages, (p) => this.page(slot, p, 'discard'));
    let here = new Uint8Array(64);
    let n = 0;
    for (let a = 0; a < list.length; ) {
      let b = a + 1;
      while (b < list.length && list[b] === list[b - 1]! + 1) b++;
      const first = list[a]!;
      const count = b - a;
      if (here.length < count) here = new Uint8Array(count);
      u.presentRun(first, count, here);
      for (let k = 0; k < count; ) {
        if (!here[k]) {
          k++;
          continue;
        }
        let e = k + 1;
        while (e < count && here[e]) e++;
        this.vm.mm.zapRange(u.hva(first + k), (e - k) * PAGE); // the stage-2 mapping goes with it (mmu notifier)
        if (u.pcache) for (let j = first + k; j < first + e; j++) if (Atomics.load(u.pcache, j) === 0) this.fillPageCache(j);
        n += e - k;
        k = e;
      }
      a = b;
    }
    u.addMissing(n);
  }

  onRequest(handler: (req: PageRequest) => void): void {
    this.handler = handler;
    // Requests queued before the handler existed: take them now rather than at the next event.
    Atomics.add(this.uffd.ctl, this.uffd.mailbox.seqIndex(), 1);
    Atomics.notify(this.uffd.ctl, this.uffd.mailbox.seqIndex());
  }

  install(slot: number, page: number, data: Uint8Array): InstallResult {
    this.checkLive('install');
    return this.uffd.install(this.page(slot, page, 'install'), data);
  }

  isMissing(slot: number, page: number): boolean {
    return !this.uffd.present(this.page(slot, page, 'isMissing'));
  }

  missingCount(): number {
    return this.uffd.counters().missing;
  }

  waits(): VcpuPageWaits[] {
    return Array.from({ length: this.vm.vcpus }, (_, v) => this.uffd.histogram.read(v));
  }

  stats(): DemandPagingStats & { wakes: number; queueContended: number } {
    const c = this.uffd.counters();
    const contended = this.uffd.queues.reduce((a, q) => a + q.stats().contended, 0);
    return { faults: c.faults, requests: c.requests, installed: c.installed, duplicates: c.duplicates, missing: c.missing, wakes: c.wakes, queueContended: contended };
  }

  get active(): boolean {
    return !this.finished;
  }

  /**
   * The VMM's own access to guest RAM (readGuest / writeGuest) at [gpa, gpa + bytes): fault in
   * every missing page first, through the uffd like any other access (this thread waits), or
   * fetched here on path 'exit'. Needs a local source (the main thread cannot wait for itself).
   */
  faultIn(gpa: number, bytes: number): void {
    if (this.finished || bytes <= 0) return;
    const u = this.uffd;
    for (let gfn = Math.floor(gpa / PAGE); gfn * PAGE < gpa + bytes; gfn++) {
      const i = pageOfGfn(u.sh.layout, gfn);
      if (i >= 0 && !u.present(i)) u.fault(i, u.mainThread);
    }
  }

  /** run control's kick (pause / stop): make vCPUs asleep on a page look at their requests. */
  kick(): void {
    this.uffd.kickSleepers();
  }

  private checkLive(what: string): void {
    if (this.finished) throw new DemandPagingError(`${what}: demand paging has finished`);
  }

  finish(): void {
    if (this.finished) return;
    this.finished = true;
    const u = this.uffd;
    u.setActive(false);
    for (const r of this.regs) {
      try {
        this.vm.mm.setUserfault(r.hva, r.bytes, false);
      } catch {
        /* the mapping is already gone (VM teardown) */
      }
    }
    for (const r of this.flagged) {
      // Drop only our flag: the VMM may have changed the others (dirty logging) meanwhile.
      const now = this.vm.memslots().find((m) => m.slot === r.slot && m.userspaceAddr === r.userspaceAddr);
      if (now) this.vm.setUserMemoryRegion({ ...r, flags: now.flags & ~KVM_MEM_EXIT_ON_MISSING });
    }
    this.flagged.length = 0;
    u.kickSleepers();
    for (const q of u.queues) q.stop();
    u.mailbox.stop();
    const detach: UffdAttachMessage = { type: 'uffd-attach', shared: null };
    for (const p of this.vm.ports) p.postMessage(detach);
  }

  /** finish(), wait for the reader threads, and give the page cache's frames back (VM teardown). */
  async close(): Promise<void> {
    this.finish();
    await Promise.all(this.readers);
    const pc = this.uffd.pcache;
    if (pc) {
      for (let i = 0; i < pc.length; i++) {
        const v = Atomics.exchange(pc, i, 0);
        if (v > 0) this.vm.mem.putPage(v - 1);
      }
    }
  }
}
