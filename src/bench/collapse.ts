// `stage2 bench collapse` (issue 11 part 6, seed 004): how long re-forming huge mappings takes
// once dirty logging stops, and what it costs the running guest, per strategy.
//
// Per size and strategy: a guest of N bytes backed by 2 MiB pages, one populate pass (every
// region a 2 MiB block), logging on, one full pass (everything split to 4 KiB), then logging
// off while the vCPUs keep running passes (dirty_log_perf_test's -e: the guest never stops),
// until every eligible 2 MiB region is a block again. Reported: that time, the vCPUs' MMU-lock
// waits during it (max, p99, sum; locking/lock-stall.ts), and block mappings before and after.
// Without running vCPUs (--no-running) the time is until the recovery work is done, and a zap
// strategy leaves the regions unmapped (nothing re-faults them).
//
// Soft engine only: on the kvm engine the host kernel decides how it recovers huge pages.
import { KVM_MEM_LOG_DIRTY_PAGES, type Backing, type MmuLockMode } from '../vmm/engine.ts';
import { SoftEngine } from '../soft/engine.ts';
import type { SoftVm } from '../soft/vm.ts';
import { HUGE_RECOVERY_STRATEGIES, type HugeRecoveryStrategy } from '../soft/huge/recovery.ts';
import { workload } from '../guest/workload.ts';
import { now, secondsSince } from './timing.ts';
import { renderLinePlotSvg } from './plot.ts';

const REGION_BYTES = 2 ** 21;

export interface CollapseParams {
  sizes: number[];
  strategies: HugeRecoveryStrategy[];
  vcpus: number;
  backing: Backing;
  lock: MmuLockMode;
  /** vCPUs keep running passes while huge pages are re-formed (-e). */
  running: boolean;
  /** Regions per lock hold for the background strategies. */
  batchRegions: number;
  /** Give up waiting for recovery after this long (seconds). */
  timeoutSeconds: number;
}

export interface CollapseRow {
  strategy: HugeRecoveryStrategy;
  bytes: number;
  recoverSeconds: number;
  stallMaxSeconds: number;
  stallP99Seconds: number;
  stallSumSeconds: number;
  stallWaits: number;
  /** Longest single MMU-lock hold by the recovery. */
  maxLockHoldSeconds: number;
  /**
   * Lock holds longer than 1 ms, their total, and what the VMM thread did during them (Linux
   * schedstat): on a CPU (work, JIT) vs runnable but waiting for a CPU (preempted mid-hold).
   */
  longHolds: number;
  longHoldSeconds: number;
  longHoldOnCpuSeconds: number;
  longHoldRunQueueSeconds: number;
  /** The logging-disable call itself (sync does all its work in it). */
  disableSeconds: number;
  blockMappingsBefore: number;
  blockMappingsAfter: number;
  eligibleRegions: number;
}

export interface CollapseResult {
  params: CollapseParams & { engine: 'soft' };
  rows: CollapseRow[];
}

export class CollapseBenchError extends Error {
  override name = 'CollapseBenchError';
}

export function checkCollapseParams(p: CollapseParams): void {
  if (p.sizes.length === 0) throw new CollapseBenchError('--sizes: give at least one size');
  for (const s of p.sizes) {
    if (s <= 0 || s % (REGION_BYTES * p.vcpus) !== 0) {
      throw new CollapseBenchError(`--sizes: ${s} bytes is not a positive multiple of 2 MiB x ${p.vcpus} vCPU(s) (every vCPU's slice must be whole 2 MiB regions)`);
    }
  }
  for (const s of p.strategies) if (!HUGE_RECOVERY_STRATEGIES.includes(s)) throw new CollapseBenchError(`unknown strategy '${s}'`);
  if (p.backing === 'anonymous') throw new CollapseBenchError('--backing anonymous has no huge pages to re-form: use anonymous_thp or hugetlb');
}

export async function runCollapseBench(p: CollapseParams, log: (line: string) => void): Promise<CollapseResult> {
  checkCollapseParams(p);
  const rows: CollapseRow[] = [];
  for (const bytes of p.sizes) {
    for (const strategy of p.strategies) {
      const row = await runOne(p, bytes, strategy);
      rows.push(row);
      log(
        `${fmtSize(bytes)} ${strategy.padEnd(8)}: recovered ${row.blockMappingsAfter}/${row.eligibleRegions} blocks in ${row.recoverSeconds.toFixed(3)}s` +
          ` (disable call ${row.disableSeconds.toFixed(3)}s, longest lock hold ${ms(row.maxLockHoldSeconds)}); vCPU lock stall max ${ms(row.stallMaxSeconds)} p99 ${ms(row.stallP99Seconds)} sum ${ms(row.stallSumSeconds)} over ${row.stallWaits} waits` +
          `; ${row.longHolds} holds over 1 ms (${ms(row.longHoldSeconds)}: VMM thread on a CPU ${ms(row.longHoldOnCpuSeconds)}, waiting for a CPU ${ms(row.longHoldRunQueueSeconds)})`,
      );
    }
  }
  return { params: { engine: 'soft', ...p }, rows };
}

