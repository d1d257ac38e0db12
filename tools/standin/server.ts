/**
 * A PostHog stand-in for tests and the local job: a real node:http server answering PostHog's query API
 * (`POST /api/projects/:project_id/query/`, also `/api/environments/:id/query/`) with PostHog's request and response
 * shapes, auth, limits and errors (standin/FACTS.md), built on real components: every query is parsed by PostHog's
 * own HogQL parser (`@posthog/hogql-parser`, WebAssembly) and run on a real ClickHouse engine (chdb) over an `events`
 * table with PostHog's column types and sort key.
 *
 * API
 *
 *     const posthog = await startPostHogStandIn({ apiKey: 'phx_test', projectId: 1 })
 *     await posthog.insertEvents([{ event: '$pageview', distinct_id: 'u1', timestamp: '2026-11-27T10:00:00Z' }])
 *     await posthog.seed({ count: 1_000_000, sameTimestamp: 3 })      // generated inside ClickHouse
 *     await posthog.insertLateEvents(5, { ageMs: 3_600_000 })         // timestamp an hour ago, created_at now
 *     posthog.setFaults({ script: ['429', '500', 'slow'] })           // or rates with a seed
 *     posthog.url, posthog.queries, posthog.requests, posthog.log
 *     await posthog.close()
 *
 * `startPostHogStandIn` runs in this process (chdb's engine alone takes ~200 MB of RSS and grows with the data, so
 * a process that measures its own memory should use `spawnPostHogStandIn` from standin/spawn.ts instead: the same
 * interface, served from a child process). Options and defaults: see `StandInOptions` and `DEFAULT_LIMITS`.
 *
 * The API key never appears in a log line, an error body or `log`.
 */
import { createHash } from 'node:crypto'
import { createServer, IncomingMessage, Server, ServerResponse } from 'node:http'
import { AddressInfo } from 'node:net'

import createHogQLParser from '@posthog/hogql-parser'

import { seededRandom } from '../receiver/receiver'
import { ColumnType, EventStore, OUTPUT_SETTINGS } from './engine'
import {
    eventJsonLine,
    normalizeEvent,
    overrideJsonLine,
    personJsonLine,
    SeedOptions,
    seedSql,
    StandInEvent,
    StandInOverride,
    StandInPerson,
    StoredEvent,
} from './events'
import { CompiledQuery, compileHogQL, HogQLError, HogQLParser, PersonsOnEventsMode } from './hogql'
import { checkThrottles, Clock, ConcurrencyLimiter, parseRate, SlidingWindowThrottle, throttledDetail } from './limits'
import {
    errorBody,
    findApiKey,
    formatColumn,
    HttpError,
    parseRequest,
    posthogDateTime,
    queryError,
    QueryRequestBody,
    readBody,
    redactKey,
    rowsToJsonArray,
    send,
    sendParts,
    TIMEOUT_DETAIL,
} from './respond'

export type { SeedOptions, StandInEvent, StandInOverride, StandInPerson, StoredEvent } from './events'
export { errorBody, MAX_BODY_BYTES, posthogDateTime, rowsToJsonArray } from './respond'

/** PostHog's limits for API queries (standin/FACTS.md §4–5). Tests lower them through `limits`. */
export const DEFAULT_LIMITS: StandInLimits = {
    burstRate: '240/minute',
    sustainedRate: '2400/hour',
    concurrentQueries: 3,
    concurrencyWaitMs: 30_000,
    maxExecutionSeconds: 10,
    defaultRows: 100,
    maxRows: 50_000,
    cacheTtlMs: 6 * 3600 * 1000,
    cacheMaxBytes: 64 * 1024 * 1024,
}

