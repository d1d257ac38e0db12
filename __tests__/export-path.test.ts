/**
 * The 2021 host's export path with the real index.ts: the host buffers events and hands them to exportEvents.
 * What the webhook does not take waits in the outbox (plugin storage) and goes out from runEveryMinute; with the
 * outbox off, the host retries a batch that threw RetryError through its job queue, in a VM of its own (waits
 * scaled down). Through a real HTTP server on 127.0.0.1, on both host paths.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { PROJECT_PLUGIN_DIR } from '../tools/host/loader'
import { HostPath, JobOptions, JobResult, runJob } from '../tools/host/run'
import { sampleEvents } from '../tools/host/sample-events'
import { startReceiver } from '../tools/receiver/receiver'
import { ReceivedRequest, startServer, TestServer, WEBHOOK_TOKEN } from './helpers/server'

const EVENTS = 600
const HEADER_VALUE = 'Bearer exp-Header-Secret-77'
const SIGNING_SECRET = 'whsec_ZXhwLXNpZ25pbmcta2V5LTk4NzY1NDMy'
const SECRETS = [WEBHOOK_TOKEN, HEADER_VALUE, 'exp-Header-Secret', SIGNING_SECRET, 'ZXhwLXNpZ25pbmcta2V5']
/** Ten minutes of outage and of job waits, 200 times faster: 3 s of real time. */
const TIME_SCALE = 0.005
const OUTAGE_MS = 600_000
const PATHS: HostPath[] = ['direct', 'kafka']

const OUTAGE_BODIES: Record<string, { type: string; body: string }> = {
    JSON: { type: 'application/json', body: '{"error":"maintenance","retry":true}' },
    HTML: { type: 'text/html', body: '<html><body><h1>502 Bad Gateway</h1></body></html>' },
    empty: { type: 'text/plain', body: '' },
}

/** runEveryMinute on the same scale as the outage: a minute lasts 300 ms. */
const MINUTE_MS = 60_000 * TIME_SCALE

function drive(server: TestServer, path: HostPath, options: Partial<JobOptions> = {}): Promise<JobResult> {
    return runJob({
        era: 'vm2021',
        path,
        webhookUrl: `${server.url}/api/v1/webhooks/${WEBHOOK_TOKEN}`,
        // Batches handed over every second, so they meet the 3 s outage.
        config: {
            customHeaders: JSON.stringify({ Authorization: HEADER_VALUE }),
            signingSecret: SIGNING_SECRET,
            exportEventsBufferSeconds: '1',
        },
        events: sampleEvents(EVENTS, 5),
        pluginDir: PROJECT_PLUGIN_DIR,
        jobTimeScale: TIME_SCALE,
        minuteMs: MINUTE_MS,
        drain: { until: () => new Set(server.accepted.map((e) => e.uuid)).size >= EVENTS, maxMinutes: 60 },
        ...options,
    })
}

function uuidCounts(requests: readonly ReceivedRequest[], accepted: (index: number) => boolean): Map<string, number> {
    const counts = new Map<string, number>()
    requests.forEach((request, index) => {
        if (accepted(index)) {
            for (const event of JSON.parse(request.body) as Array<{ uuid: string }>) {
                counts.set(event.uuid, (counts.get(event.uuid) ?? 0) + 1)
            }
        }
    })
    return counts
}

function expectNoSecrets(result: JobResult): void {
    const everything = [...result.logs, ...result.errorMessages, ...(result.exportPath?.jobPayloads ?? [])].join('\n')
    for (const secret of SECRETS) {
        expect(everything).not.toContain(secret)
    }
}

/** A webhook down for OUTAGE_MS (scaled) from its first request, answering with the given body meanwhile. */
async function outageServer(outage: { type: string; body: string }): Promise<{ server: TestServer; status: number[] }> {
    let downUntil = 0
    const status: number[] = []
    const server = await startServer(() => {
        downUntil ||= Date.now() + OUTAGE_MS * TIME_SCALE
        const code = Date.now() < downUntil ? 503 : 200
        status.push(code)
        return { status: code, headers: { 'content-type': outage.type }, body: code === 503 ? outage.body : '' }
    })
    return { server, status }
}

describe.each(PATHS)('vm2021 %s path: a webhook down for ten minutes', (path) => {
    it.each(Object.keys(OUTAGE_BODIES))(
        'gets every event once it is back (outage body: %s), from the outbox, each body once, with no host retry job',
        async (kind) => {
            const { server, status } = await outageServer(OUTAGE_BODIES[kind] as { type: string; body: string })
            try {
                const result = await drive(server, path)
                const counts = uuidCounts(server.received, (i) => status[i] === 200)
                expect(counts.size).toBe(EVENTS)
                expect([...counts.values()].every((count) => count === 1)).toBe(true)
                // The outbox kept the batches; the host counted them as delivered and queued no retry.
                expect(result.exportPath?.metrics).toMatchObject({ seen: EVENTS, delivered: EVENTS, undelivered: 0 })
                expect(result.exportPath?.jobs.enqueued).toBe(0)
                expect(result.storage?.writes).toBeGreaterThan(0)
                expect(result.scheduled?.runs).toBeGreaterThan(0)
                // A body sent before the outage ended goes out again with the same id, and each id is accepted once.
                const refusedIds = new Set(
                    server.received.filter((_r, i) => status[i] === 503).map((r) => r.headers['webhook-id'])
                )
                const acceptedIds = server.received
                    .filter((_r, i) => status[i] === 200)
                    .map((r) => String(r.headers['webhook-id']))
                expect(new Set(acceptedIds).size).toBe(acceptedIds.length)
                expect(acceptedIds.some((id) => refusedIds.has(id))).toBe(true)
                expect(result.logs.join('\n')).toMatch(/is taking events again: the \d+ events kept since/)
                expectNoSecrets(result)
            } finally {
                await server.close()
            }
        },
        60_000
    )

    it('with the outbox off, the host’s job queue retries each batch, in other VMs, with the same webhook-id', async () => {
        const { server, status } = await outageServer(OUTAGE_BODIES.JSON as { type: string; body: string })
        try {
            const result = await drive(server, path, {
                config: { outboxMaxMb: '0', customHeaders: JSON.stringify({ Authorization: HEADER_VALUE }) },
                drain: undefined,
            })
            const counts = uuidCounts(server.received, (i) => status[i] === 200)
            expect(counts.size).toBe(EVENTS)
            expect(result.exportPath?.jobs.enqueued).toBeGreaterThan(0)
            expect(result.exportPath?.jobs.left).toBe(0)
            expect(result.storage?.writes ?? 0).toBe(0)
            const refusedIds = new Set(
                server.received.filter((_r, i) => status[i] === 503).map((r) => r.headers['webhook-id'])
            )
            const acceptedIds = server.received.filter((_r, i) => status[i] === 200).map((r) => r.headers['webhook-id'])
            expect(acceptedIds.every((id) => refusedIds.has(id))).toBe(true)
            expectNoSecrets(result)
        } finally {
            await server.close()
        }
    }, 60_000)
})

