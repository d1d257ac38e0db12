import { createHmac } from 'node:crypto'

import {
    BACKOFF_BASE_MS,
    BACKOFF_CAP_MS,
    backoffDelay,
    classifyError,
    classifyResponse,
    ConfigError,
    DEADLINE_MARGIN_MS,
    HOST_FETCH_TIMEOUT_MS,
    MAX_ATTEMPTS_WITH_TIMERS,
    MAX_ATTEMPTS_WITHOUT_TIMERS,
    MIN_RETRY_AFTER_MS,
    Outcome,
    parseConfig,
    parseList,
    parseRetryAfter,
    planRetry,
    redactText,
    redactUrl,
    RETRY_AFTER_CAP_MS,
    shapeEvent,
    shouldSend,
    signPayload,
    splitInHalves,
    takeCount,
} from '../index'
import { makeEvent } from './helpers/env'

const NOW = Date.parse('2026-11-27T03:00:00Z')
const URL_OK = 'https://api-production.patterns.app/api/v1/webhooks/abc/def/SECRETPATH1234'

function configError(raw: Record<string, string>): ConfigError {
    try {
        parseConfig({ webhookUrl: URL_OK, ...raw })
    } catch (error) {
        return error as ConfigError
    }
    throw new Error('expected a ConfigError')
}

describe('parseConfig', () => {
    it('accepts a Patterns webhook URL and applies defaults', () => {
        const config = parseConfig({ webhookUrl: `  ${URL_OK}  ` })
        expect(config.webhookUrl).toBe(URL_OK)
        expect(config.allowedEvents).toBeNull()
        expect(config.excludedEvents.size).toBe(0)
        expect(config.requestTimeoutMs).toBe(10_000)
        expect(config.deadlineMs).toBe(25_000)
        expect(config.signingKey).toBeNull()
    })

    it.each([
        [{ webhookUrl: '' }, 'webhookUrl', 'required'],
        [{ webhookUrl: 'not a url/SECRETPATH1234' }, 'webhookUrl', 'not an absolute URL'],
        [{ webhookUrl: 'http://example.com/SECRETPATH1234' }, 'webhookUrl', 'Use https'],
        [{ webhookUrl: 'https://user:pw@example.com/SECRETPATH1234' }, 'webhookUrl', 'credentials'],
        [{ webhookUrl: 'ftp://example.com/SECRETPATH1234' }, 'webhookUrl', 'Use an https'],
        [{ customHeaders: '{not json' }, 'customHeaders', 'not valid JSON'],
        [{ customHeaders: '["a"]' }, 'customHeaders', 'JSON object'],
        [{ customHeaders: '{"Content-Type": "text/plain"}' }, 'customHeaders', 'set by the connector'],
        [{ customHeaders: '{"host": "evil"}' }, 'customHeaders', 'set by the connector'],
        [{ customHeaders: '{"Content-Length": "1"}' }, 'customHeaders', 'set by the connector'],
        [{ customHeaders: '{"X-Key": 5}' }, 'customHeaders', 'must be a string'],
        [{ customHeaders: '{"bad header": "x"}' }, 'customHeaders', 'not a valid header name'],
        [{ signingSecret: 'plain-secret' }, 'signingSecret', 'whsec_'],
        [{ signingSecret: 'whsec_c2hvcnQ=' }, 'signingSecret', 'at least 16'],
    ])('rejects %j naming the field %s', (raw, field, fix) => {
        const error = configError(raw)
        expect(error).toBeInstanceOf(ConfigError)
        expect(error.field).toBe(field)
        expect(error.message).toContain(`"${field}"`)
        expect(error.message).toContain(fix)
        expect(error.message).not.toContain('SECRETPATH1234')
    })

    it('allows plain http only for loopback hosts', () => {
        expect(parseConfig({ webhookUrl: 'http://127.0.0.1:8080/hook' }).webhookUrl).toBe('http://127.0.0.1:8080/hook')
        expect(parseConfig({ webhookUrl: 'http://localhost/hook' }).webhookUrl).toBe('http://localhost/hook')
    })

    it('never repeats a custom header value in its errors', () => {
        const error = configError({ customHeaders: '{"Authorization": "Bearer TOPSECRET\\nX"}' })
        expect(error.message).toContain('line break')
        expect(error.message).not.toContain('TOPSECRET')
    })

    it('lists every secret for redaction, longest first', () => {
        const config = parseConfig({
            webhookUrl: URL_OK,
            customHeaders: '{"Authorization": "Bearer hdr-value-42"}',
            signingSecret: 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
        })
        expect(config.secrets).toEqual(
            expect.arrayContaining([
                URL_OK,
                '/api/v1/webhooks/abc/def/SECRETPATH1234',
                'Bearer hdr-value-42',
                'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
            ])
        )
        const lengths = config.secrets.map((s) => s.length)
        expect(lengths).toEqual([...lengths].sort((a, b) => b - a))
    })
})

