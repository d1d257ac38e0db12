/**
 * The shared delivery pipeline, stage by stage and composed, with a cursor-like source such as sync's: batching by
 * the plugin's rule, the ordered checkpoint, back-pressure, flushing live chunks, dead letters and source errors.
 * Delivery goes through a real HTTP server on 127.0.0.1.
 */
import { batchBody, parseConfig, signPayload, takeCount } from '../index'
import {
    DeadLetter,
    PipelineProgress,
    PROGRESS_INTERVAL_MS,
    progressDelayMs,
    runPipeline,
    SourceRecord,
} from '../pipeline'
import { batchItems } from '../pipeline/batch'
import { batchBodyBytes } from '../pipeline/body'
import { orderedCheckpoint } from '../pipeline/checkpoint'
import { Item, ShapedChunk } from '../pipeline/types'
import { testEnv } from './helpers/env'
import { waitFor } from './helpers/io'
import { eventsIn, startServer, TestServer } from './helpers/server'

/** A cursor such as a PostHog pager's: compared by nobody but the source. */
interface Cursor {
    page: number
    row: number
}

let server: TestServer | undefined

afterEach(async () => {
    await server?.close()
    server = undefined
})

function event(n: number, name = '$pageview'): Record<string, unknown> {
    return { uuid: `uuid-${n}`, event: name, distinct_id: `user-${n}`, properties: { n } }
}

function records(page: number, from: number, count: number, name?: string): SourceRecord<Cursor>[] {
    return Array.from({ length: count }, (_, i) => ({
        position: { page, row: from + i },
        kind: 'event' as const,
        event: event(from + i, name),
    }))
}

async function* pages(...chunks: SourceRecord<Cursor>[][]): AsyncGenerator<SourceRecord<Cursor>[]> {
    for (const chunk of chunks) {
        yield chunk
    }
}

function config(url: string, overrides: { maxBatchEvents?: number; deadlineMs?: number } = {}) {
    return parseConfig({ webhookUrl: url }, { maxBatchEvents: 2, ...overrides })
}

describe('batch stage', () => {
    it("cuts batches exactly where the plugin's takeCount says, by count and by bytes", async () => {
        const sizes = Array.from({ length: 500 }, (_, i) => 1 + ((i * 7919) % 997))
        const items: Item<number>[] = sizes.map((bytes, i) => ({ position: i, uuid: `${i}`, json: 'x', bytes }))
        const chunks: ShapedChunk<number>[] = [
            { items: items.slice(0, 123), last: 122 },
            { items: items.slice(123), last: 499 },
        ]
        async function* shaped() {
            yield* chunks
        }
        const got: number[] = []
        for await (const batch of batchItems(shaped(), { maxBatchEvents: 7, maxBatchBytes: 3_000 })) {
            got.push(batch.items.length)
        }
        const expected: number[] = []
        for (let rest = sizes; rest.length > 0;) {
            const count = takeCount(rest, 7, 3_000)
            expected.push(count)
            rest = rest.slice(count)
        }
        expect(got).toEqual(expected)
    })
})

describe('request bodies as bytes', () => {
    const items = [
        { json: '{"a":"plain"}' },
        { json: '{"b":"é ✓ 😀"}' },
        { json: JSON.stringify({ c: 'x'.repeat(5_000) }) },
    ].map((item) => ({ ...item, bytes: Buffer.byteLength(item.json) }))

    it('are exactly the UTF-8 of the plugin’s joined string, with or without sizes given', () => {
        const expected = Buffer.from(batchBody(items))
        expect(batchBodyBytes(items).equals(expected)).toBe(true)
        expect(batchBodyBytes(items.map(({ json }) => ({ json }))).equals(expected)).toBe(true)
        expect(batchBodyBytes([]).toString()).toBe('[]')
    })

    it('fall back to the joined string when a given size is wrong, never sending a cut body', () => {
        const expected = Buffer.from(batchBody(items))
        for (const delta of [-1, 1, -3]) {
            const wrong = items.map((item, i) => (i === 1 ? { ...item, bytes: item.bytes + delta } : item))
            expect(batchBodyBytes(wrong).equals(expected)).toBe(true)
        }
    })

    it('are signed as the same text is', () => {
        const key = Buffer.from('signing-key-0123456789')
        const text = batchBody(items)
        expect(signPayload(key, 'msg_1', 1_795_000_000, batchBodyBytes(items))).toBe(
            signPayload(key, 'msg_1', 1_795_000_000, text)
        )
    })

    it('reach a real server byte for byte through the sender', async () => {
        server = await startServer(() => ({ status: 200 }))
        const report = await runPipeline<Cursor>({
            source: pages(records(1, 0, 4)),
            config: config(server.url),
            env: { ...testEnv(), encodeBody: batchBodyBytes },
        })
        expect(report.delivered).toBe(4)
        expect(server.received.map((r) => r.body)).toEqual([
            batchBody([0, 1].map((n) => ({ json: JSON.stringify(event(n)) }))),
            batchBody([2, 3].map((n) => ({ json: JSON.stringify(event(n)) }))),
        ])
    })
})

