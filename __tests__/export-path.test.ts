/**
 * The 2021 host's export path with the real index.ts: the host buffers events, hands them to exportEvents, and
 * retries a batch that threw RetryError through its job queue (waits scaled down), in a VM of its own. Through a
 * real HTTP server on 127.0.0.1, on both host paths.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { PROJECT_PLUGIN_DIR } from '../tools/host/loader'
import { HostPath, JobResult, runJob } from '../tools/host/run'
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

function drive(server: TestServer, path: HostPath, jobTimeScale = TIME_SCALE): Promise<JobResult> {
    return runJob({
        era: 'vm2021',
        path,
        webhookUrl: `${server.url}/api/v1/webhooks/${WEBHOOK_TOKEN}`,
        config: { customHeaders: JSON.stringify({ Authorization: HEADER_VALUE }), signingSecret: SIGNING_SECRET },
        events: sampleEvents(EVENTS, 5),
        pluginDir: PROJECT_PLUGIN_DIR,
        jobTimeScale,
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

describe.each(PATHS)('vm2021 %s path: a webhook down for ten minutes', (path) => {
    it.each(Object.keys(OUTAGE_BODIES))(
        'gets every event once it is back (outage body: %s), retried in other VMs with the same webhook-id',
        async (kind) => {
            const outage = OUTAGE_BODIES[kind] as { type: string; body: string }
            // The outage starts with the first request, however long the host took to start.
            let downUntil = 0
            const status: number[] = []
            const server = await startServer(() => {
                downUntil ||= Date.now() + OUTAGE_MS * TIME_SCALE
                const code = Date.now() < downUntil ? 503 : 200
                status.push(code)
                return { status: code, headers: { 'content-type': outage.type }, body: code === 503 ? outage.body : '' }
            })
            try {
                const result = await drive(server, path)
                const counts = uuidCounts(server.received, (i) => status[i] === 200)
                expect(counts.size).toBe(EVENTS)
                expect(result.exportPath?.metrics).toMatchObject({ seen: EVENTS, delivered: EVENTS, undelivered: 0 })
                expect(result.exportPath?.jobs.enqueued).toBeGreaterThan(0)
                expect(result.exportPath?.jobs.left).toBe(0)
                // Each accepted body had been refused before, with the same id, in the VM that first sent it.
                const refusedIds = new Set(
                    server.received.filter((_r, i) => status[i] === 503).map((r) => r.headers['webhook-id'])
                )
                const acceptedIds = server.received
                    .filter((_r, i) => status[i] === 200)
                    .map((r) => r.headers['webhook-id'])
                expect(acceptedIds.every((id) => refusedIds.has(id))).toBe(true)
                expectNoSecrets(result)
            } finally {
                await server.close()
            }
        },
        60_000
    )
})

describe.each(PATHS)('vm2021 %s path: retries through the job queue', (path) => {
    it('under the fault mix, every event arrives and at most 5% twice', async () => {
        const dataDir = mkdtempSync(join(tmpdir(), 'export-faults-'))
        const faults = { p503: 0.1, p500: 0.05, p429: 0.05, pReset: 0.03, pAcceptReset: 0.01 }
        const rx = await startReceiver({ dataDir, path: `/api/v1/webhooks/${WEBHOOK_TOKEN}`, faults, seed: 9 })
        try {
            const result = await runJob({
                era: 'vm2021',
                path,
                webhookUrl: rx.url,
                events: sampleEvents(EVENTS * 3, 5),
                pluginDir: PROJECT_PLUGIN_DIR,
                config: { exportEventsBufferBytes: '65536' },
                jobTimeScale: 0.001,
            })
            const summary = rx.summary()
            expect(summary.uniqueUuids).toBe(EVENTS * 3)
            expect(summary.duplicateRows).toBeLessThanOrEqual(EVENTS * 3 * 0.05)
            expect(result.exportPath?.metrics.undelivered).toBe(0)
            expectNoSecrets(result)
        } finally {
            await rx.close()
            rmSync(dataDir, { recursive: true, force: true })
        }
    })

    it('under 429 with Retry-After, every event arrives', async () => {
        let calls = 0
        const server = await startServer(() =>
            ++calls % 3 === 0 ? { status: 200 } : { status: 429, headers: { 'retry-after': '30' }, body: 'slow down' }
        )
        try {
            const result = await drive(server, path, 0.001)
            expect(uuidCounts(server.received, (i) => (i + 1) % 3 === 0).size).toBe(EVENTS)
            expect(result.exportPath?.metrics.undelivered).toBe(0)
            expect(result.exportPath?.metrics.retryErrors).toBeGreaterThan(0)
        } finally {
            await server.close()
        }
    })

    it('a permanent refusal queues no job and sends one request per batch (one POST up to 1 MB)', async () => {
        const server = await startServer(() => ({ status: 401, body: '{"detail":"invalid token"}' }))
        try {
            const result = await drive(server, path)
            const batches = result.exportPath?.metrics.batches ?? 0
            expect(batches).toBeGreaterThanOrEqual(1)
            expect(server.received.length).toBe(batches)
            expect(result.exportPath?.jobs.enqueued).toBe(0)
            expect(result.exportPath?.metrics).toMatchObject({ otherErrors: EVENTS, undelivered: EVENTS })
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
            const result = await drive(server, 'direct')
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
