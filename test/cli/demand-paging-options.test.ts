// `bench demand-paging`'s command line: bad values and combinations are refused before any VM
// exists, with one line that names the option (the rules of issue 8, for seed 002's bench).
import { describe, expect, it } from 'vitest';
import { buildProgram, errorExit } from '../../src/cli/main.ts';
import { checkDemandPagingOptions, UsageError } from '../../src/cli/validate.ts';
import { SoftEngine } from '../../src/soft/engine.ts';
import type { EngineCapabilities } from '../../src/vmm/engine.ts';

async function refusal(args: string[]): Promise<string> {
  try {
    await buildProgram().parseAsync(args, { from: 'user' });
  } catch (e) {
    const { line, exitCode } = errorExit(e);
    expect(exitCode, String(e)).not.toBe(0);
    expect((e as Error).name, (e as Error).message).toMatch(/^(CommanderError|UsageError)$/);
    return line!;
  }
  throw new Error(`stage2 ${args.join(' ')} was accepted`);
}

const REFUSED: [string, RegExp][] = [
  ['bench demand-paging -u SOMETIMES', /-u\/--uffd-mode SOMETIMES: must be MISSING or MINOR/],
  ['bench demand-paging --mode poll', /--mode poll: must be one of uffd, exit/],
  ['bench demand-paging -r 0', /-r\/--readers 0: must be a whole number from 1 to 64/],
  ['bench demand-paging -d -5', /-d\/--delay-us -5: must be a whole number, at least 0/],
  ['bench demand-paging --vcpu-counts 1,x', /--vcpu-counts 1,x: must be a comma-separated list/],
  ['bench demand-paging -v 2 --vcpu-counts 1,2 -b 4K --engine soft', /-v\/--vcpus and --vcpu-counts exclude each other in bench demand-paging/],
  ['bench demand-paging --engine soft -b 2M -s hugetlb', /-s hugetlb: the soft userfaultfd model pages 4 KiB pages/],
  ['bench demand-paging --engine soft -b 4K --workload random', /--workload random: bench demand-paging touches every page/],
];

describe('bench demand-paging refuses bad command lines', () => {
  for (const [cmd, want] of REFUSED) {
    it(cmd, async () => {
      expect(await refusal(cmd.split(' '))).toMatch(want);
    });
  }

  it('an engine without the fault path asked for is refused, naming what it has', () => {
    const caps: EngineCapabilities = { ...new SoftEngine().capabilities(), kind: 'kvm', demandPagingPaths: ['uffd'] };
    expect(() => checkDemandPagingOptions(caps, { mode: 'exit', backing: 'anonymous', workload: 'sequential' })).toThrow(UsageError);
    expect(() => checkDemandPagingOptions(caps, { mode: 'exit', backing: 'anonymous', workload: 'sequential' })).toThrow(/--mode exit: the kvm engine pages on demand only by uffd here; use --mode uffd/);
    const none: EngineCapabilities = { ...caps, demandPagingPaths: undefined };
    expect(() => checkDemandPagingOptions(none, { mode: 'uffd', backing: 'anonymous', workload: 'sequential' })).toThrow(/cannot page guest memory on demand in this build; use --engine soft/);
  });

  it('the soft engine offers both paths', () => {
    expect(new SoftEngine().capabilities().demandPagingPaths).toEqual(['uffd', 'exit']);
  });
});
