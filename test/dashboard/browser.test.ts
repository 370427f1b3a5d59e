// The dashboard in a real browser: Debian's chromium, headless, driven by playwright-core. A
// local soft migration runs with --dashboard; the page must show the state moving from active to
// completed, a heatmap and a mapping map with a painted cell for every 2 MiB of guest memory,
// redraw everything after a reload mid-migration, and fetch nothing from anywhere but its own
// server. A screenshot goes to out/dashboard/ (gitignored). The --report file it writes opens
// offline in the same browser with its rounds chart drawn. Skips, saying why, only where
// /usr/bin/chromium is absent (.ci/run installs it).
import { existsSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { chromium, type Browser } from 'playwright-core';
import { projectRoot } from '../../src/util/worker.ts';
import { stage2 } from '../cli/run-cli.ts';
import { dashboardUrl } from './sse.ts';

const CHROMIUM = '/usr/bin/chromium';
const OUT = join(projectRoot, 'out', 'dashboard');
const haveChromium = existsSync(CHROMIUM);
if (!haveChromium) console.warn(`skipping the dashboard browser test: ${CHROMIUM} not found (apt-get install chromium; .ci/run does)`);

/** The painted cells of a cell canvas, counted from its pixels (not from what the page says). */
const paintedCells = (id: string) =>
  `(() => { const c = document.getElementById(${JSON.stringify(id)}); const n = +c.dataset.cells, cols = +c.dataset.cols, px = +c.dataset.px;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let painted = 0;
    for (let i = 0; i < n; i++) { const x = (i % cols) * px + 1, y = Math.floor(i / cols) * px + 1; if (d[(y * c.width + x) * 4 + 3] > 0) painted++; }
    return { cells: n, painted }; })()`;

describe.skipIf(!haveChromium)('dashboard in headless chromium', () => {
  let browser: Browser;
  beforeAll(async () => {
    mkdirSync(OUT, { recursive: true });
    browser = await chromium.launch({
      executablePath: CHROMIUM,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
    });
  });
  afterAll(async () => browser?.close());

  it('shows a soft migration from active to completed, all of guest memory, across a reload', async () => {
    const report = join(OUT, 'report.html');
    let resolveUrl!: (u: string) => void;
    const urlP = new Promise<string>((r) => (resolveUrl = r));
    const run = stage2(['migrate', '--local', '--engine', 'soft', '-v', '2', '-b', '64M', '-s', 'anonymous_thp', '--workload', 'sequential', '--warmup-ms', '2500', '--on-no-convergence', 'force', '--max-bandwidth', '100M', '--max-rounds', '6', '--dashboard', '--report', report], {
      timeoutMs: 110_000,
      onStderr: (text) => {
        const u = dashboardUrl(text);
        if (u) resolveUrl(u);
      },
    });
    const url = await Promise.race([urlP, run.then((r) => Promise.reject(new Error(`migrate ended before printing a dashboard URL: ${r.stderr}`)))]);
    const page = await browser.newPage({ viewport: { width: 1280, height: 1100 } });
    const foreign: string[] = [];
    page.on('request', (r) => {
      if (!r.url().startsWith(url) && !r.url().startsWith('data:')) foreign.push(r.url());
    });
    const errors: string[] = [];
    page.on('pageerror', (e) => errors.push(e.message));
    await page.goto(url);
    const cells = (2 * 64 * 2 ** 20) / 2 ** 21;

    await page.waitForSelector('#status[data-status="active"]', { timeout: 60_000 });
    expect(await page.textContent('#status')).toBe('active');
    // Reload mid-migration: the first message after it redraws everything.
    await page.reload();
    await page.waitForFunction("Number(document.body.dataset.seq) > 0 && document.getElementById('status').dataset.status !== ''", null, { timeout: 10_000 });
    expect(['active', 'device', 'completed']).toContain(await page.getAttribute('#status', 'data-status'));
    expect(await page.evaluate(paintedCells('heatmap'))).toEqual({ cells, painted: cells });
    expect(await page.evaluate(paintedCells('mapping'))).toEqual({ cells, painted: cells });
    await page.screenshot({ path: join(OUT, 'dashboard-active.png'), fullPage: true });

    await page.waitForSelector('#status[data-status="completed"]', { timeout: 90_000 });
    await page.waitForSelector('#feed[data-feed="ended"]', { timeout: 30_000 });
    // The page's record of the transitions: active, then (stop-and-copy and) completed.
    const seen = await page.$$eval('#transitions span', (xs) => xs.map((x) => x.getAttribute('data-status')));
    expect(seen.indexOf('active')).toBeGreaterThanOrEqual(0);
    expect(seen.indexOf('completed')).toBeGreaterThan(seen.indexOf('active'));
    expect(await page.evaluate(paintedCells('heatmap'))).toEqual({ cells, painted: cells });
    expect(await page.evaluate(paintedCells('mapping'))).toEqual({ cells, painted: cells });
    expect(Number(await page.getAttribute('#rounds-chart', 'data-bars'))).toBeGreaterThanOrEqual(2);
    expect(Number(await page.getAttribute('#dirty-chart', 'data-points'))).toBeGreaterThanOrEqual(1);
    expect(await page.locator('#vcpus tbody tr').count()).toBe(2);
    await page.screenshot({ path: join(OUT, 'dashboard.png'), fullPage: true });
    expect(foreign).toEqual([]);
    expect(errors).toEqual([]);

    const result = await run;
    expect(result.code, result.stderr).toBe(0);

    // The report, offline: file://, nothing else reachable; its rounds chart is drawn.
    const offline = await browser.newPage();
    const fetched: string[] = [];
    offline.on('request', (r) => fetched.push(r.url()));
    await offline.goto(pathToFileURL(report).href);
    expect(await offline.textContent('h1')).toBe('stage2 migration report');
    expect(await offline.locator('#chart-0 svg').count()).toBe(1);
    expect(await offline.locator('#chart-0 svg path[aria-roledescription="bar"], #chart-0 svg .mark-rect path').count()).toBeGreaterThanOrEqual(2);
    expect(fetched.filter((u) => !u.startsWith('file:'))).toEqual([]);
    await offline.screenshot({ path: join(OUT, 'report.png'), fullPage: true });
  });
});
