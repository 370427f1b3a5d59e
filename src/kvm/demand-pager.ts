// The kvm engine's demand paging (contract: vmm/demand-paging.ts) on the host kernel's real
// userfaultfd (src/uffd/). Guest RAM (every VMM memslot; the engine's internal slot is
// populated by createVcpus and never paged) is registered with one uffd, or one per vCPU's
// share of each slot; a vCPU touching a missing page blocks inside KVM_RUN (KVM's
// get_user_pages sleeps in handle_userfault) until the page is installed.
//
//   localSource  `readers` native pthreads per uffd resolve each fault themselves: COPY from the
//                source (MISSING) or write the page through the memfd alias + CONTINUE (MINOR).
//   onRequest    the native readers hand each fault event to the VMM thread (napi thread-safe
//                function); the first fault on a page becomes one PageRequest; install() resolves
//                it (COPY, or alias write + CONTINUE), which wakes every thread waiting on it.
//
// MINOR needs shared memory: each paged slot's anonymous mapping is replaced in place by a memfd
// (MAP_SHARED|MAP_FIXED at the same address, resident pages kept: native remapShared), so guest
// memory stays where the memslot and the VMM's SharedArrayBuffer point; pages then arrive
// through a second mapping of the memfd (the alias) and CONTINUE maps them.
//
// Path 'exit' is refused: it needs KVM_MEM_EXIT_ON_MISSING (never merged upstream), and this
// kernel's KVM_EXIT_MEMORY_FAULT (KVM_CAP_MEMORY_FAULT_INFO) reports guest_memfd / private-memory
// faults, never a missing page of a userspace mapping.
//
// Concurrency: the per-page bitmaps (missing, requested), the pending waiters and the counters
// belong to the VMM thread: onFault runs there (the thread-safe function's queue), install() and
// discard() are called there. Native readers touch only source and alias memory, never guest
// RAM. In localSource mode the readers resolve pages the VMM thread has not heard of yet: it
// learns of them by draining the readers' log (ptid, wait, address) before it answers
// isMissing / missingCount / waits / stats. The kernel makes every install happen once (COPY and
// CONTINUE fail with EEXIST on a page that is there, and change nothing) and wakes every thread
// queued on the page; a page that arrived by another path gets an explicit WAKE. The VMM thread
// must not itself touch a missing page while it is the one that installs (onRequest): it would
// sleep on a fault only it can resolve. checkHostAccess() turns that into an error.
import {
  DemandPagingError, type DemandPager, type DemandPagingConfig, type DemandPagingStats, type InstallResult, type PageRequest, type VcpuPageWaits,
} from '../vmm/demand-paging.ts';
import { PAGE_SIZE } from '../vmm/engine.ts';
import { UffdError, Userfaultfd, uffdNative, type HandlerRange, type NativeUffdHandler } from '../uffd/userfaultfd.ts';

/** A VMM memslot to page, with its host mapping. */
export interface PagedSlotSpec {
  slot: number;
  gpa: number;
  hva: number;
  bytes: number;
  backing: string;
}

export interface KvmPagingHost {
  slots: PagedSlotSpec[];
  vcpuCount: number;
  vcpuThreadIds(): number[];
  /** KVM_CAP_MEMORY_FAULT_INFO on this host (for the 'exit' refusal's message). */
  memoryFaultInfo: boolean;
}

interface PagedSlot extends PagedSlotSpec {
  pages: number;
  /** Offset of the slot's first page in localSource.buffer (slots in guest-physical order, back to back). */
  srcOffset: number;
  missing: Uint8Array;
  requested: Uint8Array;
  alias: Uint8Array | null;
  aliasHva: number;
}

interface Waiter {
  vcpu: number;
  t0Ns: number;
}

const MAX_READERS = 64;

