// The heatmap's counting (src/dashboard/dirty-heat.ts): per 2 MiB cell, in how many of the last
// HEAT_WINDOW harvests it had a dirty page, fed bitmaps as DirtyTracker lends them.
import { describe, expect, it } from 'vitest';
import { DirtyHeat, HEAT_WINDOW } from '../../src/dashboard/dirty-heat.ts';
import { layoutCells } from '../../src/dashboard/cells.ts';
import type { MemslotInfo } from '../../src/vmm/engine.ts';

const slot = (n: number, gpa: number, bytes: number): MemslotInfo => ({ slot: n, flags: 0, guestPhysAddr: gpa, memorySize: bytes, userspaceAddr: 0, pages: bytes / 4096, internal: false });
const MiB = 2 ** 20;

describe('DirtyHeat', () => {
  const slots = [slot(0, 0, 8 * MiB), slot(1, 1 << 30, 3 * MiB)];
  it('lays slots out one after another, 2 MiB a cell (a partial last cell counts)', () => {
    const l = layoutCells(slots);
    expect(l.cells).toBe(4 + 2);
    expect(l.slots.map((s) => s.firstCell)).toEqual([0, 4]);
  });

  it('counts harvests with a dirty page per cell, over the last HEAT_WINDOW harvests', () => {
    const heat = new DirtyHeat(layoutCells(slots));
    expect(heat.harvests).toBe(0);
    const log0 = new Uint32Array(8 * 256 / 32);
    const log1 = new Uint32Array(Math.ceil((3 * 256) / 32));
    // Page 0 (cell 0) and page 700 (cell 1, 700 >> 9 = 1) of slot 0; slot 1's last page (cell 5).
    log0[0] = 1;
    log0[700 >> 5] = 1 << (700 & 31);
    log1[log1.length - 1] = 1 << 31;
    heat.tap(slots[0]!, log0);
    heat.tap(slots[1]!, log1);
    expect(heat.harvests).toBe(1);
    expect(heat.encode()).toBe('110001');
    // Next harvest: only cell 0 again.
    heat.tap(slots[0]!, Uint32Array.from(log0, (_, i) => (i === 0 ? 1 : 0)));
    heat.tap(slots[1]!, new Uint32Array(log1.length));
    expect(heat.encode()).toBe('210001');
    // The window slides: after HEAT_WINDOW clean harvests nothing is hot any more.
    for (let h = 0; h < HEAT_WINDOW; h++) {
      heat.tap(slots[0]!, new Uint32Array(log0.length));
      heat.tap(slots[1]!, new Uint32Array(log1.length));
    }
    expect(heat.encode()).toBe('000000');
    expect(heat.window).toBe(HEAT_WINDOW);
  });

  it('while deferring (stop-and-copy) only copies the lent bitmap, and counts it later', () => {
    let deferring = true;
    const heat = new DirtyHeat(layoutCells([slots[0]!]), () => deferring);
    const log = new Uint32Array(8 * 256 / 32);
    log[0] = 1;
    heat.tap(slots[0]!, log);
    log.fill(0); // the harvest reuses its buffer: the copy is what counts
    deferring = false;
    expect(heat.harvests).toBe(1);
    expect(heat.encode()).toBe('1000');
    expect(heat.deferredTapMs).toBeGreaterThan(0);
  });
});
