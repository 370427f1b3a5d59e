// `stage2 bench ...`: benchmarks that print the same figures as KVM's selftests, and --json.
import type { Command } from 'commander';
import { compareEagerSplit, runDirtyLogBench } from '../bench/dirty-log.ts';
import { DEFAULT_EAGER_SPLIT_CHUNK_BYTES } from '../soft/dirty/dirty-tuning.ts';
import { runScalingBench, scalingSvg, scalingTables } from '../bench/scaling.ts';
import { demandPagingSvg, demandPagingTable, runDemandPagingBench, type DemandPagingResult, type HostUffdFigures } from '../bench/demand-paging.ts';
import { addCommonOptions, humanOut, parseDirtyRingEntries, parseEagerSplitChunk, parseFaultPath, parseIntInRange, parseIntList, parseLock, parseNonNegativeInt, parseUffdMode, workloadVmParams, type CommonOptions } from './options.ts';
import { UsageError, checkDemandPagingOptions, engineForWorkload, openCheckedEngine, scalingVcpuCounts } from './validate.ts';
import type { FaultPath, UffdMode } from '../vmm/demand-paging.ts';
import { writeFileSync } from 'node:fs';
import { MMU_LOCK_MODES, type MmuLockMode } from '../vmm/engine.ts';
import { registerBenchCollapse } from './bench-collapse.ts';
import { registerBenchMigration } from './bench-migration.ts';
import { addDashboardOption, benchDashboard } from './dashboard-options.ts';

