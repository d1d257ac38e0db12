/**
 * `sync` as a service: what its metrics, health check, progress fields and log lines read from the run (the
 * checkpoint's cursor, the last page, PostHog's health), kept apart from the command's flags and wiring.
 */
import { LogFields } from '../pipeline/cli-output'
import { HealthState } from '../pipeline/outage'
import { healthChangeLine } from '../pipeline/service'
import type { Cursor } from './query'
import type { PageInfo } from './source'
import type { SyncProgress } from './sync'

/**
 * The keys of the rows read and not yet committed, oldest first, kept in the chunks the source yielded: the lag
 * counts from the oldest. Commits come in read order, each on the key of a row read, so a commit drops every row
 * up to and including its own; keys are only ever compared for equality (ClickHouse orders uuids its own way).
 * Bounded by the pipeline's window: rows are only read while batches can go out.
 */
export class WaitingRows {
    private readonly chunks: Cursor[][] = []
    /** Where the oldest waiting row is in the first chunk. */
    private next = 0

    /** Takes the array as it is: the caller hands over a fresh one per chunk. */
    read(keys: Cursor[]): void {
        if (keys.length > 0) {
            this.chunks.push(keys)
        }
    }

    committed(key: Cursor): void {
        while (this.chunks.length > 0) {
            const chunk = this.chunks[0] as Cursor[]
            const at = chunk.findIndex((row, index) => index >= this.next && row.ms === key.ms && row.uuid === key.uuid)
            if (at === -1) {
                // Committed in a later chunk: all of this one is done.
                this.chunks.shift()
                this.next = 0
                continue
            }
            if (at === chunk.length - 1) {
                this.chunks.shift()
                this.next = 0
            } else {
                this.next = at + 1
            }
            return
        }
    }

    /** The oldest row read and not yet committed, or null when every row read is committed. */
    get oldest(): Cursor | null {
        return this.chunks[0]?.[this.next] ?? null
    }
}

/** What the run has seen, updated as it goes. */
export interface SyncWatch {
    posthog: HealthState
    webhook: HealthState | null
    /** The stored time (created_at, ms) of the event the checkpoint's cursor is on, or null before one. */
    committedMs: number | null
    page: PageInfo | null
    waiting: WaitingRows
}

export function newSyncWatch(startMs: number | null): SyncWatch {
    return { posthog: new HealthState(), webhook: null, committedMs: startMs, page: null, waiting: new WaitingRows() }
}

/** What the lag is read from: the watch's parts, with only the stored time of the oldest waiting row. */
export interface LagInputs {
    committedMs: number | null
    page: Pick<PageInfo, 'caughtUp' | 'horizonMs'> | null
    oldestWaitingMs: number | null
}

/**
 * How far behind now the feed is (ms). While rows read wait for the webhook, to the oldest of them: it stands
 * still through an outage, from the first batch of a run on. With nothing waiting, to the horizon once the last
 * poll caught up (a quiet project is not behind), else to the cursor's stored time. Null while nothing is known
 * (a first run before its first page): unknown, never 0.
 */
export function syncLagMs(inputs: LagInputs, nowMs: number): number | null {
    const since = inputs.oldestWaitingMs ?? (inputs.page?.caughtUp ? inputs.page.horizonMs : null) ?? inputs.committedMs
    return since === null ? null : Math.max(0, nowMs - since)
}

/** The lag of a run from its watch. */
export function watchLagMs(watch: SyncWatch, nowMs: number): number | null {
    return syncLagMs({ ...watch, oldestWaitingMs: watch.waiting.oldest?.ms ?? null }, nowMs)
}

const isoOrNull = (ms: number | null | undefined): string | null => (ms == null ? null : new Date(ms).toISOString())

/** The progress line's values as JSON log fields. */
export function syncProgressFields(p: SyncProgress, watch: SyncWatch, elapsedMs: number, nowMs: number): LogFields {
    const lag = watchLagMs(watch, nowMs)
    return {
        read: p.read,
        delivered: p.delivered,
        events_per_second: Math.round(p.delivered / Math.max(elapsedMs / 1000, 0.001)),
        cursor: isoOrNull(p.cursorMs),
        caught_up: p.caughtUp,
        lag_seconds: lag === null ? null : Math.round(lag / 1000),
        queries: p.queries,
        retries: p.retries + p.queryRetries,
        failures: p.deadLettered,
        in_flight: p.inFlight,
        webhook_failing_since: isoOrNull(watch.webhook?.failingSinceMs),
        posthog_failing_since: isoOrNull(watch.posthog.failingSinceMs),
    }
}

/** Records one query's outcome in PostHog's health; returns the line to log when it went down or came back. */
export function postHogOutcome(watch: SyncWatch, ok: boolean, reason: string, nowMs: number): string | null {
    const change = ok ? watch.posthog.ok(nowMs) : watch.posthog.failed(nowMs, reason)
    return healthChangeLine('PostHog', change)
}
