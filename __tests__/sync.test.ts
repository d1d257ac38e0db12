/**
 * `sync` end to end: the real PostHog stand-in (node:http, HogQL checked by PostHog's parser, run on chdb) and the
 * real webhook receiver. Limits are lowered and pages kept small so each test takes seconds.
 */
import { ChildProcess, spawn } from 'node:child_process'
import { createHmac } from 'node:crypto'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { createServer, IncomingMessage, Server, ServerResponse } from 'node:http'
import { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { gzipSync } from 'node:zlib'

import { readSyncCheckpoint } from '../sync/checkpoint'
import { runSyncCli } from '../sync/cli'
import { PostHogQueryError, QueryClient, QueryClientOptions } from '../sync/posthog'
import { posthogSource } from '../sync/source'
import { FAULT_PRESETS, Receiver, startReceiver } from '../tools/receiver/receiver'
import { StandInEvent } from '../tools/standin/events'
import { PostHogStandIn, startPostHogStandIn } from '../tools/standin/server'
import { captureOutput, waitFor } from './helpers/io'
import { startServer, TestServer } from './helpers/server'

const API_KEY = 'phx_SyncT3st_k3y_0a1b2c3d4e5f'
const NO_SCOPE_KEY = 'phx_N0Scope_k3y_99887766'
const PROJECT = 4242
const TOKEN = 'snc_T0ken_77aa66bb'
const SIGNING_SECRET = 'whsec_c3luYy1zaWduaW5nLWtleS0xMjM0NQ=='
const BIN = join(__dirname, '..', 'bin', 'patterns-connector.js')
const HOUR = 3_600_000

let dir: string
let standin: PostHogStandIn
let receiver: Receiver | undefined
let server: TestServer | undefined
const outputs: string[] = []

afterAll(() => {
    // Every line any test printed: neither the API key nor the webhook token, in any test.
    const all = outputs.join('\n')
    expect(all.length).toBeGreaterThan(1_000)
    for (const secret of [API_KEY, API_KEY.slice(4), NO_SCOPE_KEY, TOKEN]) {
        expect(all).not.toContain(secret)
    }
})

beforeEach(async () => {
    dir = mkdtempSync(join(tmpdir(), 'sync-'))
    // A fresh PostHog per test: its own events table, limits and request log.
    standin = await startPostHogStandIn({
        apiKey: API_KEY,
        projectId: PROJECT,
        extraKeys: [{ key: NO_SCOPE_KEY, scopes: [] }],
    })
})

afterEach(async () => {
    await receiver?.close()
    await server?.close()
    await standin.close()
    receiver = undefined
    server = undefined
    rmSync(dir, { recursive: true, force: true })
})

async function rx(faults: string = 'none', latencyMs = 0): Promise<Receiver> {
    receiver = await startReceiver({
        dataDir: join(dir, 'rx'),
        path: `/api/v1/webhooks/${TOKEN}`,
        faults: { ...FAULT_PRESETS[faults], latencyMs },
        seed: 7,
    })
    return receiver
}

/** A UUID whose ClickHouse order is set by `order` while its text order runs the other way (section 8 of FACTS). */
function tieUuid(order: number, n: number): string {
    const high = (0xffff - n).toString(16).padStart(4, '0')
    const low = order.toString(16).padStart(12, '0')
    return `0190a1b2-${high}-7000-8000-${low}`
}

function events(
    count: number,
    options: { createdAt?: string; timestamp?: string; name?: (n: number) => string; prefix?: number } = {}
): StandInEvent[] {
    const now = Date.now()
    return Array.from({ length: count }, (_, n) => ({
        uuid: tieUuid((options.prefix ?? 0) * 1_000_000 + n, n % 0xffff),
        event: options.name?.(n) ?? '$pageview',
        distinct_id: `user-${n % 7}`,
        timestamp: options.timestamp ?? new Date(now - HOUR + n).toISOString(),
        created_at: options.createdAt,
        properties: { $current_url: `https://example.com/${n}`, $ip: '203.0.113.9', n },
    }))
}

function baseArgs(extra: string[] = []): string[] {
    return [
        '--posthog-url',
        standin.url,
        '--project-id',
        String(standin.projectId),
        '--since',
        new Date(Date.now() - 2 * HOUR).toISOString(),
        '--lag',
        '0s',
        '--page-size',
        '40',
        '--concurrency',
        '1',
        '--batch-events',
        '25',
        ...extra,
    ]
}

async function cli(args: string[], env: Record<string, string> = {}, signal?: AbortSignal) {
    const { stdout, stderr, text } = captureOutput()
    const code = await runSyncCli(
        args,
        { POSTHOG_API_KEY: API_KEY, PATTERNS_WEBHOOK_URL: receiver?.url ?? server?.url ?? '', ...env },
        { stdout, stderr },
        signal
    )
    outputs.push(text.stdout, text.stderr)
    return { code, ...text }
}

function receivedUuids(r: Receiver): string[] {
    return r.rows().map((row) => String(row.uuid))
}

/** ClickHouse's UUID order, as an oracle for the tests only: the last 16 hex digits first (FACTS section 8). */
function clickhouseUuidKey(uuid: string): string {
    const hex = uuid.replace(/-/g, '')
    return hex.slice(16) + hex.slice(0, 16)
}

describe('the cursor', () => {
    it('delivers 300 events sharing one created_at across 8 full pages exactly once, in ClickHouse UUID order', async () => {
        const r = await rx()
        const createdAt = new Date(Date.now() - HOUR).toISOString()
        const tied = events(300, { createdAt })
        await standin.insertEvents(tied)
        const { code, stdout } = await cli(baseArgs())
        expect(code).toBe(0)
        const got = receivedUuids(r)
        expect(got).toHaveLength(300)
        expect(new Set(got).size).toBe(300)
        const expected = tied
            .map((e) => e.uuid as string)
            .sort((a, b) => (clickhouseUuidKey(a) < clickhouseUuidKey(b) ? -1 : 1))
        expect(got).toEqual(expected)
        // The text order of these UUIDs is the reverse of ClickHouse's: comparing strings would have broken ties.
        expect([...expected].sort()).not.toEqual(expected)
        expect(stdout).toMatch(/delivered\s+300/)
        // 8 pages of 40, then one to the horizon past the tied millisecond (the scan narrowed to it).
        expect(stdout).toMatch(/PostHog requests\s+9\b/)
    })

    it('reads by ingestion time: an event with an old timestamp but a recent created_at is delivered', async () => {
        const r = await rx()
        const old = events(3, { timestamp: new Date(Date.now() - 5 * 24 * HOUR).toISOString(), prefix: 1 })
        const fresh = events(3, { prefix: 2 })
        await standin.insertEvents([...old, ...fresh])
        const { code } = await cli(baseArgs())
        expect(code).toBe(0)
        expect(new Set(receivedUuids(r))).toEqual(new Set([...old, ...fresh].map((e) => e.uuid)))
    })

    it('follows: events stored while it runs, late ones included, arrive once each; Ctrl-C exits 130', async () => {
        const r = await rx()
        const controller = new AbortController()
        const running = cli(
            baseArgs(['--follow', '--lag', '300ms', '--poll-interval', '100ms', '--checkpoint', join(dir, 'ck')]),
            {},
            controller.signal
        )
        await standin.insertEvents(events(30, { prefix: 3 }))
        await waitFor(() => r.rows().length === 30, 15_000)
        // Late arrivals: client timestamps from three days ago, stored by PostHog now.
        const late = events(20, { timestamp: new Date(Date.now() - 3 * 24 * HOUR).toISOString(), prefix: 4 })
        await standin.insertEvents(late)
        await waitFor(() => r.rows().length === 50, 15_000)
        controller.abort()
        const { code } = await running
        expect(code).toBe(130)
        expect(new Set(receivedUuids(r)).size).toBe(50)
        expect(receivedUuids(r)).toEqual(expect.arrayContaining(late.map((e) => e.uuid)))
        const saved = readSyncCheckpoint(join(dir, 'ck'))
        expect(saved?.cursor.uuid).toBe(receivedUuids(r)[49])
    })

    it('hands each page on in chunks: the next query goes out first, and the page is released once read', async () => {
        const createdAt = new Date(Date.now() - HOUR).toISOString()
        const tied = events(25, { createdAt, prefix: 5 })
        await standin.insertEvents(tied)
        const client = new QueryClient({ origin: standin.url, projectId: String(PROJECT), apiKey: API_KEY })
        const log: string[] = []
        let queries = 0
        const run = async (hogql: string) => {
            const n = ++queries
            log.push(`query ${n}`)
            const response = await client.run(hogql)
            return { ...response, release: () => (log.push(`release ${n}`), response.release()) }
        }
        const positions: string[] = []
        const source = posthogSource({
            run,
            start: { ms: Date.now() - 2 * HOUR, uuid: null },
            teamId: PROJECT,
            follow: false,
            untilMs: Date.now() - HOUR / 2,
            pageSize: 10,
            chunkRows: 4,
            allowedEvents: null,
            excludedEvents: [],
        })
        for await (const chunk of source) {
            log.push(`chunk ${chunk.length}`)
            positions.push(...chunk.map((record) => String(record.position.uuid)))
        }
        expect(log).toEqual([
            ...['query 1', 'query 2', 'chunk 4', 'chunk 4', 'chunk 2', 'release 1'],
            ...['query 3', 'chunk 4', 'chunk 4', 'chunk 2', 'release 2'],
            ...['chunk 4', 'chunk 1', 'release 3'],
            // The scan had narrowed to the tied millisecond: one more query, empty, reaches the horizon.
            ...['query 4', 'release 4'],
        ])
        const order = (a: string, b: string) => (clickhouseUuidKey(a) < clickhouseUuidKey(b) ? -1 : 1)
        expect(positions).toEqual(tied.map((e) => e.uuid as string).sort(order))
    })
})

describe('crash and resume', () => {
    function syncProcess(r: Receiver, checkpoint: string) {
        const args = [BIN, 'sync', ...baseArgs(['--page-size', '500', '--batch-events', '50', '--concurrency', '4'])]
        const env = { ...process.env, POSTHOG_API_KEY: API_KEY, PATTERNS_WEBHOOK_URL: r.url }
        return (): { child: ChildProcess; exited: Promise<number | null>; output: () => string } => {
            const child = spawn(process.execPath, [...args, '--checkpoint', checkpoint], { env, stdio: 'pipe' })
            let output = ''
            child.stdout?.on('data', (c: Buffer) => (output += c.toString()))
            child.stderr?.on('data', (c: Buffer) => (output += c.toString()))
            const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
            return { child, exited, output: () => output }
        }
    }

    it('kill -9 mid-run, then the same command: every event arrives, duplicates only from batches in flight', async () => {
        const r = await rx('none', 5)
        const all = events(3_000, { prefix: 5 })
        await standin.insertEvents(all)
        const checkpoint = join(dir, 'sync.ckpt')
        const start = syncProcess(r, checkpoint)
        const first = start()
        await waitFor(() => r.rows().length >= 1_000, 30_000)
        first.child.kill('SIGKILL')
        expect(await first.exited).toBeNull()
        const before = r.rows().length
        expect(before).toBeLessThan(3_000)
        expect(existsSync(checkpoint)).toBe(true)
        const second = start()
        expect(await second.exited).toBe(0)
        outputs.push(first.output(), second.output())
        const counts = r.uuidCounts()
        expect([...counts.keys()].sort()).toEqual(all.map((e) => e.uuid as string).sort())
        const duplicates = r.rows().length - counts.size
        // At most the batches that were in flight at the kill: 4 batches of 50.
        expect(duplicates).toBeLessThanOrEqual(200)
        expect(second.output()).toMatch(/resuming after/)
    })

    it('refuses a checkpoint of another project with exit 2, naming the difference', async () => {
        await rx()
        const checkpoint = join(dir, 'sync.ckpt')
        expect((await cli(baseArgs(['--checkpoint', checkpoint]))).code).toBe(0)
        const other = baseArgs(['--checkpoint', checkpoint]).map((a) => (a === String(standin.projectId) ? '777' : a))
        const { code, stderr } = await cli(other)
        expect(code).toBe(2)
        expect(stderr).toContain(`--project-id "${standin.projectId}" then, "777" now`)
    })
})

describe("PostHog's limits and errors", () => {
    it('waits out a 429 for as long as Retry-After says, then delivers everything', async () => {
        const r = await rx()
        await standin.insertEvents(events(100, { prefix: 6 }))
        standin.setFaults({ script: ['ok', '429', 'ok'], retryAfterSeconds: 2 })
        const started = Date.now()
        const { code, stderr } = await cli(baseArgs())
        expect(code).toBe(0)
        expect(stderr).toMatch(/waiting 2s: query retry after HTTP 429/)
        expect(Date.now() - started).toBeGreaterThanOrEqual(2_000)
        expect(new Set(receivedUuids(r)).size).toBe(100)
        expect(standin.log.map((q) => q.status)).toEqual([200, 429, 200, 200])
    })

    it('stays under PostHog’s own throttle: the client-side limit waits instead of collecting 429s', async () => {
        const r = await rx()
        await standin.insertEvents(events(100, { prefix: 9 }))
        standin.setLimits({ burstRate: '2/minute' })
        const { code, stderr } = await cli(
            baseArgs(['--page-size', '30', '--max-queries-per-minute', '2']),
            {},
            AbortSignal.timeout(3_000)
        )
        // Two queries fit the minute; the third waits for the window, so the run is interrupted, not throttled.
        expect(code).toBe(130)
        expect(stderr).toMatch(/waiting (\d+m)?\d+s: client-side rate limit/)
        expect(standin.log.map((q) => q.status)).toEqual([200, 200])
        expect(new Set(receivedUuids(r)).size).toBe(60)
    })

    it('a wrong key gets exit 2 and one request, with PostHog’s detail and the fix', async () => {
        await rx()
        const { code, stderr } = await cli(baseArgs(), { POSTHOG_API_KEY: 'phx_not_the_right_key' })
        expect(code).toBe(2)
        expect(stderr).toContain(
            'PostHog refused the API key (HTTP 401: Personal API key found in request Authorization header is invalid.)'
        )
        expect(stderr).not.toContain('phx_not_the_right_key')
        expect(standin.log.map((q) => q.status)).toEqual([401])
    })

    it('a key without the query:read scope gets exit 2 naming the scope', async () => {
        await rx()
        const { code, stderr } = await cli(baseArgs(), { POSTHOG_API_KEY: NO_SCOPE_KEY })
        expect(code).toBe(2)
        expect(stderr).toContain("missing required scope 'query:read'")
        expect(stderr).toContain('needs the query:read scope')
        expect(standin.log.map((q) => q.status)).toEqual([403])
    })

    it('an unknown project gets exit 2 naming --project-id', async () => {
        await rx()
        const args = baseArgs().map((a) => (a === String(standin.projectId) ? '999999' : a))
        const { code, stderr } = await cli(args)
        expect(code).toBe(2)
        expect(stderr).toContain('PostHog has no project 999999 at')
    })

    it('a HogQL error is refused once with PostHog’s detail', async () => {
        const client = new QueryClient({ origin: standin.url, projectId: String(standin.projectId), apiKey: API_KEY })
        const error = await client.run('SELEC uuid FROM events').catch((e: unknown) => e)
        expect(error).toBeInstanceOf(PostHogQueryError)
        expect((error as PostHogQueryError).kind).toBe('query')
        expect((error as PostHogQueryError).message).toMatch(
            /^PostHog refused the query \(HTTP 400: mismatched input 'SELEC'/
        )
        expect(client.queries).toBe(1)
    })

    describe('over the wire', () => {
        let raw: Server | undefined
        afterEach(async () => {
            await new Promise((resolve) => (raw ? raw.close(resolve) : resolve(undefined)))
            raw = undefined
        })

        /** A bare node:http server on 127.0.0.1, for answers the stand-in never gives. */
        async function rawServer(handler: (req: IncomingMessage, res: ServerResponse) => void): Promise<string> {
            raw = createServer(handler)
            await new Promise<void>((resolve) => raw?.listen(0, '127.0.0.1', resolve))
            raw.unref()
            return `http://127.0.0.1:${(raw.address() as AddressInfo).port}`
        }

        const clientFor = (origin: string, extra: Partial<QueryClientOptions> = {}) =>
            new QueryClient({ origin, projectId: '1', apiKey: API_KEY, retryForMs: 0, random: () => 0.5, ...extra })

        it('reads a gzip-compressed answer, and asks for one', async () => {
            const page = {
                columns: ['uuid', 'n'],
                results: [
                    ['a', 1],
                    ['b', 2],
                ],
                hasMore: false,
            }
            let asked: string | undefined
            const origin = await rawServer((req, res) => {
                asked = req.headers['accept-encoding']
                res.writeHead(200, { 'Content-Type': 'application/json', 'Content-Encoding': 'gzip' })
                res.end(gzipSync(JSON.stringify(page)))
            })
            const response = await clientFor(origin).run('SELECT 1')
            expect(asked).toBe('gzip')
            expect([response.row(0), response.row(1)]).toEqual(page.results)
        })

        it('bounds the unpacked size of a compressed answer (a gzip bomb stops at the limit)', async () => {
            const bomb = gzipSync(`{"columns":["s"],"results":[["${'x'.repeat(20_000_000)}"]]}`)
            expect(bomb.length).toBeLessThan(100_000)
            const origin = await rawServer((_req, res) => {
                res.writeHead(200, { 'Content-Encoding': 'gzip' })
                res.end(bomb)
            })
            const error = await clientFor(origin, { maxResponseBytes: 1_000_000 })
                .run('SELECT 1')
                .catch((e: unknown) => e)
            expect((error as Error).message).toBe(
                'the response passed 977 KB (the most one page may take); lower --page-size'
            )
        })

        it('gives up on an answer that stalls after its headers once the query timeout passes', async () => {
            const origin = await rawServer((_req, res) => {
                res.writeHead(200, { 'Content-Type': 'application/json' })
                res.write('{"columns":["s"],"results":[')
            })
            const started = Date.now()
            const error = await clientFor(origin, { timeoutMs: 1_000 })
                .run('SELECT 1')
                .catch((e: unknown) => e)
            expect(error).toBeInstanceOf(PostHogQueryError)
            expect((error as PostHogQueryError).kind).toBe('gave-up')
            expect((error as Error).message).toContain('last: no answer within 1 s')
            expect(Date.now() - started).toBeLessThan(5_000)
        })

        it('names a refused connection, and never puts the key in the message', async () => {
            const origin = await rawServer(() => undefined)
            await new Promise((resolve) => raw?.close(resolve))
            raw = undefined
            const error = await clientFor(origin)
                .run('SELECT 1')
                .catch((e: unknown) => e)
            expect((error as Error).message).toContain('last: network error ECONNREFUSED')
            expect((error as Error).message).not.toContain(API_KEY.slice(4, 12))
        })
    })

    it('stops reading a response past maxResponseBytes and names the fix, without retrying', async () => {
        await standin.insertEvents(events(50, { prefix: 10 }))
        const client = new QueryClient({
            origin: standin.url,
            projectId: String(standin.projectId),
            apiKey: API_KEY,
            maxResponseBytes: 4_096,
        })
        const small = await client.run('SELECT uuid FROM events LIMIT 2')
        expect(small.rowCount).toBe(2)
        small.release()
        const error = await client.run('SELECT uuid, properties FROM events LIMIT 50').catch((e: unknown) => e)
        expect(error).toBeInstanceOf(PostHogQueryError)
        expect((error as PostHogQueryError).message).toBe(
            'the response passed 4 KB (the most one page may take); lower --page-size'
        )
        expect(client.queries).toBe(2)
    })
})

describe('filters and signing', () => {
    it('sends only allowed events, removes excluded properties, and signs each body', async () => {
        server = await startServer(() => ({ status: 200 }))
        const mixed = events(30, {
            name: (n) => (n % 3 === 0 ? 'purchase' : n % 3 === 1 ? '$pageview' : 'noise'),
            prefix: 7,
        })
        await standin.insertEvents(mixed)
        const { code } = await cli(
            baseArgs([
                '--allowed-events',
                'purchase,$pageview',
                '--excluded-events',
                '$pageview',
                '--excluded-properties',
                '$ip',
            ]),
            { PATTERNS_WEBHOOK_URL: `${server.url}/hook/${TOKEN}`, PATTERNS_SIGNING_SECRET: SIGNING_SECRET }
        )
        expect(code).toBe(0)
        expect(server.accepted.map((e) => e.event)).toEqual(Array(10).fill('purchase'))
        for (const event of server.accepted) {
            expect(event.properties).not.toHaveProperty('$ip')
            // Excluding $ip also drops the plugin event's top-level `ip`, as the plugin does.
            expect(event).toMatchObject({ team_id: standin.projectId, distinct_id: expect.any(String) })
            expect(event).not.toHaveProperty('ip')
            expect(String(event.timestamp)).toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$/)
        }
        const key = Buffer.from(SIGNING_SECRET.slice('whsec_'.length), 'base64')
        for (const request of server.received) {
            const id = String(request.headers['webhook-id'])
            const timestamp = String(request.headers['webhook-timestamp'])
            const expected = createHmac('sha256', key).update(`${id}.${timestamp}.${request.body}`).digest('base64')
            expect(request.headers['webhook-signature']).toBe(`v1,${expected}`)
        }
    })

    it('never sends the API key anywhere but PostHog, nor writes it to the checkpoint or dead letters', async () => {
        server = await startServer(() => ({ status: 400, body: 'no' }))
        await standin.insertEvents(events(5, { prefix: 8 }))
        const checkpoint = join(dir, 'ck')
        const deadLetters = join(dir, 'dead.jsonl')
        const { code, stderr } = await cli(baseArgs(['--checkpoint', checkpoint, '--dead-letter', deadLetters]), {
            PATTERNS_WEBHOOK_URL: `${server.url}/hook/${TOKEN}`,
        })
        expect(code).toBe(1)
        expect(stderr).toContain('refused')
        const written = readFileSync(checkpoint, 'utf8') + readFileSync(deadLetters, 'utf8')
        expect(written).not.toContain(API_KEY)
        expect(written).not.toContain(TOKEN)
        for (const request of server.received) {
            expect(JSON.stringify(request.headers)).not.toContain(API_KEY)
        }
    })
})
