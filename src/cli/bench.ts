// `stage2 bench ...`: benchmarks that print the same figures as KVM's selftests, and --json.
import type { Command } from 'commander';
import { runDirtyLogBench } from '../bench/dirty-log.ts';
import { runScalingBench, scalingSvg, scalingTables } from '../bench/scaling.ts';
import { addCommonOptions, humanOut, parseDirtyRingEntries, parseIntList, parseLock, workloadOptions, type CommonOptions } from './options.ts';
import { engineForWorkload, openCheckedEngine, scalingVcpuCounts } from './validate.ts';
import { writeFileSync } from 'node:fs';
import { MMU_LOCK_MODES, type MmuLockMode } from '../vmm/engine.ts';
import { registerBenchCollapse } from './bench-collapse.ts';

export function registerBench(program: Command): void {
  const bench = program.command('bench').description('benchmarks (dirty-log, scaling, collapse)');
  registerBenchCollapse(bench);

  addCommonOptions(
    bench.command('dirty-log').description("like KVM's dirty_log_perf_test: populate, then dirty and harvest rounds"),
    { bytesPerVcpu: '1G', vcpus: 1, iterations: 2 },
  )
    .option('--no-manual-protect', 'get dirty log clears and re-protects (no KVM_CLEAR_DIRTY_LOG)')
    .option('--dirty-ring <entries>', 'log to per-vCPU dirty rings of this many entries (256..65536, a power of two) instead of the bitmap', parseDirtyRingEntries)
    .action(async (opts: CommonOptions & { manualProtect: boolean; dirtyRing?: number }) => {
      const out = humanOut(opts.json);
      const demand = { vcpuCounts: [opts.vcpus], vcpusFlag: '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: 1 } as const;
      const engine = await openCheckedEngine(engineForWorkload(opts), demand, (why) => out(`engine: ${why}; using soft`));
      const result = await runDirtyLogBench(
        engine,
        {
          vcpus: opts.vcpus,
          bytesPerVcpu: opts.bytesPerVcpu,
          backing: opts.backing,
          iterations: opts.iterations,
          lock: opts.lock,
          manualProtect: opts.manualProtect,
          guestPageSize: opts.guestPageSize,
          workload: opts.workload,
          workloadOptions: workloadOptions(opts, opts.vcpus),
          dirtyRing: opts.dirtyRing ?? 0,
        },
        out,
      );
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    });

  addCommonOptions(
    bench.command('scaling').description('dirty-log over a list of vCPU counts, every lock mode; tables like seed 003, SVG plot'),
    { bytesPerVcpu: '256M', vcpus: 1, iterations: 3 },
  )
    .option('--vcpu-counts <list>', 'vCPU counts to run, e.g. 1,2,4,8 (default 1,2,4,8; -v N alone runs N only)', parseIntList)
    .option('--locks <list>', 'lock modes to compare', (t: string) => t.split(',').map((x) => parseLock(x.trim())), [...MMU_LOCK_MODES])
    .option('--svg <file>', 'write the plot here', 'scaling.svg')
    .action(async (opts: CommonOptions & { vcpuCounts?: number[]; locks: MmuLockMode[]; svg: string }, cmd: Command) => {
      const out = humanOut(opts.json);
      const vcpuCounts = scalingVcpuCounts(opts, cmd);
      const demand = { vcpuCounts, vcpusFlag: opts.vcpuCounts ? '--vcpu-counts' : '-v/--vcpus', bytesPerVcpu: opts.bytesPerVcpu, backing: opts.backing, copies: 1 } as const;
      const engine = await openCheckedEngine(engineForWorkload(opts), demand, (why) => out(`engine: ${why}; using soft`));
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
}
