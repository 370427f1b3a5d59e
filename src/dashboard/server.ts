// The dashboard's HTTP server: the page and its two assets (bundled in the package, read once at
// start: nothing is fetched from anywhere else), /feed (Server-Sent Events: one complete message
// per tick, at most TICKS_PER_SECOND a second, the latest one at once to a page that connects
// or reloads), and /snapshot.json (the latest message, for scripts). Every request passes the
// guard (guard.ts) first.
//
// Ticks: one timer, re-armed after each tick (so two ticks are never closer than TICK_MS). A tick
// samples only while a page is connected; while the migration is in stop-and-copy it does
// nothing at all (the main thread is the downtime path then).
//
// Concurrency: the VMM's main thread (Node's event loop); the sampler reads the engine through
// its own lock-free reads.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { projectRoot } from '../util/worker.ts';
import { allowedHostNames, refusal, type ListenAddress } from './guard.ts';
import type { DashboardMessage, Sampler } from './sampler.ts';

export const TICKS_PER_SECOND = 4;
export const TICK_MS = 1000 / TICKS_PER_SECOND;

const ASSETS: Record<string, { file: string; type: string }> = {
  '/': { file: 'index.html', type: 'text/html; charset=utf-8' },
  '/dashboard.js': { file: 'dashboard.js', type: 'text/javascript; charset=utf-8' },
  '/dashboard.css': { file: 'dashboard.css', type: 'text/css; charset=utf-8' },
};

const HEADERS = {
  'Cache-Control': 'no-store',
  'X-Content-Type-Options': 'nosniff',
  'X-Frame-Options': 'DENY',
  'Referrer-Policy': 'no-referrer',
  'Content-Security-Policy': "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
};

export class DashboardServer {
  private readonly server: Server;
  /** Each connected page and when the last message it was sent was sampled (m.t, in ms). */
  private readonly clients = new Map<ServerResponse, number>();
  private readonly assets = new Map<string, Buffer>();
  private allowed = new Set<string>();
  private timer: NodeJS.Timeout | null = null;
  private latest: DashboardMessage | null = null;
  private closed = false;
  /** Messages sent on /feed so far (each to every client). */
  ticks = 0;
  /** Main-thread time spent sampling, serialising and writing messages, ms: the dashboard's cost. */
  busyMs = 0;
  host = '';
  port = 0;

  constructor(private readonly sampler: Sampler) {
    const dir = join(projectRoot, 'src', 'dashboard', 'assets');
    for (const { file } of Object.values(ASSETS)) this.assets.set(file, readFileSync(join(dir, file)));
    this.server = createServer((req, res) => this.handle(req, res));
  }

  /** Listen (port 0: a free one); resolves with the address actually bound. */
  async listen(addr: ListenAddress): Promise<ListenAddress> {
    await new Promise<void>((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(addr.port, addr.host, () => resolve());
    });
    const a = this.server.address() as AddressInfo;
    this.host = addr.host;
    this.port = a.port;
    this.allowed = allowedHostNames(addr.host);
    this.arm();
    return { host: addr.host, port: a.port };
  }

  get url(): string {
    const h = this.host.includes(':') ? `[${this.host}]` : this.host === '0.0.0.0' ? '127.0.0.1' : this.host;
    return `http://${h}:${this.port}/`;
  }

  /** Never keep the process alive for the pages' sake (a command that ends on its own). */
  unref(): void {
    this.server.unref();
  }

  get clientCount(): number {
    return this.clients.size;
  }

  /**
   * Send a final message (final: true) to every page, end the feed and stop listening. A page's
   * keep-alive connection (or an EventSource that missed the final message and retries) must
   * not hold the command open: once the last frames are flushed (at most 1 s), every connection
   * is closed; a /feed request meanwhile gets 204, which tells an EventSource to stop.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.timer) clearTimeout(this.timer);
    this.sampler.final = true;
    this.broadcast(this.sampler.sample());
    const flushed = [...this.clients.keys()].map((c) => new Promise<void>((r) => c.end(() => r())));
    this.clients.clear();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([Promise.all(flushed), new Promise<void>((r) => (timer = setTimeout(r, 1000)))]);
    clearTimeout(timer);
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    this.server.closeAllConnections();
    await closed;
  }

  private arm(): void {
    this.timer = setTimeout(() => this.tick(), TICK_MS);
    this.timer.unref();
  }

  private tick(): void {
    if (this.closed) return;
    const t0 = performance.now();
    try {
      if (this.clients.size > 0 && !this.sampler.quiet) this.broadcast(this.sampler.sample());
    } finally {
      this.busyMs += performance.now() - t0;
      this.arm();
    }
  }

  private broadcast(m: DashboardMessage): void {
    this.latest = m;
    if (this.clients.size === 0) return;
    this.ticks++;
    const frame = `id: ${m.seq}\ndata: ${JSON.stringify(m)}\n\n`;
    // On the sampler's clock: two messages to one page are sampled at least TICK_MS apart.
    const sampledMs = m.t * 1000;
    for (const [c, last] of this.clients) {
      // A page that just connected got its first message then: keep its rate too (the final one goes to all).
      if (sampledMs - last < TICK_MS && !m.final) continue;
      this.clients.set(c, sampledMs);
      c.write(frame);
    }
  }

  private handle(req: IncomingMessage, res: ServerResponse): void {
    const why = refusal(req.method, req.headers.host, req.headers.origin, this.allowed, this.port);
    if (why) {
      res.writeHead(why.startsWith('method') ? 405 : 403, { ...HEADERS, 'Content-Type': 'text/plain; charset=utf-8', ...(why.startsWith('method') ? { Allow: 'GET, HEAD' } : {}) });
      res.end(`refused: ${why}\n`);
      return;
    }
    const path = (req.url ?? '/').split('?')[0]!;
    const asset = ASSETS[path];
    if (asset) {
      res.writeHead(200, { ...HEADERS, 'Content-Type': asset.type });
      res.end(req.method === 'HEAD' ? undefined : this.assets.get(asset.file));
      return;
    }
    if (path === '/snapshot.json') {
      const m = this.sampler.quiet && this.latest ? this.latest : this.sampler.sample();
      this.latest = m;
      res.writeHead(200, { ...HEADERS, 'Content-Type': 'application/json' });
      res.end(req.method === 'HEAD' ? undefined : JSON.stringify(m));
      return;
    }
    if (path === '/feed') {
      // The command has ended: 204 tells an EventSource not to reconnect.
      if (this.closed) return void res.writeHead(204, { ...HEADERS, Connection: 'close' }).end();
      res.writeHead(200, { ...HEADERS, 'Content-Type': 'text/event-stream', Connection: 'keep-alive' });
      if (req.method === 'HEAD') return void res.end();
      // A reconnecting EventSource retries after 1 s; the first message is the whole picture.
      res.write('retry: 1000\n\n');
      const m = this.latest && (this.sampler.quiet || this.sampler.final) ? this.latest : this.sampler.sample();
      this.latest = m;
      res.write(`id: ${m.seq}\ndata: ${JSON.stringify(m)}\n\n`);
      this.clients.set(res, m.t * 1000);
      req.on('close', () => this.clients.delete(res));
      return;
    }
    res.writeHead(404, { ...HEADERS, 'Content-Type': 'text/plain; charset=utf-8' });
    res.end('not found\n');
  }
}
