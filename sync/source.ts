/**
 * The PostHog source: pages through the events table by the cursor and yields each page as one chunk of records
 * for the delivery pipeline. Without `follow` it ends once the horizon reaches `untilMs`; with it, it polls.
 * It knows nothing of batching or delivery: the pipeline hands positions back to the checkpoint.
 */
import type { SourceRecord } from '../pipeline/types'
import { abortableSleep, AbortedError, QueryResponse } from './posthog'
import { buildPageQuery, Cursor, cursorAfter, cursorAfterShortPage, FUTURE_WINDOW_MS, scanUpperMs } from './query'
import { PageRow, PersonShape, RowColumns, rowColumns, RowError, rowToEvent } from './rows'

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
/** Rows per chunk of a page, when the caller does not choose. */
export const DEFAULT_CHUNK_ROWS = 2_000
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
    /**
     * Rows turned into records at a time (see `pageChunks`). The pipeline flushes a partial batch at the end of
     * each chunk, so sync makes this a multiple of the batch size.
     */
    chunkRows?: number
    allowedEvents: readonly string[] | null
    excludedEvents: readonly string[]
    /** With `--with-person`: read each event's person in the same query, and shape it so. */
    person?: PersonShape | null
    /** `--where`: a HogQL boolean expression every page's query ANDs in (see `buildPageQuery`). */
    where?: string | null
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

/** The part of a page the source turns into records at a time. */
export interface RowRange {
    from: number
    to: number
    columns: RowColumns
}

/** Rows [from, to) of a page as pipeline records; a row that cannot be read becomes a dead letter, not a gap. */
export function pageRecords(
    response: QueryResponse,
    range: RowRange,
    teamId: number,
    previous: Cursor,
    keepText = false,
    person: PersonShape | null = null
): SourceRecord<Cursor>[] {
    const { columns } = range
    const records: SourceRecord<Cursor>[] = []
    let cursor = previous
    for (let index = range.from; index < range.to; index++) {
        const item = response.row(index)
        const row = Array.isArray(item) ? (item as unknown[]) : [item]
        let read: PageRow
        try {
            read = rowToEvent(row, columns, teamId, keepText, person)
        } catch (error) {
            // The key columns alone still place the row, so the cursor moves past it and it is not lost silently.
            cursor = rowKey(row, columns, error)
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
                ? { position: cursor, kind: 'event', event, text: read.text, bytes: read.bytes }
                : { position: cursor, kind: 'event', event }
        )
    }
    return records
}

/** A row's key, from its key columns alone; `otherwise` is thrown if they cannot be read. */
function rowKey(row: readonly unknown[], columns: RowColumns, otherwise: unknown): Cursor {
    const ms = Number(row[columns.created_at_ms])
    const uuid = row[columns.uuid]
    if (!Number.isSafeInteger(ms) || typeof uuid !== 'string') {
        throw otherwise
    }
    return { ms, uuid }
}

/** Where a page ends: its last row's key, read ahead of the rest so the next query can go out at once. */
export function pageEnd(response: QueryResponse, columns: RowColumns): Cursor | null {
    if (response.rowCount === 0) {
        return null
    }
    const item = response.row(response.rowCount - 1)
    const row = Array.isArray(item) ? (item as unknown[]) : [item]
    return rowKey(row, columns, new RowError(`the last row of a page has no readable uuid or created_at`))
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
                withPerson: Boolean(options.person),
                where: options.where,
            })
        )
        // Awaited by the source; until then a failure must not count as unhandled.
        response.catch(() => undefined)
        return { response, from, upperMs, horizonMs }
    }
}

/**
 * A page's records, a chunk of rows at a time: only the chunk being shaped and the batches in flight are ever
 * strings and objects; the rest of the page waits as bytes.
 */
function* pageChunks(
    response: QueryResponse,
    columns: RowColumns,
    pageStart: Cursor,
    options: SourceOptions
): Generator<SourceRecord<Cursor>[]> {
    const chunkRows = options.chunkRows ?? DEFAULT_CHUNK_ROWS
    let previous = pageStart
    for (let from = 0; from < response.rowCount; from += chunkRows) {
        const to = Math.min(response.rowCount, from + chunkRows)
        const range = { from, to, columns }
        const records = pageRecords(response, range, options.teamId, previous, options.keepText, options.person)
        previous = records[records.length - 1]?.position ?? previous
        yield records
    }
}

/**
 * Pages of records, in key order, from the cursor on. `scan` is where the next query starts: the last record's
 * key, or, after a short page, the end of the range that page covered. Only record positions reach the
 * checkpoint, so a resume may re-scan an empty range, never skip a full one. After a full page the next query is
 * sent as soon as the page's last row is read, before any of its rows is handed on: one query in flight, and two
 * pages in memory at most, both as bytes but for the chunk being shaped (see `pageChunks`).
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
        let caughtUp: boolean
        try {
            const columns = rowColumns(response.columns)
            const pageStart = scan
            scan = pageEnd(response, columns) ?? scan
            // With a LIMIT, PostHog returns min(LIMIT, 50,000) rows and no hasMore: a full page may have more.
            const full = response.rowCount >= pageSize || response.hasMore === true
            stepMs = nextScanStep(full ? 'full' : 'short', scan.ms - from.ms, maxStepMs)
            if (full) {
                next = plan(scan, stepMs)
            } else {
                scan = cursorAfterShortPage(scan, upperMs)
            }
            caughtUp = !full && upperMs >= horizonMs
            options.onPage?.({ rows: response.rowCount, cursor: scan, horizonMs, caughtUp })
            yield* pageChunks(response, columns, pageStart, options)
        } finally {
            response.release()
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
