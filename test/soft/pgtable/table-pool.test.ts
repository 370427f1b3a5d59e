import { describe, it, expect } from 'vitest';
import { PTE_POISON } from '../../../src/soft/pgtable/pte.ts';
import { TablePool } from '../../../src/soft/pgtable/table-pool.ts';
import { startWorker } from '../../../src/util/worker.ts';

describe('TablePool', () => {
  it('hands out zeroed pages, never page 0, poisons freed pages and reuses them', () => {
    const pool = TablePool.create(4);
    const a = pool.zallocTablePage();
    const b = pool.zallocTablePage();
    const c = pool.zallocTablePage();
    expect([a, b, c].sort()).toEqual([1, 2, 3]);
    expect(pool.zallocTablePage()).toBe(-1);
    expect(pool.liveTablePages()).toBe(3);
    pool.words[b * 512 + 9] = 42;
    pool.freeTablePage(b);
    expect(pool.isPoisoned(b)).toBe(true);
    expect(pool.words[b * 512]).toBe(PTE_POISON);
    expect(pool.liveTablePages()).toBe(2);
    expect(pool.zallocTablePage()).toBe(b);
    expect(pool.words[b * 512 + 9]).toBe(0);
    expect(() => pool.freeTablePage(0)).toThrow();
    expect(pool.stats()).toMatchObject({ live: 3, allocated: 4, freed: 1 });
  });

  it('quarantine never reuses a freed page', () => {
    const pool = TablePool.create(3, { quarantine: true });
    const a = pool.zallocTablePage();
    pool.freeTablePage(a);
    const b = pool.zallocTablePage();
    expect(b).not.toBe(a);
    expect(pool.zallocTablePage()).toBe(-1);
    expect(pool.isPoisoned(a)).toBe(true);
  });

  it('never gives one page to two threads at once (4 threads, random alloc/free)', async () => {
    const pool = TablePool.create(200);
    const entry = new URL('./table-pool-worker.ts', import.meta.url);
    const workers = [1, 2, 3, 4].map((id) => startWorker(entry, { pool: pool.shared, id, ops: 100_000, seed: id * 7919 }));
    const res = await Promise.all(workers.map((w) => new Promise<{ errors: number; exhausted: number }>((ok, bad) => {
      w.once('message', ok);
      w.once('error', bad);
    })));
    await Promise.all(workers.map((w) => w.terminate()));
    for (const r of res) expect(r.errors).toBe(0);
    expect(pool.liveTablePages()).toBe(0);
    const st = pool.stats();
    expect(st.allocated).toBe(st.freed);
    expect(st.allocated).toBeGreaterThan(100_000);
  });
});
