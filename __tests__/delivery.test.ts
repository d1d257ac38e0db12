import { createHmac, timingSafeEqual } from 'node:crypto'

import nodeFetch from 'node-fetch'

import { FetchLike, fetchTransport, MAX_ATTEMPTS_WITHOUT_TIMERS, RESERVED_HEADERS, USER_AGENT } from '../index'
import { makeEvent, makeSender, settle, testEnv } from './helpers/env'
import { eventsIn, perTestServers } from './helpers/server'

const { serve, start } = perTestServers()

describe('delivery outcomes', () => {
    it.each([200, 201, 202, 204])(
        'HTTP %i delivers the batch in one request without parsing the body',
        async (status) => {
            const s = await serve([{ status, body: status === 204 ? '' : 'not json at all' }])
            const sender = makeSender({ webhookUrl: s.url }, testEnv())
            await expect(sender.send(makeEvent(1))).resolves.toBeUndefined()
            expect(s.received).toHaveLength(1)
            expect(eventsIn(s.received[0])).toEqual([makeEvent(1)])
        }
    )

    it('posts a JSON array with the connector headers', async () => {
        const s = await serve([{ status: 200 }])
        const sender = makeSender({ webhookUrl: s.url }, testEnv())
        await sender.send(makeEvent(1))
        const request = s.received[0]
        expect(request?.method).toBe('POST')
        expect(request?.headers['content-type']).toBe('application/json')
        expect(request?.headers['user-agent']).toBe(USER_AGENT)
        expect(USER_AGENT).toMatch(/^patterns-connector\/\d+\.\d+\.\d+/)
    })

    it('retries a 503 then succeeds, waiting a jittered backoff', async () => {
        const s = await serve([{ status: 503 }, { status: 200 }])
        const env = testEnv({ random: () => 0.5 })
        const sender = makeSender({ webhookUrl: s.url }, env)
        await sender.send(makeEvent(1))
        expect(s.received).toHaveLength(2)
        expect(env.delays).toEqual([125])
        expect(s.accepted).toHaveLength(1)
    })

    it('honours a 429 Retry-After in seconds', async () => {
        const s = await serve([{ status: 429, headers: { 'Retry-After': '2' } }, { status: 200 }])
        const env = testEnv()
        await makeSender({ webhookUrl: s.url }, env).send(makeEvent(1))
        expect(env.delays).toEqual([2000])
        expect(s.received).toHaveLength(2)
    })

    it('honours a 429 Retry-After as an HTTP date', async () => {
        const env = testEnv({ fakeClock: true })
        const retryAt = new Date(env.now() + 3_000).toUTCString()
        const s = await serve([{ status: 429, headers: { 'Retry-After': retryAt } }, { status: 200 }])
        await makeSender({ webhookUrl: s.url }, env).send(makeEvent(1))
        expect(env.delays).toEqual([3000])
        expect(s.received).toHaveLength(2)
    })

    it('retries a 500 with an HTML body and fails with a RetryError naming status, attempts and URL', async () => {
        const html = '<html><body><h1>500 Internal Server Error</h1></body></html>'
        const s = await serve(() => ({ status: 500, headers: { 'Content-Type': 'text/html' }, body: html }))
        const env = testEnv({ fakeClock: true, random: () => 1 })
        const result = await settle(makeSender({ webhookUrl: s.url }, env).send(makeEvent(1)))
        expect(result.ok).toBe(false)
        const error = !result.ok ? result.error : new Error()
        expect(error.name).toBe('RetryError')
        expect(error.message).toContain('HTTP 500')
        expect(error.message).toContain(`gave up after ${s.received.length} attempts`)
        expect(error.message).toContain('http://127.0.0.1')
        expect(error.message).toContain('500 Internal Server Error')
        expect(s.received.length).toBeGreaterThan(3)
    })

    it('retries a reset connection', async () => {
        const s = await serve(['reset', 'reset', { status: 200 }])
        const env = testEnv()
        await makeSender({ webhookUrl: s.url }, env).send(makeEvent(1))
        expect(s.received).toHaveLength(3)
        expect(s.accepted).toHaveLength(1)
    })

    it('gives up on a hanging webhook at the deadline with a timeout RetryError', async () => {
        const s = await serve(() => 'hang')
        const env = testEnv()
        const sender = makeSender({ webhookUrl: s.url }, env, { requestTimeoutMs: 300, deadlineMs: 2_000 })
        const result = await settle(sender.send(makeEvent(1)))
        expect(result.ok).toBe(false)
        expect(!result.ok && result.error.name).toBe('RetryError')
        expect(!result.ok && result.error.message).toContain('the request timed out')
        expect(s.received.length).toBeGreaterThanOrEqual(2)
    })

    it('splits a 413 batch down to single events', async () => {
        const big = await start((request) =>
            eventsIn(request).length > 1 ? { status: 413, body: 'Payload Too Large' } : { status: 200 }
        )
        const sender = makeSender({ webhookUrl: big.url }, testEnv())
        await Promise.all([1, 2, 3, 4].map((n) => sender.send(makeEvent(n))))
        // 4 → 2 + 2 → 1 + 1 + 1 + 1: three refused requests, four accepted.
        expect(big.received.map((r) => eventsIn(r).length)).toEqual([4, 2, 1, 1, 2, 1, 1])
        expect(big.accepted.map((e) => e.uuid)).toEqual([1, 2, 3, 4].map((n) => makeEvent(n).uuid))
        expect(sender.stats.splits).toBe(3)
    })

    it('fails a single event that still gets 413, naming its uuid', async () => {
        const s = await serve(() => ({ status: 413 }))
        const event = makeEvent(7)
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv()).send(event))
        expect(s.received).toHaveLength(1)
        expect(!result.ok && result.error.name).toBe('Error')
        expect(!result.ok && result.error.message).toContain(`event ${event.uuid}`)
        expect(!result.ok && result.error.message).toContain('HTTP 413')
    })

    it.each([
        [404, 'the webhook does not exist; perhaps the Patterns webhook node was deleted'],
        [410, 'the webhook does not exist'],
        [401, 'rejected the credentials or headers'],
        [403, 'rejected the credentials or headers'],
        [400, 'the receiver refused the events'],
        [501, 'the receiver refused the events'],
    ])('HTTP %i fails once, in exactly one request, with a plain Error', async (status, text) => {
        const s = await serve(() => ({ status }))
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1)))
        expect(s.received).toHaveLength(1)
        expect(result.ok).toBe(false)
        const error = !result.ok ? result.error : new Error()
        expect(error.name).toBe('Error')
        expect(error.message).toContain(`HTTP ${status}`)
        expect(error.message).toContain(text)
        expect(error.message).toContain('gave up after 1 attempt')
        expect(error.message).toContain('http://127.0.0.1')
    })

    it.each([301, 302, 307, 308])('HTTP %i is not followed, and nothing of the target is shown', async (status) => {
        const s = await serve(() => ({
            status,
            headers: { Location: 'https://moved.example.com/hooks/NEWSECRET99xyz' },
        }))
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1)))
        expect(s.received).toHaveLength(1)
        const message = !result.ok ? result.error.message : ''
        expect(message).toContain(`HTTP ${status}: the webhook redirected to another host`)
        for (const fragment of ['NEWSECRET', '99xyz', 'moved.example']) {
            expect(message).not.toContain(fragment)
        }
    })
    it('reports an unparseable redirect Location without failing the batch machinery', async () => {
        const s = await serve(() => ({ status: 302, headers: { Location: 'http://[bad' } }))
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1)))
        expect(!result.ok && result.error.message).toContain('redirected to an unreadable address')
        expect(s.received).toHaveLength(1)
    })

    it('rejects the calls of a batch hit by an unexpected bug, and keeps sending later batches', async () => {
        const s = await serve((index) => (index === 0 ? { status: 503 } : { status: 200 }))
        const env = testEnv()
        env.logger.warn = () => {
            throw new TypeError('logger exploded')
        }
        const sender = makeSender({ webhookUrl: s.url }, env)
        const first = await settle(sender.send(makeEvent(1)))
        expect(!first.ok && first.error.message).toBe(
            'the connector failed unexpectedly (TypeError); the event was not sent'
        )
        await expect(sender.send(makeEvent(2))).resolves.toBeUndefined()
        expect(s.accepted.map((e) => e.uuid)).toEqual([makeEvent(2).uuid])
    })
})

