// RCU-style epochs: what makes "nobody reads a freed table page" true.
//
// Shared state (one SharedArrayBuffer, Int32 words):
//   global epoch     starts at 1; advanced (Atomics.add) by every reclaim().
//   reader slots     one per thread, 128 bytes apart (no false sharing). 0 = quiescent; E > 0 =
//                    in a read section entered while the global epoch was E. Written only by the
//                    thread that owns the slot (Atomics.store); read by reclaimers (Atomics.load).
//   slot owners      0/1 per slot, claimed by Atomics.compareExchange (claimSlot()).
//   retired list     a lock-free stack of retired ids (e.g. table pages) linked through next[],
//                    each with the epoch at which it was retired and a small tag. Pushed with
//                    compareExchange on the head; taken whole with Atomics.exchange(head, NIL).
//                    Neither operation suffers ABA (nothing pops a single element).
//
// Protocol:
//   reader:    readLock(): slot = load(global)   (then reads shared pointers)
//              readUnlock(): slot = 0
//   updater:   unlink the object (an Atomics store / compareExchange in the page table), THEN
//              deferFree(id): epoch[id] = add(global, 1) (the value before); push id.
//   reclaimer: add(global, 1); every retired id older than the oldest active slot (or any id
//              when no slot is active) is freed; the rest go back on the list.
// Epochs are Int32 and wrap: "older" is decided by age relative to the current epoch
// ((now - e) | 0), valid while no reader stays in a section across 2^31 epoch advances. 0 means
// quiescent, so a reader that reads epoch 0 publishes -1 (one older: conservative, never unsafe).
// Why it is safe: a reader whose slot a reclaimer saw as 0, or as an epoch greater than the
// id's retire epoch, published its slot after the unlink in the total order of seq-cst atomics,
// so it cannot reach the unlinked object. Readers read page-table words with plain loads after
// their Atomics.store to the slot; V8 compiles a seq-cst store to xchg on x86-64 (a full fence),
// so those loads are not hoisted above it.
//
// Who reclaims: reclaim() is non-blocking and may run on any thread outside its own read section.
// Stage2PageTable calls it at the end of every operation that retired something, and
// MmuLock.exclusiveUnlock() calls it; the owner of the VM should also call it now and then (a
// retired id waits until the next reclaim after its grace period). synchronize() blocks until a
// grace period has passed for everything retired before the call, then reclaims. drainAll() frees everything unconditionally (only
// when no reader can exist: VM teardown).
//
// callRcu(fn) queues a closure on THIS thread (functions cannot cross threads); it runs in a
// later reclaim() or synchronize() on this thread after its grace period.

export interface EpochShared {
  sab: SharedArrayBuffer;
  maxSlots: number;
  capacity: number;
}

const G_EPOCH = 0;
const G_HEAD = 1;
const G_PENDING = 2; // ids on the retired list
const G_FREED = 3; // statistics
const HEADER_WORDS = 32;
const SLOT_STRIDE = 32; // words (128 bytes)
const NIL = -1;

/** What a reclaimer does with an id whose grace period is over. */
export type FreeRetired = (id: number, tag: number) => void;

export class EpochError extends Error {
  override name = 'EpochError';
}

export class EpochDomain {
  private readonly w: Int32Array;
  private readonly slotBase: number;
  private readonly ownerBase: number;
  private readonly nextBase: number;
  private readonly epochBase: number;
  private readonly tagBase: number;
  readonly maxSlots: number;
  readonly capacity: number;
  /** Read-section nesting per slot on this thread (slots are thread-owned). */
  private readonly depth: Int32Array;
  private readonly localCallbacks: { epoch: number; fn: () => void }[] = [];

  private constructor(readonly shared: EpochShared, private readonly freeRetired: FreeRetired) {
    this.w = new Int32Array(shared.sab);
    this.maxSlots = shared.maxSlots;
    this.capacity = shared.capacity;
    this.slotBase = HEADER_WORDS;
    this.ownerBase = this.slotBase + shared.maxSlots * SLOT_STRIDE;
    this.nextBase = this.ownerBase + shared.maxSlots;
    this.epochBase = this.nextBase + shared.capacity;
    this.tagBase = this.epochBase + shared.capacity;
    this.depth = new Int32Array(shared.maxSlots);
  }

