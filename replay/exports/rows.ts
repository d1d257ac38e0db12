/**
 * An exported row as the event the plugin and sync send: `properties` an object, `$set` and `$set_once` lifted from
 * the properties (where PostHog keeps them, as its convertToProcessedPluginEvent does), timestamps in ISO 8601 UTC
 * with milliseconds. Fields the plugin's event lacks (`person_id`, `person_properties`, `elements_chain`,
 * `created_at`, and any other the export has) are kept after the plugin's own. Big numbers are written as read.
 * Pure functions.
 */
import { shapeEvent } from '../../index'
import { fromBigInt, parse, stringify } from './lossless'

/** An event ready for the pipeline: its name and uuid for filters and dedupe, and its JSON. */
export interface ShapedRow {
    uuid: string
    event: string
    text: string
}

/** The plugin's fields, in the plugin's order; `properties` is followed by the lifted person updates. */
const PLUGIN_FIELDS = ['uuid', 'event', 'distinct_id', 'team_id', 'ip', 'timestamp', 'properties'] as const
/** Export fields the plugin's event lacks, kept next, in this order. */
const EXPORT_FIELDS = ['elements_chain', 'person_id', 'person_properties', 'created_at'] as const
/** Datetimes, written as ISO 8601 UTC with milliseconds. `inserted_at` is the 2023 name of `_inserted_at`. */
const DATETIME_FIELDS = new Set(['timestamp', 'created_at', '_inserted_at', 'inserted_at'])
/** 2023-era person updates, sent as `$set` and `$set_once` (so --excluded-properties applies to them) only. */
const LIFTED = new Set(['set', 'set_once'])
/** Fields that hold JSON: objects in JSON Lines, strings of JSON in Parquet. */
const JSON_FIELDS = new Set(['properties', 'person_properties', 'set', 'set_once'])

/** A datetime as ISO 8601 in UTC with milliseconds; text without a zone is UTC. Unreadable text is kept. */
export function isoUtc(value: unknown): unknown {
    if (value instanceof Date) {
        return Number.isNaN(value.getTime()) ? null : value.toISOString()
    }
    if (typeof value !== 'string' || value === '' || ISO_UTC_MS.test(value)) {
        return value
    }
    let text = value.includes('T') ? value : value.replace(' ', 'T')
    if (!/(Z|[+-]\d\d:?\d\d)$/.test(text)) {
        text += 'Z'
    }
    const ms = Date.parse(text)
    return Number.isNaN(ms) ? value : new Date(ms).toISOString()
}

/** How a row is being shaped. */
interface Marks {
    /** Whether any marked number went into the event, so its JSON is written back with the numbers. */
    marked: boolean
    /** Whether JSON text may be sent as it is (nothing to remove from it). */
    verbatim: boolean
}

/** JSON text sent as PostHog wrote it, unparsed: big numbers and all. */
class RawJson {
    constructor(readonly text: string) {}
}

/**
 * Whether a field's JSON text can go as it is: an object (so the receiver gets the same type either way), and for
 * properties, none of the person updates that must be lifted out of them.
 */
function isVerbatim(key: string, text: string): boolean {
    return (
        text.length >= 2 &&
        text.charCodeAt(0) === 0x7b &&
        text.charCodeAt(text.length - 1) === 0x7d &&
        (key !== 'properties' || !text.includes('"$set'))
    )
}

const ISO_UTC_MS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/

/** A field's value for the event: JSON text parsed (Parquet), bigints as numbers, datetimes normalised. */
function fieldValue(key: string, value: unknown, marks: Marks): unknown {
    if (typeof value === 'bigint') {
        const number = fromBigInt(value)
        marks.marked ||= typeof number === 'string'
        return number
    }
    if (DATETIME_FIELDS.has(key)) {
        return isoUtc(value)
    }
    if (JSON_FIELDS.has(key) && typeof value === 'string') {
        if (value === '') {
            return null
        }
        if (marks.verbatim && isVerbatim(key, value)) {
            return new RawJson(value)
        }
        const parsed = parse(value)
        marks.marked ||= parsed.marked
        return parsed.value
    }
    return value instanceof Date ? isoUtc(value) : value
}

const isObject = (value: unknown): value is Record<string, unknown> =>
    typeof value === 'object' && value !== null && !Array.isArray(value)

/** The event in the plugin's field order, then the export's own fields. */
function orderedEvent(row: Record<string, unknown>, marks: Marks): Record<string, unknown> {
    const event: Record<string, unknown> = {}
    for (const key of PLUGIN_FIELDS) {
        if (key in row || key === 'ip') {
            event[key] = fieldValue(key, row[key] ?? null, marks)
        }
    }
    const properties = isObject(event.properties) ? event.properties : {}
    if (!(event.properties instanceof RawJson)) {
        event.properties = properties
    }
    // 2023-era files also carried the person updates as `set` and `set_once`: used when properties have none.
    const set = properties.$set ?? row.$set ?? fieldValue('set', row.set, marks)
    const setOnce = properties.$set_once ?? row.$set_once ?? fieldValue('set_once', row.set_once, marks)
    if (set !== undefined && set !== null) {
        event.$set = set
    }
    if (setOnce !== undefined && setOnce !== null) {
        event.$set_once = setOnce
    }
    for (const key of [...EXPORT_FIELDS, ...Object.keys(row)]) {
        if (key in row && !(key in event) && !LIFTED.has(key)) {
            event[key] = fieldValue(key, row[key], marks)
        }
    }
    return event
}

/**
 * One exported row as the event to send, or why it is not an event. `marked` says the row was parsed with
 * marked numbers (lossless.parse); `excluded` are the properties to remove, as the plugin removes them.
 */
export function shapeExportRow(
    row: Record<string, unknown>,
    marked: boolean,
    excluded: readonly string[]
): ShapedRow | { error: string } {
    if (typeof row.event !== 'string') {
        return { error: 'not a PostHog event (no "event" name)' }
    }
    const marks = { marked, verbatim: excluded.length === 0 }
    const event = shapeEvent(orderedEvent(row, marks), excluded)
    const uuid = typeof row.uuid === 'string' ? row.uuid : String(row.uuid ?? '')
    return { uuid, event: row.event, text: eventText(event, marks.marked) }
}

/** The event's JSON, as `JSON.stringify` writes it, with verbatim fields written as they were read. */
function eventText(event: Record<string, unknown>, marked: boolean): string {
    let text = '{'
    for (const key in event) {
        const value = event[key]
        if (value !== undefined) {
            const json = value instanceof RawJson ? value.text : stringify(value, marked)
            text += `${text.length > 1 ? ',' : ''}${JSON.stringify(key)}:${json}`
        }
    }
    return text + '}'
}

/** A JSON Lines row: parsed keeping big numbers, then shaped. */
export function shapeExportLine(line: string, excluded: readonly string[]): ShapedRow | { error: string } {
    let parsed
    try {
        parsed = parse(line)
    } catch {
        return { error: 'not valid JSON' }
    }
    if (!isObject(parsed.value)) {
        return { error: 'not a PostHog event (not a JSON object)' }
    }
    return shapeExportRow(parsed.value, parsed.marked, excluded)
}
