// `--workload trace` from the command line: a live migration of two vCPUs replaying different
// shipped traces (one shifted) completes verified and the guest goes on replaying on the
// destination, which loaded the same files; bad trace options are refused at once, one line.
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { stage2 } from './run-cli.ts';

const DIR = join(import.meta.dirname, '../data/traces');

describe('stage2 --workload trace', () => {
  it('migrate --local --workload trace (two traces, shifted): completed, verified, replay continues on the destination', async () => {
    const traces = `${join(DIR, 'gzip.s2trace')},${join(DIR, 'sqlite3.s2trace')}`;
    const r = await stage2(['migrate', '--local', '--json', '--engine', 'soft', '-v', '2', '-b', '4M', '--workload', 'trace', '--trace', traces, '--trace-rate', '2000', '--trace-shift', '50', '--dest-run-ms', '300'], { timeoutMs: 60_000 });
    expect(r.code, r.stderr).toBe(0);
    const s = JSON.parse(r.stdout.trim());
    expect(s.status).toBe('completed');
    expect(s.verified).toBe(true);
    expect(s.sourceHash).toBe(s.destinationHash);
    const d = s.destination;
    expect(d.status).toBe('completed');
    d.passesAfter.forEach((p: number, i: number) => expect(p).toBeGreaterThan(d.passesAtSwitchover[i]));
  });

  it('refuses at once, one line: no --trace, a missing or broken file, --trace for another workload, kvm', async () => {
    const cases: [string[], RegExp][] = [
      [['--workload', 'trace'], /--workload trace needs --trace FILE/],
      [['--workload', 'trace', '--trace', '/nonexistent/x.s2trace'], /trace \/nonexistent\/x.s2trace: no such file/],
      [['--workload', 'trace', '--trace', join(import.meta.dirname, 'trace-workload.test.ts')], /not a gzip-compressed trace/],
      [['--workload', 'sequential', '--trace', join(DIR, 'gzip.s2trace')], /--trace is for --workload trace, not sequential/],
      [['--workload', 'trace', '--trace', join(DIR, 'gzip.s2trace'), '--trace-rate', 'fast'], /epochs per second above 0, recorded or max/],
      [['--workload', 'trace', '--trace', join(DIR, 'gzip.s2trace'), '--engine', 'kvm'], /runs on the soft engine only/],
    ];
    for (const [args, msg] of cases) {
      const r = await stage2(['migrate', '--local', '-b', '1M', ...args]);
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
      expect(r.stderr, args.join(' ')).toMatch(msg);
    }
  });
});
