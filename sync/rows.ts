/**
 * Turns rows of PostHog's query API into the event JSON the plugin sends, so a receiver cannot tell which path
 * an event took. Pure functions.
 */

/** The event as the plugin sends it (PostHog's ProcessedPluginEvent), minus what the events table does not hold. */
export interface SyncedEvent {
    uuid: string
    event: string
    distinct_id: string
    team_id: number
    ip: null
    timestamp: string
    properties: Record<string, unknown>
    $set?: unknown
    $set_once?: unknown
    /** The autocapture element chain as PostHog stores it; the plugin's `elements` array is not rebuilt from it. */
    elements_chain?: string
    /** With `--with-person`: the event's person, or null for an event stored without one. */
    person?: SyncedPerson | null
}

/** The person as PostHog's HTTP Webhook destination sends it (its `person` global). */
export interface SyncedPerson {
    id: string
    properties: Record<string, unknown>
    /** The first of PERSON_DISPLAY_NAME_PROPERTIES that is set, else the distinct_id. */
    name: string
    /** The person's page in PostHog. */
    url: string
}

/** How persons are read: where their pages are, and the properties never to send (`--excluded-properties`). */
export interface PersonShape {
    /** e.g. https://us.posthog.com/project/12345 */
    projectUrl: string
    excludedProperties: ReadonlySet<string>
}

/**
 * The properties PostHog names a person by when the project has not chosen its own (nodejs/src/cdp/utils.ts,
 * `PERSON_DEFAULT_DISPLAY_NAME_PROPERTIES`); a project's "person display name" setting is not readable here.
 */
export const PERSON_DISPLAY_NAME_PROPERTIES = ['email', 'Email', 'name', 'Name', 'username', 'Username', 'UserName']

/** A person_id that means "no person": empty, or ClickHouse's zero UUID for a UUID column never set. */
const NO_PERSON = new Set(['', '00000000-0000-0000-0000-000000000000'])

/** One row, read: the event to send, and its key for the cursor. */
export interface PageRow {
    event: SyncedEvent
    createdAtMs: number
    /**
     * The event's JSON, built around PostHog's own properties text without parsing it, when properties need no
     * editing. `event.properties` is then left empty: the pipeline sends `text` and reads only name and uuid.
     */
    text?: string
    /** `text`'s size in UTF-8, counted on its parts: counting the joined text would copy it once more. */
    bytes?: number
}

export class RowError extends Error {
    name = 'RowError'
}

/**
 * A datetime from the query API as ISO 8601 in UTC with milliseconds, the form the plugin sends. PostHog returns
 * datetimes in the project's time zone with an offset; a value without a zone is taken as UTC.
 */
export function toIsoUtc(value: unknown): string {
    if (typeof value !== 'string' || value === '') {
        throw new RowError(`expected a datetime string, got ${JSON.stringify(value)}`)
    }
    let text = value.includes('T') ? value : value.replace(' ', 'T')
    if (!/(Z|[+-]\d\d:?\d\d)$/.test(text)) {
        text += 'Z'
    }
    const ms = Date.parse(text)
    if (Number.isNaN(ms)) {
        throw new RowError(`unreadable datetime ${JSON.stringify(value)}`)
    }
    return new Date(ms).toISOString()
}

const DAY_MS = 86_400_000
/** 10000-01-01T00:00:00Z: from there on `toISOString` writes a six-digit year, which the fast path does not. */
const YEAR_10000_MS = 253_402_300_800_000
let isoDay = Number.NaN
let isoDayPrefix = ''

const pad = (n: number, width: number): string => String(n).padStart(width, '0')

/**
 * `new Date(ms).toISOString()`, the same text, without a Date per row: the date part is kept for the day at hand
 * (rows come in created_at order, so most share it) and the time is plain arithmetic. A hot path.
 */
