import { readFileSync } from 'node:fs'
import { request as httpRequest } from 'node:http'
import { join } from 'node:path'
import { createContext, runInContext } from 'node:vm'

import { RetryError } from '@posthog/plugin-scaffold'

import * as plugin from '../index'
import { MetaFetch, PatternsConfig, PatternsGlobal } from '../index'
import { getEra } from '../tools/host/eras'
import { PROJECT_PLUGIN_DIR, transpileForEra } from '../tools/host/loader'
import { captureLogger, makeEvent, makeSender, settle, testEnv } from './helpers/env'
import { eventsIn, perTestServers, Reply, WEBHOOK_TOKEN } from './helpers/server'

const { serve, start } = perTestServers()

afterEach(() => {
    jest.restoreAllMocks()
})

interface TestMeta {
    config: PatternsConfig
    global: Partial<PatternsGlobal>
    fetch?: MetaFetch
    logger?: ReturnType<typeof captureLogger>
}

// The hooks are typed for PostHog's full Meta; tests pass only what the hooks read.
function setup(meta: TestMeta): void {
    plugin.setupPlugin?.(meta as unknown as Parameters<NonNullable<typeof plugin.setupPlugin>>[0])
}
function onEvent(event: ReturnType<typeof makeEvent>, meta: TestMeta): Promise<void> {
    const hook = plugin.onEvent
    if (!hook) {
        throw new Error('onEvent is not exported')
    }
    return Promise.resolve(hook(event, meta as unknown as Parameters<typeof hook>[1]))
}

/** The CDP executor's fetch, over a real socket: `{ status, headers, text(), json() }`, no `ok`, plain headers. */
const cdpFetch: MetaFetch = (url, init) =>
    new Promise((resolve, reject) => {
        const req = httpRequest(url, { method: init.method, headers: init.headers, timeout: init.timeoutMs }, (res) => {
            const chunks: Buffer[] = []
            res.on('data', (c: Buffer) => chunks.push(c))
            res.on('end', () => {
                const text = Buffer.concat(chunks).toString('utf8')
                const headers: Record<string, string> = {}
                for (const [name, value] of Object.entries(res.headers)) {
                    headers[name.toLowerCase()] = Array.isArray(value) ? value.join(', ') : String(value)
                }
                resolve({
                    status: res.statusCode ?? 0,
                    headers,
                    text: () => Promise.resolve(text),
                    json: () => Promise.resolve(JSON.parse(text) as unknown),
                })
            })
        })
        req.on('timeout', () => req.destroy(new Error('timeout')))
        req.on('error', reject)
        req.end(init.body)
    })

describe('exports', () => {
    it('exports setupPlugin, onEvent and exportEvents, and not composeWebhook', () => {
        expect(typeof plugin.onEvent).toBe('function')
        expect(typeof plugin.setupPlugin).toBe('function')
        expect(typeof plugin.exportEvents).toBe('function')
        expect('composeWebhook' in plugin).toBe(false)
    })
})

/** meta.global as a host with an export path sets it before setupPlugin. */
function hostBufferKeys(): Partial<PatternsGlobal> {
    return { exportEventsBuffer: {}, exportEventsToIgnore: new Set(), exportEventsWithRetry: () => undefined }
}

function exportEvents(events: ReturnType<typeof makeEvent>[], meta: TestMeta): Promise<void> {
    const hook = plugin.exportEvents
    if (!hook) {
        throw new Error('exportEvents is not exported')
    }
    return Promise.resolve(hook(events, meta as unknown as Parameters<typeof hook>[1]))
}

