// Raw migration-transport throughput over loopback, and decoder cost per page.
//
//   npx tsx scripts/bench-transport.ts [--bytes 1G] [--channels 1,2,4] [--batch 1M]
//                                      [--record-pages 256] [--mode copy|fill|borrow|runs] [--compress]
//                                      [--apply copy|none] [--receive run|iterator] [--json]
//   (--record-pages 1 sends every page as its own sendRam call; --mode runs sends scattered
//    single pages, 256 per sendRamRuns call)
//   npx tsx scripts/bench-transport.ts --decoder [--bytes 256M] [--chunk 64K]
//   npx tsx scripts/bench-transport.ts --hash [--bytes 1G]
//   (transfer runs also print the kernel's loopback ceiling first: src/bench/kernel-ceiling.ts,
//    a C pump on one connection, skipped with --no-ceiling)
//
// Transfer: the destination runs in a child process (its own core and event loop, as on a real
// second host); the source sends `--bytes` of non-zero 4 KiB pages (a 64 MiB pattern window
// reused, so source memory stays small) as RAM records spread evenly over the channels, then
// SYNC, END, and waits for the destination's COMPLETE. The destination copies each page into a
// 64 MiB stand-in guest window (--apply copy: the memcpy a real receiver does; none: discard).
// Time runs from the first record sent (CONFIG) to COMPLETE received; the handshake is reported
// separately. GB/s uses 1e9 bytes of guest pages.
//
// Decoder: encodes --bytes of RAM records (1 MiB each) into memory, cuts them into --chunk
// pieces as a socket delivers them, decodes everything and reports ns per page.
// Hash: memoryHash of --bytes of non-zero pages by full scan (what the source does after
// pausing) and by incremental PageHashTable updates (what the destination does per page).

import { fork, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { StreamDecoder } from '../src/migration/stream/decoder.ts';
import { writeRamHeader } from '../src/migration/stream/encoder.ts';
import { CAP_LZ4, RamEncoding, type MigrationRecord } from '../src/migration/stream/format.ts';
import { MigrationConnection } from '../src/migration/transport/connection.ts';
import { MigrationListener } from '../src/migration/transport/listener.ts';
import { StreamLayout } from '../src/migration/stream/layout.ts';
import { describeKernelCeiling, measureKernelCeiling } from '../src/bench/kernel-ceiling.ts';

const PAGE = 4096;
const WINDOW_PAGES = 16384; // 64 MiB

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] && !process.argv[i + 1]!.startsWith('--') ? process.argv[i + 1]! : dflt;
}
const flag = (name: string) => process.argv.includes(`--${name}`);

function parseSize(s: string): number {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)i?B?$/i.exec(s.trim());
  if (!m) throw new Error(`bad size ${s}`);
  return Math.round(Number(m[1]) * 1024 ** ' KMGT'.indexOf((m[2] || ' ').toUpperCase()));
}

function patternWindow(): Uint8Array {
  const buf = new Uint8Array(WINDOW_PAGES * PAGE);
  const dv = new DataView(buf.buffer);
  for (let p = 0; p < WINDOW_PAGES; p++) for (let w = 0; w < 1024; w += 8) dv.setUint32(p * PAGE + w * 4, (p * 2654435761 + w) >>> 0, true);
  return buf;
}

async function receiver(): Promise<void> {
  process.on('SIGINT', () => process.exit(0));
  const server = await MigrationListener.listen({ host: '127.0.0.1', port: 0 });
  process.send!({ port: server.port });
  const apply = arg('apply', 'copy');
  const guest = new Uint8Array(WINDOW_PAGES * PAGE);
  for (;;) {
    const incoming = await server.accept();
    const cpu0 = process.cpuUsage();
    const faults0 = process.resourceUsage().minorPageFault;
    let pages = 0;
    const onRecord = (rec: MigrationRecord): Promise<void> | undefined => {
      if (rec.kind === 'ram') {
        if (apply === 'copy') {
          // Pages land in the 64 MiB window at (page mod window); split at the wrap.
          let done = 0;
          while (done < rec.count) {
            const at = (rec.firstPage + done) % WINDOW_PAGES;
            const n = Math.min(rec.count - done, WINDOW_PAGES - at);
            guest.set(rec.data.subarray(done * PAGE, (done + n) * PAGE), at * PAGE);
            done += n;
          }
        }
        pages += rec.count;
      } else if (rec.kind === 'end') {
        const cpu = process.cpuUsage(cpu0);
        const reads = incoming.channels.reduce((n, c) => n + c.chunksReceived, 0);
        process.send!({ cpuSeconds: (cpu.user + cpu.system) / 1e6, userSeconds: cpu.user / 1e6, meanReadBytes: Math.round(incoming.bytesReceived / reads), minorFaults: process.resourceUsage().minorPageFault - faults0 });
        return incoming.reply({ kind: 'complete', memoryHash: 0n, pages });
      }
      return undefined;
    };
    if (arg('receive', 'run') === 'iterator') {
      for await (const rec of incoming.records()) await onRecord(rec);
    } else {
      await incoming.run(onRecord);
    }
    await incoming.close();
  }
}

