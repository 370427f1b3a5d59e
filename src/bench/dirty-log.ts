// `stage2 bench dirty-log`: KVM's dirty_log_perf_test, over the engine interface.
//
// Same procedure and printed lines as tools/testing/selftests/kvm/dirty_log_perf_test.c:
// create a VM with one test memslot, populate memory (first pass of the sequential guest),
// enable dirty logging, then for each iteration let every vCPU dirty its whole slice, get the
// dirty log and (with manual protect) clear it, and finally disable logging.
// With `dirtyRing` > 0 the VM logs to per-vCPU dirty rings of that many entries instead
// (dirty_log_test's dirty-ring mode): each iteration harvests the rings (collect + reset, timed
// as "get dirty log"; entries collected at DIRTY_RING_FULL exits during the pass are included)
// and counts the ring-full exits the pass took.
// Soft engine only: `eagerSplitChunkBytes` > 0 splits every huge mapping when logging is enabled
// (issue 11 part 2; the selftest's x86 counterpart is the eager_page_split module parameter),
// `initiallySet` is KVM_DIRTY_LOG_INITIALLY_SET; compareEagerSplit runs the bench both ways.

import { KVM_MEM_LOG_DIRTY_PAGES, PAGE_SIZE, type Backing, type Engine, type GuestPageSize, type MmuLockMode } from '../vmm/engine.ts';
import { countBits } from '../vmm/dirty-bitmap.ts';
import { DIRTY_RING_RSVD_ENTRIES } from '../vmm/dirty-ring.ts';
import type { DirtyGfn } from '../vmm/engine.ts';
import { createWorkloadVm } from '../vmm/workload-vm.ts';
import type { WorkloadKind, WorkloadSpec } from '../guest/workload.ts';
import { formatSeconds, now, secondsSince } from './timing.ts';
import { readThreadSched, schedSince } from '../util/thread-sched.ts';

export interface DirtyLogParams {
  vcpus: number;
  bytesPerVcpu: number;
  backing: Backing;
  iterations: number;
  lock: MmuLockMode;
  manualProtect: boolean;
  guestPageSize: GuestPageSize;
  workload: WorkloadKind;
  workloadOptions?: Partial<WorkloadSpec>;
  /** Dirty-ring entries per vCPU; 0 or absent: the memslot bitmap. */
  dirtyRing?: number;
  /** Soft engine: eager split chunk when logging is enabled (bytes; 0 or absent: lazy split). */
  eagerSplitChunkBytes?: number;
  /** Soft engine: KVM_DIRTY_LOG_INITIALLY_SET (with manual protect). */
  initiallySet?: boolean;
}

/** The part of a soft VM the tuning goes through (SoftVm.setDirtyLogTuning). */
interface DirtyTunable {
  setDirtyLogTuning(o: { eagerSplitChunkBytes?: number; initiallySet?: boolean }): void;
}

export interface DirtyLogRound {
  dirtyMemorySeconds: number;
  getDirtyLogSeconds: number;
  clearDirtyLogSeconds: number;
  dirtyPages: number;
  /** DIRTY_RING_FULL exits during this iteration's dirty pass (dirty-ring mode; else 0). */
  ringFullExits: number;
  /** Summed over the vCPU threads during the dirty phase (Linux schedstat): time on a CPU... */
  vcpuOnCpuSeconds: number;
  /** ...and time runnable but waiting for one. Wall time beyond on-CPU time is this, or blocking. */
  vcpuRunQueueSeconds: number;
}

export interface DirtyLogResult {
  params: DirtyLogParams & { engine: string };
  pagesPerVcpu: number;
  populateSeconds: number;
  enableDirtyLoggingSeconds: number;
  rounds: DirtyLogRound[];
  disableDirtyLoggingSeconds: number;
  stats: Record<string, number>;
}

