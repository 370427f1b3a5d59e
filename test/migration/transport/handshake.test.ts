import { connect, type Socket } from 'node:net';
import { describe, expect, it } from 'vitest';
import { StreamDecoder } from '../../../src/migration/stream/decoder.ts';
import { encodeToBytes } from '../../../src/migration/stream/encoder.ts';
import { CAP_LZ4, CAP_MULTICHANNEL, ErrorCode, STREAM_VERSION, type MigrationRecord } from '../../../src/migration/stream/format.ts';
import { MigrationConnection } from '../../../src/migration/transport/connection.ts';
import { MigrationTransportError } from '../../../src/migration/transport/errors.ts';
import { MigrationListener } from '../../../src/migration/transport/listener.ts';

/** Send raw bytes to the listener and collect what it answers until it closes. */
async function rawExchange(port: number, bytes: Uint8Array): Promise<MigrationRecord[]> {
  const sock: Socket = connect(port, '127.0.0.1');
  const dec = new StreamDecoder({ direction: 'to-source' });
  const out: MigrationRecord[] = [];
  await new Promise<void>((resolve) => {
    sock.on('connect', () => sock.write(bytes));
    sock.on('data', (c) => {
      dec.push(c);
      for (let r = dec.next(); r; r = dec.next()) out.push(r);
    });
    sock.on('close', () => resolve());
    sock.on('error', () => undefined);
  });
  return out;
}

describe('handshake', () => {
  it('answers garbage, a wrong version and a stray CHANNEL_HELLO with ERROR, and keeps listening', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const garbage = await rawExchange(server.port, new TextEncoder().encode('GET / HTTP/1.1\r\n\r\n'));
    expect(garbage).toMatchObject([{ kind: 'error', code: ErrorCode.BAD_STREAM }]);
    expect((garbage[0] as MigrationRecord & { kind: 'error' }).message).toMatch(/unknown record type 71/);

    const hello = Buffer.from(encodeToBytes({ kind: 'hello', version: STREAM_VERSION, channels: 1, caps: 0, sessionId: 1n }));
    hello.writeUInt16LE(7, 16); // version
    const wrongVersion = await rawExchange(server.port, hello);
    expect(wrongVersion).toMatchObject([{ kind: 'error', code: ErrorCode.BAD_VERSION }]);
    expect((wrongVersion[0] as MigrationRecord & { kind: 'error' }).message).toContain(`the source speaks stream version 7 (HELLO), this destination speaks version ${STREAM_VERSION} only`);

    const stray = await rawExchange(server.port, encodeToBytes({ kind: 'channel-hello', version: STREAM_VERSION, channelIndex: 1, sessionId: 99n }));
    expect(stray).toMatchObject([{ kind: 'error', code: ErrorCode.UNKNOWN_SESSION }]);

    // Still serving: a real migration connects fine afterwards.
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 2 });
    const incoming = await server.accept(5000);
    expect(incoming.channels).toHaveLength(2);
    expect(incoming.sessionId).toBe(conn.sessionId);
    conn.destroy();
    incoming.abort(new Error('test over'));
    await server.close();
  });

  it('negotiates capabilities and channel count down to what the destination accepts', async () => {
    const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0, maxChannels: 2, acceptCaps: CAP_MULTICHANNEL });
    const conn = await MigrationConnection.connect({ host: '127.0.0.1', port: server.port, channels: 4, caps: CAP_LZ4 });
    const incoming = await server.accept(5000);
    expect(conn.channelCount).toBe(2);
    expect(incoming.channels).toHaveLength(2);
    expect(conn.caps).toBe(CAP_MULTICHANNEL); // lz4 offered, not accepted
    conn.destroy();
    incoming.abort(new Error('test over'));
    await server.close();

    const single = await MigrationListener.listen({ host: '127.0.0.1', port: 0, acceptCaps: 0 });
    const conn1 = await MigrationConnection.connect({ host: '127.0.0.1', port: single.port, channels: 3 });
    expect(conn1.channelCount).toBe(1);
    conn1.destroy();
    (await single.accept(5000)).abort(new Error('test over'));
    await single.close();
  });

  it('says which address is taken when it cannot listen', async () => {
    const first = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
    const err = await MigrationListener.listen({ host: '127.0.0.1', port: first.port }).catch((e) => e);
    expect(err).toBeInstanceOf(MigrationTransportError);
    expect(err.message).toBe(`cannot listen on 127.0.0.1:${first.port}: EADDRINUSE`);
    await first.close();
  });

  it('times out a destination that never answers HELLO, naming it', async () => {
    const { createServer } = await import('node:net');
    const mute = createServer(() => undefined);
    await new Promise<void>((r) => mute.listen(0, '127.0.0.1', () => r()));
    const port = (mute.address() as { port: number }).port;
    const err = await MigrationConnection.connect({ host: '127.0.0.1', port, timeoutMs: 300 }).catch((e) => e);
    expect(err).toBeInstanceOf(MigrationTransportError);
    expect(err.code).toBe('handshake');
    expect(err.message).toBe(`destination 127.0.0.1:${port} did not answer channel 0's hello within 300 ms`);
    mute.close();
  });
});