/** The reason path 'exit' cannot be had from the kvm engine on this host. */
export function exitPathRefusal(memoryFaultInfo: boolean): string {
  return (
    "kvm engine: fault path 'exit' needs KVM_MEM_EXIT_ON_MISSING (a memslot flag that makes the stage-2 fault handler exit " +
    'instead of waiting on the userfaultfd), which was never merged upstream. ' +
    (memoryFaultInfo
      ? 'This kernel has KVM_CAP_MEMORY_FAULT_INFO, but its KVM_EXIT_MEMORY_FAULT reports guest_memfd / private-memory faults only, never a missing page of a userspace mapping. '
      : 'This kernel does not even report KVM_CAP_MEMORY_FAULT_INFO. ') +
    "Use path 'uffd' (vCPUs wait in KVM_RUN on the userfaultfd), or the soft engine, which models exit-on-missing."
  );
}

export function startKvmDemandPaging(host: KvmPagingHost, config: DemandPagingConfig): KvmDemandPager {
  if (config.path === 'exit') throw new DemandPagingError(exitPathRefusal(host.memoryFaultInfo));
  if (config.path !== 'uffd') throw new DemandPagingError(`unknown fault path ${String(config.path)} (uffd or exit)`);
  if (config.mode !== 'missing' && config.mode !== 'minor') throw new DemandPagingError(`unknown uffd mode ${String(config.mode)} (missing or minor)`);
  if (!Number.isInteger(config.readers) || config.readers < 1 || config.readers > MAX_READERS) {
    throw new DemandPagingError(`readers must be an integer 1..${MAX_READERS}, got ${config.readers}`);
  }
  if (host.slots.length === 0) throw new DemandPagingError('no VMM memslot to page: create the memslots first');
  for (const s of host.slots) {
    if (s.backing === 'hugetlb') {
      throw new DemandPagingError(`slot ${s.slot} is hugetlb-backed: userfaultfd resolves hugetlb memory in whole 2 MiB pages, and this pager serves 4 KiB pages; use anonymous or anonymous_thp`);
    }
  }
  const total = host.slots.reduce((t, s) => t + s.bytes, 0);
  const src = config.localSource;
  if (src) {
    if (!(src.buffer instanceof SharedArrayBuffer) || src.buffer.byteLength < total) {
      throw new DemandPagingError(`localSource.buffer must be a SharedArrayBuffer of at least ${total} bytes (all paged slots, in guest-physical order)`);
    }
    if (!(src.delayUs >= 0)) throw new DemandPagingError(`localSource.delayUs must be >= 0, got ${src.delayUs}`);
  }
  return new KvmDemandPager(host, config);
}

export class KvmDemandPager implements DemandPager {
  readonly config: Readonly<DemandPagingConfig>;
  private readonly slots: PagedSlot[] = [];
  private readonly uffds: Userfaultfd[] = [];
  private readonly handlers: NativeUffdHandler[] = [];
  private readonly registered: { uffd: Userfaultfd; start: number; len: number }[] = [];
  /** Pages per uffd share of a slot (one share per vCPU unless sharedUffd). */
  private readonly shares: number;
  private handler: ((req: PageRequest) => void) | null = null;
  private readonly queued: PageRequest[] = [];
  private readonly pending = new Map<string, Waiter[]>();
  private readonly waitsByVcpu = new Map<number, number[]>();
  private tids: number[] = [];
  private missingN = 0;
  private counts = { faults: 0, requests: 0, installed: 0, duplicates: 0 };
  private failure: Error | null = null;
  private finished = false;

