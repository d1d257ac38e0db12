/**
 * Waiting out an outage, as a service must: a side (the webhook, PostHog) that keeps failing is retried with a
 * capped backoff for as long as the run's budget lasts (unlimited for `sync --follow`), and its state is kept for
 * the log, the progress line, the metrics and the health check. The policy is pure; `HealthState` only remembers.
 */
import { backoffDelay } from '../index'

/** The first retry of an outage waits up to this long (full jitter), each later one up to twice as long... */
export const OUTAGE_BACKOFF_BASE_MS = 1_000
/** ...but never more than a minute: a service notices within a minute that the other side is back. */
export const OUTAGE_BACKOFF_CAP_MS = 60_000
/** The shortest wait between two attempts: `Retry-After: 0` or a zero jitter must not become a tight loop. */
export const OUTAGE_MIN_WAIT_MS = 250
/**
 * A Retry-After is honoured up to this long; a longer one (a hostile or confused server asking for days) is
 * waited this long, then the request asks again.
 */
export const OUTAGE_RETRY_AFTER_MAX_MS = 15 * 60_000

/** How long to wait before retry `attempt` (from 0) of a failing side: its Retry-After, else a capped backoff. */
export function outageWaitMs(attempt: number, retryAfterMs: number | null, random: () => number): number {
    const wait =
        retryAfterMs === null
            ? backoffDelay(attempt, random, OUTAGE_BACKOFF_BASE_MS, OUTAGE_BACKOFF_CAP_MS)
            : Math.min(retryAfterMs, OUTAGE_RETRY_AFTER_MAX_MS)
    return Math.max(OUTAGE_MIN_WAIT_MS, wait)
}

/** Whether a wait still fits the budget (Infinity: it always does) counted from the outage's first failure. */
export function withinBudget(failingSinceMs: number, nowMs: number, waitMs: number, budgetMs: number): boolean {
    return nowMs + waitMs - failingSinceMs <= budgetMs
}

/** What changed when an attempt's outcome was recorded: a side went down, came back, or neither. */
export type HealthChange = { kind: 'down'; sinceMs: number; reason: string } | { kind: 'up'; downMs: number } | null

/** One side's state: up or failing since when, why, and when it last answered well. */
export class HealthState {
    failingSinceMs: number | null = null
    lastReason = ''
    lastOkMs: number | null = null
    /** Failed attempts since the last good one. */
    consecutiveFailures = 0

    get up(): boolean {
        return this.failingSinceMs === null
    }

    ok(nowMs: number): HealthChange {
        const since = this.failingSinceMs
        this.failingSinceMs = null
        this.consecutiveFailures = 0
        this.lastOkMs = nowMs
        return since === null ? null : { kind: 'up', downMs: nowMs - since }
    }

    failed(nowMs: number, reason: string): HealthChange {
        this.lastReason = reason
        this.consecutiveFailures++
        if (this.failingSinceMs !== null) {
            return null
        }
        this.failingSinceMs = nowMs
        return { kind: 'down', sinceMs: nowMs, reason }
    }
}

/** Resolves after `ms`, or at once (to false) when the signal aborts; true when the whole wait passed. */
export function waitUnlessAborted(ms: number, signal?: AbortSignal): Promise<boolean> {
    return new Promise((resolve) => {
        if (signal?.aborted) {
            resolve(false)
            return
        }
        const onAbort = (): void => {
            clearTimeout(timer)
            resolve(false)
        }
        const timer = setTimeout(() => {
            signal?.removeEventListener('abort', onAbort)
            resolve(true)
        }, ms)
        signal?.addEventListener('abort', onAbort, { once: true })
    })
}
