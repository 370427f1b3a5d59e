#!/usr/bin/env node
// What a dashboard costs a migration: runs `stage2 migrate --local ... --json` N times without
// and N times with --dashboard (and a page attached: an event-stream client reading /feed for
// the whole run), alternating, and prints throughput and downtime per run and their medians.
//
//   node scripts/dashboard-cost.mjs [N=5] [-- migrate args...]
//   default args: --engine soft -v 2 -b 1G --workload idle
import { spawn } from 'node:child_process';
import { request } from 'node:http';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const argv = process.argv.slice(2);
const dash = argv.indexOf('--');
const n = Number(argv[0] && argv[0] !== '--' ? argv[0] : 5);
const args = dash >= 0 ? argv.slice(dash + 1) : ['--engine', 'soft', '-v', '2', '-b', '1G', '--workload', 'idle'];

/** Read /feed until it ends; resolves with the number of messages. */
function attachPage(url) {
  return new Promise((resolve) => {
    let messages = 0;
    const req = request(new URL('/feed', url), (res) => {
      res.on('data', (c) => (messages += (c.toString().match(/^data: /gm) ?? []).length));
      res.on('end', () => resolve(messages));
      res.on('error', () => resolve(messages));
    });
    req.on('error', () => resolve(messages));
    req.end();
  });
}

function run(withDashboard) {
  return new Promise((resolve, reject) => {
    const a = [join(root, 'bin', 'stage2.mjs'), 'migrate', '--local', ...args, '--json', ...(withDashboard ? ['--dashboard'] : [])];
    const child = spawn(process.execPath, a, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    let page = Promise.resolve(0);
    child.stdout.on('data', (c) => (out += c));
    child.stderr.on('data', (c) => {
      err += c;
      const m = /dashboard: (http:\/\/\S+\/)/.exec(err);
      if (m && withDashboard && page.attached !== true) {
        page = attachPage(m[1]);
        page.attached = true;
      }
    });
    child.on('close', async (code) => {
      if (code !== 0) return reject(new Error(`migrate exited ${code}: ${err.slice(-500)}`));
      const r = JSON.parse(out.trim().split('\n').pop());
      const busy = /took ([\d.]+) ms of the main thread/.exec(err);
      const tap = /harvest tap ([\d.]+) ms \(([\d.]+) ms of it in stop-and-copy\)/.exec(err);
      resolve({ mbps: r.throughputMBps, downtimeMs: r.downtimeSeconds * 1000, totalSeconds: r.totalSeconds, messages: await page, busyMs: busy ? Number(busy[1]) : 0, tapStopAndCopyMs: tap ? Number(tap[2]) : 0, stopAndCopy: r.stopAndCopy });
    });
  });
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
};
const rows = { without: [], with: [] };
console.log(`stage2 migrate --local ${args.join(' ')} --json, ${n} x without / with --dashboard (a page attached), alternating`);
for (let i = 0; i < n; i++) {
  for (const w of i % 2 ? [true, false] : [false, true]) {
    const r = await run(w);
    rows[w ? 'with' : 'without'].push(r);
    console.log(`  run ${i + 1} ${w ? 'with   ' : 'without'}: ${r.mbps.toFixed(0)} MB/s, downtime ${r.downtimeMs.toFixed(2)} ms, total ${r.totalSeconds.toFixed(2)} s${w ? `, ${r.messages} feed messages, ${r.busyMs.toFixed(1)} ms of the main thread (${((r.busyMs / 1000 / r.totalSeconds) * 100).toFixed(2)}% of the run), heat tap in stop-and-copy ${r.tapStopAndCopyMs.toFixed(3)} ms` : ''}`);
    if (process.env.BREAKDOWN) console.log(`      stop-and-copy ms: ${Object.entries(r.stopAndCopy ?? {}).map(([k, v]) => `${k.replace('Seconds', '')} ${(v * 1000).toFixed(2)}`).join(', ')}`);
  }
}
for (const k of ['without', 'with']) {
  const xs = rows[k];
  console.log(`${k.padEnd(7)}: median ${median(xs.map((r) => r.mbps)).toFixed(0)} MB/s (${Math.min(...xs.map((r) => r.mbps)).toFixed(0)}-${Math.max(...xs.map((r) => r.mbps)).toFixed(0)}), downtime median ${median(xs.map((r) => r.downtimeMs)).toFixed(2)} ms (${Math.min(...xs.map((r) => r.downtimeMs)).toFixed(2)}-${Math.max(...xs.map((r) => r.downtimeMs)).toFixed(2)})`);
}
const cost = 1 - median(rows.with.map((r) => r.mbps)) / median(rows.without.map((r) => r.mbps));
console.log(`throughput cost of the dashboard: ${(cost * 100).toFixed(1)}%`);