describe('lists and filters', () => {
    it('trims names and drops empties', () => {
        expect(parseList(' $pageview , ,signed_up,  ')).toEqual(['$pageview', 'signed_up'])
        expect(parseList(undefined)).toEqual([])
        expect(parseList('')).toEqual([])
    })

    it('applies the allow list, then the deny list', () => {
        const config = parseConfig({
            webhookUrl: URL_OK,
            allowedEventTypes: ' $pageview, signed_up ',
            excludedEventTypes: 'signed_up',
        })
        expect(shouldSend('$pageview', config)).toBe(true)
        expect(shouldSend('signed_up', config)).toBe(false)
        expect(shouldSend('$autocapture', config)).toBe(false)
    })

    it('sends everything when the allow list is empty', () => {
        const config = parseConfig({ webhookUrl: URL_OK, allowedEventTypes: ' , ', excludedEventTypes: '$identify' })
        expect(shouldSend('anything', config)).toBe(true)
        expect(shouldSend('$identify', config)).toBe(false)
    })
})

describe('shapeEvent', () => {
    it('removes excluded properties from properties, $set and $set_once without touching the input', () => {
        const event = makeEvent(1, {
            $set: { email: 'a@b.c', plan: 'pro' },
            $set_once: { email: 'a@b.c', first: 'x' },
        })
        event.properties.$set = { email: 'a@b.c', name: 'A' }
        const before = JSON.stringify(event)
        const shaped = shapeEvent(event, ['$ip', 'email'])
        expect(JSON.stringify(event)).toBe(before)
        expect(shaped.properties).toEqual({ $current_url: 'https://example.com/page/1', $set: { name: 'A' } })
        expect(shaped.$set).toEqual({ plan: 'pro' })
        expect(shaped.$set_once).toEqual({ first: 'x' })
        expect(shaped.uuid).toBe(event.uuid)
    })

    it('returns the event unchanged when nothing is excluded', () => {
        const event = makeEvent(2)
        expect(shapeEvent(event, [])).toBe(event)
    })
})

describe('redaction', () => {
    it('keeps only the scheme and host of the URL: no character of the path', () => {
        expect(redactUrl(URL_OK)).toBe('https://api-production.patterns.app/…')
        expect(redactUrl('https://example.com/')).toBe('https://example.com/…')
    })

    it('removes every secret from a text', () => {
        expect(redactText('a SECRET b SECRET', ['SECRET'])).toBe('a [redacted] b [redacted]')
    })
})

describe('batch splitting', () => {
    it('takes items up to the event count', () => {
        expect(takeCount([10, 10, 10, 10], 3, 1_000)).toBe(3)
    })

    it('takes items up to the byte size, counting brackets and commas', () => {
        // [a,b] = 2 + 10 + 1 + 10 = 23 bytes
        expect(takeCount([10, 10, 10], 100, 23)).toBe(2)
        expect(takeCount([10, 10, 10], 100, 22)).toBe(1)
    })

    it('always takes at least one item, however big', () => {
        expect(takeCount([5_000], 100, 10)).toBe(1)
    })

    it('splits in halves, the first half taking the odd one', () => {
        expect(splitInHalves([1, 2, 3, 4, 5])).toEqual([
            [1, 2, 3],
            [4, 5],
        ])
    })
})

