import { describe, it, expect } from 'vitest';
import { PROT_R, PROT_RW, PTE_LOCKED, PTE_POISON, mkLeaf, mkTable } from '../../../src/soft/pgtable/pte.ts';
import { Stage2PageTable, newLeafLookup } from '../../../src/soft/pgtable/stage2.ts';
import { buildSplitTable } from '../../../src/soft/pgtable/bbm.ts';
import { MapVisitor } from '../../../src/soft/pgtable/visitors.ts';
import {
  EAGAIN, OK, PoisonedTableError, WALK_HANDLE_FAULT, WALK_LEAF, WALK_SHARED, WALK_TABLE_POST, WALK_TABLE_PRE, Walker,
  type VisitCtx, type Visitor,
} from '../../../src/soft/pgtable/walker.ts';

const M2 = 512;

class Recorder implements Visitor {
  log: string[] = [];
  result: (ctx: VisitCtx, kind: number) => number = () => OK;
  visit(ctx: VisitCtx, kind: number): number {
    const k = kind === WALK_LEAF ? 'leaf' : kind === WALK_TABLE_PRE ? 'pre' : 'post';
    this.log.push(`${k}:${ctx.level}:${ctx.gfn}${ctx.old === 0 ? ':0' : ''}`);
    return this.result(ctx, kind);
  }
}

function table() {
  const pgt = Stage2PageTable.create({ maxTablePages: 256, debug: true });
  pgt.map(M2 + 1, 3, 1, PROT_R, false);
  pgt.map(2 * M2, 2, 0, PROT_R, false);
  return pgt;
}

describe('Walker', () => {
  it('visits pre-order, leaves, post-order in address order, with each entry\'s level and first gfn', () => {
    const pgt = table();
    const w = new Walker(pgt.pool.words, true);
    const v = new Recorder();
    // gfns [M2, M2+3): inside the 4K table under the second 2M entry.
    expect(w.walk(pgt.root, 0, M2, 3, v, WALK_LEAF | WALK_TABLE_PRE | WALK_TABLE_POST)).toBe(OK);
    expect(v.log).toEqual([
      'pre:0:0', 'pre:1:0', 'pre:2:512',
      'leaf:3:512:0', 'leaf:3:513', 'leaf:3:514:0',
      'post:2:512', 'post:1:0', 'post:0:0',
    ]);
    v.log = [];
    // A block is one leaf visit however many of its pages the range covers.
    w.walk(pgt.root, 0, 2 * M2 + 5, 600, v, WALK_LEAF);
    expect(v.log).toEqual(['leaf:2:1024', 'leaf:2:1536:0']);
    pgt.destroy();
  });

  it('EAGAIN stops a fault walk but a sweep carries on', () => {
    const pgt = table();
    const w = new Walker(pgt.pool.words);
    const v = new Recorder();
    v.result = () => EAGAIN;
    expect(w.walk(pgt.root, 0, M2, 3, v, WALK_LEAF | WALK_HANDLE_FAULT)).toBe(EAGAIN);
    expect(v.log.length).toBe(1);
    v.log = [];
    expect(w.walk(pgt.root, 0, M2, 3, v, WALK_LEAF)).toBe(OK);
    expect(v.log.length).toBe(3);
    pgt.destroy();
  });

  it('descends into a table the visitor installed, and tryPte is a cmpxchg only when shared', () => {
    const pgt = table();
    const w = new Walker(pgt.pool.words);
    let installed = false;
    const v = new Recorder();
    v.result = (ctx, kind) => {
      if (kind === WALK_LEAF && ctx.level === 2 && ctx.gfn === 3 * M2 && !installed) {
        installed = true;
        const t = pgt.mm.zallocTablePage();
        pgt.pool.words[t * 512 + 7] = mkLeaf(99, PROT_RW);
        expect(ctx.tryPte(mkTable(t))).toBe(true);
      }
      return OK;
    };
    w.walk(pgt.root, 0, 3 * M2, 8, v, WALK_LEAF | WALK_SHARED);
    expect(v.log.slice(-2)).toEqual([`leaf:3:${3 * M2 + 6}:0`, `leaf:3:${3 * M2 + 7}`]);
    // A stale ctx.old makes a shared tryPte fail and leaves the entry alone.
    const probe: Visitor = {
      visit(ctx) {
        const cur = ctx.old;
        ctx.old = 12345;
        expect(ctx.tryPte(0)).toBe(false);
        expect(ctx.load()).toBe(cur);
        return OK;
      },
    };
    w.walk(pgt.root, 0, M2 + 1, 1, probe, WALK_LEAF | WALK_SHARED);
    expect(pgt.translate(M2 + 1, newLeafLookup())).toBe(1);
    pgt.destroy();
  });

  it('throws on a freed (POISON) table page in debug mode', () => {
    const pgt = table();
    const out = newLeafLookup();
    pgt.getLeaf(M2 + 1, out);
    const page = Math.floor(out.ptep / 512);
    pgt.pool.words.fill(PTE_POISON, page * 512, page * 512 + 512);
    const w = new Walker(pgt.pool.words, true);
    expect(() => w.walk(pgt.root, 0, M2, 1, new Recorder(), WALK_LEAF)).toThrow(PoisonedTableError);
    expect(() => pgt.getLeaf(M2 + 1, out)).toThrow(PoisonedTableError);
    expect(() => pgt.forEachLeaf(0, 4 * M2, () => {})).toThrow(PoisonedTableError);
  });

  it('is not re-entrant', () => {
    const pgt = table();
    const w = new Walker(pgt.pool.words);
    const v: Visitor = { visit: () => w.walk(pgt.root, 0, 0, 1, v, WALK_LEAF) };
    expect(() => w.walk(pgt.root, 0, 0, 1, v, WALK_LEAF)).toThrow(/re-entrant/);
    pgt.destroy();
  });
});

