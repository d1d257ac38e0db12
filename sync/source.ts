/**
 * The PostHog source: pages through the events table by the cursor and yields each page as one chunk of records
 * for the delivery pipeline. Without `follow` it ends once the horizon reaches `untilMs`; with it, it polls.
 * It knows nothing of batching or delivery: the pipeline hands positions back to the checkpoint.
 */
import type { SourceRecord } from '../pipeline/types'
import { abortableSleep, AbortedError, QueryResponse } from './posthog'
import { buildPageQuery, Cursor, cursorAfter, cursorAfterShortPage, FUTURE_WINDOW_MS, scanUpperMs } from './query'
import { columnIndexes, PageRow, rowToEvent } from './rows'

/** Delay kept behind now so that events still being written are not passed over (see the README). */
export const DEFAULT_LAG_MS = 60_000
/** Pause between polls once caught up, with --follow. Lag + poll + one page stays under two minutes. */
export const DEFAULT_POLL_INTERVAL_MS = 15_000
/** How long before its created_at an event's own timestamp may be and still be read (late arrivals). */
export const DEFAULT_LATE_WINDOW_MS = 7 * 24 * 3600 * 1000
/**
 * Events per query. PostHog allows 50,000; 10,000 keeps two pages (the one being delivered and the one
 * prefetched) well within the sync's memory ceiling, and at 200 queries a minute reads 2,000,000 events a minute.
 */
export const DEFAULT_PAGE_SIZE = 10_000
/** The created_at span one query covers at most (see `scanUpperMs`). */
export const DEFAULT_SCAN_STEP_MS = 24 * 3600 * 1000
/** The smallest created_at span a query is narrowed to. */
export const MIN_SCAN_STEP_MS = 1_000

/**
 * The created_at span for the next query, from what the last one found. A full page that covered `spanMs` means
 * about a page per `spanMs`: twice that keeps the next query's range to about two pages of rows, so ClickHouse
 * reads and sorts a little more than a page, not everything stored since. A short page before the horizon means
 * the rest may be sparse: the next query goes wide again, and a full page narrows it. Only the upper bound moves,
 * so this changes cost, never what is read.
 */
export function nextScanStep(page: 'full' | 'short', spanMs: number, maxMs: number): number {
    return page === 'full' ? Math.min(maxMs, Math.max(MIN_SCAN_STEP_MS, 2 * spanMs)) : maxMs
}

export interface SourceOptions {
    run: (hogql: string) => Promise<QueryResponse>
    start: Cursor
    teamId: number
    follow: boolean
    /** Without follow: the run ends once every event with created_at below this is read. */
    untilMs: number | null
    lagMs?: number
    pollIntervalMs?: number
    lateWindowMs?: number
    pageSize?: number
    scanStepMs?: number
    /**
     * Send PostHog's properties text as is (no parse, no re-serialise) where nothing in it must change: true when
     * no property is excluded.
     */
    keepText?: boolean
    /** Called once a page's response is read into records and dropped (the CLI collects garbage there). */
    afterPage?: () => void
    allowedEvents: readonly string[] | null
    excludedEvents: readonly string[]
    now?: () => number
    sleep?: (ms: number, signal?: AbortSignal) => Promise<void>
    signal?: AbortSignal
    /** After each page: where the cursor is and whether the feed has caught up with the horizon. */
    onPage?: (page: PageInfo) => void
}

export interface PageInfo {
    rows: number
    cursor: Cursor
    horizonMs: number
    caughtUp: boolean
}

/** The horizon for the next page: now minus the lag, never past --until. */
export function horizonFor(nowMs: number, lagMs: number, untilMs: number | null): number {
    const live = nowMs - lagMs
    return untilMs === null ? live : Math.min(live, untilMs)
}

/** A page's rows as pipeline records; a row that cannot be read becomes a dead letter, not a gap. */
export function pageRecords(
    response: QueryResponse,
    teamId: number,
    previous: Cursor,
    keepText = false
): SourceRecord<Cursor>[] {
    const at = columnIndexes(response.columns, ['uuid', 'event', 'distinct_id', 'properties'])
    const keyAt = columnIndexes(response.columns, ['uuid', 'created_at_ms'])
    const optional = (name: string): number => response.columns.indexOf(name)
    const columns = {
        ...at,
        ...keyAt,
        timestamp_ms: optional('timestamp_ms'),
        timestamp: optional('timestamp'),
        elements_chain: optional('elements_chain'),
    }
    const records: SourceRecord<Cursor>[] = []
    let cursor = previous
    for (const item of response.rows) {
        const row = Array.isArray(item) ? (item as unknown[]) : [item]
        let read: PageRow
        try {
            read = rowToEvent(row, columns, teamId, keepText)
        } catch (error) {
            // The key columns alone still place the row, so the cursor moves past it and it is not lost silently.
            const ms = Number(row[keyAt.created_at_ms ?? -1])
            const uuid = row[keyAt.uuid ?? -1]
            if (!Number.isSafeInteger(ms) || typeof uuid !== 'string') {
                throw error
            }
            cursor = { ms, uuid }
            records.push({
                position: cursor,
                kind: 'malformed',
                reason: (error as Error).message,
                raw: JSON.stringify(row),
            })
            continue
        }
        cursor = cursorAfter(cursor, { createdAtMs: read.createdAtMs, uuid: read.event.uuid })
        const event = read.event as unknown as Record<string, unknown>
        records.push(
            read.text
                ? { position: cursor, kind: 'event', event, text: read.text }
                : { position: cursor, kind: 'event', event }
        )
    }
    return records
}

