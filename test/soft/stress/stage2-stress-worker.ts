// Worker for stage2-stress.test.ts: one thread hammering the shared stage-2 table.
//
// Roles (workerData.role):
//  'mutator' - owns OWN_BLOCKS 2 MiB blocks of guest memory (its "own region") and keeps a model
//              of what each own gfn must translate to; under the MMU read lock it maps 4K pages
//              and 2M blocks (collapsing tables), relaxes W, splits, and checks the model after
//              every change; in the shared 1 GiB region it maps, collapses (2M and, rarely, 1G)
//              and splits concurrently with every other mutator, and zaps 2 MiB regions' 4 KiB
//              tables against the entry it read (huge-page recovery's zap under the read lock;
//              an own zap must win), checking that any translation
//              it sees is the only legal one. Now and then it takes the MMU lock exclusively to
//              write-protect everything (bumping a shared generation so every mutator drops W
//              from its model) or to unmap one of its blocks.
//  'reader'  - a lock-free TLB filler: RCU read sections of random getLeaf() over the whole area,
//              checking every leaf it sees decodes to a legal pfn.
// Every table walk runs with debug on and a quarantined pool: touching a freed table page throws.

import { parentPort, workerData } from 'node:worker_threads';
import { MmuLock, type MmuLockShared } from '../../../src/soft/locking/mmu-lock.ts';
import { PROT_RW, PROT_W, formatPte, leafPfn, pteIsLeaf, pteIsTable, pteWritable, tableBase, tableIndex } from '../../../src/soft/pgtable/pte.ts';
import { EAGAIN, ENOMEM, OK, Stage2PageTable, newLeafLookup, type Stage2Shared } from '../../../src/soft/pgtable/stage2.ts';

export const G1 = 2 ** 18;
export const M2 = 512;
/** Shared region: gfns [G1, 2*G1), mapped only to pfn = gfn + PFN_VARIANT[0]. */
export const SHARED_BASE = G1;
/** Own regions: thread t owns [OWN_BASE + t*OWN_BLOCKS*M2, ... + OWN_BLOCKS*M2). */
export const OWN_BASE = 4 * G1;
export const OWN_BLOCKS = 8;
/** The two legal pfns of gfn: gfn + variant (multiples of 1 GiB keep blocks aligned). */
export const PFN_VARIANT = [8 * G1, 16 * G1];
export const AREA_PAGES = 8 * G1;
/** The first few 2 MiB regions of the shared area, where zaps race faults and collapses. */
const HOT_REGIONS = 8;

interface Data {
  role: 'mutator' | 'reader';
  index: number;
  seed: number;
  durationMs: number;
  focusShared?: boolean;
  pgt: Stage2Shared;
  lock: MmuLockShared;
  /** Int32: [0] write-protect generation, [1] stop flag, [2] shared zaps in flight, [3] shared zaps done. */
  ctl: SharedArrayBuffer;
}

const d = workerData as Data;

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    // mulberry32
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const rand = rng(d.seed);
const randInt = (n: number): number => Math.floor(rand() * n);
const ctl = new Int32Array(d.ctl);
const counts: Record<string, number> = {};
const bump = (k: string): void => {
  counts[k] = (counts[k] ?? 0) + 1;
};
let leavesRemoved = 0;

const lock = MmuLock.attach(d.lock);
const pgt = Stage2PageTable.attach(d.pgt, {
  lock, // every operation asserts the lock discipline
  onLeafRemoved: (pfn, level) => {
    if (!(level >= 1 && level <= 3 && pfn >= PFN_VARIANT[0]! && pfn < PFN_VARIANT[1]! + AREA_PAGES)) {
      throw new Error(`onLeafRemoved: impossible leaf pfn ${pfn} level ${level}`);
    }
    leavesRemoved++;
  },
});
lock.onExclusiveUnlock = () => pgt.reclaim();
const out = newLeafLookup();
/**
 * Map-fault ops (map, collapse, split) run under faultLock(), shared (cmpxchg) in 'parallel'
 * mode and exclusive otherwise; relax ops under relaxLock(), shared unless 'global-write'.
 */
const shared = lock.faultShared;
const relaxShared = lock.relaxShared;

