/**
 * The cursor and the HogQL page query: pure functions, no I/O.
 *
 * Events are read in the order of the key (created_at in whole milliseconds, uuid), where created_at is when
 * PostHog stored the event and uuid breaks ties in ClickHouse's own UUID order. A page is "every event with a
 * key above the cursor and a created_at below the horizon, the first N in key order". See the README
 * ("Today's PostHog: the cursor") for why this never skips and never repeats.
 */

/** Where the feed stands: every event with a key at or below this one is delivered (or deliberately skipped). */
export interface Cursor {
    /** created_at of the last event passed, in milliseconds since the epoch, as ClickHouse truncates it. */
    ms: number
    /**
     * uuid of the last event passed, exactly as PostHog returned it. null means "nothing at `ms` passed yet":
     * the next page starts at `ms` inclusive (a fresh start from --since).
     */
    uuid: string | null
}

export interface PageQueryInput {
    cursor: Cursor
    /**
     * Only events with created_at strictly below this (ms) are read: now minus the lag, --until, or the end of
     * the current scan step, whichever comes first.
     */
    upperMs: number
    /** How far an event's own timestamp may lie before its created_at (late arrival), in ms. */
    lateWindowMs: number
    /** How far ahead of created_at a timestamp may be: PostHog replaces timestamps over 23 h ahead of capture. */
    futureWindowMs: number
    pageSize: number
    allowedEvents: readonly string[] | null
    excludedEvents: readonly string[]
    /** Read each event's person (id and properties) in the same query: `--with-person`. */
    withPerson?: boolean
    /** A HogQL boolean expression PostHog filters on (`--where`), checked by `whereProblem` first. */
    where?: string | null
}

/** Rows PostHog's query API returns at most per query, with an explicit LIMIT (see the README for the source). */
export const MAX_QUERY_ROWS = 50_000
/** PostHog replaces an event timestamp more than 23 hours after capture with the capture time. */
export const FUTURE_WINDOW_MS = 24 * 3600 * 1000

/** The columns read, in order; `rowToEvent` relies on these names. */
export const PAGE_COLUMNS = [
    'uuid',
    'event',
    'distinct_id',
    'timestamp_ms',
    'properties',
    'elements_chain',
    'created_at_ms',
] as const

/** The person's columns, read after the event's with `--with-person`. */
export const PERSON_COLUMNS = ['person_id', 'person_properties'] as const

/**
 * The persons-on-events mode every query asks for (a HogQL query modifier, which takes precedence over the
 * project's own setting). With it `person_id` and `person.properties` are the columns PostHog's ingestion wrote on
 * the event: the person as it was when the event was stored, which is what PostHog's HTTP Webhook destination
 * sends (it reads the same row), and no join with the persons tables, so a page costs the same scan as without.
 * The other modes join the person overrides (and, for properties "now", the persons table) on every page.
 */
export const PERSONS_ON_EVENTS_MODE = 'person_id_no_override_properties_on_events'

const UUID_PATTERN = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** A HogQL string literal: backslashes and single quotes escaped, as HogQL's lexer reads them. */
export function hogqlString(value: string): string {
    return `'${value.replace(/\\/g, '\\\\').replace(/'/g, "\\'")}'`
}

function wholeNumber(name: string, value: number): string {
    if (!Number.isSafeInteger(value)) {
        throw new Error(`${name} must be a whole number, got ${String(value)}`)
    }
    return String(value)
}

/** The key comparison "(created_at_ms, uuid) > cursor", written out so ClickHouse compares the UUIDs itself. */
export function afterCursor(cursor: Cursor): string {
    const ms = wholeNumber('cursor.ms', cursor.ms)
    const createdMs = 'toUnixTimestamp64Milli(created_at)'
    if (cursor.uuid === null) {
        return `${createdMs} >= ${ms}`
    }
    if (!UUID_PATTERN.test(cursor.uuid)) {
        throw new Error(`cursor.uuid is not a UUID: ${JSON.stringify(cursor.uuid)}`)
    }
    // ClickHouse orders UUIDs by their second half first, unlike their text: never compare them as strings here.
    return `(${createdMs} > ${ms} OR (${createdMs} = ${ms} AND uuid > toUUID(${hogqlString(cursor.uuid)})))`
}

/**
 * The HogQL query for the next page. The timestamp range only lets ClickHouse skip partitions and granules
 * (events are partitioned and sorted by their timestamp); the key and the horizon decide what a page holds.
 */
