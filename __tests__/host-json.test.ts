/**
 * Export batches serialised by the host: the plugin lends each batch to `meta.cache` (PostHog's `set` stringifies it
 * outside the sandbox), reads the text back with `jsonSerialize: false`, and removes it. Through the emulator's
 * 2021 host (real vm2, its cache in a real Postgres engine, PGlite) and a real HTTP server on 127.0.0.1; and a
 * sender over the same cache, answering as hosts could.
 */
import { HOST_JSON_KEY_PREFIX, HOST_JSON_STALL_MS, hostJsonBody, SerialisingCache } from '../index'
import { PROJECT_PLUGIN_DIR } from '../tools/host/loader'
import { HostPath, JobResult, runJob } from '../tools/host/run'
import { sampleEvents } from '../tools/host/sample-events'
import { HostCall, HostStore, metaCache } from '../tools/host/storage'
import { makeEvent, makeSender, settle, testEnv } from './helpers/env'
import { perTestServers, TestServer, WEBHOOK_TOKEN } from './helpers/server'

const EVENTS = 400
/** Small batches, so one run hands the plugin several. */
const BUFFER_BYTES = '32768'

const servers = perTestServers()

function withoutNow(body: string): string {
    return body.replace(/"now":"[^"]*",/g, '')
}

describe('hostJsonBody', () => {
    const body = '[{"uuid":"a"},{"uuid":"b"}]'

    test('takes the batch out of the text the host made of [tag, events]', () => {
        expect(hostJsonBody(`["t1.0",${body}]`, 't1.0')).toBe(body)
    })

    test.each([
        ['another batch’s tag', `["t2.0",${body}]`],
        ['a parsed value, not text', [['t1.0', []]]],
        ['nothing', null],
        ['a text cut off inside the batch', `["t1.0",[{"uuid":"a"},{"uu`],
        ['a text cut off after an event', `["t1.0",${body.slice(0, -1)}`],
        ['the tag alone', '["t1.0",]'],
    ])('refuses %s', (_what, text) => {
        expect(hostJsonBody(text, 't1.0')).toBeNull()
    })
})

describe('in the 2021 host', () => {
    let store: HostStore
    let calls: HostCall[]
    let failLending: boolean

    beforeAll(() => {
        store = new HostStore({
            faults: {
                failCache: (call) => {
                    const lent = call.key.startsWith(HOST_JSON_KEY_PREFIX)
                    if (lent) {
                        calls.push(call)
                    }
                    return lent && failLending
                },
            },
        })
    })
    beforeEach(() => {
        calls = []
        failLending = false
    })
    afterAll(() => store.close())

    function drive(server: TestServer, pluginConfigId: number, path: HostPath = 'direct'): Promise<JobResult> {
        return runJob({
            era: 'vm2021',
            path,
            webhookUrl: `${server.url}/api/v1/webhooks/${WEBHOOK_TOKEN}`,
            config: { exportEventsBufferBytes: BUFFER_BYTES },
            events: sampleEvents(EVENTS, 11),
            pluginDir: PROJECT_PLUGIN_DIR,
            store,
            pluginConfigId,
        })
    }

    const ops = (op: string): HostCall[] => calls.filter((call) => call.op === op)

    test.each([
        ['direct', 101],
        ['kafka', 104],
    ] as const)(
        '%s path: lends each batch to the cache once, sends the text it gives back, and removes it',
        async (path, configId) => {
            const server = await servers.serve([])
            const result = await drive(server, configId, path)

            expect(result.failed).toBe(0)
            const uuids = server.accepted.map((event) => String(event.uuid))
            expect(new Set(uuids).size).toBe(EVENTS)
            expect(uuids).toHaveLength(EVENTS)
            expect(server.received.length).toBeGreaterThan(2)
            // One set, one raw get and one removal per request: every body went through the host's JSON.stringify.
            expect(ops('cache.set')).toHaveLength(server.received.length)
            expect(ops('cache.get')).toHaveLength(server.received.length)
            expect(ops('cache.expire')).toHaveLength(server.received.length)
            const cache = metaCache(store.call, configId, 1)
            for (const call of ops('cache.set')) {
                expect(await cache.get(call.key, 'gone')).toBe('gone')
            }
            for (const request of server.received) {
                expect(request.body).toBe(JSON.stringify(JSON.parse(request.body)))
            }
        }
    )

    test('with the cache failing, the sandbox serialises: the same bodies, every event once', async () => {
        const served = await servers.serve([])
        await drive(served, 102)
        const viaHost = served.received.map((request) => request.body)

        failLending = true
        calls = []
        const server = await servers.serve([])
        const result = await drive(server, 103)

        expect(result.failed).toBe(0)
        expect(ops('cache.set').length).toBeGreaterThan(0)
        expect(ops('cache.get')).toHaveLength(0)
        // The same events in the same batches, serialised alike (the host stamps `now` on each run's events).
        expect(server.received.map((request) => withoutNow(request.body))).toEqual(viaHost.map(withoutNow))
        expect(new Set(server.accepted.map((event) => event.uuid)).size).toBe(EVENTS)
    })
})

