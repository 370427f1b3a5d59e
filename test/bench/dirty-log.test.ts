import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { SoftEngine } from '../../src/soft/engine.ts';
import { runDirtyLogBench } from '../../src/bench/dirty-log.ts';
import { runScalingBench, scalingSvg, scalingTables } from '../../src/bench/scaling.ts';

const MiB = 2 ** 20;
const base = { backing: 'anonymous', manualProtect: true, guestPageSize: 2097152, workload: 'sequential' } as const;

describe('bench dirty-log (soft engine)', () => {
  it("prints the selftest's lines and harvests every page each round", async () => {
    const lines: string[] = [];
    const r = await runDirtyLogBench(new SoftEngine(), { ...base, vcpus: 2, bytesPerVcpu: 4 * MiB, iterations: 3, lock: 'parallel' }, (l) => lines.push(l));
    expect(r.pagesPerVcpu).toBe(1024);
    expect(r.rounds).toHaveLength(3);
    for (const round of r.rounds) expect(round.dirtyPages).toBe(2048);
    for (const key of ['Populate memory time', 'Enabling dirty logging time', 'Iteration 3 dirty memory time', 'Iteration 3 get dirty log time', 'Iteration 3 clear dirty log time', 'Disabling dirty logging time']) {
      expect(lines.some((l) => l.startsWith(`${key}: `) && /\d+\.\d{9}s$/.test(l))).toBe(true);
    }
    // Every page of every round took one write-protect fault (logging is by write protection).
    expect(r.stats.writeProtectFaults).toBe(3 * 2048);
    // The vCPU threads' scheduler accounting covers the dirty phase: they ran (2048 faults each round).
    for (const round of r.rounds) expect(round.vcpuOnCpuSeconds).toBeGreaterThan(0);
    expect(lines.at(-1)).toMatch(/^vCPU threads while dirtying: on a CPU \d+\.\d{9}s, waiting for a CPU \d+\.\d{9}s$/);
  });

  it('without manual protect, get dirty log alone re-arms logging', async () => {
    const r = await runDirtyLogBench(new SoftEngine(), { ...base, manualProtect: false, vcpus: 1, bytesPerVcpu: 2 * MiB, iterations: 2, lock: 'global' }, () => {});
    expect(r.params.manualProtect).toBe(false);
    expect(r.rounds.map((x) => x.dirtyPages)).toEqual([512, 512]);
    expect(r.rounds.every((x) => x.clearDirtyLogSeconds === 0)).toBe(true);
  });
});

describe('bench scaling (soft engine)', () => {
  it('runs every (vCPUs, lock) point and renders tables and an SVG', async () => {
    const r = await runScalingBench(new SoftEngine(), { ...base, vcpuCounts: [1, 2], locks: ['global', 'parallel'], bytesPerVcpu: 2 * MiB, iterations: 2 }, () => {});
    expect(r.rows.map((x) => `${x.vcpus}/${x.lock}`)).toEqual(['1/global', '1/parallel', '2/global', '2/parallel']);
    for (const row of r.rows) expect(row.dirtyMemorySeconds).toBeGreaterThan(0);
    for (const row of r.rows) expect(row.vcpuOnCpuSeconds).toBeGreaterThan(0);
    const tables = scalingTables(r);
    expect(tables).toMatch(/Time to dirty memory:/);
    expect(tables).toMatch(/\|\s+2 \|/);
    expect(tables).toMatch(/per vCPU thread: time waiting for a CPU:/);
    expect(await scalingSvg(r)).toMatch(/^<svg/);
  });
});

describe('stage2 bench dirty-log --json', () => {
  it('prints exactly one JSON object of the DESIGN.md shape on stdout', async () => {
    const { stdout } = await promisify(execFile)(process.execPath, ['bin/stage2.mjs', 'bench', 'dirty-log', '--engine', 'soft', '-v', '1', '-b', '2M', '-i', '2', '--json'], { timeout: 60_000 });
    const lines = stdout.trim().split('\n');
    expect(lines).toHaveLength(1);
    const r = JSON.parse(lines[0]!);
    expect(r.params).toMatchObject({ engine: 'soft', vcpus: 1, bytesPerVcpu: 2 * MiB, backing: 'anonymous', iterations: 2, lock: 'parallel', manualProtect: true, guestPageSize: 2097152 });
    expect(r.pagesPerVcpu).toBe(512);
    for (const k of ['populateSeconds', 'enableDirtyLoggingSeconds', 'disableDirtyLoggingSeconds']) expect(typeof r[k]).toBe('number');
    expect(Object.keys(r.rounds[0]).sort()).toEqual(['clearDirtyLogSeconds', 'dirtyMemorySeconds', 'dirtyPages', 'getDirtyLogSeconds', 'ringFullExits', 'vcpuOnCpuSeconds', 'vcpuRunQueueSeconds']);
  });

  it('--dirty-ring N: every page dirty in every round, ring-full exits counted per round', async () => {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, ['bin/stage2.mjs', 'bench', 'dirty-log', '--engine', 'soft', '-v', '2', '-b', '4M', '-i', '3', '--dirty-ring', '256', '--json'], { timeout: 60_000 });
    const r = JSON.parse(stdout.trim());
    expect(r.params).toMatchObject({ engine: 'soft', dirtyRing: 256 });
    expect(r.rounds).toHaveLength(3);
    for (const round of r.rounds) {
      expect(round.dirtyPages).toBe(2 * 1024);
      // 1024 pages per vCPU into a 256-entry ring (soft limit 192): at least 5 exits each.
      expect(round.ringFullExits).toBeGreaterThanOrEqual(2 * 5);
      expect(round.clearDirtyLogSeconds).toBe(0);
    }
    expect(stderr).toMatch(/Iteration 3 dirty ring full exits: \d+/);
  });
});
