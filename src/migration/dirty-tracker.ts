// The source's view of what is still to send (QEMU ram.c's migration bitmap and its sync): dirty
// logging on or off for every memslot, and harvest() ORs each slot's dirty log (or, on a VM with
// dirty rings, what one ring harvest collected for it) into a pending bitmap that the page
// sender drains (clearing bits as pages go out).
//
// Slots whose dirty logging the engine will not switch (kvm refuses KVM_SET_USER_MEMORY_REGION
// on its own internal slot) get a shadow of exactly what was sent (recordSent), and their dirty
// pages are found by comparing the slot with it. Such slots are small (guest code, page tables,
// stacks).
//
// Harvests are few (an idle guest: two in all), so their loops over slot-sized bitmaps run
// unoptimised; the last one is on the downtime path. An empty bitmap (the common case there) is
// recognised by one native compare instead.
//
// Concurrency: the VMM's main thread only (the engine's dirty log is its own business).
import { KVM_MEM_LOG_DIRTY_PAGES, MemslotError, PAGE_SIZE, type MemslotInfo, type Vm } from '../vmm/engine.ts';
import { countBits, newBitmap, setBit } from '../vmm/dirty-bitmap.ts';
import { allZero } from '../util/bulk-scan.ts';

interface Shadow {
  slot: MemslotInfo;
  sent: Buffer;
  /** Kept: a fresh buffer per harvest costs its page faults again, on the downtime path too. */
  cur: Buffer;
}

export class DirtyTracker {
  private readonly shadows = new Map<number, Shadow>();
  private readonly pending = new Map<number, Uint32Array>();
  /** Pages set in `pending` per slot as of the last harvest (0: nothing to scan for). */
  private readonly pendingPages = new Map<number, number>();
  /** Dirty logging is on (setLogging(true) succeeded). */
  logging = false;
  /** Pages the last harvest found newly dirty (before ORing into what was pending). */
  newlyDirty = 0;
  /** Seconds the last harvest's log covered: since the harvest before it, or since logging began. */
  harvestIntervalSeconds = 0;
  private logSinceMs = 0;
  /** Harvests so far (QEMU's dirty-sync-count). */
  syncCount = 0;

  constructor(
    private readonly vm: Vm,
    readonly slots: readonly MemslotInfo[],
    /**
     * Observer of each harvest (the dashboard's heatmap): a slot's newly dirty pages, before
     * they join what is pending. Called synchronously; the bitmap is only lent for the call.
     */
    private readonly onHarvest?: (slot: MemslotInfo, newlyDirty: Uint32Array) => void,
  ) {}

  setLogging(on: boolean): void {
    for (const s of this.slots) {
      if (this.shadows.has(s.slot)) continue;
      try {
        this.vm.setUserMemoryRegion({ slot: s.slot, flags: on ? s.flags | KVM_MEM_LOG_DIRTY_PAGES : s.flags & ~KVM_MEM_LOG_DIRTY_PAGES, guestPhysAddr: s.guestPhysAddr, memorySize: s.memorySize, userspaceAddr: s.userspaceAddr });
      } catch (e) {
        if (!(on && s.internal && e instanceof MemslotError)) throw e;
        this.shadows.set(s.slot, { slot: s, sent: Buffer.alloc(s.memorySize), cur: Buffer.alloc(s.memorySize) });
      }
    }
    this.logging = on;
    if (on) this.logSinceMs = performance.now();
  }

  /**
   * The engine's own dirty log of `slot` can be cleared by the sender (no shadow, and a bitmap:
   * a dirty ring's harvest has already reset, i.e. re-protected, what it collected).
   */
  hasEngineLog(slot: number): boolean {
    return !this.shadows.has(slot) && !this.ring;
  }

  /** The VM logs to per-vCPU dirty rings (KVM_CAP_DIRTY_LOG_RING) rather than memslot bitmaps. */
  private get ring(): boolean {
    return this.vm.config.dirtyRingEntries > 0;
  }