  /** A domain for up to maxSlots reader threads and retired ids in [0, capacity). */
  static create(opts: { maxSlots: number; capacity: number; initialEpoch?: number }, freeRetired: FreeRetired): EpochDomain {
    const words = HEADER_WORDS + opts.maxSlots * SLOT_STRIDE + opts.maxSlots + 3 * opts.capacity;
    const shared: EpochShared = { sab: new SharedArrayBuffer(words * 4), maxSlots: opts.maxSlots, capacity: opts.capacity };
    const d = new EpochDomain(shared, freeRetired);
    Atomics.store(d.w, G_EPOCH, opts.initialEpoch ?? 1);
    Atomics.store(d.w, G_HEAD, NIL);
    return d;
  }

  /** The same domain in another thread; freeRetired runs for ids this thread reclaims. */
  static attach(shared: EpochShared, freeRetired: FreeRetired): EpochDomain {
    return new EpochDomain(shared, freeRetired);
  }

  /** Claim a free reader slot for the calling thread; throws when all are taken. */
  claimSlot(): number {
    for (let i = 0; i < this.maxSlots; i++) {
      if (Atomics.compareExchange(this.w, this.ownerBase + i, 0, 1) === 0) return i;
    }
    throw new EpochError(`all ${this.maxSlots} epoch reader slots are taken`);
  }

  releaseSlot(slot: number): void {
    if (Atomics.load(this.w, this.slotBase + slot * SLOT_STRIDE) !== 0) throw new EpochError(`releaseSlot(${slot}) inside a read section`);
    Atomics.store(this.w, this.ownerBase + slot, 0);
  }

  /** Enter a read section (nests). Pointers read after this stay valid until readUnlock. */
  readLock(slot: number): void {
    if (this.depth[slot]!++ === 0) {
      const e = Atomics.load(this.w, G_EPOCH);
      Atomics.store(this.w, this.slotBase + slot * SLOT_STRIDE, e === 0 ? -1 : e);
    }
  }

  readUnlock(slot: number): void {
    const d = --this.depth[slot]!;
    if (d === 0) Atomics.store(this.w, this.slotBase + slot * SLOT_STRIDE, 0);
    else if (d < 0) {
      this.depth[slot] = 0;
      throw new EpochError(`readUnlock(${slot}) without readLock`);
    }
  }

  inReadSection(slot: number): boolean {
    return this.depth[slot]! > 0;
  }

  assertReadHeld(slot: number): void {
    if (!(this.depth[slot]! > 0)) throw new EpochError(`slot ${slot} is not in an RCU read section`);
  }

  currentEpoch(): number {
    return Atomics.load(this.w, G_EPOCH);
  }

  /** Ids retired and not yet freed (all threads). */
  pending(): number {
    return Atomics.load(this.w, G_PENDING);
  }

  freedTotal(): number {
    return Atomics.load(this.w, G_FREED);
  }

  /** Hand id to the domain: freed (freeRetired(id, tag)) after a grace period. Call after unlinking it. */
  deferFree(id: number, tag = 0): void {
    if (!(id >= 0 && id < this.capacity)) throw new EpochError(`deferFree(${id}): id out of range [0, ${this.capacity})`);
    // Advancing the epoch here (rather than only in reclaim) means readers that enter after the
    // retirement publish a later epoch and do not hold this id back.
    Atomics.store(this.w, this.epochBase + id, Atomics.add(this.w, G_EPOCH, 1));
    Atomics.store(this.w, this.tagBase + id, tag);
    Atomics.add(this.w, G_PENDING, 1);
    this.push(id);
  }

  /** Run fn on this thread after a grace period (in a later reclaim/synchronize here). */
  callRcu(fn: () => void): void {
    this.localCallbacks.push({ epoch: Atomics.load(this.w, G_EPOCH), fn });
  }

