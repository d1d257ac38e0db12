/**
 * The plugin against hostile receivers and awkward hosts: secrets echoed back in every encoding, stalled and huge
 * error bodies, a receiver that slows down then hangs, 413 to everything, and the 2021 host's RetryError.
 */
import { createServer, Server } from 'node:http'
import { AddressInfo } from 'node:net'

import {
    ConfigError,
    DEADLINE_MARGIN_MS,
    deliver,
    ERROR_BODY_MAX_BYTES,
    FetchLike,
    fetchTransport,
    isNodeFetchV2,
    MAX_TOO_LARGE_PER_BATCH,
    parseConfig,
    SECRET_FRAGMENT_CHARS,
    setupPlugin,
    shapeEvent,
} from '../index'
import { makeEvent, makeSender, settle, testEnv } from './helpers/env'
import { perTestServers, Reply, WEBHOOK_TOKEN } from './helpers/server'

/** node-fetch 2.6.1, the 2021 host's fetch (no type declarations of its own). */
// eslint-disable-next-line @typescript-eslint/no-require-imports
const nodeFetch2021 = require('node-fetch-2021') as FetchLike

const { serve, start } = perTestServers()

/** Every run of SECRET_FRAGMENT_CHARS characters of a secret, to look for in what the plugin printed. */
function fragmentsOf(secret: string): string[] {
    const width = Math.min(secret.length, SECRET_FRAGMENT_CHARS)
    const out: string[] = []
    for (let start = 0; start + width <= secret.length; start++) {
        out.push(secret.slice(start, start + width))
    }
    return out
}

function expectNoFragment(texts: string[], secrets: string[]): void {
    const all = texts.join('\n')
    for (const secret of secrets) {
        for (const fragment of fragmentsOf(secret)) {
            expect({ fragment, found: all.includes(fragment) }).toEqual({ fragment, found: false })
        }
    }
}

describe('secrets echoed back by the receiver', () => {
    const HEADER_VALUE = 'Bearer  sk_live_4f9a  77b2c1'
    const TARGET = 'https://other.example.net/hooks/MOVEDt0ken8812'

    function bodies(url: string): Array<{ name: string; reply: Reply }> {
        const path = new URL(url).pathname
        const padding = 'x'.repeat(190)
        return [
            { name: 'the bare token', reply: { status: 500, body: `{"error":"no such webhook ${WEBHOOK_TOKEN}"}` } },
            {
                name: 'the JSON-escaped URL',
                reply: { status: 500, body: JSON.stringify({ url }).replace(/\//g, '\\/') },
            },
            { name: 'the percent-encoded path', reply: { status: 500, body: `bad ${encodeURIComponent(path)}` } },
            { name: 'the URL cut at 200 characters', reply: { status: 500, body: `${padding} ${url}` } },
            { name: 'a redirect target', reply: { status: 302, headers: { Location: TARGET }, body: `see ${TARGET}` } },
            { name: 'a header value', reply: { status: 401, body: `bad header "${HEADER_VALUE}"` } },
            { name: 'part of the token', reply: { status: 500, body: `token ${WEBHOOK_TOKEN.slice(3, 15)}…` } },
        ]
    }

    it('never prints a fragment of the URL, the token, a header value or the redirect target', async () => {
        const s = await serve(() => ({ status: 200 }))
        const cases = bodies(s.url)
        let index = 0
        const server = await start(() => cases[index]?.reply ?? { status: 200 })
        const url = server.url
        const printed: string[] = []
        for (; index < cases.length; index++) {
            const env = testEnv({ timers: false })
            const sender = makeSender(
                { webhookUrl: url, customHeaders: JSON.stringify({ Authorization: HEADER_VALUE }) },
                env
            )
            const result = await settle(sender.send(makeEvent(index)))
            expect(result.ok).toBe(false)
            printed.push(!result.ok ? result.error.message : '', ...env.logger.lines)
        }
        await s.close()
        expect(printed.join('\n')).toContain('HTTP 500')
        expectNoFragment(printed, [WEBHOOK_TOKEN, 'sk_live_4f9a  77b2c1', 'MOVEDt0ken8812', 'other.example.net'])
        expect(printed.join('\n')).not.toContain(new URL(url).pathname)
    })

    it('still quotes a body that holds no secret, so receivers can explain themselves', async () => {
        const s = await serve([{ status: 400, body: '{"error":  "field   distinct_id is required"}' }])
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1)))
        expect(!result.ok && result.error.message).toContain('(body: {"error": "field distinct_id is required"})')
    })
})

/** A raw server for bodies that stall or never end. */
async function rawServer(handler: Parameters<typeof createServer>[1]): Promise<{ url: string; server: Server }> {
    const raw = createServer(handler)
    await new Promise<void>((resolve) => raw.listen(0, '127.0.0.1', resolve))
    const { port } = raw.address() as AddressInfo
    return { url: `http://127.0.0.1:${port}/hook/${WEBHOOK_TOKEN}`, server: raw }
}

