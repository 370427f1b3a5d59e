// Admitting one migration connection before its stream starts: TLS first (tls.ts), then the
// shared-token proof inside it (auth.ts), then the stream's own HELLO (listener.ts /
// connection.ts). Each of a migration's channels is admitted on its own, so a CHANNEL_HELLO
// that guesses a session id gets nowhere without the same credentials.
//
// Without either, a connection is handed over untouched: the plain path stays as fast as it
// was (slab reads on the destination: slab-reads.ts). A TLS connection is read with ordinary
// 'data' events: node's TLS sockets cannot read into caller-provided buffers.

import type { Socket } from 'node:net';
import { MigrationTransportError } from './errors.ts';
import { authenticateSource, authenticateToDestination } from './auth.ts';
import { acceptTls, checkServerConfig, connectTls, type TlsClientConfig, type TlsServerConfig } from './tls.ts';

/** What a destination demands of every connection. */
export interface ServerSecurity {
  tls?: TlsServerConfig;
  /** The shared secret (--auth-token-file contents). */
  token?: Uint8Array;
}

/** What a source brings to every connection. */
export interface ClientSecurity {
  tls?: TlsClientConfig;
  token?: Uint8Array;
}

export interface AdmittedSocket {
  socket: Socket;
  /** Read it with slab reads: asked for, and not TLS (the Channel must then use 'data' events). */
  slabReads: boolean;
}

/** Destination side, built once per listener (the TLS context is parsed once). */
export class Admission {
  constructor(private readonly security: ServerSecurity) {
    if (security.tls) checkServerConfig(security.tls);
  }

  get requiresAnything(): boolean {
    return this.security.tls !== undefined || this.security.token !== undefined;
  }

  /**
   * Admit `socket` or throw why not (the socket is then closed or closing). `slabReads`: the
   * caller would like to read a plain connection with slab reads (see AdmittedSocket).
   */
  async admit(socket: Socket, peer: string, timeoutMs: number, slabReads: boolean): Promise<AdmittedSocket> {
    const deadline = Date.now() + timeoutMs;
    let s: Socket = socket;
    try {
      if (this.security.tls) s = await acceptTls(socket, this.security.tls, peer, timeoutMs);
      if (this.security.token) await authenticateSource(s, this.security.token, peer, Math.max(1, deadline - Date.now()), slabReads && !this.security.tls);
    } catch (e) {
      s.on('error', () => undefined);
      // Let a refusal written by auth.ts reach the peer, but never wait on it.
      setTimeout(() => s.destroy(), 200).unref();
      throw e;
    }
    return { socket: s, slabReads: slabReads && !this.security.tls };
  }
}

/** Source side: secure and authenticate one connected socket. */
export async function secureOutgoing(socket: Socket, host: string, security: ClientSecurity, peer: string, timeoutMs: number): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  let s: Socket = socket;
  try {
    if (security.tls) s = await connectTls(socket, host, security.tls, peer, timeoutMs);
    if (security.token) await authenticateToDestination(s, security.token, peer, Math.max(1, deadline - Date.now()));
    return s;
  } catch (e) {
    s.on('error', () => undefined);
    s.destroy();
    socket.destroy();
    // A destination that requires TLS drops a plain source unread: say what may be missing.
    if (!security.tls && e instanceof MigrationTransportError && /closed the connection/.test(e.message)) {
      throw new MigrationTransportError(e.code, `${e.message} (if the destination requires TLS, give --tls-ca; its log says why it refused)`);
    }
    throw e;
  }
}
