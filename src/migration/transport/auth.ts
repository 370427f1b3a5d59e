// Shared-secret authentication of one migration connection (--auth-token-file), before the
// stream's HELLO: both sides prove they hold the token, and the token never crosses the wire,
// with or without TLS. A mutual challenge/response with HMAC-SHA256, lock-step (exact-reads.ts):
//
//   S>D  "STAGE2AU" nonceS[32]                      the source asks to authenticate
//   D>S  "STAGE2CH" nonceD[32]                      the destination's challenge
//   S>D  HMAC(token, "stage2 source" nonceS nonceD)[32]
//   D>S  "STAGE2OK" HMAC(token, "stage2 destination" nonceD nonceS)[32]
//        or a stream ERROR record (format.ts), and the destination closes
//
// Fresh random nonces from both sides make every proof single-use (a recorded exchange cannot be
// replayed), the role labels keep one side's proof from being reflected as the other's, and the
// source proves first, so a peer without the token learns nothing but "refused". The MACs are
// compared in constant time. Without TLS this authenticates the connection's start only; an
// attacker on the path could still hijack the TCP stream after it, which is what TLS is for.
//
// A destination with a token refuses a source that opens with anything else (a HELLO: it has no
// token); a destination without one refuses "STAGE2AU" (its decoder answers an unknown record),
// which the source reports as "the destination takes no token".

import { createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import type { Socket } from 'node:net';
import { encodeRecord } from '../stream/encoder.ts';
import { ErrorCode } from '../stream/format.ts';
import { StreamDecoder } from '../stream/decoder.ts';
import { MigrationTransportError } from './errors.ts';
import { ExactReader } from './exact-reads.ts';

const ASK = Buffer.from('STAGE2AU');
const CHALLENGE = Buffer.from('STAGE2CH');
const ACCEPTED = Buffer.from('STAGE2OK');
const NONCE_BYTES = 32;
const MAC_BYTES = 32;
/** Shorter tokens are refused: a guessable secret authenticates nothing. */
export const MIN_TOKEN_BYTES = 16;

function mac(token: Uint8Array, role: string, first: Uint8Array, second: Uint8Array): Buffer {
  return createHmac('sha256', token).update(`stage2 ${role}`).update(first).update(second).digest();
}

/** Thrown on either side when the peer fails (or refuses) authentication. */
export class AuthenticationError extends MigrationTransportError {
  constructor(message: string) {
    super('handshake', message, ErrorCode.BAD_STREAM);
  }
}

/** Source side: prove we hold `token` and check that the destination does too. */
export async function authenticateToDestination(socket: Socket, token: Uint8Array, peer: string, timeoutMs: number): Promise<void> {
  const who = `destination ${peer}`;
  const reader = new ExactReader(socket, who);
  const deadline = Date.now() + timeoutMs;
  try {
    const nonceS = randomBytes(NONCE_BYTES);
    socket.write(Buffer.concat([ASK, nonceS]));
    await readHeadOrError(reader, deadline, who, 'its authentication challenge', CHALLENGE, 'the destination takes no auth token (start `receive` with the same --auth-token-file, or drop it here)');
    const nonceD = await reader.read(NONCE_BYTES, deadline, 'its challenge nonce');
    socket.write(mac(token, 'source', nonceS, nonceD));
    await readHeadOrError(reader, deadline, who, 'its answer to our token proof', ACCEPTED, 'the destination refused our auth token');
    const proof = await reader.read(MAC_BYTES, deadline, "the destination's token proof");
    if (!timingSafeEqual(proof, mac(token, 'destination', nonceD, nonceS))) {
      throw new AuthenticationError(`${who} does not hold our auth token (its proof is wrong): not the receiver we meant to migrate to`);
    }
    reader.finish();
  } catch (e) {
    reader.abandon();
    throw e;
  }
}

/**
 * The 8-byte message head `want`, or: a stream ERROR record from the peer (its reason, after
 * `refusal`), or anything else (a protocol error).
 */
async function readHeadOrError(reader: ExactReader, deadline: number, who: string, what: string, want: Buffer, refusal: string): Promise<void> {
  const head = await reader.read(8, deadline, what);
  if (head.equals(want)) return;
  // Not our message: a destination that refused writes one ERROR record and closes.
  const dec = new StreamDecoder({ direction: 'to-source' });
  dec.push(head);
  let rest: Buffer = Buffer.alloc(0);
  try {
    const length = head.readUInt32LE(4);
    if (length <= 8192) rest = await reader.read(length, deadline, 'the rest of its answer');
  } catch {
    /* a short or odd answer: described below */
  }
  dec.push(rest);
  let reason: string;
  try {
    const rec = dec.next();
    reason = rec?.kind === 'error' ? rec.message : `it sent ${rec?.kind ?? 'a truncated record'}`;
  } catch (e) {
    reason = `it sent bytes that are not the migration protocol (${(e as Error).message})`;
  }
  throw new AuthenticationError(`${who}: ${refusal}: ${reason}`);
}

/**
 * Destination side: check that the source holds `token` and prove we do. On failure the source
 * is told why (one ERROR record) and an AuthenticationError says so here; the caller closes.
 */
export async function authenticateSource(socket: Socket, token: Uint8Array, peer: string, timeoutMs: number, forSlabReads = false): Promise<void> {
  const who = `source ${peer}`;
  const reader = new ExactReader(socket, who);
  const deadline = Date.now() + timeoutMs;
  const refuse = (why: string): never => {
    const buf = Buffer.alloc(8 + 4 + 512);
    socket.end(buf.subarray(0, encodeRecord({ kind: 'error', code: ErrorCode.BAD_STREAM, message: why }, buf, 0)));
    throw new AuthenticationError(`${who}: ${why}`);
  };
  try {
    const head = await reader.read(8, deadline, 'an authentication request');
    if (!head.equals(ASK)) refuse('this destination requires authentication: give migrate the same --auth-token-file as receive');
    const nonceS = await reader.read(NONCE_BYTES, deadline, 'its nonce');
    const nonceD = randomBytes(NONCE_BYTES);
    socket.write(Buffer.concat([CHALLENGE, nonceD]));
    const proof = await reader.read(MAC_BYTES, deadline, 'its token proof');
    if (!timingSafeEqual(proof, mac(token, 'source', nonceS, nonceD))) refuse('wrong auth token (the source and this destination were given different --auth-token-file contents)');
    socket.write(Buffer.concat([ACCEPTED, mac(token, 'destination', nonceD, nonceS)]));
    reader.finish(forSlabReads);
  } catch (e) {
    reader.abandon();
    throw e;
  }
}
