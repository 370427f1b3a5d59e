// The dashboard page: one EventSource on /feed; every message is the whole picture (server side:
// src/dashboard/sampler.ts), so a reload or a reconnect redraws everything from its first one.
// No libraries, nothing fetched but this page's own three files and the feed.
'use strict';

const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
const MiB = 2 ** 20;

function fmtBytes(b) {
  if (b >= 2 ** 30) return (b / 2 ** 30).toFixed(2) + ' GiB';
  return (b / MiB).toFixed(1) + ' MiB';
}
function fmtNum(n) {
  if (n >= 1e6) return (n / 1e6).toFixed(2) + ' M';
  if (n >= 1e4) return (n / 1e3).toFixed(1) + ' k';
  return String(Math.round(n));
}
function text(id, s) {
  const el = $(id);
  if (el.textContent !== s) el.textContent = s;
}

// ---- migration figures

function drawMigration(m, msg) {
  if (!m) {
    text('status', msg.role === 'bench' ? 'no migration' : 'waiting');
    $('status').dataset.status = '';
    $('migration-note').textContent = msg.role === 'bench' ? 'This command runs no migration: the panels below show the VM.' : msg.role === 'destination' ? 'The destination: VM and mapping panels follow the VM once CONFIG has built it.' : '';
    return;
  }
  text('status', m.status);
  $('status').dataset.status = m.status;
  text('round', String(m.round));
  text('sent', fmtBytes(m.transferredBytes) + ' / ' + fmtBytes(m.ramBytes));
  text('remaining', fmtBytes(m.remainingBytes));
  text('rate', m.currentMBps.toFixed(0) + ' MB/s');
  text('avg-rate', m.throughputMBps.toFixed(0) + ' MB/s');
  text('throttle', m.throttlePercent + ' %');
  text('downtime', (m.expectedDowntimeSeconds * 1000).toFixed(1) + ' ms');
  text('dirty-rate', fmtNum(m.dirtyPagesRate) + ' pages/s');
  text('elapsed', m.totalSeconds.toFixed(1) + ' s');
  text('postcopy', String(m.postcopyRequests));
  const tr = $('transitions');
  if (tr.childElementCount !== msg.transitions.length) {
    tr.textContent = '';
    for (const x of msg.transitions) {
      const s = document.createElement('span');
      s.dataset.status = x.status;
      s.textContent = `${x.status} ${x.t.toFixed(2)} s`;
      tr.append(s);
    }
  }
  $('migration-note').textContent = m.error ? 'error: ' + m.error : '';
}

// ---- charts (plain SVG)

function clear(svg) {
  while (svg.firstChild) svg.removeChild(svg.firstChild);
}
function el(svg, name, attrs, content) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (content !== undefined) e.textContent = content;
  svg.appendChild(e);
  return e;
}
const W = 420, H = 200, L = 48, B = 22, T = 8, R = 8;

