/**
 * Every era of the plugin host, with and without faults: the real index.ts, loaded by the host emulator (vm2,
 * PostHog's transforms) on each era's default path (the production Kafka path for the classic eras), against the
 * embedded receiver. Where the era has an export path, exportEvents delivers and the host's job queue retries
 * (its waits scaled down); elsewhere onEvent delivers.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { CALL_DEADLINE_MS, MAX_ATTEMPTS_WITHOUT_TIMERS, OUTBOX_LOCK_KEY } from '../index'
import { ERA_NAMES, getEra } from '../tools/host/eras'
import { PROJECT_PLUGIN_DIR } from '../tools/host/loader'
import { HostPath, JobResult, loadForEra, runJob } from '../tools/host/run'
import { sampleEvent, sampleEvents } from '../tools/host/sample-events'
import { DEFAULT_PLUGIN_CONFIG_ID, HostStore } from '../tools/host/storage'
import { FAULT_PRESETS, Receiver, seededRandom, startReceiver } from '../tools/receiver/receiver'
import { waitFor } from './helpers/io'
import { startServer } from './helpers/server'

const EVENTS = 400
/** Jest's budget for the runs that wait on retry jobs or 25 s calls, on a machine shared with busy processes. */
const LOADED_MACHINE_TIMEOUT_MS = 300_000
const CLASSIC_ERAS = ['vm2021', 'vm2022', 'vm2023aug', 'vm2024'] as const
/** Job waits of 6 s, 12 s, … run a thousand times faster. */
const JOB_TIME_SCALE = 0.001
const exportsIn = (era: string): boolean => getEra(era).exportPath !== null
const TOKEN = 'mtx_T0ken_4c1d2e9a7b'
const HEADER_VALUE = 'Bearer mtx-Header-Secret-31'
const SIGNING_SECRET = 'whsec_bXR4LXNpZ25pbmcta2V5LTEyMzQ1Njc4'

let dataDir: string
let receiver: Receiver | undefined

beforeEach(() => {
    dataDir = mkdtempSync(join(tmpdir(), 'eras-'))
})

afterEach(async () => {
    await receiver?.close()
    receiver = undefined
    rmSync(dataDir, { recursive: true, force: true })
})

async function run(
    era: string,
    preset: string,
    count = EVENTS,
    seed = 11,
    path?: HostPath,
    jobTimeScale = JOB_TIME_SCALE,
    extraConfig: Record<string, string> = {}
): Promise<{ result: JobResult; rx: Receiver }> {
    const rx = await startReceiver({ dataDir, path: `/api/v1/webhooks/${TOKEN}`, faults: FAULT_PRESETS[preset], seed })
    receiver = rx
    const config = {
        customHeaders: JSON.stringify({ Authorization: HEADER_VALUE }),
        signingSecret: SIGNING_SECRET,
        ...extraConfig,
    }
    const store = new HostStore()
    try {
        const result = await runJob({
            era,
            path,
            webhookUrl: rx.url,
            config,
            events: sampleEvents(count, seed),
            pluginDir: PROJECT_PLUGIN_DIR,
            hostRetryScale: 0.02,
            jobTimeScale,
            store,
        })
        expect(result.path).toBe(path ?? (era === 'cdp2025' ? 'direct' : 'kafka'))
        // A failed setup would skip every event silently; none of these runs may have one.
        expect(result.skipped).toBe(0)
        await drainAtEnd(era, store, rx, config)
        return { result, rx }
    } finally {
        await store.close()
    }
}

/** Drains for this many scaled minutes at most after a run: each sends what one drain's time budget allows. */
const DRAINS_AT_END = 5

/**
 * What the next minutes (or, without scheduled tasks, the next calls) would do after the run: the outbox drained
 * by a fresh VM over the same storage, the webhook answering again. What it still holds then is counted as lost.
 */
async function drainAtEnd(era: string, store: HostStore, rx: Receiver, config: Record<string, string>): Promise<void> {
    if (!getEra(era).services.storage || (await outboxEvents(store)) === 0) {
        return
    }
    rx.setFaults({})
    const { methods } = loadForEra(
        { era, pluginDir: PROJECT_PLUGIN_DIR, config: { webhookUrl: rx.url, ...config }, store },
        []
    )
    await methods.setupPlugin?.()
    for (let drain = 0; drain < DRAINS_AT_END && (await outboxEvents(store)) > 0; drain++) {
        // A minute passes between drains: the lock of a VM that ended mid-drain (the run's worker threads are
        // stopped with their background drains) has run out its TTL.
        await store.call('cache.expire', [DEFAULT_PLUGIN_CONFIG_ID, OUTBOX_LOCK_KEY, 0])
        await methods.runEveryMinute?.()
    }
    expect(await outboxEvents(store)).toBe(0)
}

