// Waiting for a step with a deadline, as the daemon's shutdown does: past
// it, `late` is told and the wait ends (the step may still finish later).

/** Resolves when p settles or after ms, whichever is first; `late` runs only in the second case. */
export async function within<T>(p: Promise<T>, ms: number, late: () => void): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const deadline = new Promise<void>((resolve) => {
    timer = setTimeout(() => { late(); resolve(); }, ms);
    timer.unref();
  });
  // The timer ends with the step: a step that finished in time is never
  // reported late because a later one was slow.
  try { await Promise.race([p, deadline]); } finally { clearTimeout(timer); }
}
