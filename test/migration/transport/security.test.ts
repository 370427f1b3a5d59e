// Admission (transport/admission.ts): TLS, mutual TLS and the auth token, at the transport
// level. Every refusal must reach both sides as a clear reason, and the listener must keep
// waiting: nothing of a refused connection becomes an IncomingMigration (whose records are what
// reach guest memory).
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { encodeToBytes } from '../../../src/migration/stream/encoder.ts';
import { STREAM_VERSION, type MigrationRecord } from '../../../src/migration/stream/format.ts';
import { StreamDecoder } from '../../../src/migration/stream/decoder.ts';
import { MigrationConnection } from '../../../src/migration/transport/connection.ts';
import { MigrationListener } from '../../../src/migration/transport/listener.ts';
import { secureOutgoing, type ClientSecurity, type ServerSecurity } from '../../../src/migration/transport/admission.ts';
import { connectSocket } from '../../../src/migration/transport/connect.ts';
import { projectRoot } from '../../../src/util/worker.ts';

const dir = mkdtempSync(join(tmpdir(), 'stage2-tls-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const make = (sub: string) => {
  execFileSync(join(projectRoot, 'scripts', 'make-certs.sh'), [join(dir, sub)]);
  const f = (n: string) => readFileSync(join(dir, sub, n));
  return { ca: f('ca.pem'), serverCert: f('server.pem'), serverKey: f('server.key'), clientCert: f('client.pem'), clientKey: f('client.key') };
};
const good = make('good');
const other = make('other');
const token = Buffer.from('0123456789abcdef0123456789abcdef');

/** A listener with `security`; `refusals` collects what it turned away. */
async function listen(security: ServerSecurity) {
  const refusals: string[] = [];
  const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0, security, handshakeTimeoutMs: 3000, onRefused: (_peer, why) => refusals.push(why) });
  return { server, refusals };
}

const connect = (port: number, security?: ClientSecurity, channels = 1) => MigrationConnection.connect({ host: '127.0.0.1', port, channels, security, timeoutMs: 3000 });

async function settle(refusals: string[], n: number): Promise<void> {
  for (let i = 0; i < 100 && refusals.length < n; i++) await new Promise((r) => setTimeout(r, 20));
}

describe('admission: TLS and the auth token', () => {
  it('mutual TLS + token: 2 channels admitted, records flow, reads use data events', async () => {
    const l = await listen({ tls: { cert: good.serverCert, key: good.serverKey, ca: good.ca }, token });
    const conn = await connect(l.server.port, { tls: { ca: good.ca, cert: good.clientCert, key: good.clientKey }, token }, 2);
    const incoming = await l.server.accept(3000);
    expect(incoming.channels).toHaveLength(2);
    expect(incoming.channels.map((c) => c.readSlabsAllocated)).toEqual([0, 0]);
    await conn.send({ kind: 'config', config: { memslots: [{ slot: 0, pages: 4 }] } as never });
    await conn.flush();
    const it = incoming.records()[Symbol.asyncIterator]();
    expect((await it.next()).value).toMatchObject({ kind: 'config' });
    expect(l.refusals).toEqual([]);
    conn.destroy();
    incoming.abort(new Error('test over'));
    await l.server.close();
  });

  it('token without TLS keeps the fast slab reads', async () => {
    const l = await listen({ token });
    const conn = await connect(l.server.port, { token });
    const incoming = await l.server.accept(3000);
    expect(incoming.channels[0]!.readSlabsAllocated).toBeGreaterThan(0);
    conn.destroy();
    incoming.abort(new Error('test over'));
    await l.server.close();
  });

  it('refuses a wrong CA, a missing client certificate, a wrong token and a plain client, and keeps waiting', async () => {
    const l = await listen({ tls: { cert: good.serverCert, key: good.serverKey, ca: good.ca }, token });
    const port = l.server.port;
    await expect(connect(port, { tls: { ca: other.ca, cert: good.clientCert, key: good.clientKey }, token })).rejects.toThrow(/certificate is not signed by our --tls-ca/);
    await expect(connect(port, { tls: { ca: good.ca }, token })).rejects.toThrow(/requires a client certificate: give --tls-cert and --tls-key/);
    await expect(connect(port, { tls: { ca: good.ca, cert: other.clientCert, key: other.clientKey }, token })).rejects.toThrow(/rejected our client certificate|not signed/);
    await expect(connect(port, { tls: { ca: good.ca, cert: good.clientCert, key: good.clientKey }, token: Buffer.from('not-the-right-token-at-all') })).rejects.toThrow(/refused our auth token: wrong auth token/);
    await expect(connect(port, { tls: { ca: good.ca, cert: good.clientCert, key: good.clientKey } })).rejects.toThrow(/requires authentication/);
    await expect(connect(port)).rejects.toThrow();
    await settle(l.refusals, 6);
    expect(l.refusals).toHaveLength(6);
    expect(l.refusals[0]).toMatch(/TLS handshake with source .* failed/);
    expect(l.refusals[1]).toMatch(/presented no client certificate/);
    expect(l.refusals[3]).toMatch(/wrong auth token/);
    expect(l.refusals[4]).toMatch(/requires authentication/);
    expect(l.refusals[5]).toMatch(/does not speak TLS/);
    await expect(l.server.accept(50)).rejects.toThrow(/no migration arrived/);
    // Still waiting, and the right source gets in.
    const conn = await connect(port, { tls: { ca: good.ca, cert: good.clientCert, key: good.clientKey }, token });
    const incoming = await l.server.accept(3000);
    expect(incoming.sessionId).toBe(conn.sessionId);
    conn.destroy();
    incoming.abort(new Error('test over'));
    await l.server.close();
  });

  it('a token-holding source refuses a destination that takes none', async () => {
    const plain = await listen({});
    await expect(connect(plain.server.port, { token })).rejects.toThrow(/the destination takes no auth token/);
    await plain.server.close();
  });

  it('refuses an authenticated source that speaks an old stream version, naming both versions', async () => {
    const l = await listen({ tls: { cert: good.serverCert, key: good.serverKey }, token });
    const raw = await connectSocket('127.0.0.1', l.server.port, 3000);
    const socket = await secureOutgoing(raw, '127.0.0.1', { tls: { ca: good.ca }, token }, 'test', 3000);
    const hello = Buffer.from(encodeToBytes({ kind: 'hello', version: STREAM_VERSION, channels: 1, caps: 0, sessionId: 1n }));
    hello.writeUInt16LE(STREAM_VERSION - 1, 16);
    const answer: MigrationRecord[] = [];
    const dec = new StreamDecoder({ direction: 'to-source' });
    await new Promise<void>((resolve) => {
      socket.on('data', (c: Buffer) => {
        dec.push(c);
        for (let r = dec.next(); r; r = dec.next()) answer.push(r);
      });
      socket.on('close', () => resolve());
      socket.on('error', () => undefined);
      socket.resume();
      socket.write(hello);
    });
    expect(answer).toMatchObject([{ kind: 'error', message: `incompatible peer: the source speaks stream version ${STREAM_VERSION - 1} (HELLO), this destination speaks version ${STREAM_VERSION} only` }]);
    await settle(l.refusals, 1);
    expect(l.refusals[0]).toMatch(new RegExp(`source speaks stream version ${STREAM_VERSION - 1}`));
    await expect(l.server.accept(50)).rejects.toThrow(/no migration arrived/);
    await l.server.close();
  });
});
