// Opening one TCP connection with a timeout and errors that say which endpoint failed and how.

import { connect as netConnect, type Socket } from 'node:net';
import { MigrationTransportError, describeSocketError } from './errors.ts';

export async function connectSocket(host: string, port: number, timeoutMs: number, signal?: AbortSignal): Promise<Socket> {
  return await new Promise<Socket>((resolve, reject) => {
    if (signal?.aborted) return reject(new MigrationTransportError('closed', `connecting to ${host}:${port} was cancelled`));
    const socket = netConnect({ host, port });
    const onAbort = () => {
      clearTimeout(timer);
      socket.destroy();
      reject(new MigrationTransportError('closed', `connecting to ${host}:${port} was cancelled`));
    };
    signal?.addEventListener('abort', onAbort, { once: true });
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', onAbort);
      socket.destroy();
      reject(new MigrationTransportError('connect-timeout', `destination ${host}:${port} did not accept the connection within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      socket.removeAllListeners('error');
      resolve(socket);
    });
    socket.once('error', (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      signal?.removeEventListener('abort', onAbort);
      socket.destroy();
      if (e.code === 'ECONNREFUSED') {
        reject(new MigrationTransportError('connect-refused', `destination ${host}:${port} refused the connection`));
      } else {
        reject(new MigrationTransportError('connect-failed', `cannot connect to destination ${host}:${port}: ${describeSocketError(e)}`));
      }
    });
  });
}

/** A promise that resolves on the next notify(); many waiters may share one. */
export class Signal {
  private waiters: (() => void)[] = [];

  notify = (): void => {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  };

  wait(): Promise<void> {
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }
}