export interface StandInLimits {
    /** DRF rate string of the burst throttle. PostHog: `240/minute`. */
    burstRate: string
    /** DRF rate string of the sustained throttle. PostHog: `2400/hour` (legacy teams: `120/hour`). */
    sustainedRate: string
    /** Queries running at once per project. PostHog: 3. */
    concurrentQueries: number
    /** How long a query waits for a slot before a 429. PostHog: 30 s. */
    concurrencyWaitMs: number
    /** ClickHouse `max_execution_time` for a query. PostHog: 10 s for API queries. */
    maxExecutionSeconds: number
    /** Rows without a LIMIT. PostHog: 100. */
    defaultRows: number
    /** Cap on any LIMIT. PostHog: 50,000. */
    maxRows: number
    /** How long a result is served from cache to a non-forcing `refresh`. PostHog: 6 h. 0 disables the cache. */
    cacheTtlMs: number
    /**
     * Result bytes the cache keeps; the oldest entries go first. PostHog's cache (Redis) evicts too. Without a bound
     * a sync of a million events would keep every page it was served (a `force_blocking` query still writes it).
     */
    cacheMaxBytes: number
}

export type ScriptedFault = 'ok' | '429' | '500' | 'slow'

/** Injected failures, applied to query requests that passed auth and the real throttles. */
export interface StandInFaults {
    /** Consumed one per query request, before the random faults: a deterministic sequence. */
    script?: ScriptedFault[]
    /** Probability per query request of a 429 with Retry-After. */
    rate429?: number
    /** Probability per query request of a 500. */
    rate500?: number
    /** Probability per query request of a query that runs past the execution timeout (→ 504). */
    rateSlow?: number
    /** Seed of the random faults (same seed, same faults). Default 1. */
    seed?: number
    /** Retry-After of an injected 429, in seconds. Default 1. */
    retryAfterSeconds?: number
    /** How long a slow query runs. Default: 50 ms past `maxExecutionSeconds` (so it times out). */
    slowMs?: number
    /**
     * After every `every`-th answered query, store `count` events `ageMs` old by timestamp, created now (or
     * `visibilityLagMs` ago: PostHog sets created_at before the event reaches ClickHouse).
     */
    late?: { every: number; count: number; ageMs: number; visibilityLagMs?: number }
}

export interface LateOptions {
    /** How old the events' timestamps are. Default one hour. */
    ageMs?: number
    /** How long before insertion their created_at lies. Default 0 (created now). */
    visibilityLagMs?: number
    /** Event name. Default `late event`. */
    event?: string
}

export interface ApiKey {
    key: string
    /** Default `['query:read']`. */
    scopes?: string[]
}

export interface StandInOptions {
    /** Default 0 (any free port). */
    port?: number
    /** Default 127.0.0.1. */
    host?: string
    /** The personal API key that may query (with `query:read`). */
    apiKey: string
    projectId: number
    /** More keys, e.g. one without the scope to test the 403. */
    extraKeys?: ApiKey[]
    /** Keep the events in this directory across restarts (one directory per process). Default: temporary. */
    dataDir?: string
    faults?: StandInFaults
    limits?: Partial<StandInLimits>
    /** Accept OFFSET, as PostHog does for organisations on its allow-list. Default false (PostHog refuses it). */
    allowOffset?: boolean
    /**
     * Status of a missing or invalid key. PostHog's docs say 401; on the query view DRF may turn it into 403 (its
     * first authenticator declares no WWW-Authenticate; standin/FACTS.md §2). The body is the same. Default 401.
     */
    unauthenticatedStatus?: 401 | 403
    /**
     * The project's persons-on-events mode, used when a query sends no `personsOnEventsMode` modifier. Default
     * `person_id_override_properties_on_events` (what PostHog Cloud answers with, FACTS.md §3).
     */
    personsOnEventsMode?: PersonsOnEventsMode
    /** Enables `/_standin/*` control endpoints (used by spawnPostHogStandIn) for requests bearing this token. */
    controlToken?: string
    clock?: Clock
}

/** What the stand-in received: never the Authorization header. */
export interface RecordedRequest {
    method: string
    path: string
    status: number
    body?: unknown
}