export function isoFromMs(ms: number): string {
    if (!(ms >= 0 && ms < YEAR_10000_MS)) {
        return new Date(ms).toISOString()
    }
    const day = Math.floor(ms / DAY_MS)
    if (day !== isoDay) {
        isoDay = day
        isoDayPrefix = new Date(day * DAY_MS).toISOString().slice(0, 11)
    }
    const inDay = ms - day * DAY_MS
    const hours = Math.floor(inDay / 3_600_000)
    const minutes = Math.floor(inDay / 60_000) % 60
    const seconds = Math.floor(inDay / 1000) % 60
    return `${isoDayPrefix}${pad(hours, 2)}:${pad(minutes, 2)}:${pad(seconds, 2)}.${pad(inDay % 1000, 3)}Z`
}

/** `timestamp_ms` as ISO 8601 in UTC with milliseconds; a datetime text (the `timestamp` column) is read too. */
export function timestampOf(ms: unknown, text: unknown): string {
    if (typeof ms === 'number' && Number.isSafeInteger(ms)) {
        return isoFromMs(ms)
    }
    return toIsoUtc(text)
}

/** `properties` comes back as the JSON text PostHog stores; an empty string means no properties. */
export function parseProperties(value: unknown): Record<string, unknown> {
    if (typeof value === 'object' && value !== null && !Array.isArray(value)) {
        return value as Record<string, unknown>
    }
    if (value === '' || value === null || value === undefined) {
        return {}
    }
    if (typeof value !== 'string') {
        throw new RowError(`expected properties as JSON text, got ${typeof value}`)
    }
    const parsed: unknown = JSON.parse(value)
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        throw new RowError('properties is not a JSON object')
    }
    return parsed as Record<string, unknown>
}

/** Where each column sits in a row, found once per page from the response's `columns`; -1 if it is not there. */
export interface RowColumns {
    uuid: number
    event: number
    distinct_id: number
    properties: number
    created_at_ms: number
    timestamp_ms: number
    timestamp: number
    elements_chain: number
    person_id: number
    person_properties: number
}

const REQUIRED_COLUMNS = ['uuid', 'event', 'distinct_id', 'properties', 'created_at_ms'] as const

/** The column positions of a page; throws naming a required column the response lacks. */
export function rowColumns(columns: readonly string[]): RowColumns {
    for (const name of REQUIRED_COLUMNS) {
        if (!columns.includes(name)) {
            throw new RowError(`the response has no "${name}" column (columns: ${columns.join(', ')})`)
        }
    }
    const at = (name: keyof RowColumns): number => columns.indexOf(name)
    return {
        uuid: at('uuid'),
        event: at('event'),
        distinct_id: at('distinct_id'),
        properties: at('properties'),
        created_at_ms: at('created_at_ms'),
        timestamp_ms: at('timestamp_ms'),
        timestamp: at('timestamp'),
        elements_chain: at('elements_chain'),
        person_id: at('person_id'),
        person_properties: at('person_properties'),
    }
}

/** The person's name as the destination shows it: a name-like property's value (JSON for a non-string), else the id. */
export function personDisplayName(properties: Record<string, unknown>, distinctId: string): string {
    const key = PERSON_DISPLAY_NAME_PROPERTIES.find((name) => Boolean(properties[name]))
    const value = key === undefined ? undefined : properties[key]
    const text = typeof value === 'string' ? value : value === undefined ? '' : JSON.stringify(value)
    return (text || distinctId).trim()
}

/**
 * The row's person, minus the excluded properties (before its name is chosen, so an excluded email cannot come back
 * as the name), or null when the event was stored without one.
 */
export function personOf(row: readonly unknown[], at: RowColumns, distinctId: string, shape: PersonShape) {
    const id = row[at.person_id]
    if (typeof id !== 'string' || NO_PERSON.has(id)) {
        return null
    }
    const properties = parseProperties(row[at.person_properties])
    for (const key of shape.excludedProperties) {
        delete properties[key]
    }
    const person: SyncedPerson = {
        id,
        properties,
        name: personDisplayName(properties, distinctId),
        url: `${shape.projectUrl}/person/${encodeURIComponent(distinctId)}`,
    }
    return person
}

