import { describe, expect, it } from 'vitest';
import { SoftEngine } from '../../src/soft/engine.ts';
import { demandPagingSvg, demandPagingTable, runDemandPagingBench } from '../../src/bench/demand-paging.ts';

const MiB = 2 ** 20;

describe('bench demand-paging (soft engine)', () => {
  for (const path of ['uffd', 'exit'] as const) {
    it(`--mode ${path}: the selftest's lines, every page requested and installed once, a row per vCPU count`, async () => {
      const lines: string[] = [];
      const r = await runDemandPagingBench(
        new SoftEngine(),
        { vcpuCounts: [1, 2], bytesPerVcpu: 2 * MiB, backing: 'anonymous', path, uffdMode: 'missing', sharedUffd: true, readers: 2, delayUs: 0 },
        (l) => lines.push(l),
      );
      expect(r.rows.map((x) => [x.mode, x.vcpus, x.pages])).toEqual([
        [path, 1, 512],
        [path, 2, 1024],
      ]);
      for (const row of r.rows) {
        expect(row.pager).toMatchObject({ requests: row.pages, installed: row.pages, duplicates: 0, missing: 0 });
        expect(row.perVcpuPagesPerSec).toBeCloseTo(row.pages / row.vcpus / row.seconds, 6);
        expect(row.overallPagesPerSec).toBeCloseTo(row.perVcpuPagesPerSec * row.vcpus, 6);
        expect(row.vcpuPagesPerSec).toHaveLength(row.vcpus);
        expect(row.waits.map((w) => w.faults)).toEqual(Array(row.vcpus).fill(512));
        expect(row.exitsMemoryFault).toBe(row.pages);
      }
      for (const re of [/^Total guest execution time:\t\d+\.\d{9}s$/, /^Per-vcpu demand paging rate:\t\d+\.\d{6} pgs\/sec\/vcpu$/, /^Overall demand paging rate:\t\d+\.\d{6} pgs\/sec$/]) {
        expect(lines.filter((l) => re.test(l))).toHaveLength(2);
      }
      expect(lines).toContain('Finished creating vCPUs and starting uffd threads');
      const table = demandPagingTable(r);
      expect(table).toContain(`--mode ${path}`);
      expect(table.split('\n').filter((l) => /^\| +[12] \|/.test(l))).toHaveLength(2);
      expect(await demandPagingSvg(r)).toMatch(/^<svg/);
    }, 60_000);
  }

  it('MINOR mode resolves every fault by CONTINUE over the page cache', async () => {
    const r = await runDemandPagingBench(
      new SoftEngine(),
      { vcpuCounts: [2], bytesPerVcpu: 1 * MiB, backing: 'anonymous_thp', path: 'uffd', uffdMode: 'minor', sharedUffd: false, readers: 1, delayUs: 10 },
      () => {},
    );
    expect(r.rows[0]!.pager).toMatchObject({ installed: 512, missing: 0 });
  }, 60_000);
});