describe('exactly one handler delivers', () => {
    it('tells a host with an export path by its own keys on meta.global', () => {
        expect(plugin.hostExportsEvents(hostBufferKeys())).toBe(true)
        expect(plugin.hostExportsEvents({})).toBe(false)
        expect(plugin.hostExportsEvents(undefined)).toBe(false)
        expect(plugin.hostExportsEvents({ exportEventsBuffer: {} })).toBe(false)
    })

    it('onEvent sends nothing where the host buffers for exportEvents, and resolves at once', async () => {
        const s = await serve(() => ({ status: 200 }))
        const meta: TestMeta = { config: { webhookUrl: s.url }, global: hostBufferKeys(), logger: captureLogger() }
        setup(meta)
        expect(meta.logger?.lines).toEqual([
            `info: Sending events to http://127.0.0.1:${new URL(s.url).port}/… in the batches PostHog's export buffer hands over.`,
        ])
        const hook = plugin.onEvent as NonNullable<typeof plugin.onEvent>
        expect(hook(makeEvent(1), meta as unknown as Parameters<typeof hook>[1])).toBeUndefined()
        expect(s.received).toHaveLength(0)
    })
})

describe('the host signal read while the module loads', () => {
    /** index.ts as PostHog's 2021 transforms leave it, run in a fresh context with only the globals given. */
    function loadIn(globals: Record<string, unknown>): Record<string, unknown> {
        const era = getEra('vm2024')
        const code = transpileForEra(readFileSync(join(PROJECT_PLUGIN_DIR, 'index.ts'), 'utf8'), era)
        const context = createContext({
            __pluginHostImports: era.imports,
            __asyncGuard: (value: unknown) => Promise.resolve(value),
            console,
            ...globals,
        })
        runInContext(`const module = { exports: {} };\nvar exports = {};\n${code};\nthis.__exports = exports`, context)
        return (context as { __exports: Record<string, unknown> }).__exports
    }

    it('reads __pluginHostMeta behind typeof: a host without it loads the module and gets both handlers', () => {
        const exported = loadIn({})
        expect(typeof exported.onEvent).toBe('function')
        expect(typeof exported.exportEvents).toBe('function')
    })

    it('exports no onEvent where the sandbox has plugin metrics, and both handlers where it has none', () => {
        expect(loadIn({ __pluginHostMeta: { config: {}, storage: {}, metrics: {} } }).onEvent).toBeUndefined()
        expect(typeof loadIn({ __pluginHostMeta: { config: {}, storage: {}, utils: {} } }).onEvent).toBe('function')
        expect(typeof loadIn({ __pluginHostMeta: null }).onEvent).toBe('function')
    })

    it('tells the hosts apart by the metrics member only, never reading inside it', () => {
        // The 2021 host's metrics object throws on any name the plugin did not declare.
        const strict = new Proxy(
            {},
            {
                get: () => {
                    throw new Error('Invalid metric name')
                },
            }
        )
        expect(plugin.hostCertainlyBuffers({ metrics: strict })).toBe(true)
        expect(plugin.hostCertainlyBuffers({ metrics: null })).toBe(false)
        expect(plugin.hostCertainlyBuffers({ cache: {}, jobs: {}, geoip: {} })).toBe(false)
        expect(plugin.hostCertainlyBuffers(undefined)).toBe(false)
        expect(plugin.hostCertainlyBuffers('metrics')).toBe(false)
    })
})