async function runOne(p: CollapseParams, bytes: number, strategy: HugeRecoveryStrategy): Promise<CollapseRow> {
  const engine = new SoftEngine({ hostRamBytes: bytes + 2 ** 28, maxVcpus: p.vcpus, recover: strategy });
  const vm: SoftVm = engine.createSoftVm({ lock: p.lock, manualDirtyLogProtect: true });
  try {
    vm.setHugeRecovery(strategy, p.batchRegions);
    vm.hugeRecovery.schedDiagnostics = true;
    const spec = workload('sequential', bytes / p.vcpus);
    const host = vm.mapHostMemory(bytes, p.backing);
    const region = { slot: 0, guestPhysAddr: spec.gpaBase, memorySize: bytes, userspaceAddr: host.hva };
    vm.setUserMemoryRegion({ ...region, flags: 0 });
    await vm.createVcpus(p.vcpus, spec);
    vm.allowPasses(1);
    await vm.waitForPasses(1);
    vm.setUserMemoryRegion({ ...region, flags: KVM_MEM_LOG_DIRTY_PAGES });
    vm.allowPasses(2);
    await vm.waitForPasses(2);
    const eligibleRegions = bytes / REGION_BYTES;
    const blockMappingsBefore = vm.stats().pages_2m ?? 0;
    if (p.running) vm.allowPasses(Number.MAX_SAFE_INTEGER);
    vm.resetLockStalls();
    const t0 = now();
    vm.setUserMemoryRegion({ ...region, flags: 0 });
    const disableSeconds = secondsSince(t0);
    const rec = vm.hugeRecovery;
    const deadline = Date.now() + p.timeoutSeconds * 1000;
    for (;;) {
      const st = vm.stats();
      const done = p.running ? !rec.busy && st.pages_2m === eligibleRegions && st.pages_4k === 0 : !rec.busy;
      if (done) break;
      if (Date.now() > deadline) throw new CollapseBenchError(`${strategy} at ${fmtSize(bytes)}: not recovered after ${p.timeoutSeconds}s (${st.pages_2m}/${eligibleRegions} blocks, ${st.pages_4k} 4 KiB leaves)`);
      await new Promise((r) => setTimeout(r, 1));
    }
    const recoverSeconds = secondsSince(t0);
    const stall = vm.lockStalls();
    return {
      strategy,
      bytes,
      recoverSeconds,
      stallMaxSeconds: stall.maxSeconds,
      stallP99Seconds: stall.p99Seconds,
      stallSumSeconds: stall.sumSeconds,
      stallWaits: stall.waits,
      disableSeconds,
      maxLockHoldSeconds: rec.stats.maxHoldSeconds,
      longHolds: rec.stats.longHolds,
      longHoldSeconds: rec.stats.longHoldSeconds,
      longHoldOnCpuSeconds: rec.stats.longHoldOnCpuSeconds,
      longHoldRunQueueSeconds: rec.stats.longHoldRunQueueSeconds,
      blockMappingsBefore,
      blockMappingsAfter: vm.stats().pages_2m ?? 0,
      eligibleRegions,
    };
  } finally {
    await vm.destroy();
  }
}

function fmtSize(bytes: number): string {
  return bytes % 2 ** 30 === 0 ? `${bytes / 2 ** 30}G` : `${bytes / 2 ** 20}M`;
}

function ms(s: number): string {
  return `${(s * 1000).toFixed(3)}ms`;
}

/** One table: a row per size and strategy. */
export function collapseTable(result: CollapseResult): string {
  const head = ['size', 'strategy', 'recover', 'stall max', 'stall p99', 'stall sum', 'waits', 'blocks before', 'blocks after'];
  const lines = result.rows.map((r) => [
    fmtSize(r.bytes),
    r.strategy,
    `${r.recoverSeconds.toFixed(3)}s`,
    ms(r.stallMaxSeconds),
    ms(r.stallP99Seconds),
    ms(r.stallSumSeconds),
    String(r.stallWaits),
    String(r.blockMappingsBefore),
    `${r.blockMappingsAfter}/${r.eligibleRegions}`,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const fmt = (cells: string[]) => `| ${cells.map((c, i) => c.padStart(widths[i]!)).join(' | ')} |`;
  const rule = `+${widths.map((w) => '-'.repeat(w + 2)).join('+')}+`;
  return [rule, fmt(head), rule, ...lines.map(fmt), rule].join('\n');
}

export function collapseSvg(result: CollapseResult): Promise<string> {
  return renderLinePlotSvg({
    title: `stage2 soft engine: re-forming huge pages after logging stops (${result.params.vcpus} vCPUs, ${result.params.backing}${result.params.running ? ', vCPUs running' : ''})`,
    xTitle: 'guest GiB',
    yTitle: 'seconds',
    points: result.rows.flatMap((r) => [
      { x: r.bytes / 2 ** 30, y: r.recoverSeconds, series: r.strategy, panel: 'time until every region is a block' },
      { x: r.bytes / 2 ** 30, y: r.stallMaxSeconds, series: r.strategy, panel: 'max vCPU MMU-lock stall' },
    ]),
  });
}
