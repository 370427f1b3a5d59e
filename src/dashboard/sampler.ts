// One dashboard message: everything the page draws, read from what the VMM already keeps --
// MigrationState.query(), Vm.stats() (exit counts per vCPU and reason, mapping counts, huge-
// recovery and lock-stall figures), Vm.progress(), Vm.mappingMap() and the harvest tap. Every
// message is complete in itself (the charts' history included), so a page that reloads, or
// connects late, draws everything from its first message.
//
// Concurrency: the VMM's main thread only; the reads it makes of the engine are the engine's
// own lock-free reads (stats sum counters with Atomics, mappingMap walks under RCU).
import { MAPPING_1G, MAPPING_2M, MAPPING_4K, type Vm } from '../vmm/engine.ts';
import type { MigrationQuery, MigrationState } from '../migration/migration-state.ts';
import { CELL_BYTES, layoutCells, type CellLayout, type SlotCells } from './cells.ts';
import type { DirtyHeat } from './dirty-heat.ts';
import type { RatePoint, RoundPoint, ThroughputPoint, Timeline } from './timeline.ts';

export type VcpuRunState = 'running' | 'halted' | 'paused' | 'stalled' | 'gone';

export interface VcpuView {
  vcpu: number;
  state: VcpuRunState;
  passes: number;
  /** Seconds since its pass counter last moved (0 while it moves, or once halted). */
  stallSeconds: number;
  /** Exit counts by reason (io, hlt, mmio, memoryFault, dirtyRingFull, intr, ...). */
  exits: Record<string, number>;
}

export interface DashboardMessage {
  seq: number;
  /** Seconds since the dashboard started. */
  t: number;
  title: string;
  role: 'source' | 'destination' | 'bench';
  engine: string | null;
  migration: (MigrationQuery & { currentMBps: number }) | null;
  /** Every status change of the migration as it happened (even one shorter than a tick). */
  transitions: { status: string; t: number }[];
  rounds: RoundPoint[];
  dirtyRate: RatePoint[];
  throughput: ThroughputPoint[];
  memory: { cellBytes: number; cells: number; slots: SlotCells[] } | null;
  /** One digit per cell (dirty in how many of the last `window` harvests); null: no harvests seen. */
  heat: { window: number; harvests: number; cells: string } | null;
  /** One letter per cell: '.' unmapped, 't' table of 4 KiB pages, 'b' 2 MiB block, 'g' 1 GiB block. */
  mapping: { cells: string } | { unavailable: string };
  vcpus: VcpuView[];
  /** Engine counters worth a glance (pages_4k, pages_2m, huge recovery, lock stalls). */
  counters: Record<string, number>;
  /** The command has ended: nothing will change any more. */
  final: boolean;
}

const MAP_CHARS: Record<number, string> = { [MAPPING_4K]: 't', [MAPPING_2M]: 'b', [MAPPING_1G]: 'g' };
const COUNTERS = ['pages_4k', 'pages_2m', 'pages_1g', 'pgtableBlockSplits', 'pgtableCollapses', 'hugePageSplits', 'writeProtectFaults', 'hugeRecoveredInPlace', 'hugeRecoveryZapped', 'hugeRecoveryPendingRegions', 'lockStallWaits', 'lockStallMaxSeconds', 'eagerSplitBlocks'];
/** A vCPU whose pass counter has not moved for this long, while it should run, is stalled. */
const STALL_SECONDS = 1;

export class Sampler {
  private vm: Vm | null = null;
  private layout: CellLayout | null = null;
  private state: MigrationState | null = null;
  private heat: DirtyHeat | null = null;
  private seq = 0;
  private readonly transitions: { status: string; t: number }[] = [];
  private lastPasses: { passes: number; t: number }[] = [];
  private lastVcpus: VcpuView[] = [];
  private lastMapping: DashboardMessage['mapping'] = { unavailable: 'no VM yet' };
  private lastCounters: Record<string, number> = {};
  private engine: string | null = null;
  final = false;

  constructor(
    readonly title: string,
    readonly role: DashboardMessage['role'],
    readonly timeline: Timeline,
  ) {}

  attachVm(vm: Vm): void {
    this.vm = vm;
    this.engine = vm.engine;
    this.lastPasses = [];
  }

  /** Take a last look, then stop reading the VM (it is about to be destroyed). */
  detachVm(): void {
    try {
      if (this.vm) this.readVm();
    } finally {
      this.detachGone();
    }
  }