export interface StandInStats {
    /** Query requests received (any outcome). */
    requests: number
    /** Queries that ran on the engine. */
    queries: number
    cacheHits: number
    /** 429s from the real throttles and the concurrency limit. */
    throttled: number
    /** Faults injected, by kind. */
    faults: { '429': number; '500': number; slow: number }
    /** Late events stored by the `late` fault. */
    lateEvents: number
    /** Rows the queries returned (in `results`): what a client read through the query budget. */
    rowsReturned: number
}

/** The interface shared by the in-process stand-in and the spawned one. */
export interface PostHogStandInClient {
    url: string
    projectId: number
    insertEvents(events: StandInEvent[], options?: { createdAt?: string | Date }): Promise<StoredEvent[]>
    insertLateEvents(count: number, options?: LateOptions): Promise<StoredEvent[]>
    /** Person versions in the `persons` table, and distinct_ids moved by merges (for the modes that join them). */
    insertPersons(persons: StandInPerson[], overrides?: StandInOverride[]): Promise<void>
    seed(options: SeedOptions): Promise<void>
    count(): Promise<number>
    setFaults(faults: StandInFaults): Promise<void> | void
    setLimits(limits: Partial<StandInLimits>): Promise<void> | void
    stats(): Promise<StandInStats>
    close(): Promise<void>
}

export interface PostHogStandIn extends PostHogStandInClient {
    readonly queries: number
    readonly requests: number
    /** The last 10,000 requests, oldest first. */
    readonly log: RecordedRequest[]
    setFaults(faults: StandInFaults): void
    setLimits(limits: Partial<StandInLimits>): void
}

const QUERY_PATH = /^\/api\/(projects|environments)\/([^/]+)\/query\/?$/
const LOG_LIMIT = 10_000

interface CachedResult {
    at: number
    /** The `results` array as JSON bytes. */
    results: Buffer
    hasMore: boolean | null
    types: Array<[string, string]>
    clickhouse: string
    compiled: CompiledQuery
    /** The persons-on-events mode it ran in, echoed in `modifiers`. */
    personsOnEventsMode: PersonsOnEventsMode
}

function sleep(ms: number): Promise<void> {
    return new Promise((resolve) => setTimeout(resolve, ms))
}

let parserPromise: Promise<HogQLParser> | undefined

/** PostHog's HogQL parser, loaded once per process (its CommonJS entry wraps the WebAssembly build). */
export function loadParser(): Promise<HogQLParser> {
    parserPromise ??= createHogQLParser()
    return parserPromise
}

/**
 * The parser with a small cache by query text: a client that keeps its cursor in `values` sends the same text for
 * every page. Placeholders are filled after parsing, so the cached AST is the same one.
 */
function cachingParser(parser: HogQLParser, size = 256): HogQLParser {
    const cache = new Map<string, string>()
    return {
        parseSelect(input: string, isInternal?: boolean): string {
            const key = `${isInternal ? 1 : 0}:${input}`
            let result = cache.get(key)
            if (result === undefined) {
                result = parser.parseSelect(input, isInternal)
                if (cache.size >= size) {
                    cache.delete(cache.keys().next().value as string)
                }
                cache.set(key, result)
            }
            return result
        },
    }
}

class StandIn {
    readonly log: RecordedRequest[] = []
    readonly counters: StandInStats = {
        requests: 0,
        queries: 0,
        cacheHits: 0,
        throttled: 0,
        faults: { '429': 0, '500': 0, slow: 0 },
        lateEvents: 0,
        rowsReturned: 0,
    }
    private limits: StandInLimits
    private faults: StandInFaults = {}
    private random: () => number = seededRandom(1)
    private script: ScriptedFault[] = []
    private throttles: SlidingWindowThrottle[] = []
    private readonly concurrency: ConcurrencyLimiter
    private readonly cache = new Map<string, CachedResult>()
    private cachedBytes = 0
    private readonly types = new Map<string, ColumnType[]>()
    private readonly keys = new Map<string, string[]>()
    private answered = 0
    private readonly unauthenticatedStatus: 401 | 403
    private readonly clock: Clock

