/**
 * The PostHog stand-in through real HTTP: PostHog's auth errors, HogQL errors from PostHog's own parser, row caps,
 * throttles with Retry-After, the concurrency limit, encodings as PostHog renders them, ClickHouse's UUID order, the
 * cache, late events and faults. One stand-in (one chdb engine) serves the whole file; each test uses its own
 * event names so their rows never mix.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { parseStandInArgs } from '../tools/standin/cli'
import { EngineError } from '../tools/standin/engine'
import { backoffMs, checkThrottles, parseRate, SlidingWindowThrottle, throttledDetail } from '../tools/standin/limits'
import { queryError } from '../tools/standin/respond'
import { loadParser, PostHogStandIn, startPostHogStandIn } from '../tools/standin/server'
import { posthogDateTime, rowsToJsonArray } from '../tools/standin/server'
import { spawnPostHogStandIn } from '../tools/standin/spawn'

const API_KEY = 'phx_St4ndIn_t3st_k3y_5f4e3d2c1b'
const NO_SCOPE_KEY = 'phx_N0Sc0pe_k3y_11223344'
const PROJECT = 7001
const ROOMY = { burstRate: '10000/minute', sustainedRate: '100000/hour', cacheTtlMs: 0, concurrentQueries: 3 }

let posthog: PostHogStandIn

beforeAll(async () => {
    posthog = await startPostHogStandIn({
        apiKey: API_KEY,
        projectId: PROJECT,
        extraKeys: [{ key: NO_SCOPE_KEY, scopes: ['insight:read'] }],
        limits: ROOMY,
    })
})

afterAll(async () => {
    // Nothing the stand-in recorded holds the key.
    expect(JSON.stringify(posthog.log)).not.toContain(API_KEY)
    await posthog.close()
})

beforeEach(() => {
    posthog.setLimits({ ...ROOMY, maxExecutionSeconds: 10, concurrencyWaitMs: 30_000, defaultRows: 100 })
    posthog.setFaults({})
})

interface Reply {
    status: number
    retryAfter: string | null
    body: Record<string, unknown>
}

async function post(
    payload: unknown,
    options: { key?: string | null; path?: string } = {}
): Promise<Reply & { results: unknown[][] }> {
    const headers: Record<string, string> = { 'Content-Type': 'application/json' }
    const key = options.key === undefined ? API_KEY : options.key
    if (key !== null) {
        headers.Authorization = `Bearer ${key}`
    }
    const response = await fetch(`${posthog.url}${options.path ?? `/api/projects/${PROJECT}/query/`}`, {
        method: 'POST',
        headers,
        body: JSON.stringify(payload),
    })
    const body = (await response.json()) as Record<string, unknown>
    return {
        status: response.status,
        retryAfter: response.headers.get('retry-after'),
        body,
        results: (body.results ?? []) as unknown[][],
    }
}

function hogql(query: string, extra: Record<string, unknown> = {}, values?: Record<string, unknown>) {
    return post({ query: { kind: 'HogQLQuery', query, ...(values ? { values } : {}) }, ...extra })
}

describe('authentication and routing', () => {
    it('a wrong key gets 401 with PostHog body, and the body does not echo the key', async () => {
        const reply = await post(
            { query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } },
            { key: 'phx_wrong_key_123' }
        )
        expect(reply.status).toBe(401)
        expect(reply.body).toEqual({
            type: 'authentication_error',
            code: 'authentication_failed',
            detail: 'Personal API key found in request Authorization header is invalid.',
            attr: null,
        })
        expect(JSON.stringify(reply.body)).not.toContain('phx_wrong_key_123')
    })

    it('no Authorization header gets 401 not_authenticated', async () => {
        const reply = await post({ query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } }, { key: null })
        expect(reply.status).toBe(401)
        expect(reply.body).toMatchObject({
            code: 'not_authenticated',
            detail: 'Authentication credentials were not provided.',
        })
    })

    it('reads the key only from "Bearer <key>", case-sensitive, as PostHog does', async () => {
        const reply = await post({ query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } }, { key: null })
        const lower = await fetch(`${posthog.url}/api/projects/${PROJECT}/query/`, {
            method: 'POST',
            headers: { Authorization: `bearer ${API_KEY}`, 'Content-Type': 'application/json' },
            body: JSON.stringify({ query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } }),
        })
        expect(lower.status).toBe(401)
        expect(await lower.json()).toEqual(reply.body)
    })

    it('also takes the key from a personal_api_key body field or query parameter, and never records it', async () => {
        const inBody = await post(
            { query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events LIMIT 1' }, personal_api_key: API_KEY },
            { key: null }
        )
        expect(inBody.status).toBe(200)
        expect(posthog.log[posthog.log.length - 1]?.body).toMatchObject({ personal_api_key: '[redacted]' })
        const inQuery = await post(
            { query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events LIMIT 1' } },
            { key: null, path: `/api/projects/${PROJECT}/query/?personal_api_key=${API_KEY}` }
        )
        expect(inQuery.status).toBe(200)
        const wrong = await post(
            { query: { kind: 'HogQLQuery', query: 'SELECT 1' }, personal_api_key: 'phx_nope_1' },
            { key: null }
        )
        expect(wrong.body.detail).toBe('Personal API key found in request body is invalid.')
    })

    it('can answer a bad key with 403, as DRF may on the query view, with the same body', async () => {
        const strict = await startPostHogStandIn({ apiKey: API_KEY, projectId: 7002, unauthenticatedStatus: 403 })
        try {
            const response = await fetch(`${strict.url}/api/projects/7002/query/`, {
                method: 'POST',
                headers: { Authorization: 'Bearer phx_wrong_key_456', 'Content-Type': 'application/json' },
                body: JSON.stringify({ query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } }),
            })
            expect(response.status).toBe(403)
            expect(await response.json()).toMatchObject({ type: 'authentication_error', code: 'authentication_failed' })
        } finally {
            await strict.close()
        }
    })

    it('a key without query:read gets 403 naming the scope', async () => {
        const reply = await post(
            { query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } },
            { key: NO_SCOPE_KEY }
        )
        expect(reply.status).toBe(403)
        expect(reply.body).toEqual({
            type: 'authentication_error',
            code: 'permission_denied',
            detail: "API key missing required scope 'query:read'",
            attr: null,
        })
    })

    it('a body not sent as application/json gets 415, as DRF answers for text/plain', async () => {
        const response = await fetch(`${posthog.url}/api/projects/${PROJECT}/query/`, {
            method: 'POST',
            headers: { Authorization: `Bearer ${API_KEY}` },
            body: JSON.stringify({ query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } }),
        })
        expect(response.status).toBe(415)
        expect(await response.json()).toEqual({
            type: 'invalid_request',
            code: 'unsupported_media_type',
            detail: 'Unsupported media type "text/plain;charset=UTF-8" in request.',
            attr: null,
        })
    })

    it('an unknown project gets 404 Project not found', async () => {
        const reply = await post(
            { query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events' } },
            { path: '/api/projects/999/query/' }
        )
        expect(reply.status).toBe(404)
        expect(reply.body).toEqual({
            type: 'invalid_request',
            code: 'not_found',
            detail: 'Project not found.',
            attr: null,
        })
    })

    it('serves the /api/environments/:id/query alias, with or without the trailing slash', async () => {
        for (const path of [`/api/environments/${PROJECT}/query/`, `/api/environments/${PROJECT}/query`]) {
            const reply = await post({ query: { kind: 'HogQLQuery', query: 'SELECT 1 FROM events LIMIT 1' } }, { path })
            expect(reply.status).toBe(200)
        }
    })
})

describe('HogQL through PostHog parser', () => {
    it('a syntax error is a 400 hogql_syntax_error whose detail is the parser own message', async () => {
        const query = 'SELEC uuid FROM events'
        const reply = await hogql(query)
        const parser = await loadParser()
        const parsed = JSON.parse(parser.parseSelect(query, true)) as { error: boolean; message: string }
        expect(parsed.error).toBe(true)
        expect(reply.status).toBe(400)
        expect(reply.body).toEqual({
            type: 'validation_error',
            code: 'hogql_syntax_error',
            detail: parsed.message,
            attr: null,
        })
        expect(parsed.message).toBe("mismatched input 'SELEC' expecting {SELECT, WITH, '{', '(', '<'}")
    })

    it('an unknown field is a 400 hogql_query_error', async () => {
        const reply = await hogql('SELECT nope FROM events')
        expect(reply.status).toBe(400)
        expect(reply.body).toMatchObject({ code: 'hogql_query_error', detail: 'Unable to resolve field: nope' })
    })

    it('OFFSET is refused with PostHog text for personal API keys', async () => {
        const reply = await hogql('SELECT uuid FROM events ORDER BY uuid LIMIT 10 OFFSET 10')
        expect(reply.status).toBe(400)
        expect(String(reply.body.detail)).toMatch(/^OFFSET is not supported on queries made with a personal API key/)
    })

    it('what the stand-in does not print is a clear 400, not a guess', async () => {
        const reply = await hogql('SELECT e.uuid FROM events e JOIN persons p ON e.person_id = p.id')
        expect(reply.status).toBe(400)
        expect(reply.body).toMatchObject({ type: 'validation_error', code: 'hogql_query_error' })
        expect(String(reply.body.detail)).toContain('JOIN is not supported by the PostHog stand-in')
    })

    it('finds functions by exact name, else lowercase, as PostHog does: NOT (…) and COUNT() work', async () => {
        await posthog.insertEvents([
            { event: 'case test', distinct_id: 'keep', timestamp: '2026-11-20T00:00:00Z' },
            { event: 'case test', distinct_id: 'drop', timestamp: '2026-11-20T00:00:00Z' },
        ])
        const reply = await hogql("SELECT COUNT() FROM events WHERE event = 'case test' AND NOT (distinct_id = 'drop')")
        expect(reply.results).toEqual([[1]])
    })

    it('fills {placeholders} from values, and names a missing one', async () => {
        await posthog.insertEvents([
            { event: 'placeholder test', distinct_id: 'p1', timestamp: '2026-11-20T00:00:00Z' },
        ])
        const ok = await hogql('SELECT distinct_id FROM events WHERE event = {name}', {}, { name: 'placeholder test' })
        expect(ok.results).toEqual([['p1']])
        const missing = await hogql('SELECT distinct_id FROM events WHERE event = {other}', {}, { name: 'x' })
        expect(missing.status).toBe(400)
        expect(missing.body.detail).toBe(
            'Placeholder {other} is not available in this context. You can use the following: name'
        )
    })
})

describe('results', () => {
    it('encodes datetimes, UUIDs and properties as PostHog renders them, with columns and types', async () => {
        await posthog.insertEvents([
            {
                uuid: '0190a1b2-0000-7000-8000-000000000001',
                event: 'encoding test',
                distinct_id: 'user/1',
                properties: { $browser: 'Firefox', nested: { a: [1, 2] } },
                timestamp: '2026-11-27T10:00:00.123456Z',
                created_at: '2026-11-27T10:00:05Z',
            },
        ])
        const reply = await hogql(
            "SELECT uuid, event, distinct_id, properties, timestamp, created_at, properties.$browser AS browser, properties.missing FROM events WHERE event = 'encoding test'"
        )
        expect(reply.status).toBe(200)
        expect(reply.body.columns).toEqual([
            'uuid',
            'event',
            'distinct_id',
            'properties',
            'timestamp',
            'created_at',
            'browser',
            'properties.missing',
        ])
        expect(reply.body.types).toEqual([
            ['uuid', 'UUID'],
            ['event', 'String'],
            ['distinct_id', 'String'],
            ['properties', 'String'],
            ['timestamp', "DateTime64(6, 'UTC')"],
            ['created_at', "DateTime64(6, 'UTC')"],
            ['browser', 'Nullable(String)'],
            ['properties.missing', 'Nullable(String)'],
        ])
        const [row] = reply.results
        expect(row).toEqual([
            '0190a1b2-0000-7000-8000-000000000001',
            'encoding test',
            'user/1',
            JSON.stringify({ $browser: 'Firefox', nested: { a: [1, 2] } }),
            '2026-11-27T10:00:00.123000Z', // stored to the millisecond, as PostHog's ingestion writes it
            '2026-11-27T10:00:05Z',
            'Firefox',
            null,
        ])
        expect(reply.body).toMatchObject({ timezone: 'UTC', is_cached: false, error: null, hasMore: false })
    })

    it('refuses an event whose timestamp is not a time, naming the field', async () => {
        await expect(
            posthog.insertEvents([{ event: 'bad time', distinct_id: 'b', timestamp: 'yesterday' }])
        ).rejects.toThrow('Expected `timestamp` to be an ISO 8601 time, got "yesterday"')
        expect((await hogql("SELECT count() FROM events WHERE event = 'bad time'")).results).toEqual([[0]])
    })

    it('without LIMIT returns 100 rows with hasMore, limit and offset; with LIMIT caps at 50,000 and leaves them null', async () => {
        await posthog.seed({ count: 50_010, eventNames: ['cap test'], start: '2026-10-01T00:00:00Z', seed: 11 })
        const page = await hogql("SELECT uuid FROM events WHERE event = 'cap test'")
        expect(page.results).toHaveLength(100)
        expect(page.body).toMatchObject({ hasMore: true, limit: 100, offset: 0 })

        const capped = await hogql("SELECT uuid FROM events WHERE event = 'cap test' LIMIT 100000")
        expect(capped.results).toHaveLength(50_000)
        expect(capped.body).toMatchObject({ hasMore: null, limit: null, offset: null })

        const last = await hogql(
            "SELECT uuid FROM events WHERE event = 'cap test' AND toUnixTimestamp64Micro(timestamp) % 5000000 = 0"
        )
        expect(last.body).toMatchObject({ hasMore: false, limit: 100 })
        expect(last.results).toHaveLength(11)
    })

    it('orders UUIDs the way ClickHouse does (second half first), not as strings, in ORDER BY and in comparisons', async () => {
        const uuids = [
            '00000001-0000-0000-ffff-000000000000',
            '00000000-0000-0000-0000-000000000002',
            'ffffffff-0000-0000-0000-000000000001',
            '00000000-0000-0001-0000-000000000000',
        ]
        await posthog.insertEvents(
            uuids.map((uuid) => ({ uuid, event: 'uuid order', distinct_id: 'u', timestamp: '2026-11-01T00:00:00Z' }))
        )
        const ordered = await hogql("SELECT uuid FROM events WHERE event = 'uuid order' ORDER BY uuid")
        const clickhouseOrder = ordered.results.map((row) => row[0])
        expect(clickhouseOrder).toEqual([
            '00000000-0000-0001-0000-000000000000',
            'ffffffff-0000-0000-0000-000000000001',
            '00000000-0000-0000-0000-000000000002',
            '00000001-0000-0000-ffff-000000000000',
        ])
        expect(clickhouseOrder).not.toEqual([...uuids].sort())

        const after = await hogql(
            "SELECT uuid FROM events WHERE event = 'uuid order' AND uuid > {cursor} ORDER BY uuid",
            {},
            { cursor: 'ffffffff-0000-0000-0000-000000000001' }
        )
        // String order would say nothing is above ffffffff-…; ClickHouse compares the second halves.
        expect(after.results.map((row) => row[0])).toEqual(clickhouseOrder.slice(2))
    })

    it('a (created_at, uuid) keyset cursor pages through events sharing one created_at without skipping or repeating', async () => {
        await posthog.seed({
            count: 250,
            eventNames: ['tie test'],
            sameTimestamp: 250,
            start: '2026-09-01T00:00:00Z',
            seed: 21,
        })
        const seen: string[] = []
        let cursor = { created: '1970-01-01T00:00:00Z', uuid: '00000000-0000-0000-0000-000000000000' }
        for (let page = 0; page < 10; page++) {
            const reply = await hogql(
                "SELECT uuid, created_at FROM events WHERE event = 'tie test' AND (created_at, uuid) > (toDateTime({c}), toUUID({u})) ORDER BY created_at, uuid LIMIT 60",
                {},
                { c: cursor.created, u: cursor.uuid }
            )
            expect(reply.status).toBe(200)
            const rows = reply.results as string[][]
            seen.push(...rows.map((row) => row[0] as string))
            if (rows.length < 60) {
                break
            }
            const last = rows[rows.length - 1] as string[]
            cursor = { created: last[1] as string, uuid: last[0] as string }
        }
        expect(seen).toHaveLength(250)
        expect(new Set(seen).size).toBe(250)
    })

    it('late events keep their old timestamp but get a new created_at, so a created_at cursor sees them', async () => {
        const before = posthogDateTime(Date.now() - 1000)
        const late = await posthog.insertLateEvents(4, { ageMs: 6 * 3600_000, event: 'late test' })
        const reply = await hogql(
            "SELECT uuid, timestamp, created_at FROM events WHERE event = 'late test' AND created_at > toDateTime({since}) ORDER BY created_at, uuid",
            {},
            { since: before }
        )
        expect(reply.results).toHaveLength(4)
        expect(new Set(reply.results.map((row) => row[0]))).toEqual(new Set(late.map((event) => event.uuid)))
        for (const row of reply.results) {
            expect(Date.parse(row[2] as string) - Date.parse(row[1] as string)).toBeGreaterThan(5 * 3600_000)
        }
        const byTimestamp = await hogql(
            "SELECT uuid FROM events WHERE event = 'late test' AND timestamp > toDateTime({since})",
            {},
            { since: before }
        )
        expect(byTimestamp.results).toEqual([])
    })

    it('late events can become visible after their created_at, as through Kafka', async () => {
        const queryTime = Date.now()
        const [event] = await posthog.insertLateEvents(1, { ageMs: 60_000, visibilityLagMs: 30_000, event: 'lag test' })
        const reply = await hogql("SELECT created_at FROM events WHERE event = 'lag test'")
        const createdAt = Date.parse(reply.results[0]?.[0] as string)
        expect(event?.created_at).toBe(new Date(createdAt).toISOString())
        expect(queryTime - createdAt).toBeGreaterThanOrEqual(29_000)
    })

    it('serves a repeated query from cache until refresh is forced', async () => {
        posthog.setLimits({ cacheTtlMs: 60_000 })
        const query = "SELECT count() FROM events WHERE event = 'cache test'"
        expect((await hogql(query)).results).toEqual([[0]])
        await posthog.insertEvents([{ event: 'cache test', distinct_id: 'c', timestamp: '2026-11-27T00:00:00Z' }])
        const cached = await hogql(query)
        expect(cached.body.is_cached).toBe(true)
        expect(cached.results).toEqual([[0]])
        const forced = await hogql(query, { refresh: 'force_blocking' })
        expect(forced.body.is_cached).toBe(false)
        expect(forced.results).toEqual([[1]])
    })

    it('keeps at most cacheMaxBytes of results, dropping the oldest first', async () => {
        // Each result below is `[[n]]`, 5 bytes: room for two of them.
        posthog.setLimits({ cacheTtlMs: 60_000, cacheMaxBytes: 10 })
        const queries = [1, 2, 3].map((n) => `SELECT ${n} FROM events LIMIT 1`)
        await posthog.insertEvents([{ event: 'cache bound', distinct_id: 'c', timestamp: '2026-11-27T00:00:00Z' }])
        for (const query of queries) {
            expect((await hogql(query)).body.is_cached).toBe(false)
        }
        const again = []
        for (const query of [...queries].reverse()) {
            again.push((await hogql(query)).body.is_cached)
        }
        // 3 and 2 were kept; 1 was dropped, and running it again pushed out 2 for the same reason.
        expect(again).toEqual([true, true, false])
    })
})

describe('limits', () => {
    it('over the burst rate: 429 with Retry-After until the oldest request leaves the window', async () => {
        posthog.setLimits({ burstRate: '3/minute' })
        const statuses: number[] = []
        let last: Reply | undefined
        for (let i = 0; i < 4; i++) {
            last = await hogql('SELECT 1 FROM events LIMIT 1')
            statuses.push(last.status)
        }
        expect(statuses).toEqual([200, 200, 200, 429])
        expect(last?.retryAfter).toBe('60')
        expect(last?.body).toEqual({
            type: 'throttled_error',
            code: 'throttled',
            detail: 'Request was throttled. Expected available in 60 seconds.',
            attr: null,
        })
    })

    it('over the sustained rate: Retry-After counts to the end of the hour', async () => {
        posthog.setLimits({ sustainedRate: '2/hour' })
        await hogql('SELECT 1 FROM events LIMIT 1')
        await hogql('SELECT 1 FROM events LIMIT 1')
        const third = await hogql('SELECT 1 FROM events LIMIT 1')
        expect(third.status).toBe(429)
        expect(third.retryAfter).toBe('3600')
    })

    it('over the concurrency limit a query waits, then gets 429 without Retry-After', async () => {
        posthog.setLimits({ concurrentQueries: 1, concurrencyWaitMs: 300, maxExecutionSeconds: 5 })
        posthog.setFaults({ script: ['slow', 'ok'], slowMs: 700 })
        const first = hogql('SELECT 1 FROM events LIMIT 1')
        await new Promise((resolve) => setTimeout(resolve, 100))
        const started = Date.now()
        const second = await hogql('SELECT 2 FROM events LIMIT 1')
        expect(Date.now() - started).toBeGreaterThanOrEqual(250)
        expect(second.status).toBe(429)
        expect(second.retryAfter).toBeNull()
        expect(String(second.body.detail)).toMatch(/^Exceeded maximum concurrency limit: 1 for key: /)
        expect((await first).status).toBe(200)
    })

    it('a query past the execution time gets 504 with PostHog body', async () => {
        posthog.setLimits({ maxExecutionSeconds: 0.3 })
        posthog.setFaults({ script: ['slow'] })
        const reply = await hogql('SELECT 1 FROM events LIMIT 1')
        expect(reply.status).toBe(504)
        expect(reply.body).toMatchObject({ type: 'server_error', code: 'error' })
        expect(String(reply.body.detail)).toMatch(/^Query has hit the max execution time before completing/)
    })
})

describe('faults', () => {
    it('a scripted 429 carries the configured Retry-After, a scripted 500 PostHog server error, then queries pass', async () => {
        posthog.setFaults({ script: ['429', '500'], retryAfterSeconds: 2 })
        const throttled = await hogql('SELECT 1 FROM events LIMIT 1')
        expect(throttled.status).toBe(429)
        expect(throttled.retryAfter).toBe('2')
        expect(throttled.body.detail).toBe('Request was throttled. Expected available in 2 seconds.')
        const failed = await hogql('SELECT 1 FROM events LIMIT 1')
        expect(failed.status).toBe(500)
        expect(failed.body).toEqual({
            type: 'server_error',
            code: 'error',
            detail: 'A server error occurred.',
            attr: null,
        })
        expect((await hogql('SELECT 1 FROM events LIMIT 1')).status).toBe(200)
    })

    it('the late fault stores late events after every n-th answered query', async () => {
        const before = (await posthog.stats()).lateEvents
        posthog.setFaults({ late: { every: 1, count: 3, ageMs: 3600_000 } })
        await hogql('SELECT 1 FROM events LIMIT 1')
        await hogql('SELECT 1 FROM events LIMIT 1')
        expect((await posthog.stats()).lateEvents - before).toBe(6)
    })

    it('random faults repeat with their seed', async () => {
        const run = async () => {
            posthog.setFaults({ rate429: 0.3, rate500: 0.3, seed: 42 })
            const statuses: number[] = []
            for (let i = 0; i < 8; i++) {
                statuses.push((await hogql('SELECT 1 FROM events LIMIT 1')).status)
            }
            return statuses
        }
        const first = await run()
        expect(first).toEqual(await run())
        expect(new Set(first).size).toBeGreaterThan(1)
    })
})

describe('spawnPostHogStandIn', () => {
    it('serves the same API from a child process, stops it on close, and keeps a dataDir across a restart', async () => {
        const dataDir = mkdtempSync(join(tmpdir(), 'standin-data-'))
        const options = { apiKey: 'phx_child_k3y_abc', projectId: 31, limits: ROOMY, dataDir }
        const query = (url: string, hogqlText: string) =>
            fetch(`${url}/api/projects/31/query/`, {
                method: 'POST',
                headers: { Authorization: 'Bearer phx_child_k3y_abc', 'Content-Type': 'application/json' },
                body: JSON.stringify({ query: { kind: 'HogQLQuery', query: hogqlText } }),
            })
        try {
            const child = await spawnPostHogStandIn(options)
            try {
                await child.seed({ count: 100, eventNames: ['spawned'], start: '2026-11-01T00:00:00Z' })
                const [stored] = await child.insertEvents([
                    { event: 'spawned', distinct_id: 'x', timestamp: '2026-11-02T00:00:00Z' },
                ])
                expect(await child.count()).toBe(101)
                const response = await query(child.url, "SELECT uuid FROM events WHERE distinct_id = 'x'")
                expect(response.status).toBe(200)
                expect(((await response.json()) as { results: unknown[] }).results).toEqual([[stored?.uuid]])
                await child.setFaults({ script: ['500'] })
                expect((await query(child.url, 'SELECT 1 FROM events LIMIT 1')).status).toBe(500)
                expect(await child.stats()).toMatchObject({ requests: 2, queries: 1, faults: { '500': 1 } })
            } finally {
                await child.close()
            }
            expect(() => process.kill(child.pid, 0)).toThrow()

            const restarted = await spawnPostHogStandIn(options)
            try {
                expect(await restarted.count()).toBe(101)
            } finally {
                await restarted.close()
            }
        } finally {
            rmSync(dataDir, { recursive: true, force: true })
        }
    })
})

describe('tools/standin/cli.ts flags', () => {
    it('reads the project, port, seed and limits, and names a bad flag', () => {
        expect(parseStandInArgs(['--project-id', '5', '--port', '8010', '--seed', '1000'])).toEqual({
            projectId: 5,
            port: 8010,
            host: '127.0.0.1',
            seed: 1000,
        })
        expect(parseStandInArgs(['--limits', '{"burstRate":"5/minute"}']).limits).toEqual({ burstRate: '5/minute' })
        expect(() => parseStandInArgs(['--port', 'eighty'])).toThrow('--port expects a whole number, got "eighty"')
        expect(() => parseStandInArgs(['--api-key', 'phx_x'])).toThrow('unknown flag --api-key')
    })
})

describe('throttle arithmetic (DRF SimpleRateThrottle)', () => {
    it('lets N requests through per window and waits for the oldest to expire', () => {
        let now = 0
        const throttle = new SlidingWindowThrottle(2, 60_000, () => now)
        expect(throttle.hit('k')).toBeNull()
        now = 10_000
        expect(throttle.hit('k')).toBeNull()
        now = 15_000
        expect(throttle.hit('k')).toBe(45) // the first request leaves the window at 60 s
        now = 60_001
        expect(throttle.hit('k')).toBeNull()
    })

    it('takes the longest wait of all throttles and rounds it up', () => {
        let now = 0
        const burst = new SlidingWindowThrottle(1, 1000, () => now)
        const sustained = new SlidingWindowThrottle(1, 3_600_000, () => now)
        expect(checkThrottles([burst, sustained], 'k')).toBeNull()
        now = 500
        expect(checkThrottles([burst, sustained], 'k')).toBe(3600)
    })

    it('parses DRF rates and words the detail like DRF', () => {
        expect(parseRate('240/minute')).toEqual({ numRequests: 240, durationMs: 60_000 })
        expect(parseRate('2400/hour')).toEqual({ numRequests: 2400, durationMs: 3_600_000 })
        expect(() => parseRate('lots')).toThrow('Expected a rate like "240/minute"')
        expect(throttledDetail(1)).toBe('Request was throttled. Expected available in 1 second.')
        expect(throttledDetail(null)).toBe('Request was throttled.')
        expect([1, 2, 3, 10].map(backoffMs)).toEqual([134, 201, 301.5, 1714])
    })

    it("joins ClickHouse's rows into one JSON array and cuts the paginator's extra row", () => {
        const out = (text: string, pageSize: number | null) => {
            const { json, hasMore } = rowsToJsonArray(Buffer.from(text), pageSize)
            return [JSON.parse(json.toString()), hasMore]
        }
        expect(out('["a\\nb", 1]\n["c", 2]\n', null)).toEqual([
            [
                ['a\nb', 1],
                ['c', 2],
            ],
            null,
        ])
        expect(out('[1]\n[2]\n[3]\n', 2)).toEqual([[[1], [2]], true])
        expect(out('[1]\n[2]\n', 2)).toEqual([[[1], [2]], false])
        expect(out('', 100)).toEqual([[], false])
    })

    it("maps ClickHouse's errors as PostHog does: timeout 504, busy 503, user errors 400 by name, the rest 500", () => {
        const timeout = queryError(new EngineError('Code: 159. DB::Exception: Timeout exceeded: elapsed 10.1 s', 159))
        expect([timeout.status, timeout.body.detail]).toEqual([504, expect.stringMatching(/^Query has hit the max/)])
        const user = queryError(
            new EngineError(
                'Code: 43. DB::Exception: Illegal type UUID of argument of function plus. Stack trace: …',
                43
            )
        )
        expect([user.status, user.body]).toEqual([
            400,
            {
                type: 'validation_error',
                code: 'illegal_type_of_argument',
                detail: 'Illegal type UUID of argument of function plus.',
                attr: null,
            },
        ])
        const busy = queryError(new EngineError('Code: 202. DB::Exception: Too many simultaneous queries', 202))
        expect(busy.status).toBe(503)
        const other = queryError(new EngineError('Code: 1000. DB::Exception: Poco exception', 1000))
        expect([other.status, other.body.detail]).toEqual([500, 'ClickHouse error while executing query.'])
    })

    it('renders datetimes as orjson does: microseconds only when non-zero', () => {
        expect(posthogDateTime(Date.parse('2026-11-27T10:00:00Z'))).toBe('2026-11-27T10:00:00Z')
        expect(posthogDateTime(Date.parse('2026-11-27T10:00:00.120Z'))).toBe('2026-11-27T10:00:00.120000Z')
    })
})