async function transfer(child: ChildProcess, port: number, bytes: number, channels: number) {
  const receiverCpu = new Promise<{ cpuSeconds: number; userSeconds: number; meanReadBytes: number; minorFaults: number }>((resolve) => child.once('message', resolve));
  const totalPages = Math.floor(bytes / PAGE);
  const recordPages = Number(arg('record-pages', '256'));
  const mode = arg('mode', 'copy');
  const src = patternWindow();
  const t0 = process.hrtime.bigint();
  const conn = await MigrationConnection.connect({
    host: '127.0.0.1', port, channels, caps: flag('compress') ? CAP_LZ4 : 0, batchBytes: parseSize(arg('batch', '1M')),
  });
  const t1 = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  await conn.send({ kind: 'config', config: { memslots: [{ slot: 0, pages: totalPages }] } });
  const per = Math.ceil(totalPages / channels);
  if (mode === 'runs') {
    // Scattered single pages (every other page, then the rest), 256 runs per sendRamRuns call.
    await Promise.all(Array.from({ length: channels }, async (_, ch) => {
      const end = Math.min(totalPages, (ch + 1) * per);
      const firsts = new Uint32Array(256);
      const counts = new Uint32Array(256).fill(1);
      for (const parity of [0, 1]) {
        for (let base = ch * per + parity; base < end; base += 512) {
          let n = 0;
          for (let p = base; p < end && n < 256; p += 2) firsts[n++] = p;
          const at = ((base >> 1) % (WINDOW_PAGES - 256)) * PAGE;
          await conn.sendRamRuns(0, firsts.subarray(0, n), counts.subarray(0, n), src.subarray(at, at + n * PAGE), { channel: ch });
        }
      }
    }));
  } else
  await Promise.all(Array.from({ length: channels }, async (_, ch) => {
    const end = Math.min(totalPages, (ch + 1) * per);
    for (let first = ch * per; first < end; first += recordPages) {
      const n = Math.min(recordPages, end - first);
      const at = first % WINDOW_PAGES;
      const k = Math.min(n, WINDOW_PAGES - at);
      if (mode === 'borrow') {
        // The pattern window is never modified, so nothing waits for `written`.
        await conn.sendRamBorrowed(0, first, k, src.subarray(at * PAGE, (at + k) * PAGE), () => undefined, { channel: ch });
      } else if (mode === 'fill') {
        await conn.fillRam(0, first, k, (dst, f) => dst.set(src.subarray(((f % WINDOW_PAGES) * PAGE), ((f % WINDOW_PAGES) * PAGE) + dst.length)), { channel: ch });
      } else {
        await conn.sendRam(0, first, k, src.subarray(at * PAGE, (at + k) * PAGE), { channel: ch });
      }
      if (k < n) await conn.sendRam(0, first + k, n - k, src.subarray(0, (n - k) * PAGE), { channel: ch });
    }
  }));
  await conn.sync(1);
  await conn.send({ kind: 'end', memoryHash: 0n, pages: totalPages, configDigest: 0n, vcpuStateDigest: 0n, vcpuStates: 0 });
  await conn.flush();
  const done = await conn.nextBackRecord(['complete'], 600_000);
  const t2 = process.hrtime.bigint();
  const cpu = process.cpuUsage(cpu0);
  const senderCpuSeconds = (cpu.user + cpu.system) / 1e6;
  const { cpuSeconds: receiverCpuSeconds, userSeconds: receiverUserSeconds, meanReadBytes, minorFaults: receiverMinorFaults } = await receiverCpu;
  const senderUserSeconds = cpu.user / 1e6;
  const wireBytes = conn.bytesSent;
  await conn.close();
  if (done.kind !== 'complete' || done.pages !== totalPages) throw new Error(`destination got ${JSON.stringify(done)}`);
  const seconds = Number(t2 - t1) / 1e9;
  return {
    channels,
    bytes: totalPages * PAGE,
    wireBytes,
    handshakeSeconds: Number(t1 - t0) / 1e9,
    seconds,
    GBps: (totalPages * PAGE) / seconds / 1e9,
    GiBps: (totalPages * PAGE) / seconds / 2 ** 30,
    senderCpuSeconds,
    senderUserSeconds,
    receiverCpuSeconds,
    receiverUserSeconds,
    meanReadBytes,
    receiverMinorFaults,
    /** What the two ends could do with a core each, from their CPU time: load-independent. */
    cpuBoundGBps: (totalPages * PAGE) / Math.max(senderCpuSeconds, receiverCpuSeconds) / 1e9,
  };
}

