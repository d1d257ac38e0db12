/**
 * Stage 4, K in flight: starts each batch's delivery in order and keeps at most `concurrency` of them out. While
 * the window is full it does not pull the next batch, so reading waits too: memory is bounded by the window.
 */

export interface WindowOptions<B> {
    concurrency: number
    /** Delivers one batch; resolves when it is settled. Called in input order. */
    send: (batch: B) => Promise<void>
    /** Checked before each batch is started: once true, nothing more is sent or read. */
    stopping: () => boolean
    /** Told how many batches are out after each change. */
    onInFlight?: (count: number) => void
}

/** Runs until the batches run out or `stopping()` turns true; always waits for the batches in flight. */
export async function runWindow<B>(batches: AsyncIterable<B>, options: WindowOptions<B>): Promise<void> {
    const inFlight = new Set<Promise<void>>()
    try {
        for await (const batch of batches) {
            while (inFlight.size >= options.concurrency) {
                await Promise.race(inFlight)
            }
            if (options.stopping()) {
                // Not started, so never acknowledged: the checkpoint stays before it and a resume sends it.
                break
            }
            const task: Promise<void> = options.send(batch).finally(() => {
                inFlight.delete(task)
                options.onInFlight?.(inFlight.size)
            })
            inFlight.add(task)
            options.onInFlight?.(inFlight.size)
        }
    } finally {
        // On a source error too: what is already out finishes and is acknowledged before the error surfaces.
        await Promise.allSettled(inFlight)
    }
}
