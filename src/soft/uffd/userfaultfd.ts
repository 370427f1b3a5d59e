// The soft host's userfaultfd model: what a missing guest page is, who takes its fault, how a
// page is installed (UFFDIO_COPY, or a write into the shared mapping + UFFDIO_CONTINUE) and how
// its waiters wake (UFFDIO_WAKE). One instance per thread (vCPU, uffd reader, the VMM's main
// thread), all attached to the same shared memory (UffdShared). The main thread's side
// (registration, readers, onRequest, finish) is pager.ts.
//
// Concurrency rules (all shared words through Atomics):
// - A page is missing while its host pte is empty (the host page table is the truth:
//   present(i) = lookupPfn >= 0). Only COPY / CONTINUE fill it, each with one CAS, so a page is
//   installed exactly once however many threads install it: the others get EEXIST ('exists').
// - state[i], one Int32 per VM page: 0 = no fault pending, else PENDING | 2 * (waiters
//   registered). The first faulter CASes 0 -> PENDING and so owns the page's one request (it
//   queues the event on the uffd, fetches, or asks the main thread); later faulters register
//   with CAS w -> w + 2 and sleep on state[i]. Whoever installs (or finds the page present:
//   WAKE alone) exchanges state[i] to 0 AFTER the pte is filled and notifies when waiters were
//   registered. A faulter re-checks present() after its CAS and before sleeping, and sleeps on
//   the exact value it wrote, so an install between the check and the sleep makes the sleep
//   return at once: no lost wake-up. A claimer that finds the page present after claiming
//   (it arrived between its first check and its CAS) wakes it itself and requests nothing.
//   Counts are never decremented: a waiter that leaves early (pause) leaves a stale count,
//   which costs one useless notify and is wiped by the next exchange.
// - Kicks (pause / stop / finish while vCPUs sleep on pages): a sleeper stores the page it
//   waits for in WAITING_ON[thread] BEFORE it tests the run-control words; the kicker stores
//   G_PAUSE / G_EXIT (or clears ACTIVE) BEFORE it reads WAITING_ON, then adds 2 to that page's
//   state (only while PENDING) and notifies. One of the two sees the other's store (Dekker with
//   seq-cst Atomics); a changed state makes the sleeper's wait return at once.
// - MINOR mode: pcache[i] holds the page-cache frame (pfn + 1) of the shared-memory file that
//   backs page i; an installer takes it by CAS to its negative (one writer per page at a time),
//   checks present() again, writes the data into the frame (the shared mapping), CONTINUEs, and
//   restores it. So the data of a page the guest may already be writing is never rewritten.
// - Counters (faults, requests, installed, duplicates, missing) are Atomics.add words, each on
//   its own 64-byte line.

import { G_EXIT, G_PAUSE } from '../../vmm/run/control-block.ts';
import { DemandPagingError, type FaultPath, type InstallResult, type UffdMode } from '../../vmm/demand-paging.ts';
import { EEXIST } from '../hostmem/errno.ts';
import { WINDOW_MASK, WINDOW_SHIFT } from '../hostmem/page-flags.ts';
import type { HostMemory } from '../hostmem/host-memory.ts';
import type { HostAddressSpace } from '../hostmm/host-address-space.ts';
import { FaultQueue } from './fault-queue.ts';
import { hvaOfPage, uffdOfPage, type DemandLayout } from './layout.ts';
import { WaitHistogram } from './wait-histogram.ts';

const PAGE = 4096;
const PENDING = 1;
const WAITER = 2;

// ctl words, 16 apart.
const C_ACTIVE = 0;
const C_FAULTS = 16;
const C_REQUESTS = 32;
const C_INSTALLED = 48;
const C_DUPLICATES = 64;
const C_MISSING = 80;
const C_WAKES = 96;
const C_WAITING_ON = 112; // + 16 * thread: VM page + 1 the thread sleeps on, 0 = none