function decoderBench(bytes: number) {
  const recordPages = 256;
  const records = Math.max(1, Math.floor(bytes / PAGE / recordPages));
  const recBytes = 24 + recordPages * PAGE;
  // One stream of `records` RAM records; reuse a 64 MiB encoded window to keep memory small.
  const windowRecords = Math.min(records, 64);
  const stream = new Uint8Array(windowRecords * recBytes);
  const src = patternWindow();
  for (let r = 0; r < windowRecords; r++) {
    const p = writeRamHeader(stream, r * recBytes, 0, r * recordPages, recordPages, RamEncoding.RAW, recordPages * PAGE);
    stream.set(src.subarray(0, recordPages * PAGE), p);
  }
  const chunk = parseSize(arg('chunk', '64K'));
  const dec = new StreamDecoder({ direction: 'to-destination' });
  dec.setLayout(new StreamLayout([{ slot: 0, pages: windowRecords * recordPages }]));
  let pages = 0;
  let fragments = 0;
  const cpu0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  for (let done = 0; done < records; done += windowRecords) {
    for (let off = 0; off < stream.length; off += chunk) {
      dec.push(stream.subarray(off, off + chunk));
      for (let rec = dec.next(); rec; rec = dec.next()) {
        if (rec.kind === 'ram') {
          pages += rec.count;
          fragments++;
        }
      }
    }
  }
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const cpu = process.cpuUsage(cpu0);
  const cpuSeconds = (cpu.user + cpu.system) / 1e6;
  return { chunkBytes: chunk, pages, fragments, seconds, cpuSeconds, nsPerPage: (seconds * 1e9) / pages, cpuNsPerPage: (cpuSeconds * 1e9) / pages, GBps: (pages * PAGE) / seconds / 1e9 };
}

/** memoryHash over `bytes` of non-zero pages (the source's check after pause), and table updates. */
async function hashBench(bytes: number) {
  const { createMemoryHasher, PageHashTable } = await import('../src/migration/hash.ts');
  const hasher = await createMemoryHasher();
  const src = patternWindow();
  const pages = Math.floor(bytes / PAGE);
  const layout = [{ slot: 0, pages }];
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  const full = hasher.hashGuestMemory((_slot, first, dst) => {
    const at = (first % WINDOW_PAGES) * PAGE;
    dst.set(src.subarray(at, Math.min(at + dst.length, src.length)));
    if (at + dst.length > src.length) dst.set(src.subarray(0, at + dst.length - src.length), src.length - at);
  }, layout);
  const scanSeconds = Number(process.hrtime.bigint() - t0) / 1e9;
  const c1 = process.cpuUsage(c0);
  const table = new PageHashTable(layout);
  const c2 = process.cpuUsage();
  const t1 = process.hrtime.bigint();
  for (let first = 0; first < pages; first += 256) {
    const at = first % WINDOW_PAGES;
    hasher.hashInto(table, 0, first, 256, src.subarray(at * PAGE, (at + 256) * PAGE));
  }
  const tableSeconds = Number(process.hrtime.bigint() - t1) / 1e9;
  const c3 = process.cpuUsage(c2);
  if (table.total() !== full.memoryHash) throw new Error('table total differs from the full scan');
  const scanCpu = (c1.user + c1.system) / 1e6;
  const tableCpu = (c3.user + c3.system) / 1e6;
  return { pages, scanSeconds, scanCpuSeconds: scanCpu, scanNsPerPage: (scanSeconds * 1e9) / pages, scanCpuNsPerPage: (scanCpu * 1e9) / pages, tableSeconds, tableCpuSeconds: tableCpu, tableNsPerPage: (tableSeconds * 1e9) / pages, tableCpuNsPerPage: (tableCpu * 1e9) / pages };
}

