// Capture the bytes of one real, verified pre-copy migration (soft engine, one channel, source
// and destination in this process) through a recording TCP relay on loopback: the raw
// source -> destination stream that the mutator then corrupts and replays (replay.ts).
//
// Concurrency: single-threaded (the vCPUs run on their own threads, the stream is ours).
import { createServer, connect, type Socket } from 'node:net';
import type { Engine } from '../../../src/vmm/engine.ts';
import { createSourceVm } from '../../../src/migration/source-vm.ts';
import { connectLink, listenLink } from '../../../src/migration/wire-link.ts';
import { migrateVm, type PostcopyOptions } from '../../../src/migration/source.ts';
import { receiveMigration } from '../../../src/migration/destination.ts';
import { RECORD_HEADER_BYTES, TYPE_NAMES } from '../../../src/migration/stream/format.ts';
import type { WorkloadKind, WorkloadSpec } from '../../../src/guest/workload.ts';

/** One record of a captured stream: where it lies and what it is. */
export interface RecordSpan {
  offset: number;
  type: number;
  name: string;
  payloadLength: number;
}

export interface CapturedMigration {
  /** Every byte the source sent on its one connection, GO included. */
  toDestination: Uint8Array;
  records: RecordSpan[];
  /** The source's memory hash at switchover (the migration was verified against it). */
  sourceHash: string;
}

/** Split a well-formed stream into records by their 8-byte headers. */
export function recordSpans(bytes: Uint8Array): RecordSpan[] {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out: RecordSpan[] = [];
  for (let off = 0; off + RECORD_HEADER_BYTES <= bytes.length; ) {
    const type = bytes[off]!;
    const payloadLength = dv.getUint32(off + 4, true);
    out.push({ offset: off, type, name: TYPE_NAMES[type] ?? `type ${type}`, payloadLength });
    off += RECORD_HEADER_BYTES + payloadLength;
  }
  return out;
}

/** A relay from a kernel-chosen port to `port` that records what the client sends. */
async function recordingRelay(port: number): Promise<{ port: number; sent: Buffer[]; close: () => void }> {
  const sent: Buffer[] = [];
  const sockets: Socket[] = [];
  const server = createServer((client) => {
    const upstream = connect(port, '127.0.0.1');
    sockets.push(client, upstream);
    client.on('data', (c: Buffer) => {
      sent.push(Buffer.from(c));
      upstream.write(c);
    });
    upstream.on('data', (c: Buffer) => client.write(c));
    client.on('end', () => upstream.end());
    upstream.on('end', () => client.end());
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
  const addr = server.address();
  return {
    port: typeof addr === 'object' && addr ? addr.port : 0,
    sent,
    close: () => {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

/**
 * Migrate a small running guest once and return the stream. Throws unless the migration
 * completed and verified: the captured stream is the reference the mutations are judged by.
 */
export async function captureMigration(engine: Engine, opts: { vcpus: number; bytesPerVcpu: number; workload: WorkloadKind; workloadOptions?: Partial<WorkloadSpec>; postcopy?: PostcopyOptions }): Promise<CapturedMigration> {
  const { vm, spec } = await createSourceVm(engine, { vcpus: opts.vcpus, bytesPerVcpu: opts.bytesPerVcpu, backing: 'anonymous', workload: opts.workload, workloadOptions: opts.workloadOptions });
  const listener = await listenLink({ host: '127.0.0.1', port: 0 });
  const relay = await recordingRelay(listener.port);
  try {
    const dest = listener.accept().then((link) => receiveMigration(link, { openEngine: async () => engine, preallocate: false }));
    // (Post-copy: the post-copy connections go to the receiver directly; only the main stream is captured.)
    dest.catch(() => undefined);
    const link = await connectLink({ host: '127.0.0.1', port: relay.port, channels: 1 });
    // At least one iterative round, so the stream holds pages sent twice.
    const stats = await migrateVm(vm, link, { workload: spec, backing: 'anonymous', downtimeLimitMs: 0, maxRounds: 2, autoConverge: false, postcopy: opts.postcopy });
    const d = await dest;
    await d.vm.destroy();
    if (stats.status !== 'completed' || !stats.verified) throw new Error(`capture: the reference migration did not verify: ${stats.error}`);
    const toDestination = new Uint8Array(Buffer.concat(relay.sent));
    return { toDestination, records: recordSpans(toDestination), sourceHash: stats.sourceHash! };
  } finally {
    relay.close();
    listener.close();
    await vm.destroy();
  }
}