/** Run the benchmark; `log` gets the selftest's lines as they happen. */
export async function runDirtyLogBench(engine: Engine, p: DirtyLogParams, log: (line: string) => void): Promise<DirtyLogResult> {
  if (p.bytesPerVcpu % PAGE_SIZE !== 0) throw new Error(`--bytes-per-vcpu must be a multiple of ${PAGE_SIZE}`);
  const ring = p.dirtyRing ?? 0;
  const { vm, testRegion } = await createWorkloadVm(engine, { ...p, dirtyRingEntries: ring });
  const { slot, guestPhysAddr: gpa, memorySize: bytes } = testRegion;
  const manual = vm.config.manualDirtyLogProtect;
  const region = (flags: number) => ({ ...testRegion, flags });
  try {
    const eager = p.eagerSplitChunkBytes ?? 0;
    if (eager > 0 || p.initiallySet) {
      if (!('setDirtyLogTuning' in vm)) throw new Error('--eager-split and --initially-set tune the soft engine\'s MMU; the kvm engine\'s host kernel decides (x86: the eager_page_split module parameter)');
      (vm as unknown as DirtyTunable).setDirtyLogTuning({ eagerSplitChunkBytes: eager, initiallySet: p.initiallySet ?? false });
      log(`Eager split: ${eager > 0 ? `${eager / 2 ** 20} MiB chunks` : 'off'}; KVM_DIRTY_LOG_INITIALLY_SET: ${p.initiallySet ? 'on' : 'off'}`);
    }
    log(`Testing guest mode: PA-bits:ANY, VA-bits:48, ${p.guestPageSize / 1024}K pages (engine ${engine.kind})`);
    if (ring > 0) log(`Dirty ring: ${ring} entries per vCPU (soft limit ${ring - DIRTY_RING_RSVD_ENTRIES})`);
    log(`guest physical test memory: [0x${gpa.toString(16)}, 0x${(gpa + bytes).toString(16)})`);

    // Populate: the first pass faults every page in.
    let t0 = now();
    vm.allowPasses(1);
    await vm.waitForPasses(1);
    const populateSeconds = secondsSince(t0);
    log(`Populate memory time: ${formatSeconds(populateSeconds)}`);

    t0 = now();
    vm.setUserMemoryRegion(region(KVM_MEM_LOG_DIRTY_PAGES));
    const enableDirtyLoggingSeconds = secondsSince(t0);
    log(`Enabling dirty logging time: ${formatSeconds(enableDirtyLoggingSeconds)}`);
    const split0 = vm.stats();
    if (split0.eagerSplitBlocks !== undefined && (p.eagerSplitChunkBytes ?? 0) > 0) log(`Eagerly split ${split0.eagerSplitBlocks} huge mappings, ${split0.dirtySweepLockBreaks} lock breaks, longest hold ${formatSeconds(split0.dirtySweepMaxHoldSeconds ?? 0)}`);

    const rounds: DirtyLogRound[] = [];
    const pages = bytes / PAGE_SIZE;
    for (let i = 1; i <= p.iterations; i++) {
      const tids = vm.vcpuThreadIds();
      const sched0 = tids.map(readThreadSched);
      const fullExits0 = vm.stats().exitsDirtyRingFull ?? 0;
      t0 = now();
      vm.allowPasses(1 + i);
      await vm.waitForPasses(1 + i);
      const dirtyMemorySeconds = secondsSince(t0);
      const sched = schedSince(tids, sched0);
      log(`Iteration ${i} dirty memory time: ${formatSeconds(dirtyMemorySeconds)}`);
      const ringFullExits = (vm.stats().exitsDirtyRingFull ?? 0) - fullExits0;

      t0 = now();
      const bitmap = ring > 0 ? ringBitmap(vm.harvestDirtyRings!(), slot, pages) : vm.getDirtyLog(slot);
      const getDirtyLogSeconds = secondsSince(t0);
      log(`Iteration ${i} get dirty log time: ${formatSeconds(getDirtyLogSeconds)}`);
      if (ring > 0) log(`Iteration ${i} dirty ring full exits: ${ringFullExits}`);

      let clearDirtyLogSeconds = 0;
      if (manual && ring === 0) {
        t0 = now();
        vm.clearDirtyLog(slot, 0, pages, bitmap);
        clearDirtyLogSeconds = secondsSince(t0);
        log(`Iteration ${i} clear dirty log time: ${formatSeconds(clearDirtyLogSeconds)}`);
      }
      rounds.push({
        dirtyMemorySeconds,
        getDirtyLogSeconds,
        clearDirtyLogSeconds,
        dirtyPages: countBits(bitmap),
        ringFullExits,
        vcpuOnCpuSeconds: sched.onCpuNs / 1e9,
        vcpuRunQueueSeconds: sched.runQueueNs / 1e9,
      });
    }

    t0 = now();
    vm.setUserMemoryRegion(region(0));
    const disableDirtyLoggingSeconds = secondsSince(t0);
    log(`Disabling dirty logging time: ${formatSeconds(disableDirtyLoggingSeconds)}`);

    const sum = (k: keyof DirtyLogRound) => rounds.reduce((a, r) => a + r[k], 0);
    const n = rounds.length;
    log(`Get dirty log over ${n} iterations took ${formatSeconds(sum('getDirtyLogSeconds'))}. (Avg ${formatSeconds(sum('getDirtyLogSeconds') / n)}/iteration)`);
    if (manual && ring === 0) log(`Clear dirty log over ${n} iterations took ${formatSeconds(sum('clearDirtyLogSeconds'))}. (Avg ${formatSeconds(sum('clearDirtyLogSeconds') / n)}/iteration)`);
    // Not a selftest line: where the vCPU threads' dirty-phase time went (all vCPUs summed).
    log(`vCPU threads while dirtying: on a CPU ${formatSeconds(sum('vcpuOnCpuSeconds'))}, waiting for a CPU ${formatSeconds(sum('vcpuRunQueueSeconds'))}`);

    return {
      params: { engine: engine.kind, ...p, manualProtect: manual, dirtyRing: ring },
      pagesPerVcpu: p.bytesPerVcpu / PAGE_SIZE,
      populateSeconds,
      enableDirtyLoggingSeconds,
      rounds,
      disableDirtyLoggingSeconds,
      stats: vm.stats(),
    };
  } finally {
    await vm.destroy();
  }
}

