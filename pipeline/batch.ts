/**
 * Stage 3, batch: groups items into request bodies bounded by count and bytes. Where a batch ends is decided by
 * the plugin's own `takeCount`, so replay, sync and the plugin cannot disagree on the array-size rule.
 */
import { takeCount } from '../index'
import { Batch, Item, ShapedChunk } from './types'

export interface BatchLimits {
    maxBatchEvents: number
    maxBatchBytes: number
}

/** A JSON array of these items: brackets, the items, and a comma between each two. */
export function bodyBytes(items: readonly Item<unknown>[]): number {
    return items.reduce((sum, item) => sum + item.bytes, 2) + Math.max(items.length - 1, 0)
}

/**
 * Yields batches in input order. A batch closes as soon as it is full; with `flushEachChunk` also at the end of
 * every chunk; otherwise the rest goes at the end. Records that only end in no item (filtered, unreadable) are
 * covered by the next batch, or by an empty one when nothing is pending, so a checkpoint can move past them.
 */
export async function* batchItems<P>(
    chunks: AsyncIterable<ShapedChunk<P>>,
    limits: BatchLimits,
    flushEachChunk = false
): AsyncGenerator<Batch<P>> {
    let pending: Item<P>[] = []
    let sizes: number[] = []
    let pendingBytes = 0
    // Whether records were read since the last batch that no batch covers yet.
    let uncovered = false
    let lastRead: P | undefined
    const cut = (count: number, last?: P): Batch<P> => {
        const items = pending.slice(0, count)
        pending = pending.slice(count)
        sizes = sizes.slice(count)
        pendingBytes -= items.reduce((sum, item) => sum + item.bytes, 0)
        const end = last ?? (items[items.length - 1] as Item<P>).position
        uncovered = end !== lastRead
        return { items, last: end }
    }
    for await (const chunk of chunks) {
        lastRead = chunk.last
        uncovered = true
        for (const item of chunk.items) {
            pending.push(item)
            sizes.push(item.bytes)
            pendingBytes += item.bytes
            const overflowing = pending.length > 1 && 2 + pendingBytes + pending.length - 1 > limits.maxBatchBytes
            if (pending.length >= limits.maxBatchEvents || overflowing) {
                yield cut(takeCount(sizes, limits.maxBatchEvents, limits.maxBatchBytes))
            }
        }
        if ((flushEachChunk || pending.length === 0) && uncovered) {
            yield cut(pending.length, chunk.last)
        }
    }
    if (lastRead !== undefined && (pending.length > 0 || uncovered)) {
        yield cut(pending.length, lastRead)
    }
}
