// The dashboard's security rules (src/dashboard/guard.ts), on a real server: read-only, and it
// answers only requests whose Host (and Origin, when present) name it -- a page elsewhere, or a
// DNS-rebinding host name, gets 403. And --dashboard's address parsing.
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Dashboard } from '../../src/dashboard/dashboard.ts';
import { parseDashboardAddress } from '../../src/dashboard/address.ts';
import { allowedHostNames, refusal } from '../../src/dashboard/guard.ts';
import { hostname } from 'node:os';
import { get } from './sse.ts';

describe('--dashboard [HOST:]PORT', () => {
  it('defaults to loopback and a free port', () => {
    expect(parseDashboardAddress(true)).toEqual({ host: '127.0.0.1', port: 0 });
    expect(parseDashboardAddress('8080')).toEqual({ host: '127.0.0.1', port: 8080 });
    expect(parseDashboardAddress('0.0.0.0:9000')).toEqual({ host: '0.0.0.0', port: 9000 });
    expect(parseDashboardAddress('[::1]:9000')).toEqual({ host: '::1', port: 9000 });
  });
  it('refuses what is not an address', () => {
    expect(() => parseDashboardAddress('foo:bar')).toThrow(/expected \[HOST:\]PORT/);
    expect(() => parseDashboardAddress('70000')).toThrow(/0\.\.65535/);
    expect(() => parseDashboardAddress('[nope]:80')).toThrow(/not an IPv6/);
  });
});

describe('who may read it', () => {
  const loop = allowedHostNames('127.0.0.1');
  it('on loopback: only loopback names, with its own port', () => {
    expect(refusal('GET', '127.0.0.1:5000', undefined, loop, 5000)).toBeNull();
    expect(refusal('GET', 'localhost:5000', 'http://localhost:5000', loop, 5000)).toBeNull();
    expect(refusal('GET', '127.0.0.1:5001', undefined, loop, 5000)).toMatch(/Host/);
    expect(refusal('GET', 'attacker.example:5000', undefined, loop, 5000)).toMatch(/Host attacker\.example:5000 is not this dashboard/);
    expect(refusal('GET', '127.0.0.1:5000', 'http://attacker.example', loop, 5000)).toMatch(/Origin/);
    expect(refusal('GET', '127.0.0.1:5000', 'null', loop, 5000)).toMatch(/Origin/);
    expect(refusal('GET', undefined, undefined, loop, 5000)).toMatch(/no Host/);
    expect(refusal('POST', '127.0.0.1:5000', undefined, loop, 5000)).toMatch(/read-only/);
  });
});

describe('told to listen beyond loopback', () => {
  const all = allowedHostNames('0.0.0.0');
  it("accepts the machine's own names and addresses, still nobody else's", () => {
    expect(refusal('GET', `${hostname()}:8080`, undefined, all, 8080)).toBeNull();
    expect(refusal('GET', '127.0.0.1:8080', 'http://127.0.0.1:8080', all, 8080)).toBeNull();
    expect(refusal('GET', 'attacker.example:8080', undefined, all, 8080)).toMatch(/Host/);
    expect(refusal('GET', `${hostname()}:8080`, 'https://attacker.example', all, 8080)).toMatch(/Origin/);
  });
  it('takes IPv6 loopback in brackets', () => {
    expect(refusal('GET', '[::1]:8080', undefined, allowedHostNames('::1'), 8080)).toBeNull();
  });
});

describe('a running dashboard', () => {
  let dash: Dashboard;
  let url: URL;
  const lines: string[] = [];
  beforeAll(async () => {
    dash = await Dashboard.start({ host: '127.0.0.1', port: 0 }, 'guard test', 'bench', (l) => lines.push(l));
    url = new URL(dash.url);
  });
  afterAll(async () => dash.close());

  it('prints its URL on loopback', () => {
    expect(lines[0]).toMatch(/^dashboard: http:\/\/127\.0\.0\.1:\d+\/$/);
    expect(url.port).not.toBe('0');
  });

  it('serves the page, its assets and a snapshot to its own origin, with a strict CSP', async () => {
    const page = await get(url.href);
    expect(page.status).toBe(200);
    expect(page.body).toContain('<canvas id="heatmap"');
    // Every asset is this server's own: no scheme://host anywhere in the page.
    expect(page.body).not.toMatch(/(src|href)="(https?:)?\/\//);
    expect(page.headers['content-security-policy']).toContain("default-src 'none'");
    for (const a of ['dashboard.js', 'dashboard.css']) expect((await get(new URL(a, url).href)).status).toBe(200);
    const snap = await get(new URL('/snapshot.json', url).href, { Origin: url.origin });
    expect(snap.status).toBe(200);
    expect(JSON.parse(snap.body)).toMatchObject({ title: 'guard test', role: 'bench', migration: null });
  });

  it('refuses a foreign Host (DNS rebinding) and a foreign Origin (another site), on every path', async () => {
    for (const path of ['/', '/feed', '/snapshot.json', '/dashboard.js']) {
      const rebinding = await get(new URL(path, url).href, { Host: `attacker.example:${url.port}` });
      expect(rebinding.status).toBe(403);
      expect(rebinding.body).toMatch(/refused: Host attacker\.example/);
      const crossSite = await get(new URL(path, url).href, { Origin: 'http://attacker.example' });
      expect(crossSite.status).toBe(403);
      expect(crossSite.body).toMatch(/refused: Origin http:\/\/attacker\.example/);
      // No CORS header that would let another origin read anything.
      expect(crossSite.headers['access-control-allow-origin']).toBeUndefined();
    }
  });

  it('is read-only', async () => {
    for (const m of ['POST', 'PUT', 'DELETE']) {
      const r = await get(new URL('/feed', url).href, {}, m);
      expect(r.status).toBe(405);
      expect(r.headers.allow).toBe('GET, HEAD');
    }
  });
});
