// Replay a (mutated) source stream into a real receiver in this process, over loopback TCP,
// and judge what the receiver did with it:
//   rejected   receiveMigration (or the listener's handshake) refused it; `message` is what it
//              said (the ERROR record sent back, or the rejection);
//   completed  the receiver accepted it and started the guest; `equal` says whether everything
//              it runs on (memory re-read before the start, CONFIG, every vCPU state) equals the
//              reference migration's;
//   hung       nothing settled within the guard (a liveness bug).
//
// The replayer plays the source blindly: it writes the whole stream (GO included), reads and
// decodes whatever comes back, and closes the connection once the receiver has been quiet for
// QUIET_MS without an outcome.
//
// Concurrency: single-threaded.
import { connect } from 'node:net';
import type { Engine } from '../../../src/vmm/engine.ts';
import { listenLink } from '../../../src/migration/wire-link.ts';
import { receiveMigration, type ReceiveResult } from '../../../src/migration/destination.ts';
import { StreamDecoder } from '../../../src/migration/stream/decoder.ts';
import { formatMemoryHash } from '../../../src/migration/hash.ts';

export type ReplayOutcome =
  | { kind: 'rejected'; message: string; /** The memory hash of COMPLETE, when the receiver answered one before failing. */ completeHash?: string }
  | { kind: 'completed'; equal: boolean; why?: string }
  | { kind: 'hung'; message: string };

export interface Reference {
  sourceHash: string;
  /** JSON text of the validated CONFIG (destination.ts's result.config) of the reference run. */
  configJson: string;
  /** JSON text of the reference vCPU states ordered by vCPU. */
  vcpuStatesJson: string;
}

const QUIET_MS = 1000;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
const statesJson = (r: ReceiveResult) => JSON.stringify([...r.vcpuStates].sort((a, b) => a.vcpu - b.vcpu));

export function referenceOf(r: ReceiveResult, sourceHash: string): Reference {
  return { sourceHash, configJson: JSON.stringify(r.config), vcpuStatesJson: statesJson(r) };
}

export async function replay(bytes: Uint8Array, engine: Engine, ref: Reference | null, guardMs = 15_000): Promise<ReplayOutcome & { result?: ReceiveResult }> {
  const listener = await listenLink({ host: '127.0.0.1', port: 0, timeoutMs: 2000 });
  let accepted = false;
  const received = listener.accept().then((link) => {
    accepted = true;
    return receiveMigration(link, { openEngine: async () => engine, verifyRescan: true, preallocate: false });
  });
  const settled = received.then(
    (result) => ({ ok: true as const, result }),
    (e: Error) => ({ ok: false as const, error: e }),
  );
  const back = new StreamDecoder({ direction: 'to-source' });
  let backError = '';
  let completeHash: string | undefined;
  const sock = connect(listener.port, '127.0.0.1');
  sock.on('error', () => undefined);
  sock.on('data', (c: Buffer) => {
    try {
      back.push(c);
      for (let rec = back.next(); rec; rec = back.next()) {
        if (rec.kind === 'error') backError ||= rec.message;
        if (rec.kind === 'complete') completeHash = formatMemoryHash(rec.memoryHash);
      }
    } catch {
      /* the receiver's own stream is not what is judged here */
    }
  });
  const closed = new Promise<void>((r) => sock.on('close', () => r()));
  // Like a source, keep the connection open while the receiver works; a source that says no
  // more (a cut or lengthened stream leaves the receiver waiting for bytes) closes it after a
  // quiet second, as a source that died would.
  sock.write(bytes);
  const quiet = setTimeout(() => sock.end(), QUIET_MS);
  let isClosed = false;
  void closed.then(() => (isClosed = true));
  const t0 = Date.now();
  try {
    for (;;) {
      const first = await Promise.race([settled, sleep(50).then(() => null)]);
      if (first) {
        if (!first.ok) return { kind: 'rejected', message: first.error.message, ...(completeHash ? { completeHash } : {}) };
        return judge(first.result, ref);
      }
      // The connection is gone and no migration was accepted: refused at the handshake.
      if (isClosed && !accepted) {
        const late = await Promise.race([settled, sleep(200).then(() => null)]);
        if (late === null && !accepted) return { kind: 'rejected', message: backError || 'the receiver closed the connection during the handshake' };
      }
      if (Date.now() - t0 > guardMs) return { kind: 'hung', message: `nothing settled within ${guardMs} ms (accepted: ${accepted}, connection closed: ${isClosed})` };
    }
  } finally {
    clearTimeout(quiet);
    sock.destroy();
    listener.close();
  }
}

async function judge(result: ReceiveResult, ref: Reference | null): Promise<ReplayOutcome & { result?: ReceiveResult }> {
  if (!ref) return { kind: 'completed', equal: true, result };
  await result.vm.destroy();
  const diffs: string[] = [];
  if (result.rescanHash !== ref.sourceHash) diffs.push(`memory ${result.rescanHash} != source ${ref.sourceHash}`);
  if (JSON.stringify(result.config) !== ref.configJson) diffs.push('CONFIG differs');
  if (statesJson(result) !== ref.vcpuStatesJson) diffs.push('vCPU states differ');
  return { kind: 'completed', equal: diffs.length === 0, ...(diffs.length ? { why: diffs.join('; ') } : {}) };
}
