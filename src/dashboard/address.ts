// `--dashboard [HOST:]PORT`: where the dashboard listens. Loopback (127.0.0.1) unless a host is
// given; no value, or port 0, picks a free port (printed on start).
//
// Concurrency: pure functions.
import { isIP } from 'node:net';
import type { ListenAddress } from './guard.ts';

export const DEFAULT_DASHBOARD_HOST = '127.0.0.1';

/** A --dashboard value that is not [HOST:]PORT (the CLI turns it into its one-line error). */
export class DashboardAddressError extends Error {
  constructor(
    value: string,
    readonly why: string,
  ) {
    super(`--dashboard ${value}: ${why}`);
    this.name = 'DashboardAddressError';
  }
}

/** Parse `PORT`, `HOST:PORT` or `[IPv6]:PORT`; `true` (the flag alone) means loopback, a free port. */
export function parseDashboardAddress(value: string | true): ListenAddress {
  if (value === true || value === '') return { host: DEFAULT_DASHBOARD_HOST, port: 0 };
  const m = /^(?:(\[[^\]]+\]|[^:[\]]+):)?(\d+)$/.exec(value.trim());
  if (!m) throw new DashboardAddressError(value, 'expected [HOST:]PORT, e.g. 8080 or 127.0.0.1:8080 (0: a free port)');
  const port = Number(m[2]);
  if (port > 65535) throw new DashboardAddressError(value, 'port must be 0..65535');
  let host = m[1] ?? DEFAULT_DASHBOARD_HOST;
  if (host.startsWith('[')) {
    host = host.slice(1, -1);
    if (isIP(host) !== 6) throw new DashboardAddressError(value, `${host} is not an IPv6 address`);
  }
  return { host, port };
}
