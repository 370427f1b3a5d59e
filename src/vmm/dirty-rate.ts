// QEMU's calc-dirty-rate over the engine interface: how fast a running guest dirties memory,
// measured three ways (migration/dirtyrate.c):
//   page-sampling  read `samplePagesPerGiB` pages per GiB of guest RAM, wait, read them again;
//                  the changed fraction times RAM over the time (no dirty logging at all, so
//                  the guest runs undisturbed; blind to a page rewritten with equal content);
//   dirty-bitmap   turn dirty logging on, harvest (and clear) the bitmap at the start and after
//                  calc-time, count the pages (VM-wide only);
//   dirty-ring     the same with the per-vCPU dirty rings, so each vCPU gets its own rate.
// Rates are in MB/s with MB = 2^20 bytes, as QEMU prints them (and as --dirty-rate 100M asks).
//
// Runs on the VMM's main thread; the vCPUs run freely throughout.
import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, type MemoryRegion, type Vm } from './engine.ts';
import { countBits } from './dirty-bitmap.ts';

export type DirtyRateMode = 'page-sampling' | 'dirty-bitmap' | 'dirty-ring';
export const DIRTY_RATE_MODES: readonly DirtyRateMode[] = ['page-sampling', 'dirty-bitmap', 'dirty-ring'];

const MiB = 2 ** 20;

export interface DirtyRateParams {
  mode: DirtyRateMode;
  calcTimeSeconds: number;
  /** page-sampling: pages sampled per GiB of guest RAM (QEMU's sample-pages, default 512). */
  samplePagesPerGiB: number;
  /** The memslot measured and its region (flags as it has them now). */
  region: MemoryRegion;
}

export interface DirtyRateResult {
  mode: DirtyRateMode;
  /** Wall time between the two measurements. */
  calcTimeSeconds: number;
  dirtyRateMBps: number;
  /** Pages found dirty in the interval (page-sampling: changed samples). */
  dirtyPages: number;
  /** dirty-ring: per vCPU; other modes: null. */
  vcpuDirtyRateMBps: number[] | null;
  /** page-sampling: pages sampled. */
  sampledPages: number | null;
}

/** Pages of the memslot to sample: evenly strided with a seeded jitter, so reruns compare. */
function samplePages(pages: number, perGiB: number): number[] {
  const n = Math.max(1, Math.min(pages, Math.round((pages * PAGE_SIZE * perGiB) / 2 ** 30)));
  const stride = pages / n;
  let x = 0x2545f491;
  const out: number[] = [];
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    out.push(Math.min(pages - 1, Math.floor(i * stride + ((x >>> 0) / 2 ** 32) * stride)));
  }
  return out;
}

const sleep = (s: number) => new Promise((r) => setTimeout(r, s * 1000));

export async function calcDirtyRate(vm: Vm, p: DirtyRateParams): Promise<DirtyRateResult> {
  const pages = p.region.memorySize / PAGE_SIZE;
  const base: Omit<DirtyRateResult, 'calcTimeSeconds' | 'dirtyRateMBps' | 'dirtyPages'> = { mode: p.mode, vcpuDirtyRateMBps: null, sampledPages: null };
  if (p.mode === 'page-sampling') {
    const sample = samplePages(pages, p.samplePagesPerGiB);
    const before = new Uint8Array(sample.length * PAGE_SIZE);
    const after = new Uint8Array(sample.length * PAGE_SIZE);
    const read = (into: Uint8Array) => sample.forEach((pg, i) => vm.readGuest(p.region.guestPhysAddr + pg * PAGE_SIZE, into.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)));
    const t0 = performance.now();
    read(before);
    await sleep(p.calcTimeSeconds);
    read(after);
    const seconds = (performance.now() - t0) / 1000;
    let changed = 0;
    for (let i = 0; i < sample.length; i++) {
      if (Buffer.compare(before.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE), after.subarray(i * PAGE_SIZE, (i + 1) * PAGE_SIZE)) !== 0) changed++;
    }
    const dirtyPages = (changed / sample.length) * pages;
    return { ...base, sampledPages: sample.length, calcTimeSeconds: seconds, dirtyPages: changed, dirtyRateMBps: (dirtyPages * PAGE_SIZE) / MiB / seconds };
  }

  const logging = (p.region.flags & KVM_MEM_LOG_DIRTY_PAGES) !== 0;
  if (!logging) vm.setUserMemoryRegion({ ...p.region, flags: p.region.flags | KVM_MEM_LOG_DIRTY_PAGES });
  try {
    if (p.mode === 'dirty-ring') {
      if (vm.config.dirtyRingEntries === 0 || !vm.harvestDirtyRings) throw new Error('dirty-ring mode needs a VM created with a dirty ring');
      vm.harvestDirtyRings(); // the interval starts with empty rings
      const t0 = performance.now();
      await sleep(p.calcTimeSeconds);
      const entries = vm.harvestDirtyRings();
      const seconds = (performance.now() - t0) / 1000;
      const perVcpu = Array.from({ length: vm.vcpuCount }, () => new Set<number>());
      const all = new Set<number>();
      for (const e of entries) {
        if (e.slot !== p.region.slot) continue;
        all.add(e.offset);
        if (e.vcpu >= 0 && e.vcpu < perVcpu.length) perVcpu[e.vcpu]!.add(e.offset);
      }
      return {
        ...base,
        calcTimeSeconds: seconds,
        dirtyPages: all.size,
        dirtyRateMBps: (all.size * PAGE_SIZE) / MiB / seconds,
        vcpuDirtyRateMBps: perVcpu.map((s) => (s.size * PAGE_SIZE) / MiB / seconds),
      };
    }
    const harvest = () => {
      const bm = vm.getDirtyLog(p.region.slot);
      if (vm.config.manualDirtyLogProtect) vm.clearDirtyLog(p.region.slot, 0, pages, bm);
      return bm;
    };
    harvest();
    const t0 = performance.now();
    await sleep(p.calcTimeSeconds);
    const dirtyPages = countBits(harvest());
    const seconds = (performance.now() - t0) / 1000;
    return { ...base, calcTimeSeconds: seconds, dirtyPages, dirtyRateMBps: (dirtyPages * PAGE_SIZE) / MiB / seconds };
  } finally {
    if (!logging) vm.setUserMemoryRegion({ ...p.region });
  }
}
