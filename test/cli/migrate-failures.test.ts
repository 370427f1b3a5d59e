// `migrate --to` against a receiver that cannot host the guest; SIGINT during a migration.
import { describe, it, expect } from 'vitest';
import { engines, stage2 } from './run-cli.ts';

describe('stage2 migrate (CLI processes): failures', () => {
  it('a receiver that cannot host the guest refuses it with a clear error; both exit non-zero', async () => {
    const engine = engines[engines.length - 1]!.kind;
    // Port 0: the kernel picks a free one; the receiver prints it once it listens, so the
    // source connects only after that line (no sleep to guess how long a loaded CI box takes).
    let listening!: (port: number) => void;
    const port = new Promise<number>((r) => (listening = r));
    const recv = stage2(['receive', '--listen', '127.0.0.1:0', '--max-ram', '4M'], {
      onStderr: (text) => {
        const m = /listening on [^\s]+:(\d+)/.exec(text);
        if (m) listening(Number(m[1]));
      },
    });
    const p = await Promise.race([port, recv.then((r) => Promise.reject(new Error(`receiver exited before listening: ${r.stderr}`)))]);
    const m = await stage2(['migrate', '--to', `127.0.0.1:${p}`, '--json', '--engine', engine, '-b', '8M', '--workload', 'idle']);
    const rv = await recv;
    expect(m.code).toBe(1);
    const s = JSON.parse(m.stdout.trim());
    expect(s.status).toBe('failed');
    expect(s.error).toMatch(/cannot host this VM: \d+ bytes of guest RAM, this receiver accepts at most 4194304/);
    expect(s.sourceIntact).toBe(true);
    expect(rv.code).toBe(1);
    expect(rv.stderr).toMatch(/incoming migration failed during setup: cannot host this VM/);
  });

  it('SIGINT during the migration cancels it; the source stays intact', async () => {
    const engine = engines[engines.length - 1]!.kind;
    let sent = false;
    const r = await stage2(['migrate', '--local', '--json', '--engine', engine, '-b', '16M', '--workload', 'sequential', '--max-bandwidth', '2M'], {
      onStderr: (text, child) => {
        if (!sent && /migrating to/.test(text)) {
          sent = true;
          setTimeout(() => child.kill('SIGINT'), 300);
        }
      },
    });
    expect(r.code).toBe(1);
    const s = JSON.parse(r.stdout.trim());
    expect(s.status).toBe('cancelled');
    expect(s.sourceIntact).toBe(true);
    // The receiver discards what it had; migrate also tells it to stop (SIGTERM), which may end
    // it before or after it exits 1 on its own.
    expect(s.destination.error).toMatch(/receiver exited with (status 1|signal SIGTERM)/);
    expect(s.destination.error).toMatch(/nothing was kept|cancelled/);
  });
});