  private detachGone(): void {
    this.vm = null;
    this.lastVcpus = this.lastVcpus.map((v) => ({ ...v, state: v.state === 'halted' ? 'halted' : 'gone' }));
  }

  attachMigration(state: MigrationState, heat: DirtyHeat | null): void {
    this.state = state;
    this.heat = heat;
    this.transitions.push({ status: state.status, t: this.timeline.now() });
    // Called inside MigrationState.set (stop-and-copy's too): a push, nothing more.
    state.onStatus((s) => this.transitions.push({ status: s, t: this.timeline.now() }));
  }

  /** A migration is in stop-and-copy: the dashboard stays off the main thread (downtime). */
  get quiet(): boolean {
    return this.state?.status === 'device';
  }

  /** Read everything now; `timeline` gets its sample too. */
  sample(): DashboardMessage {
    let migration: DashboardMessage['migration'] = null;
    if (this.state) {
      const q = this.state.query();
      this.timeline.sample(q);
      migration = { ...q, currentMBps: this.timeline.currentMBps };
    }
    if (this.vm) {
      try {
        this.readVm();
      } catch {
        // A VM being built (no vCPUs yet), or destroyed on a failure path without telling us:
        // show the last look and try again next time.
        this.lastVcpus = this.lastVcpus.map((v) => ({ ...v, state: v.state === 'halted' ? 'halted' : 'gone' }));
      }
    }
    return {
      seq: ++this.seq,
      t: this.timeline.now(),
      title: this.title,
      role: this.role,
      engine: this.engine,
      migration,
      transitions: this.transitions,
      rounds: this.timeline.rounds,
      dirtyRate: this.timeline.dirtyRate,
      throughput: this.timeline.throughput,
      memory: this.layout ? { cellBytes: CELL_BYTES, cells: this.layout.cells, slots: this.layout.slots } : null,
      heat: this.heat && this.heat.harvests > 0 ? { window: this.heat.window, harvests: this.heat.harvests, cells: this.heat.encode() } : null,
      mapping: this.lastMapping,
      vcpus: this.lastVcpus,
      counters: this.lastCounters,
      final: this.final,
    };
  }

  private readVm(): void {
    const vm = this.vm!;
    // Memslots come and go while a VM is built (and a destination's arrive with CONFIG).
    const layout = (this.layout = layoutCells(vm.memslots()));
    const stats = vm.stats();
    const status = this.state?.status;
    // From stop-and-copy (or the switch to post-copy) on, the source's vCPUs stay paused.
    const paused = status === 'device' || status === 'postcopy-active' || status === 'completed';
    const t = this.timeline.now();
    this.lastVcpus = vm.progress().map((p) => {
      const last = this.lastPasses[p.vcpu];
      if (!last || last.passes !== p.passesCompleted) this.lastPasses[p.vcpu] = { passes: p.passesCompleted, t };
      const since = t - this.lastPasses[p.vcpu]!.t;
      const state: VcpuRunState = p.halted ? 'halted' : paused ? 'paused' : since >= STALL_SECONDS ? 'stalled' : 'running';
      return { vcpu: p.vcpu, state, passes: p.passesCompleted, stallSeconds: state === 'stalled' ? since : 0, exits: exitsOf(stats, p.vcpu) };
    });
    const counters: Record<string, number> = {};
    for (const k of COUNTERS) if (stats[k] !== undefined) counters[k] = stats[k]!;
    this.lastCounters = counters;
    if (!vm.mappingMap) {
      this.lastMapping = { unavailable: `the ${vm.engine} engine cannot show its stage-2 mappings (they are the host kernel's)` };
      return;
    }
    let cells = '';
    for (const s of layout.slots) {
      const map = vm.mappingMap(s.guestPhysAddr - (s.guestPhysAddr % CELL_BYTES), s.cells * CELL_BYTES);
      for (let i = 0; i < s.cells; i++) cells += MAP_CHARS[map[i]!] ?? '.';
    }
    this.lastMapping = { cells };
  }
}

/** vcpuN.exitsFoo counters -> { foo: n }. */
function exitsOf(stats: Record<string, number>, vcpu: number): Record<string, number> {
  const prefix = `vcpu${vcpu}.exits`;
  const out: Record<string, number> = {};
  for (const [k, v] of Object.entries(stats)) {
    if (!k.startsWith(prefix)) continue;
    const reason = k.slice(prefix.length);
    out[reason.charAt(0).toLowerCase() + reason.slice(1)] = v;
  }
  return out;
}
