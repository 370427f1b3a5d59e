// `stage2 bench ...`: benchmarks that print the same figures as KVM's selftests, and --json.
import type { Command } from 'commander';
import { openEngine } from '../vmm/factory.ts';
import { runDirtyLogBench } from '../bench/dirty-log.ts';
import { runScalingBench, scalingSvg, scalingTables } from '../bench/scaling.ts';
import { addCommonOptions, humanOut, parseIntList, parseLock, type CommonOptions } from './options.ts';
import { writeFileSync } from 'node:fs';
import { MMU_LOCK_MODES, type MmuLockMode } from '../vmm/engine.ts';

export function registerBench(program: Command): void {
  const bench = program.command('bench').description('benchmarks (dirty-log, scaling)');

  addCommonOptions(
    bench.command('dirty-log').description("like KVM's dirty_log_perf_test: populate, then dirty and harvest rounds"),
    { bytesPerVcpu: '1G', vcpus: 1, iterations: 2 },
  )
    .option('--no-manual-protect', 'get dirty log clears and re-protects (no KVM_CLEAR_DIRTY_LOG)')
    .action(async (opts: CommonOptions & { manualProtect: boolean }) => {
      const out = humanOut(opts.json);
      const engine = await openEngine(opts.engine, (why) => out(`engine: ${why}; using soft`));
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
        },
        out,
      );
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    });

  addCommonOptions(
    bench.command('scaling').description('dirty-log over a list of vCPU counts, every lock mode; tables like seed 003, SVG plot'),
    { bytesPerVcpu: '256M', vcpus: 1, iterations: 3 },
  )
    .option('--vcpu-counts <list>', 'vCPU counts to run (overrides -v), e.g. 1,2,4,8', parseIntList)
    .option('--locks <list>', 'lock modes to compare', (t: string) => t.split(',').map((x) => parseLock(x.trim())), [...MMU_LOCK_MODES])
    .option('--svg <file>', 'write the plot here', 'scaling.svg')
    .action(async (opts: CommonOptions & { vcpuCounts?: number[]; locks: MmuLockMode[]; svg: string }) => {
      const out = humanOut(opts.json);
      const engine = await openEngine(opts.engine, (why) => out(`engine: ${why}; using soft`));
      const result = await runScalingBench(
        engine,
        {
          vcpuCounts: opts.vcpuCounts ?? [1, 2, 4, 8],
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
