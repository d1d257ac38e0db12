/**
 * The emulator's meta.storage, meta.cache, runEveryMinute and plugin metrics: small plugins written inline, run by
 * the host in real vm2 sandboxes and worker threads, against a real Postgres (PGlite) database per install.
 */
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { runStartCli } from '../tools/host/cli'
import { ERA_NAMES, getEra, HOST_SERVICES } from '../tools/host/eras'
import { PROJECT_PLUGIN_DIR } from '../tools/host/loader'
import { JobOptions, JobResult, runJob } from '../tools/host/run'
import { sampleEvents } from '../tools/host/sample-events'
import { HostStore, INJECTED_WRITE_ERROR, metaCache } from '../tools/host/storage'
import { captureOutput } from './helpers/io'

/** Far longer than a store needs to start, answer and let its process end (about 2 s). */
const UNCLOSED_STORE_EXIT_BOUND_MS = 45_000

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms).unref())

/** The plugins here never call the webhook: the URL is only a required config value. */
const UNUSED_WEBHOOK = 'http://127.0.0.1:9/hook'

/** One database for the tests that only read what they wrote: each test runs as its own plugin config. */
let shared: HostStore
let nextConfigId = 100
beforeAll(() => {
    shared = new HostStore()
})
afterAll(async () => {
    await shared.close()
})

function run(source: string, options: Partial<JobOptions> & { era: string; count: number }): Promise<JobResult> {
    const { count, ...rest } = options
    return runJob({
        webhookUrl: UNUSED_WEBHOOK,
        events: sampleEvents(count),
        pluginDir: PROJECT_PLUGIN_DIR,
        source,
        ...rest,
    })
}

/** The plugin's own log lines that start with a tag, without the tag. */
function tagged(result: JobResult, tag: string): string[] {
    return result.logs
        .filter((line) => line.startsWith(`log: ${tag} `))
        .map((line) => line.slice(`log: ${tag} `.length))
}

