// A tiny in-process engine for migration tests: guest memory in Buffers, the workload stepped on
// the main thread's event loop, a dirty bitmap per memslot. It implements vmm/engine.ts exactly
// enough for the migration layer, so migration tests can run when neither real engine has
// landed or works on this host. It is NOT a model of a second-stage MMU.
//
// Concurrency: none. Everything (the "vCPUs" included) runs on the test's main thread; a vCPU
// step runs between event-loop turns, so pause() takes effect at once.
import {
  KVM_MEM_LOG_DIRTY_PAGES,
  MemslotError,
  PAGE_SIZE,
  type Backing,
  type Engine,
  type EngineCapabilities,
  type HostMapping,
  type MemoryRegion,
  type MemslotInfo,
  type VcpuProgress,
  type VcpuState,
  type Vm,
  type VmConfig,
} from '../../src/vmm/engine.ts';
import { guestWriteValue, initialRngState, pagesPerVcpu, randomPageIndex, xorshift64Step, type WorkloadSpec } from '../../src/guest/workload.ts';
import { newBitmap } from '../../src/vmm/dirty-bitmap.ts';

/** The fake's own "guest code" slot, so that migration of engine-internal slots is exercised. */
export const FAKE_INTERNAL_SLOT = 100;
const INTERNAL_GPA = 0x100000;
const INTERNAL_BYTES = 64 * PAGE_SIZE;
/** Pages each vCPU writes per event-loop turn. */
const PAGES_PER_STEP = 64;

interface Slot extends MemslotInfo {
  mem: Buffer;
  dirty: Uint32Array;
}

interface FakeVcpu {
  passesCompleted: number;
  /** Index of the next write within the current pass. */
  pos: number;
  rng: { hi: number; lo: number };
  halted: boolean;
}

export class FakeEngine implements Engine {
  readonly kind = 'soft' as const;
  capabilities(): EngineCapabilities {
    return { kind: 'soft', manualDirtyLogProtect: true, dirtyRingMaxEntries: 0, memoryFaultExit: false, userfaultfd: false, backings: ['anonymous'], maxVcpus: 8 };
  }
  async createVm(config: VmConfig = {}): Promise<Vm> {
    return new FakeVm(config);
  }
}

export class FakeVm implements Vm {
  readonly engine = 'soft' as const;
  readonly config: Readonly<Required<VmConfig>>;
  private readonly mappings = new Map<number, Buffer>();
  private nextHva = 0x7f0000000000;
  private readonly slots = new Map<number, Slot>();
  private vcpus: FakeVcpu[] = [];
  private spec: WorkloadSpec | null = null;
  private allowance = 0;
  private paused = false;
  private running = false;
  private destroyed = false;
  private timer: NodeJS.Immediate | null = null;
  /** Test hook: pages written per step, so a test can make the guest dirty faster or slower. */
  pagesPerStep = PAGES_PER_STEP;

  constructor(config: VmConfig) {
    this.config = { manualDirtyLogProtect: config.manualDirtyLogProtect ?? true, dirtyRingEntries: 0, lock: config.lock ?? 'parallel', guestPageSize: config.guestPageSize ?? 4096 };
  }

  get vcpuCount(): number {
    return this.vcpus.length;
  }

  mapHostMemory(bytes: number, backing: Backing): HostMapping {
    const hva = this.nextHva;
    this.nextHva += Math.ceil(bytes / 2 ** 21 + 1) * 2 ** 21;
    this.mappings.set(hva, Buffer.alloc(bytes));
    return { hva, bytes, backing };
  }

  setUserMemoryRegion(r: MemoryRegion): void {
    const old = this.slots.get(r.slot);
    if (r.memorySize === 0) {
      if (!old) throw new MemslotError('unknown-slot', `slot ${r.slot} does not exist`);
      this.slots.delete(r.slot);
      return;
    }
    if (r.memorySize % PAGE_SIZE || r.guestPhysAddr % PAGE_SIZE) throw new MemslotError('alignment', 'unaligned region');
    if (old) {
      if (!(r.flags & KVM_MEM_LOG_DIRTY_PAGES)) old.dirty.fill(0);
      old.flags = r.flags;
      return;
    }
    const mem = this.mappings.get(r.userspaceAddr);
    if (!mem || mem.length < r.memorySize) throw new MemslotError('hva', `no mapping at 0x${r.userspaceAddr.toString(16)}`);
    const pages = r.memorySize / PAGE_SIZE;
    this.slots.set(r.slot, { ...r, pages, internal: r.slot === FAKE_INTERNAL_SLOT, mem, dirty: newBitmap(pages) });
  }

  memslots(): readonly MemslotInfo[] {
    return [...this.slots.values()].map(({ mem: _m, dirty: _d, ...info }) => ({ ...info }));
  }

  async createVcpus(count: number, spec: WorkloadSpec): Promise<void> {
    const hva = this.mapHostMemory(INTERNAL_BYTES, 'anonymous').hva;
    const code = this.mappings.get(hva)!;
    for (let i = 0; i < code.length; i += 8) code.writeUInt32LE(0xc0de0000 + i, i);
    this.setUserMemoryRegion({ slot: FAKE_INTERNAL_SLOT, flags: 0, guestPhysAddr: INTERNAL_GPA, memorySize: INTERNAL_BYTES, userspaceAddr: hva });
    this.spec = spec;
    this.vcpus = Array.from({ length: count }, (_, v) => ({ passesCompleted: 0, pos: 0, rng: initialRngState(spec, v), halted: false }));
  }

