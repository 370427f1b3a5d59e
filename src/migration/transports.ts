// Which transport carries a migration: 'tcp' (tcp-link.ts, the migration layer's own framing,
// with per-round SYNCED acks) or 'wire' (the versioned stream + batched TCP channels of
// stream/ and transport/, through wire-link.ts). Both ends must use the same one.
import type { DestLink, SourceLink } from './link.ts';
import { connectTcpLink, listenTcpLink } from './tcp-link.ts';
import { connectWireLink, listenWireLink } from './wire-link.ts';

export type TransportKind = 'tcp' | 'wire';
export const TRANSPORT_KINDS: readonly TransportKind[] = ['tcp', 'wire'];
export const DEFAULT_TRANSPORT: TransportKind = 'tcp';

export interface LinkListener {
  readonly host: string;
  readonly port: number;
  accept(): Promise<DestLink>;
  close(): void;
}

export function connectLink(kind: TransportKind, opts: { host: string; port: number; channels: number }): Promise<SourceLink> {
  return kind === 'wire' ? connectWireLink(opts) : connectTcpLink(opts);
}

export function listenLink(kind: TransportKind, opts: { host: string; port: number }): Promise<LinkListener> {
  return kind === 'wire' ? listenWireLink(opts) : listenTcpLink(opts);
}