  constructor(
    private readonly host: KvmPagingHost,
    config: DemandPagingConfig,
  ) {
    this.config = Object.freeze({ ...config });
    this.shares = config.sharedUffd ? 1 : host.vcpuCount;
    const native = uffdNative();
    try {
      for (let i = 0; i < this.shares; i++) this.uffds.push(openUffd());
      let srcOffset = 0;
      for (const spec of [...host.slots].sort((a, b) => a.gpa - b.gpa)) {
        const pages = spec.bytes / PAGE_SIZE;
        let resident: Uint8Array;
        let alias: Uint8Array | null = null;
        let aliasHva = 0;
        if (config.mode === 'minor') {
          const r = native.remapShared(spec.hva, spec.bytes);
          resident = r.resident;
          alias = new Uint8Array(r.alias);
          aliasHva = r.aliasHva;
        } else {
          resident = native.mincore(spec.hva, spec.bytes);
        }
        const missing = new Uint8Array(pages);
        for (let p = 0; p < pages; p++) missing[p] = resident[p] ? 0 : 1;
        this.missingN += pages - resident.reduce((t, b) => t + b, 0);
        this.slots.push({ ...spec, pages, srcOffset, missing, requested: new Uint8Array(pages), alias, aliasHva });
        srcOffset += spec.bytes;
      }
      const ranges: HandlerRange[][] = this.uffds.map(() => []);
      const srcBase = config.localSource ? Userfaultfd.addressOf(new Uint8Array(config.localSource.buffer)) : 0;
      for (const s of this.slots) {
        for (let k = 0; k < this.shares; k++) {
          const { first, count } = this.share(s, k);
          if (count === 0) continue;
          const start = s.hva + first * PAGE_SIZE;
          const len = count * PAGE_SIZE;
          this.uffds[k]!.register(start, len, [config.mode]);
          this.registered.push({ uffd: this.uffds[k]!, start, len });
          ranges[k]!.push({ dst: start, len, src: srcBase + s.srcOffset + first * PAGE_SIZE, ...(s.alias ? { alias: s.aliasHva + first * PAGE_SIZE } : {}) });
        }
      }
      this.uffds.forEach((u, k) => {
        this.handlers.push(
          config.localSource
            ? u.startHandler({ mode: config.mode === 'missing' ? 'copy' : 'continue', readers: config.readers, delayUs: config.localSource.delayUs, ranges: ranges[k]! })
            : u.startHandler({ mode: 'notify', readers: config.readers, onFault: (address, ptid, t0) => this.onFault(address, ptid, t0) }),
        );
      });
    } catch (e) {
      this.teardown();
      if (e instanceof UffdError) throw new DemandPagingError(`kvm engine: userfaultfd: ${e.message}`);
      throw e;
    }
  }

  /** Until finish(). */
  get active(): boolean {
    return !this.finished;
  }

  /** Pages [first, first+count) of slot s belong to uffd k. */
  private share(s: PagedSlot, k: number): { first: number; count: number } {
    const per = Math.ceil(s.pages / this.shares);
    const first = Math.min(s.pages, k * per);
    return { first, count: Math.min(s.pages, first + per) - first };
  }

  private uffdFor(s: PagedSlot, page: number): Userfaultfd {
    return this.uffds[Math.floor(page / Math.ceil(s.pages / this.shares))]!;
  }

  private slotOf(slot: number): PagedSlot {
    const s = this.slots.find((x) => x.slot === slot);
    if (!s) throw new DemandPagingError(`slot ${slot} is not paged on demand (paged: ${this.slots.map((x) => x.slot).join(', ')})`);
    return s;
  }

  private checkPage(s: PagedSlot, page: number): void {
    if (!Number.isInteger(page) || page < 0 || page >= s.pages) throw new DemandPagingError(`page ${page} is outside slot ${s.slot} (${s.pages} pages)`);
  }

  private vcpuOf(ptid: number): number {
    let v = this.tids.indexOf(ptid);
    if (v < 0 && ptid > 0) {
      this.tids = this.host.vcpuThreadIds();
      v = this.tids.indexOf(ptid);
    }
    return v;
  }

  private recordWait(vcpu: number, seconds: number): void {
    if (vcpu < 0) return;
    let w = this.waitsByVcpu.get(vcpu);
    if (!w) this.waitsByVcpu.set(vcpu, (w = []));
    w.push(seconds);
  }

  /** A fault event from a native reader, on the VMM thread (onRequest mode). */
  private onFault(address: number, ptid: number, t0Ns: number): void {
    if (this.finished) return;
    const s = this.slots.find((x) => address >= x.hva && address < x.hva + x.bytes);
    if (!s) return;
    const page = Math.floor((address - s.hva) / PAGE_SIZE);
    this.counts.faults++;
    const vcpu = this.vcpuOf(ptid);
    if (!s.missing[page]) {
      // Installed between the fault and this event: the install woke it already; WAKE is harmless.
      this.uffdFor(s, page).wake(s.hva + page * PAGE_SIZE, PAGE_SIZE);
      this.recordWait(vcpu, Math.max(0, Number(process.hrtime.bigint()) - t0Ns) / 1e9);
      return;
    }
    const key = `${s.slot}:${page}`;
    const list = this.pending.get(key);
    if (list) list.push({ vcpu, t0Ns });
    else this.pending.set(key, [{ vcpu, t0Ns }]);
    if (s.requested[page]) return;
    s.requested[page] = 1;
    this.counts.requests++;
    const req: PageRequest = { slot: s.slot, page, vcpu };
    if (!this.handler) {
      this.queued.push(req);
      return;
    }
    this.ask(req);
  }

