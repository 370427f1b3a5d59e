// `stage2 bench migration` (issue 12 part 7): how a user picks a migration policy. For each
// workload (shipped program traces, dirty-rate guests) and each policy (plain pre-copy,
// auto-converge, dirty-limit, post-copy) it runs one migration over a bandwidth-limited link and
// tabulates: converged or not, total time, downtime, bytes transferred per byte of RAM, and what
// the guest perceived (the longest stall between two units of its work, migration/guest-view/).
//
// The cells run one after another; each is a whole `migrate --local` (a fresh source VM and
// receiver process: the receiver's restart is part of what the guest perceives). This module
// knows the cells and the report; the caller (cli/bench-migration.ts) runs a cell.
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import type { MigrationStats } from '../migration/stats.ts';
import { renderGroupedBarSvg } from './plot.ts';

export const MIGRATION_POLICIES = ['precopy', 'auto-converge', 'dirty-limit', 'postcopy'] as const;
export type MigrationPolicy = (typeof MIGRATION_POLICIES)[number];

/** A workload of the bench: a program trace replayed at its recorded speed, or a dirty-rate guest. */
export type BenchWorkload = { name: string; kind: 'trace'; file: string } | { name: string; kind: 'dirty-rate'; bytesPerSecond: number };

/** Where the shipped traces are (test/data/traces/NAME.s2trace). */
export function shippedTrace(root: string, name: string): string | null {
  const f = join(root, 'test', 'data', 'traces', `${name}.s2trace`);
  return existsSync(f) ? f : null;
}

/** The `migrate` arguments a policy adds: each one alone, nothing else converging it. */
export function policyArgs(p: MigrationPolicy): string[] {
  switch (p) {
    case 'precopy':
      return ['--no-postcopy', '--no-auto-converge', '--on-no-convergence', 'fail'];
    case 'auto-converge':
      return ['--no-postcopy', '--auto-converge', '--on-no-convergence', 'fail'];
    case 'dirty-limit':
      return ['--no-postcopy', '--converge', 'dirty-limit', '--on-no-convergence', 'fail'];
    case 'postcopy':
      return ['--postcopy', 'auto', '--no-auto-converge'];
  }
}

/** The `migrate` arguments that describe a workload's guest. */
export function workloadArgs(w: BenchWorkload): string[] {
  return w.kind === 'trace' ? ['--workload', 'trace', '--trace', w.file] : ['--workload', 'dirty-rate', '--dirty-rate', String(w.bytesPerSecond)];
}

export interface MigrationBenchParams {
  engine: string;
  vcpus: number;
  bytesPerVcpu: number;
  maxBandwidth: number;
  downtimeLimitMs: number;
  maxRounds: number;
  vcpuDirtyLimit: number;
  dirtyRing: number;
  warmupMs: number;
  destRunMs: number;
  workloads: BenchWorkload[];
  policies: MigrationPolicy[];
}

export interface MigrationBenchRow {
  workload: string;
  policy: MigrationPolicy;
  status: string;
  /** Completed (by stop-and-copy within the limit, or by post-copy). */
  converged: boolean;
  postcopy: boolean;
  totalSeconds: number;
  downtimeSeconds: number;
  transferredBytes: number;
  ramBytes: number;
  transferredPerRam: number;
  rounds: number;
  throttlePercent: number;
  /** Guest-perceived: worst vCPU's longest gap between units, its p99, and the largest dip. */
  maxStallMs: number | null;
  p99StallMs: number | null;
  dipPercent: number | null;
  lowerBound: boolean;
  error?: string;
  /** The equivalent command line. */
  command: string;
}

export interface MigrationBenchResult {
  params: Omit<MigrationBenchParams, 'workloads'> & { workloads: string[] };
  rows: MigrationBenchRow[];
  /** Does dirty-limit converge a guest plain pre-copy cannot, with a smaller stall than auto-converge? */
  notes: string[];
}

/** One cell: the `migrate` arguments, run in-process by the caller. */
export type RunCell = (args: string[]) => Promise<MigrationStats>;

export function cellArgs(p: MigrationBenchParams, w: BenchWorkload, policy: MigrationPolicy): string[] {
  return [
    '--local', '--engine', p.engine, '-v', String(p.vcpus), '-b', String(p.bytesPerVcpu), ...workloadArgs(w),
    '--max-bandwidth', String(p.maxBandwidth), '--downtime-limit', String(p.downtimeLimitMs), '--max-rounds', String(p.maxRounds),
    '--warmup-ms', String(p.warmupMs), '--dest-run-ms', String(p.destRunMs), ...policyArgs(policy),
    ...(policy === 'dirty-limit' ? ['--vcpu-dirty-limit', String(p.vcpuDirtyLimit), '--dirty-ring', String(p.dirtyRing)] : []),
  ];
}

function row(w: BenchWorkload, policy: MigrationPolicy, s: MigrationStats, command: string): MigrationBenchRow {
  const dips = (s.guest?.perVcpu ?? []).map((v) => v.dipPercent).filter((x): x is number => x !== null);
  return {
    workload: w.name,
    policy,
    status: s.status,
    converged: s.status === 'completed',
    postcopy: s.postcopy !== undefined,
    totalSeconds: s.totalSeconds,
    downtimeSeconds: s.downtimeSeconds,
    transferredBytes: s.transferredBytes,
    ramBytes: s.ramBytes,
    transferredPerRam: s.transferredBytes / s.ramBytes,
    rounds: s.rounds.length,
    throttlePercent: s.throttlePercent,
    maxStallMs: s.guest?.maxStallMs ?? null,
    p99StallMs: s.guest?.p99StallMs ?? null,
    dipPercent: dips.length ? Math.max(...dips) : null,
    lowerBound: s.guest?.perVcpu.some((v) => v.lowerBound) ?? false,
    ...(s.error ? { error: s.error } : {}),
    command,
  };
}