/** Everything a thread attaches to (structured-clonable). */
export interface UffdShared {
  path: FaultPath;
  mode: UffdMode;
  readers: number;
  layout: DemandLayout;
  /** vCPUs; thread index `vcpus` is the VMM's main thread. */
  vcpus: number;
  queueCap: number;
  /**
   * The main thread's request mailbox holds up to one request per VM page: a request stays in
   * it after its page arrived by another path (a post-copy push) until the main thread drains
   * it, while the vCPU moves on to its next missing page and asks again, so a busy main thread
   * can owe a request for every page (never more: a page is requested once per discard).
   */
  mailboxCap: number;
  ctl: SharedArrayBuffer;
  state: SharedArrayBuffer;
  /** MINOR: Int32 per VM page, page-cache pfn + 1. */
  pcache: SharedArrayBuffer | null;
  waits: SharedArrayBuffer;
  source: SharedArrayBuffer | null;
  delayUs: number;
}

export function createUffdShared(o: Omit<UffdShared, 'ctl' | 'state' | 'pcache' | 'waits' | 'queueCap' | 'mailboxCap'>): UffdShared {
  const queueCap = Math.max(64, 4 * (o.vcpus + 1));
  const mailboxCap = o.layout.totalPages + queueCap;
  const words = queuesBase(o.vcpus) + o.layout.uffds * roundLine(FaultQueue.words(queueCap)) + roundLine(FaultQueue.words(mailboxCap));
  return {
    ...o,
    queueCap,
    mailboxCap,
    ctl: new SharedArrayBuffer(words * 4),
    state: new SharedArrayBuffer(Math.max(1, o.layout.totalPages) * 4),
    pcache: o.mode === 'minor' ? new SharedArrayBuffer(Math.max(1, o.layout.totalPages) * 4) : null,
    waits: WaitHistogram.create(Math.max(1, o.vcpus)).sab,
  };
}

function roundLine(words: number): number {
  return Math.ceil(words / 16) * 16;
}

function queuesBase(vcpus: number): number {
  return C_WAITING_ON + (vcpus + 1) * 16;
}

export class SoftUserfaultfd {
  readonly ctl: Int32Array;
  readonly state: Int32Array;
  readonly pcache: Int32Array | null;
  readonly histogram: WaitHistogram;
  /** One queue per uffd, then the main thread's request mailbox. */
  readonly queues: FaultQueue[] = [];
  readonly mailbox: FaultQueue;
  private readonly delayWord = new Int32Array(new SharedArrayBuffer(4));

  constructor(
    readonly sh: UffdShared,
    private readonly mm: HostAddressSpace,
    private readonly mem: HostMemory,
    /** The run-control block on a vCPU thread (its pause / exit words); null on other threads. */
    private readonly runCtl: Int32Array | null,
  ) {
    this.ctl = new Int32Array(sh.ctl);
    this.state = new Int32Array(sh.state);
    this.pcache = sh.pcache ? new Int32Array(sh.pcache) : null;
    this.histogram = new WaitHistogram(sh.waits);
    const qWords = roundLine(FaultQueue.words(sh.queueCap));
    for (let u = 0; u < sh.layout.uffds; u++) this.queues.push(new FaultQueue(this.ctl, queuesBase(sh.vcpus) + u * qWords, sh.queueCap));
    this.mailbox = new FaultQueue(this.ctl, queuesBase(sh.vcpus) + sh.layout.uffds * qWords, sh.mailboxCap);
  }

  get mainThread(): number {
    return this.sh.vcpus;
  }

  active(): boolean {
    return Atomics.load(this.ctl, C_ACTIVE) !== 0;
  }

  setActive(on: boolean): void {
    Atomics.store(this.ctl, C_ACTIVE, on ? 1 : 0);
  }

  hva(i: number): number {
    return hvaOfPage(this.sh.layout, i);
  }