  private ask(req: PageRequest): void {
    try {
      this.handler!(req);
    } catch (e) {
      // The handler runs from the readers' queue: keep its failure for finish() to throw.
      this.failure ??= e instanceof Error ? e : new Error(String(e));
    }
  }

  /** Fold what the native readers resolved on their own (localSource) into the bitmaps and waits. */
  private drain(): void {
    if (!this.config.localSource) return;
    for (const h of this.handlers) this.fold(h.drainWaits());
  }

  private fold(triples: Float64Array): void {
    for (let i = 0; i + 2 < triples.length; i += 3) {
      this.recordWait(this.vcpuOf(triples[i]!), triples[i + 1]! / 1e9);
      const addr = triples[i + 2]!;
      const s = this.slots.find((x) => addr >= x.hva && addr < x.hva + x.bytes);
      if (!s) continue;
      const page = Math.floor((addr - s.hva) / PAGE_SIZE);
      if (s.missing[page]) {
        s.missing[page] = 0;
        this.missingN--;
      }
    }
  }

  discard(slot: number, pages: Iterable<number>): void {
    if (this.finished) throw new DemandPagingError('discard after finish()');
    const s = this.slotOf(slot);
    this.drain();
    const native = uffdNative();
    const sorted = [...pages].sort((a, b) => a - b);
    sorted.forEach((p) => this.checkPage(s, p));
    for (let i = 0; i < sorted.length; ) {
      let j = i + 1;
      while (j < sorted.length && sorted[j]! <= sorted[j - 1]! + 1) j++;
      const first = sorted[i]!;
      const last = sorted[j - 1]!;
      // MISSING: the anonymous page is freed (missing again). MINOR: only the mapping goes; the
      // stale page stays in the page cache, so the next touch is a MINOR fault.
      native.madvise(s.hva + first * PAGE_SIZE, (last - first + 1) * PAGE_SIZE, 'dontneed');
      for (let p = first; p <= last; p++) {
        if (!s.missing[p]) this.missingN++;
        s.missing[p] = 1;
        s.requested[p] = 0;
      }
      i = j;
    }
  }

  onRequest(handler: (req: PageRequest) => void): void {
    if (this.config.localSource) throw new DemandPagingError('onRequest: this pager serves faults from localSource; requests never reach the VMM');
    this.handler = handler;
    for (const req of this.queued.splice(0)) this.ask(req);
  }

  install(slot: number, page: number, data: Uint8Array): InstallResult {
    if (this.finished) throw new DemandPagingError(`install(slot ${slot}, page ${page}) after finish()`);
    if (!(data instanceof Uint8Array) || data.length !== PAGE_SIZE) throw new DemandPagingError(`install: data must be ${PAGE_SIZE} bytes, got ${data?.length}`);
    const s = this.slotOf(slot);
    this.checkPage(s, page);
    this.drain();
    const addr = s.hva + page * PAGE_SIZE;
    const u = this.uffdFor(s, page);
    let r: InstallResult;
    if (this.config.mode === 'missing') {
      r = u.copyFrom(addr, data);
    } else if (!s.missing[page]) {
      r = 'exists'; // never overwrite a page the guest may have written since it arrived
    } else {
      s.alias!.set(data, page * PAGE_SIZE);
      r = u.continue(addr, PAGE_SIZE);
    }
    if (r === 'installed') this.counts.installed++;
    else {
      this.counts.duplicates++;
      u.wake(addr, PAGE_SIZE); // arrived by another path: its waiters may still sleep
    }
    if (s.missing[page]) {
      s.missing[page] = 0;
      this.missingN--;
    }
    const key = `${slot}:${page}`;
    const waiters = this.pending.get(key);
    if (waiters) {
      const now = Number(process.hrtime.bigint());
      for (const w of waiters) this.recordWait(w.vcpu, Math.max(0, now - w.t0Ns) / 1e9);
      this.pending.delete(key);
    }
    return r;
  }

