// The heatmap's data: for each 2 MiB cell of guest memory, in how many of the last HEAT_WINDOW
// dirty-log harvests it had at least one dirty page. It is fed the migration's own harvests
// (DirtyTracker's onHarvest): a second harvester would take dirty bits away from the migration.
//
// The tap runs inside the harvest. Normally it ORs 16 bitmap words per cell into a bit per cell
// (counting happens when the dashboard draws); while `deferring()` says so -- stop-and-copy, the
// last harvest is on the downtime path -- it only copies the bitmap (one native memcpy) and
// folds it in at the next tap or draw. `tapMs` is the time the tap itself took, to show it.
//
// Concurrency: the VMM's main thread only (the harvest and the dashboard's timer share it).
import type { MemslotInfo } from '../vmm/engine.ts';
import { WORDS_PER_CELL, type CellLayout } from './cells.ts';

/** Harvests the heatmap looks back over. */
export const HEAT_WINDOW = 8;

export class DirtyHeat {
  /** One row per harvest in the window (a ring), one byte per cell: 1 = dirty in that harvest. */
  private readonly rows: Uint8Array[];
  private readonly firstCell = new Map<number, number>();
  private harvestCount = 0;
  /** Slots whose current harvest row is filled (a harvest visits every slot once). */
  private seenThisHarvest = new Set<number>();
  /** Bitmaps tapped while deferring, in order. */
  private deferred: { slot: MemslotInfo; log: Uint32Array }[] = [];
  /** Main-thread time spent in tap(), ms (all harvests), and in the taps made while deferring. */
  tapMs = 0;
  deferredTapMs = 0;

  constructor(
    readonly layout: CellLayout,
    private readonly deferring: () => boolean = () => false,
  ) {
    this.rows = Array.from({ length: HEAT_WINDOW }, () => new Uint8Array(layout.cells));
    for (const s of layout.slots) this.firstCell.set(s.slot, s.firstCell);
  }

  /** DirtyTracker's onHarvest: `log` is the slot's newly dirty pages, bit i = page i (lent: copy to keep). */
  readonly tap = (slot: MemslotInfo, log: Uint32Array): void => {
    const t0 = performance.now();
    if (this.deferring()) {
      this.deferred.push({ slot, log: log.slice() });
      const ms = performance.now() - t0;
      this.tapMs += ms;
      this.deferredTapMs += ms;
      return;
    }
    this.flush();
    this.fold(slot, log);
    this.tapMs += performance.now() - t0;
  };

  /** Fold in what was tapped while deferring. */
  private flush(): void {
    const d = this.deferred;
    if (d.length === 0) return;
    this.deferred = [];
    for (const { slot, log } of d) this.fold(slot, log);
  }

  private fold(slot: MemslotInfo, log: Uint32Array): void {
    const first = this.firstCell.get(slot.slot);
    if (first === undefined) return;
    // A slot seen again starts the next harvest.
    if (this.harvestCount === 0 || this.seenThisHarvest.has(slot.slot)) {
      this.harvestCount++;
      this.seenThisHarvest = new Set();
      this.rows[(this.harvestCount - 1) % HEAT_WINDOW]!.fill(0);
    }
    this.seenThisHarvest.add(slot.slot);
    const row = this.rows[(this.harvestCount - 1) % HEAT_WINDOW]!;
    const cells = Math.ceil(log.length / WORDS_PER_CELL);
    for (let c = 0; c < cells; c++) {
      let any = 0;
      const end = Math.min((c + 1) * WORDS_PER_CELL, log.length);
      for (let w = c * WORDS_PER_CELL; w < end; w++) any |= log[w]!;
      row[first + c] = any !== 0 ? 1 : 0;
    }
  }

  /** One digit per cell: in how many of the last min(harvests, HEAT_WINDOW) harvests it was dirty. */
  encode(): string {
    this.flush();
    const n = this.layout.cells;
    const counts = new Uint8Array(n);
    const rows = Math.min(this.harvestCount, HEAT_WINDOW);
    for (let r = 0; r < rows; r++) {
      const row = this.rows[r]!;
      for (let i = 0; i < n; i++) counts[i]! += row[i]!;
    }
    let s = '';
    for (let i = 0; i < n; i++) s += String.fromCharCode(48 + counts[i]!);
    return s;
  }

  /** Harvests seen so far. */
  get harvests(): number {
    this.flush();
    return this.harvestCount;
  }

  /** Harvests the encoding covers. */
  get window(): number {
    this.flush();
    return Math.min(this.harvestCount, HEAT_WINDOW);
  }
}