describe('meta.storage', () => {
    it('vm2021: get, set and del go through vm2 to posthog_pluginstorage and back as JSON', async () => {
        const pluginConfigId = nextConfigId++
        const source = `
            export async function onEvent(event, { storage }) {
                await storage.set('doc', { n: 1, list: ['a', 'b'], uuid: event.uuid })
                const back = await storage.get('doc', null)
                const missing = await storage.get('missing', 'fallback')
                await storage.set('gone', 42)
                await storage.del('gone')
                const deleted = await storage.get('gone', 'deleted')
                console.log('seen ' + JSON.stringify([back, missing, deleted]))
            }
        `
        const result = await run(source, { era: 'vm2021', count: 1, path: 'direct', store: shared, pluginConfigId })
        const [seen] = tagged(result, 'seen')
        const uuid = [...sampleEvents(1)][0]?.uuid
        expect(JSON.parse(seen ?? 'null')).toEqual([{ n: 1, list: ['a', 'b'], uuid }, 'fallback', 'deleted'])
        expect(await shared.contents(pluginConfigId)).toEqual({ doc: { n: 1, list: ['a', 'b'], uuid } })
        // Another plugin config's rows are its own.
        expect(await shared.contents(pluginConfigId + 1000)).toEqual({})
    })

    it('is one table for every Kafka worker thread: each thread reads what the other wrote', async () => {
        const pluginConfigId = nextConfigId++
        const source = `
            export async function setupPlugin({ cache, storage, global }) {
                global.thread = await cache.incr('threads')
                await storage.set('thread-' + global.thread, 'written by thread ' + global.thread)
            }
            export function onEvent() {}
            export async function teardownPlugin({ storage, global }) {
                const both = [await storage.get('thread-1'), await storage.get('thread-2')]
                console.log('reads ' + global.thread + ': ' + both.join(', '))
            }
        `
        const result = await run(source, { era: 'vm2022', count: 20, workers: 2, store: shared, pluginConfigId })
        expect(tagged(result, 'reads').sort()).toEqual([
            '1: written by thread 1, written by thread 2',
            '2: written by thread 1, written by thread 2',
        ])
        expect(Object.keys(await shared.contents(pluginConfigId)).sort()).toEqual(['thread-1', 'thread-2'])
    })

    it('a failing write reaches the plugin as an Error with Postgres’s message; the figures count it', async () => {
        const source = `
            export async function onEvent(event, { storage }) {
                try {
                    await storage.set('event-' + event.uuid, event.event)
                } catch (error) {
                    console.log('caught ' + (error instanceof Error) + ' ' + error.message)
                    throw error
                }
            }
        `
        const result = await run(source, {
            era: 'vm2021',
            count: 5,
            path: 'direct',
            concurrency: 1,
            storageFaults: { failWrite: (write) => write.n === 2 || write.n === 4 },
        })
        expect(tagged(result, 'caught')).toEqual([
            `true ${INJECTED_WRITE_ERROR.message}`,
            `true ${INJECTED_WRITE_ERROR.message}`,
        ])
        expect(result.failed).toBe(2)
        expect(result.errorMessages).toEqual([
            `Error: ${INJECTED_WRITE_ERROR.message}`,
            `Error: ${INJECTED_WRITE_ERROR.message}`,
        ])
        expect(result.storage).toMatchObject({ writes: 3, failedWrites: 2, reads: 0, deletes: 0 })
        expect(result.storage.storedBytes).toBeGreaterThan(0)
        expect(result.storage.peakStoredBytes).toBe(result.storage.storedBytes)
    })

    it('counts reads, writes, deletes, and the peak and final bytes stored', async () => {
        const source = `
            export async function onEvent(event, { storage }) {
                await storage.set('outbox-' + event.uuid, event)
                await storage.get('outbox-' + event.uuid)
                await storage.del('outbox-' + event.uuid)
            }
        `
        const result = await run(source, { era: 'vm2024', count: 30, workers: 2 })
        expect(result.storage).toMatchObject({ reads: 30, writes: 30, deletes: 30, failedWrites: 0, storedBytes: 0 })
        const oneEvent = JSON.stringify([...sampleEvents(1)][0]).length
        expect(result.storage.peakStoredBytes).toBeGreaterThanOrEqual(oneEvent)
    })

    it('keeps its rows in a data dir: a host restarted over it reads what the first one stored', async () => {
        const dataDir = mkdtempSync(join(tmpdir(), 'host-storage-'))
        try {
            const first = new HostStore({ dataDir })
            await run(`export async function onEvent(e, { storage }) { await storage.set('kept', e.uuid) }`, {
                era: 'vm2023',
                count: 1,
                path: 'direct',
                store: first,
            })
            await first.close()
            const second = new HostStore({ dataDir })
            try {
                const result = await run(
                    `export async function onEvent(e, { storage }) { console.log('kept ' + await storage.get('kept')) }`,
                    { era: 'vm2023', count: 1, path: 'direct', store: second }
                )
                expect(tagged(result, 'kept')).toEqual([[...sampleEvents(1)][0]?.uuid])
                expect((await second.figures()).storedBytes).toBeGreaterThan(0)
            } finally {
                await second.close()
            }
        } finally {
            rmSync(dataDir, { recursive: true, force: true })
        }
    })

    it('once closed, refuses a late call (a plugin still running when its host stopped) instead of reopening', async () => {
        const store = new HostStore()
        await store.call('storage.set', [1, 'k', '"v"'])
        await store.close()
        // Before, the call started a fresh in-memory database (a thread that kept Jest's process busy) and read null.
        await expect(store.call('storage.get', [1, 'k'])).rejects.toThrow('Connection terminated: the host has stopped')
        await expect(store.call('cache.incr', [1, 'n'])).rejects.toThrow('Connection terminated: the host has stopped')
    })
    it('opens before the clock: the database is up, and no call was counted or met a fault', async () => {
        const store = new HostStore({ faults: { failStorage: () => true, failCache: () => true } })
        try {
            await store.open()
            expect(await store.figures()).toMatchObject({ reads: 0, injectedStorageFaults: 0, injectedCacheFaults: 0 })
            expect(await store.contents(1)).toEqual({})
            await expect(store.call('storage.get', [1, 'k'])).rejects.toThrow()
            expect(await store.figures()).toMatchObject({ injectedStorageFaults: 1 })
        } finally {
            await store.close()
        }
        await expect(store.open()).rejects.toThrow('Connection terminated: the host has stopped')
    })
    it(
        'left unclosed, does not keep its process alive once the work is done',
        async () => {
            // A plugin VM nobody tears down (a test's, or a host's at exit) leaves its store open.
            const script = `
            const { HostStore } = require(${JSON.stringify(join(__dirname, '..', 'tools', 'host', 'storage'))})
            const store = new HostStore()
            store.call('storage.set', [1, 'k', '"v"']).then(() => store.call('storage.get', [1, 'k']))
                .then((value) => console.log('read ' + value))
        `
            const child = spawn(process.execPath, ['--require', 'tsx/cjs', '-e', script], {
                stdio: ['ignore', 'pipe', 'pipe'],
            })
            let output = ''
            child.stdout.on('data', (chunk: Buffer) => (output += chunk.toString()))
            child.stderr.on('data', (chunk: Buffer) => (output += chunk.toString()))
            const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
            // Before, the store's thread held the process open for good: the bound only keeps a failure from hanging.
            const code = await Promise.race([exited, sleep(UNCLOSED_STORE_EXIT_BOUND_MS).then(() => 'still running')])
            child.kill('SIGKILL')
            expect({ code, output: output.trim() }).toEqual({ code: 0, output: 'read "v"' })
        },
        UNCLOSED_STORE_EXIT_BOUND_MS + 10_000
    )
})