describe('exportEvents', () => {
    it('sends a batch exactly as received where nothing configured changes it: the events as given, one POST', async () => {
        const s = await serve(() => ({ status: 200 }))
        const events = Array.from({ length: 5 }, (_, i) => makeEvent(i))
        await exportEvents(events, { config: { webhookUrl: s.url }, global: hostBufferKeys(), logger: captureLogger() })
        expect(s.received).toHaveLength(1)
        expect(s.received[0]?.body).toBe(JSON.stringify(events))
        expect(s.received[0]?.headers['webhook-id']).toBe(plugin.bodyWebhookId(JSON.stringify(events)))
    })

    it('derives the webhook-id of a long batch from its length and both ends: the same batch, the same id', () => {
        const batch = (from: number, count: number): string =>
            JSON.stringify(Array.from({ length: count }, (_, i) => makeEvent(from + i)))
        const long = batch(0, 400)
        expect(long.length).toBeGreaterThan(2 * plugin.WEBHOOK_ID_SAMPLE_CHARS)
        expect(plugin.bodyWebhookId(long)).toBe(plugin.bodyWebhookId(batch(0, 400)))
        expect(plugin.bodyWebhookId(long)).toMatch(/^msg_[0-9a-f]{32}$/)
        expect(plugin.bodyWebhookId(batch(1, 400))).not.toBe(plugin.bodyWebhookId(long))
        expect(plugin.bodyWebhookId(batch(0, 401))).not.toBe(plugin.bodyWebhookId(long))
        expect(plugin.bodyWebhookId(batch(0, 3))).not.toBe(plugin.bodyWebhookId(batch(0, 2)))
    })

    it('after a 413 on the whole batch, sends it again in halves, each event once', async () => {
        const s = await start((request) => (eventsIn(request).length > 2 ? { status: 413 } : { status: 200 }))
        const events = Array.from({ length: 4 }, (_, i) => makeEvent(i))
        await exportEvents(events, { config: { webhookUrl: s.url }, global: hostBufferKeys(), logger: captureLogger() })
        const accepted = s.received.filter((request) => eventsIn(request).length <= 2).flatMap((r) => eventsIn(r))
        expect(accepted.map((e) => e.uuid)).toEqual(events.map((e) => e.uuid))
    })

    it('sends the host batch as one POST whose webhook-id is the same in a fresh VM for the same events', async () => {
        const s = await serve(() => ({ status: 200 }))
        const events = Array.from({ length: 20 }, (_, i) => makeEvent(i))
        for (let vm = 0; vm < 2; vm++) {
            const meta: TestMeta = { config: { webhookUrl: s.url }, global: hostBufferKeys(), logger: captureLogger() }
            await exportEvents(events, meta)
        }
        expect(s.received).toHaveLength(2)
        expect(eventsIn(s.received[0])).toHaveLength(20)
        expect(s.received[0]?.headers['webhook-id']).toMatch(/^msg_[0-9a-f]{32}$/)
        expect(s.received[1]?.headers['webhook-id']).toBe(s.received[0]?.headers['webhook-id'])
        await exportEvents([makeEvent(99)], { config: { webhookUrl: s.url }, global: {}, logger: captureLogger() })
        expect(s.received[2]?.headers['webhook-id']).not.toBe(s.received[0]?.headers['webhook-id'])
    })

    it('applies the filters and property removal, and sends nothing for a batch that is all filtered out', async () => {
        const s = await serve(() => ({ status: 200 }))
        const config = { webhookUrl: s.url, excludedEventTypes: 'skip_me', excludedProperties: 'email' }
        const meta: TestMeta = { config, global: {}, logger: captureLogger() }
        const kept = { ...makeEvent(1), properties: { email: 'a@example.com', plan: 'pro' } }
        await exportEvents([kept, { ...makeEvent(2), event: 'skip_me' }], meta)
        expect(eventsIn(s.received[0]).map((e) => e.properties)).toEqual([{ plan: 'pro' }])
        await exportEvents([{ ...makeEvent(3), event: 'skip_me' }], meta)
        expect(s.received).toHaveLength(1)
    })

    it('with the outbox off, throws the scaffold RetryError when the webhook asks for more time than the call has, so the host queues the batch', async () => {
        const s = await serve(() => ({
            status: 429,
            headers: { 'Retry-After': '3600' },
            body: `busy: ${WEBHOOK_TOKEN}`,
        }))
        const meta: TestMeta = {
            config: { webhookUrl: `${s.url}/${WEBHOOK_TOKEN}`, outboxMaxMb: '0' },
            global: {},
            logger: captureLogger(),
        }
        const error = await exportEvents([makeEvent(1), makeEvent(2)], meta).then(
            () => null,
            (e: Error) => e
        )
        expect(error).toBeInstanceOf(RetryError)
        expect(error?.message).toContain('2 of the 2 events of this batch were not accepted')
        expect(error?.message).toContain('PostHog will retry the batch')
        expect(error?.message).not.toContain(WEBHOOK_TOKEN)
    })

    it('throws a plain Error on a permanent refusal, which the host does not retry', async () => {
        const s = await serve(() => ({ status: 404 }))
        const meta: TestMeta = {
            config: { webhookUrl: `${s.url}/${WEBHOOK_TOKEN}` },
            global: {},
            logger: captureLogger(),
        }
        const error = await exportEvents([makeEvent(1)], meta).then(
            () => null,
            (e: Error) => e
        )
        expect(error).toBeInstanceOf(Error)
        expect(error).not.toBeInstanceOf(RetryError)
        expect(error?.message).toContain('HTTP 404')
        expect(s.received).toHaveLength(1)
    })
})

