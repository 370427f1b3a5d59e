// `stage2 demo` (what `npm start` runs): a verified live migration on the default engine. A VM
// with 2 vCPUs and 1 GiB (512 MiB each) runs the sequential dirtying workload; it is migrated
// live (pre-copy, then post-copy once the rounds stop shrinking: --postcopy auto) to a receiver process on loopback; guest memory is checked equal at
// switchover by hash on both sides; the destination shows the workload carrying on from the
// pass counters where the source stopped; the stats are printed.
import type { Command } from 'commander';
import { addCommonOptions } from './options.ts';
import { addMigrationOptions, printStats, runMigrate, type MigrateOptions } from './migrate.ts';

export function registerDemo(program: Command): void {
  addMigrationOptions(addCommonOptions(program.command('demo').description('a verified live migration of a running 1 GiB guest to a receiver process on loopback'), { bytesPerVcpu: '512M', vcpus: 2 })).action(
    async (opts: MigrateOptions) => {
      const out = (line: string) => process.stderr.write(line + '\n');
      // The banner goes out with runMigrate's first line, i.e. once the command line and the
      // machine's memory have been checked: a refused command prints its one error line only.
      let banner = 'stage2 demo: live migration (pre-copy over TCP) of a running guest, verified by memory hash on both sides';
      const log = (line: string) => {
        if (banner) out(banner);
        banner = '';
        out(line);
      };
      // Post-copy when the rounds stop shrinking: a guest that dirties faster than the link
      // drains would otherwise take many rounds and send its RAM many times over.
      const result = await runMigrate({ ...opts, postcopy: opts.postcopy ?? 'auto', local: true }, log);
      const dest = result.destination;
      out('');
      if (opts.json) process.stdout.write(JSON.stringify(result) + '\n');
      else printStats(result, (l) => process.stdout.write(l + '\n'));
      out('');
      if (result.status === 'completed') {
        out(`source stopped the guest at vCPU passes [${result.passesAtSwitchover.join(', ')}]`);
        if (dest && 'passesAfter' in dest) {
          out(`destination resumed it at         [${dest.passesAtSwitchover.join(', ')}]`);
          out(`and after ${dest.ranSeconds.toFixed(1)} s there it is at     [${dest.passesAfter.join(', ')}]; memory ${dest.memoryCheck ?? 'consistent with the workload'}`);
        } else if (dest) out(`destination: ${dest.error}`);
        out(result.verified ? `verified: guest memory identical at switchover (hash ${result.sourceHash} on both sides)` : `NOT verified: ${result.error}`);
      }
      const continued = !!dest && 'passesAfter' in dest && dest.memoryCheck === null && dest.passesAfter.every((p, i) => p >= dest.passesAtSwitchover[i]!);
      if (result.status !== 'completed' || !result.verified || !continued) process.exitCode = 1;
    },
  );
}