describe('break-before-make', () => {
  it('the TLB flush happens while the entry is LOCKED, and the new value lands after it', () => {
    const seen: string[] = [];
    const out = newLeafLookup();
    let pgt: Stage2PageTable | undefined;
    pgt = Stage2PageTable.create({
      maxTablePages: 256,
      tlbFlush: (gfn, n) => {
        pgt!.getLeaf(gfn, out);
        seen.push(`${gfn}+${n}:${out.locked ? 'locked' : 'NOT LOCKED'}`);
      },
    });
    pgt.map(M2, 2, 4 * M2, PROT_R, true); // invalid -> block: no break, no flush
    pgt.map(M2 + 3, 3, 4 * M2 + 3, PROT_RW, true); // block -> table split
    pgt.collapse(M2, 2, 4 * M2, PROT_RW, true); // table -> block
    pgt.map(M2, 2, 8 * M2, PROT_RW, true); // block -> another block
    pgt.splitHugePages(0, 4 * M2, true);
    expect(seen).toEqual([`${M2}+${M2}:locked`, `${M2}+${M2}:locked`, `${M2}+${M2}:locked`, `${M2}+${M2}:locked`]);
    expect(pgt.translate(M2 + 9, out)).toBe(8 * M2 + 9);
    expect(out.level).toBe(3);
    // A TLB flush that throws leaves the old entry in place, not LOCKED.
    pgt.setCallbacks({ tlbFlush: () => { throw new Error('flush failed'); } });
    const before = pgt.getLeaf(M2 + 9, out);
    expect(() => pgt.map(M2 + 9, 3, 77, PROT_RW, true)).toThrow(/flush failed/);
    expect(pgt.getLeaf(M2 + 9, out)).toBe(before);
    expect(out.locked).toBe(false);
    // A leftover LOCKED entry met by an exclusive walk is a bug, reported loudly.
    Atomics.store(pgt.pool.words, out.ptep, PTE_LOCKED);
    expect(() => pgt.map(M2 + 9, 3, 1, PROT_R, false)).toThrow(/LOCKED/);
  });
});