    constructor(
        private readonly options: StandInOptions,
        readonly store: EventStore,
        private readonly parser: HogQLParser
    ) {
        this.clock = options.clock ?? Date.now
        this.unauthenticatedStatus = options.unauthenticatedStatus ?? 401
        this.limits = { ...DEFAULT_LIMITS, ...options.limits }
        this.concurrency = new ConcurrencyLimiter(
            this.limits.concurrentQueries,
            this.limits.concurrencyWaitMs,
            this.clock,
            sleep
        )
        this.setLimits({})
        this.setFaults(options.faults ?? {})
        this.keys.set(options.apiKey, ['query:read'])
        for (const extra of options.extraKeys ?? []) {
            this.keys.set(extra.key, extra.scopes ?? ['query:read'])
        }
    }

    setLimits(limits: Partial<StandInLimits>): void {
        this.limits = { ...this.limits, ...limits }
        const burst = parseRate(this.limits.burstRate)
        const sustained = parseRate(this.limits.sustainedRate)
        this.throttles = [
            new SlidingWindowThrottle(burst.numRequests, burst.durationMs, this.clock),
            new SlidingWindowThrottle(sustained.numRequests, sustained.durationMs, this.clock),
        ]
        this.concurrency.configure(this.limits.concurrentQueries, this.limits.concurrencyWaitMs)
        this.cache.clear()
        this.cachedBytes = 0
    }

    setFaults(faults: StandInFaults): void {
        this.faults = { ...faults }
        this.script = [...(faults.script ?? [])]
        this.random = seededRandom(faults.seed ?? 1)
    }