describe('a sender over the host cache', () => {
    const store = new HostStore()
    afterAll(() => store.close())
    let nextConfig = 200

    /** The cache of a fresh plugin config, with its `get` answering as `get` says, and a count of `set`s. */
    function cacheWith(get: (real: SerialisingCache['get']) => SerialisingCache['get']): {
        cache: SerialisingCache
        sets: string[]
    } {
        const real = metaCache(store.call, nextConfig++, 1)
        const sets: string[] = []
        return {
            sets,
            cache: {
                set: (key, value, ttl) => {
                    sets.push(key)
                    return real.set(key, value, ttl)
                },
                get: get(real.get),
                expire: real.expire,
            },
        }
    }

    const batch = (from: number): ReturnType<typeof makeEvent>[] =>
        Array.from({ length: 5 }, (_, i) => makeEvent(from + i))

    async function sendThree(cache: SerialisingCache): Promise<{ bodies: string[]; sent: string[] }> {
        const server = await servers.serve([])
        const sender = makeSender({ webhookUrl: `${server.url}/hook` }, testEnv({ random: Math.random }))
        sender.useHostJson(cache)
        const batches = [batch(1), batch(6), batch(11)]
        for (const events of batches) {
            const outcome = await settle(sender.exportBatch(events))
            expect(outcome.ok).toBe(true)
        }
        return {
            bodies: server.received.map((request) => request.body),
            sent: batches.map((events) => JSON.stringify(events)),
        }
    }

    test('a cache that parses what it gives back is asked once, and every batch still goes out as JSON', async () => {
        // As if the host ignored `jsonSerialize: false`: the value comes back parsed.
        const { cache, sets } = cacheWith((real) => (key, defaultValue) => real(key, defaultValue))
        const { bodies, sent } = await sendThree(cache)
        expect(sets).toHaveLength(1)
        expect(bodies).toEqual(sent)
    })

    test('a key gone before it is read (evicted): that batch is serialised here, and the next is lent again', async () => {
        let reads = 0
        const { cache, sets } = cacheWith((real) => (key, defaultValue, options) => {
            reads++
            return reads === 1 ? Promise.resolve(null) : real(key, defaultValue, options)
        })
        const { bodies, sent } = await sendThree(cache)
        expect(sets).toHaveLength(3)
        expect(bodies).toEqual(sent)
    })

    test('a cache that stops answering holds up only the batches already lent: later ones are serialised here', async () => {
        const { cache } = cacheWith((real) => real)
        const sets: string[] = []
        // The first batch's set never answers, as PostHog's Redis client waits for a Redis that is gone.
        const hanging: SerialisingCache = {
            ...cache,
            set: (key, value, ttl) =>
                sets.push(key) === 1 ? new Promise(() => undefined) : cache.set(key, value, ttl),
        }
        const server = await servers.serve([])
        const env = testEnv({ fakeClock: true, random: Math.random })
        const sender = makeSender({ webhookUrl: `${server.url}/hook` }, env)
        sender.useHostJson(hanging)
        let firstSettled = false
        void sender.exportBatch(batch(1)).finally(() => {
            firstSettled = true
        })

        env.advance(HOST_JSON_STALL_MS)
        expect((await settle(sender.exportBatch(batch(6)))).ok).toBe(true)
        expect(sets).toHaveLength(2)
        env.advance(1)
        expect((await settle(sender.exportBatch(batch(11)))).ok).toBe(true)
        expect(sets).toHaveLength(2)

        expect(server.received.map((request) => request.body)).toEqual([
            JSON.stringify(batch(6)),
            JSON.stringify(batch(11)),
        ])
        expect(firstSettled).toBe(false)
    })

    test('a text of another batch is never sent in place of this one', async () => {
        const { cache, sets } = cacheWith(() => () => Promise.resolve(`["someone.else",[{"uuid":"not-ours"}]]`))
        const { bodies, sent } = await sendThree(cache)
        expect(sets).toHaveLength(1)
        expect(bodies).toEqual(sent)
    })
})