export function registerBench(program: Command): void {
  const bench = program.command('bench').description('benchmarks (dirty-log, scaling, collapse, demand-paging, migration)');
  registerBenchCollapse(bench);
  registerBenchMigration(bench);

  addDashboardOption(addCommonOptions(
    bench.command('dirty-log').description("like KVM's dirty_log_perf_test: populate, then dirty and harvest rounds"),
    { bytesPerVcpu: '1G', vcpus: 1, iterations: 2 },
  ))
    .option('--no-manual-protect', 'get dirty log clears and re-protects (no KVM_CLEAR_DIRTY_LOG)')
    .option('--dirty-ring <entries>', 'log to per-vCPU dirty rings of this many entries (256..65536, a power of two) instead of the bitmap', parseDirtyRingEntries)
    .option('--eager-split [chunk]', `soft engine: run twice, lazy split then eager split of huge mappings when logging starts in chunks of CHUNK (2M..1G, default ${DEFAULT_EAGER_SPLIT_CHUNK_BYTES / 2 ** 20}M); prints enabling and iteration-1 dirty time side by side`, parseEagerSplitChunk)
    .option('--initially-set', 'soft engine: KVM_DIRTY_LOG_INITIALLY_SET (enabling logging sets every bit and protects nothing; needs manual protect)')
    .action(async (opts: CommonOptions & { manualProtect: boolean; dirtyRing?: number; eagerSplit?: number | true; initiallySet?: boolean }) => {
      const out = humanOut(opts.json);
      const demand = { vcpuCounts: [opts.vcpus], vcpusFlag: '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: 1 } as const;
      const engine = await benchDashboard(opts, 'bench dirty-log', await openCheckedEngine(engineForWorkload(opts), demand, (why) => out(`engine: ${why}; using soft`)), out);
      if ((opts.eagerSplit !== undefined || opts.initiallySet) && engine.kind !== 'soft') {
        throw new UsageError('--eager-split and --initially-set tune the soft engine; use --engine soft');
      }
      const params = {
        ...workloadVmParams(opts),
        lock: opts.lock,
        guestPageSize: opts.guestPageSize,
        iterations: opts.iterations,
        manualProtect: opts.manualProtect,
        dirtyRing: opts.dirtyRing ?? 0,
        initiallySet: opts.initiallySet ?? false,
      };
      if (opts.eagerSplit !== undefined) {
        const chunk = opts.eagerSplit === true ? DEFAULT_EAGER_SPLIT_CHUNK_BYTES : opts.eagerSplit;
        const cmp = await compareEagerSplit(engine, { ...params, eagerSplitChunkBytes: chunk }, out);
        if (opts.json) process.stdout.write(JSON.stringify(cmp) + '\n');
        return;
      }
      const result = await runDirtyLogBench(engine, params, out);
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    });

  addDashboardOption(addCommonOptions(
    bench.command('scaling').description('dirty-log over a list of vCPU counts, every lock mode; tables like seed 003, SVG plot'),
    { bytesPerVcpu: '256M', vcpus: 1, iterations: 3 },
  ))
    .option('--vcpu-counts <list>', 'vCPU counts to run, e.g. 1,2,4,8 (default 1,2,4,8; -v N alone runs N only)', parseIntList)
    .option('--locks <list>', 'lock modes to compare', (t: string) => t.split(',').map((x) => parseLock(x.trim())), [...MMU_LOCK_MODES])
    .option('--svg <file>', 'write the plot here', 'scaling.svg')
    .action(async (opts: CommonOptions & { vcpuCounts?: number[]; locks: MmuLockMode[]; svg: string }, cmd: Command) => {
      const out = humanOut(opts.json);
      const vcpuCounts = scalingVcpuCounts(opts, cmd);
      const demand = { vcpuCounts, vcpusFlag: opts.vcpuCounts ? '--vcpu-counts' : '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: 1 } as const;
      const engine = await benchDashboard(opts, 'bench scaling', await openCheckedEngine(engineForWorkload(opts), demand, (why) => out(`engine: ${why}; using soft`)), out);
      const result = await runScalingBench(
        engine,
        {
          vcpuCounts,
          locks: opts.locks,
          bytesPerVcpu: opts.bytesPerVcpu,
          backing: opts.backing,
          iterations: opts.iterations,
          manualProtect: true,
          guestPageSize: opts.guestPageSize,
          workload: opts.workload,
        },
        out,
      );
      out('');
      out(scalingTables(result));
      writeFileSync(opts.svg, await scalingSvg(result));
      out(`plot: ${opts.svg}`);
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    });

  addDashboardOption(addCommonOptions(
    bench.command('demand-paging').description("like KVM's demand_paging_test: every vCPU faults in its slice through demand paging (uffd or memory-fault exits); table + SVG over --vcpu-counts"),
    { bytesPerVcpu: '128M', vcpus: 1 },
  ))
    .option('--mode <path>', 'fault path: uffd (userfaultfd queue + reader threads) | exit (memory-fault exits, the vCPU fetches)', parseFaultPath, 'uffd' as FaultPath)
    .option('-u, --uffd-mode <mode>', 'MISSING (anonymous memory, COPY) | MINOR (shared memory, write + CONTINUE)', parseUffdMode, 'missing' as UffdMode)
    .option('-a, --shared-uffd', 'one uffd for every vCPU (default: one per vCPU slice)', false)
    .option('-r, --readers <n>', 'reader threads per uffd', parseIntInRange(1, 64), 1)
    .option('-d, --delay-us <us>', 'delay per page fetch, microseconds', parseNonNegativeInt, 0)
    .option('--vcpu-counts <list>', 'vCPU counts to run, e.g. 1,2,4,8 (default: -v, which defaults to 1)', parseIntList)
    .option('--svg <file>', 'write the plot here (with --vcpu-counts)', 'demand-paging.svg')
    .option('--host-uffd', "also run the same page count through the addon's real userfaultfd (src/bench/host-uffd.ts) and print that rate beside", false)
    .action(
      async (
        opts: CommonOptions & { mode: FaultPath; uffdMode: UffdMode; sharedUffd: boolean; readers: number; delayUs: number; vcpuCounts?: number[]; svg: string; hostUffd: boolean },
        cmd: Command,
      ) => {
        const out = humanOut(opts.json);
        const vcpuCounts = scalingVcpuCounts(opts, cmd, 'bench demand-paging', [opts.vcpus]);
        const demand = { vcpuCounts, vcpusFlag: opts.vcpuCounts ? '--vcpu-counts' : '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: 1 } as const;
        const engine = await benchDashboard(opts, 'bench demand-paging', await openCheckedEngine(opts.engine, demand, (why) => out(`engine: ${why}; using soft`)), out);
        checkDemandPagingOptions(engine.capabilities(), opts, cmd);
        const hostUffd = opts.hostUffd ? await loadHostUffdBench() : null;
        const result = await runDemandPagingBench(
          engine,
          { vcpuCounts, bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, path: opts.mode, uffdMode: opts.uffdMode, sharedUffd: opts.sharedUffd, readers: opts.readers, delayUs: opts.delayUs },
          out,
        );
        if (hostUffd) await addHostUffdFigures(result, hostUffd, out);
        if (vcpuCounts.length > 1 || hostUffd) {
          out('');
          out(demandPagingTable(result));
          writeFileSync(opts.svg, await demandPagingSvg(result));
          out(`plot: ${opts.svg}`);
        }
        if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
      },
    );
}

// ---- --host-uffd ----
// src/bench/host-uffd.ts runs the same page count through the addon's real userfaultfd (native
// reader threads). Loaded only when asked for: it needs the native addon, which a machine
// without a compiler may lack, and every other bench must run there.

type HostUffdBench = (o: { vcpus: number; bytesPerVcpu: number; mode: UffdMode; sharedUffd: boolean; readers: number; delayUs: number }) => Promise<HostUffdFigures>;

async function loadHostUffdBench(): Promise<HostUffdBench> {
  const where = new URL('../bench/host-uffd.ts', import.meta.url).href;
  let mod: { runHostUffdBench?: HostUffdBench };
  try {
    mod = (await import(where)) as { runHostUffdBench?: HostUffdBench };
  } catch (e) {
    throw new UsageError(`--host-uffd: the host userfaultfd benchmark could not be loaded (${(e as Error).message.split('\n')[0]})`);
  }
  if (typeof mod.runHostUffdBench !== 'function') throw new UsageError('--host-uffd: src/bench/host-uffd.ts exports no runHostUffdBench');
  return mod.runHostUffdBench;
}

/** Run the host uffd over the same page count for each row and print its rates beside. */
async function addHostUffdFigures(result: DemandPagingResult, run: HostUffdBench, out: (line: string) => void): Promise<void> {
  const p = result.params;
  for (const row of result.rows) {
    const h = await run({ vcpus: row.vcpus, bytesPerVcpu: p.bytesPerVcpu, mode: p.uffdMode, sharedUffd: p.sharedUffd, readers: p.readers, delayUs: p.delayUs });
    row.hostUffd = h;
    out(`Host userfaultfd (${h.handler}), ${h.vcpus} thread${h.vcpus > 1 ? 's' : ''}, ${h.pages} pages: Per-vcpu demand paging rate:\t${(h.overallPagesPerSec / h.vcpus).toFixed(6)} pgs/sec/vcpu; Overall demand paging rate:\t${h.overallPagesPerSec.toFixed(6)} pgs/sec`);
  }
}