class CheckError extends Error {
  override name = 'CheckError';
}
function fail(msg: string): never {
  throw new CheckError(`[${d.role} ${d.index}] ${msg}`);
}

/** The current walk for gfn, level by level (for failure messages). */
function describePath(gfn: number): string {
  const w = pgt.pool.words;
  let table = pgt.root;
  const parts: string[] = [];
  for (let level = 0; level < 4; level++) {
    const idx = Math.floor(gfn / [2 ** 27, G1, M2, 1][level]!) & 511;
    const pte = Atomics.load(w, table * 512 + idx);
    parts.push(`L${level} page ${table}[${idx}]=0x${(pte >>> 0).toString(16)}`);
    if (!pteIsTable(pte)) break;
    table = tableIndex(pte);
  }
  // The level-2 table of the shared region: every entry that is not what it should be.
  const l1 = Atomics.load(w, pgt.root * 512);
  const l2 = pteIsTable(l1) ? Atomics.load(w, tableBase(l1) + 1) : 0;
  if (pteIsTable(l2)) {
    const t = tableIndex(l2);
    const odd: string[] = [];
    const kinds: Record<string, number> = {};
    for (let i = 0; i < 512; i++) {
      const e = Atomics.load(w, t * 512 + i);
      const k = pteIsLeaf(e) ? 'leaf' : pteIsTable(e) ? 'table' : e === 0 ? 'zero' : 'special';
      kinds[k] = (kinds[k] ?? 0) + 1;
      if (pteIsLeaf(e) && leafPfn(e) !== SHARED_BASE + i * M2 + PFN_VARIANT[0]!) odd.push(`[${i}]=${formatPte(e)}`);
    }
    parts.push(`shared L2 page ${t}: ${JSON.stringify(kinds)} odd: ${odd.slice(0, 8).join(', ')}`);
  }
  parts.push(`stats ${JSON.stringify(pgt.stats())}`);
  return parts.join(' -> ');
}

/** The level-2 entry covering gfn as a recovery scan would read it (0 when a table above is missing). */
function level2Entry(gfn: number): number {
  const w = pgt.pool.words;
  pgt.rcuReadLock();
  try {
    let pte = Atomics.load(w, pgt.root * 512 + (Math.floor(gfn / 2 ** 27) & 511));
    for (let level = 1; level <= 2; level++) {
      if (!pteIsTable(pte)) return 0;
      pte = Atomics.load(w, tableBase(pte) + (Math.floor(gfn / [2 ** 27, G1, M2, 1][level]!) & 511));
    }
    return pte;
  } finally {
    pgt.rcuReadUnlock();
  }
}

/** Any leaf anywhere must decode to one of gfn's two legal pfns. */
function checkLegal(gfn: number): void {
  const pte = pgt.getLeaf(gfn, out);
  if (pte === 0) return;
  const pfn = leafPfn(pte) + (gfn % [2 ** 27, G1, M2, 1][out.level]!);
  if (pfn !== gfn + PFN_VARIANT[0]! && pfn !== gfn + PFN_VARIANT[1]!) fail(`gfn ${gfn} translates to illegal pfn ${pfn} (level ${out.level}, ptep ${out.ptep} = page ${Math.floor(out.ptep / 512)}[${out.ptep % 512}], pte 0x${(pte >>> 0).toString(16)}); now: ${describePath(gfn)}`);
  if (gfn >= SHARED_BASE && gfn < SHARED_BASE + G1 && pfn !== gfn + PFN_VARIANT[0]!) fail(`shared gfn ${gfn} has the wrong variant`);
}

function runReader(): void {
  const checkShared = (gfn: number, level: number, pte: number): void => {
    if (leafPfn(pte) !== gfn + PFN_VARIANT[0]!) fail(`forEachLeaf: shared gfn ${gfn} level ${level} has pfn ${leafPfn(pte)}`);
  };
  // At least one batch even when the mutators were done before this thread got a CPU.
  let batches = 0;
  while (Atomics.load(ctl, 1) === 0 || batches === 0) {
    if (batches > 0 && rand() < 0.2) {
      // A long walk (its own RCU section) through tables that collapses are unlinking.
      pgt.forEachLeaf(SHARED_BASE + randInt(G1 / M2) * M2, 16 * M2, checkShared);
      bump('readerWalks');
      continue;
    }
    pgt.rcuReadLock();
    for (let i = 0; i < 64; i++) {
      const gfn = rand() < 0.5 ? SHARED_BASE + randInt(G1) : OWN_BASE + randInt(8 * OWN_BLOCKS * M2);
      checkLegal(gfn);
    }
    pgt.rcuReadUnlock();
    bump('readerBatches');
    batches++;
  }
}