describe('setupPlugin', () => {
    it('parses the config once and keeps the sender on global', () => {
        const meta: TestMeta = { config: { webhookUrl: `https://example.com/hook/${WEBHOOK_TOKEN}` }, global: {} }
        jest.spyOn(console, 'info').mockImplementation(() => undefined)
        setup(meta)
        expect(meta.global.config?.webhookUrl).toBe(`https://example.com/hook/${WEBHOOK_TOKEN}`)
        expect(meta.global.sender).toBeInstanceOf(plugin.Sender)
        expect(meta.global.sender?.config).toBe(meta.global.config)
    })

    it('fails on bad config with a message naming the field and the fix', () => {
        const meta: TestMeta = { config: { webhookUrl: `http://example.com/${WEBHOOK_TOKEN}` }, global: {} }
        expect(() => setup(meta)).toThrow('Invalid config "webhookUrl": it uses http. Use https')
        expect(() => setup(meta)).not.toThrow(WEBHOOK_TOKEN)
    })

    it('logs the redacted URL through meta.logger when the host provides one', () => {
        const logger = captureLogger()
        setup({ config: { webhookUrl: `https://example.com/hook/${WEBHOOK_TOKEN}` }, global: {}, logger })
        expect(logger.lines).toEqual([`info: Sending events to https://example.com/… in batches.`])
    })
})

describe('onEvent', () => {
    it('delivers through the global fetch and batches calls started together', async () => {
        const s = await serve(() => ({ status: 200 }))
        const meta: TestMeta = { config: { webhookUrl: s.url }, global: {}, logger: captureLogger() }
        setup(meta)
        await Promise.all(Array.from({ length: 10 }, (_, i) => onEvent(makeEvent(i), meta)))
        expect(s.received).toHaveLength(1)
        expect(eventsIn(s.received[0])).toHaveLength(10)
    })

    it('creates the sender on first use when the host skipped setupPlugin', async () => {
        const s = await serve(() => ({ status: 200 }))
        const meta: TestMeta = { config: { webhookUrl: s.url }, global: {}, logger: captureLogger() }
        await onEvent(makeEvent(1), meta)
        expect(s.accepted).toHaveLength(1)
        expect(meta.global.sender).toBeInstanceOf(plugin.Sender)
    })

    it('uses the CDP meta.fetch contract: no .ok, plain-object headers, timeoutMs', async () => {
        const s = await serve([{ status: 429, headers: { 'Retry-After': '0' } }, { status: 202 }])
        const calls: Parameters<MetaFetch>[1][] = []
        const metaFetch: MetaFetch = (url, init) => {
            calls.push(init)
            return cdpFetch(url, init)
        }
        const fetchSpy = jest.spyOn(globalThis, 'fetch')
        const logger = captureLogger()
        const meta: TestMeta = { config: { webhookUrl: s.url }, global: {}, fetch: metaFetch, logger }
        setup(meta)
        await onEvent(makeEvent(1), meta)
        expect(s.received).toHaveLength(2)
        expect(fetchSpy).not.toHaveBeenCalled()
        expect(calls[0]).toMatchObject({ method: 'POST', timeoutMs: 10_000 })
        expect(calls[0]?.headers['Content-Type']).toBe('application/json')
        expect(logger.lines).toContain(
            'warn: Webhook http://127.0.0.1:' +
                new URL(s.url).port +
                `/… is failing: HTTP 429: the receiver is throttling requests.`
        )
    })

    it('rejects with the webhook error, so the host counts the event as failed', async () => {
        const s = await serve(() => ({ status: 404 }))
        const meta: TestMeta = { config: { webhookUrl: s.url }, global: {}, logger: captureLogger() }
        setup(meta)
        await expect(onEvent(makeEvent(1), meta)).rejects.toThrow('HTTP 404: the webhook does not exist')
        expect(s.received).toHaveLength(1)
    })
})

