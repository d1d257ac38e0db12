/** The shapes that flow between the pipeline's stages. Positions are opaque: only the source knows what they mean. */

/** One record from a source: an event, or something unreadable that goes to the dead letters instead. */
export type SourceRecord<P> =
    | {
          position: P
          kind: 'event'
          event: Record<string, unknown>
          /** The event's JSON as read; sent byte for byte when no property is removed. */
          text?: string
          /** `text`'s size in UTF-8, when the source already knows it. */
          bytes?: number
      }
    | { position: P; kind: 'malformed'; reason: string; raw: string; line?: number | null }

/** A source yields its records in order, in chunks (a read, a page): one await per chunk, not per record. */
export type Source<P> = AsyncIterable<SourceRecord<P>[]>

/** An event ready to send: its JSON and its size in bytes, as the plugin's sender counts them. */
export interface Item<P> {
    position: P
    uuid: string
    json: string
    bytes: number
}

/** A source chunk after filtering and shaping: what to send, and the last record it covered. */
export interface ShapedChunk<P> {
    items: Item<P>[]
    last: P
}

/**
 * One request body's worth of items. `last` is the last record the batch covers: its last item, or a later
 * filtered or unreadable record. A batch may be empty when it only covers such records.
 */
export interface Batch<P> {
    items: Item<P>[]
    last: P
}

export interface DeadLetter<P> {
    position: P
    reason: string
    /** A refused event's JSON. */
    event?: string
    /** An unreadable record, as read. */
    raw?: string
    line?: number | null
}

export interface PipelineProgress {
    read: number
    delivered: number
    filtered: number
    deadLettered: number
    /** Unreadable records (dead-lettered too); the pipeline always reports it. */
    malformed?: number
    retries: number
    requests: number
    inFlight: number
}

export interface PipelineReport<P> extends PipelineProgress {
    malformed: number
    batches: number
    bytesSent: number
    /** The last position passed to `commit`, or null if it was never called. */
    committed: P | null
    /** Why the run stopped early, or null if it read everything. */
    stopped: string | null
    durationMs: number
}

/** The counters every stage adds to. */
export function emptyReport<P>(): PipelineReport<P> {
    return {
        read: 0,
        delivered: 0,
        filtered: 0,
        deadLettered: 0,
        malformed: 0,
        retries: 0,
        requests: 0,
        inFlight: 0,
        batches: 0,
        bytesSent: 0,
        committed: null,
        stopped: null,
        durationMs: 0,
    }
}
