/** sync's pure policy: the page query, rows to events, PostHog's responses, limits, the checkpoint, the flags. */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { parseDuration } from '../pipeline/cli-options'
import { parseReplayArgs } from '../replay/cli'
import { BodyBuffers, BodyTooLargeError, readPage } from '../sync/body'
import { bindingDifferences, resumeFrom, SourceBinding, writeSyncCheckpoint } from '../sync/checkpoint'
import { behindNowMs, parsePostHogUrl, parseSyncArgs } from '../sync/cli'
import { classifyQueryResponse, errorDetail, PostHogQueryError, queryBackoffMs, rateLimitWaitMs } from '../sync/posthog'
import { afterCursor, buildPageQuery, cursorAfterShortPage, hogqlString, scanUpperMs } from '../sync/query'
import { isoFromMs, parseProperties, rowToEvent, toIsoUtc } from '../sync/rows'
import { horizonFor, nextScanStep } from '../sync/source'

const target = { origin: 'https://us.posthog.com', projectId: '12345' }
const NOW = Date.parse('2026-11-27T07:00:00Z')

describe('the page query', () => {
    const base = {
        cursor: { ms: NOW - 3_600_000, uuid: '0190a1b2-0000-7000-8000-000000000001' },
        upperMs: NOW - 60_000,
        lateWindowMs: 7 * 86_400_000,
        futureWindowMs: 86_400_000,
        pageSize: 500,
        allowedEvents: null,
        excludedEvents: [],
    }

    it('pages by (created_at ms, uuid) and lets ClickHouse compare the UUIDs', () => {
        const query = buildPageQuery(base)
        expect(query).toContain(
            `(toUnixTimestamp64Milli(created_at) > ${base.cursor.ms} OR (toUnixTimestamp64Milli(created_at) = ${base.cursor.ms} AND uuid > toUUID('0190a1b2-0000-7000-8000-000000000001')))`
        )
        expect(query).toContain('ORDER BY created_at_ms ASC, uuid ASC')
        expect(query).toContain(`toUnixTimestamp64Milli(created_at) < ${base.upperMs}`)
        expect(query).toMatch(/LIMIT 500$/)
    })

    it('bounds the timestamp scan: the late window before the cursor, a day after the upper bound', () => {
        const query = buildPageQuery(base)
        expect(query).toContain(`timestamp >= toDateTime(${(base.cursor.ms - 7 * 86_400_000) / 1000})`)
        expect(query).toContain(`timestamp < toDateTime(${(base.upperMs + 86_400_000) / 1000})`)
    })

    it('starts inclusively at --since when no event was passed yet', () => {
        expect(afterCursor({ ms: NOW, uuid: null })).toBe(`toUnixTimestamp64Milli(created_at) >= ${NOW}`)
    })

    it('puts event filters in the query, quoted as HogQL strings', () => {
        const query = buildPageQuery({ ...base, allowedEvents: ['$pageview', "it's"], excludedEvents: ['a\\b'] })
        expect(query).toContain("event IN ('$pageview', 'it\\'s')")
        expect(query).toContain("event NOT IN ('a\\\\b')")
        expect(hogqlString("x'y")).toBe("'x\\'y'")
    })

    it('refuses a page size above PostHog’s 50,000 row cap and a cursor uuid that is not a UUID', () => {
        expect(() => buildPageQuery({ ...base, pageSize: 50_001 })).toThrow('pageSize must be between 1 and 50000')
        expect(() => afterCursor({ ms: 1, uuid: "x') OR 1=1 --" })).toThrow('cursor.uuid is not a UUID')
    })

    it('steps through old ranges a day at a time and never past the horizon', () => {
        const cursor = { ms: NOW - 10 * 86_400_000, uuid: null }
        expect(scanUpperMs(cursor, NOW, 86_400_000)).toBe(NOW - 9 * 86_400_000)
        expect(scanUpperMs({ ms: NOW - 1000, uuid: null }, NOW, 86_400_000)).toBe(NOW)
        expect(cursorAfterShortPage({ ms: 5, uuid: 'u' }, 9)).toEqual({ ms: 9, uuid: null })
        expect(cursorAfterShortPage({ ms: 9, uuid: 'u' }, 9)).toEqual({ ms: 9, uuid: 'u' })
    })

    it('keeps the horizon the lag behind now, and never past --until', () => {
        expect(horizonFor(NOW, 60_000, null)).toBe(NOW - 60_000)
        expect(horizonFor(NOW, 60_000, NOW - 3_600_000)).toBe(NOW - 3_600_000)
    })
})