export function buildPageQuery(input: PageQueryInput): string {
    const pageSize = Number(wholeNumber('pageSize', input.pageSize))
    if (pageSize < 1 || pageSize > MAX_QUERY_ROWS) {
        throw new Error(`pageSize must be between 1 and ${MAX_QUERY_ROWS}, got ${pageSize}`)
    }
    const fromSeconds = Math.floor((input.cursor.ms - input.lateWindowMs) / 1000)
    const toSeconds = Math.ceil((input.upperMs + input.futureWindowMs) / 1000)
    const where = [
        `timestamp >= toDateTime(${wholeNumber('from', fromSeconds)})`,
        `timestamp < toDateTime(${wholeNumber('to', toSeconds)})`,
        `toUnixTimestamp64Milli(created_at) < ${wholeNumber('upperMs', input.upperMs)}`,
        afterCursor(input.cursor),
    ]
    if (input.allowedEvents) {
        where.push(`event IN (${input.allowedEvents.map(hogqlString).join(', ')})`)
    }
    if (input.excludedEvents.length > 0) {
        where.push(`event NOT IN (${input.excludedEvents.map(hogqlString).join(', ')})`)
    }
    if (input.where) {
        // Last, and alone in its parentheses: an AND of the conditions above and this one, whatever it says
        // (`whereProblem` made sure it cannot close them early).
        where.push(`(\n    ${input.where}\n)`)
    }
    return [
        // Datetimes as integer milliseconds: no time zone, no text to parse, and the plugin's precision.
        'SELECT uuid, event, distinct_id, toUnixTimestamp64Milli(timestamp) AS timestamp_ms, properties,',
        `    elements_chain, toUnixTimestamp64Milli(created_at) AS created_at_ms${input.withPerson ? ',' : ''}`,
        ...(input.withPerson ? ['    person_id, person.properties AS person_properties'] : []),
        'FROM events',
        `WHERE ${where.join('\n    AND ')}`,
        'ORDER BY created_at_ms ASC, uuid ASC',
        `LIMIT ${pageSize}`,
    ].join('\n')
}

/** The cursor after a page: the key of its last row. Rows come back in key order, so that is the highest. */
export function cursorAfter(cursor: Cursor, last: { createdAtMs: number; uuid: string } | undefined): Cursor {
    return last ? { ms: last.createdAtMs, uuid: last.uuid } : cursor
}

/**
 * Where the next query's created_at range ends. It never passes the horizon, and never lies more than one step
 * past the cursor: events are stored at most a day after their timestamp's future limit, so a bounded created_at
 * range bounds the timestamp range too, and a backfill from long ago scans a few days of partitions per query,
 * not everything up to now.
 */
export function scanUpperMs(cursor: Cursor, horizonMs: number, stepMs: number): number {
    return Math.min(horizonMs, cursor.ms + stepMs)
}

/**
 * After a short page (fewer rows than the limit), every event with a key above the cursor and created_at below
 * `upperMs` has been read, so the scan may start at `upperMs` itself: the cursor "from upperMs, inclusive".
 */
export function cursorAfterShortPage(cursor: Cursor, upperMs: number): Cursor {
    return upperMs > cursor.ms ? { ms: upperMs, uuid: null } : cursor
}

/**
 * The query that tries a --where once at start: a page's own text (columns, filters, the expression) over an empty
 * created_at range, so PostHog parses, resolves and plans it as it will every page, and reads nothing.
 */
export function buildProbeQuery(input: Omit<PageQueryInput, 'upperMs' | 'pageSize'>): string {
    const start = { ms: input.cursor.ms, uuid: null }
    return buildPageQuery({ ...input, cursor: start, upperMs: start.ms, pageSize: 1 })
}

/** Where a quoted string or identifier that opens at `at` closes (its index), or -1 if it never does. */
function closingQuote(text: string, at: number): number {
    const quote = text[at]
    for (let i = at + 1; i < text.length; i++) {
        if (text[i] === '\\') {
            i++
        } else if (text[i] === quote) {
            if (text[i + 1] !== quote) {
                return i
            }
            i++ // a doubled quote stands for one
        }
    }
    return -1
}

/**
 * Why a --where text could reach outside the parentheses it is put in (and so change the cursor's conditions), or
 * null when it cannot: its parentheses balance outside strings and quoted names, and it has no comment or `;`
 * that could hide the closing one. Whether it is valid HogQL is PostHog's to say (the probe query).
 */
export function whereProblem(text: string): string | null {
    if (text.trim() === '') {
        return 'is empty'
    }
    let depth = 0
    for (let i = 0; i < text.length; i++) {
        const c = text[i] as string
        const pair = text.slice(i, i + 2)
        if (c === "'" || c === '"' || c === '`') {
            i = closingQuote(text, i)
            if (i < 0) {
                return `opens a ${c} it never closes`
            }
        } else if (pair === '--' || pair === '/*' || pair === '//') {
            return `has a comment (${pair}), which could hide the closing parenthesis`
        } else if (c === ';') {
            return 'has a ;'
        } else if (c === '(') {
            depth++
        } else if (c === ')' && --depth < 0) {
            return 'closes a parenthesis it did not open'
        }
    }
    return depth === 0 ? null : 'leaves a parenthesis open'
}