describe('ordered checkpoint stage', () => {
    it('commits only the acknowledged prefix, and lists batches acknowledged beyond it', async () => {
        const commits: Array<[number, unknown]> = []
        const checkpoint = orderedCheckpoint<number>((position, ahead) => {
            commits.push([position, ahead])
        }, -1)
        const [first, second, third] = [checkpoint.open(9), checkpoint.open(19), checkpoint.open(29)]
        third?.()
        second?.()
        await checkpoint.settled()
        expect(commits).toEqual([
            [-1, [{ after: 19, last: 29 }]],
            [
                -1,
                [
                    { after: 9, last: 19 },
                    { after: 19, last: 29 },
                ],
            ],
        ])
        first?.()
        await checkpoint.settled()
        expect(commits[commits.length - 1]).toEqual([29, []])
    })
})

describe('runPipeline', () => {
    it('delivers every record of a cursor source and commits each cursor once every earlier record is delivered', async () => {
        server = await startServer(() => ({ status: 200 }))
        const commits: Cursor[] = []
        const report = await runPipeline<Cursor>({
            source: pages(records(1, 0, 3), records(2, 3, 3)),
            config: config(server.url),
            env: testEnv(),
            concurrency: 2,
            commit: (position) => {
                commits.push(position)
            },
        })
        expect(report.stopped).toBeNull()
        // Two requests in flight may reach the server in either order; the commits must still come in order.
        expect(server.accepted.map((e) => String(e.uuid)).sort()).toEqual([0, 1, 2, 3, 4, 5].map((n) => `uuid-${n}`))
        expect(commits.map((c) => c.row)).toEqual([...commits.map((c) => c.row)].sort((a, b) => a - b))
        expect(commits[commits.length - 1]).toEqual({ page: 2, row: 5 })
        expect(report.committed).toEqual({ page: 2, row: 5 })
        expect(report).toMatchObject({ read: 6, delivered: 6, requests: 3, batches: 3, retries: 0 })
    })

    it('never commits past a batch that ran out of retries, though later batches were delivered', async () => {
        // The batch holding event 2 always gets 503; every other batch is accepted.
        server = await startServer((request) =>
            eventsIn(request).some((e) => e.uuid === 'uuid-2') ? { status: 503 } : { status: 200 }
        )
        const commits: Cursor[] = []
        const report = await runPipeline<Cursor>({
            source: pages(records(1, 0, 8)),
            config: config(server.url, { deadlineMs: 5_000 }),
            env: testEnv({ fakeClock: true }),
            concurrency: 3,
            commit: (position) => {
                commits.push(position)
            },
        })
        expect(report.stopped).toContain('the webhook kept failing')
        expect(server.accepted.map((e) => e.uuid)).toEqual(expect.arrayContaining(['uuid-0', 'uuid-4']))
        expect(commits.every((c) => c.row < 2)).toBe(true)
        expect(report.committed).toEqual({ page: 1, row: 1 })
    })

    it('stops reading while K batches are in flight (back-pressure)', async () => {
        let release: () => void = () => undefined
        const released = new Promise<void>((resolve) => (release = resolve))
        server = await startServer(async () => {
            await released
            return { status: 200 }
        })
        let pulled = 0
        async function* endless(): AsyncGenerator<SourceRecord<Cursor>[]> {
            for (let page = 0; page < 1_000; page++) {
                pulled++
                yield records(page, page * 2, 2)
            }
        }
        const run = runPipeline<Cursor>({
            source: endless(),
            config: config(server.url),
            env: testEnv(),
            concurrency: 3,
        })
        await waitFor(() => server!.received.length === 3)
        await new Promise((resolve) => setTimeout(resolve, 100))
        // Three batches out, one more read and waiting for a slot, and nothing else.
        expect(pulled).toBeLessThanOrEqual(4)
        release()
        const report = await run
        expect(report.delivered).toBe(2_000)
    })

    it('with flushEachChunk sends the end of a live chunk without waiting for the next one', async () => {
        server = await startServer(() => ({ status: 200 }))
        const rx = server
        async function* live(): AsyncGenerator<SourceRecord<Cursor>[]> {
            yield records(1, 0, 3)
            // The next poll only comes once the first one's events are out (or the test gives up).
            await waitFor(() => rx.received.length === 2, 3_000).catch(() => undefined)
            yield records(2, 3, 1)
        }
        const report = await runPipeline<Cursor>({
            source: live(),
            config: config(rx.url),
            env: testEnv(),
            flushEachChunk: true,
        })
        expect(report.delivered).toBe(4)
        expect(rx.received.map((r) => eventsIn(r).length)).toEqual([2, 1, 1])
    })

    it('reports progress after the last change: a burst then quiet ends on the true counts, none in flight', async () => {
        server = await startServer(() => ({ status: 200 }))
        const reports: PipelineProgress[] = []
        let quietOver: () => void = () => undefined
        const quiet = new Promise<void>((resolve) => (quietOver = resolve))
        async function* burstThenQuiet(): AsyncGenerator<SourceRecord<Cursor>[]> {
            yield records(1, 0, 12)
            // A live feed between polls: nothing more comes, and the run goes on.
            await quiet
        }
        const run = runPipeline<Cursor>({
            source: burstThenQuiet(),
            config: config(server.url),
            env: testEnv(),
            concurrency: 4,
            flushEachChunk: true,
            onProgress: (p) => reports.push(p),
        })
        const latest = (): PipelineProgress | undefined => reports[reports.length - 1]
        await waitFor(() => latest()?.delivered === 12 && latest()?.inFlight === 0, 30_000)
        expect(server.received).toHaveLength(6)
        expect(latest()).toMatchObject({ read: 12, delivered: 12, requests: 6, inFlight: 0 })
        quietOver()
        expect((await run).delivered).toBe(12)
    })

    it('lets a report out at once, then waits out the rest of the interval since the last one', () => {
        expect(progressDelayMs(null, 1_000)).toBe(0)
        expect(progressDelayMs(1_000, 1_000)).toBe(PROGRESS_INTERVAL_MS)
        expect(progressDelayMs(1_000, 1_100)).toBe(PROGRESS_INTERVAL_MS - 100)
        expect(progressDelayMs(1_000, 1_000 + PROGRESS_INTERVAL_MS + 5)).toBe(0)
    })

    it('commits past a stretch of filtered events without sending anything', async () => {
        server = await startServer(() => ({ status: 200 }))
        const commits: Cursor[] = []
        const report = await runPipeline<Cursor>({
            source: pages(records(1, 0, 5, 'internal')),
            config: parseConfig({ webhookUrl: server.url, excludedEventTypes: 'internal' }),
            env: testEnv(),
            commit: (position) => {
                commits.push(position)
            },
        })
        expect(server.received).toHaveLength(0)
        expect(report.filtered).toBe(5)
        expect(commits).toEqual([{ page: 1, row: 4 }])
    })

    it('dead-letters unreadable records and refused events with their positions, and commits past them', async () => {
        server = await startServer((request) =>
            eventsIn(request).some((e) => e.uuid === 'uuid-1') ? { status: 400 } : { status: 200 }
        )
        const dead: DeadLetter<Cursor>[] = []
        const source = pages([
            ...records(1, 0, 2),
            { position: { page: 1, row: 2 }, kind: 'malformed', reason: 'not valid JSON', raw: '{x', line: 3 },
            ...records(1, 3, 1),
        ])
        const report = await runPipeline<Cursor>({
            source,
            config: config(server.url, { maxBatchEvents: 1 }),
            env: testEnv(),
            deadLetter: (entry) => dead.push(entry),
        })
        expect(report).toMatchObject({ delivered: 2, deadLettered: 1, malformed: 1, stopped: null })
        expect(dead.map((d) => d.position.row)).toEqual([2, 1])
        expect(dead[0]).toMatchObject({ reason: 'line 3: not valid JSON', raw: '{x', line: 3 })
        expect(dead[1]?.reason).toContain('HTTP 400')
        expect(dead[1]?.event).toBe(JSON.stringify(event(1)))
        expect(report.committed).toEqual({ page: 1, row: 3 })
    })

    it("stops with the source's error, after committing what was delivered before it", async () => {
        server = await startServer(() => ({ status: 200 }))
        async function* failing(): AsyncGenerator<SourceRecord<Cursor>[]> {
            yield records(1, 0, 2)
            throw new Error('PostHog answered 500 for page 2')
        }
        const report = await runPipeline<Cursor>({ source: failing(), config: config(server.url), env: testEnv() })
        expect(report.stopped).toBe('PostHog answered 500 for page 2')
        expect(report.delivered).toBe(2)
        expect(report.committed).toEqual({ page: 1, row: 1 })
    })
})