describe('rows to events', () => {
    const at = {
        uuid: 0,
        event: 1,
        distinct_id: 2,
        timestamp: 3,
        properties: 4,
        elements_chain: 5,
        created_at_ms: 6,
        timestamp_ms: -1,
        person_id: -1,
        person_properties: -1,
    }

    it('builds the event the plugin sends, with $set and $set_once lifted from properties', () => {
        const row = [
            '0190a1b2-0000-7000-8000-000000000009',
            '$identify',
            'user-1',
            '2026-11-20T10:00:00.123000Z',
            '{"$set":{"plan":"pro"},"$set_once":{"first":"/"},"$browser":"Firefox"}',
            '',
            1795000000123,
        ]
        expect(rowToEvent(row, at, 7)).toEqual({
            createdAtMs: 1795000000123,
            event: {
                uuid: '0190a1b2-0000-7000-8000-000000000009',
                event: '$identify',
                distinct_id: 'user-1',
                team_id: 7,
                ip: null,
                timestamp: '2026-11-20T10:00:00.123Z',
                properties: { $set: { plan: 'pro' }, $set_once: { first: '/' }, $browser: 'Firefox' },
                $set: { plan: 'pro' },
                $set_once: { first: '/' },
            },
        })
    })

    it('sends PostHog’s properties text as is when nothing in it changes: the same JSON as the object form', () => {
        const row = [
            '0190a1b2-0000-7000-8000-00000000000a',
            '$autocapture',
            'user-2',
            '2026-11-20T10:00:00Z',
            '{"$browser":"Firefox","nested":{"a":[1,2]},"quote":"\\"x\\""}',
            'button.btn:text="Sign up"',
            1795000000999,
        ]
        const fast = rowToEvent(row, at, 7, true)
        const slow = rowToEvent(row, at, 7, false)
        expect(fast.text).toBeDefined()
        expect(fast.text).toContain('"properties":{"$browser":"Firefox","nested":{"a":[1,2]},"quote":"\\"x\\""}')
        expect(JSON.parse(fast.text as string)).toEqual(slow.event)
        expect(Object.keys(JSON.parse(fast.text as string))).toEqual(Object.keys(slow.event))
    })

    it('parses properties when person updates must be lifted, or the text is not an object', () => {
        const withSet = [
            '0190a1b2-0000-7000-8000-00000000000b',
            '$identify',
            'u',
            '2026-11-20T10:00:00Z',
            '{"$set":{"a":1}}',
            '',
            1,
        ]
        expect(rowToEvent(withSet, at, 7, true).text).toBeUndefined()
        const broken = ['0190a1b2-0000-7000-8000-00000000000c', 'x', 'u', '2026-11-20T10:00:00Z', 'not json', '', 1]
        expect(() => rowToEvent(broken, at, 7, true)).toThrow()
    })

    it('writes milliseconds as the same ISO text as Date#toISOString, day after day and at the edges', () => {
        const edges = [0, 1, 999, 86_399_999, 86_400_000, 951_782_400_000, 253_402_300_799_999, 253_402_300_800_000]
        const random = Array.from({ length: 2_000 }, (_, n) => Math.floor(Math.abs(Math.sin(n + 1)) * 4e12))
        for (const ms of [...edges, -1, -86_400_001, ...random, ...random.map((ms) => ms + 1), NOW]) {
            expect(isoFromMs(ms)).toBe(new Date(ms).toISOString())
        }
    })

    it('reads PostHog datetimes with or without microseconds, Z, or an offset', () => {
        expect(toIsoUtc('2020-01-15T12:00:00Z')).toBe('2020-01-15T12:00:00.000Z')
        expect(toIsoUtc('2022-12-24T17:00:41.165000Z')).toBe('2022-12-24T17:00:41.165Z')
        expect(toIsoUtc('2022-12-24T12:00:41.165000-05:00')).toBe('2022-12-24T17:00:41.165Z')
        expect(toIsoUtc('2022-12-24 17:00:41.165000')).toBe('2022-12-24T17:00:41.165Z')
        expect(() => toIsoUtc('soon')).toThrow('unreadable datetime')
    })

    it('parses properties from their JSON text; an empty text is no properties', () => {
        expect(parseProperties('')).toEqual({})
        expect(parseProperties('{"a":1}')).toEqual({ a: 1 })
        expect(() => parseProperties('[1]')).toThrow('not a JSON object')
    })
})

