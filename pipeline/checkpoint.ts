/**
 * Stage 5, the ordered checkpoint. Batches are opened in input order and acknowledged in any order; `commit`
 * hears only of the longest acknowledged prefix, so a crash can make a resume send a batch again but never skip
 * one. Commits run one at a time, in order; the first failing commit stops further ones and is reported.
 */

/** A batch acknowledged beyond the committed position: the records after `after`, up to and including `last`. */
export interface AheadRange<P> {
    after: P
    last: P
}

export type Commit<P> = (position: P, ahead: AheadRange<P>[]) => void | Promise<void>

interface Slot<P> {
    last: P
    acknowledged: boolean
}

export interface OrderedCheckpoint<P> {
    /** Registers the next batch in input order; returns the function that acknowledges it. */
    open: (last: P) => () => void
    /** The last position committed, or the start. */
    committed: () => P | undefined
    /** The first commit error, or null. */
    failure: () => Error | null
    /** Resolves once every commit so far has run; rejects with the first commit error. */
    settled: () => Promise<void>
}

/** `start` is the position already committed before this run (what the source resumes after), if any. */
export function orderedCheckpoint<P>(commit: Commit<P>, start?: P): OrderedCheckpoint<P> {
    const window: Slot<P>[] = []
    let committed = start
    let chain: Promise<void> = Promise.resolve()
    let failure: Error | null = null
    const advance = (): void => {
        while (window[0]?.acknowledged) {
            committed = (window.shift() as Slot<P>).last
        }
        if (committed === undefined) {
            return
        }
        const ahead: AheadRange<P>[] = []
        let after: P = committed
        for (const slot of window) {
            if (slot.acknowledged) {
                ahead.push({ after, last: slot.last })
            }
            after = slot.last
        }
        const position = committed
        chain = chain.then(async () => {
            if (failure === null) {
                await Promise.resolve(commit(position, ahead)).catch((error: unknown) => {
                    failure = error instanceof Error ? error : new Error(String(error))
                })
            }
        })
    }
    return {
        open: (last) => {
            const slot: Slot<P> = { last, acknowledged: false }
            window.push(slot)
            return () => {
                slot.acknowledged = true
                advance()
            }
        },
        committed: () => committed,
        failure: () => failure,
        settled: async () => {
            await chain
            if (failure !== null) {
                throw failure
            }
        },
    }
}
