// `stage2 bench ...`: benchmarks that print the same figures as KVM's selftests, and --json.
import type { Command } from 'commander';
import { openEngine } from '../vmm/factory.ts';
import { runDirtyLogBench } from '../bench/dirty-log.ts';
import { addCommonOptions, humanOut, type CommonOptions } from './options.ts';

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
}