/** Events the outbox holds, counted in or not yet: every stored entry's events, from its first piece. */
async function outboxEvents(store: HostStore): Promise<number> {
    const rows = await store.contents(DEFAULT_PLUGIN_CONFIG_ID)
    return Object.entries(rows)
        .filter(([key]) => /^outbox\/\d+\/0$/.test(key))
        .reduce((sum, [, piece]) => sum + (Number((piece as { events?: unknown }).events) || 0), 0)
}

/**
 * Every event the receiver does not hold was reported to the host: as a thrown onEvent, or in a batch the export
 * path gave up on (counted in the host's metrics and logged).
 */
function expectNothingLostSilently(result: JobResult, rx: Receiver, seed = 11): void {
    const stored = rx.uuidCounts()
    const failed = new Set([...result.failedUuids, ...(result.exportPath?.undeliveredUuids ?? [])])
    const missing = [...sampleEvents(result.events, seed)].map((e) => e.uuid).filter((uuid) => !stored.has(uuid))
    expect(missing.filter((uuid) => !failed.has(uuid))).toEqual([])
    expect(result.resolved + result.failed).toBe(result.events)
}

function expectNoSecrets(result: JobResult): void {
    const everything = [...result.logs, ...result.errorMessages, ...(result.exportPath?.jobPayloads ?? [])].join('\n')
    for (const secret of [TOKEN, HEADER_VALUE, 'mtx-Header-Secret', SIGNING_SECRET, 'bXR4LXNpZ25pbmcta2V5']) {
        expect(everything).not.toContain(secret)
    }
}

/**
 * What the plugin exports in each era: no onEvent where the sandbox shows plugin metrics (the host certainly
 * buffers for exportEvents), both handlers everywhere else.
 */
function methodsIn(era: string): string[] {
    return getEra(era).services.pluginMetrics
        ? ['exportEvents', 'runEveryMinute', 'setupPlugin']
        : ['exportEvents', 'onEvent', 'runEveryMinute', 'setupPlugin']
}