    async handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
        const path = (req.url ?? '/').split('?')[0] as string
        const record: RecordedRequest = { method: req.method ?? 'GET', path, status: 0 }
        let status = 500
        try {
            if (path.startsWith('/_standin/') && this.options.controlToken) {
                const body = await this.control(req, path)
                status = 200
                send(res, 200, body ?? { ok: true })
                return
            }
            const match = QUERY_PATH.exec(path)
            if (!match) {
                throw new HttpError(404, errorBody('invalid_request', 'not_found', 'Endpoint not found.'))
            }
            this.counters.requests += 1
            const text = await this.query(req, match[2] as string, record, res)
            status = 200
            sendParts(res, 200, text)
        } catch (error) {
            const httpError =
                error instanceof HttpError
                    ? error
                    : new HttpError(500, errorBody('server_error', 'error', 'A server error occurred.'))
            status = httpError.status
            send(res, httpError.status, httpError.body, httpError.headers)
        } finally {
            record.status = status
            if (!path.startsWith('/_standin/')) {
                this.log.push(record)
                if (this.log.length > LOG_LIMIT) {
                    this.log.splice(0, this.log.length - LOG_LIMIT)
                }
            }
        }
    }

    /** The query endpoint, in PostHog's order: authenticate, permissions, project, throttles, then the query. */
    private async query(req: IncomingMessage, projectId: string, record: RecordedRequest, res: ServerResponse) {
        if (req.method !== 'POST') {
            const detail = `Method "${req.method ?? ''}" not allowed.`
            throw new HttpError(405, errorBody('invalid_request', 'method_not_allowed', detail))
        }
        const raw = await readBody(req)
        const key = this.authenticate(req, raw)
        if (String(this.options.projectId) !== projectId) {
            throw new HttpError(404, errorBody('invalid_request', 'not_found', 'Project not found.'))
        }
        const keyId = createHash('sha256').update(key).digest('hex')
        const wait = checkThrottles(this.throttles, keyId)
        if (wait !== null) {
            this.counters.throttled += 1
            const body = errorBody('throttled_error', 'throttled', throttledDetail(wait))
            throw new HttpError(429, body, { 'Retry-After': String(wait) })
        }
        // PostHog keeps DRF's default parsers (JSON, form, multipart): a body sent as text/plain is never read.
        const contentType = req.headers['content-type'] ?? ''
        if (!/^application\/json\b/i.test(contentType)) {
            const detail = `Unsupported media type "${contentType}" in request.`
            throw new HttpError(415, errorBody('invalid_request', 'unsupported_media_type', detail))
        }
        const body = parseRequest(raw)
        record.body = redactKey(body)
        const fault = this.nextFault()
        this.throwInjected(fault)
        const text = await this.answer(body, fault === 'slow', res)
        this.answered += 1
        await this.maybeInsertLate()
        return text
    }

    /** An injected 429 looks like a throttle's (with Retry-After), an injected 500 like Django's. */
    private throwInjected(fault: ScriptedFault): void {
        if (fault === '429') {
            this.counters.faults['429'] += 1
            const seconds = this.faults.retryAfterSeconds ?? 1
            const body = errorBody('throttled_error', 'throttled', throttledDetail(seconds))
            throw new HttpError(429, body, { 'Retry-After': String(seconds) })
        }
        if (fault === '500') {
            this.counters.faults['500'] += 1
            throw new HttpError(500, errorBody('server_error', 'error', 'A server error occurred.'))
        }
    }

    private authenticate(req: IncomingMessage, raw: string): string {
        const found = findApiKey(req, raw)
        if (found === null) {
            const detail = 'Authentication credentials were not provided.'
            throw new HttpError(
                this.unauthenticatedStatus,
                errorBody('authentication_error', 'not_authenticated', detail)
            )
        }
        const { key } = found
        const scopes = this.keys.get(key)
        if (!scopes) {
            const detail = `Personal API key found in request ${found.source} is invalid.`
            throw new HttpError(
                this.unauthenticatedStatus,
                errorBody('authentication_error', 'authentication_failed', detail)
            )
        }
        if (!scopes.includes('*') && !scopes.includes('query:read') && !scopes.includes('query:write')) {
            const detail = "API key missing required scope 'query:read'"
            throw new HttpError(403, errorBody('authentication_error', 'permission_denied', detail))
        }
        return key
    }

    private nextFault(): ScriptedFault {
        const scripted = this.script.shift()
        if (scripted) {
            return scripted
        }
        const roll = this.random()
        const { rate429 = 0, rate500 = 0, rateSlow = 0 } = this.faults
        if (roll < rate429) {
            return '429'
        }
        if (roll < rate429 + rate500) {
            return '500'
        }
        if (roll < rate429 + rate500 + rateSlow) {
            return 'slow'
        }
        return 'ok'
    }

    private async maybeInsertLate(): Promise<void> {
        const late = this.faults.late
        if (late && late.every > 0 && this.answered % late.every === 0) {
            const stored = await this.insertLateEvents(late.count, late)
            this.counters.lateEvents += stored.length
        }
    }

    /** Cache, concurrency slot, compile, run, render: the body of a 200. */
    private async answer(request: QueryRequestBody, slow: boolean, res: ServerResponse): Promise<Buffer[]> {
        const cacheKey = createHash('sha256')
            .update(
                JSON.stringify([
                    this.options.projectId,
                    request.query.query,
                    request.query.values ?? null,
                    this.personsMode(request),
                ])
            )
            .digest('hex')
        const forced = request.refresh === true || String(request.refresh).startsWith('force_')
        const cached = this.cache.get(cacheKey)
        const now = this.clock()
        if (!forced && cached && now - cached.at < this.limits.cacheTtlMs) {
            this.counters.cacheHits += 1
            return this.render(cached, cacheKey, true)
        }
        const compiled = this.compile(request)
        const release = await this.concurrency.acquire(String(this.options.projectId))
        if (!release) {
            this.counters.throttled += 1
            const detail =
                `Exceeded maximum concurrency limit: ${this.concurrency.limit} for key: ` +
                `api:query:per-org:${this.options.projectId} and task: ${cacheKey.slice(0, 16)}`
            throw new HttpError(429, errorBody('throttled_error', 'throttled', detail))
        }
        try {
            if (slow) {
                this.counters.faults.slow += 1
                await this.slowQuery(res)
            }
            const result = await this.execute(compiled, this.personsMode(request))
            if (this.limits.cacheTtlMs > 0) {
                this.remember(cacheKey, result)
            }
            return this.render(result, cacheKey, false)
        } finally {
            release()
        }
    }

    /** A query that runs for `slowMs`; past the execution timeout ClickHouse would have stopped it: a 504. */
    private async slowQuery(res: ServerResponse): Promise<void> {
        const timeoutMs = this.limits.maxExecutionSeconds * 1000
        const slowMs = this.faults.slowMs ?? timeoutMs + 50
        await sleep(Math.min(slowMs, timeoutMs))
        if (slowMs >= timeoutMs && !res.destroyed) {
            throw new HttpError(504, errorBody('server_error', 'error', TIMEOUT_DETAIL))
        }
    }

    /** The query's persons-on-events mode: its modifier, else the project's (modifiers take precedence in PostHog). */
    private personsMode(request: QueryRequestBody): PersonsOnEventsMode {
        const asked = request.query.modifiers?.personsOnEventsMode as PersonsOnEventsMode | undefined
        return asked ?? this.options.personsOnEventsMode ?? 'person_id_override_properties_on_events'
    }

    private compile(request: QueryRequestBody): CompiledQuery {
        try {
            return compileHogQL(this.parser, request.query.query, request.query.values, {
                table: this.store.table,
                teamId: this.options.projectId,
                defaultRows: this.limits.defaultRows,
                maxRows: this.limits.maxRows,
                allowOffset: this.options.allowOffset ?? false,
                timezone: 'UTC',
                personsOnEventsMode: this.personsMode(request),
                personsTable: this.store.personsTable,
                overridesTable: this.store.overridesTable,
            })
        } catch (error) {
            if (error instanceof HogQLError) {
                throw new HttpError(400, errorBody('validation_error', error.code, error.message))
            }
            throw error
        }
    }

    /** Runs the compiled query on ClickHouse and renders each row as a JSON array, as PostHog's renderer would. */
    private async execute(compiled: CompiledQuery, personsOnEventsMode: PersonsOnEventsMode): Promise<CachedResult> {
        // Lazy materialization (read wide columns such as properties only for the rows that survive ORDER BY … LIMIT)
        // changes no result, only speed; ClickHouse applies it by default only up to LIMIT 10.
        const settings =
            `SETTINGS max_execution_time = ${this.limits.maxExecutionSeconds}, readonly = 2, ` +
            `query_plan_max_limit_for_lazy_materialization = ${this.limits.maxRows + 1}, ` +
            // PostHog runs every HogQL query with transform_null_in (posthog/hogql/constants.py): NULL IN (NULL) holds.
            `transform_null_in = 1, ${OUTPUT_SETTINGS}`
        try {
            const described = await this.describe(compiled.typesSql)
            const types = compiled.columns.map((name, i): [string, string] => [name, described[i]?.type ?? 'String'])
            const select = compiled.aliases.map((alias, i) => formatColumn(alias, types[i]?.[1] ?? 'String'))
            const sql = `SELECT ${select.join(', ')}\nFROM (\n${compiled.sql}\n)\n${settings}`
            this.counters.queries += 1
            const output = await this.store.runBytes(sql)
            const { json, hasMore, rows } = rowsToJsonArray(output, compiled.paginator?.pageSize ?? null)
            this.counters.rowsReturned += rows
            return {
                at: this.clock(),
                results: json,
                hasMore,
                types,
                clickhouse: compiled.sql,
                compiled,
                personsOnEventsMode,
            }
        } catch (error) {
            throw queryError(error)
        }
    }

    /** Caches a result, dropping the oldest while the cache holds more than its bound (Maps keep insert order). */
    private remember(cacheKey: string, result: CachedResult): void {
        const previous = this.cache.get(cacheKey)
        if (previous) {
            this.cache.delete(cacheKey)
            this.cachedBytes -= previous.results.length
        }
        this.cache.set(cacheKey, result)
        this.cachedBytes += result.results.length
        for (const [key, entry] of this.cache) {
            if (this.cachedBytes <= this.limits.cacheMaxBytes || key === cacheKey) {
                break
            }
            this.cache.delete(key)
            this.cachedBytes -= entry.results.length
        }
    }

    /** Column types by SELECT list: a cursor's pages share one, so DESCRIBE runs once, not per page. */
    private async describe(typesSql: string): Promise<ColumnType[]> {
        let types = this.types.get(typesSql)
        if (!types) {
            types = await this.store.describe(typesSql)
            if (this.types.size >= 1000) {
                this.types.clear()
            }
            this.types.set(typesSql, types)
        }
        return types
    }

    /** The 200 body with the key order of a production response; `results` is spliced in as ClickHouse wrote it. */
    private render(result: CachedResult, cacheKey: string, isCached: boolean): Buffer[] {
        const token = `__results_${cacheKey}__`
        const { compiled } = result
        const body = {
            cache_key: `cache_${this.options.projectId}_${cacheKey}`,
            cache_target_age: posthogDateTime(result.at + this.limits.cacheTtlMs),
            calculation_trigger: null,
            clickhouse: result.clickhouse,
            columns: compiled.columns,
            error: null,
            explain: null,
            hasMore: result.hasMore,
            hogql: compiled.hogql,
            is_cached: isCached,
            last_refresh: posthogDateTime(result.at),
            limit: compiled.paginator ? compiled.paginator.pageSize : null,
            metadata: null,
            modifiers: {
                convertToProjectTimezone: true,
                personsOnEventsMode: result.personsOnEventsMode,
            },
            next_allowed_client_refresh: posthogDateTime(result.at + 60_000),
            offset: compiled.paginator ? 0 : null,
            query: null,
            query_metadata: null,
            query_status: null,
            resolved_date_range: null,
            results: token,
            timezone: 'UTC',
            timings: null,
            types: result.types,
        }
        const [before, after] = JSON.stringify(body).split(`"${token}"`) as [string, string]
        // In pieces, written one after the other: joining them would copy the megabytes of results once more.
        return [Buffer.from(before), result.results, Buffer.from(after)]
    }

    /** Stores events; `createdAt` applies to those without their own created_at (default: the insert's moment). */
    async insertEvents(events: StandInEvent[], options: { createdAt?: string | Date } = {}): Promise<StoredEvent[]> {
        const { createdAt } = options
        const stored = events.map((event) =>
            normalizeEvent(
                createdAt !== undefined && event.created_at === undefined ? { ...event, created_at: createdAt } : event
            )
        )
        await this.store.insertJsonLines(stored.map((event) => eventJsonLine(event, this.options.projectId)).join('\n'))
        return stored
    }

    /**
     * Events that happened `ageMs` ago (by their timestamp) but are stored now: PostHog's late arrivals. With
     * `visibilityLagMs`, their created_at lies that far in the past, as when ingestion stamped them before Kafka
     * and ClickHouse made them visible (standin/FACTS.md §7).
     */
    async insertLateEvents(count: number, options: LateOptions = {}): Promise<StoredEvent[]> {
        const now = this.clock()
        const at = now - (options.ageMs ?? 3600_000)
        const createdAt = options.visibilityLagMs ? posthogDateTime(now - options.visibilityLagMs) : undefined
        const events = Array.from({ length: count }, (_, i) => ({
            event: options.event ?? 'late event',
            distinct_id: `late-user-${i % 10}`,
            properties: { late: true, n: i },
            timestamp: posthogDateTime(at + i),
        }))
        return this.insertEvents(events, { createdAt })
    }

    async insertPersons(persons: StandInPerson[], overrides: StandInOverride[] = []): Promise<void> {
        const team = this.options.projectId
        await this.store.insertInto(this.store.personsTable, persons.map((p) => personJsonLine(p, team)).join('\n'))
        const lines = overrides.map((o) => overrideJsonLine(o, team)).join('\n')
        await this.store.insertInto(this.store.overridesTable, lines)
    }

    async seed(options: SeedOptions): Promise<void> {
        await this.store.run(seedSql(this.store.table, this.options.projectId, options, this.clock()), 'CSV')
    }

    /** `/_standin/*`: the control API spawnPostHogStandIn's client calls, behind its own token. */
    private async control(req: IncomingMessage, path: string): Promise<unknown> {
        if (req.headers['x-standin-control'] !== this.options.controlToken) {
            throw new HttpError(403, errorBody('authentication_error', 'permission_denied', 'Bad control token.'))
        }
        const raw = await readBody(req)
        const body = (raw ? JSON.parse(raw) : {}) as Record<string, unknown>
        switch (path) {
            case '/_standin/events':
                return this.insertEvents(body.events as StandInEvent[], body as { createdAt?: string })
            case '/_standin/late':
                return this.insertLateEvents(Number(body.count), body as LateOptions)
            case '/_standin/persons':
                return this.insertPersons(body.persons as StandInPerson[], body.overrides as StandInOverride[])
            case '/_standin/seed':
                return this.seed(body as unknown as SeedOptions)
            case '/_standin/faults':
                return this.setFaults(body as StandInFaults)
            case '/_standin/limits':
                return this.setLimits(body as Partial<StandInLimits>)
            case '/_standin/stats':
                return this.counters
            case '/_standin/count':
                return { count: await this.store.count(this.options.projectId) }
            default:
                throw new HttpError(404, errorBody('invalid_request', 'not_found', 'Endpoint not found.'))
        }
    }
}

