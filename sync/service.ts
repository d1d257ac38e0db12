/**
 * `sync` as a service: what its metrics, health check, progress fields and log lines read from the run (the
 * checkpoint's cursor, the last page, PostHog's health), kept apart from the command's flags and wiring.
 */
import { LogFields } from '../pipeline/cli-output'
import { HealthState } from '../pipeline/outage'
import { healthChangeLine } from '../pipeline/service'
import type { PageInfo } from './source'
import type { SyncProgress } from './sync'

/** What the run has seen, updated as it goes. */
export interface SyncWatch {
    posthog: HealthState
    webhook: HealthState | null
    /** The stored time (created_at, ms) of the event the checkpoint's cursor is on, or null before one. */
    committedMs: number | null
    page: PageInfo | null
    inFlight: number
}

export function newSyncWatch(startMs: number | null): SyncWatch {
    return { posthog: new HealthState(), webhook: null, committedMs: startMs, page: null, inFlight: 0 }
}

/**
 * How far behind now the feed is (ms): to the horizon once the last poll caught up with nothing left in flight (a
 * quiet project is not behind), else to the cursor's stored time, which stands still while the webhook is down.
 */
export function syncLagMs(watch: Pick<SyncWatch, 'committedMs' | 'page' | 'inFlight'>, nowMs: number): number | null {
    if (watch.page?.caughtUp && watch.inFlight === 0) {
        return Math.max(0, nowMs - watch.page.horizonMs)
    }
    return watch.committedMs === null ? null : Math.max(0, nowMs - watch.committedMs)
}

const isoOrNull = (ms: number | null | undefined): string | null => (ms == null ? null : new Date(ms).toISOString())

/** The progress line's values as JSON log fields. */
export function syncProgressFields(p: SyncProgress, watch: SyncWatch, elapsedMs: number, nowMs: number): LogFields {
    const lag = syncLagMs(watch, nowMs)
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