async function closeRaw(raw: Server): Promise<void> {
    raw.closeAllConnections()
    await new Promise<void>((resolve) => raw.close(() => resolve()))
}

describe('error bodies are bounded', () => {
    it('a body that stalls after one byte is cut off with the request, and the call settles', async () => {
        const { url, server: raw } = await rawServer((_req, res) => {
            res.writeHead(500, { 'Content-Type': 'text/plain' })
            res.write('x')
        })
        try {
            const env = testEnv()
            const sender = makeSender({ webhookUrl: url }, env, { requestTimeoutMs: 300, deadlineMs: 2_000 })
            const result = await settle(sender.send(makeEvent(1)))
            expect(result.ok).toBe(false)
            expect(!result.ok && result.error.message).toContain('HTTP 500')
        } finally {
            await closeRaw(raw)
        }
    })

    it('a huge error body is read only up to ERROR_BODY_MAX_BYTES', async () => {
        let written = 0
        const chunk = Buffer.alloc(64 * 1024, 'a')
        const { url, server: raw } = await rawServer((_req, res) => {
            res.writeHead(500)
            const pump = (): void => {
                while (written < 300 * 1024 * 1024) {
                    written += chunk.length
                    if (!res.write(chunk)) {
                        res.once('drain', pump)
                        return
                    }
                }
                res.end()
            }
            res.on('close', () => undefined)
            pump()
        })
        try {
            const env = testEnv({ timers: false })
            const sender = makeSender({ webhookUrl: url }, env, { maxAttempts: 1 })
            const result = await settle(sender.send(makeEvent(1)))
            expect(!result.ok && result.error.message).toContain('HTTP 500')
            // Socket buffers hold a few MB at most; the 300 MB body was never downloaded.
            expect(written).toBeLessThan(32 * 1024 * 1024)
            expect(ERROR_BODY_MAX_BYTES).toBeLessThanOrEqual(64 * 1024)
        } finally {
            await closeRaw(raw)
        }
    })
})

describe('every call settles within the deadline, counting the host fetch timeout', () => {
    it('a receiver that answers 503 after 9 s, 6.5 s, 3 s, 2 s and then hangs cannot hold a call past 25 s', async () => {
        // As on vm2024: no timers, and the host's fetch holds a request up to its own 10 s, whatever the plugin asks.
        const env = { ...testEnv({ timers: false, fakeClock: true }), timeoutEnforced: false }
        const stages = [9_000, 6_500, 3_000, 2_000]
        const s = await serve((index) => {
            env.advance(stages[index] ?? 10_000)
            return index < stages.length ? { status: 503 } : { status: 504 }
        })
        const start = env.now()
        const result = await settle(makeSender({ webhookUrl: s.url }, env).send(makeEvent(1)))
        expect(result.ok).toBe(false)
        expect(env.now() - start).toBeLessThanOrEqual(25_000 - DEADLINE_MARGIN_MS)
        expect(s.received).toHaveLength(2)
    })

    it('node-fetch v2 enforces its own timeout, so a timerless host still tries every batch', async () => {
        expect(isNodeFetchV2(nodeFetch2021)).toBe(true)
        expect(isNodeFetchV2(fetch)).toBe(false)
        const s = await serve(() => 'hang')
        const env = {
            ...testEnv({ timers: false }),
            transport: fetchTransport(nodeFetch2021),
            timeoutEnforced: isNodeFetchV2(nodeFetch2021),
        }
        const sender = makeSender({ webhookUrl: s.url }, env, { requestTimeoutMs: 200, deadlineMs: 5_000 })
        const first = settle(sender.send(makeEvent(1)))
        await new Promise((resolve) => setTimeout(resolve, 50))
        const second = settle(sender.send(makeEvent(2)))
        const results = await Promise.all([first, second])
        expect(results.map((r) => !r.ok && r.error.message)).toEqual([
            expect.stringContaining('timed out'),
            expect.stringContaining('timed out'),
        ])
        const uuids = s.received.map((request) => (JSON.parse(request.body) as Array<{ uuid: string }>)[0]?.uuid)
        expect(new Set(uuids)).toEqual(new Set([makeEvent(1).uuid, makeEvent(2).uuid]))
    })
})