describe.each(ERA_NAMES)('era %s', (era) => {
    it(`loads index.ts and exports ${methodsIn(era).join(', ')}`, () => {
        const { methods } = loadForEra({ era, pluginDir: PROJECT_PLUGIN_DIR }, [])
        expect(Object.keys(methods).sort()).toEqual(methodsIn(era))
    })

    it('delivers every event exactly once through exactly one handler', async () => {
        const { result, rx } = await run(era, 'none')
        expect([...rx.uuidCounts().values()].every((count) => count === 1)).toBe(true)
        expect(rx.summary()).toMatchObject({ rows: EVENTS, uniqueUuids: EVENTS })
        // The export path delivered where the era has one; onEvent's sender sent nothing there, and vice versa.
        const exported = result.exportPath?.metrics.delivered ?? 0
        expect(exported).toBe(exportsIn(era) ? EVENTS : 0)
        expect(result.sender?.delivered).toBe(EVENTS)
        // Where the plugin exports no onEvent, the host's export wrapper never calls into the VM per event.
        if (exportsIn(era)) {
            const calls = result.exportPath?.metrics.pluginOnEventCalls
            expect(calls).toBe(methodsIn(era).includes('onEvent') ? EVENTS : 0)
        }
    })

    it(`delivers all ${EVENTS} events in batches with no faults`, async () => {
        const { result, rx } = await run(era, 'none')
        expect(result.failed).toBe(0)
        expect(rx.summary()).toMatchObject({ rows: EVENTS, uniqueUuids: EVENTS, duplicateRows: 0 })
        // Batched: hundreds per request in CDP; on the Kafka path the calls of a micro-batch arrive spread out, so
        // a micro-batch of 10 per thread takes a few requests, but far fewer than one per event.
        expect(rx.summary().requests).toBeLessThanOrEqual(era === 'cdp2025' ? 4 : EVENTS / 2)
        expectNoSecrets(result)
    })

    it(
        'survives the default fault mix without losing an event silently',
        async () => {
            const { result, rx } = await run(era, 'default')
            const summary = rx.summary()
            expectNothingLostSilently(result, rx)
            // A job retries the whole batch, so the chunks accepted before the failure arrive twice (same webhook-id).
            const duplicatesAllowed = exportsIn(era) ? EVENTS * 0.05 : summary.acceptResetRows
            expect(summary.duplicateRows).toBeLessThanOrEqual(duplicatesAllowed)
            expectNoSecrets(result)
            if (exportsIn(era) && era !== 'vm2023aug') {
                // The host's job queue retries a batch until it is accepted: every event arrives, few twice.
                expect(summary.uniqueUuids).toBe(EVENTS)
                expect(result.exportPath?.jobs.left).toBe(0)
            } else if (era === 'cdp2025' || era === 'vm2022') {
                // The plugin can wait (timers) or the host retries: at least 99.9% delivered.
                expect(summary.uniqueUuids).toBeGreaterThanOrEqual(EVENTS * 0.999)
            } else {
                // No timers and no host retry: 429s cannot be waited out, but each surfaces as a RetryError.
                const errorNames = new Set(result.errorMessages.map((m) => m.split(':')[0]))
                expect([...errorNames].filter((name) => name !== 'RetryError')).toEqual([])
            }
        },
        // A busy machine runs the host's job retries and the drain at the end many times slower than a quiet one.
        LOADED_MACHINE_TIMEOUT_MS
    )

    it('delivers at least 99% under 503 10%, 500 5%, reset 3%, accept-then-reset 1%, losing nothing silently', async () => {
        const { result, rx } = await run(era, 'default-no429')
        const summary = rx.summary()
        expectNothingLostSilently(result, rx)
        expect(summary.uniqueUuids).toBeGreaterThanOrEqual(EVENTS * 0.99)
        expect(summary.duplicateRows).toBeLessThanOrEqual(exportsIn(era) ? EVENTS * 0.05 : summary.acceptResetRows)
        expectNoSecrets(result)
    })

    it('fails clearly on a 404 webhook without a retry storm', async () => {
        const { result, rx } = await run(era, 'gone', 100)
        expectNoSecrets(result)
        expect(result.sender?.retries).toBe(0)
        if (exportsIn(era)) {
            // exportEvents throws a plain Error: the host counts the batch undelivered and queues no retry.
            expect(result.exportPath?.jobs.enqueued).toBe(0)
            expect(result.exportPath?.metrics).toMatchObject({ undelivered: 100, retryErrors: 0 })
            // One request per batch (one batch per worker thread's buffer), never a retry.
            expect(rx.summary().requests).toBe(result.exportPath?.metrics.batches)
            const line = result.logs.find((l) => l.includes('HTTP 404'))
            expect(line).toContain('perhaps the Patterns webhook node was deleted')
            return
        }
        expect(result.failed).toBe(100)
        expect(result.errorMessages.every((m) => m.startsWith('Error: ') && m.includes('HTTP 404'))).toBe(true)
        expect(result.errorMessages[0]).toContain('perhaps the Patterns webhook node was deleted')
        // One request per batch, never a retry.
        expect(rx.summary().requests).toBe(result.sender?.requests)
        expect(rx.summary().requests).toBeLessThanOrEqual(era === 'cdp2025' ? 1 : 50)
    })
})

/** The bounds of a single call, with nothing kept for later: what a host does where the outbox is off. */
const NO_OUTBOX = { outboxMaxMb: '0' }