describe('meta.cache', () => {
    it('incr is atomic across threads: 2 threads × 50 calls give 1 to 100, each once', async () => {
        const pluginConfigId = nextConfigId++
        const source = `
            export async function setupPlugin({ cache, global }) { global.thread = await cache.incr('threads') }
            export async function onEvent(event, { cache, global }) {
                console.log('incr ' + global.thread + ' ' + (await cache.incr('counter')))
            }
        `
        const result = await run(source, {
            era: 'vm2021',
            count: 100,
            workers: 2,
            tasksPerWorker: 50,
            store: shared,
            pluginConfigId,
        })
        const lines = tagged(result, 'incr').map((line) => line.split(' ').map(Number))
        const values = lines.map(([, value]) => value).sort((a, b) => (a ?? 0) - (b ?? 0))
        expect(values).toEqual(Array.from({ length: 100 }, (_, n) => n + 1))
        expect(new Set(lines.map(([thread]) => thread))).toEqual(new Set([1, 2]))
    })

    it('has Redis semantics: incr from a missing key, expire 0 deletes, a key past its TTL is gone', async () => {
        const pluginConfigId = nextConfigId++
        // TTLs run on the host's scaled minute: 60 s is 30 ms here.
        const cache = metaCache(shared.call, pluginConfigId, 0.0005)
        expect(await cache.incr('n')).toBe(1)
        expect(await cache.get('n', null)).toBe(1)
        expect(await cache.expire('missing', 10)).toBe(false)
        expect(await cache.expire('n', 0)).toBe(true)
        expect(await cache.get('n', 'gone')).toBe('gone')
        await cache.set('lease', { owner: 'a' }, 60)
        expect(await cache.get('lease', null)).toEqual({ owner: 'a' })
        await new Promise((resolve) => setTimeout(resolve, 60))
        expect(await cache.get('lease', 'expired')).toBe('expired')
        await cache.set('text', 'abc')
        await expect(cache.incr('text')).rejects.toThrow('ERR value is not an integer or out of range')
    })
})