  /**
   * Free what no reader can still see; returns how many ids were freed. Non-blocking. Must not be
   * called from inside the caller's own read section for a retirement it made in that section
   * (its own slot would hold the grace period open; harmless, just ineffective).
   */
  reclaim(): number {
    const noWork = Atomics.load(this.w, G_HEAD) === NIL && this.localCallbacks.length === 0;
    if (noWork) return 0;
    const now = (Atomics.add(this.w, G_EPOCH, 1) + 1) | 0;
    const oldest = this.oldestActiveAge(now);
    let freed = 0;
    let failure: unknown;
    let id = Atomics.exchange(this.w, G_HEAD, NIL);
    while (id !== NIL) {
      const next = Atomics.load(this.w, this.nextBase + id);
      if (((now - Atomics.load(this.w, this.epochBase + id)) | 0) > oldest) {
        Atomics.sub(this.w, G_PENDING, 1);
        Atomics.add(this.w, G_FREED, 1);
        // One failing free (a bug the callback detected) must not lose the rest of the list.
        try {
          this.freeRetired(id, Atomics.load(this.w, this.tagBase + id));
        } catch (e) {
          failure ??= e;
        }
        freed++;
      } else {
        this.push(id);
      }
      id = next;
    }
    if (this.localCallbacks.length > 0) {
      const keep: { epoch: number; fn: () => void }[] = [];
      const run: (() => void)[] = [];
      for (const cb of this.localCallbacks) {
        if (((now - cb.epoch) | 0) > oldest) run.push(cb.fn);
        else keep.push(cb);
      }
      this.localCallbacks.length = 0;
      this.localCallbacks.push(...keep);
      for (const fn of run) fn();
    }
    if (failure !== undefined) throw failure;
    return freed;
  }

  /**
   * Block until a grace period has elapsed for everything retired before this call (every reader
   * that was inside a read section has left it), then reclaim(). The caller must not be in a read
   * section. Spins, then sleeps 50 us at a time; throws after timeoutMs (a reader stuck inside).
   */
  synchronize(timeoutMs = 10_000): void {
    for (let s = 0; s < this.maxSlots; s++) {
      if (this.depth[s]! > 0) throw new EpochError(`synchronize() inside read section of slot ${s}`);
    }
    const target = Atomics.add(this.w, G_EPOCH, 1);
    const deadline = Date.now() + timeoutMs;
    let sleeper: Int32Array | undefined;
    // Wait until every active reader entered after `target` (age younger than target's).
    for (let spin = 0; ; spin++) {
      const now = Atomics.load(this.w, G_EPOCH);
      if (this.oldestActiveAge(now) < ((now - target) | 0)) break;
      if (Date.now() > deadline) throw new EpochError(`synchronize(): a reader stayed in its read section for ${timeoutMs} ms`);
      if (spin > 100) Atomics.wait((sleeper ??= new Int32Array(new SharedArrayBuffer(4))), 0, 0, 0.05);
    }
    // Every id retired before the call is now past its grace period; free what is on the list
    // (an id another thread's reclaim() holds at this moment is freed by that thread).
    this.reclaim();
  }

  /** Free every retired id now, ignoring readers. Only for teardown when no reader can exist. */
  drainAll(): number {
    let freed = 0;
    for (;;) {
      let id = Atomics.exchange(this.w, G_HEAD, NIL);
      if (id === NIL) break;
      while (id !== NIL) {
        const next = Atomics.load(this.w, this.nextBase + id);
        Atomics.sub(this.w, G_PENDING, 1);
        Atomics.add(this.w, G_FREED, 1);
        this.freeRetired(id, Atomics.load(this.w, this.tagBase + id));
        freed++;
        id = next;
      }
    }
    const cbs = this.localCallbacks.splice(0);
    for (const cb of cbs) cb.fn();
    return freed;
  }

  /** Slots currently inside a read section (for assertions at teardown). */
  activeReaders(): number {
    let n = 0;
    for (let s = 0; s < this.maxSlots; s++) if (Atomics.load(this.w, this.slotBase + s * SLOT_STRIDE) !== 0) n++;
    return n;
  }

  /** Largest (now - e) over active slots: the oldest reader's age; -1 when none is active. */
  private oldestActiveAge(now: number): number {
    let oldest = -1;
    for (let s = 0; s < this.maxSlots; s++) {
      const e = Atomics.load(this.w, this.slotBase + s * SLOT_STRIDE);
      if (e === 0) continue;
      const age = (now - e) | 0;
      if (age > oldest) oldest = age;
    }
    return oldest;
  }

  private push(id: number): void {
    for (;;) {
      const h = Atomics.load(this.w, G_HEAD);
      Atomics.store(this.w, this.nextBase + id, h);
      if (Atomics.compareExchange(this.w, G_HEAD, h, id) === h) return;
    }
  }
}