  present(i: number): boolean {
    return this.mm.lookupPfn(this.hva(i)) >= 0;
  }

  /** present(i) for pages [first, first + count) of one demand-paged slot run, into out[0..count); returns how many. */
  presentRun(first: number, count: number, out: Uint8Array): number {
    return this.mm.populated(this.hva(first), count, out);
  }

  /** present(i) for every page of the VM (one pass over the host page table), and how many. */
  presentAll(): { map: Uint8Array; count: number } {
    const map = new Uint8Array(this.sh.layout.totalPages);
    let count = 0;
    for (const s of this.sh.layout.slots) count += this.mm.populated(s.hva, s.pages, map, s.first);
    return { map, count };
  }

  /**
   * Take a fault on VM page i on this thread and wait until the page is in. thread: the vCPU,
   * or mainThread. True: the page is present (or demand paging ended: retry the access);
   * false: a pause or stop request came first (the vCPU leaves; it faults again on re-entry).
   */
  fault(i: number, thread: number): boolean {
    const st = this.state;
    Atomics.add(this.ctl, C_FAULTS, 1);
    const waitingOn = C_WAITING_ON + thread * 16;
    try {
      for (;;) {
        if (this.present(i) || !this.active()) return true;
        const w = Atomics.load(st, i);
        if (w === 0) {
          if (Atomics.compareExchange(st, i, 0, PENDING) !== 0) continue;
          if (this.present(i)) {
            this.wake(i);
            return true;
          }
          this.request(i, thread);
          continue; // now wait like any other faulter (or find it installed)
        }
        Atomics.store(this.ctl, waitingOn, i + 1);
        if (Atomics.compareExchange(st, i, w, w + WAITER) !== w) continue;
        if (this.present(i)) return true;
        if (this.interrupted()) return false;
        Atomics.wait(st, i, w + WAITER);
      }
    } finally {
      Atomics.store(this.ctl, waitingOn, 0);
    }
  }

  /** The claimer of page i asks for it, by the configured path. */
  private request(i: number, thread: number): void {
    const sh = this.sh;
    const main = thread === this.mainThread;
    if (sh.path === 'uffd' && !(main && sh.source === null)) {
      // handle_userfault: queue the event for the uffd's readers; sleep below.
      this.queues[uffdOfPage(sh.layout, i)]!.push(i, main ? -1 : thread);
      return;
    }
    if (sh.source !== null) {
      // Memory-fault exit (or the VMM's own read): this thread fetches and COPYs, no WAKE needed
      // for itself; others that wait on the page are woken by the install.
      this.fetchAndInstall(i);
      return;
    }
    if (main) {
      this.wake(i);
      throw new DemandPagingError(`guest page ${i} is missing and has no local source: the VMM's main thread cannot wait for its own onRequest handler; install() it first`);
    }
    Atomics.add(this.ctl, C_REQUESTS, 1);
    this.mailbox.push(i, thread);
  }

  private interrupted(): boolean {
    const c = this.runCtl;
    if (!this.active()) return true;
    return c !== null && (Atomics.load(c, G_PAUSE) !== 0 || Atomics.load(c, G_EXIT) !== 0);
  }

  /** Fetch page i from the local source (with its delay) on this thread, install it, wake. */
  fetchAndInstall(i: number): InstallResult {
    const sh = this.sh;
    Atomics.add(this.ctl, C_REQUESTS, 1);
    if (sh.delayUs > 0) Atomics.wait(this.delayWord, 0, 0, sh.delayUs / 1000);
    return this.install(i, new Uint8Array(sh.source!, i * PAGE, PAGE));
  }

  /** A reader thread's answer to one queued event. */
  serve(i: number, vcpu: number): void {
    if (this.present(i)) {
      this.wake(i); // arrived by another path: UFFDIO_WAKE alone
      return;
    }
    if (this.sh.source !== null) this.fetchAndInstall(i);
    else {
      Atomics.add(this.ctl, C_REQUESTS, 1);
      this.mailbox.push(i, vcpu);
    }
  }