describe.each(PATHS)('vm2021 %s path: faults', (path) => {
    it('under the fault mix, every event arrives and at most 1% twice', async () => {
        const dataDir = mkdtempSync(join(tmpdir(), 'export-faults-'))
        const faults = { p503: 0.1, p500: 0.05, p429: 0.05, pReset: 0.03, pAcceptReset: 0.01 }
        const rx = await startReceiver({ dataDir, path: `/api/v1/webhooks/${WEBHOOK_TOKEN}`, faults, seed: 9 })
        const total = EVENTS * 3
        try {
            const result = await runJob({
                era: 'vm2021',
                path,
                webhookUrl: rx.url,
                events: sampleEvents(total, 5),
                pluginDir: PROJECT_PLUGIN_DIR,
                config: { exportEventsBufferBytes: '65536' },
                jobTimeScale: 0.001,
                minuteMs: MINUTE_MS,
                drain: { until: () => rx.summary().uniqueUuids >= total, maxMinutes: 60 },
            })
            const summary = rx.summary()
            expect(summary.uniqueUuids).toBe(total)
            expect(summary.duplicateRows).toBeLessThanOrEqual(total * 0.01)
            expect(result.exportPath?.metrics.undelivered).toBe(0)
            expectNoSecrets(result)
        } finally {
            await rx.close()
            rmSync(dataDir, { recursive: true, force: true })
        }
    }, 60_000)

    it('under 429 with Retry-After, every event arrives, none twice', async () => {
        let calls = 0
        const server = await startServer(() =>
            ++calls % 3 === 0 ? { status: 200 } : { status: 429, headers: { 'retry-after': '30' }, body: 'slow down' }
        )
        try {
            const result = await drive(server, path)
            const counts = uuidCounts(server.received, (i) => (i + 1) % 3 === 0)
            expect(counts.size).toBe(EVENTS)
            expect([...counts.values()].every((count) => count === 1)).toBe(true)
            expect(result.exportPath?.metrics.undelivered).toBe(0)
        } finally {
            await server.close()
        }
    }, 60_000)

    it('a permanent refusal is not kept, queues no job, and sends one request per batch', async () => {
        const server = await startServer(() => ({ status: 401, body: '{"detail":"invalid token"}' }))
        try {
            const result = await drive(server, path, { drain: undefined })
            const batches = result.exportPath?.metrics.batches ?? 0
            expect(batches).toBeGreaterThanOrEqual(1)
            expect(server.received.length).toBe(batches)
            expect(result.exportPath?.jobs.enqueued).toBe(0)
            expect(result.exportPath?.metrics).toMatchObject({ otherErrors: EVENTS, undelivered: EVENTS })
            expect(result.storage?.writes ?? 0).toBe(0)
            expect(result.logs.some((line) => line.includes('HTTP 401'))).toBe(true)
            expectNoSecrets(result)
        } finally {
            await server.close()
        }
    })
})

describe('the host’s keys on meta.global', () => {
    it('onEvent stands aside where the host buffers: the buffer saw every event and onEvent sent nothing', async () => {
        const server = await startServer(() => ({ status: 200 }))
        try {
            const result = await drive(server, 'direct', { drain: undefined })
            expect(result.exportPath?.metrics.seen).toBe(EVENTS)
            const counts = uuidCounts(server.received, () => true)
            expect(counts.size).toBe(EVENTS)
            expect([...counts.values()].every((count) => count === 1)).toBe(true)
            expect(result.logs.join('\n')).toContain("in the batches PostHog's export buffer hands over")
            // Every request came from exportEvents: a derived webhook-id, not the random one of onEvent's batches.
            expect(server.received.every((r) => /^msg_[0-9a-f]{32}$/.test(String(r.headers['webhook-id'])))).toBe(true)
        } finally {
            await server.close()
        }
    })

    it('are never written by the plugin', () => {
        const source = readFileSync(join(PROJECT_PLUGIN_DIR, 'index.ts'), 'utf8')
        expect(source).not.toMatch(/exportEvents(Buffer|ToIgnore|WithRetry)\s*(\]\s*)?=(?!=)/)
        expect(source).not.toMatch(/delete\s+[\w.]*exportEvents(Buffer|ToIgnore|WithRetry)/)
    })
})
