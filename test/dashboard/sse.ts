// Reading the dashboard over plain HTTP, for the tests: requests with chosen Host / Origin
// headers, and the /feed event stream parsed into messages with their arrival times.
import { request, type IncomingHttpHeaders } from 'node:http';
import type { DashboardMessage } from '../../src/dashboard/sampler.ts';

export interface Reply {
  status: number;
  headers: IncomingHttpHeaders;
  body: string;
}

/** One request; the body is read to the end (not for /feed). */
export function get(url: string, headers: Record<string, string> = {}, method = 'GET'): Promise<Reply> {
  return new Promise((resolve, reject) => {
    const req = request(url, { method, headers }, (res) => {
      let body = '';
      res.on('data', (c: Buffer) => (body += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

export interface FeedMessage {
  /** performance.now() at arrival. */
  at: number;
  msg: DashboardMessage;
}

/**
 * Follow /feed until the message `until` accepts, the stream ends, or `timeoutMs`; resolves with
 * every message received.
 */
export function follow(url: string, until: (m: DashboardMessage) => boolean, timeoutMs: number): Promise<FeedMessage[]> {
  return new Promise((resolve, reject) => {
    const got: FeedMessage[] = [];
    const u = new URL('/feed', url);
    const req = request(u, { headers: { Accept: 'text/event-stream' } }, (res) => {
      if (res.statusCode !== 200) return reject(new Error(`/feed answered ${res.statusCode}`));
      let buf = '';
      const done = () => {
        clearTimeout(timer);
        req.destroy();
        resolve(got);
      };
      const timer = setTimeout(done, timeoutMs);
      res.on('data', (c: Buffer) => {
        buf += c.toString();
        let i: number;
        while ((i = buf.indexOf('\n\n')) >= 0) {
          const frame = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = frame.split('\n').filter((l) => l.startsWith('data: ')).map((l) => l.slice(6)).join('\n');
          if (!data) continue;
          const msg = JSON.parse(data) as DashboardMessage;
          got.push({ at: performance.now(), msg });
          if (until(msg)) return done();
        }
      });
      res.on('end', done);
      res.on('error', done);
    });
    req.on('error', reject);
    req.end();
  });
}

/** The dashboard URL a command printed on stderr ("dashboard: http://..."), or null. */
export function dashboardUrl(stderr: string): string | null {
  return /dashboard: (http:\/\/\S+\/)/.exec(stderr)?.[1] ?? null;
}