describe('logging', () => {
    it('logs one line per failure streak, and one when it recovers', async () => {
        const s = await serve((index) => (index < 4 ? { status: 503 } : { status: 200 }))
        const env = testEnv()
        const sender = makeSender({ webhookUrl: s.url }, env)
        await Promise.all([settle(sender.send(makeEvent(1))), settle(sender.send(makeEvent(2)))])
        await sender.send(makeEvent(3))
        const tail = `http://127.0.0.1:${new URL(s.url).port}/…`
        expect(env.logger.lines).toEqual([
            `warn: Webhook ${tail} is failing: HTTP 503: the receiver had a temporary failure.`,
            `info: Webhook ${tail} recovered after 4 failed request(s).`,
        ])
    })
})

describe('secrets', () => {
    it('never puts the URL token, a header value or the signing secret in a log line or an error', async () => {
        const headerValue = 'Bearer hdr-S3cret-Value-77'
        const signingSecret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'
        const replies: Reply[] = [
            // A receiver that echoes the request back in its error bodies.
            { status: 500, body: `failed POST to ${'URL'} with ${headerValue}` },
            'reset',
            { status: 404, body: 'no webhook here' },
            { status: 401, body: headerValue },
            { status: 301, headers: { Location: `/moved/${WEBHOOK_TOKEN}` } },
            { status: 400, body: signingSecret },
            { status: 413 },
        ]
        const server = await start((request, index) => {
            const reply = replies[index % replies.length] ?? { status: 200 }
            if (typeof reply === 'object' && reply.body?.includes('URL')) {
                return { ...reply, body: reply.body.replace('URL', `http://127.0.0.1${request.path}`) }
            }
            return reply
        })
        const s = server
        const logged: string[] = []
        const consoleSpies = (['log', 'info', 'warn', 'error', 'debug'] as const).map((level) =>
            jest.spyOn(console, level).mockImplementation((...args: unknown[]) => {
                logged.push(args.map(String).join(' '))
            })
        )
        const messages: string[] = []
        for (const timers of [true, false]) {
            const env = { ...testEnv({ timers }), logger: plugin.toLogger(console) }
            const sender = makeSender(
                { webhookUrl: s.url, customHeaders: JSON.stringify({ Authorization: headerValue }), signingSecret },
                env,
                { requestTimeoutMs: 500, deadlineMs: 3_000 }
            )
            for (let i = 0; i < replies.length; i++) {
                const result = await settle(sender.send(makeEvent(i)))
                if (!result.ok) {
                    messages.push(result.error.message, String(result.error))
                }
            }
        }
        const meta: TestMeta = { config: { webhookUrl: `http://nowhere.example/${WEBHOOK_TOKEN}` }, global: {} }
        const setupResult = await settle(Promise.resolve().then(() => setup(meta)))
        messages.push(setupResult.ok ? '' : setupResult.error.message)
        expect(consoleSpies.some((spy) => spy.mock.calls.length > 0)).toBe(true)
        expect(messages.length).toBeGreaterThan(5)
        const everything = [...logged, ...messages].join('\n')
        expect(everything).toContain('[redacted]')
        for (const secret of [WEBHOOK_TOKEN, headerValue, 'hdr-S3cret-Value-77', signingSecret, 'MfKQ9r8GKYqrTwjU']) {
            expect(everything).not.toContain(secret)
        }
    })
})