  isMissing(slot: number, page: number): boolean {
    const s = this.slotOf(slot);
    this.checkPage(s, page);
    this.drain();
    return s.missing[page] === 1;
  }

  missingCount(): number {
    this.drain();
    return this.missingN;
  }

  /** A native reader that failed leaves its vCPU waiting forever: say so instead. */
  private checkReaders(): void {
    if (this.handlers.some((h) => h.counters().errors > 0)) {
      const h = this.handlers.find((x) => x.counters().errors > 0)!;
      try {
        h.stop();
      } catch (e) {
        throw new DemandPagingError(`kvm engine: a userfaultfd reader failed, its vCPU waits for a page that will not come: ${(e as Error).message}`);
      }
    }
  }

  waits(): VcpuPageWaits[] {
    this.checkReaders();
    this.drain();
    const out: VcpuPageWaits[] = [];
    for (let v = 0; v < this.host.vcpuCount; v++) {
      const w = [...(this.waitsByVcpu.get(v) ?? [])].sort((a, b) => a - b);
      const at = (q: number): number => (w.length ? w[Math.min(w.length - 1, Math.floor(q * w.length))]! : 0);
      out.push({ vcpu: v, faults: w.length, p50: at(0.5), p99: at(0.99), max: w.length ? w[w.length - 1]! : 0, total: w.reduce((t, x) => t + x, 0) });
    }
    return out;
  }

  stats(): DemandPagingStats {
    this.checkReaders();
    this.drain();
    if (!this.config.localSource) return { ...this.counts, missing: this.missingN };
    const c = this.handlers.map((h) => h.counters());
    const resolved = c.reduce((t, x) => t + x.resolved, 0);
    return {
      faults: c.reduce((t, x) => t + x.events, 0),
      requests: resolved + this.counts.installed,
      installed: resolved + this.counts.installed,
      duplicates: c.reduce((t, x) => t + x.exists, 0) + this.counts.duplicates,
      missing: this.missingN,
    };
  }

  /**
   * The VMM thread is about to read or write guest memory through its own mapping: refuse where
   * that would touch a missing page while this thread is the one that must install it.
   */
  checkHostAccess(gpa: number, bytes: number, what: string): void {
    if (this.finished || this.config.localSource) return;
    for (const s of this.slots) {
      const lo = Math.max(gpa, s.gpa);
      const hi = Math.min(gpa + bytes, s.gpa + s.bytes);
      for (let p = Math.floor((lo - s.gpa) / PAGE_SIZE); lo < hi && p * PAGE_SIZE < hi - s.gpa; p++) {
        if (s.missing[p]) {
          throw new DemandPagingError(
            `${what}: guest page 0x${(s.gpa + p * PAGE_SIZE).toString(16)} (slot ${s.slot} page ${p}) is still missing, and this thread installs pages: it would wait on itself. install() it first`,
          );
        }
      }
    }
  }

  finish(): void {
    if (this.finished) return;
    this.finished = true;
    let first: Error | null = this.failure;
    for (const h of this.handlers) {
      try {
        const st = h.stop();
        if (this.config.localSource) this.fold(st.waits);
      } catch (e) {
        first ??= e as Error;
      }
    }
    this.handlers.length = 0;
    this.teardown();
    if (first) throw first;
  }

  private teardown(): void {
    for (const h of this.handlers) {
      try {
        h.stop();
      } catch {
        /* reported by finish() */
      }
    }
    this.handlers.length = 0;
    // Closing a uffd unregisters its ranges and wakes whoever still waits (they fault normally).
    for (const r of this.registered) {
      try {
        r.uffd.unregister(r.start, r.len);
      } catch {
        /* the mapping went away first (VM destroyed): close() below is enough */
      }
    }
    this.registered.length = 0;
    for (const u of this.uffds) u.close();
    this.uffds.length = 0;
  }
}

function openUffd(): Userfaultfd {
  try {
    return Userfaultfd.open();
  } catch (e) {
    throw new DemandPagingError(`kvm engine: userfaultfd cannot be opened: ${(e as Error).message}`);
  }
}
