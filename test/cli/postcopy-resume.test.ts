// `stage2 migrate --resume PID` against a migration paused in post-copy (this test process plays
// the paused source through waitForManualResume, the CLI is the real one in a child process).
import { existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { pausedNotePath, waitForManualResume } from '../../src/cli/postcopy-resume.ts';
import { stage2 } from './run-cli.ts';

describe('migrate --resume', () => {
  it('resumes a migration waiting in postcopy-paused, which removes its note', async () => {
    const lines: string[] = [];
    const waiting = waitForManualResume('post-copy connection lost (test)', 30_000, (l) => lines.push(l), new AbortController().signal);
    expect(existsSync(pausedNotePath(process.pid))).toBe(true);
    expect(lines[0]).toMatch(new RegExp(`stage2 migrate --resume ${process.pid}`));
    const r = await stage2(['migrate', '--resume', String(process.pid)], { timeoutMs: 30_000 });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/resuming the post-copy migration of process \d+ \(paused: post-copy connection lost \(test\)\)/);
    expect(await waiting).toBe(true);
    expect(existsSync(pausedNotePath(process.pid))).toBe(false);
  });

  it('gives up after the wait, and refuses a process that waits for nothing', async () => {
    expect(await waitForManualResume('lost', 50, () => undefined, new AbortController().signal)).toBe(false);
    expect(await waitForManualResume('lost', 0, () => undefined, new AbortController().signal)).toBe(false);
    const r = await stage2(['migrate', '--resume', String(process.pid)], { timeoutMs: 30_000 });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(new RegExp(`no post-copy migration of process ${process.pid} is waiting to resume`));
  });
});