describe('what is sent', () => {
    it('filters a mixed batch by the allow and deny lists, resolving filtered calls at once', async () => {
        const s = await serve(() => ({ status: 200 }))
        const sender = makeSender(
            { webhookUrl: s.url, allowedEventTypes: ' $pageview ,signed_up, ', excludedEventTypes: ' signed_up ' },
            testEnv()
        )
        const events = [
            makeEvent(1),
            makeEvent(2, { event: 'signed_up' }),
            makeEvent(3, { event: '$autocapture' }),
            makeEvent(4),
        ]
        await Promise.all(events.map((e) => sender.send(e)))
        expect(s.received).toHaveLength(1)
        expect(eventsIn(s.received[0]).map((e) => e.uuid)).toEqual([makeEvent(1).uuid, makeEvent(4).uuid])
        expect(sender.stats).toMatchObject({ events: 4, filtered: 2, delivered: 2 })
    })

    it('rejects an event that cannot be serialised, naming it, and still sends the others', async () => {
        const s = await serve(() => ({ status: 200 }))
        const sender = makeSender({ webhookUrl: s.url }, testEnv())
        const broken = makeEvent(1)
        broken.properties.self = broken.properties
        const results = await Promise.all([settle(sender.send(broken)), settle(sender.send(makeEvent(2)))])
        expect(!results[0]?.ok && results[0]?.error.message).toBe(
            `event ${broken.uuid} could not be serialised as JSON (TypeError)`
        )
        expect(results[1]?.ok).toBe(true)
        expect(s.accepted.map((e) => e.uuid)).toEqual([makeEvent(2).uuid])
    })

    it('removes excluded properties before sending', async () => {
        const s = await serve(() => ({ status: 200 }))
        const sender = makeSender({ webhookUrl: s.url, excludedProperties: '$ip, email' }, testEnv())
        await sender.send(makeEvent(1, { $set: { email: 'x@y.z', plan: 'pro' } }))
        const [sent] = eventsIn(s.received[0])
        expect(sent?.properties).toEqual({ $current_url: 'https://example.com/page/1' })
        expect(sent?.$set).toEqual({ plan: 'pro' })
        expect(JSON.stringify(sent)).not.toContain('203.0.113.7')
    })

    it('sends custom headers with every request', async () => {
        const s = await serve([{ status: 503 }, { status: 200 }])
        const headers = '{"Authorization": "Bearer hdr-T0ken-xyz", "X-Team": "growth"}'
        await makeSender({ webhookUrl: s.url, customHeaders: headers }, testEnv()).send(makeEvent(1))
        expect(s.received.map((r) => r.headers.authorization)).toEqual(['Bearer hdr-T0ken-xyz', 'Bearer hdr-T0ken-xyz'])
        expect(s.received[1]?.headers['x-team']).toBe('growth')
        expect(RESERVED_HEADERS).toContain('content-type')
    })

    it('signs requests the Standard Webhooks way, with the same webhook-id on every retry', async () => {
        const secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw'
        const s = await serve([{ status: 503 }, { status: 200 }])
        await makeSender({ webhookUrl: s.url, signingSecret: secret }, testEnv()).send(makeEvent(1))
        expect(s.received).toHaveLength(2)
        // An independent verifier, as a receiver would write it from the Standard Webhooks spec.
        const verify = (headers: Record<string, unknown>, body: string): boolean => {
            const id = String(headers['webhook-id'])
            const timestamp = String(headers['webhook-timestamp'])
            const key = Buffer.from(secret.split('_')[1] ?? '', 'base64')
            const expected = createHmac('sha256', key).update(`${id}.${timestamp}.${body}`).digest()
            return String(headers['webhook-signature'])
                .split(' ')
                .some((sig) => {
                    const [version, value] = sig.split(',')
                    const given = Buffer.from(value ?? '', 'base64')
                    return version === 'v1' && given.length === expected.length && timingSafeEqual(given, expected)
                })
        }
        for (const request of s.received) {
            expect(verify(request.headers, request.body)).toBe(true)
            expect(Math.abs(Number(request.headers['webhook-timestamp']) - Date.now() / 1000)).toBeLessThan(60)
            expect(verify(request.headers, request.body.replace('$pageview', '$pageviex'))).toBe(false)
        }
        expect(s.received[0]?.headers['webhook-id']).toMatch(/^msg_[0-9a-f]{32}$/)
        expect(s.received[1]?.headers['webhook-id']).toBe(s.received[0]?.headers['webhook-id'])
    })

    it('does not sign when no secret is set', async () => {
        const s = await serve([{ status: 200 }])
        await makeSender({ webhookUrl: s.url }, testEnv()).send(makeEvent(1))
        expect(s.received[0]?.headers['webhook-signature']).toBeUndefined()
    })
})

