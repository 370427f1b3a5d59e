// Memslot generations published to vCPU threads (kvm->memslots under SRCU).
//
// The VMM thread owns the MemslotSet. Each change produces a new immutable generation: an array
// of SlotDesc (with the slot's shared dirty bitmap, if logging to one) numbered by a counter starting
// at 1. Concurrency rules:
// - Publisher (VMM thread only): post the new generation to every vCPU's MessagePort, THEN store
//   its number in G_SLOTS_GEN. synchronize() then waits until no vCPU's reader word
//   (V_SLOTS_READER) names an older generation: afterwards no fault can still be using the old
//   set (synchronize_srcu), so the caller may zap mappings of a deleted slot, write-protect a
//   slot that just started logging, or drop an old bitmap.
// - Reader (a vCPU, around one fault, or for its whole guest-mode section, see below): store the
//   generation it is about to use in its reader word, re-read G_SLOTS_GEN and retry on a change
//   (so a publisher that saw the word as 0 or new cannot miss a reader that then uses an old
//   set), and drain its port up to that generation with receiveMessageOnPort. readUnlock
//   stores 0.
// - A vCPU holds a reader for its whole guest-mode section (mmu/vcpu-mmu.ts), as KVM's vCPU
//   holds kvm->srcu outside the guest, so the lockless fast path needs no reader of its own.
//   publish() therefore bumps G_REQ after G_SLOTS_GEN: a vCPU in guest mode checks G_REQ before
//   every few accesses and, seeing a newer generation (stale()), drops and retakes its reader,
//   which is what synchronize() waits for. Nothing a vCPU does in guest mode waits on the VMM.
// - A reader sees one whole generation: its slots array is never mutated after publication.
import { receiveMessageOnPort, type MessagePort } from 'node:worker_threads';
import { G_REQ, G_SLOTS_GEN, G_SLOTS_WAITERS, V_SLOTS_READER, vcpuBase } from '../vcpu/control.ts';

/** One memslot as the fault handler sees it (kvm_memory_slot). */
export interface SlotDesc {
  slot: number;
  flags: number;
  baseGfn: number;
  npages: number;
  /** Host virtual address of the slot's first byte (userspace_addr). */
  hva: number;
  /** The host VMA behind the slot allows writes (gates the fast path's relaxing of W). */
  hostWritable: boolean;
  /** KVM_MEM_LOG_DIRTY_PAGES is set: faults mark pages dirty through their DirtySink. */
  logDirty: boolean;
  /**
   * Dirty bitmap (KVM layout, shared) while logging on a VM without a dirty ring, else null
   * (kvm_use_dirty_bitmap).
   */
  dirtyBitmap: Uint32Array | null;
}

export interface SlotGeneration {
  gen: number;
  slots: SlotDesc[];
}

/** gfn -> slot in one generation; remembers the last hit (vCPUs fault mostly within one slot). */
export class SlotLookup {
  private last: SlotDesc | null = null;
  slots: SlotDesc[] = [];

  set(slots: SlotDesc[]): void {
    this.slots = slots;
    this.last = null;
  }

  find(gfn: number): SlotDesc | null {
    const last = this.last;
    if (last !== null && gfn >= last.baseGfn && gfn < last.baseGfn + last.npages) return last;
    const slots = this.slots;
    for (let i = 0; i < slots.length; i++) {
      const s = slots[i]!;
      if (gfn >= s.baseGfn && gfn < s.baseGfn + s.npages) {
        this.last = s;
        return s;
      }
    }
    return null;
  }
}

/** VMM side. */
export class SlotPublisher {
  private gen: number;
  private readonly ports: MessagePort[] = [];
  current: SlotGeneration;

  constructor(
    private readonly ctl: Int32Array,
    private readonly vcpuCount: () => number,
  ) {
    this.gen = 1;
    this.current = { gen: 1, slots: [] };
    Atomics.store(ctl, G_SLOTS_GEN, 1);
  }

  addPort(port: MessagePort): void {
    this.ports.push(port);
  }

