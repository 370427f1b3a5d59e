// `stage2 bench collapse`: re-forming huge pages after dirty logging stops (bench/collapse.ts).
import { InvalidArgumentError, type Command } from 'commander';
import { writeFileSync } from 'node:fs';
import { MMU_LOCK_MODES } from '../vmm/engine.ts';
import { HUGE_RECOVERY_STRATEGIES, type HugeRecoveryStrategy } from '../soft/huge/recovery.ts';
import { collapseSvg, collapseTable, runCollapseBench } from '../bench/collapse.ts';
import { humanOut, parseBacking, parseLock, parseMemorySize, parsePositiveInt, parseEngine } from './options.ts';

function parseSizes(text: string): number[] {
  return text.split(',').map((t) => {
    try {
      return parseMemorySize(t);
    } catch (e) {
      throw new InvalidArgumentError(`'${t.trim()}': ${(e as Error).message}`);
    }
  });
}

function parseStrategies(text: string): HugeRecoveryStrategy[] {
  return text.split(',').map((t) => {
    const s = t.trim() as HugeRecoveryStrategy;
    if (!HUGE_RECOVERY_STRATEGIES.includes(s)) throw new InvalidArgumentError(`'${t.trim()}': must be one of ${HUGE_RECOVERY_STRATEGIES.join(', ')}`);
    return s;
  });
}

export function registerBenchCollapse(bench: Command): void {
  bench
    .command('collapse')
    .description('huge pages re-formed after dirty logging stops: time and vCPU stall for sync / async / in-place (seed 004)')
    .option('--engine <engine>', 'soft (the only engine whose recovery this project implements)', parseEngine, 'default')
    .option('--sizes <list>', 'guest sizes, e.g. 1G,4G,8G', parseSizes, parseSizes('1G,4G,8G'))
    .option('--strategies <list>', `strategies to compare: ${HUGE_RECOVERY_STRATEGIES.join(', ')}`, parseStrategies, [...HUGE_RECOVERY_STRATEGIES])
    .option('-v, --vcpus <n>', 'number of vCPUs', parsePositiveInt, 2)
    .option('-s, --backing <backing>', 'anonymous_thp | hugetlb', parseBacking, 'hugetlb')
    .option('--lock <mode>', `soft engine MMU lock: ${MMU_LOCK_MODES.join(' | ')}`, parseLock, 'parallel')
    .option('--no-running', 'vCPUs stop once logging stops (default: they keep running passes, like -e)')
    .option('--batch <regions>', '2 MiB regions per MMU-lock hold for async / in-place', parsePositiveInt, 8)
    .option('--timeout <seconds>', 'give up waiting for a recovery after this long', parsePositiveInt, 300)
    .option('--svg <file>', 'write the plot here', 'collapse.svg')
    .option('--json', 'print one JSON object on stdout and nothing else there', false)
    .action(async (opts: { engine: string; sizes: number[]; strategies: HugeRecoveryStrategy[]; vcpus: number; backing: 'anonymous' | 'anonymous_thp' | 'hugetlb'; lock: (typeof MMU_LOCK_MODES)[number]; running: boolean; batch: number; timeout: number; svg: string; json: boolean }) => {
      const out = humanOut(opts.json);
      if (opts.engine === 'kvm') throw new InvalidArgumentError('bench collapse runs on the soft engine only (on kvm the host kernel decides how huge pages come back): use --engine soft');
      const result = await runCollapseBench(
        { sizes: opts.sizes, strategies: opts.strategies, vcpus: opts.vcpus, backing: opts.backing, lock: opts.lock, running: opts.running, batchRegions: opts.batch, timeoutSeconds: opts.timeout },
        out,
      );
      out('');
      out(collapseTable(result));
      writeFileSync(opts.svg, await collapseSvg(result));
      out(`plot: ${opts.svg}`);
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
    });
}