describe('hosts without timers, with the outbox off', () => {
    it('vm2024 direct path: a 503 webhook gets a bounded number of immediate retries per batch', async () => {
        const { result, rx } = await run('vm2024', 'down', 30, 11, 'direct', JOB_TIME_SCALE, NO_OUTBOX)
        // Three micro-batches of 10, each tried MAX_ATTEMPTS_WITHOUT_TIMERS times, then a RetryError per event.
        expect(rx.summary().requests).toBe(3 * MAX_ATTEMPTS_WITHOUT_TIMERS)
        expect(result.failed).toBe(30)
        expect(result.errorMessages.every((m) => m.startsWith('RetryError: ') && m.includes('HTTP 503'))).toBe(true)
        expect(result.sender?.failuresByCause).toEqual({ retryable: 30 })
    })

    it('vm2024 Kafka path: every batch to a 503 webhook is tried a bounded number of times, then each event throws', async () => {
        const { result, rx } = await run('vm2024', 'down', 30, 11, undefined, JOB_TIME_SCALE, NO_OUTBOX)
        expect(result.failed).toBe(30)
        expect(rx.summary().requests % MAX_ATTEMPTS_WITHOUT_TIMERS).toBe(0)
        expect(rx.summary().requests).toBeLessThanOrEqual(30 * MAX_ATTEMPTS_WITHOUT_TIMERS)
        expect(result.errorMessages.every((m) => m.startsWith('RetryError: ') && m.includes('HTTP 503'))).toBe(true)
    })

    // The 2021 scaffold's RetryError is named "Error"; what the host checks is `instanceof` its own class.
    it.each(['direct', 'kafka'] as const)(
        'vm2021 %s path: a 503 batch throws the host’s own RetryError, so the job queue retries it 15 times',
        async (path) => {
            // About 54 hours of job waits, 50,000 times faster.
            const { result, rx } = await run('vm2021', 'down', 30, 11, path, 0.00002, NO_OUTBOX)
            expect(result.failed).toBe(0)
            const batches = result.exportPath?.metrics.batches ?? 0
            expect(batches).toBeGreaterThanOrEqual(1)
            expect(result.exportPath?.jobs).toMatchObject({ enqueued: 15 * batches, left: 0 })
            expect(result.exportPath?.metrics).toMatchObject({ seen: 30, undelivered: 30, otherErrors: 0 })
            // Each try: MAX_ATTEMPTS_WITHOUT_TIMERS immediate attempts in the call, then the host's job.
            expect(rx.summary().requests).toBe(16 * MAX_ATTEMPTS_WITHOUT_TIMERS * batches)
            expectNothingLostSilently(result, rx)
        }
    )
})

describe('a webhook that never answers', () => {
    it(
        'settles every call before the host kills it at 30 s, and keeps its events for later, in every era',
        async () => {
            const eras = await Promise.all(
                ERA_NAMES.map(async (era) => {
                    const dir = mkdtempSync(join(tmpdir(), `hang-${era}-`))
                    const rx = await startReceiver({ dataDir: dir, faults: { pHang: 1 } })
                    // The database is up before the run, as PostHog's Postgres is: its start-up is not the plugin's time.
                    const store = new HostStore()
                    await store.contents()
                    const result = await runJob({
                        era,
                        webhookUrl: rx.url,
                        events: sampleEvents(5),
                        pluginDir: PROJECT_PLUGIN_DIR,
                        // Each call on its own: vm2022's host retries would only repeat the same 25 s twice more.
                        hostRetry: false,
                        jobWaitMs: 0,
                        store,
                    })
                    await store.close()
                    await rx.close()
                    rmSync(dir, { recursive: true, force: true })
                    return { era, result }
                })
            )
            for (const { era, result } of eras) {
                // The host's 30 s guard would throw its TimeoutError, an "other error" that drops the batch.
                expect(result.logs.join('\n')).not.toContain('Script execution timed out')
                // Every event waits in the outbox (plugin storage, or the CDP's memory): nothing failed, nothing lost.
                expect(result.sender?.kept).toBe(5)
                if (exportsIn(era)) {
                    expect(result.exportPath?.metrics).toMatchObject({ otherErrors: 0, retryErrors: 0 })
                    continue
                }
                expect(result.failed).toBe(0)
                // The plugin's 25 s, plus room for a busy CI machine to run the callbacks; the host would kill it at 30 s.
                expect(result.maxCallMs).toBeLessThanOrEqual(CALL_DEADLINE_MS + 750)
            }
        },
        LOADED_MACHINE_TIMEOUT_MS
    )
})

describe('a busy sender', () => {
    it('keeps sending after 30 s of continuous traffic: no loop outlives the host loop guard', async () => {
        let skewMs = 0
        let release = (): void => undefined
        const held = new Promise<void>((resolve) => (release = resolve))
        const server = await startServer(async (_request, index) => {
            if (index === 0) {
                await held
            }
            return { status: 200 }
        })
        // The VM's own database, closed with the test: even with the outbox off, a first accepted request reads it.
        const store = new HostStore()
        try {
            const { methods } = loadForEra(
                {
                    era: 'vm2024',
                    pluginDir: PROJECT_PLUGIN_DIR,
                    now: () => Date.now() + skewMs,
                    // The sender's own deadline is the point here, with nothing kept for later.
                    config: { webhookUrl: server.url, outboxMaxMb: '0' },
                    store,
                },
                []
            )
            await methods.setupPlugin?.()
            const first = methods.onEvent?.(sampleEvent(1, seededRandom(1))) as Promise<void>
            await waitFor(() => server.received.length > 0)
            // A second call queues behind the first POST; then 31 s pass in the sandbox before that POST returns.
            const second = (methods.onEvent?.(sampleEvent(2, seededRandom(2))) as Promise<void>).then(
                () => 'delivered',
                (error: Error) => `${error.name}: ${error.message}`
            )
            skewMs = 31_000
            release()
            await first
            const outcome = await second
            // The plugin's own deadline handles it; a sender loop spanning both batches would die in the loop guard.
            expect(outcome).toMatch(/^RetryError: .*deadline ran out first/)
        } finally {
            await server.close()
            await store.close()
        }
    })
})

