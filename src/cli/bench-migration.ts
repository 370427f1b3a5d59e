// `stage2 bench migration`: every policy on every workload, one table (bench/migration.ts). Each
// cell is `stage2 migrate --local ARGS` run in this process (runMigrate), its arguments parsed and
// checked by migrate's own parsers, so every row names the command that reproduces it.
import { InvalidArgumentError, Option, type Command } from 'commander';
import { isAbsolute, resolve } from 'node:path';
import { writeFileSync } from 'node:fs';
import { cellArgs, MIGRATION_POLICIES, migrationSvg, migrationTable, runMigrationBench, shippedTrace, type BenchWorkload, type MigrationPolicy } from '../bench/migration.ts';
import { formatBytes, humanOut, parseIntInRange, parseMemorySize, parseNonNegativeInt, parseNonNegativeNumber, parsePositiveInt, parseSize, parseDirtyRingEntries } from './options.ts';
import { migrateOptionsFrom, runMigrate } from './migrate.ts';
import { dirtyRingForLimit } from '../migration/dirty-limit.ts';
import { UsageError } from './validate.ts';
import { projectRoot } from '../util/worker.ts';
import { DEFAULT_DOWNTIME_LIMIT_MS } from '../migration/source.ts';

const SHIPPED = ['cc1', 'gzip', 'python3', 'sqlite3', 'xz'];

/** "sqlite3,xz,50M,800M": shipped trace names, .s2trace files, or dirty rates (bytes/s). */
export function parseBenchWorkloads(text: string): BenchWorkload[] {
  return text.split(',').map((raw) => {
    const t = raw.trim();
    if (/^\d/.test(t)) {
      let rate: number;
      try {
        rate = parseSize(t);
      } catch {
        throw new InvalidArgumentError(`'${t}': a dirty rate is a size per second, e.g. 50M`);
      }
      if (rate <= 0 || rate % 4096 !== 0) throw new InvalidArgumentError(`'${t}': a dirty rate is a positive multiple of 4 KiB per second, e.g. 50M`);
      return { name: `dirty ${formatBytes(rate)}/s`, kind: 'dirty-rate', bytesPerSecond: rate };
    }
    const file = t.endsWith('.s2trace') ? (isAbsolute(t) ? t : resolve(t)) : shippedTrace(projectRoot, t);
    if (file === null) throw new InvalidArgumentError(`'${t}': not a shipped trace (${SHIPPED.join(', ')}), a .s2trace file, or a dirty rate such as 200M`);
    return { name: t.replace(/^.*\//, '').replace(/\.s2trace$/, ''), kind: 'trace', file };
  });
}

function parsePolicies(text: string): MigrationPolicy[] {
  const ps = text.split(',').map((t) => t.trim());
  for (const p of ps) if (!(MIGRATION_POLICIES as readonly string[]).includes(p)) throw new InvalidArgumentError(`'${p}': must be a list of ${MIGRATION_POLICIES.join(', ')}`);
  return ps as MigrationPolicy[];
}

interface BenchMigrationOptions {
  engine: string;
  vcpus: number;
  bytesPerVcpu: number;
  workloads: BenchWorkload[];
  policies: MigrationPolicy[];
  maxBandwidth: number;
  downtimeLimit: number;
  maxRounds: number;
  vcpuDirtyLimit: number;
  dirtyRing?: number;
  warmupMs: number;
  destRunMs: number;
  svg: string;
  json: boolean;
}

export const DEFAULT_BENCH_WORKLOADS = 'sqlite3,xz,50M,200M,800M';

export function registerBenchMigration(bench: Command): void {
  bench
    .command('migration')
    .description('migrate each workload with each policy (pre-copy, auto-converge, dirty-limit, post-copy) over a limited link; one table: converged, total time, downtime, sent/RAM, guest-perceived stall; SVG')
    .addOption(new Option('--workloads <list>', `shipped traces (${SHIPPED.join(', ')}), .s2trace files, and dirty rates (bytes/s, e.g. 200M)`).argParser(parseBenchWorkloads).default(parseBenchWorkloads(DEFAULT_BENCH_WORKLOADS), DEFAULT_BENCH_WORKLOADS))
    .addOption(new Option('--policies <list>', MIGRATION_POLICIES.join(', ')).argParser(parsePolicies).default([...MIGRATION_POLICIES], MIGRATION_POLICIES.join(',')))
    .option('--engine <engine>', 'soft (the traced and dirty-rate guests pace themselves by a clock only the soft guest has)', 'soft')
    .option('-v, --vcpus <n>', 'vCPUs per guest', parseIntInRange(1, 64), 2)
    .option('-b, --bytes-per-vcpu <size>', 'guest memory per vCPU (the dirty-rate guests write all of it)', parseMemorySize, 64 * 2 ** 20)
    .option('--max-bandwidth <size>', 'link limit, bytes/s: below the heavier dirty rates, so plain pre-copy cannot converge them', parseSize, 200 * 2 ** 20)
    .option('--downtime-limit <ms>', 'largest acceptable downtime, ms', parseNonNegativeNumber, DEFAULT_DOWNTIME_LIMIT_MS)
    .option('--max-rounds <n>', 'iterative rounds before pre-copy gives up (the cell then reports NOT converged)', parsePositiveInt, 6)
    .option('--vcpu-dirty-limit <size>', 'dirty-limit: bytes/s each vCPU may dirty', parseSize, 8 * 2 ** 20)
    .option('--dirty-ring <entries>', `dirty-limit: dirty-ring entries per vCPU (the limit is enforced once per ring; default: sized to the limit, as migrate does)`, parseDirtyRingEntries)
    .option('--warmup-ms <ms>', 'run each guest this long before migrating (the rate before is measured over it, up to 1 s)', parseNonNegativeInt, 500)
    .option('--dest-run-ms <ms>', 'run each guest this long on the destination after switchover', parsePositiveInt, 300)
    .option('--svg <file>', 'write the chart here', 'migration.svg')
    .option('--json', 'print one JSON object on stdout and nothing else there', false)
    .action(async (opts: BenchMigrationOptions) => {
      if (opts.engine !== 'soft') throw new UsageError(`--engine ${opts.engine}: bench migration's guests (program traces, dirty-rate) run on the soft engine only; use --engine soft`);
      const out = humanOut(opts.json);
      const params = {
        engine: opts.engine,
        vcpus: opts.vcpus,
        bytesPerVcpu: opts.bytesPerVcpu,
        maxBandwidth: opts.maxBandwidth,
        downtimeLimitMs: opts.downtimeLimit,
        maxRounds: opts.maxRounds,
        vcpuDirtyLimit: opts.vcpuDirtyLimit,
        dirtyRing: opts.dirtyRing ?? dirtyRingForLimit(opts.vcpuDirtyLimit),
        warmupMs: opts.warmupMs,
        destRunMs: opts.destRunMs,
        workloads: opts.workloads,
        policies: opts.policies,
      };
      // Every cell's command line, checked before the first one runs.
      for (const w of params.workloads) for (const p of params.policies) migrateOptionsFrom(cellArgs(params, w, p));
      const result = await runMigrationBench(params, (args) => runMigrate(migrateOptionsFrom(args), () => undefined), out);
      out('');
      out(migrationTable(result));
      out('max stall: the longest gap between two units of guest work (64 page accesses) from the migration start until the guest ran on; + marks a lower bound');
      for (const n of result.notes) out(n);
      writeFileSync(opts.svg, await migrationSvg(result));
      out(`plot: ${opts.svg}`);
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    });
}