/** PostHog's properties text, usable as is: a JSON object as PostHog serialised it, with no person updates to lift. */
function verbatimProperties(value: unknown): string | null {
    if (typeof value !== 'string' || value.length < 2 || value[0] !== '{' || value[value.length - 1] !== '}') {
        return null
    }
    return value.includes('"$set') ? null : value
}

/**
 * `JSON.stringify(event)` up to the properties' value, written out field by field: the same text in the same key
 * order, without copying the event into a new object and serialising it for every row (a hot path: a million rows
 * is a million of these).
 */
export function eventHead(event: SyncedEvent): string {
    return (
        `{"uuid":${JSON.stringify(event.uuid)},"event":${JSON.stringify(event.event)},` +
        `"distinct_id":${JSON.stringify(event.distinct_id)},"team_id":${String(event.team_id)},` +
        // The timestamp is ISO text written here (isoFromMs, toIsoUtc): nothing in it needs escaping.
        `"ip":null,"timestamp":"${event.timestamp}","properties":`
    )
}

/** The `elements_chain` and `person` members that close the event's JSON, then the closing brace. */
function eventTail(chain: unknown, person: SyncedPerson | null | undefined): string {
    const elements = typeof chain === 'string' && chain !== '' ? `,"elements_chain":${JSON.stringify(chain)}` : ''
    return person === undefined ? `${elements}}` : `${elements},"person":${JSON.stringify(person)}}`
}

/**
 * A row as the plugin's event. With `keepText`, properties are not parsed when they can be sent as PostHog stored
 * them (most rows): the event's JSON is assembled around them, in the same key order as the object form. A hot
 * path (a million rows is a million calls): columns are read by position, and nothing is copied that need not be.
 */
export function rowToEvent(
    row: readonly unknown[],
    at: RowColumns,
    teamId: number,
    keepText = false,
    personShape: PersonShape | null = null
): PageRow {
    const uuid = row[at.uuid]
    const createdAtMs = Number(row[at.created_at_ms])
    if (typeof uuid !== 'string' || !Number.isSafeInteger(createdAtMs)) {
        throw new RowError(`a row without a readable uuid or created_at: ${JSON.stringify(row).slice(0, 200)}`)
    }
    const event: SyncedEvent = {
        uuid,
        event: String(row[at.event]),
        distinct_id: String(row[at.distinct_id]),
        team_id: teamId,
        ip: null,
        timestamp: timestampOf(row[at.timestamp_ms], row[at.timestamp]),
        properties: {},
    }
    const chain = at.elements_chain >= 0 ? row[at.elements_chain] : undefined
    const person = personShape && at.person_id >= 0 ? personOf(row, at, event.distinct_id, personShape) : undefined
    const verbatim = keepText ? verbatimProperties(row[at.properties]) : null
    if (verbatim !== null) {
        const head = eventHead(event)
        const tail = eventTail(chain, person)
        const bytes = Buffer.byteLength(head) + Buffer.byteLength(verbatim) + Buffer.byteLength(tail)
        return { event, createdAtMs, text: head + verbatim + tail, bytes }
    }
    const properties = parseProperties(row[at.properties])
    event.properties = properties
    // The plugin's event carries person updates at the top level too (PostHog's convertToProcessedPluginEvent).
    if (properties.$set !== undefined) {
        event.$set = properties.$set
    }
    if (properties.$set_once !== undefined) {
        event.$set_once = properties.$set_once
    }
    if (typeof chain === 'string' && chain !== '') {
        event.elements_chain = chain
    }
    if (person !== undefined) {
        event.person = person
    }
    return { event, createdAtMs }
}
