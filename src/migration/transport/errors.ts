// Typed transport failures. Everything that goes wrong below the migration logic surfaces as
// either a MigrationStreamError (the bytes broke the format: stream/format.ts) or a
// MigrationTransportError (the connection itself: refused, timed out, dropped, or the peer said
// ERROR). Both carry a code to branch on and a message that names the endpoint and channel.

export type TransportErrorCode =
  | 'connect-refused'
  | 'connect-timeout'
  | 'connect-failed'
  | 'handshake'
  | 'connection-lost'
  /** The peer made no progress for the idle timeout (liveness.ts). */
  | 'idle-timeout'
  | 'remote-error'
  | 'closed'
  | 'protocol';

export class MigrationTransportError extends Error {
  constructor(
    readonly code: TransportErrorCode,
    message: string,
    /** For 'remote-error': the ERROR record's numeric code (format.ts ErrorCode). */
    readonly remoteCode?: number,
  ) {
    super(message);
    this.name = 'MigrationTransportError';
  }
}

/** A node:net error code as a readable phrase. */
export function describeSocketError(e: unknown): string {
  const code = (e as NodeJS.ErrnoException | undefined)?.code;
  switch (code) {
    case 'ECONNRESET': return 'connection reset by peer';
    case 'EPIPE': return 'peer closed the connection (broken pipe)';
    case 'ETIMEDOUT': return 'connection timed out';
    case 'ECONNREFUSED': return 'connection refused';
    case 'EHOSTUNREACH': return 'host unreachable';
    default: return (e as Error | undefined)?.message ?? String(e);
  }
}
