// TLS for one migration connection (node:tls), set up before the stream's HELLO.
//
// Destination: a certificate and key; with a CA as well it requires a client certificate
// signed by that CA (mutual TLS). Source: the CA that must have signed the destination's
// certificate (its name or IP must match the address we connect to), and optionally its own
// certificate and key for mutual TLS.
//
// Once its TLS handshake is done the destination writes an 8-byte greeting, and the source waits
// for it: under TLS 1.3 a client's handshake completes before the server has checked the client's
// certificate, so without the greeting a refused client would only learn of it from an alert
// arriving in the middle of the stream. The greeting also keeps the preamble lock-step
// (exact-reads.ts) for auth.ts after it.

import type { Socket } from 'node:net';
import { isIP } from 'node:net';
import { connect as tlsConnect, createSecureContext, createServer, type TLSSocket } from 'node:tls';
import { MigrationTransportError, describeSocketError } from './errors.ts';
import { ExactReader } from './exact-reads.ts';

const GREETING = Buffer.from('STAGE2TL');

export interface TlsServerConfig {
  /** PEM. */
  cert: string | Buffer;
  key: string | Buffer;
  /** PEM: when given, clients must present a certificate signed by it. */
  ca?: string | Buffer;
}

export interface TlsClientConfig {
  /** PEM: the destination's certificate must chain to it. */
  ca: string | Buffer;
  /** PEM: our certificate and key, for a destination that requires one. */
  cert?: string | Buffer;
  key?: string | Buffer;
}

function opensslReason(message: string): string {
  const m = /^(.*?)[0-9A-F]+:error:[0-9A-F]+:SSL routines:[^:]*:([^:]+):.*?(\s+while .*)?$/s.exec(message);
  return m ? `${m[1]}${m[2]}${m[3] ? ` ${m[3].trim()}` : ''}` : message.replace(/\s+/g, ' ').trim();
}

/** Why a TLS handshake failed, in the operator's words (the OpenSSL code stays in brackets). */
function explainTlsError(e: NodeJS.ErrnoException, side: 'source' | 'destination'): string {
  const code = e.code ?? '';
  // OpenSSL's messages are "<hex>:error:<hex>:SSL routines:<function>:<reason>:<file>:<line>:":
  // the reason is the part worth a line.
  const reason = opensslReason(e.message);
  const raw = `${reason}${code ? ` [${code}]` : ''}`;
  if (/WRONG_VERSION_NUMBER|HTTP_REQUEST|UNKNOWN_PROTOCOL|PACKET_LENGTH_TOO_LONG|RECORD_LAYER_FAILURE/i.test(code + e.message)) {
    return side === 'destination' ? `the source does not speak TLS (it needs --tls-ca) (${raw})` : `the destination does not speak TLS (drop --tls-ca, or start \`receive\` with --tls-cert/--tls-key) (${raw})`;
  }
  if (/PEER_DID_NOT_RETURN_A_CERTIFICATE|CERTIFICATE_REQUIRED/i.test(code + e.message)) {
    return side === 'destination' ? `the source presented no client certificate, and this destination requires one (--tls-ca given) (${raw})` : `the destination requires a client certificate: give --tls-cert and --tls-key (${raw})`;
  }
  if (/UNABLE_TO_VERIFY|SELF_SIGNED|CERT_SIGNATURE_FAILURE|UNABLE_TO_GET_ISSUER|UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_UNKNOWN|DECRYPT_ERROR/i.test(code + e.message)) {
    return side === 'destination'
      ? `the source's certificate is not signed by this destination's --tls-ca, or the source rejected ours (${raw})`
      : `the destination's certificate is not signed by our --tls-ca, or the destination rejected ours (${raw})`;
  }
  if (/ALTNAME|HOSTNAME/i.test(code + e.message)) return `the destination's certificate is not for the address we connected to (${raw})`;
  return describeSocketError(e);
}

function serverOptions(cfg: TlsServerConfig) {
  return { cert: cfg.cert, key: cfg.key, ...(cfg.ca ? { ca: cfg.ca } : {}), minVersion: 'TLSv1.2' as const };
}

/** Parse the PEM now: a bad certificate or key is refused when the receiver starts, not later. */
export function checkServerConfig(cfg: TlsServerConfig): void {
  createSecureContext(serverOptions(cfg));
}