describe('classifyResponse', () => {
    it.each([200, 201, 202, 204, 299])('treats %i as delivered', (status) => {
        expect(classifyResponse(status, null, null, NOW).kind).toBe('delivered')
    })

    it.each([408, 425, 429, 500, 502, 503, 504])('treats %i as retryable', (status) => {
        expect(classifyResponse(status, null, null, NOW).kind).toBe('retry')
    })

    it.each([400, 401, 403, 404, 410, 422, 501, 505, 301, 302, 307, 308, 100])('treats %i as permanent', (status) => {
        expect(classifyResponse(status, null, null, NOW).kind).toBe('permanent')
    })

    it('splits on 413', () => {
        expect(classifyResponse(413, null, null, NOW).kind).toBe('split')
    })

    it('explains 401/403, 404/410 and redirects', () => {
        const reason = (status: number, location: string | null = null): string => {
            const outcome = classifyResponse(status, null, location, NOW)
            return 'reason' in outcome ? outcome.reason : ''
        }
        expect(reason(401)).toContain('rejected the credentials or headers')
        expect(reason(403)).toContain('rejected the credentials or headers')
        expect(reason(404)).toContain('Patterns webhook node was deleted')
        expect(reason(410)).toContain('does not exist')
        expect(reason(301, 'https://new.example/…abcd')).toContain('redirected to https://new.example/…abcd')
    })

    it('reads Retry-After on 429 as seconds and as an HTTP date', () => {
        const seconds = classifyResponse(429, '3', null, NOW)
        const date = classifyResponse(429, new Date(NOW + 7_000).toUTCString(), null, NOW)
        expect(seconds).toMatchObject({ kind: 'retry', throttled: true, retryAfterMs: 3_000 })
        expect(date).toMatchObject({ kind: 'retry', throttled: true, retryAfterMs: 7_000 })
    })
})

describe('parseRetryAfter', () => {
    it('parses delta-seconds, dates, past dates and garbage', () => {
        expect(parseRetryAfter('0', NOW)).toBe(0)
        expect(parseRetryAfter(' 12 ', NOW)).toBe(12_000)
        expect(parseRetryAfter(new Date(NOW - 5_000).toUTCString(), NOW)).toBe(0)
        expect(parseRetryAfter('soon', NOW)).toBeNull()
        expect(parseRetryAfter(null, NOW)).toBeNull()
    })

    it('reads fractional seconds as seconds, not as a date in 2001', () => {
        expect(parseRetryAfter('1.5', NOW)).toBe(1_500)
        expect(parseRetryAfter('0.2', NOW)).toBe(200)
    })

    it('reads only texts with a month or day name as dates', () => {
        expect(parseRetryAfter('12-1', NOW)).toBeNull()
        expect(parseRetryAfter('2026', NOW)).toBe(2_026_000)
        expect(parseRetryAfter(new Date(NOW + 7_000).toUTCString(), NOW)).toBe(7_000)
    })
})

describe('classifyError', () => {
    it('retries network errors and timeouts from every fetch flavour', () => {
        const reset = Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' })
        const undici = new TypeError('fetch failed', {
            cause: Object.assign(new Error('x'), { code: 'UND_ERR_SOCKET' }),
        })
        const nodeFetchTimeout = Object.assign(new Error('network timeout at: http://x/y'), {
            name: 'FetchError',
            type: 'request-timeout',
        })
        const abort = Object.assign(new Error('aborted'), { name: 'AbortError' })
        expect(classifyError(reset)).toMatchObject({ kind: 'retry', reason: 'network error ECONNRESET' })
        expect(classifyError(undici)).toMatchObject({ kind: 'retry', reason: 'network error UND_ERR_SOCKET' })
        expect(classifyError(nodeFetchTimeout)).toMatchObject({ kind: 'retry', reason: 'the request timed out' })
        expect(classifyError(abort)).toMatchObject({ kind: 'retry', reason: 'the request timed out' })
    })

    it('never retries a programming error', () => {
        expect(classifyError(new ReferenceError('foo is not defined'))).toEqual({
            kind: 'permanent',
            reason: 'unexpected ReferenceError while sending',
        })
    })
})