describe("PostHog's responses", () => {
    const body = (detail: string) => JSON.stringify({ type: 'x', code: 'y', detail, attr: null })

    it('a 200 gives the rows and columns', () => {
        const outcome = classifyQueryResponse(
            200,
            '{"results":[[1]],"columns":["a"],"hasMore":null}',
            null,
            NOW,
            target
        )
        expect(outcome).toMatchObject({ kind: 'ok', response: { rowCount: 1, columns: ['a'], hasMore: null } })
        expect((outcome as { response: { row: (i: number) => unknown } }).response.row(0)).toEqual([1])
    })

    it('a 401 names the key and the fix, and is configuration', () => {
        const outcome = classifyQueryResponse(
            401,
            body('Personal API key found in request Authorization header is invalid.'),
            null,
            NOW,
            target
        )
        expect(outcome.kind).toBe('fatal')
        const error = (outcome as { error: PostHogQueryError }).error
        expect(error.message).toContain('PostHog refused the API key (HTTP 401: Personal API key found')
        expect(error.message).toContain('POSTHOG_API_KEY')
        expect(error.isConfig).toBe(true)
    })

    it('a 403 names the query:read scope, a 404 the project and the host', () => {
        const forbidden = classifyQueryResponse(
            403,
            body("API key missing required scope 'query:read'"),
            null,
            NOW,
            target
        )
        expect((forbidden as { error: Error }).error.message).toContain("missing required scope 'query:read'")
        expect((forbidden as { error: Error }).error.message).toContain('needs the query:read scope')
        const missing = classifyQueryResponse(404, body('Project not found.'), null, NOW, target)
        expect((missing as { error: Error }).error.message).toContain('no project 12345 at https://us.posthog.com')
    })

    it('a 400 quotes the HogQL error and is not retried', () => {
        const outcome = classifyQueryResponse(400, body("mismatched input 'SELEC'"), null, NOW, target)
        expect(outcome.kind).toBe('fatal')
        expect((outcome as { error: PostHogQueryError }).error.message).toBe(
            "PostHog refused the query (HTTP 400: mismatched input 'SELEC')"
        )
        expect((outcome as { error: PostHogQueryError }).error.isConfig).toBe(false)
    })

    it('a 429 waits as long as Retry-After says; without it, the backoff decides', () => {
        expect(classifyQueryResponse(429, body('throttled'), '7', NOW, target)).toEqual({
            kind: 'retry',
            reason: 'HTTP 429: throttled',
            waitMs: 7_000,
        })
        expect(
            classifyQueryResponse(429, body('Exceeded maximum concurrency limit: 3'), null, NOW, target)
        ).toMatchObject({
            kind: 'retry',
            waitMs: null,
        })
    })

    it('5xx and 408 are retried; a redirect is never followed', () => {
        expect(classifyQueryResponse(504, body('Query has hit the max execution time'), null, NOW, target).kind).toBe(
            'retry'
        )
        expect(classifyQueryResponse(502, '<html>bad gateway</html>', null, NOW, target).kind).toBe('retry')
        expect(classifyQueryResponse(308, '', null, NOW, target).kind).toBe('fatal')
    })

    it('quotes detail, or the start of a body that is not JSON', () => {
        expect(errorDetail(body('Project not found.'))).toBe('Project not found.')
        expect(errorDetail('  <h1>Bad   gateway</h1> ')).toBe('<h1>Bad gateway</h1>')
    })
})

