// `stage2 bench collapse`: every strategy re-forms every region, the JSON has the shape,
// bad input is refused with a clear message.
import { describe, expect, it } from 'vitest';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CollapseBenchError, collapseTable, runCollapseBench } from '../../src/bench/collapse.ts';

const MiB = 2 ** 20;
const run = promisify(execFile);

describe('bench collapse', () => {
  it('every strategy brings every region back to a block; sync zaps under one hold, in-place never makes a vCPU wait in parallel mode', async () => {
    const r = await runCollapseBench(
      { sizes: [16 * MiB, 32 * MiB], strategies: ['sync', 'async', 'in-place'], vcpus: 2, backing: 'hugetlb', lock: 'parallel', running: true, batchRegions: 2, timeoutSeconds: 60 },
      () => {},
    );
    expect(r.rows).toHaveLength(6);
    for (const row of r.rows) {
      expect(row.blockMappingsBefore).toBe(0);
      expect(row.blockMappingsAfter).toBe(row.bytes / (2 * MiB));
      expect(row.recoverSeconds).toBeGreaterThan(0);
      expect(row.stallP99Seconds).toBeLessThanOrEqual(row.stallMaxSeconds);
      if (row.strategy === 'in-place') expect(row.stallWaits).toBe(0);
    }
    expect(collapseTable(r)).toMatch(/\|\s+32M \| in-place \|/);
  });

  it('without running vCPUs a zap strategy leaves the regions unmapped, in place re-forms them', async () => {
    const r = await runCollapseBench({ sizes: [8 * MiB], strategies: ['async', 'in-place'], vcpus: 1, backing: 'anonymous_thp', lock: 'global', running: false, batchRegions: 1, timeoutSeconds: 60 }, () => {});
    expect(r.rows.map((x) => x.blockMappingsAfter)).toEqual([0, 4]);
  });

  it('refuses sizes that are not whole 2 MiB regions per vCPU, and plain anonymous memory', async () => {
    const p = { sizes: [3 * MiB], strategies: ['sync'] as const, vcpus: 1, backing: 'hugetlb' as const, lock: 'parallel' as const, running: true, batchRegions: 1, timeoutSeconds: 1 };
    await expect(runCollapseBench({ ...p, strategies: [...p.strategies] }, () => {})).rejects.toThrow(CollapseBenchError);
    await expect(runCollapseBench({ ...p, strategies: [...p.strategies], sizes: [4 * MiB], backing: 'anonymous' }, () => {})).rejects.toThrow(/no huge pages/);
  });

  it('CLI: --json prints { params, rows } with the issue fields, and writes the SVG', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'collapse-'));
    const svg = join(dir, 'c.svg');
    const { stdout } = await run('node', ['bin/stage2.mjs', 'bench', 'collapse', '--engine', 'soft', '--sizes', '8M', '-v', '1', '--svg', svg, '--json'], { timeout: 120_000 });
    const j = JSON.parse(stdout) as { params: { sizes: number[] }; rows: Record<string, unknown>[] };
    expect(j.params.sizes).toEqual([8 * MiB]);
    expect(j.rows).toHaveLength(3);
    for (const row of j.rows) {
      for (const k of ['strategy', 'bytes', 'recoverSeconds', 'stallMaxSeconds', 'stallP99Seconds', 'blockMappingsBefore', 'blockMappingsAfter']) expect(row).toHaveProperty(k);
    }
    expect(readFileSync(svg, 'utf8')).toContain('<svg');
    await expect(run('node', ['bin/stage2.mjs', 'bench', 'collapse', '--strategies', 'lazy'])).rejects.toMatchObject({ stderr: expect.stringContaining('must be one of sync, async, in-place') });
  });
});