/** The distinct pages of `slot` among harvested ring entries, as a bitmap (KVM layout). */
function ringBitmap(entries: DirtyGfn[], slot: number, pages: number): Uint32Array {
  const bm = new Uint32Array(Math.ceil(pages / 32));
  for (const e of entries) if (e.slot === slot && e.offset < pages) bm[e.offset >>> 5]! |= 1 << (e.offset & 31);
  return bm;
}

export interface EagerSplitComparison {
  lazy: DirtyLogResult;
  eager: DirtyLogResult;
  /** Side by side: enabling time and iteration-1 dirty time, lazy vs eager. */
  rows: { mode: 'lazy' | 'eager'; enableSeconds: number; iteration1DirtySeconds: number; hugePageSplitsOnFault: number; eagerSplitBlocks: number }[];
}

/** Run the bench with lazy split, then with eager split (chunk `eagerSplitChunkBytes`), one VM each. */
export async function compareEagerSplit(engine: Engine, p: DirtyLogParams & { eagerSplitChunkBytes: number }, log: (line: string) => void): Promise<EagerSplitComparison> {
  log('== lazy split (split on the first write fault) ==');
  const lazy = await runDirtyLogBench(engine, { ...p, eagerSplitChunkBytes: 0 }, log);
  log(`== eager split (${p.eagerSplitChunkBytes / 2 ** 20} MiB chunks) ==`);
  const eager = await runDirtyLogBench(engine, p, log);
  const row = (mode: 'lazy' | 'eager', r: DirtyLogResult) => ({
    mode,
    enableSeconds: r.enableDirtyLoggingSeconds,
    iteration1DirtySeconds: r.rounds[0]?.dirtyMemorySeconds ?? 0,
    hugePageSplitsOnFault: r.stats.hugePageSplits ?? 0,
    eagerSplitBlocks: r.stats.eagerSplitBlocks ?? 0,
  });
  const rows = [row('lazy', lazy), row('eager', eager)];
  log('');
  log('mode   enable logging   iteration 1 dirty   splits on fault   eager splits');
  for (const r of rows) log(`${r.mode.padEnd(6)} ${formatSeconds(r.enableSeconds).padStart(14)}   ${formatSeconds(r.iteration1DirtySeconds).padStart(17)}   ${String(r.hugePageSplitsOnFault).padStart(15)}   ${String(r.eagerSplitBlocks).padStart(12)}`);
  return { lazy, eager, rows };
}