describe('natural batching', () => {
    it('sends 10 calls started together as one POST', async () => {
        const s = await serve(() => ({ status: 200 }))
        const sender = makeSender({ webhookUrl: s.url }, testEnv())
        const events = Array.from({ length: 10 }, (_, i) => makeEvent(i))
        await Promise.all(events.map((e) => sender.send(e)))
        expect(s.received).toHaveLength(1)
        expect(eventsIn(s.received[0]).map((e) => e.uuid)).toEqual(events.map((e) => e.uuid))
    })

    it('gathers a burst into one POST without timers too', async () => {
        const s = await serve(() => ({ status: 200 }))
        const sender = makeSender({ webhookUrl: s.url }, testEnv({ timers: false }))
        await Promise.all(Array.from({ length: 10 }, (_, i) => sender.send(makeEvent(i))))
        expect(s.received).toHaveLength(1)
    })

    it('queues calls that arrive while a POST is in flight into the next POST', async () => {
        let releaseFirst: () => void = () => undefined
        const firstHeld = new Promise<void>((resolve) => (releaseFirst = resolve))
        let firstArrived: () => void = () => undefined
        const arrived = new Promise<void>((resolve) => (firstArrived = resolve))
        const server = await start(async (_request, index) => {
            if (index === 0) {
                firstArrived()
                await firstHeld
            }
            return { status: 200 }
        })
        const s = server
        const sender = makeSender({ webhookUrl: s.url }, testEnv())
        const first = sender.send(makeEvent(0))
        await arrived
        const later = [1, 2, 3, 4, 5].map((n) => sender.send(makeEvent(n)))
        expect(sender.queued).toBe(5)
        releaseFirst()
        await Promise.all([first, ...later])
        expect(s.received.map((r) => eventsIn(r).length)).toEqual([1, 5])
    })

    it('bounds a POST by the maximum event count', async () => {
        const s = await serve(() => ({ status: 200 }))
        const sender = makeSender({ webhookUrl: s.url }, testEnv(), { maxBatchEvents: 4 })
        await Promise.all(Array.from({ length: 10 }, (_, i) => sender.send(makeEvent(i))))
        expect(s.received.map((r) => eventsIn(r).length)).toEqual([4, 4, 2])
    })

    it('bounds a POST by the maximum byte size', async () => {
        const s = await serve(() => ({ status: 200 }))
        const size = JSON.stringify(makeEvent(0)).length
        // Room for two events per POST (brackets and a comma included), not three.
        const sender = makeSender({ webhookUrl: s.url }, testEnv(), { maxBatchBytes: 2 * size + 3 + 10 })
        await Promise.all(Array.from({ length: 5 }, (_, i) => sender.send(makeEvent(i))))
        expect(s.received.map((r) => eventsIn(r).length)).toEqual([2, 2, 1])
        expect(s.received.every((r) => Buffer.byteLength(r.body) <= 2 * size + 13)).toBe(true)
    })

    it('settles each call with its own event fate', async () => {
        const bad = makeEvent(2)
        const server = await start((request) => {
            const events = eventsIn(request)
            if (events.length > 1) {
                return { status: 413 }
            }
            return events[0]?.uuid === bad.uuid ? { status: 400, body: 'bad event' } : { status: 200 }
        })
        const s = server
        const sender = makeSender({ webhookUrl: s.url }, testEnv())
        const results = await Promise.all([1, 2, 3].map((n) => settle(sender.send(makeEvent(n)))))
        expect(results.map((r) => r.ok)).toEqual([true, false, true])
        expect(!results[1]?.ok && results[1]?.error.message).toContain(`event ${bad.uuid}`)
        expect(s.accepted.map((e) => e.uuid)).toEqual([makeEvent(1).uuid, makeEvent(3).uuid])
    })
})