describe('limits and delays', () => {
    it('backs off exponentially with full jitter, capped at 30 s', () => {
        expect([0, 1, 2, 3, 10].map((attempt) => queryBackoffMs(attempt, () => 1))).toEqual([
            1000, 2000, 4000, 8000, 30000,
        ])
        expect(queryBackoffMs(4, () => 0)).toBe(0)
    })

    it('waits until the oldest query leaves the minute window once the per-minute limit is used', () => {
        const starts = [NOW - 50_000, NOW - 40_000, NOW - 30_000]
        expect(rateLimitWaitMs(starts, NOW, { perMinute: 3, perHour: 100 })).toBe(10_000)
        expect(rateLimitWaitMs(starts, NOW, { perMinute: 4, perHour: 100 })).toBe(0)
    })

    it('also holds the hourly limit', () => {
        const starts = [NOW - 3_000_000, NOW - 2_000_000]
        expect(rateLimitWaitMs(starts, NOW, { perMinute: 10, perHour: 2 })).toBe(600_000)
    })
})

describe('the checkpoint', () => {
    let dir: string
    beforeEach(() => (dir = mkdtempSync(join(tmpdir(), 'sync-ckpt-'))))
    afterEach(() => rmSync(dir, { recursive: true, force: true }))

    const binding: SourceBinding = {
        host: 'https://us.posthog.com',
        projectId: '12345',
        allowedEvents: ['b', 'a'],
        excludedEvents: [],
        since: '2026-11-01T00:00:00.000Z',
    }

    it('starts at --since on a first run, and at the saved cursor after', () => {
        const file = join(dir, 'sync.ckpt')
        expect(resumeFrom(file, binding, true)).toMatchObject({
            cursor: { ms: Date.parse(binding.since), uuid: null },
            resumed: false,
        })
        writeSyncCheckpoint(file, binding, { ms: 5, uuid: '0190a1b2-0000-7000-8000-000000000001' }, NOW)
        expect(resumeFrom(file, { ...binding, allowedEvents: ['a', 'b'], since: 'ignored' }, false)).toMatchObject({
            cursor: { ms: 5, uuid: '0190a1b2-0000-7000-8000-000000000001' },
            resumed: true,
        })
    })

    it('refuses a checkpoint of another host, project or filter, naming what differs', () => {
        const file = join(dir, 'sync.ckpt')
        writeSyncCheckpoint(file, binding, { ms: 5, uuid: null }, NOW)
        expect(() => resumeFrom(file, { ...binding, projectId: '999' }, false)).toThrow(
            '--project-id "12345" then, "999" now'
        )
        expect(
            bindingDifferences(binding, { ...binding, host: 'https://eu.posthog.com', excludedEvents: ['x'] }, false)
        ).toEqual([
            '--posthog-url "https://us.posthog.com" then, "https://eu.posthog.com" now',
            '--excluded-events [] then, ["x"] now',
        ])
        expect(bindingDifferences(binding, { ...binding, since: '2026-11-02T00:00:00Z' }, true)).toHaveLength(1)
    })

    it('refuses a file that is not a sync checkpoint', () => {
        const file = join(dir, 'replay.ckpt')
        writeFileSync(file, '{"version":1,"next":10,"done":[]}')
        expect(() => resumeFrom(file, binding, false)).toThrow('is not a sync checkpoint written by this tool')
    })

    it('is written whole: the temporary file is renamed over the old one', () => {
        const file = join(dir, 'sync.ckpt')
        writeSyncCheckpoint(file, binding, { ms: 1, uuid: null }, NOW)
        writeSyncCheckpoint(file, binding, { ms: 2, uuid: null }, NOW)
        expect(JSON.parse(readFileSync(file, 'utf8')).cursor).toEqual({ ms: 2, uuid: null })
    })
})