describe('races, replayed deterministically from inside break-before-make', () => {
  it('while an entry is LOCKED, other threads get EAGAIN from map/relax/collapse and see no leaf', () => {
    const out = newLeafLookup();
    let other: Stage2PageTable | undefined;
    const results: number[] = [];
    const pgt = Stage2PageTable.create({
      maxTablePages: 256,
      debug: true,
      tlbFlush: (gfn) => {
        // "Another vCPU" runs here, between break and make.
        results.push(other!.map(gfn + 1, 3, 4 * M2 + 1, PROT_RW, true));
        results.push(other!.relaxPerms(gfn + 1, PROT_RW, true));
        results.push(other!.collapse(gfn, 2, 4 * M2, PROT_RW, true));
        results.push(other!.getLeaf(gfn + 1, out));
        results.push(out.locked ? 1 : 0);
      },
    });
    other = Stage2PageTable.attach(pgt.shared);
    pgt.map(M2, 2, 4 * M2, PROT_R, true);
    const live = pgt.liveTablePages();
    expect(pgt.map(M2 + 3, 3, 4 * M2 + 3, PROT_RW, true)).toBe(OK); // split: break, flush, make
    expect(results).toEqual([EAGAIN, EAGAIN, EAGAIN, 0, 1]);
    // The losers allocated nothing that stayed allocated; the winner added one table.
    expect(pgt.liveTablePages()).toBe(live + 1);
    other.detach();
    pgt.destroy();
  });

  it('a lost table-allocation race frees the loser\'s page at once and returns EAGAIN', () => {
    const base = Stage2PageTable.create({ maxTablePages: 256 });
    const pool = base.pool;
    let raceOnce = true;
    // The allocator is the injection point: while map() holds a fresh page for the empty level-0
    // entry, "another thread" installs its own table there first.
    const racyMm = {
      words: pool.words,
      liveTablePages: () => pool.liveTablePages(),
      freeTablePage: (i: number) => pool.freeTablePage(i),
      zallocTablePage: (): number => {
        const mine = pool.zallocTablePage();
        if (raceOnce) {
          raceOnce = false;
          const theirs = pool.zallocTablePage();
          Atomics.store(pool.words, base.root * 512, mkTable(theirs));
        }
        return mine;
      },
    };
    const pgt = Stage2PageTable.attach(base.shared, { mmOps: racyMm });
    const live0 = pool.liveTablePages();
    expect(pgt.map(0, 3, 7, PROT_RW, true)).toBe(EAGAIN);
    expect(pool.liveTablePages()).toBe(live0 + 1); // theirs stays, mine was freed
    expect(pgt.map(0, 3, 7, PROT_RW, true)).toBe(OK); // the retry goes through their table
    expect(pgt.translate(0, newLeafLookup())).toBe(7);
    pgt.detach();
    base.destroy();
    expect(pool.liveTablePages()).toBe(0);
  });

  it('map never descends below its target when another thread splits the target entry under it', () => {
    // Found by the stress test: map(2M) saw its block already there (nothing to do), another
    // thread split that block into a 4K table before the walker reloaded the entry, the walker
    // descended, and the map visitor wrote the 2M pte into all 512 4K entries.
    const pgt = Stage2PageTable.create({ maxTablePages: 256, debug: true });
    const out = newLeafLookup();
    pgt.map(M2, 2, 8 * M2, PROT_RW, true);
    const block = pgt.getLeaf(M2, out);
    const mv = new MapVisitor(pgt, () => {});
    mv.level = 2;
    mv.newPte = block;
    const racer: Visitor = {
      visit(ctx, kind) {
        const r = mv.visit(ctx, kind);
        if (ctx.level === 2) {
          // "Another vCPU" splits the block right after the map visitor looked at it.
          const t = buildSplitTable(pgt.mm, ctx.load(), 2, false);
          Atomics.store(ctx.words, ctx.ptep, mkTable(t));
        }
        return r;
      },
    };
    const w = new Walker(pgt.pool.words, true);
    expect(w.walk(pgt.root, 0, M2, M2, racer, WALK_LEAF | WALK_TABLE_PRE | WALK_SHARED | WALK_HANDLE_FAULT)).toBe(OK);
    for (let i = 0; i < M2; i++) {
      expect(pgt.translate(M2 + i, out)).toBe(8 * M2 + i);
      expect(out.level).toBe(3);
    }
    // And a visitor asked to act below its level refuses loudly.
    const deep: Visitor = { visit: (ctx, kind) => (ctx.level === 3 ? mv.visit(ctx, kind) : OK) };
    expect(() => w.walk(pgt.root, 0, M2, 1, deep, WALK_LEAF)).toThrow(/below its target/);
  });
});
