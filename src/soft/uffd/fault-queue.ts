// A userfaultfd's fault queue in shared memory: the faulting threads (vCPUs, the VMM's own reads)
// push (page, vcpu) events; the uffd's reader threads pop them (read(2) on the fd). The same
// structure carries page requests from reader and vCPU threads to the VMM's main thread (the
// mailbox of pager.ts). Bounded ring of Int32 pairs.
//
// Concurrency rules (every shared word through Atomics):
// - One lock word guards head, tail and the ring (the fd's fault_pending_wqh spinlock): a
//   futex-style mutex (0 free, 1 held, 2 held with sleepers; Drepper's "Futexes Are Tricky",
//   mutex 3), so every push and pop from every thread really contends on one cache line, as
//   read(2)/poll and handle_userfault do on one uffd.
// - A push writes its entry, then tail, under the lock; a pop reads head and the entry under
//   the lock. After unlocking, a push bumps SEQ and notifies one sleeping reader if WAITERS says
//   one sleeps. A reader reads SEQ BEFORE it finds the ring empty and sleeps on SEQ with that
//   value, so a push that lands in between makes the sleep return at once (no lost wake-up).
// - stop() raises STOP then bumps SEQ and wakes every sleeper; a reader tests STOP after each
//   empty pop.
// - CONTENDED counts lock acquisitions that found the lock held (statistics; Atomics.add).

const Q_LOCK = 0;
const Q_HEAD = 16;
const Q_TAIL = 32;
const Q_SEQ = 48;
const Q_WAITERS = 64;
const Q_STOP = 80;
const Q_CONTENDED = 96;
const Q_PUSHES = 112;
const Q_ENTRIES = 128;
const SPINS = 100;

type WaitAsync = (a: Int32Array, i: number, v: number, t: number) => { async: boolean; value: Promise<string> | string };

export class FaultQueueFull extends Error {
  constructor(cap: number) {
    super(`userfaultfd fault queue full (${cap} events pending): more faults in flight than threads can take; a fault was queued twice`);
    this.name = 'FaultQueueFull';
  }
}

export class FaultQueue {
  /** Int32 words one queue of `cap` entries needs. */
  static words(cap: number): number {
    return Q_ENTRIES + cap * 2;
  }

  /** The vcpu of the last pop. */
  vcpu = 0;

  constructor(
    private readonly w: Int32Array,
    private readonly base: number,
    readonly cap: number,
  ) {}

  private lock(): void {
    const w = this.w;
    const l = this.base + Q_LOCK;
    if (Atomics.compareExchange(w, l, 0, 1) === 0) return;
    Atomics.add(w, this.base + Q_CONTENDED, 1);
    for (let i = 0; i < SPINS; i++) if (Atomics.load(w, l) === 0 && Atomics.compareExchange(w, l, 0, 1) === 0) return;
    while (Atomics.exchange(w, l, 2) !== 0) Atomics.wait(w, l, 2);
  }

  private unlock(): void {
    if (Atomics.exchange(this.w, this.base + Q_LOCK, 0) === 2) Atomics.notify(this.w, this.base + Q_LOCK, 1);
  }

  /** Queue one event; wakes a sleeping reader. Throws FaultQueueFull (a bug: see the class). */
  push(page: number, vcpu: number): void {
    const w = this.w;
    const b = this.base;
    this.lock();
    const head = Atomics.load(w, b + Q_HEAD);
    const tail = Atomics.load(w, b + Q_TAIL);
    if (tail - head >= this.cap) {
      this.unlock();
      throw new FaultQueueFull(this.cap);
    }
    const e = b + Q_ENTRIES + (tail % this.cap) * 2;
    Atomics.store(w, e, page);
    Atomics.store(w, e + 1, vcpu);
    Atomics.store(w, b + Q_TAIL, tail + 1);
    this.unlock();
    Atomics.add(w, b + Q_PUSHES, 1);
    Atomics.add(w, b + Q_SEQ, 1);
    if (Atomics.load(w, b + Q_WAITERS) !== 0) Atomics.notify(w, b + Q_SEQ, 1);
  }

  /** Take one event (its page; `vcpu` set), or -1 when empty. Never sleeps. */
  pop(): number {
    const w = this.w;
    const b = this.base;
    if (Atomics.load(w, b + Q_HEAD) === Atomics.load(w, b + Q_TAIL)) return -1; // racy peek: cheap when idle
    this.lock();
    const head = Atomics.load(w, b + Q_HEAD);
    if (head === Atomics.load(w, b + Q_TAIL)) {
      this.unlock();
      return -1;
    }
    const e = b + Q_ENTRIES + (head % this.cap) * 2;
    const page = Atomics.load(w, e);
    this.vcpu = Atomics.load(w, e + 1);
    Atomics.store(w, b + Q_HEAD, head + 1);
    this.unlock();
    return page;
  }

  /** pop(), sleeping while the queue is empty; -1 once stopped. */
  popWait(): number {
    const w = this.w;
    const b = this.base;
    for (;;) {
      const seq = Atomics.load(w, b + Q_SEQ);
      const p = this.pop();
      if (p >= 0) return p;
      if (Atomics.load(w, b + Q_STOP) !== 0) return -1;
      Atomics.add(w, b + Q_WAITERS, 1);
      Atomics.wait(w, b + Q_SEQ, seq);
      Atomics.sub(w, b + Q_WAITERS, 1);
    }
  }

  /**
   * The main thread's sleep (its event loop keeps running): resolves when SEQ moves from `seen`
   * (a push or stop) or after timeoutMs. Counted in WAITERS like a sleeping reader.
   */
  async nextAsync(seen: number, timeoutMs: number): Promise<void> {
    const w = this.w;
    Atomics.add(w, this.base + Q_WAITERS, 1);
    try {
      const r = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync(w, this.base + Q_SEQ, seen, timeoutMs);
      if (r.async) await r.value;
    } finally {
      Atomics.sub(w, this.base + Q_WAITERS, 1);
    }
  }

  /** SEQ now: read it BEFORE looking at the queue, then sleep with nextAsync(seq). */
  seq(): number {
    return Atomics.load(this.w, this.base + Q_SEQ);
  }

  seqIndex(): number {
    return this.base + Q_SEQ;
  }

  stop(): void {
    Atomics.store(this.w, this.base + Q_STOP, 1);
    Atomics.add(this.w, this.base + Q_SEQ, 1);
    Atomics.notify(this.w, this.base + Q_SEQ);
  }

  stopped(): boolean {
    return Atomics.load(this.w, this.base + Q_STOP) !== 0;
  }

  pending(): number {
    return Atomics.load(this.w, this.base + Q_TAIL) - Atomics.load(this.w, this.base + Q_HEAD);
  }

  stats(): { pushes: number; contended: number } {
    return { pushes: Atomics.load(this.w, this.base + Q_PUSHES), contended: Atomics.load(this.w, this.base + Q_CONTENDED) };
  }
}
