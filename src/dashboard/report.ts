// `migrate --report FILE.html`: one self-contained file -- the summary, the charts (vega-lite
// rendered to SVG here, inline: nothing to fetch, no script to run) and the JSON they came from
// (in a <script type="application/json" id="stage2-migration"> element and, readable, at the
// end) -- to attach to a bug report or a paper. It opens offline.
//
// Concurrency: none (runs once the migration is over).
import { writeFileSync } from 'node:fs';
import * as vega from 'vega';
import * as vl from 'vega-lite';
import type { MigrationStats } from '../migration/stats.ts';
import type { RatePoint } from './timeline.ts';

export interface ReportData {
  /** The migration's result (migrate --json's object). */
  result: MigrationStats & Record<string, unknown>;
  /** The guest's dirty rate at each harvest (Timeline.dirtyRate), seconds since the start. */
  dirtyRate: RatePoint[];
  /** The command line that ran it. */
  command: string;
}

async function svgOf(spec: vl.TopLevelSpec): Promise<string> {
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  try {
    return await view.toSVG();
  } finally {
    view.finalize();
  }
}

export async function roundsChartSvg(result: MigrationStats): Promise<string> {
  const values = result.rounds.map((r) => ({ round: r.round, kind: r.kind, pages: r.zeroPages + r.normalPages, MiB: r.bytes / 2 ** 20, ms: r.seconds * 1000 }));
  return svgOf({
    title: 'Pages sent per round',
    data: { values },
    width: 480,
    height: 240,
    mark: { type: 'bar', tooltip: true },
    encoding: {
      x: { field: 'round', type: 'ordinal', title: 'round' },
      y: { field: 'pages', type: 'quantitative', title: 'pages (4 KiB)' },
      color: { field: 'kind', type: 'nominal', title: null, scale: { domain: ['bulk', 'iterative', 'stop-and-copy'], range: ['#2f6fb0', '#7fa7d1', '#b8860b'] } },
    },
  });
}

export async function dirtyRateChartSvg(points: RatePoint[]): Promise<string> {
  return svgOf({
    title: 'Guest dirty rate at each harvest',
    data: { values: points.map((p) => ({ seconds: p.t, rate: p.dirtyPagesPerSecond })) },
    width: 480,
    height: 240,
    mark: { type: 'line', point: true, color: '#c0392b' },
    encoding: {
      x: { field: 'seconds', type: 'quantitative', title: 'seconds since the command started' },
      y: { field: 'rate', type: 'quantitative', title: 'pages dirtied per second' },
    },
  });
}

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');

export async function renderReport(d: ReportData): Promise<string> {
  const r = d.result;
  const ms = (x: number) => `${(x * 1000).toFixed(2)} ms`;
  const rows: [string, string][] = [
    ['status', `${r.status}${r.error ? ` (${r.error})` : ''}`],
    ['verified', String(r.verified)],
    ['engine', r.engine],
    ['guest RAM', `${(r.ramBytes / 2 ** 20).toFixed(0)} MiB, ${r.params.vcpus} vCPUs, workload ${r.params.workload}`],
    ['total time', `${r.totalSeconds.toFixed(3)} s (setup ${ms(r.setupSeconds)})`],
    ['downtime', `${ms(r.downtimeSeconds)} (limit ${r.params.downtimeLimitMs} ms)`],
    ['transferred', `${(r.transferredBytes / 2 ** 20).toFixed(1)} MiB at ${r.throughputMBps.toFixed(0)} MB/s`],
    ['pages', `${r.normalPages} normal, ${r.zeroPages} zero`],
    ['rounds', `${r.rounds.length} (dirty syncs ${r.dirtySyncCount})`],
    ['throttle', `${r.throttlePercent}%`],
  ];
  const charts = [await roundsChartSvg(r)];
  if (d.dirtyRate.length > 0) charts.push(await dirtyRateChartSvg(d.dirtyRate));
  const json = JSON.stringify({ command: d.command, result: r, dirtyRate: d.dirtyRate });
  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>stage2 migration report: ${esc(r.status)}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; max-width: 1100px; }
table { border-collapse: collapse; } td { padding: 2px 12px 2px 0; vertical-align: top; } td:first-child { color: #777; }
.charts { display: flex; flex-wrap: wrap; gap: 24px; margin: 16px 0; } pre { background: #f4f4f4; padding: 8px; overflow: auto; font-size: 12px; }
</style></head>
<body>
<h1>stage2 migration report</h1>
<p><code>${esc(d.command)}</code></p>
<table id="summary">${rows.map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(v)}</td></tr>`).join('')}</table>
<div class="charts">${charts.map((svg, i) => `<figure id="chart-${i}">${svg}</figure>`).join('\n')}</div>
${d.dirtyRate.length === 0 ? '<p>No dirty-rate samples: the migration ended after its bulk round.</p>' : ''}
<script type="application/json" id="stage2-migration">${json.replace(/</g, '\\u003c')}</script>
<details><summary>The JSON these charts came from</summary><pre>${esc(JSON.stringify(JSON.parse(json), null, 2))}</pre></details>
</body></html>
`;
}

export async function writeReport(file: string, d: ReportData): Promise<void> {
  writeFileSync(file, await renderReport(d));
}