describe('flags', () => {
    const env = { PATTERNS_WEBHOOK_URL: 'https://hooks.example.com/wh/abcdef123', POSTHOG_API_KEY: 'phx_secret_key_1' }
    const required = ['--posthog-url', 'https://us.posthog.com', '--project-id', '12345']

    it('reads durations in ms, s, m, h, d, or bare seconds', () => {
        expect(['500ms', '30s', '2m', '1h', '7d', '90'].map((t) => parseDuration('lag', t))).toEqual([
            500, 30_000, 120_000, 3_600_000, 604_800_000, 90_000,
        ])
        expect(() => parseDuration('lag', 'soon')).toThrow('--lag: expected a duration')
    })

    it('takes one form for every duration flag of sync and replay: 500ms, 30s, 2m, 1h, or bare seconds', () => {
        const sync = (flag: string, value: string) =>
            parseSyncArgs([...required, '--follow', `--${flag}`, value], env, Date.parse('2026-12-01T00:00:00Z'))
        const replay = (flag: string, value: string) =>
            parseReplayArgs(['in.jsonl', '--dry-run', `--${flag}`, value], {})
        const forms = [
            ['500ms', 500],
            ['1s', 1_000],
            ['30s', 30_000],
            ['2m', 120_000],
            ['1h', 3_600_000],
            ['90', 90_000],
            ['1.5', 1_500],
        ] as const
        for (const [text, ms] of forms) {
            expect(sync('poll-interval', text)?.pollIntervalMs).toBe(ms)
            expect(sync('lag', text)?.lagMs).toBe(ms)
            expect(sync('late-window', text)?.lateWindowMs).toBe(ms)
            expect(sync('query-timeout', text)?.queryTimeoutMs).toBe(ms)
            expect(sync('retry-for', text)?.retryForMs).toBe(ms)
            expect(sync('retry-for', text)?.config.deadlineMs).toBe(ms)
            expect(sync('timeout', text)?.config.requestTimeoutMs).toBe(ms)
            expect(replay('retry-for', text)?.retryForMs).toBe(ms)
            expect(replay('retry-for', text)?.config.deadlineMs).toBe(ms)
            expect(replay('timeout', text)?.config.requestTimeoutMs).toBe(ms)
        }
        expect(sync('lag', '0s')?.lagMs).toBe(0)
    })

    it('names the duration flag and the forms it takes when a value is not one, is negative, or is 0', () => {
        const now = Date.parse('2026-12-01T00:00:00Z')
        for (const flag of ['poll-interval', 'lag', 'late-window', 'query-timeout', 'retry-for', 'timeout']) {
            for (const value of ['soon', '-1', '-2s', '5 minutes']) {
                expect(() => parseSyncArgs([...required, '--follow', `--${flag}`, value], env, now)).toThrow(
                    `--${flag}: expected a duration such as 500ms, 30s, 2m, 1h or 7d (a bare number is seconds); got "${value}"`
                )
            }
        }
        for (const flag of ['retry-for', 'timeout']) {
            expect(() => parseReplayArgs(['in.jsonl', '--dry-run', `--${flag}`, '1x'], {})).toThrow(
                `--${flag}: expected a duration such as 500ms, 30s, 2m, 1h or 7d`
            )
            expect(() => parseReplayArgs(['in.jsonl', '--dry-run', `--${flag}`, '0'], {})).toThrow(
                `--${flag}: must be more than 0`
            )
        }
        expect(() => parseSyncArgs([...required, '--follow', '--poll-interval', '0ms'], env, now)).toThrow(
            '--poll-interval: must be more than 0'
        )
    })

    it('refuses plain http except on loopback, and paths, and credentials in the URL', () => {
        expect(parsePostHogUrl('http://127.0.0.1:8000')).toBe('http://127.0.0.1:8000')
        expect(parsePostHogUrl('https://us.posthog.com/')).toBe('https://us.posthog.com')
        expect(() => parsePostHogUrl('http://posthog.example.com')).toThrow('plain http would send the API key')
        expect(() => parsePostHogUrl('https://us.posthog.com/project/1')).toThrow('give the origin only')
        expect(() => parsePostHogUrl('https://u:p@us.posthog.com')).toThrow('must not contain user:password@')
    })

    it('defaults --since to now and --until to now minus the lag', () => {
        const args = parseSyncArgs(required, env, NOW)
        expect(args).toMatchObject({ sinceMs: NOW, untilMs: NOW - 60_000, follow: false, pageSize: 10_000 })
    })

    it('names the flag and the fix for each mistake', () => {
        const parse =
            (argv: string[], e: Record<string, string> = env) =>
            () =>
                parseSyncArgs(argv, e, NOW)
        expect(parse(['--project-id', '1'])).toThrow('--posthog-url is required')
        expect(parse([...required.slice(0, 2), '--project-id', 'abc'])).toThrow(
            "--project-id: expected the project's numeric id"
        )
        expect(parse(required, { ...env, POSTHOG_API_KEY: '' })).toThrow('POSTHOG_API_KEY is required')
        expect(parse(required, { ...env, POSTHOG_API_KEY: 'phc_project_key' })).toThrow('project API key (phc_...)')
        expect(parse([...required, '--follow', '--until', '2026-11-27T00:00:00Z'])).toThrow('--until and --follow')
        expect(parse([...required, '--page-size', '50001'])).toThrow(
            '--page-size: expected a whole number from 1 to 50000'
        )
        expect(parse([...required, '--since', 'yesterday'])).toThrow('--since: expected an ISO 8601 time')
    })

    it('measures how far behind now the feed is', () => {
        expect(behindNowMs({ cursorMs: NOW - 5_000, caughtUp: false, horizonMs: NOW - 60_000 }, NOW)).toBe(5_000)
        expect(behindNowMs({ cursorMs: NOW - 5_000, caughtUp: true, horizonMs: NOW - 60_000 }, NOW)).toBe(60_000)
    })
})