describe('runEveryMinute', () => {
    const COUNTING = `
        export function onEvent() {}
        export async function runEveryMinute({ cache }) { await cache.incr('runs') }
    `

    it('runs once per scaled minute while the host runs, and counts the runs', async () => {
        const pluginConfigId = nextConfigId++
        const result = await run(COUNTING, {
            era: 'vm2021',
            count: 1,
            path: 'direct',
            minuteMs: 40,
            store: shared,
            pluginConfigId,
            drain: { until: () => false, maxMinutes: 15 },
        })
        const runs = result.scheduled?.runs ?? 0
        // 15 scaled minutes of drain: at most one run per minute of the run, and most of them on a loaded machine.
        expect(runs).toBeGreaterThanOrEqual(5)
        expect(runs).toBeLessThanOrEqual(Math.ceil(result.durationMs / 40))
        expect(result.scheduled).toMatchObject({ failures: 0, minuteMs: 40 })
        const counted = (await shared.call('cache.get', [pluginConfigId, 'runs'])) as string
        expect(Number(counted)).toBe(runs)
    })

    it('skips a minute while the previous run is still going (debounced), and counts failures', async () => {
        const source = `
            export function onEvent() {}
            export async function runEveryMinute({ storage, global }) {
                if (global.running) { console.log('overlap') }
                global.running = true
                global.runs = (global.runs ?? 0) + 1
                try {
                    await storage.get('slow')
                    if (global.runs % 2 === 0) { throw new Error('every second run fails') }
                } finally {
                    global.running = false
                }
            }
        `
        // A database of its own, started before the run, whose every storage call takes 100 ms.
        const slow = new HostStore({ faults: { latencyMs: 100 } })
        await slow.contents()
        let result: JobResult
        try {
            result = await run(source, {
                era: 'vm2024',
                count: 1,
                path: 'direct',
                minuteMs: 30,
                store: slow,
                drain: { until: () => false, maxMinutes: 30 },
            })
        } finally {
            await slow.close()
        }
        const figures = result.scheduled
        expect(result.logs).not.toContain('log: overlap')
        expect(figures?.runs).toBeGreaterThanOrEqual(2)
        // Each run takes over three minutes: at least two minutes are skipped for each.
        expect(figures?.debounced).toBeGreaterThanOrEqual(2 * ((figures?.runs ?? 0) - 1))
        expect(figures?.failures).toBe(Math.floor((figures?.runs ?? 0) / 2))
        expect(result.logs).toContain('host: runEveryMinute failed: Error: every second run fails')
    })

    it('Kafka path: each run is a task on one worker thread, and the drain ends once its condition holds', async () => {
        const pluginConfigId = nextConfigId++
        const source = `
            export async function setupPlugin({ cache, global }) { global.thread = await cache.incr('threads') }
            export function onEvent() {}
            export async function runEveryMinute({ cache, global }) {
                console.log('ran ' + global.thread + ' ' + (await cache.incr('runs')))
            }
        `
        const runs = () => shared.call('cache.get', [pluginConfigId, 'runs']) as Promise<string | undefined>
        const result = await run(source, {
            era: 'vm2022feb',
            count: 10,
            workers: 2,
            minuteMs: 30,
            store: shared,
            pluginConfigId,
            drain: { until: async () => Number(await runs()) >= 4, maxMinutes: 200 },
        })
        const lines = tagged(result, 'ran')
        expect(lines.length).toBeGreaterThanOrEqual(4)
        // Far fewer than 200 minutes: the run stopped when the condition held.
        expect(lines.length).toBeLessThan(20)
        expect(lines.map((line) => line.split(' ')[1])).toEqual(
            Array.from({ length: lines.length }, (_, n) => String(n + 1))
        )
        expect(lines.every((line) => ['1', '2'].includes(line.split(' ')[0] ?? ''))).toBe(true)
    })

    it('does not hold a run up when the plugin has no runEveryMinute', async () => {
        const result = await run('export function onEvent() {}', {
            era: 'vm2021',
            count: 1,
            path: 'direct',
            minuteMs: 20,
            drain: { until: () => false, maxMinutes: 1_000 },
        })
        // 1,000 minutes would be 20 s: the first tick found no task and the wait ended.
        expect(result.durationMs).toBeLessThan(10_000)
        expect(result.scheduled).toMatchObject({ runs: 0, failures: 0 })
    })
})

describe('eras', () => {
    it('cdp2025 has no storage, cache or runEveryMinute; every classic era has all three', async () => {
        const source = `
            export function onEvent(event, meta) {
                console.log('meta ' + [typeof meta.storage, typeof meta.cache, typeof meta.metrics].join(' '))
            }
            export function runEveryMinute() { console.log('ran') }
        `
        const result = await run(source, {
            era: 'cdp2025',
            count: 1,
            minuteMs: 20,
            drain: { until: () => false, maxMinutes: 10 },
        })
        expect(tagged(result, 'meta')).toEqual(['undefined undefined undefined'])
        expect(result.logs).not.toContain('log: ran')
        expect(result.scheduled).toBeNull()
        expect(result.storage).toMatchObject({ reads: 0, writes: 0, cacheCalls: 0 })
        for (const era of ERA_NAMES.filter((name) => name !== 'cdp2025')) {
            expect(getEra(era).services).toMatchObject({ storage: true, cache: true })
            // PostHog stopped running scheduled tasks for classic plugins in February 2025.
            expect(getEra(era).services.scheduledTasks).toBe(era !== 'vm2025')
        }
        expect(HOST_SERVICES.cdp2025).toEqual({
            storage: false,
            cache: false,
            scheduledTasks: false,
            pluginMetrics: false,
        })
    })

    it.each(['vm2021', 'vm2022feb'])(
        '%s: meta.metrics records what the plugin declared, over every thread',
        async (era) => {
            const source = `
            export const metrics = { seen: 'sum', biggest: 'max', smallest: 'min', odd: 'avg' }
            export function onEvent(event, { metrics }) {
                const n = parseInt(event.uuid.slice(-2), 16)
                metrics.seen.increment(1)
                metrics.biggest.max(n)
                metrics.smallest.min(n)
            }
        `
            const events = [...sampleEvents(40)].map((event) => parseInt(event.uuid.slice(-2), 16))
            const result = await run(source, { era, count: 40, workers: 2 })
            expect(result.pluginMetrics).toEqual({
                seen: { kind: 'sum', value: 40 },
                biggest: { kind: 'max', value: Math.max(...events) },
                smallest: { kind: 'min', value: Math.min(...events) },
            })
            expect(result.logs).toContain('host: metric "odd" has unknown type "avg"; use one of sum, max, min')
        }
    )

    it('vm2022: meta has no metrics member, as in PostHog from May 2022, and the run shows no plugin metrics', async () => {
        const source = `
            export const metrics = { seen: 'sum' }
            export function onEvent(event, meta) { console.log('metrics ' + ('metrics' in meta)) }
        `
        const result = await run(source, { era: 'vm2022', count: 1, path: 'direct' })
        expect(tagged(result, 'metrics')).toEqual(['false'])
        expect(result.pluginMetrics).toBeNull()
    })
})

