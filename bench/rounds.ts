// Ratios of paired rounds. The benches interleave their peers round by
// round, so two cells of one round ran close together: the median of the
// per-round ratios moves less with the machine's drift between rounds than
// best ÷ best does.

/** "m× (r1, r2, ...)": the median and the sorted ratios a[i] / b[i] over rounds both measured; `none` when no round was. */
export function medianOfRounds(a: number[], b: number[], none = '–'): string {
  const r: number[] = [];
  for (let i = 0; i < a.length; i++) {
    const x = a[i] / b[i];
    if (Number.isFinite(x)) r.push(x);
  }
  if (!r.length) return none;
  r.sort((u, v) => u - v);
  const h = r.length >> 1;
  const m = r.length % 2 ? r[h] : (r[h - 1] + r[h]) / 2;
  return `${m.toFixed(2)}× (rounds: ${r.map((x) => x.toFixed(2)).join(', ')})`;
}