describe('the scan step', () => {
    it('narrows to about two pages after a full page, and goes wide after a short one', () => {
        expect(nextScanStep('full', 30_000, 86_400_000)).toBe(60_000)
        expect(nextScanStep('full', 0, 86_400_000)).toBe(1_000)
        expect(nextScanStep('full', 10 * 86_400_000, 86_400_000)).toBe(86_400_000)
        expect(nextScanStep('short', 0, 86_400_000)).toBe(86_400_000)
    })
})

describe('reading a response body row by row', () => {
    const tricky = {
        cache_key: 'k',
        clickhouse: 'SELECT "results":[1,2] FROM x WHERE a = \'[\' OR b = "]"',
        columns: ['uuid', 'properties', 'n'],
        hasMore: null,
        hogql: '{"results": [[0]]}',
        results: [
            ['0190a1b2-0000-7000-8000-000000000001', '{"a":"[\\"]}\\\\","b":[1,[2]]}', 1],
            ['0190a1b2-0000-7000-8000-000000000002', '{}', 2],
            ['0190a1b2-0000-7000-8000-000000000003', 'é ✓ \u0000', [3, [4]]],
        ],
        timezone: 'UTC',
        types: [['uuid', 'UUID']],
    }

    const allRows = (page: { rowCount: number; row: (i: number) => unknown } | null | undefined): unknown[] =>
        Array.from({ length: page?.rowCount ?? 0 }, (_, i) => page?.row(i))

    it('finds the top-level results and each row, whatever the strings around and inside them hold', () => {
        const body = Buffer.from(JSON.stringify(tricky))
        const page = readPage(body)
        expect(page?.rowCount).toBe(3)
        expect(allRows(page)).toEqual(tricky.results)
        expect(page?.row(2)).toEqual(tricky.results[2])
        expect(page?.head).toEqual({ ...tricky, results: [] })
    })

    it('reads results that come before columns, with spaces, and an empty results', () => {
        const reordered = `{ "results" : [ [1, "x"] , [2,"y"] ], "columns": ["n", "s"], "hasMore": false }`
        expect(allRows(readPage(Buffer.from(reordered)))).toEqual([
            [1, 'x'],
            [2, 'y'],
        ])
        expect(readPage(Buffer.from('{"results":[],"columns":[]}'))?.rowCount).toBe(0)
        expect(readPage(Buffer.from('{"detail":"no results here"}'))).toBeNull()
    })

    it('decodes UTF-8 and plain ASCII bodies to the same rows as JSON.parse does', () => {
        // Plain ASCII, with an escape that decodes to a character outside it.
        const ascii = String.raw`{"results":[["a","{\"k\":\"\u00e9\"}",1]],"columns":["s","p","n"]}`
        for (const body of [ascii, JSON.stringify(tricky)]) {
            const parsed = JSON.parse(body) as { results: unknown[] }
            expect(allRows(readPage(Buffer.from(body)))).toEqual(parsed.results)
        }
    })

    it('gives the same page as parsing the whole body', () => {
        const body = JSON.stringify(tricky)
        const fromBytes = classifyQueryResponse(200, Buffer.from(body), null, NOW, target)
        const fromText = classifyQueryResponse(200, body, null, NOW, target)
        const rows = (o: typeof fromBytes) =>
            allRows((o as { response: { rowCount: number; row: (i: number) => unknown } }).response)
        expect(rows(fromBytes)).toEqual(tricky.results)
        expect(rows(fromBytes)).toEqual(rows(fromText))
    })
})

