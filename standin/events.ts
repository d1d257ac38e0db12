/**
 * Events going into the stand-in: the shape tests hand it, their JSON Lines for ClickHouse, and the generated
 * `INSERT … SELECT … FROM numbers(N)` that seeds a million events inside the engine without building them in JS.
 */
import { createHash, randomUUID } from 'node:crypto'

import { clickhouseString } from './hogql'

/** An event as captured, before PostHog stores it. Omitted fields get PostHog-like defaults. */
export interface StandInEvent {
    /** Default: a random UUID. */
    uuid?: string
    event: string
    distinct_id: string
    /** An object (stored as its JSON) or the JSON text itself. Default `{}`. */
    properties?: Record<string, unknown> | string
    /** When the event happened (client time): ISO 8601, `YYYY-MM-DD hh:mm:ss[.ffffff]` (UTC) or a Date. */
    timestamp: string | Date
    /** When PostHog stored it. Default: the moment of insertion (ClickHouse's now64(6)), as ingestion does. */
    created_at?: string | Date
    elements_chain?: string
    /** Default: a UUID derived from distinct_id. */
    person_id?: string
}

/** An event as stored: every field filled in except `created_at` when the engine sets it. */
export interface StoredEvent extends StandInEvent {
    uuid: string
    properties: string
    person_id: string
}

export interface SeedOptions {
    count: number
    /** The first event's timestamp. Default: 24 hours before now. */
    start?: string | Date
    /** Microseconds between consecutive timestamps. Default 1000 (1 ms). */
    stepMicros?: number
    /** How many consecutive events share one timestamp (ties). Default 1. */
    sameTimestamp?: number
    /**
     * created_at: `'timestamp'` (default: the event's timestamp plus `createdLagMicros`), `'now'` (the insert's
     * moment, shared by all rows), or a fixed time.
     */
    createdAt?: 'timestamp' | 'now' | string | Date
    createdLagMicros?: number
    /** Distinct users the events are spread over. Default 1000. */
    distinctIds?: number
    /** Event names, cycled. Default `$pageview`, `$autocapture`, `signup`. */
    eventNames?: string[]
    /** Seed for the generated UUIDs: the same seed gives the same events. Default 1. */
    seed?: number
    /** Extra bytes of padding in each event's properties, for heavier events. Default 0. */
    propertyBytes?: number
}

function toTime(value: string | Date): string {
    return value instanceof Date ? value.toISOString() : value
}

/** A stable person UUID for a distinct_id, so the same user keeps the same person. */
export function personIdFor(distinctId: string): string {
    const hex = createHash('sha1').update(`person:${distinctId}`).digest('hex')
    return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`
}

/** Fills the defaults and validates the shape; throws naming the field. */
export function normalizeEvent(input: StandInEvent): StoredEvent {
    if (typeof input.event !== 'string' || input.event.length === 0) {
        throw new Error('Expected `event` to be a non-empty string')
    }
    if (typeof input.distinct_id !== 'string') {
        throw new Error('Expected `distinct_id` to be a string')
    }
    if (!(input.timestamp instanceof Date) && typeof input.timestamp !== 'string') {
        throw new Error('Expected `timestamp` to be an ISO 8601 string or a Date')
    }
    const properties = typeof input.properties === 'string' ? input.properties : JSON.stringify(input.properties ?? {})
    return {
        ...input,
        uuid: input.uuid ?? randomUUID(),
        properties,
        person_id: input.person_id ?? personIdFor(input.distinct_id),
    }
}

/** One JSONEachRow line for the events table. */
export function eventJsonLine(event: StoredEvent, teamId: number, createdAt?: string | Date): string {
    const created = event.created_at ?? createdAt
    return JSON.stringify({
        uuid: event.uuid,
        event: event.event,
        properties: event.properties,
        timestamp: toTime(event.timestamp),
        team_id: teamId,
        distinct_id: event.distinct_id,
        elements_chain: event.elements_chain ?? '',
        person_id: event.person_id,
        ...(created !== undefined ? { created_at: toTime(created) } : {}),
    })
}

function positiveInteger(name: string, value: number | undefined, fallback: number): number {
    const result = value ?? fallback
    if (!Number.isSafeInteger(result) || result < 1) {
        throw new Error(`Expected \`${name}\` to be a positive whole number, got ${String(value)}`)
    }
    return result
}

function microsOf(value: string | Date): number {
    const ms = value instanceof Date ? value.getTime() : Date.parse(value)
    if (!Number.isFinite(ms)) {
        throw new Error(`Expected a time, got ${String(value)}`)
    }
    return ms * 1000
}

/** The SQL that seeds `count` events inside ClickHouse (one statement, no rows through JS). */
export function seedSql(table: string, teamId: number, options: SeedOptions, nowMs = Date.now()): string {
    const count = positiveInteger('count', options.count, 1)
    const step = Math.trunc(options.stepMicros ?? 1000)
    const group = positiveInteger('sameTimestamp', options.sameTimestamp, 1)
    const users = positiveInteger('distinctIds', options.distinctIds, 1000)
    const seed = Math.trunc(options.seed ?? 1)
    const padding = Math.max(0, Math.trunc(options.propertyBytes ?? 0))
    const names = options.eventNames ?? ['$pageview', '$autocapture', 'signup']
    if (names.length === 0) {
        throw new Error('Expected `eventNames` to name at least one event')
    }
    const startMicros = options.start !== undefined ? microsOf(options.start) : (nowMs - 24 * 3600 * 1000) * 1000
    const timestamp = `fromUnixTimestamp64Micro(toInt64(${startMicros} + intDiv(number, ${group}) * ${step}), 'UTC')`
    let createdAt: string
    if (options.createdAt === undefined || options.createdAt === 'timestamp') {
        const lag = Math.trunc(options.createdLagMicros ?? 0)
        createdAt = `fromUnixTimestamp64Micro(toInt64(${startMicros} + intDiv(number, ${group}) * ${step} + ${lag}), 'UTC')`
    } else if (options.createdAt === 'now') {
        createdAt = `now64(6, 'UTC')`
    } else {
        createdAt = `fromUnixTimestamp64Micro(toInt64(${microsOf(options.createdAt)}), 'UTC')`
    }
    const pad = padding > 0 ? `, ',"pad":"', repeat('x', ${padding}), '"'` : ''
    const properties =
        `concat('{"$browser":"Chrome","$current_url":"https://example.com/p/', toString(number % 100), ` +
        `'","$session_id":"s-', toString(intDiv(number, 50)), '","n":', toString(number)${pad}, '}')`
    return [
        `INSERT INTO ${table} (uuid, event, properties, timestamp, team_id, distinct_id, elements_chain, created_at, person_id)`,
        `SELECT reinterpretAsUUID(sipHash128(${seed}, number)),`,
        `    arrayElement([${names.map(clickhouseString).join(', ')}], number % ${names.length} + 1),`,
        `    ${properties},`,
        `    ${timestamp},`,
        `    ${Math.trunc(teamId)},`,
        `    concat('user-', toString(number % ${users})),`,
        `    '',`,
        `    ${createdAt},`,
        `    reinterpretAsUUID(sipHash128(${seed + 1}, number % ${users}))`,
        `FROM numbers(${count})`,
    ].join('\n')
}
