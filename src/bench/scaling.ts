// `stage2 bench scaling`: dirty-log runs over a list of vCPU counts with memory per vCPU fixed,
// for each MMU lock mode asked for (default all three), as in seed 003's tables (vCPUs | 6.1-rc3
// | + series, i.e. global | parallel, with global-write for the older all-write-lock kernel) for
// time to populate and time to dirty. Each (vCPUs, lock) point is its own VM, run one after
// another.

import type { Engine, MmuLockMode } from '../vmm/engine.ts';
import { runDirtyLogBench, type DirtyLogParams } from './dirty-log.ts';
import { mean } from './timing.ts';
import { renderLinePlotSvg } from './plot.ts';

export interface ScalingParams extends Omit<DirtyLogParams, 'vcpus' | 'lock'> {
  vcpuCounts: number[];
  locks: MmuLockMode[];
}

export interface ScalingRow {
  vcpus: number;
  lock: MmuLockMode;
  populateSeconds: number;
  /** Mean over rounds after the first (the first round also pays for splitting / first WP). */
  dirtyMemorySeconds: number;
  /** Per vCPU thread, mean over the same rounds: time on a CPU while dirtying... */
  vcpuOnCpuSeconds: number;
  /** ...and time runnable but waiting for a CPU (more vCPU threads than free cores shows here). */
  vcpuRunQueueSeconds: number;
}

export interface ScalingResult {
  params: ScalingParams & { engine: string };
  rows: ScalingRow[];
}

export async function runScalingBench(engine: Engine, p: ScalingParams, log: (line: string) => void): Promise<ScalingResult> {
  if (p.iterations < 2) throw new Error('bench scaling needs --iterations >= 2 (the first round is not counted)');
  const rows: ScalingRow[] = [];
  for (const vcpus of p.vcpuCounts) {
    for (const lock of p.locks) {
      const r = await runDirtyLogBench(engine, { ...p, vcpus, lock }, () => {});
      const row: ScalingRow = {
        vcpus,
        lock,
        populateSeconds: r.populateSeconds,
        dirtyMemorySeconds: mean(r.rounds.slice(1).map((x) => x.dirtyMemorySeconds)),
        vcpuOnCpuSeconds: mean(r.rounds.slice(1).map((x) => x.vcpuOnCpuSeconds)) / vcpus,
        vcpuRunQueueSeconds: mean(r.rounds.slice(1).map((x) => x.vcpuRunQueueSeconds)) / vcpus,
      };
      rows.push(row);
      log(
        `vcpus=${vcpus} lock=${lock}: populate ${row.populateSeconds.toFixed(3)}s, dirty ${row.dirtyMemorySeconds.toFixed(3)}s` +
          ` (per vCPU thread: ${row.vcpuOnCpuSeconds.toFixed(3)}s on a CPU, ${row.vcpuRunQueueSeconds.toFixed(3)}s waiting for one)`,
      );
    }
  }
  return { params: { engine: engine.kind, ...p }, rows };
}

/** Seed 003's two tables: rows of vCPUs, a column per lock mode. */
export function scalingTables(result: ScalingResult): string {
  const locks = result.params.locks;
  // Each column as wide as its mode's name, at least 8 characters, plus a space either side.
  const widths = locks.map((l) => Math.max(8, l.length));
  const fmt = (s: number | undefined, w: number) => `${(s === undefined ? '-' : `${s.toFixed(3)}s`).padStart(w)} `;
  type Key = 'populateSeconds' | 'dirtyMemorySeconds' | 'vcpuOnCpuSeconds' | 'vcpuRunQueueSeconds';
  const table = (title: string, key: Key) => {
    const head = `| vCPUs |${locks.map((l, i) => ` ${l.padStart(widths[i]!)} |`).join('')}`;
    const rule = `+-------+${widths.map((w) => `${'-'.repeat(w + 2)}+`).join('')}`;
    const lines = [title, rule, head, rule];
    for (const v of result.params.vcpuCounts) {
      const cells = locks.map((l, i) => fmt(result.rows.find((r) => r.vcpus === v && r.lock === l)?.[key], widths[i]! + 1));
      lines.push(`| ${String(v).padStart(5)} |${cells.map((c) => `${c}|`).join('')}`);
    }
    lines.push(rule);
    return lines.join('\n');
  };
  return [
    table('Time to dirty memory:', 'dirtyMemorySeconds'),
    table('Time to populate memory:', 'populateSeconds'),
    table('While dirtying, per vCPU thread: time on a CPU:', 'vcpuOnCpuSeconds'),
    table('While dirtying, per vCPU thread: time waiting for a CPU:', 'vcpuRunQueueSeconds'),
  ].join('\n\n');
}

export function scalingSvg(result: ScalingResult): Promise<string> {
  const mb = Math.round(result.params.bytesPerVcpu / 2 ** 20);
  return renderLinePlotSvg({
    title: `stage2 ${result.params.engine} engine, ${mb} MiB per vCPU, ${result.params.backing}`,
    xTitle: 'vCPUs',
    yTitle: 'seconds',
    points: result.rows.flatMap((r) => [
      { x: r.vcpus, y: r.dirtyMemorySeconds, series: r.lock, panel: 'time to dirty memory' },
      { x: r.vcpus, y: r.populateSeconds, series: r.lock, panel: 'time to populate memory' },
    ]),
  });
}