  /** Publish a new generation (rcu_assign_pointer); call synchronize() before reusing the old. */
  publish(slots: SlotDesc[]): SlotGeneration {
    this.gen = (this.gen + 1) | 0 || 1;
    const next: SlotGeneration = { gen: this.gen, slots };
    for (const p of this.ports) p.postMessage(next);
    this.current = next;
    Atomics.store(this.ctl, G_SLOTS_GEN, this.gen);
    Atomics.add(this.ctl, G_REQ, 1); // vCPUs in guest mode: refresh your reader (see header)
    return next;
  }

  /**
   * synchronize_srcu: wait until every vCPU reads no generation older than the current one.
   * timeoutMs (tests) turns a reader that never leaves into an error instead of a hang.
   */
  synchronize(timeoutMs = Infinity): void {
    const gen = this.gen;
    const n = this.vcpuCount();
    const deadline = Date.now() + timeoutMs;
    for (let v = 0; v < n; v++) {
      const w = vcpuBase(v) + V_SLOTS_READER;
      let spins = 0;
      for (;;) {
        const r = Atomics.load(this.ctl, w);
        if (r === 0 || r === gen) break;
        if (Date.now() > deadline) throw new Error(`synchronize: vCPU ${v} still reads memslot generation ${r} after ${timeoutMs} ms`);
        if (++spins < 1000) continue;
        Atomics.add(this.ctl, G_SLOTS_WAITERS, 1);
        Atomics.wait(this.ctl, w, r, 1);
        Atomics.sub(this.ctl, G_SLOTS_WAITERS, 1);
      }
    }
  }

  close(): void {
    for (const p of this.ports) p.close();
    this.ports.length = 0;
  }
}

/** vCPU side: srcu_read_lock / srcu_read_unlock around one fault. */
export class SlotReader {
  private gen: number;
  private readonly readerWord: number;
  readonly lookup = new SlotLookup();

  constructor(
    private readonly ctl: Int32Array,
    vcpu: number,
    private readonly port: MessagePort | null,
    initial: SlotGeneration,
  ) {
    this.readerWord = vcpuBase(vcpu) + V_SLOTS_READER;
    this.gen = initial.gen;
    this.lookup.set(initial.slots);
  }

  /** The generation this thread's reader word names (0: not reading). Only this thread writes it. */
  private registered = 0;

  readLock(): SlotLookup {
    const ctl = this.ctl;
    let g = Atomics.load(ctl, G_SLOTS_GEN);
    for (;;) {
      Atomics.store(ctl, this.readerWord, g);
      const again = Atomics.load(ctl, G_SLOTS_GEN);
      if (again === g) break;
      g = again;
    }
    this.registered = g;
    if (g !== this.gen) this.catchUp(g);
    return this.lookup;
  }

  /**
   * The current generation without registering as a reader. Only for a caller holding the MMU
   * fault lock that installs nothing new (the fast path): the VMM publishes a generation before
   * it takes the exclusive lock to act on it, so under the fault lock the current generation is
   * at least as new as any change already acted on.
   */
  peek(): SlotLookup {
    // A plain load is enough: the caller just took the MMU lock with an atomic read-modify-write
    // (a full barrier, and an opaque call V8 cannot move this load above).
    const g = this.ctl[G_SLOTS_GEN]!;
    if (g !== this.gen) this.catchUp(g);
    return this.lookup;
  }

  /**
   * A generation newer than the one this reader is registered for has been published (what
   * synchronize() waits on is the registration, so peek() catching up does not count).
   */
  stale(): boolean {
    return this.registered !== 0 && Atomics.load(this.ctl, G_SLOTS_GEN) !== this.registered;
  }

  readUnlock(): void {
    this.registered = 0;
    Atomics.store(this.ctl, this.readerWord, 0);
    if (Atomics.load(this.ctl, G_SLOTS_WAITERS) !== 0) Atomics.notify(this.ctl, this.readerWord);
  }

  private catchUp(target: number): void {
    if (this.port === null) throw new Error(`memslot generation ${target} published but this reader has no port`);
    for (;;) {
      const m = receiveMessageOnPort(this.port);
      if (m === undefined) {
        // Posted before G_SLOTS_GEN was stored; delivery to this port is all that is left.
        Atomics.wait(this.ctl, this.readerWord, this.ctl[this.readerWord]!, 0.05);
        continue;
      }
      const g = m.message as SlotGeneration;
      this.gen = g.gen;
      this.lookup.set(g.slots);
      if (((g.gen - target) | 0) >= 0) return;
    }
  }
}
