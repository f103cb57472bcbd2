/**
 * Runs `start()`'s function over every item with at most `workers` of them
 * in flight (each worker calls `start` once, for state of its own such as
 * a buffer); waits for every worker even when one fails, then throws the
 * first failure.
 */
export async function forEachConcurrently<T>(
  items: readonly T[],
  workers: number,
  start: () => (item: T, index: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    const each = start();
    while (next < items.length) {
      const i = next++;
      await each(items[i], i);
    }
  };
  const results = await Promise.allSettled(
    Array.from({ length: Math.min(workers, items.length) }, worker),
  );
  const failed = results.find((r) => r.status === "rejected");
  if (failed) throw (failed as PromiseRejectedResult).reason;
}