function runMutator(): void {
  const ownBase = OWN_BASE + d.index * OWN_BLOCKS * M2;
  const ownPages = OWN_BLOCKS * M2;
  // Model: expected pfn (-1 unmapped) and W of each own gfn.
  const modelPfn = new Float64Array(ownPages).fill(-1);
  const modelW = new Uint8Array(ownPages);
  let seenGeneration = Atomics.load(ctl, 0);

  const syncGeneration = (): void => {
    const g = Atomics.load(ctl, 0);
    if (g !== seenGeneration) {
      modelW.fill(0);
      seenGeneration = g;
    }
  };
  const checkOwn = (i: number): void => {
    const gfn = ownBase + i;
    const pte = pgt.getLeaf(gfn, out);
    if (modelPfn[i] === -1) {
      if (pte !== 0) fail(`own gfn ${gfn} should be unmapped, has pfn ${leafPfn(pte)} (lost unmap?)`);
      return;
    }
    if (pte === 0) fail(`own gfn ${gfn} lost its mapping (expected pfn ${modelPfn[i]}, locked=${out.locked})`);
    const pfn = leafPfn(pte) + (gfn % [2 ** 27, G1, M2, 1][out.level]!);
    if (pfn !== modelPfn[i]) fail(`own gfn ${gfn}: pfn ${pfn}, expected ${modelPfn[i]} (torn or lost update)`);
    if (pteWritable(pte) !== (modelW[i] === 1)) fail(`own gfn ${gfn}: W=${pteWritable(pte)}, expected ${modelW[i] === 1}`);
  };
  /** Retry a shared op that may lose table-allocation races with other threads. */
  const retry = (op: () => number, what: string): number => {
    for (let i = 0; i < 10_000; i++) {
      const r = op();
      if (r !== EAGAIN) return r;
      bump(`${what}.eagain`);
    }
    fail(`${what}: EAGAIN 10000 times in a row`);
  };

  const deadline = Date.now() + d.durationMs;
  while (Date.now() < deadline) {
    // focusShared (debugging aid): only exclusive sweeps and shared-region operations.
    const p0 = rand();
    const p = d.focusShared && p0 >= 0.02 ? 0.63 + ((p0 - 0.02) / 0.98) * 0.37 : p0;
    if (p < 0.02) {
      // Exclusive: write-protect sweep or unmap of an own block.
      lock.exclusiveLock();
      try {
        // Another mutator may have swept since this one last held the lock.
        syncGeneration();
        const q = rand();
        if (q < 0.5) {
          pgt.writeProtect(0, AREA_PAGES);
          Atomics.add(ctl, 0, 1);
          syncGeneration();
          bump('wrprotSweep');
        } else if (q < 0.7) {
          // Tear down part of the shared region under lock-free readers (tables left empty are
          // freed after a grace period).
          const gfn = SHARED_BASE + randInt(G1 / M2) * M2;
          pgt.unmap(gfn, randInt(8) * M2 + 1);
          for (let k = 0; k < 8; k++) checkLegal(gfn + randInt(8 * M2));
          bump('shared.unmap');
        } else {
          const b = randInt(OWN_BLOCKS);
          pgt.unmap(ownBase + b * M2, M2);
          modelPfn.fill(-1, b * M2, (b + 1) * M2);
          modelW.fill(0, b * M2, (b + 1) * M2);
          bump('unmap');
        }
        for (let i = 0; i < ownPages; i++) checkOwn(i);
      } finally {
        lock.exclusiveUnlock();
      }
      continue;
    }
    const relax = (p >= 0.5 && p < 0.6) || p >= 0.96;
    if (relax) lock.relaxLock();
    else lock.faultLock();
    try {
      syncGeneration();
      if (p < 0.45) {
        // Own 4K fault.
        const i = randInt(ownPages);
        const v = randInt(2);
        const gfn = ownBase + i;
        if (retry(() => pgt.map(gfn, 3, gfn + PFN_VARIANT[v]!, PROT_RW, shared), 'own.map4k') !== OK) fail('own map4k failed');
        modelPfn[i] = gfn + PFN_VARIANT[v]!;
        modelW[i] = 1;
        checkOwn(i);
        // Neighbours in the same block keep their values.
        checkOwn(i ^ 1);
        bump('own.map4k');
      } else if (p < 0.5) {
        // Own 2M block (collapses the 4K table when there is one).
        const b = randInt(OWN_BLOCKS);
        const v = randInt(2);
        const gfn = ownBase + b * M2;
        if (retry(() => pgt.map(gfn, 2, gfn + PFN_VARIANT[v]!, PROT_RW, shared), 'own.map2m') !== OK) fail('own map2m failed');
        for (let j = 0; j < M2; j++) {
          modelPfn[b * M2 + j] = gfn + j + PFN_VARIANT[v]!;
          modelW[b * M2 + j] = 1;
        }
        checkOwn(b * M2 + randInt(M2));
        bump('own.map2m');
      } else if (p < 0.6) {
        // Relax W on an own page (the dirty-logging write fault).
        const i = randInt(ownPages);
        const r = pgt.relaxPerms(ownBase + i, PROT_W, relaxShared);
        if (modelPfn[i] === -1) {
          if (r !== EAGAIN) fail(`relax of unmapped own gfn returned ${r}`);
        } else {
          if (r !== OK) fail(`relax of mapped own gfn returned ${r}`);
          // A relax on a block sets W for the whole block.
          const lvlPages = [2 ** 27, G1, M2, 1][pgt.getLeaf(ownBase + i, out) ? out.level : 3]!;
          const start = i - ((ownBase + i) % lvlPages);
          for (let j = Math.max(0, start); j < Math.min(ownPages, start + lvlPages); j++) modelW[j] = 1;
        }
        checkOwn(i);
        bump('own.relax');
      } else if (p < 0.615) {
        // Zap an own split block's 4 KiB table (async huge-page recovery under the read lock):
        // only this thread changes its own entries, so the zap must win and leave the block
        // unmapped, every other own page as it was.
        const b = randInt(OWN_BLOCKS);
        const gfn = ownBase + b * M2;
        const entry = level2Entry(gfn);
        const n = pgt.zapTablesShared([{ gfn, entry }]);
        if (pteIsTable(entry) && n !== 1) fail(`own zap of gfn ${gfn} lost a race nobody could run`);
        if (n === 1) {
          modelPfn.fill(-1, b * M2, (b + 1) * M2);
          modelW.fill(0, b * M2, (b + 1) * M2);
        }
        for (let j = 0; j < M2; j += 41) checkOwn(b * M2 + j);
        checkOwn(((b + 1) % OWN_BLOCKS) * M2 + randInt(M2));
        bump(n === 1 ? 'own.zapTable' : 'own.zapTable.none');
      } else if (p < 0.63) {
        const b = randInt(OWN_BLOCKS);
        const r = pgt.splitHugePages(ownBase + b * M2, M2, shared);
        if (r < 0) fail(`own split returned ${r}`);
        for (let j = 0; j < M2; j += 37) checkOwn(b * M2 + j);
        bump('own.split');
      } else if (p < 0.85) {
        // Shared 4K fault (a third of them in the few hot regions the zaps target).
        const gfn = SHARED_BASE + (rand() < 0.33 ? randInt(HOT_REGIONS * M2) : randInt(G1));
        const zapGen = Atomics.load(ctl, 3);
        const r = pgt.map(gfn, 3, gfn + PFN_VARIANT[0]!, PROT_RW, shared);
        if (r !== OK && r !== EAGAIN) fail(`shared map4k returned ${r}`);
        checkLegal(gfn);
        // Only a zap (in flight now, or finished since the map began) may have removed it.
        if (r === OK && pgt.getLeaf(gfn, out) === 0 && !out.locked && Atomics.load(ctl, 2) === 0 && Atomics.load(ctl, 3) === zapGen) fail(`shared gfn ${gfn} unmapped right after map`);
        bump(r === OK ? 'shared.map4k' : 'shared.map4k.eagain');
      } else if (p < 0.93) {
        const gfn = SHARED_BASE + (rand() < 0.33 ? randInt(HOT_REGIONS) : randInt(G1 / M2)) * M2;
        const r = pgt.collapse(gfn, 2, gfn + PFN_VARIANT[0]!, PROT_RW, shared);
        if (r !== OK && r !== EAGAIN) fail(`shared collapse2m returned ${r}`);
        checkLegal(gfn + randInt(M2));
        bump(r === OK ? 'shared.collapse2m' : 'shared.collapse2m.eagain');
      } else if (p < 0.935) {
        const r = pgt.collapse(SHARED_BASE, 1, SHARED_BASE + PFN_VARIANT[0]!, PROT_RW, shared);
        if (r !== OK && r !== EAGAIN) fail(`shared collapse1g returned ${r}`);
        bump(r === OK ? 'shared.collapse1g' : 'shared.collapse1g.eagain');
      } else if (p < 0.95) {
        // Zap a shared 2 MiB region's table as recovery does: against the entry a scan read,
        // racing 4K faults into that table, collapses of it (2M) and of its parent (1G), splits,
        // relaxes and lock-free readers inside it.
        // A batch of 4 neighbouring regions, scanned, then zapped a while later (recovery checks
        // eligibility with the host in between): the entries it read are often stale by then.
        const first = SHARED_BASE + randInt(HOT_REGIONS - 3) * M2;
        const zaps = [0, 1, 2, 3].map((k) => ({ gfn: first + k * M2, entry: level2Entry(first + k * M2) })).filter((z) => pteIsTable(z.entry));
        for (let k = 0; k < 64; k++) checkLegal(first + randInt(4 * M2));
        // Announced around the zap: a 4K fault elsewhere may see its fresh leaf zapped (legal:
        // the vCPU just faults again), which the map check below allows only then.
        Atomics.add(ctl, 2, 1);
        const n = pgt.zapTablesShared(zaps);
        Atomics.sub(ctl, 2, 1);
        Atomics.add(ctl, 3, 1);
        for (let k = 0; k < 4; k++) checkLegal(first + randInt(4 * M2));
        for (let k = 0; k < n; k++) bump('shared.zapTable');
        for (let k = n; k < zaps.length; k++) bump('shared.zapTable.lost');
      } else if (p < 0.96) {
        const gfn = SHARED_BASE + randInt(G1 / M2) * M2;
        const r = pgt.splitHugePages(gfn, 4 * M2, shared);
        if (r === ENOMEM) fail('pool exhausted');
        if (r < 0) fail(`shared split returned ${r}`);
        bump('shared.split');
      } else {
        const gfn = SHARED_BASE + randInt(G1);
        const r = pgt.relaxPerms(gfn, PROT_W, relaxShared);
        if (r !== OK && r !== EAGAIN) fail(`shared relax returned ${r}`);
        bump('shared.relax');
      }
      // Whatever the op, spot-check the shared region around it (a wrong write by a racing
      // visitor lands on gfns other than the one operated on).
      if (p >= 0.63) for (let k = 0; k < 4; k++) checkLegal(SHARED_BASE + randInt(G1));
    } finally {
      if (relax) lock.relaxUnlock();
      else lock.faultUnlock();
    }
  }
  // Final full check of the own region.
  lock.faultLock();
  try {
    syncGeneration();
    for (let i = 0; i < ownPages; i++) checkOwn(i);
  } finally {
    lock.faultUnlock();
  }
}

try {
  if (d.role === 'reader') runReader();
  else runMutator();
  pgt.reclaim();
  pgt.detach();
  parentPort!.postMessage({ ok: true, counts, leavesRemoved, lockSleeps: lock.rw.sleeps });
} catch (e) {
  parentPort!.postMessage({ ok: false, error: e instanceof Error ? `${e.name}: ${e.message}\n${e.stack}` : String(e), counts });
}