interface PagePlan {
    response: Promise<QueryResponse>
    from: Cursor
    upperMs: number
    horizonMs: number
}

/** Resolves to the value, or to null once the run is interrupted (AbortedError): the source then just ends. */
async function unlessAborted<T>(promise: Promise<T>): Promise<T | null> {
    try {
        return await promise
    } catch (error) {
        if (error instanceof AbortedError) {
            return null
        }
        throw error
    }
}

/** Sends the query for the page after `from`, with the horizon as of now and the current scan step. */
function pagePlanner(options: SourceOptions) {
    const now = options.now ?? (() => Date.now())
    return (from: Cursor, stepMs: number): PagePlan => {
        const horizonMs = horizonFor(now(), options.lagMs ?? DEFAULT_LAG_MS, options.follow ? null : options.untilMs)
        const upperMs = scanUpperMs(from, horizonMs, stepMs)
        const response = options.run(
            buildPageQuery({
                cursor: from,
                upperMs,
                lateWindowMs: options.lateWindowMs ?? DEFAULT_LATE_WINDOW_MS,
                futureWindowMs: FUTURE_WINDOW_MS,
                pageSize: options.pageSize ?? DEFAULT_PAGE_SIZE,
                allowedEvents: options.allowedEvents,
                excludedEvents: options.excludedEvents,
            })
        )
        // Awaited by the source; until then a failure must not count as unhandled.
        response.catch(() => undefined)
        return { response, from, upperMs, horizonMs }
    }
}

/**
 * Pages of records, in key order, from the cursor on. `scan` is where the next query starts: the last record's
 * key, or, after a short page, the end of the range that page covered. Only record positions reach the
 * checkpoint, so a resume may re-scan an empty range, never skip a full one. After a full page the next query is
 * sent at once, while the pipeline delivers this one: one query in flight, two pages in memory at most.
 */
export async function* posthogSource(options: SourceOptions): AsyncGenerator<SourceRecord<Cursor>[]> {
    const sleep = options.sleep ?? abortableSleep
    const pageSize = options.pageSize ?? DEFAULT_PAGE_SIZE
    const maxStepMs = options.scanStepMs ?? DEFAULT_SCAN_STEP_MS
    const plan = pagePlanner(options)
    let stepMs = maxStepMs
    let scan = options.start
    let next: PagePlan | null = null
    while (!options.signal?.aborted) {
        const { response: pending, from, upperMs, horizonMs } = next ?? plan(scan, stepMs)
        next = null
        const response = await unlessAborted(pending)
        if (!response) {
            return
        }
        const records = pageRecords(response, options.teamId, scan, options.keepText ?? false)
        options.afterPage?.()
        scan = records[records.length - 1]?.position ?? scan
        // With a LIMIT, PostHog returns min(LIMIT, 50,000) rows and no hasMore: a full page may have more.
        const full = records.length >= pageSize || response.hasMore === true
        stepMs = nextScanStep(full ? 'full' : 'short', scan.ms - from.ms, maxStepMs)
        if (full) {
            next = plan(scan, stepMs)
        } else {
            scan = cursorAfterShortPage(scan, upperMs)
        }
        const caughtUp = !full && upperMs >= horizonMs
        options.onPage?.({ rows: records.length, cursor: scan, horizonMs, caughtUp })
        if (records.length > 0) {
            yield records
        }
        if (caughtUp && !options.follow && options.untilMs !== null && horizonMs >= options.untilMs) {
            return
        }
        // Caught up with the horizon: wait for it to move (following, or --until still ahead of now - lag).
        if (
            caughtUp &&
            (await unlessAborted(sleep(options.pollIntervalMs ?? DEFAULT_POLL_INTERVAL_MS, options.signal))) === null
        ) {
            return
        }
    }
}