  allowPasses(passes: number): void {
    this.allowance = passes;
    this.running = true;
    this.schedule();
  }

  private schedule(): void {
    if (this.timer || this.destroyed || this.paused || !this.running) return;
    this.timer = setImmediate(() => {
      this.timer = null;
      if (this.step()) this.schedule();
    });
  }

  /** Run every vCPU for a few pages; false when nobody can make progress. */
  private step(): boolean {
    if (this.paused || this.destroyed || !this.spec) return false;
    const spec = this.spec;
    const pages = pagesPerVcpu(spec);
    let progress = false;
    for (let v = 0; v < this.vcpus.length; v++) {
      const c = this.vcpus[v]!;
      for (let n = 0; n < this.pagesPerStep && !c.halted && c.passesCompleted < this.allowance; n++) {
        const pass = c.passesCompleted + 1;
        const page = spec.kind === 'random' ? randomPageIndex(xorshift64Step(c.rng), pages) : c.pos;
        const { hi, lo } = guestWriteValue(v, pass);
        this.write64(spec.gpaBase + v * spec.bytesPerVcpu + page * PAGE_SIZE, hi, lo);
        progress = true;
        if (++c.pos === pages) {
          c.pos = 0;
          c.passesCompleted++;
          if (spec.kind === 'idle') c.halted = true;
        }
      }
    }
    return progress;
  }

  private write64(gpa: number, hi: number, lo: number): void {
    const { slot, offset } = this.locate(gpa);
    slot.mem.writeUInt32LE(lo, offset);
    slot.mem.writeUInt32LE(hi, offset + 4);
    if (slot.flags & KVM_MEM_LOG_DIRTY_PAGES) {
      const page = offset / PAGE_SIZE;
      slot.dirty[page >>> 5]! |= 1 << (page & 31);
    }
  }

  private locate(gpa: number): { slot: Slot; offset: number } {
    for (const slot of this.slots.values()) {
      if (gpa >= slot.guestPhysAddr && gpa < slot.guestPhysAddr + slot.memorySize) return { slot, offset: gpa - slot.guestPhysAddr };
    }
    throw new Error(`fake engine: gpa 0x${gpa.toString(16)} is in no memslot`);
  }

  async waitForPasses(passes: number, timeoutMs = 60_000): Promise<void> {
    const t0 = Date.now();
    while (!this.vcpus.every((c) => c.halted || c.passesCompleted >= passes)) {
      if (Date.now() - t0 > timeoutMs) throw new Error(`fake engine: ${passes} passes not reached in ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 1));
    }
  }

  progress(): VcpuProgress[] {
    return this.vcpus.map((c, vcpu) => ({ vcpu, passesCompleted: c.passesCompleted, halted: c.halted }));
  }

  async pause(): Promise<void> {
    this.paused = true;
    if (this.timer) clearImmediate(this.timer);
    this.timer = null;
  }

  resume(): void {
    this.paused = false;
    this.schedule();
  }

  getDirtyLog(slotId: number): Uint32Array {
    const slot = this.slot(slotId);
    const copy = slot.dirty.slice();
    if (!this.config.manualDirtyLogProtect) slot.dirty.fill(0);
    return copy;
  }

  clearDirtyLog(slotId: number, firstPage: number, numPages: number, bitmap: Uint32Array): void {
    const slot = this.slot(slotId);
    if (firstPage % 64) throw new Error('fake engine: clearDirtyLog firstPage must be 64-aligned');
    if (firstPage + numPages > slot.pages) throw new Error('fake engine: clearDirtyLog past slot end');
    for (let i = 0; i < numPages; i++) {
      if (bitmap[i >>> 5]! & (1 << (i & 31))) {
        const p = firstPage + i;
        slot.dirty[p >>> 5]! &= ~(1 << (p & 31));
      }
    }
  }

  private slot(id: number): Slot {
    const s = this.slots.get(id);
    if (!s) throw new MemslotError('unknown-slot', `slot ${id} does not exist`);
    return s;
  }

  readGuest(gpa: number, dst: Uint8Array): void {
    const { slot, offset } = this.locate(gpa);
    dst.set(slot.mem.subarray(offset, offset + dst.length));
  }

  writeGuest(gpa: number, src: Uint8Array): void {
    const { slot, offset } = this.locate(gpa);
    slot.mem.set(src, offset);
  }

  saveVcpuState(vcpu: number): VcpuState {
    if (!this.paused && this.running) throw new Error('fake engine: saveVcpuState while running');
    const c = this.vcpus[vcpu]!;
    return { engine: 'soft', vcpu, progress: { vcpu, passesCompleted: c.passesCompleted, halted: c.halted }, arch: { pos: c.pos, rng: { ...c.rng }, fake: true } };
  }

  loadVcpuState(state: VcpuState): void {
    const arch = state.arch as { pos: number; rng: { hi: number; lo: number } };
    const c = this.vcpus[state.vcpu]!;
    c.passesCompleted = state.progress.passesCompleted;
    c.halted = state.progress.halted;
    c.pos = arch.pos;
    c.rng = { ...arch.rng };
  }

  stats(): Record<string, number> {
    return { slots: this.slots.size };
  }

  async destroy(): Promise<void> {
    this.destroyed = true;
    if (this.timer) clearImmediate(this.timer);
    this.timer = null;
  }
}
