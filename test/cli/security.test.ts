// `receive` with mutual TLS and an auth token, as processes: every wrong source is refused with
// a clear error on both sides before the destination VM exists (its "receiving a ... VM" line
// never appears: no guest memory was even allocated, let alone written), and the receiver keeps
// waiting until the right source migrates. And the loopback rule without TLS or token.
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { encodeToBytes } from '../../src/migration/stream/encoder.ts';
import { STREAM_VERSION } from '../../src/migration/stream/format.ts';
import { secureOutgoing } from '../../src/migration/transport/admission.ts';
import { connectSocket } from '../../src/migration/transport/connect.ts';
import { projectRoot } from '../../src/util/worker.ts';
import { stage2 } from './run-cli.ts';

const dir = mkdtempSync(join(tmpdir(), 'stage2-cli-tls-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const certs = (sub: string) => {
  execFileSync(join(projectRoot, 'scripts', 'make-certs.sh'), [join(dir, sub)]);
  return (n: string) => join(dir, sub, n);
};
const good = certs('good');
const other = certs('other');
const token = join(dir, 'token');
const wrongToken = join(dir, 'wrong-token');
writeFileSync(token, 'the-right-token-0123456789abcdef\n');
writeFileSync(wrongToken, 'the-wrong-token-0123456789abcdef\n');

describe('stage2 receive with TLS and an auth token (CLI processes)', () => {
  it('refuses a wrong CA, no client certificate, a wrong token, plain TCP and an old stream version before any VM exists; then takes the right source', async () => {
    let stderr = '';
    let listening!: (port: number) => void;
    const port = new Promise<number>((r) => (listening = r));
    const recv = stage2(['receive', '--listen', '127.0.0.1:0', '--json', '--run-ms', '200', '--tls-cert', good('server.pem'), '--tls-key', good('server.key'), '--tls-ca', good('ca.pem'), '--auth-token-file', token], {
      onStderr: (text) => {
        stderr = text;
        const m = /listening on [^\s]+:(\d+)/.exec(text);
        if (m) listening(Number(m[1]));
      },
      timeoutMs: 90_000,
    });
    const p = await Promise.race([port, recv.then((r) => Promise.reject(new Error(`receiver exited before listening: ${r.stderr}`)))]);
    expect(stderr).toMatch(/listening on 127\.0\.0\.1:\d+ \(mutual TLS \+ auth token\)/);
    const to = ['migrate', '--to', `127.0.0.1:${p}`, '--json', '-b', '8M', '--workload', 'idle', '--warmup-ms', '0'];
    const client = ['--tls-cert', good('client.pem'), '--tls-key', good('client.key')];
    const attempts: [string, string[], RegExp][] = [
      ['wrong CA', ['--tls-ca', other('ca.pem'), ...client, '--auth-token-file', token], /certificate is not signed by our --tls-ca/],
      ['no client certificate', ['--tls-ca', good('ca.pem'), '--auth-token-file', token], /requires a client certificate: give --tls-cert and --tls-key/],
      ['wrong token', ['--tls-ca', good('ca.pem'), ...client, '--auth-token-file', wrongToken], /refused our auth token: wrong auth token/],
      ['plain TCP', ['--auth-token-file', token], /if the destination requires TLS, give --tls-ca/],
    ];
    let refusals = 0;
    for (const [what, args, error] of attempts) {
      const m = await stage2([...to, ...args], { timeoutMs: 30_000 });
      expect(m.code, what).toBe(1);
      const s = JSON.parse(m.stdout.trim());
      expect(s.status, what).toBe('failed');
      expect(s.error, what).toMatch(error);
      expect(s.sourceIntact, what).toBe(true);
      refusals++;
      for (let i = 0; i < 50 && (stderr.match(/refused /g) ?? []).length < refusals; i++) await new Promise((r) => setTimeout(r, 20));
    }
    // An authenticated source that speaks an old stream version.
    const raw = await connectSocket('127.0.0.1', p, 5000);
    const socket = await secureOutgoing(raw, '127.0.0.1', { tls: { ca: execFileSync('cat', [good('ca.pem')]), cert: execFileSync('cat', [good('client.pem')]), key: execFileSync('cat', [good('client.key')]) }, token: Buffer.from('the-right-token-0123456789abcdef') }, 'test', 5000);
    const hello = Buffer.from(encodeToBytes({ kind: 'hello', version: STREAM_VERSION, channels: 1, caps: 0, sessionId: 1n }));
    hello.writeUInt16LE(STREAM_VERSION - 1, 16);
    socket.on('error', () => undefined);
    socket.resume(); // read (and drop) the ERROR, so the destination's close is seen
    socket.write(hello);
    await new Promise((r) => socket.once('close', r));
    for (let i = 0; i < 50 && !/stream version/.test(stderr); i++) await new Promise((r) => setTimeout(r, 20));

    const refused = stderr.split('\n').filter((l) => /refused /.test(l));
    expect(refused, stderr).toHaveLength(5);
    expect(refused[0]).toMatch(/certificate|TLS handshake/);
    expect(refused[1]).toMatch(/presented no client certificate/);
    expect(refused[2]).toMatch(/wrong auth token/);
    expect(refused[3]).toMatch(/does not speak TLS/);
    expect(refused[4]).toMatch(new RegExp(`the source speaks stream version ${STREAM_VERSION - 1} \\(HELLO\\), this destination speaks version ${STREAM_VERSION}`));
    for (const l of refused) expect(l).toMatch(/still waiting for the source/);
    // No destination VM so far: CONFIG was never read, no guest memory exists to write.
    expect(stderr).not.toMatch(/receiving a/);

    const ok = await stage2([...to, '--tls-ca', good('ca.pem'), ...client, '--auth-token-file', token], { timeoutMs: 60_000 });
    const rv = await recv;
    expect(ok.code, ok.stderr + rv.stderr).toBe(0);
    expect(JSON.parse(ok.stdout.trim())).toMatchObject({ status: 'completed', verified: true });
    expect(rv.code).toBe(0);
    expect(rv.stderr.match(/receiving a/g)).toHaveLength(1);
  }, 120_000);

  it('without TLS or a token, receive refuses a non-loopback --listen in one line naming the options', async () => {
    const r = await stage2(['receive', '--listen', '0.0.0.0:0'], { timeoutMs: 20_000 });
    expect(r.code).toBe(1);
    expect(r.stderr.trim().split('\n')).toHaveLength(1);
    expect(r.stderr).toMatch(/--listen 0\.0\.0\.0:0: without --auth-token-file or --tls-cert\/--tls-key the receiver listens on loopback only/);
  });

  it('refuses option combinations that cannot work, and a short token', async () => {
    const short = join(dir, 'short');
    writeFileSync(short, 'abc\n');
    for (const [args, msg] of [
      [['receive', '--tls-cert', good('server.pem')], /--tls-cert and --tls-key go together/],
      [['receive', '--tls-ca', good('ca.pem')], /--tls-ca \(require client certificates\) needs TLS on/],
      [['receive', '--auth-token-file', short], /3 bytes; use at least 16/],
      [['migrate', '--to', '127.0.0.1:1', '--tls-cert', good('client.pem'), '--tls-key', good('client.key')], /--tls-cert needs --tls-ca/],
      [['migrate', '--local', '--tls-ca', good('ca.pem')], /--local with --tls-ca needs --tls-cert and --tls-key/],
    ] as [string[], RegExp][]) {
      const r = await stage2(args, { timeoutMs: 20_000 });
      expect(r.code, args.join(' ')).toBe(1);
      expect(r.stderr, args.join(' ')).toMatch(msg);
      expect(r.stderr.trim().split('\n'), args.join(' ')).toHaveLength(1);
    }
  });
});
