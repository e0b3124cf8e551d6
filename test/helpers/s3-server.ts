// Starts s3rver (test/helpers/s3rver-main.js) in a child process. Returns
// null with the reason when it cannot (s3rver not installed), so a suite can
// print SKIP instead of passing without testing anything.
import { spawn, type ChildProcess } from 'child_process';
import * as path from 'path';

export interface S3Server { port: number; endpoint: string; child: ChildProcess; stop(): Promise<void> }

export function s3rverMissing(): string | null {
  try { require.resolve('s3rver'); return null; } catch { return 's3rver is not installed (npm devDependency; run npm ci)'; }
}

export function startS3Server(dir: string, bucket: string, port = 0): Promise<S3Server> {
  return new Promise((resolve, reject) => {
    // s3rver's ListObjectsV2 continuation tokens use DES, which OpenSSL 3
    // keeps in its legacy provider: without it every truncated list is a 500.
    const child = spawn(process.execPath, ['--openssl-legacy-provider', path.join(__dirname, 's3rver-main.js'), dir, bucket, String(port)],
      { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error('s3rver did not start in 20 s')); }, 20_000);
    child.on('exit', (code) => { clearTimeout(timer); reject(new Error(`s3rver exited with ${code} before listening`)); });
    child.stdout!.on('data', (d) => {
      out += d;
      const m = /LISTENING (\d+)/.exec(out);
      if (!m) return;
      clearTimeout(timer);
      const p = Number(m[1]);
      resolve({
        port: p, endpoint: `http://127.0.0.1:${p}`, child,
        stop: () => new Promise<void>((res) => {
          if (child.exitCode !== null || child.signalCode !== null) return res();
          child.once('exit', () => res());
          child.kill('SIGKILL');
        }),
      });
    });
  });
}
