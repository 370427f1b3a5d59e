// Shared set-up for the soft engine's tests: a small VM with one test memslot and vCPUs, plus
// readers of guest memory and the workload's reference model.
import { KVM_MEM_LOG_DIRTY_PAGES, type Backing, type MemoryRegion, type MmuLockMode } from '../../../src/vmm/engine.ts';
import { SoftEngine } from '../../../src/soft/engine.ts';
import type { DirtyLogTuningOptions, SoftVm } from '../../../src/soft/vm.ts';
import { guestWriteValue, initialRngState, pagesPerVcpu, pagesWrittenInPass, workload, type WorkloadKind, type WorkloadSpec } from '../../../src/guest/workload.ts';

export interface TestVmOptions {
  lock?: MmuLockMode;
  manualProtect?: boolean;
  vcpus?: number;
  bytesPerVcpu?: number;
  kind?: WorkloadKind;
  backing?: Backing;
  seed?: number;
  hostRamBytes?: number;
  /** Create the vCPUs (default true). */
  vcpusNow?: boolean;
  /** Log to per-vCPU dirty rings of this many entries instead of the memslot bitmap. */
  dirtyRing?: number;
  /** More workload knobs (writePercent, dirty-rate fields). */
  workloadOptions?: Partial<WorkloadSpec>;
  /** Dirty-log sweeps: lock-dropping chunk, eager split, INITIALLY_SET. */
  dirtyLog?: DirtyLogTuningOptions;
}

export interface TestVm {
  vm: SoftVm;
  spec: WorkloadSpec;
  region: MemoryRegion;
  pages: number;
  setLogging(on: boolean): void;
}

export async function makeTestVm(o: TestVmOptions = {}): Promise<TestVm> {
  const vcpus = o.vcpus ?? 1;
  const bytesPerVcpu = o.bytesPerVcpu ?? 2 ** 20;
  const engine = new SoftEngine({ hostRamBytes: o.hostRamBytes ?? 64 * 2 ** 20, debug: true, ...(o.dirtyLog ? { dirtyLog: o.dirtyLog } : {}) });
  const vm = engine.createSoftVm({ lock: o.lock ?? 'parallel', manualDirtyLogProtect: o.manualProtect ?? true, dirtyRingEntries: o.dirtyRing ?? 0 });
  const spec = workload(o.kind ?? 'sequential', bytesPerVcpu, { seed: o.seed ?? 1, ...o.workloadOptions });
  const host = vm.mapHostMemory(vcpus * bytesPerVcpu, o.backing ?? 'anonymous');
  const region: MemoryRegion = { slot: 0, flags: 0, guestPhysAddr: spec.gpaBase, memorySize: vcpus * bytesPerVcpu, userspaceAddr: host.hva };
  vm.setUserMemoryRegion(region);
  if (o.vcpusNow ?? true) await vm.createVcpus(vcpus, spec);
  return {
    vm,
    spec,
    region,
    pages: (vcpus * bytesPerVcpu) / 4096,
    setLogging(on: boolean) {
      region.flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
      vm.setUserMemoryRegion({ ...region });
    },
  };
}

const word = new Uint8Array(8);
const wordView = new DataView(word.buffer);

/** The 64-bit word at offset 0 of test page `page` (index from the slot start) as [hi, lo]. */
export function readPageWord(t: TestVm, page: number): [number, number] {
  t.vm.readGuest(t.spec.gpaBase + page * 4096, word);
  return [wordView.getUint32(4, true), wordView.getUint32(0, true)];
}

/** Word 0 of every test page, as hi * 2^32 + lo. */
export function snapshotWords(t: TestVm): Float64Array {
  const out = new Float64Array(t.pages);
  const buf = new Uint8Array(t.pages * 4096);
  t.vm.readGuest(t.spec.gpaBase, buf);
  const dv = new DataView(buf.buffer);
  for (let p = 0; p < t.pages; p++) out[p] = dv.getUint32(p * 4096 + 4, true) * 2 ** 32 + dv.getUint32(p * 4096, true);
  return out;
}

/** Reference model: per vCPU, for each page of its slice, the last pass (1-based) that wrote it. */
export class WorkloadModel {
  private readonly rng: { hi: number; lo: number }[] = [];
  passes = 0;
  readonly lastPass: Int32Array;

  constructor(
    readonly spec: WorkloadSpec,
    readonly vcpus: number,
  ) {
    for (let v = 0; v < vcpus; v++) this.rng.push(initialRngState(spec, v));
    this.lastPass = new Int32Array(vcpus * pagesPerVcpu(spec));
  }

  /** Advance every vCPU by one pass; returns the set of slot pages written in it. */
  step(): Set<number> {
    const pass = ++this.passes;
    const per = pagesPerVcpu(this.spec);
    const written = new Set<number>();
    for (let v = 0; v < this.vcpus; v++) {
      for (const p of pagesWrittenInPass(this.spec, this.rng[v]!, pass, v)) {
        this.lastPass[v * per + p] = pass;
        written.add(v * per + p);
      }
    }
    return written;
  }

  /** Expected word of slot page `page` as hi * 2^32 + lo (0 if never written). */
  expected(page: number): number {
    const per = pagesPerVcpu(this.spec);
    const pass = this.lastPass[page]!;
    if (pass === 0) return 0;
    const v = guestWriteValue(Math.floor(page / per), pass);
    return v.hi * 2 ** 32 + v.lo;
  }
}

export function bitmapPages(bitmap: Uint32Array, pages: number): Set<number> {
  const out = new Set<number>();
  for (let p = 0; p < pages; p++) if ((bitmap[p >>> 5]! >>> (p & 31)) & 1) out.add(p);
  return out;
}

/**
 * One harvest of the test slot, as a bitmap: get (and with manual protect, clear) its dirty log,
 * or on a VM with dirty rings collect + reset them.
 */
export function harvest(t: TestVm): Uint32Array {
  if (t.vm.config.dirtyRingEntries > 0) {
    const bm = new Uint32Array(Math.ceil(t.pages / 32));
    for (const e of t.vm.harvestDirtyRings()) {
      if (e.slot !== 0 || e.offset >= t.pages) throw new Error(`dirty ring entry outside the test slot: slot ${e.slot} offset ${e.offset}`);
      bm[e.offset >>> 5]! |= 1 << (e.offset & 31);
    }
    return bm;
  }
  const bm = t.vm.getDirtyLog(0);
  if (t.vm.config.manualDirtyLogProtect) t.vm.clearDirtyLog(0, 0, t.pages, bm);
  return bm;
}

/**
 * Wait until every vCPU has completed another pass (free-running guests), so a round of a
 * concurrency test always has guest writes to check even when the box starves the vCPU threads.
 */
export async function nextPassEverywhere(t: TestVm, timeoutMs = 10_000): Promise<void> {
  const start = t.vm.progress().map((p) => p.passesCompleted);
  const t0 = Date.now();
  while (t.vm.progress().some((p, i) => p.passesCompleted <= start[i]!)) {
    if (Date.now() - t0 > timeoutMs) throw new Error(`vCPUs made no pass in ${timeoutMs} ms: ${JSON.stringify(t.vm.progress())}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}