  /** One ring harvest (collect + reset) as a bitmap per slot. */
  private ringLogs(): Map<number, Uint32Array> {
    const logs = new Map<number, Uint32Array>();
    for (const e of this.vm.harvestDirtyRings!()) {
      const s = this.slots.find((x) => x.slot === e.slot);
      if (!s || e.offset >= s.pages) continue;
      let log = logs.get(e.slot);
      if (!log) logs.set(e.slot, (log = newBitmap(s.pages)));
      setBit(log, e.offset);
    }
    return logs;
  }

  /** Pages [page, +pages) of `slot` went out with `data` (null: zero pages): keep its shadow in step. */
  recordSent(slot: number, page: number, data: Uint8Array | null, pages: number): void {
    const shadow = this.shadows.get(slot);
    if (!shadow) return;
    const off = page * PAGE_SIZE;
    if (data) shadow.sent.set(data, off);
    else shadow.sent.fill(0, off, off + pages * PAGE_SIZE);
  }

  /** OR every slot's dirty log into its pending bitmap; returns the pending page count. */
  harvest(): number {
    let n = 0;
    this.newlyDirty = 0;
    const t = performance.now();
    this.harvestIntervalSeconds = this.logSinceMs > 0 ? (t - this.logSinceMs) / 1000 : 0;
    this.logSinceMs = t;
    const ringLogs = this.ring ? this.ringLogs() : null;
    for (const s of this.slots) {
      const shadow = this.shadows.get(s.slot);
      const log = shadow ? this.shadowDirtyLog(shadow) : ringLogs ? (ringLogs.get(s.slot) ?? newBitmap(s.pages)) : this.vm.getDirtyLog(s.slot);
      const logEmpty = allZero(log);
      if (this.onHarvest) this.onHarvest(s, log);
      if (!logEmpty) this.newlyDirty += countBits(log);
      const p = this.pending.get(s.slot);
      if (!p) this.pending.set(s.slot, log);
      else if (!logEmpty) for (let w = 0; w < p.length; w++) p[w]! |= log[w]!;
      const pend = this.pending.get(s.slot)!;
      const count = (logEmpty && this.pendingPages.get(s.slot) === 0) || allZero(pend) ? 0 : countBits(pend);
      this.pendingPages.set(s.slot, count);
      n += count;
    }
    this.syncCount++;
    return n;
  }

  /** The pending bitmap of `slot` if the last harvest left pages in it, else null. */
  pendingOf(slot: number): Uint32Array | null {
    return this.pendingPages.get(slot) === 0 ? null : (this.pending.get(slot) ?? null);
  }

  /** Pending pages of `slot` below `end` (a multiple of 32): what a bulk-round probe counts as re-dirtied. */
  pendingBelow(slot: number, end: number): number {
    const p = this.pending.get(slot);
    return p ? countBits(p.subarray(0, Math.min(p.length, end >>> 5))) : 0;
  }

  /**
   * Set (on) or clear every pending bit of `slot` from page `from` (a multiple of 32) to its end.
   * A bulk-round probe clears what the bulk round will still send anyway, and a switch to
   * post-copy part-way through it sets what the bulk round never sent.
   */
  setPendingFrom(slot: MemslotInfo, from: number, on: boolean): void {
    let p = this.pending.get(slot.slot);
    if (!p) this.pending.set(slot.slot, (p = newBitmap(slot.pages)));
    for (let page = from; page < slot.pages; page += 32) {
      const n = Math.min(32, slot.pages - page);
      p[page >>> 5] = on ? (n === 32 ? 0xffffffff : (1 << n) - 1) : 0;
    }
    this.pendingPages.set(slot.slot, countBits(p));
  }

  private shadowDirtyLog({ slot, sent, cur }: Shadow): Uint32Array {
    this.vm.readGuest(slot.guestPhysAddr, cur);
    const log = newBitmap(slot.pages);
    // Most of the slot is unchanged: compare 16 pages at a time, pages only where a block differs.
    const BLOCK = 16 * PAGE_SIZE;
    for (let b = 0; b < slot.memorySize; b += BLOCK) {
      const e = Math.min(b + BLOCK, slot.memorySize);
      if (cur.compare(sent, b, e, b, e) === 0) continue;
      for (let o = b; o < e; o += PAGE_SIZE) if (cur.compare(sent, o, o + PAGE_SIZE, o, o + PAGE_SIZE) !== 0) setBit(log, o / PAGE_SIZE);
    }
    return log;
  }
}
