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
    /** When the event happened (client time): ISO 8601, `YYYY-MM-DD hh:mm:ss[.fff]` (UTC) or a Date; kept to the ms. */
    timestamp: string | Date
    /** When PostHog stored it. Default: the moment of insertion, in milliseconds, as ingestion sets it. */
    created_at?: string | Date
    elements_chain?: string
    /** Default: a UUID derived from distinct_id. */
    person_id?: string
    /**
     * The person's properties as ingestion wrote them on the event (an object or its JSON text): what the
     * persons-on-events modes read as `person.properties`. Default `{}`.
     */
    person_properties?: Record<string, unknown> | string
}

/** An event as stored: every field filled in (times as ISO strings to the ms) except `created_at` when the engine sets it. */
export interface StoredEvent extends StandInEvent {
    uuid: string
    properties: string
    timestamp: string
    created_at?: string
    person_id: string
    person_properties: string
}

/** A person version in the `persons` table (the highest version of an id wins, as in PostHog). */
export interface StandInPerson {
    id: string
    properties: Record<string, unknown>
    /** Default 0. */
    version?: number
    /** Default: 2026-01-01. */
    created_at?: string
    is_deleted?: boolean
}

/** A distinct_id that a merge moved to another person (`person_distinct_id_overrides`). */
export interface StandInOverride {
    distinct_id: string
    person_id: string
    /** Default 1. */
    version?: number
}

export interface SeedOptions {
    count: number
    /** The first event's timestamp. Default: 24 hours before now. */
    start?: string | Date
    /** Microseconds between consecutive timestamps. Default 1000 (1 ms); PostHog stores whole milliseconds. */
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

/**
 * A time as PostHog's ingestion stores it: UTC with millisecond precision (it writes `yyyy-MM-dd HH:mm:ss.u`, see
 * standin/FACTS.md §7), so microseconds given here are dropped. A zone-less `YYYY-MM-DD hh:mm:ss` is UTC.
 */
export function storedTime(value: string | Date, field: string): string {
    let ms: number
    if (value instanceof Date) {
        ms = value.getTime()
    } else {
        const text = value.trim()
        const zoneless = /^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(\.\d+)?$/.test(text)
        ms = Date.parse(zoneless ? `${text.replace(' ', 'T')}Z` : text)
    }
    if (!Number.isFinite(ms)) {
        throw new Error(`Expected \`${field}\` to be an ISO 8601 time, got ${JSON.stringify(String(value))}`)
    }
    return new Date(ms).toISOString()
}

const personIds = new Map<string, string>()

/** A stable person UUID for a distinct_id, so the same user keeps the same person (memoised: users repeat). */
export function personIdFor(distinctId: string): string {
    let id = personIds.get(distinctId)
    if (id === undefined) {
        const hex = createHash('sha1').update(`person:${distinctId}`).digest('hex')
        id = `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20, 32)}`
        if (personIds.size >= 100_000) {
            personIds.clear()
        }
        personIds.set(distinctId, id)
    }
    return id
}

/** Fills the defaults and validates the shape; throws naming the field. */
export function normalizeEvent(input: StandInEvent): StoredEvent {
    if (typeof input.event !== 'string' || input.event.length === 0) {
        throw new Error('Expected `event` to be a non-empty string')
    }
    if (typeof input.distinct_id !== 'string') {
        throw new Error('Expected `distinct_id` to be a string')
    }
    const properties = typeof input.properties === 'string' ? input.properties : JSON.stringify(input.properties ?? {})
    const personProperties =
        typeof input.person_properties === 'string'
            ? input.person_properties
            : JSON.stringify(input.person_properties ?? {})
    const { created_at: createdAt, ...rest } = input
    return {
        ...rest,
        uuid: input.uuid ?? randomUUID(),
        properties,
        timestamp: storedTime(input.timestamp, 'timestamp'),
        ...(createdAt !== undefined ? { created_at: storedTime(createdAt, 'created_at') } : {}),
        person_id: input.person_id ?? personIdFor(input.distinct_id),
        person_properties: personProperties,
    }
}

/** One JSONEachRow line for the events table. */
export function eventJsonLine(event: StoredEvent, teamId: number): string {
    return JSON.stringify({
        uuid: event.uuid,
        event: event.event,
        properties: event.properties,
        timestamp: event.timestamp,
        team_id: teamId,
        distinct_id: event.distinct_id,
        elements_chain: event.elements_chain ?? '',
        person_id: event.person_id,
        person_properties: event.person_properties,
        ...(event.created_at !== undefined ? { created_at: event.created_at } : {}),
    })
}

/** One JSONEachRow line for the `persons` table. */
export function personJsonLine(person: StandInPerson, teamId: number): string {
    return JSON.stringify({
        id: person.id,
        created_at: person.created_at ?? '2026-01-01 00:00:00.000',
        team_id: teamId,
        properties: JSON.stringify(person.properties),
        is_deleted: person.is_deleted ? 1 : 0,
        version: person.version ?? 0,
    })
}

/** One JSONEachRow line for the `person_distinct_id_overrides` table. */
export function overrideJsonLine(override: StandInOverride, teamId: number): string {
    return JSON.stringify({
        team_id: teamId,
        distinct_id: override.distinct_id,
        person_id: override.person_id,
        version: override.version ?? 1,
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
        createdAt = `now64(3, 'UTC')`
    } else {
        createdAt = `fromUnixTimestamp64Micro(toInt64(${microsOf(options.createdAt)}), 'UTC')`
    }
    const pad = padding > 0 ? `, ',"pad":"', repeat('x', ${padding}), '"'` : ''
    const properties =
        `concat('{"$browser":"Chrome","$current_url":"https://example.com/p/', toString(number % 100), ` +
        `'","$session_id":"s-', toString(intDiv(number, 50)), '","n":', toString(number)${pad}, '}')`
    // The person's properties as ingestion stamps them on each event: an email, a plan (one user in ten on "pro").
    const personProperties =
        `concat('{"email":"user-', toString(number % ${users}), '@example.com","plan":"', ` +
        `if(number % ${users} % 10 = 0, 'pro', 'free'), '"}')`
    return [
        `INSERT INTO ${table} (uuid, event, properties, timestamp, team_id, distinct_id, elements_chain, created_at, person_id, person_properties)`,
        `SELECT reinterpretAsUUID(sipHash128(${seed}, number)),`,
        `    arrayElement([${names.map(clickhouseString).join(', ')}], number % ${names.length} + 1),`,
        `    ${properties},`,
        `    ${timestamp},`,
        `    ${Math.trunc(teamId)},`,
        `    concat('user-', toString(number % ${users})),`,
        `    '',`,
        `    ${createdAt},`,
        `    reinterpretAsUUID(sipHash128(${seed + 1}, number % ${users})),`,
        `    ${personProperties}`,
        `FROM numbers(${count})`,
    ].join('\n')
}