describe('export path', () => {
    it('vm2021: a retry job’s fresh VM reaches the same storage and cache as the VM that queued it', async () => {
        const pluginConfigId = nextConfigId++
        const source = `
            export async function exportEvents(events, { cache, storage }) {
                if ((await cache.incr('attempts')) === 1) { throw new RetryError('first attempt fails') }
                await storage.set('exported', events.length)
            }
            export function onEvent() {}
        `
        const result = await run(source, {
            era: 'vm2021',
            count: 20,
            path: 'direct',
            jobTimeScale: 0.001,
            store: shared,
            pluginConfigId,
        })
        expect(result.exportPath?.jobs).toMatchObject({ enqueued: 1, ran: 1, left: 0 })
        expect(await shared.contents(pluginConfigId)).toEqual({ exported: 20 })
    })
})

/**
 * A plugin with an outbox: what the webhook refuses goes to meta.storage under a sequence number from meta.cache,
 * and runEveryMinute sends it again, oldest first, deleting what was accepted.
 */
const OUTBOX_PLUGIN = `
async function post(url, events) {
    try {
        const response = await fetch(url, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(events) })
        return response.status < 300
    } catch (error) {
        return false
    }
}
export async function onEvent(event, { config, storage, cache }) {
    if (!(await post(config.webhookUrl, [event]))) {
        await storage.set('outbox-' + (await cache.incr('outbox-last')), event)
    }
}
export async function runEveryMinute({ config, storage, cache }) {
    const last = Number(await cache.get('outbox-last', 0))
    let sent = Number(await storage.get('outbox-sent', 0))
    while (sent < last) {
        const event = await storage.get('outbox-' + (sent + 1), null)
        if (event && !(await post(config.webhookUrl, [event]))) { return }
        await storage.del('outbox-' + (sent + 1))
        sent++
        await storage.set('outbox-sent', sent)
    }
}
`

describe('npm start --outage', () => {
    it('keeps the host running after the events until runEveryMinute delivered the outbox, and prints the figures', async () => {
        const dir = mkdtempSync(join(tmpdir(), 'host-storage-start-'))
        try {
            writeFileSync(join(dir, 'plugin.json'), JSON.stringify({ name: 'outbox', main: 'index.js' }))
            writeFileSync(join(dir, 'index.js'), OUTBOX_PLUGIN)
            const { stdout, stderr, text } = captureOutput()
            const args = ['--era', 'vm2024', '--path', 'direct', '--outage', '600', '--time-scale', '0.01']
            const rest = ['--count', '30', '--quiet', '--plugin-dir', dir, '--data-dir', join(dir, 'rows')]
            // Ten minutes of outage take 6 s, longer than loading the plugin, so the first events meet it.
            const code = await runStartCli([...args, ...rest], {}, { stdout, stderr })
            expect(text.stderr).not.toContain('error')
            expect(code).toBe(0)
            expect(text.stdout).toMatch(/rows stored\s+30 \(0 duplicates\)/)
            const [, writes, deletes] =
                /storage writes \/ deletes \/ reads\s+(\d+) \/ (\d+) \/ \d+\n/.exec(text.stdout) ?? []
            // At least the first micro-batch came during the outage: each of its events went into the outbox (one
            // write), was sent again by runEveryMinute and deleted, and moved the "sent" mark (another write).
            expect(Number(deletes)).toBeGreaterThanOrEqual(10)
            expect(Number(writes)).toBe(2 * Number(deletes))
            const [, peak, end] = /storage bytes \(peak \/ at end\)\s+(\d+) \/ (\d+)\n/.exec(text.stdout) ?? []
            // What is left is the mark alone: "outbox-sent" and its number.
            expect(Number(end)).toBe('outbox-sent'.length + String(deletes).length)
            expect(Number(peak)).toBeGreaterThan(Number(end))
            expect(text.stdout).toMatch(
                /runEveryMinute \(runs \/ failed \/ debounced\)\s+[1-9]\d* \/ 0 \/ \d+ \(minute: 600 ms\)/
            )
        } finally {
            rmSync(dir, { recursive: true, force: true })
        }
    })
})
