// The dashboard's feed without a browser: `stage2 migrate --local --dashboard --report` on the
// soft engine, /feed read as a plain event stream. Every message is the whole picture (so a
// reload redraws from one), the state moves from active to completed, the heatmap and mapping
// map cover all of guest memory, at most 4 messages a second; and the report it writes is one
// offline file with the rounds chart and the JSON.
import { mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { projectRoot } from '../../src/util/worker.ts';
import { stage2 } from '../cli/run-cli.ts';
import { dashboardUrl, follow, type FeedMessage } from './sse.ts';

const OUT = join(projectRoot, 'out', 'dashboard');
const MiB = 2 ** 20;

describe('dashboard feed (no browser)', () => {
  it('streams a soft migration from active to completed, whole messages, at most 4 a second', async () => {
    mkdirSync(OUT, { recursive: true });
    const report = join(OUT, 'feed-report.html');
    let feed: Promise<FeedMessage[]> | null = null;
    let second: Promise<FeedMessage[]> | null = null;
    const run = stage2(['migrate', '--local', '--engine', 'soft', '-v', '2', '-b', '32M', '-s', 'anonymous_thp', '--workload', 'sequential', '--warmup-ms', '1500', '--on-no-convergence', 'force', '--max-bandwidth', '100M', '--max-rounds', '6', '--dashboard', '--report', report, '--json'], {
      timeoutMs: 110_000,
      onStderr: (text) => {
        const url = dashboardUrl(text);
        if (url && !feed) {
          feed = follow(url, (m) => m.final, 100_000);
          // A second page that comes and goes mid-way (a reload) gets the whole picture at once.
          second = new Promise((r) => setTimeout(r, 2500)).then(() => follow(url, () => true, 10_000));
        }
      },
    });
    const result = await run;
    expect(result.code, result.stderr).toBe(0);
    expect(feed).not.toBeNull();
    const msgs = await feed!;
    const cells = (32 * MiB * 2) / (2 * MiB);

    // The state moved from active to completed, and the last message says it is final.
    const statuses = msgs.map((m) => m.msg.migration?.status ?? 'none');
    expect(statuses).toContain('active');
    expect(statuses.at(-1)).toBe('completed');
    expect(msgs.at(-1)!.msg.transitions.map((x) => x.status)).toEqual(['setup', 'active', 'device', 'completed']);
    expect(msgs.at(-1)!.msg.final).toBe(true);
    expect(msgs.at(-1)!.msg.rounds.length).toBeGreaterThanOrEqual(2);
    expect(msgs.at(-1)!.msg.rounds[0]).toMatchObject({ round: 1, kind: 'bulk', pages: cells * 512 });
    const seqs = msgs.map((m) => m.msg.seq);
    expect(seqs).toEqual([...seqs].sort((a, b) => a - b));

    // Heatmap and mapping map cover all of guest memory; vCPUs and counters are there.
    // (The dashboard starts before the VM does: its first messages may have no VM yet.)
    const withVm = msgs.filter((m) => m.msg.memory !== null);
    expect(withVm.length).toBeGreaterThan(msgs.length / 2);
    expect(msgs.filter((m) => m.msg.migration !== null).every((m) => m.msg.memory !== null)).toBe(true);
    for (const { msg } of withVm) {
      expect(msg.memory?.cells).toBe(cells);
      if (msg.heat) expect(msg.heat.cells).toHaveLength(cells);
      expect('cells' in msg.mapping && msg.mapping.cells).toHaveLength(cells);
      expect(msg.vcpus.map((v) => v.vcpu)).toEqual([0, 1]);
      expect(msg.counters.pages_4k).toBeTypeOf('number');
    }
    // The sequential guest dirties everything between harvests: the heat reached all cells.
    const hot = msgs.map((m) => m.msg.heat).filter((h) => h !== null);
    expect(hot.length).toBeGreaterThan(0);
    expect([...hot.at(-1)!.cells].every((c) => c !== '0')).toBe(true);
    // Logging split the THP blocks while the migration was active.
    expect(msgs.some((m) => m.msg.migration?.status === 'active' && 'cells' in m.msg.mapping && m.msg.mapping.cells.includes('t'))).toBe(true);

    // Rate: the server samples a page's messages at least 250 ms apart (the final one excepted):
    // checked on the server's own clock (msg.t), since a busy test process may read two at
    // once; and on arrival, over the whole run, at most 4 a second.
    const live = msgs.slice(0, -1);
    expect(live.length).toBeGreaterThanOrEqual(8);
    for (let i = 1; i < live.length; i++) expect(live[i]!.msg.t - live[i - 1]!.msg.t).toBeGreaterThanOrEqual(0.249);
    for (let i = 0; i + 4 < live.length; i++) expect(live[i + 4]!.msg.t - live[i]!.msg.t).toBeGreaterThanOrEqual(0.999);
    const span = (live.at(-1)!.at - live[0]!.at) / 1000;
    expect((live.length - 1) / span).toBeLessThanOrEqual(4.05);

    // The page that came later got the rounds and dirty rate so far in its first message.
    const later = await second!;
    expect(later.length).toBe(1);
    expect(later[0]!.msg.seq).toBeGreaterThan(1);
    expect(later[0]!.msg.memory?.cells).toBe(cells);

    // migrate --report: one file, charts inline, the JSON it came from, nothing to fetch.
    const html = readFileSync(report, 'utf8');
    expect(html).toContain('<svg');
    expect(html).toContain('Pages sent per round');
    expect(html).not.toMatch(/(src|href)=["'](https?:)?\/\//);
    expect(html).not.toMatch(/<script(?![^>]*application\/json)/);
    const json = JSON.parse(/<script type="application\/json" id="stage2-migration">([^<]*)<\/script>/.exec(html)![1]!);
    const printed = JSON.parse(result.stdout.trim().split('\n').pop()!);
    expect(json.result.rounds).toEqual(printed.rounds);
    expect(json.result.status).toBe('completed');
    expect(json.dirtyRate.length).toBeGreaterThan(0);
  });

  it('shows a switch to post-copy and the requests the destination made', async () => {
    let feed: Promise<FeedMessage[]> | null = null;
    // The default policy (--postcopy auto) switches this sequential guest to post-copy early.
    const r = await stage2(['migrate', '--local', '--engine', 'soft', '-v', '2', '-b', '32M', '--workload', 'sequential', '--warmup-ms', '1500', '--dashboard', '--json'], {
      timeoutMs: 110_000,
      onStderr: (text) => {
        const url = dashboardUrl(text);
        if (url && !feed) feed = follow(url, (m) => m.final, 100_000);
      },
    });
    expect(r.code, r.stderr).toBe(0);
    const printed = JSON.parse(r.stdout.trim().split('\n').pop()!);
    const msgs = await feed!;
    const last = msgs.at(-1)!.msg;
    expect(last.final).toBe(true);
    expect(last.migration?.status).toBe('completed');
    expect(last.migration?.postcopyRequests).toBe(printed.postcopyRequests);
    // (post-copy-active itself may be shorter than one tick: not required here.) At the end the
    // source's vCPUs never show as running.
    expect(last.vcpus.map((v) => v.state).filter((s) => s === 'running')).toEqual([]);
  });
});
