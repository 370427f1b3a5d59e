// A TCP proxy that gives a link the delay and loss this kernel cannot (it has no netem), for the
// host tests. Run it inside a namespace:
//
//   node link-proxy.mjs LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS [LOSS STALL_MS]
//
// Every chunk is forwarded DELAY_MS after it arrived, in both directions (a round trip gains
// 2 x DELAY_MS), in order. Loss: TCP hides a lost packet from the application, which sees the
// bytes behind it arrive late, after a retransmission; so with probability LOSS (0..1) a chunk
// is held back STALL_MS more, and everything behind it waits for it (head-of-line blocking),
// which is what a lossy link does to a TCP stream. Backpressure: a direction with more than
// 1 MiB queued stops reading, so the sender feels the link's rate, not the proxy's memory.
// Prints "proxy listening" once it accepts; exits on SIGTERM.
import { createServer, connect } from 'node:net';

const [listenHost, listenPort, targetHost, targetPort, delayMs, loss = '0', stallMs = '0'] = process.argv.slice(2);
const DELAY = Number(delayMs);
const LOSS = Number(loss);
const STALL = Number(stallMs);
const HIGH_WATER = 1 << 20;

function pipe(from, to) {
  const queue = [];
  let queued = 0;
  let lastDue = 0;
  let timer = null;
  let ended = false;
  const drain = () => {
    timer = null;
    const now = performance.now();
    while (queue.length && queue[0].due <= now) {
      const { chunk } = queue.shift();
      queued -= chunk.length;
      if (!to.write(chunk)) {
        from.pause();
        to.once('drain', () => queued < HIGH_WATER && from.resume());
      }
    }
    if (queued < HIGH_WATER && !to.writableNeedDrain) from.resume();
    if (queue.length) timer = setTimeout(drain, Math.max(0, queue[0].due - performance.now()));
    else if (ended) to.end();
  };
  from.on('data', (chunk) => {
    let due = performance.now() + DELAY;
    if (LOSS > 0 && Math.random() < LOSS) due += STALL;
    lastDue = Math.max(lastDue, due); // in order: nothing overtakes a held-back chunk
    queue.push({ chunk, due: lastDue });
    queued += chunk.length;
    if (queued >= HIGH_WATER) from.pause();
    if (!timer) timer = setTimeout(drain, Math.max(0, queue[0].due - performance.now()));
  });
  from.on('end', () => {
    ended = true;
    if (!queue.length && !timer) to.end();
  });
}

const server = createServer({ noDelay: true }, (client) => {
  const upstream = connect({ host: targetHost, port: Number(targetPort), noDelay: true });
  const close = () => {
    client.destroy();
    upstream.destroy();
  };
  client.on('error', close);
  upstream.on('error', close);
  client.on('close', () => setTimeout(close, DELAY + STALL + 50));
  upstream.on('close', () => setTimeout(close, DELAY + STALL + 50));
  pipe(client, upstream);
  pipe(upstream, client);
});
server.listen(Number(listenPort), listenHost, () => console.log(`proxy listening on ${listenHost}:${listenPort}`));
process.on('SIGTERM', () => process.exit(0));