describe('retry schedule', () => {
    const retry503: Extract<Outcome, { kind: 'retry' }> = {
        kind: 'retry',
        reason: 'HTTP 503',
        throttled: false,
        retryAfterMs: null,
    }

    function schedule(timers: boolean, outcome = retry503, remainingMs = 25_000): number[] {
        const delays: number[] = []
        for (let attempts = 1; ; attempts++) {
            const plan = planRetry({
                attempts,
                outcome,
                remainingMs,
                timers,
                timeoutEnforced: true,
                maxAttempts: MAX_ATTEMPTS_WITH_TIMERS,
                retryAfterCapMs: RETRY_AFTER_CAP_MS,
                random: () => 1,
            })
            if (!plan.retry) {
                return delays
            }
            delays.push(plan.delayMs)
            remainingMs -= plan.delayMs + 10
        }
    }

    it('backs off exponentially up to the cap, with full jitter', () => {
        expect([0, 1, 2, 3, 4, 5, 6].map((a) => backoffDelay(a, () => 1))).toEqual([
            BACKOFF_BASE_MS,
            500,
            1000,
            2000,
            4000,
            BACKOFF_CAP_MS,
            BACKOFF_CAP_MS,
        ])
        expect(backoffDelay(3, () => 0)).toBe(0)
        expect(backoffDelay(3, () => 0.5)).toBe(1000)
    })

    it('stops before the deadline where timers exist', () => {
        const delays = schedule(true)
        expect(delays).toEqual([250, 500, 1000, 2000, 4000, 5000, 5000, 5000])
        expect(delays.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(25_000)
    })

    it('retries immediately, a bounded number of times, without timers', () => {
        expect(schedule(false)).toEqual(new Array(MAX_ATTEMPTS_WITHOUT_TIMERS - 1).fill(0))
    })

    it('does not retry a throttled request without timers', () => {
        expect(schedule(false, { ...retry503, throttled: true, retryAfterMs: 1_000 })).toEqual([])
    })

    it('honours Retry-After exactly when it fits, and gives up when it does not', () => {
        expect(schedule(true, { ...retry503, throttled: true, retryAfterMs: 4_000 }, 10_000)).toEqual([4_000, 4_000])
        const plan = planRetry({
            attempts: 1,
            outcome: { ...retry503, throttled: true, retryAfterMs: 60_000 },
            remainingMs: 25_000,
            timers: true,
            timeoutEnforced: true,
            maxAttempts: MAX_ATTEMPTS_WITH_TIMERS,
            retryAfterCapMs: RETRY_AFTER_CAP_MS,
            random: () => 1,
        })
        expect(plan).toEqual({ retry: false, why: 'the receiver asked to wait 60 s, longer than the time left' })
    })

    it("will not start an attempt it cannot bound when less than the host fetch's own timeout is left", () => {
        const plan = (remainingMs: number) =>
            planRetry({
                attempts: 1,
                outcome: retry503,
                remainingMs,
                timers: false,
                timeoutEnforced: false,
                maxAttempts: MAX_ATTEMPTS_WITH_TIMERS,
                retryAfterCapMs: RETRY_AFTER_CAP_MS,
                random: () => 1,
            })
        expect(plan(HOST_FETCH_TIMEOUT_MS)).toEqual({ retry: false, why: 'no time left before the deadline' })
        expect(plan(HOST_FETCH_TIMEOUT_MS + DEADLINE_MARGIN_MS)).toEqual({ retry: true, delayMs: 0 })
    })

    it('waits at least MIN_RETRY_AFTER_MS for a Retry-After of 0, so retries are not a tight loop', () => {
        expect(schedule(true, { ...retry503, throttled: true, retryAfterMs: 0 }, 2_000)).toEqual([
            MIN_RETRY_AFTER_MS,
            MIN_RETRY_AFTER_MS,
            MIN_RETRY_AFTER_MS,
        ])
    })

    it("keeps retrying past MAX_ATTEMPTS_WITH_TIMERS when the config's maxAttempts allows, and honours a longer Retry-After cap", () => {
        const plan = (attempts: number, retryAfterMs: number | null) =>
            planRetry({
                attempts,
                outcome: { ...retry503, retryAfterMs },
                remainingMs: 600_000,
                timers: true,
                timeoutEnforced: true,
                maxAttempts: Infinity,
                retryAfterCapMs: 600_000,
                random: () => 1,
            })
        expect(plan(40, null)).toEqual({ retry: true, delayMs: BACKOFF_CAP_MS })
        expect(plan(1, 30_000)).toEqual({ retry: true, delayMs: 30_000 })
    })
})

describe('signPayload', () => {
    it('matches the Standard Webhooks reference construction', () => {
        const key = Buffer.from('MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', 'base64')
        const expected = createHmac('sha256', key).update('msg_1.1700000000.[{"a":1}]').digest('base64')
        expect(signPayload(key, 'msg_1', 1700000000, '[{"a":1}]')).toBe(`v1,${expected}`)
    })
})