function axes(svg, yMax, xLabel) {
  el(svg, 'line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B });
  el(svg, 'line', { class: 'axis', x1: L, y1: T, x2: L, y2: H - B });
  el(svg, 'text', { x: L - 4, y: T + 8, 'text-anchor': 'end' }, fmtNum(yMax));
  el(svg, 'text', { x: L - 4, y: H - B, 'text-anchor': 'end' }, '0');
  el(svg, 'text', { x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle' }, xLabel);
}

function drawRounds(rounds) {
  const svg = $('rounds-chart');
  clear(svg);
  svg.dataset.bars = String(rounds.length);
  const yMax = Math.max(1, ...rounds.map((r) => r.pages));
  axes(svg, yMax, 'round');
  const bw = (W - L - R) / Math.max(rounds.length, 1);
  rounds.forEach((r, i) => {
    const h = ((H - B - T) * r.pages) / yMax;
    const bar = el(svg, 'rect', { class: 'bar ' + r.kind, x: L + i * bw + 1, y: H - B - h, width: Math.max(bw - 2, 1), height: Math.max(h, 0.5) });
    el(bar, 'title', {}, `round ${r.round} (${r.kind}): ${r.pages} pages`);
    if (rounds.length <= 30) el(svg, 'text', { x: L + i * bw + bw / 2, y: H - B + 11, 'text-anchor': 'middle' }, String(r.round));
  });
}

function drawDirtyRate(points) {
  const svg = $('dirty-chart');
  clear(svg);
  svg.dataset.points = String(points.length);
  const yMax = Math.max(1, ...points.map((p) => p.dirtyPagesPerSecond));
  const tMax = Math.max(1e-3, ...points.map((p) => p.t));
  const tMin = points.length ? points[0].t : 0;
  axes(svg, yMax, 'seconds');
  if (points.length > 0) {
    el(svg, 'text', { x: L, y: H - B + 11, 'text-anchor': 'start' }, tMin.toFixed(1));
    el(svg, 'text', { x: W - R, y: H - B + 11, 'text-anchor': 'end' }, tMax.toFixed(1));
  }
  const x = (t) => L + ((W - L - R) * (t - tMin)) / Math.max(tMax - tMin, 1e-3);
  const y = (v) => H - B - ((H - B - T) * v) / yMax;
  if (points.length === 0) el(svg, 'text', { x: (L + W) / 2, y: H / 2, 'text-anchor': 'middle' }, 'no harvests yet');
  else el(svg, 'polyline', { class: 'line', points: points.map((p) => `${x(p.t).toFixed(1)},${y(p.dirtyPagesPerSecond).toFixed(1)}`).join(' ') });
  for (const p of points) el(svg, 'circle', { cx: x(p.t), cy: y(p.dirtyPagesPerSecond), r: 2, fill: '#c0392b' });
}

// ---- cell maps (canvas: a large guest has tens of thousands of cells)

function drawCells(canvas, cells, colourOf) {
  const n = cells.length;
  const cols = n > 4096 ? 128 : 64;
  const px = n > 4096 ? 4 : 8;
  const rows = Math.ceil(n / cols);
  if (canvas.width !== cols * px || canvas.height !== rows * px) {
    canvas.width = cols * px;
    canvas.height = Math.max(rows * px, 1);
  }
  const g = canvas.getContext('2d');
  g.clearRect(0, 0, canvas.width, canvas.height);
  let painted = 0;
  for (let i = 0; i < n; i++) {
    const c = colourOf(cells[i]);
    if (!c) continue;
    g.fillStyle = c;
    g.fillRect((i % cols) * px, Math.floor(i / cols) * px, px - 1, px - 1);
    painted++;
  }
  canvas.dataset.cells = String(n);
  canvas.dataset.painted = String(painted);
  canvas.dataset.cols = String(cols);
  canvas.dataset.px = String(px);
}

function heatColour(level, window) {
  if (level === 0) return '#e4e4e4';
  const f = window > 0 ? level / window : 1; // 0..1: yellow -> red
  return `hsl(${Math.round(50 - 50 * f)}, 90%, ${Math.round(62 - 20 * f)}%)`;
}

function drawHeat(heat, memory, role) {
  const canvas = $('heatmap');
  if (!memory) return;
  const window = heat ? heat.window : 0;
  const cells = heat ? heat.cells : '0'.repeat(memory.cells);
  drawCells(canvas, cells, (ch) => heatColour(ch.charCodeAt(0) - 48, window));
  const none = role === 'source' ? 'no harvest yet' : role === 'destination' ? 'the destination harvests nothing' : "this benchmark's own harvests are not shown";
  text('heat-caption', heat ? `(one cell per 2 MiB; dirty in how many of the last ${window} harvests, ${heat.harvests} so far)` : `(one cell per 2 MiB; ${none})`);
  const legend = $('heat-legend');
  legend.textContent = '';
  for (let l = 0; l <= Math.max(window, 1); l++) {
    const s = document.createElement('span');
    const i = document.createElement('i');
    i.style.background = heatColour(l, Math.max(window, 1));
    s.append(i, l === 0 ? 'clean' : `${l}`);
    legend.append(s);
  }
}

const MAP_COLOURS = { '.': '#e4e4e4', t: '#e67e22', b: '#2f6fb0', g: '#16325c' };
const MAP_NAMES = { '.': 'not mapped', t: '4 KiB pages (table)', b: '2 MiB block', g: '1 GiB block' };

function drawMapping(mapping, memory) {
  const canvas = $('mapping');
  if (mapping.unavailable) {
    $('mapping-note').textContent = mapping.unavailable;
    canvas.dataset.unavailable = 'true';
    return;
  }
  $('mapping-note').textContent = '';
  if (!memory) return;
  drawCells(canvas, mapping.cells, (ch) => MAP_COLOURS[ch]);
  const counts = {};
  for (const ch of mapping.cells) counts[ch] = (counts[ch] || 0) + 1;
  const legend = $('mapping-legend');
  legend.textContent = '';
  for (const k of Object.keys(MAP_COLOURS)) {
    const s = document.createElement('span');
    const i = document.createElement('i');
    i.style.background = MAP_COLOURS[k];
    s.append(i, `${MAP_NAMES[k]}: ${counts[k] || 0}`);
    s.dataset.kind = k;
    legend.append(s);
  }
}

// ---- vCPUs and counters

function drawVcpus(vcpus) {
  const reasons = [...new Set(vcpus.flatMap((v) => Object.keys(v.exits)))];
  const shown = reasons.filter((r) => vcpus.some((v) => v.exits[r] > 0));
  const head = ['vCPU', 'state', 'passes', 'stall'].concat(shown.map((r) => 'exits ' + r));
  const thead = $('vcpus').tHead;
  thead.innerHTML = '';
  const hr = thead.insertRow();
  for (const h of head) {
    const th = document.createElement('th');
    th.textContent = h;
    hr.append(th);
  }
  const tbody = $('vcpus').tBodies[0];
  tbody.innerHTML = '';
  for (const v of vcpus) {
    const tr = tbody.insertRow();
    tr.dataset.state = v.state;
    const cells = [String(v.vcpu), v.state, String(v.passes), v.stallSeconds > 0 ? v.stallSeconds.toFixed(1) + ' s' : '–'].concat(shown.map((r) => fmtNum(v.exits[r] || 0)));
    cells.forEach((c, i) => {
      const td = tr.insertCell();
      td.textContent = c;
      if (i === 1 && v.state === 'stalled') td.className = 'stalled';
    });
  }
}

function drawCounters(counters) {
  const box = $('counters');
  box.textContent = '';
  for (const [k, v] of Object.entries(counters)) {
    const d = document.createElement('div');
    const l = document.createElement('span');
    l.className = 'label';
    l.textContent = k;
    const n = document.createElement('span');
    n.textContent = Number.isInteger(v) ? fmtNum(v) : v.toFixed(4);
    d.append(l, n);
    box.append(d);
  }
}

// ---- the feed

let lastSeq = 0;
function render(msg) {
  lastSeq = msg.seq;
  document.body.dataset.seq = String(msg.seq);
  text('title', `stage2 ${msg.title}${msg.engine ? ' · ' + msg.engine + ' engine' : ''}`);
  drawMigration(msg.migration, msg);
  drawRounds(msg.rounds);
  drawDirtyRate(msg.dirtyRate);
  drawHeat(msg.heat, msg.memory, msg.role);
  drawMapping(msg.mapping, msg.memory);
  drawVcpus(msg.vcpus);
  drawCounters(msg.counters);
}

function feedState(s, label) {
  const f = $('feed');
  f.dataset.feed = s;
  f.textContent = label;
}

const source = new EventSource('/feed');
source.onopen = () => feedState('live', 'live');
source.onmessage = (e) => {
  const msg = JSON.parse(e.data);
  render(msg);
  if (msg.final) {
    source.close();
    feedState('ended', 'command ended: final state');
  } else feedState('live', 'live');
};
source.onerror = () => {
  if (source.readyState === EventSource.CLOSED) feedState('ended', 'feed closed');
  else feedState('reconnecting', lastSeq ? 'reconnecting… (showing the last state)' : 'connecting…');
};
