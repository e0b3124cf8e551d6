// Group commit: callers that need a file's writes on disk share one sync.
// A sync already running may have started before a caller's write, so that
// caller waits for the next one, which every caller arriving meanwhile shares.
export class GroupSync {
  private running: Promise<void> | null = null;
  private next: Promise<void> | null = null;

  constructor(private readonly run: () => Promise<unknown>) {}

  /** Resolves once everything written before the call is on disk. */
  sync(): Promise<void> {
    if (this.next) return this.next;
    const p: Promise<void> = (this.running ?? Promise.resolve()).catch(() => {}).then(() => {
      this.next = null;
      this.running = p;
      return this.run();
    }).then(() => {}).finally(() => { if (this.running === p) this.running = null; });
    this.next = p;
    return p;
  }
}