function validateOptions(options: StandInOptions): void {
    if (typeof options.apiKey !== 'string' || options.apiKey.length === 0) {
        throw new Error('Expected `apiKey` to be a non-empty string')
    }
    if (!Number.isSafeInteger(options.projectId) || options.projectId < 1) {
        throw new Error('Expected `projectId` to be a positive whole number')
    }
}

/** Starts a stand-in in this process. See the file comment for the API. */
export async function startPostHogStandIn(options: StandInOptions): Promise<PostHogStandIn> {
    validateOptions(options)
    const parser = cachingParser(await loadParser())
    const store = await EventStore.open(options.dataDir)
    const standIn = new StandIn(options, store, parser)
    const server: Server = createServer((req, res) => {
        void standIn.handle(req, res)
    })
    try {
        await new Promise<void>((resolve, reject) => {
            server.once('error', reject)
            server.listen(options.port ?? 0, options.host ?? '127.0.0.1', () => resolve())
        })
    } catch (error) {
        await store.close()
        throw error
    }
    const address = server.address() as AddressInfo
    const host = address.family === 'IPv6' ? `[${address.address}]` : address.address
    let closed = false
    return {
        url: `http://${host}:${address.port}`,
        projectId: options.projectId,
        get queries() {
            return standIn.counters.queries
        },
        get requests() {
            return standIn.counters.requests
        },
        log: standIn.log,
        insertEvents: (events, opts) => standIn.insertEvents(events, opts),
        insertLateEvents: (count, opts) => standIn.insertLateEvents(count, opts),
        insertPersons: (persons, overrides) => standIn.insertPersons(persons, overrides),
        seed: (opts) => standIn.seed(opts),
        count: () => standIn.store.count(options.projectId),
        setFaults: (faults) => standIn.setFaults(faults),
        setLimits: (limits) => standIn.setLimits(limits),
        stats: async () => structuredClone(standIn.counters),
        close: async () => {
            if (closed) {
                return
            }
            closed = true
            server.closeAllConnections()
            await new Promise<void>((resolve) => server.close(() => resolve()))
            await store.close()
        },
    }
}
