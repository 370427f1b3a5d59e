// A reader/writer lock on Atomics over two Int32 words of a SharedArrayBuffer, usable from the
// main thread and worker threads alike (Node allows Atomics.wait on the main thread).
//
// Shared words (at `offset` in the Int32Array):
//   state    bits  0-19  readers holding the lock (or optimistically entering, see readLock)
//            bits 20-29  writers waiting for the lock (PENDING); any pending writer blocks new
//                        readers, so a stream of readers cannot starve a writer
//            bit  30     a writer holds the lock
//   waiters  threads inside Atomics.wait on `state`. Unlockers call Atomics.notify only when it
//            is non-zero: an uncontended notify costs 60-90 ns here, more than the lock itself.
//
// All updates are Atomics RMW operations on `state`; nothing else writes it. A waiter increments
// `waiters` BEFORE it re-reads `state` and waits for that exact value, and an unlocker changes
// `state` BEFORE it reads `waiters`; with seq-cst atomics either the waiter sees the new state
// (its wait returns at once) or the unlocker sees the waiter (and notifies). Waiters spin ~64
// loads (~0.5 us, the cost of a spin hand-off) before sleeping (a wait/notify round trip is
// ~10 us); sleeps are bounded (10 ms) and re-check, so a lost wake-up costs time, not liveness.
//
// Per-thread bookkeeping (readHeld/writeHeld) lives in this object, one per thread (attach()),
// and backs the assert helpers. Read locks do not nest: a thread that read-locks twice while a
// writer is pending deadlocks, so readLock asserts it does not already hold the lock.

export interface RwLockShared {
  sab: SharedArrayBuffer;
  offset: number;
}

const READERS_MASK = 0xfffff;
const PENDING_ONE = 1 << 20;
const PENDING_MASK = 0x3ff << 20;
const WRITER = 1 << 30;
const SPIN_LOADS = 64;
const SLEEP_MS = 10;

export class LockError extends Error {
  override name = 'LockError';
}

export class RwLock {
  private readonly w: Int32Array;
  private readonly st: number;
  private readonly wt: number;
  private readHeld = false;
  private writeHeld = false;
  /** Times this thread had to sleep (for contention statistics). */
  sleeps = 0;

  private constructor(readonly shared: RwLockShared) {
    this.w = new Int32Array(shared.sab);
    this.st = shared.offset;
    this.wt = shared.offset + 1;
  }

  /** A new lock in its own SharedArrayBuffer, or in two words of `sab` at `offset`. */
  static create(sab?: SharedArrayBuffer, offset = 0): RwLock {
    const shared = { sab: sab ?? new SharedArrayBuffer(64), offset };
    const lock = new RwLock(shared);
    Atomics.store(lock.w, lock.st, 0);
    Atomics.store(lock.w, lock.wt, 0);
    return lock;
  }

  static attach(shared: RwLockShared): RwLock {
    return new RwLock(shared);
  }

  readLock(): void {
    if (this.readHeld || this.writeHeld) throw new LockError('readLock: this thread already holds the lock');
    // Optimistic: one RMW when uncontended. If a writer holds or waits, back out and wait.
    const prev = Atomics.add(this.w, this.st, 1);
    if ((prev & (WRITER | PENDING_MASK)) !== 0) {
      this.backOutReader();
      this.readLockSlow();
    }
    this.readHeld = true;
  }

  tryReadLock(): boolean {
    if (this.readHeld || this.writeHeld) throw new LockError('tryReadLock: this thread already holds the lock');
    const prev = Atomics.add(this.w, this.st, 1);
    if ((prev & (WRITER | PENDING_MASK)) !== 0) {
      this.backOutReader();
      return false;
    }
    this.readHeld = true;
    return true;
  }

  readUnlock(): void {
    if (!this.readHeld) throw new LockError('readUnlock: this thread holds no read lock');
    this.readHeld = false;
    const prev = Atomics.sub(this.w, this.st, 1);
    // Only the last reader out can let a writer in.
    if ((prev & READERS_MASK) === 1 && (prev & PENDING_MASK) !== 0 && Atomics.load(this.w, this.wt) !== 0) {
      Atomics.notify(this.w, this.st);
    }
  }

  writeLock(): void {
    if (this.readHeld || this.writeHeld) throw new LockError('writeLock: this thread already holds the lock');
    // Uncontended: one compare-and-exchange.
    if (Atomics.compareExchange(this.w, this.st, 0, WRITER) === 0) {
      this.writeHeld = true;
      return;
    }
    Atomics.add(this.w, this.st, PENDING_ONE);
    for (let spins = 0; ; spins++) {
      const s = Atomics.load(this.w, this.st);
      if ((s & (READERS_MASK | WRITER)) === 0) {
        if (Atomics.compareExchange(this.w, this.st, s, s - PENDING_ONE + WRITER) === s) break;
        continue;
      }
      if (spins >= SPIN_LOADS) this.sleepWhile(s);
    }
    this.writeHeld = true;
  }

  /** Take the write lock only if nobody holds or waits for the lock. */
  tryWriteLock(): boolean {
    if (this.readHeld || this.writeHeld) throw new LockError('tryWriteLock: this thread already holds the lock');
    if (Atomics.compareExchange(this.w, this.st, 0, WRITER) !== 0) return false;
    this.writeHeld = true;
    return true;
  }

  writeUnlock(): void {
    if (!this.writeHeld) throw new LockError('writeUnlock: this thread holds no write lock');
    this.writeHeld = false;
    Atomics.sub(this.w, this.st, WRITER);
    if (Atomics.load(this.w, this.wt) !== 0) Atomics.notify(this.w, this.st);
  }

  /** This thread holds the lock for read. */
  assertReadHeld(): void {
    if (!this.readHeld) throw new LockError('read lock not held by this thread');
  }

  assertWriteHeld(): void {
    if (!this.writeHeld) throw new LockError('write lock not held by this thread');
  }

  /** This thread holds the lock in either mode. */
  assertHeld(): void {
    if (!this.readHeld && !this.writeHeld) throw new LockError('lock not held by this thread');
  }

  get isReadHeld(): boolean {
    return this.readHeld;
  }

  get isWriteHeld(): boolean {
    return this.writeHeld;
  }

  /** Raw state word (tests, diagnostics). */
  rawState(): { readers: number; pendingWriters: number; writer: boolean; waiters: number } {
    const s = Atomics.load(this.w, this.st);
    return { readers: s & READERS_MASK, pendingWriters: (s & PENDING_MASK) >>> 20, writer: (s & WRITER) !== 0, waiters: Atomics.load(this.w, this.wt) };
  }

  private backOutReader(): void {
    const prev = Atomics.sub(this.w, this.st, 1);
    // Our transient count may be what a pending writer is waiting on.
    if ((prev & READERS_MASK) === 1 && Atomics.load(this.w, this.wt) !== 0) Atomics.notify(this.w, this.st);
  }

  private readLockSlow(): void {
    for (let spins = 0; ; spins++) {
      const s = Atomics.load(this.w, this.st);
      if ((s & (WRITER | PENDING_MASK)) === 0) {
        if (Atomics.compareExchange(this.w, this.st, s, s + 1) === s) return;
        continue;
      }
      if (spins >= SPIN_LOADS) this.sleepWhile(s);
    }
  }

  private sleepWhile(s: number): void {
    Atomics.add(this.w, this.wt, 1);
    if (Atomics.load(this.w, this.st) === s) {
      this.sleeps++;
      Atomics.wait(this.w, this.st, s, SLEEP_MS);
    }
    Atomics.sub(this.w, this.wt, 1);
  }
}