describe('what each era hands the plugin', () => {
    const probe = `
        export function onEvent(event, meta) {
            console.log(JSON.stringify({
                keys: Object.keys(event).sort(),
                ip: typeof event.ip,
                meta: Object.keys(meta).sort(),
                timers: typeof setTimeout,
                abort: typeof AbortController,
                encoder: typeof TextEncoder,
            }))
        }
    `
    async function seen(era: string) {
        const rx = await startReceiver({ dataDir, path: '/hook' })
        receiver = rx
        const result = await runJob({ era, webhookUrl: rx.url, events: sampleEvents(1), pluginDir: '.', source: probe })
        const line = result.logs.find((l) => l.startsWith('log: '))
        return JSON.parse(line?.slice('log: '.length) ?? '{}') as Record<string, unknown>
    }

    it('vm2021: the older PluginEvent after the host’s processEvent step, classic meta, no timers', async () => {
        const view = await seen('vm2021')
        expect(view.keys).toEqual(expect.arrayContaining(['now', 'sent_at', 'site_url', 'uuid', 'ip']))
        expect(view.ip).toBe('string')
        expect(view.meta).toEqual(expect.arrayContaining(['attachments', 'cache', 'config', 'global', 'storage']))
        expect([view.timers, view.abort, view.encoder]).toEqual(['undefined', 'undefined', 'undefined'])
    })

    it('vm2024: ProcessedPluginEvent, classic meta, no timers', async () => {
        const view = await seen('vm2024')
        expect(view.keys).not.toContain('now')
        expect(view.ip).toBe('object')
        expect(view.meta).not.toContain('fetch')
        expect(view.timers).toBe('undefined')
    })

    it('cdp2025: no elements, person and fetch and logger in meta, timers', async () => {
        const view = await seen('cdp2025')
        expect(view.keys).not.toContain('elements')
        expect(view.meta).toEqual(['config', 'fetch', 'geoip', 'global', 'logger', 'person'])
        expect([view.timers, view.abort]).toEqual(['function', 'function'])
    })
})

describe('plugin loading', () => {
    it.each(CLASSIC_ERAS)('%s: index.ts loads in vm2 and exports what the hooks need', (era) => {
        const logs: string[] = []
        const { vm } = loadForEra(
            { era, pluginDir: PROJECT_PLUGIN_DIR, config: { webhookUrl: 'https://example.com/x' } },
            logs
        )
        expect(Object.keys(vm.methods).sort()).toEqual(methodsIn(era))
    })
})

describe('receiver', () => {
    it('keeps rows across a restart, with patterns_id still increasing', async () => {
        const first = await startReceiver({ dataDir, path: '/hook' })
        await fetch(first.url, { method: 'POST', body: JSON.stringify([{ uuid: 'a' }, { uuid: 'b' }]) })
        await first.close()
        const second = await startReceiver({ dataDir, path: '/hook' })
        receiver = second
        await fetch(second.url, { method: 'POST', body: JSON.stringify({ uuid: 'c' }) })
        expect(second.rows().map((r) => [r.uuid, r.patterns_id])).toEqual([
            ['a', 1],
            ['b', 2],
            ['c', 3],
        ])
        const summary = (await (await fetch(new URL('/summary', second.url))).json()) as { rows: number }
        expect(summary.rows).toBe(3)
    })

    it('answers 413 above the size limit and 429 with Retry-After', async () => {
        const rx = await startReceiver({ dataDir, path: '/hook', faults: { maxBodyBytes: 10 } })
        receiver = rx
        expect((await fetch(rx.url, { method: 'POST', body: JSON.stringify([{ uuid: 'long-uuid' }]) })).status).toBe(
            413
        )
        rx.setFaults({ p429: 1, retryAfterSeconds: 7 })
        const throttled = await fetch(rx.url, { method: 'POST', body: '[]' })
        expect(throttled.status).toBe(429)
        expect(throttled.headers.get('retry-after')).toBe('7')
    })
})
