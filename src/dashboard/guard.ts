// Who may read the dashboard. It is read-only (GET and HEAD; nothing it serves changes the VM),
// and it answers only requests that name it: the Host header must be one of this machine's own
// names for the address it listens on, with its port, and an Origin header, when a browser sends
// one, must be http:// and such a Host. That stops a web page elsewhere from reading it, even
// through DNS rebinding (its requests carry the attacker's host name), and cross-origin
// EventSource / fetch (their Origin is the other site's).
//
// Concurrency: pure functions.
import { hostname, networkInterfaces } from 'node:os';
import { isIP } from 'node:net';

export interface ListenAddress {
  host: string;
  port: number;
}

const LOOPBACK_NAMES = ['localhost', '127.0.0.1', '[::1]'];

export function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || host === '[::1]' || /^127\./.test(host);
}

/** The host names (without port) a request to a dashboard bound to `host` may carry. */
export function allowedHostNames(host: string): Set<string> {
  const names = new Set<string>(LOOPBACK_NAMES);
  const bracket = (h: string) => (isIP(h) === 6 ? `[${h}]` : h);
  names.add(bracket(host).toLowerCase());
  if (!isLoopback(host)) {
    // Told to listen beyond loopback: the machine's own names and addresses are its names too.
    names.add(hostname().toLowerCase());
    for (const list of Object.values(networkInterfaces())) for (const a of list ?? []) names.add(bracket(a.address).toLowerCase());
  }
  return names;
}

/** Why a request may not be answered, or null when it may. */
export function refusal(method: string | undefined, hostHeader: string | undefined, origin: string | undefined, allowed: Set<string>, port: number): string | null {
  if (method !== 'GET' && method !== 'HEAD') return `method ${method ?? '?'} not allowed: the dashboard is read-only`;
  if (!hostHeader) return 'no Host header';
  if (!hostMatches(hostHeader, allowed, port)) return `Host ${hostHeader} is not this dashboard`;
  if (origin !== undefined) {
    const m = /^http:\/\/(.+)$/i.exec(origin);
    if (!m || !hostMatches(m[1]!, allowed, port)) return `Origin ${origin} is not this dashboard`;
  }
  return null;
}

function hostMatches(hostPort: string, allowed: Set<string>, port: number): boolean {
  const m = /^(\[[^\]]+\]|[^:]+):(\d+)$/.exec(hostPort.trim().toLowerCase());
  return !!m && Number(m[2]) === port && allowed.has(m[1]!);
}
