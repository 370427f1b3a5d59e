// --dashboard on the other commands: a benchmark serves its VM and still ends by itself (the
// dashboard never holds the process), `receive` serves before a source connects, and a bad
// address is one line and exit 1.
import { describe, expect, it } from 'vitest';
import { spawn } from 'node:child_process';
import { BIN, stage2 } from '../cli/run-cli.ts';
import { dashboardUrl, get } from './sse.ts';

describe('--dashboard on other commands', () => {
  it('bench dirty-log: serves the VM and ends by itself', async () => {
    let snapshot: Promise<string> | null = null;
    const r = await stage2(['bench', 'dirty-log', '--engine', 'soft', '-b', '32M', '-i', '20', '--dashboard', '--json'], {
      timeoutMs: 60_000,
      onStderr: (text) => {
        const url = dashboardUrl(text);
        if (url && !snapshot) snapshot = get(new URL('/snapshot.json', url).href).then((x) => x.body);
      },
    });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stderr).toMatch(/dashboard: http:\/\/127\.0\.0\.1:\d+\//);
    expect(r.stderr).toMatch(/dashboard: closed after \d+ feed messages/);
    const m = JSON.parse(await snapshot!);
    expect(m).toMatchObject({ role: 'bench', title: 'bench dirty-log', migration: null });
  });

  it('receive: serves while it waits for a source', async () => {
    const child = spawn(process.execPath, [BIN, 'receive', '--listen', '127.0.0.1:0', '--dashboard', '127.0.0.1:0'], { stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      let err = '';
      const url = await new Promise<string>((resolve, reject) => {
        child.stderr.on('data', (c: Buffer) => {
          err += c.toString();
          const u = dashboardUrl(err);
          if (u) resolve(u);
        });
        child.on('exit', () => reject(new Error(`receive exited: ${err}`)));
      });
      const page = await get(url);
      expect(page.status).toBe(200);
      const snap = JSON.parse((await get(new URL('/snapshot.json', url).href)).body);
      expect(snap).toMatchObject({ role: 'destination', migration: null, memory: null });
    } finally {
      child.kill('SIGINT');
    }
  });

  it('a bad address: one line, exit 1', async () => {
    const r = await stage2(['migrate', '--local', '--dashboard', 'nowhere:port'], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toEqual(['stage2: --dashboard nowhere:port: expected [HOST:]PORT, e.g. 8080 or 127.0.0.1:8080 (0: a free port)']);
  });
});