/** Destination: TLS over an accepted socket. Resolves once the peer is admitted (greeting sent). */
export async function acceptTls(socket: Socket, cfg: TlsServerConfig, peer: string, timeoutMs: number): Promise<TLSSocket> {
  const requireClientCert = cfg.ca !== undefined;
  // A tls.Server that never listens, handed this one connection: it, not a bare TLSSocket,
  // verifies a client certificate against the CA and drops the peer when it does not verify.
  // (It takes the PEM, not a SecureContext: parsing it per connection costs a millisecond.)
  const server = createServer({ ...serverOptions(cfg), requestCert: requireClientCert, rejectUnauthorized: requireClientCert, handshakeTimeout: timeoutMs });
  let tls: TLSSocket | undefined;
  try {
    tls = await new Promise<TLSSocket>((resolve, reject) => {
      server.once('secureConnection', resolve);
      server.once('tlsClientError', (e: NodeJS.ErrnoException) => {
        const why = /timed out/i.test(e.message) ? `source ${peer} did not finish the TLS handshake within ${timeoutMs} ms` : `TLS handshake with source ${peer} failed: ${explainTlsError(e, 'destination')}`;
        reject(new MigrationTransportError('handshake', why));
      });
      server.emit('connection', socket);
    });
  } catch (e) {
    socket.destroy();
    throw e;
  }
  tls.write(GREETING);
  return tls;
}

/** Source: TLS over a connected socket; resolves once the destination has admitted us. */
export async function connectTls(socket: Socket, host: string, cfg: TlsClientConfig, peer: string, timeoutMs: number): Promise<TLSSocket> {
  const deadline = Date.now() + timeoutMs;
  const tls = tlsConnect({
    socket,
    ca: cfg.ca,
    ...(cfg.cert ? { cert: cfg.cert, key: cfg.key } : {}),
    // SNI takes host names only; an IP address is still checked against the certificate's SANs.
    ...(isIP(host) ? {} : { servername: host }),
    minVersion: 'TLSv1.2',
  });
  try {
    await handshakeDone(tls, 'secureConnect', timeoutMs, (e) => `TLS handshake with destination ${peer} failed: ${explainTlsError(e, 'source')}`, `destination ${peer} did not finish the TLS handshake within ${timeoutMs} ms`);
    const reader = new ExactReader(tls, `destination ${peer}`);
    try {
      const hello = await reader.read(GREETING.length, deadline, 'the TLS greeting');
      if (!hello.equals(GREETING)) throw new MigrationTransportError('handshake', `destination ${peer} sent no stage2 TLS greeting after the handshake`);
      reader.finish();
    } catch (e) {
      reader.abandon();
      // A refusal after our handshake completed (TLS 1.3: the server checks our certificate
      // last) arrives as an alert, which the reader reports as a socket error.
      const cause = opensslReason((e as Error).message);
      if (/certificate required|CERTIFICATE_REQUIRED/i.test(cause)) throw new MigrationTransportError('handshake', `TLS: the destination ${peer} requires a client certificate: give --tls-cert and --tls-key (${cause})`);
      if (/unknown ca|bad certificate|certificate unknown|decrypt error/i.test(cause) || (cfg.cert && /closed the connection while we waited for the TLS greeting/.test(cause))) throw new MigrationTransportError('handshake', `TLS: the destination ${peer} rejected our client certificate (not signed by its --tls-ca) (${cause})`);
      throw e;
    }
  } catch (e) {
    tls.on('error', () => undefined);
    tls.destroy();
    throw e;
  }
  return tls;
}

function handshakeDone(tls: TLSSocket, event: 'secure' | 'secureConnect', timeoutMs: number, onError: (e: NodeJS.ErrnoException) => string, onTimeout: string): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => finish(new MigrationTransportError('handshake', onTimeout)), timeoutMs);
    const finish = (err?: Error) => {
      clearTimeout(timer);
      tls.off(event, onOk);
      tls.off('error', onErr);
      tls.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onOk = () => finish();
    const onErr = (e: NodeJS.ErrnoException) => finish(new MigrationTransportError('handshake', onError(e)));
    const onClose = () => finish(new MigrationTransportError('handshake', onError(Object.assign(new Error('the peer closed the connection during the TLS handshake'), { code: '' }))));
    tls.once(event, onOk);
    tls.once('error', onErr);
    tls.once('close', onClose);
  });
}
