// A dashboard session: the sampler, the timeline and the server, started by a command with
// --dashboard, told what to watch as the command gets there (the VM, the migration), and closed
// when the command ends (the pages get a last, final message).
//
// Concurrency: the VMM's main thread.
import type { Engine, Vm } from '../vmm/engine.ts';
import type { MigrationState } from '../migration/migration-state.ts';
import type { MigrationProgress, RoundStats } from '../migration/stats.ts';
import { layoutCells } from './cells.ts';
import { DirtyHeat } from './dirty-heat.ts';
import type { ListenAddress } from './guard.ts';
import { isLoopback } from './guard.ts';
import { observeEngine } from './observe-engine.ts';
import { Sampler, type DashboardMessage } from './sampler.ts';
import { DashboardServer } from './server.ts';
import { Timeline } from './timeline.ts';

export class Dashboard {
  readonly timeline = new Timeline();
  readonly sampler: Sampler;
  readonly server: DashboardServer;
  private heat: DirtyHeat | null = null;
  private log: (line: string) => void = () => undefined;

  private constructor(title: string, role: DashboardMessage['role']) {
    this.sampler = new Sampler(title, role, this.timeline);
    this.server = new DashboardServer(this.sampler);
  }

  /** Start listening; `log` gets the URL (and a warning when it is reachable beyond loopback). */
  static async start(addr: ListenAddress, title: string, role: DashboardMessage['role'], log: (line: string) => void): Promise<Dashboard> {
    const d = new Dashboard(title, role);
    await d.server.listen(addr);
    d.log = log;
    log(`dashboard: ${d.server.url}${isLoopback(addr.host) ? '' : ` (listening on ${addr.host}: reachable from other machines, read-only)`}`);
    return d;
  }

  get url(): string {
    return this.server.url;
  }

  attachVm(vm: Vm): void {
    this.sampler.attachVm(vm);
  }

  /** The engine, reporting each VM it creates to this dashboard. */
  observe(engine: Engine): Engine {
    return observeEngine(engine, (vm) => this.attachVm(vm));
  }

  /**
   * Watch a migration of `vm` (memslots final): pass the returned hooks to migrateVm
   * (PrecopyOptions.state, onDirtyHarvest, and onProgress beside any other).
   */
  attachMigration(vm: Vm, state: MigrationState): { onDirtyHarvest: DirtyHeat['tap']; onProgress: (p: MigrationProgress) => void } {
    // Stop-and-copy's harvest is on the downtime path: the tap only copies it then.
    this.heat = new DirtyHeat(layoutCells(vm.memslots()), () => state.status === 'device');
    this.sampler.attachVm(vm);
    this.sampler.attachMigration(state, this.heat);
    this.timeline.watch(state);
    return { onDirtyHarvest: this.heat.tap, onProgress: this.timeline.progress };
  }

  /** The migration's exact rounds, once it is over. */
  finishMigration(rounds: readonly RoundStats[]): void {
    this.timeline.finish(rounds);
  }

  /** Before the VM is destroyed: a last look at it. */
  detachVm(): void {
    this.sampler.detachVm();
  }

  /** The last message the pages saw (or would see now). */
  snapshot(): DashboardMessage {
    return this.sampler.sample();
  }

  async close(): Promise<void> {
    await this.server.close();
    const heat = this.heat ? `; the heatmap's harvest tap ${this.heat.tapMs.toFixed(2)} ms (${this.heat.deferredTapMs.toFixed(3)} ms of it in stop-and-copy)` : '';
    this.log(`dashboard: closed after ${this.server.ticks} feed messages; sampling and sending them took ${this.server.busyMs.toFixed(1)} ms of the main thread${heat}`);
  }
}