describe('deadline', () => {
    it('stops retrying before the deadline, with all waits inside it', async () => {
        const s = await serve(() => ({ status: 503 }))
        const env = testEnv({ fakeClock: true, random: () => 1 })
        const sender = makeSender({ webhookUrl: s.url }, env)
        const result = await settle(sender.send(makeEvent(1)))
        expect(!result.ok && result.error.name).toBe('RetryError')
        expect(env.delays.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(25_000 - 1_000)
        expect(env.delays).toEqual([250, 500, 1000, 2000, 4000, 5000, 5000, 5000])
        expect(s.received).toHaveLength(env.delays.length + 1)
    })

    it('fails calls queued behind a batch that used up their time, without sending them', async () => {
        const env = testEnv({ fakeClock: true, random: () => 1 })
        const late = makeEvent(2)
        let lateResult: ReturnType<typeof settle> | undefined
        const server = await start((_request, index) => {
            if (index === 0) {
                // A call arrives while the first POST is out, and then that POST takes most of the deadline.
                lateResult = settle(sender.send(late))
                env.advance(4_600)
                return { status: 503 }
            }
            return { status: 200 }
        })
        const s = server
        const sender = makeSender({ webhookUrl: s.url }, env, { deadlineMs: 5_000 })
        const first = await settle(sender.send(makeEvent(1)))
        const second = await lateResult
        expect(first.ok).toBe(false)
        expect(second?.ok).toBe(false)
        expect(second && !second.ok && second.error.name).toBe('RetryError')
        expect(second && !second.ok && second.error.message).toContain('deadline ran out first')
        expect(s.received).toHaveLength(1)
        expect(s.received[0]?.body).not.toContain(late.uuid)
    })
})

describe('deadline where the timeout cannot be enforced', () => {
    it("does not start a batch with less time left than the host fetch's own timeout", async () => {
        // As in the timerless sandbox: no timers, and a fetch whose own timeout (here 10 s) the plugin can't shorten.
        const env = { ...testEnv({ timers: false, fakeClock: true }), timeoutEnforced: false }
        const late = makeEvent(2)
        let lateResult: ReturnType<typeof settle> | undefined
        const server = await start((_request, index) => {
            if (index === 0) {
                lateResult = settle(sender.send(late))
            }
            env.advance(10_000)
            return { status: 504 }
        })
        const s = server
        const sender = makeSender({ webhookUrl: s.url }, env)
        const first = await settle(sender.send(makeEvent(1)))
        const second = await lateResult
        // The first batch: 10 s, 10 s, then 5 s left is too little for another 10 s request.
        expect(!first.ok && first.error.message).toContain('gave up after 2 attempts')
        // The second call has the same 5 s left, so it is not sent at all.
        expect(s.received).toHaveLength(2)
        expect(second && !second.ok && second.error.name).toBe('RetryError')
        expect(second && !second.ok && second.error.message).toContain(
            "not sent: 5.0 s were left before the deadline, and this host's fetch may hold a request for 10 s"
        )
    })
})

describe('without timers', () => {
    it('retries a 503 immediately, a bounded number of times, then throws RetryError', async () => {
        const s = await serve(() => ({ status: 503 }))
        const env = testEnv({ timers: false })
        const result = await settle(makeSender({ webhookUrl: s.url }, env).send(makeEvent(1)))
        expect(s.received).toHaveLength(MAX_ATTEMPTS_WITHOUT_TIMERS)
        expect(env.delays).toEqual([])
        expect(!result.ok && result.error.name).toBe('RetryError')
        expect(!result.ok && result.error.message).toContain(`gave up after ${MAX_ATTEMPTS_WITHOUT_TIMERS} attempts`)
    })

    it('does not hammer a throttling receiver', async () => {
        const s = await serve(() => ({ status: 429, headers: { 'Retry-After': '1' } }))
        const result = await settle(makeSender({ webhookUrl: s.url }, testEnv({ timers: false })).send(makeEvent(1)))
        expect(s.received).toHaveLength(1)
        expect(!result.ok && result.error.name).toBe('RetryError')
        expect(!result.ok && result.error.message).toContain('no timers')
    })

    it('recovers from resets with immediate retries over node-fetch v2, the classic hosts fetch', async () => {
        const s = await serve(['reset', { status: 503 }, { status: 200 }])
        const env = { ...testEnv({ timers: false }), transport: fetchTransport(nodeFetch as unknown as FetchLike) }
        await makeSender({ webhookUrl: s.url }, env).send(makeEvent(1))
        expect(s.received).toHaveLength(3)
        expect(s.accepted).toHaveLength(1)
    })
})