describe('kept body buffers', () => {
    async function* chunks(...parts: string[]): AsyncGenerator<Uint8Array> {
        for (const part of parts) {
            yield Buffer.from(part)
        }
    }

    it('never lends a buffer that is still out, and reuses one once released', async () => {
        const buffers = new BodyBuffers(2)
        const first = await buffers.read(chunks('{"a":', '1}'), 1024)
        const second = await buffers.read(chunks('{"b":2}'), 1024)
        expect(first.bytes.toString()).toBe('{"a":1}')
        expect(second.bytes.toString()).toBe('{"b":2}')
        expect(first.bytes.buffer).not.toBe(second.bytes.buffer)
        first.release()
        first.release()
        const third = await buffers.read(chunks('{"c":3}'), 1024)
        expect(third.bytes.buffer).toBe(first.bytes.buffer)
        expect(second.bytes.toString()).toBe('{"b":2}')
    })

    it('sizes a buffer by the announced length, but never allocates a large announcement up front', async () => {
        const fair = await new BodyBuffers().read(chunks('{}'), 1_000_000_000, 1_000)
        expect(fair.bytes.toString()).toBe('{}')
        expect(fair.bytes.buffer.byteLength).toBe(1_125)
        const boast = await new BodyBuffers().read(chunks('{}'), 1_000_000_000, 500_000_000)
        expect(boast.bytes.toString()).toBe('{}')
        expect(boast.bytes.buffer.byteLength).toBeLessThan(1_024)
    })

    it('grows past the first chunk and stops reading past the limit', async () => {
        const buffers = new BodyBuffers()
        const big = 'x'.repeat(70_000)
        const lease = await buffers.read(chunks(big, big, 'end'), 1_000_000)
        expect(lease.bytes.length).toBe(140_003)
        expect(lease.bytes.toString('latin1', 139_998)).toBe('xxend')
        let pulled = 0
        async function* endless(): AsyncGenerator<Uint8Array> {
            for (;;) {
                pulled++
                yield Buffer.alloc(1000)
            }
        }
        await expect(buffers.read(endless(), 10_000)).rejects.toThrow(BodyTooLargeError)
        expect(pulled).toBe(11)
    })
})