export async function runMigrationBench(p: MigrationBenchParams, run: RunCell, log: (line: string) => void): Promise<MigrationBenchResult> {
  const rows: MigrationBenchRow[] = [];
  for (const w of p.workloads) {
    for (const policy of p.policies) {
      const args = cellArgs(p, w, policy);
      const command = ['stage2', 'migrate', ...args].join(' ');
      log(`${w.name} / ${policy}: ${command}`);
      const r = row(w, policy, await run(args), command);
      rows.push(r);
      log(`  ${r.converged ? (r.postcopy ? 'completed by post-copy' : 'converged') : `NOT converged (${r.status}${r.error ? `: ${r.error}` : ''})`}; ${r.totalSeconds.toFixed(2)} s, downtime ${(r.downtimeSeconds * 1000).toFixed(1)} ms, guest max stall ${fmtMs(r.maxStallMs)}`);
    }
  }
  const { workloads, ...rest } = p;
  return { params: { ...rest, workloads: workloads.map((w) => w.name) }, rows, notes: closingNotes(rows) };
}

const fmtMs = (x: number | null) => (x === null ? '-' : `${x.toFixed(1)} ms`);

/**
 * The question the table answers first: for each guest plain pre-copy could not converge, did
 * dirty-limit, and did its guest stall less than under auto-converge? Each answer says why.
 */
export function closingNotes(rows: MigrationBenchRow[]): string[] {
  const notes: string[] = [];
  const at = (w: string, p: MigrationPolicy) => rows.find((r) => r.workload === w && r.policy === p);
  for (const w of [...new Set(rows.map((r) => r.workload))]) {
    const pre = at(w, 'precopy');
    const dl = at(w, 'dirty-limit');
    const ac = at(w, 'auto-converge');
    if (!pre || pre.converged || !dl) continue;
    if (!dl.converged) {
      notes.push(`${w}: plain pre-copy did not converge, and neither did dirty-limit (${dl.error ?? dl.status}).`);
      continue;
    }
    let line = `${w}: plain pre-copy did not converge; dirty-limit did (${fmtMs(dl.maxStallMs)} guest max stall)`;
    if (ac) {
      if (!ac.converged) line += `, auto-converge did not (${ac.throttlePercent}% throttle when the rounds ran out; guest max stall ${fmtMs(ac.maxStallMs)} meanwhile)`;
      else if (dl.maxStallMs !== null && ac.maxStallMs !== null) {
        line += dl.maxStallMs < ac.maxStallMs ? `, with a smaller stall than auto-converge (${fmtMs(ac.maxStallMs)} at ${ac.throttlePercent}% throttle)` : `, but its guest stalled longer than under auto-converge (${fmtMs(ac.maxStallMs)} at ${ac.throttlePercent}% throttle): dirty-limit holds a vCPU at its DIRTY_RING_FULL exits, sleeping a whole ring's worth of pages at the limit each time (see --dirty-ring)`;
      }
    }
    notes.push(line + '.');
  }
  if (notes.length === 0) notes.push('plain pre-copy converged every guest here: raise the dirty rates or lower --max-bandwidth to see the policies differ.');
  return notes;
}

/** One table, a row per (workload, policy). */
export function migrationTable(r: MigrationBenchResult): string {
  const head = ['workload', 'policy', 'result', 'total s', 'downtime ms', 'sent/RAM', 'rounds', 'throttle', 'max stall ms', 'p99 ms', 'dip %'];
  const body = r.rows.map((x) => [
    x.workload,
    x.policy,
    x.converged ? (x.postcopy ? 'post-copy' : 'converged') : 'NOT converged',
    x.totalSeconds.toFixed(2),
    x.converged ? (x.downtimeSeconds * 1000).toFixed(1) : '-',
    x.transferredPerRam.toFixed(2),
    String(x.rounds),
    `${x.throttlePercent}%`,
    x.maxStallMs === null ? '-' : `${x.maxStallMs.toFixed(1)}${x.lowerBound ? '+' : ''}`,
    x.p99StallMs === null ? '-' : x.p99StallMs.toFixed(1),
    x.dipPercent === null ? '-' : x.dipPercent.toFixed(0),
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => (i < 3 ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  const rule = `+${widths.map((w) => '-'.repeat(w + 2)).join('+')}+`;
  return [rule, line(head), rule, ...body.map(line), rule].join('\n');
}

export function migrationSvg(r: MigrationBenchResult): Promise<string> {
  const p = r.params;
  return renderGroupedBarSvg({
    title: `stage2 bench migration: ${p.vcpus} vCPUs x ${p.bytesPerVcpu / 2 ** 20} MiB, link ${(p.maxBandwidth / 2 ** 20).toFixed(0)} MiB/s (pale: did not converge)`,
    yTitle: 'guest-perceived max stall, ms (log)',
    bars: r.rows.filter((x) => x.maxStallMs !== null).map((x) => ({ group: x.workload, series: x.policy, y: Math.max(0.1, x.maxStallMs!), faded: !x.converged })),
  });
}
