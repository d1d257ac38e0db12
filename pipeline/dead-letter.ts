/**
 * The dead-letter file, one format for every command: JSON Lines, one object per line, appended as it happens.
 *
 *   {"reason":"HTTP 400: ...","event":{...the refused event as it would have been sent...}}
 *   {"reason":"line 7: not valid JSON","line":7,"raw":"the unreadable record as read"}
 *
 * `line` is the record's line in the input when the source has lines (replay), else null (sync).
 */
import { appendFileSync } from 'node:fs'

import type { DeadLetter } from './types'

/** One dead letter as its line of JSON (without the newline). */
export function deadLetterLine(entry: Pick<DeadLetter<unknown>, 'reason' | 'event' | 'raw' | 'line'>): string {
    const { reason, event, raw, line } = entry
    // The event's JSON is written as it is: it was serialised once for sending and is valid JSON.
    return event !== undefined
        ? `{"reason":${JSON.stringify(reason)},"event":${event}}`
        : JSON.stringify({ reason, line: line ?? null, raw: raw ?? '' })
}

/** The pipeline's `deadLetter` stage for a file, or a no-op without one (the summary still counts them). */
export function deadLetterWriter<P>(file: string | null | undefined): (entry: DeadLetter<P>) => void {
    return (entry) => {
        if (file) {
            appendFileSync(file, deadLetterLine(entry) + '\n')
        }
    }
}