describe('receivers that refuse too much', () => {
    it('a receiver that answers 413 to everything gets at most MAX_TOO_LARGE_PER_BATCH requests per batch', async () => {
        const s = await serve(() => ({ status: 413 }))
        const items = Array.from({ length: 500 }, (_, n) => ({ uuid: `u${n}`, json: JSON.stringify(makeEvent(n)) }))
        const config = parseConfig({ webhookUrl: s.url })
        const results = await deliver(items, config, testEnv(), Date.now() + 25_000)
        expect(s.received).toHaveLength(MAX_TOO_LARGE_PER_BATCH)
        expect(results.flatMap((r) => r.items)).toHaveLength(500)
        expect(results.every((r) => r.error !== null && !r.retryable)).toBe(true)
        expect(results.at(-1)?.error?.message).toContain('raise the receiver')
    })

    it('still isolates one oversized event in a batch of 500', async () => {
        const s = await serve(() => ({ status: 200 }))
        await s.close()
        const server = await start((request) => (request.body.includes('"BIG"') ? { status: 413 } : { status: 200 }))
        const items = Array.from({ length: 500 }, (_, n) => ({
            uuid: `u${n}`,
            json: JSON.stringify(n === 321 ? { ...makeEvent(n), event: 'BIG' } : makeEvent(n)),
        }))
        const results = await deliver(items, parseConfig({ webhookUrl: server.url }), testEnv(), Date.now() + 25_000)
        const failed = results.filter((r) => r.error).flatMap((r) => r.items.map((item) => item.uuid))
        expect(failed).toEqual(['u321'])
        expect(server.accepted).toHaveLength(499)
    })

    it.each([507, 522, 524, 599])('HTTP %i is retried like any transient 5xx', async (status) => {
        const s = await serve([{ status }, { status: 200 }])
        await makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1))
        expect(s.received).toHaveLength(2)
    })

    it.each([501, 505])('HTTP %i is not retried: the request itself can never work', async (status) => {
        const s = await serve(() => ({ status }))
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1)))
        expect(!result.ok && result.error.name).toBe('Error')
        expect(s.received).toHaveLength(1)
    })
})

describe('retries receivers can deduplicate', () => {
    it('sends the same webhook-id on every retry of a body, without a signing secret', async () => {
        const s = await serve([{ status: 503 }, { status: 500 }, { status: 200 }])
        await makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1))
        const ids = s.received.map((request) => request.headers['webhook-id'])
        expect(ids).toHaveLength(3)
        expect(ids[0]).toMatch(/^msg_[0-9a-f]{32}$/)
        expect(new Set(ids).size).toBe(1)
        expect(s.received[0]?.headers['webhook-signature']).toBeUndefined()
    })
})

describe('the 2021 scaffold, whose RetryError is named "Error"', () => {
    it('failures are still counted as retryable by what the sender decided', async () => {
        jest.resetModules()
        jest.doMock('@posthog/plugin-scaffold', () => jest.requireActual('plugin-scaffold-2021'))
        const plugin = (await import('../index')) as typeof import('../index')
        const scaffold2021 = jest.requireActual<{ RetryError: new (m: string) => Error }>('plugin-scaffold-2021')
        expect(new scaffold2021.RetryError('x').name).toBe('Error')
        const s = await serve(() => ({ status: 503 }))
        const sender = new plugin.Sender(plugin.parseConfig({ webhookUrl: s.url }), testEnv({ timers: false }))
        const result = await settle(sender.send(makeEvent(1)))
        expect(!result.ok && result.error).toBeInstanceOf(scaffold2021.RetryError)
        expect(sender.stats.failuresByCause).toEqual({ retryable: 1 })
        jest.dontMock('@posthog/plugin-scaffold')
    })
})

describe('config that fetch would refuse fails at setup', () => {
    function setupError(customHeaders: string): ConfigError {
        try {
            setupPlugin?.({
                config: { webhookUrl: 'https://example.com/h/abc123', customHeaders },
                global: {},
            } as never)
        } catch (error) {
            return error as ConfigError
        }
        throw new Error('setupPlugin accepted the config')
    }

    it.each(['Transfer-Encoding', 'Expect', 'Connection', 'Upgrade'])('rejects the %s header by name', (name) => {
        const error = setupError(JSON.stringify({ [name]: 'chunked' }))
        expect(error.field).toBe('customHeaders')
        expect(error.message).toContain(`"${name}"`)
        expect(error.message).toContain('Remove it')
    })

    it('rejects a value outside Latin-1 or with a control character, without printing it', () => {
        for (const value of ['tökén ✓ 42', 'a\u0000b']) {
            const error = setupError(JSON.stringify({ 'X-Key': value }))
            expect(error.field).toBe('customHeaders')
            expect(error.message).toContain('"X-Key"')
            expect(error.message).not.toContain(value)
        }
    })
})

describe('excluded properties', () => {
    it('excluding $ip also removes the top-level ip field of older hosts', () => {
        const event = { ...makeEvent(1), ip: '203.0.113.7' }
        const shaped = shapeEvent(event, ['$ip'])
        expect('ip' in shaped).toBe(false)
        expect(shaped.properties.$ip).toBeUndefined()
        expect(event.ip).toBe('203.0.113.7')
    })
})