  /** COPY (MISSING) or shared-mapping write + CONTINUE (MINOR), then wake page i's waiters. */
  install(i: number, data: Uint8Array): InstallResult {
    if (data.length !== PAGE) throw new DemandPagingError(`install: a page is ${PAGE} bytes, got ${data.length}`);
    const r = this.sh.mode === 'minor' ? this.installMinor(i, data) : this.installMissing(i, data);
    if (r === 'installed') {
      Atomics.add(this.ctl, C_INSTALLED, 1);
      Atomics.sub(this.ctl, C_MISSING, 1);
    } else Atomics.add(this.ctl, C_DUPLICATES, 1);
    this.wake(i);
    return r;
  }

  private installMissing(i: number, data: Uint8Array): InstallResult {
    const e = this.mm.uffdCopy(this.hva(i), data);
    if (e === 0) return 'installed';
    if (e === EEXIST) return 'exists';
    throw new DemandPagingError(`UFFDIO_COPY of guest page ${i} (hva 0x${this.hva(i).toString(16)}) failed: errno ${e}`);
  }

  private installMinor(i: number, data: Uint8Array): InstallResult {
    const pc = this.pcache!;
    for (;;) {
      const v = Atomics.load(pc, i);
      if (v === 0) throw new DemandPagingError(`MINOR fault on guest page ${i}: the page cache has no page there`);
      if (v < 0) {
        if (this.present(i)) return 'exists';
        continue; // another installer is writing it: it will be present in a moment
      }
      if (Atomics.compareExchange(pc, i, v, -v) !== v) continue;
      try {
        if (this.present(i)) return 'exists';
        const pfn = v - 1;
        this.mem.windowBytes[pfn >>> WINDOW_SHIFT]!.set(data, (pfn & WINDOW_MASK) * PAGE);
        const e = this.mm.uffdContinue(this.hva(i), pfn);
        if (e === 0) return 'installed';
        if (e === EEXIST) return 'exists';
        throw new DemandPagingError(`UFFDIO_CONTINUE of guest page ${i} failed: errno ${e}`);
      } finally {
        Atomics.store(pc, i, v);
      }
    }
  }

  /** UFFDIO_WAKE: page i is in; release its fault and wake whoever sleeps on it. */
  wake(i: number): void {
    const old = Atomics.exchange(this.state, i, 0);
    if (old >= WAITER) {
      Atomics.add(this.ctl, C_WAKES, 1);
      Atomics.notify(this.state, i);
    }
  }

  /** Make sleepers re-test their conditions (pause, stop, finish). Any thread, after the request word is stored. */
  kickSleepers(): void {
    const st = this.state;
    for (let t = 0; t <= this.sh.vcpus; t++) {
      const j = Atomics.load(this.ctl, C_WAITING_ON + t * 16) - 1;
      if (j < 0) continue;
      for (;;) {
        const w = Atomics.load(st, j);
        if ((w & PENDING) === 0 || Atomics.compareExchange(st, j, w, w + WAITER) === w) break;
      }
      Atomics.notify(st, j);
    }
  }

  /** Pages newly missing (start, discard). Main thread. */
  addMissing(n: number): void {
    Atomics.add(this.ctl, C_MISSING, n);
  }

  counters(): { faults: number; requests: number; installed: number; duplicates: number; missing: number; wakes: number } {
    const c = this.ctl;
    return {
      faults: Atomics.load(c, C_FAULTS),
      requests: Atomics.load(c, C_REQUESTS),
      installed: Atomics.load(c, C_INSTALLED),
      duplicates: Atomics.load(c, C_DUPLICATES),
      missing: Atomics.load(c, C_MISSING),
      wakes: Atomics.load(c, C_WAKES),
    };
  }
}