async function main(): Promise<void> {
  if (flag('receiver')) return receiver();
  if (flag('hash')) {
    const r = await hashBench(parseSize(arg('bytes', '1G')));
    console.log(flag('json') ? JSON.stringify(r) : `hash: ${r.pages} pages; full scan ${r.scanSeconds.toFixed(3)} s wall / ${r.scanCpuSeconds.toFixed(3)} s CPU (${r.scanCpuNsPerPage.toFixed(0)} ns/page CPU), incremental table ${r.tableSeconds.toFixed(3)} s wall / ${r.tableCpuSeconds.toFixed(3)} s CPU (${r.tableCpuNsPerPage.toFixed(0)} ns/page CPU)`);
    return;
  }
  if (flag('decoder')) {
    const r = decoderBench(parseSize(arg('bytes', '256M')));
    console.log(flag('json') ? JSON.stringify(r) : `decoder (${r.chunkBytes}-byte chunks): ${r.pages} pages in ${r.fragments} fragments, ${r.seconds.toFixed(3)} s, ${r.nsPerPage.toFixed(1)} ns/page wall, ${r.cpuNsPerPage.toFixed(1)} ns/page CPU (${r.GBps.toFixed(2)} GB/s)`);
    return;
  }
  const bytes = parseSize(arg('bytes', '1G'));
  // The kernel's own figure first, on the same host and load: what no Node stream can beat.
  const ceiling = flag('no-ceiling') ? null : measureKernelCeiling(4 * 2 ** 30, 2);
  if (ceiling && !flag('json')) console.log(describeKernelCeiling(ceiling));
  const child = fork(fileURLToPath(import.meta.url), ['--receiver', ...process.argv.slice(2)], { execArgv: ['--import', 'tsx', ...(process.env.BENCH_PROF ? ['--cpu-prof', '--cpu-prof-dir', process.env.BENCH_PROF] : [])] });
  const port = await new Promise<number>((resolve) => child.once('message', (m: { port: number }) => resolve(m.port)));
  const rows = [];
  try {
    for (const channels of arg('channels', '1,2,4').split(',').map(Number)) {
      const r = await transfer(child, port, bytes, channels);
      rows.push(r);
      if (!flag('json')) {
        console.log(`channels ${r.channels}: ${(r.bytes / 2 ** 30).toFixed(2)} GiB in ${r.seconds.toFixed(3)} s = ${r.GBps.toFixed(2)} GB/s (${r.GiBps.toFixed(2)} GiB/s), wire ${r.wireBytes} bytes, handshake ${(r.handshakeSeconds * 1000).toFixed(1)} ms; cpu (user+sys) sender ${r.senderCpuSeconds.toFixed(3)} s (user ${r.senderUserSeconds.toFixed(3)}) receiver ${r.receiverCpuSeconds.toFixed(3)} s (user ${r.receiverUserSeconds.toFixed(3)}) -> cpu-bound ${r.cpuBoundGBps.toFixed(2)} GB/s; mean read ${r.meanReadBytes} bytes, receiver minor faults ${r.receiverMinorFaults}`);
      }
    }
  } finally {
    child.kill('SIGINT'); // SIGINT lets --cpu-prof write its profile
  }
  if (flag('json')) console.log(JSON.stringify({ params: { bytes, batch: arg('batch', '1M'), recordPages: Number(arg('record-pages', '256')), mode: arg('mode', 'copy'), apply: arg('apply', 'copy'), compress: flag('compress') }, kernelCeiling: ceiling, rows }));
  else if (ceiling && !('error' in ceiling)) {
    const best = Math.max(...rows.map((r) => r.GBps));
    console.log(`best Node figure ${best.toFixed(2)} GB/s = ${((100 * best) / ceiling.GBps).toFixed(0)}% of the kernel ceiling (${ceiling.GBps.toFixed(2)} GB/s)`);
  }
}

await main();
