/**
 * The host emulator itself: PostHog's transforms, the vm2 sandbox of the 2021 host, the Kafka path's worker
 * threads, and setupPlugin failures. Small plugins written inline, real vm2, real worker threads, real HTTP.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { getEra, IMPORTS_2021, setupRetryWaits } from '../tools/host/eras'
import { createPluginVm, guard, PluginLoadError, PROJECT_PLUGIN_DIR, transpileForEra } from '../tools/host/loader'
import { JobResult, loadForEra, runJob } from '../tools/host/run'
import { sampleEvents } from '../tools/host/sample-events'
import { startReceiver } from '../tools/receiver/receiver'
import { startServer } from './helpers/server'

const vm2021 = getEra('vm2021')
const noConsole = {
    log: () => undefined,
    info: () => undefined,
    warn: () => undefined,
    error: () => undefined,
    debug: () => undefined,
}

/** Loads a source in a fresh 2021 sandbox and returns its methods and the lines it logged. */
function load2021(source: string, options: { now?: () => number; onGuard?: () => void } = {}) {
    const logs: string[] = []
    const record = (...args: unknown[]): void => void logs.push(args.map(String).join(' '))
    const vm = createPluginVm(transpileForEra(source, vm2021), vm2021, {
        console: { ...noConsole, log: record },
        hostMeta: { config: Object.freeze({ webhookUrl: 'https://example.com/hook' }) },
        ...options,
    })
    return { ...vm, logs }
}

function count(text: string, needle: string): number {
    return text.split(needle).length - 1
}

let dataDir: string
beforeEach(() => {
    dataDir = mkdtempSync(join(tmpdir(), 'host-'))
})
afterEach(() => {
    rmSync(dataDir, { recursive: true, force: true })
})

describe('transforms', () => {
    it('guards every await and every .then, even on a plain object', () => {
        const code = transpileForEra(
            'export async function f(p) { await p; const x = await g(); p.then(h); return ({}).then }\nasync function g() {}\nfunction h() {}\n',
            vm2021
        )
        expect(count(code, 'await __asyncGuard(')).toBe(2)
        expect(code).toContain('__asyncGuard(p).then(h)')
        expect(code).toContain('__asyncGuard({}).then')
        expect(count(code, '__asyncGuard(__asyncGuard(')).toBe(0)
    })

    it('runs each await and .then through the host guard, and the method itself too', async () => {
        let guards = 0
        const { methods } = load2021(
            'export async function onEvent() { await 1; await Promise.resolve(2); Promise.resolve(3).then(() => 4) }',
            { onGuard: () => guards++ }
        )
        await methods.onEvent?.({})
        // Two awaits, one .then, and the 30 s guard on the whole method.
        expect(guards).toBe(4)
    })

    it('guards while, for and do-while loops, but not for-of or for-in', () => {
        const code = transpileForEra(
            [
                'export function f(xs) {',
                '  let i = 0',
                '  while (i < 1) { i++ }',
                '  for (let j = 0; j < 1; j++) {}',
                '  do { i++ } while (i < 3)',
                '  for (const x of xs) {}',
                '  for (const k in xs) {}',
                '}',
            ].join('\n'),
            vm2021
        )
        expect(count(code, 'Script execution timed out after looping for 30 seconds')).toBe(3)
    })

    it('stops a while loop after 30 s over its whole life, and lets a for-of run on', async () => {
        let clock = 0
        const { methods } = load2021(
            [
                'export async function onEvent(event) {',
                '  if (event.kind === "of") { for (const x of [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) { Date.now() } return "done" }',
                '  let n = 0',
                '  while (n < 100) { n++; Date.now() }',
                '  return n',
                '}',
            ].join('\n'),
            { now: () => (clock += 5_000) }
        )
        await expect(methods.onEvent?.({ kind: 'of' })).resolves.toBe('done')
        await expect(methods.onEvent?.({ kind: 'while' })).rejects.toThrow(
            /^Script execution timed out after looping for 30 seconds on line 4:/
        )
    })

    it('gives the module itself for a default or namespace import, without .default unwrapping', () => {
        const { logs } = load2021(
            "import f from 'node-fetch'\nimport * as c from 'crypto'\nconsole.log(f === fetch, typeof c.createHmac)\nexport function onEvent() {}"
        )
        expect(logs).toEqual(['true function'])
    })

    it('accepts exactly the 16 modules of the 2021 whitelist', () => {
        expect(Object.keys(IMPORTS_2021)).toHaveLength(16)
        const source = Object.keys(IMPORTS_2021)
            .map((name, n) => `import m${n} from '${name}'`)
            .join('\n')
        expect(() => transpileForEra(`${source}\nexport function onEvent() {}`, vm2021)).not.toThrow()
    })

    it.each([
        ['vm2021', "import x from './helper'", './helper'],
        ['vm2021', "import { x } from 'lodash'", 'lodash'],
        ['vm2021', "const x = require('fs')", 'fs'],
        ['vm2024', "import x from 'zlib'", 'zlib'],
    ])('%s refuses %s with PostHog’s text', (era, line, name) => {
        // The import is used: TypeScript's preset drops an import nothing uses before the host sees it.
        expect(() => transpileForEra(`${line}\nexport function onEvent() { return x }`, getEra(era))).toThrow(
            new PluginLoadError(`Cannot import '${name}'! This package is not provided by PostHog in plugins.`)
        )
    })
})

describe('the 2021 sandbox', () => {
    it('has exactly the globals PostHog measured, and none of the absent ones', () => {
        const present = ['Buffer', 'URL', 'fetch', 'RetryError', 'posthog', 'google', 'global', 'VMError', 'console']
        const absent = [
            'setTimeout',
            'setImmediate',
            'queueMicrotask',
            'AbortController',
            'TextEncoder',
            'URLSearchParams',
            'Headers',
            'structuredClone',
            'process',
            'require',
            'performance',
        ]
        const { logs } = load2021(
            `console.log(JSON.stringify(${JSON.stringify([...present, ...absent])}.map((n) => typeof globalThis[n])))\nexport function onEvent() {}`
        )
        const types = JSON.parse(logs[0] ?? '[]') as string[]
        expect(types.slice(0, present.length).filter((t) => t === 'undefined')).toEqual([])
        expect(types.slice(present.length)).toEqual(absent.map(() => 'undefined'))
    })

    it('hands over Buffer as vm2’s proxy: Buffer.from(x) is not a Uint8Array', () => {
        const { logs } = load2021("console.log(Buffer.from('x') instanceof Uint8Array)\nexport function onEvent() {}")
        expect(logs).toEqual(['false'])
    })

    it('ignores writes to meta.config and to fetch', async () => {
        const { methods, logs } = load2021(
            [
                'export function onEvent(event, meta) {',
                '  meta.config.webhookUrl = "https://attacker.example"',
                '  fetch.extra = 1',
                '  console.log(meta.config.webhookUrl, typeof fetch.extra)',
                '}',
            ].join('\n')
        )
        await methods.onEvent?.({})
        expect(logs).toEqual(['https://example.com/hook undefined'])
    })

    it('gives the 0.12.9 RetryError, whose name is "Error"; later eras name it RetryError', () => {
        const probe =
            "const e = new RetryError('x')\nconsole.log(e.name, e instanceof Error, String(e.stack).split(':')[0])\nexport function onEvent() {}"
        expect(load2021(probe).logs).toEqual(['Error true Error'])
        const logs: string[] = []
        loadForEra({ era: 'vm2024', pluginDir: PROJECT_PLUGIN_DIR, source: probe }, logs)
        expect(logs).toEqual(['log: RetryError true RetryError'])
    })

    it('rejects a guarded promise that waits too long with the host’s TimeoutError', async () => {
        await expect(guard(new Promise(() => undefined), 50)).rejects.toMatchObject({
            name: 'TimeoutError',
            message: 'Script execution timed out after promise waited for 0.05 seconds',
        })
    })

    it.each([
        ['exports', 'export function onEvent() { return 1 }'],
        ['exports.default', 'export default { onEvent() { return 1 } }'],
        ['module.exports', 'module.exports = { onEvent() { return 1 } }'],
    ])('finds onEvent on %s, and passes meta last', async (_where, source) => {
        const { methods } = load2021(source)
        await expect(methods.onEvent?.({})).resolves.toBe(1)
    })

    it('gives node-fetch 2.6.1, which enforces the timeout a plugin passes; its errors pass instanceof Error', async () => {
        const server = await startServer(() => 'hang')
        try {
            const { methods } = load2021(
                [
                    'export async function onEvent(event, meta) {',
                    '  const started = Date.now()',
                    '  try { await fetch(event.url, { method: "POST", body: "[]", timeout: 200 }) } catch (e) {',
                    '    return [e instanceof Error, e.name, e.type, Date.now() - started]',
                    '  }',
                    '}',
                ].join('\n')
            )
            const [isError, name, type, ms] = (await methods.onEvent?.({ url: server.url })) as [
                boolean,
                string,
                string,
                number,
            ]
            expect([isError, name, type]).toEqual([true, 'FetchError', 'request-timeout'])
            expect(ms).toBeGreaterThanOrEqual(190)
            expect(ms).toBeLessThan(2_000)
        } finally {
            await server.close()
        }
    })

    it('fails to load a plugin that calls setTimeout at top level', () => {
        expect(() => load2021('setTimeout(() => undefined, 10)\nexport function onEvent() {}')).toThrow(
            'ReferenceError: setTimeout is not defined'
        )
    })
})

/** A plugin that counts how many separate bursts its calls arrive in: a burst ends once the microtasks drain. */
const BURSTS = `
export function setupPlugin({ global }) { global.bursts = 0; global.calls = 0; global.open = false; global.id = Math.random().toString(36).slice(2) ; console.log('setup', global.id) }
export async function onEvent(event, { global }) {
    global.calls++
    if (!global.open) {
        global.open = true
        global.bursts++
        let p = Promise.resolve()
        for (let i = 0; i < 200; i++) { p = p.then(() => undefined) }
        p.then(() => { global.open = false })
    }
    console.log('event', global.id, global.bursts, event.properties.$plugins_deferred ? 'processed' : 'raw')
}
`

async function runSource(source: string, options: Partial<Parameters<typeof runJob>[0]> & { count: number }) {
    const rx = await startReceiver({ dataDir, path: '/hook' })
    try {
        return await runJob({
            era: 'vm2021',
            webhookUrl: rx.url,
            events: sampleEvents(options.count),
            pluginDir: PROJECT_PLUGIN_DIR,
            source,
            ...options,
        })
    } finally {
        await rx.close()
    }
}

function eventLines(result: JobResult): string[][] {
    return result.logs.filter((l) => l.startsWith('log: event ')).map((l) => l.split(' ').slice(2))
}

describe('the Kafka path', () => {
    it('spreads the calls of a micro-batch over several macrotasks, where the direct path starts them in one', async () => {
        const kafka = await runSource(BURSTS, { count: 10, path: 'kafka', workers: 1, tasksPerWorker: 10 })
        const direct = await runSource(BURSTS, { count: 10, path: 'direct' })
        const burstsOf = (result: JobResult) => Number(eventLines(result).at(-1)?.[1])
        expect(eventLines(kafka)).toHaveLength(10)
        expect(eventLines(direct)).toHaveLength(10)
        expect(burstsOf(direct)).toBe(1)
        expect(burstsOf(kafka)).toBeGreaterThanOrEqual(3)
    })

    it('runs processEvent on a worker before each onEvent', async () => {
        const kafka = await runSource(BURSTS, { count: 5, path: 'kafka', workers: 1 })
        const direct = await runSource(BURSTS, { count: 5, path: 'direct' })
        expect(eventLines(kafka).map((l) => l[2])).toEqual(Array(5).fill('processed'))
        expect(eventLines(direct).map((l) => l[2])).toEqual(Array(5).fill('raw'))
    })

    it('gives each worker thread its own VM and its own meta.global', async () => {
        const result = await runSource(BURSTS, { count: 40, path: 'kafka', workers: 2, tasksPerWorker: 10 })
        const setups = result.logs.filter((l) => l.startsWith('log: setup ')).map((l) => l.split(' ')[2])
        expect(new Set(setups).size).toBe(2)
        expect(new Set(eventLines(result).map((l) => l[0]))).toEqual(new Set(setups))
    })

    it('reports what the plugin threw on a worker, classified by the era’s RetryError class', async () => {
        const source =
            "export async function onEvent(event) { throw event.event === '$pageview' ? new RetryError('again') : new Error('no') }"
        const result = await runSource(source, { count: 20, path: 'kafka', workers: 1 })
        expect(result.failed).toBe(20)
        const labels = new Set(result.errorMessages.map((m) => m.split(':')[0]))
        expect(labels).toEqual(new Set(['RetryError', 'Error']))
    })
})

describe('setupPlugin failures', () => {
    const FAILING =
        "export function setupPlugin() { throw new Error('bad config: no webhook') }\nexport function onEvent() { console.log('called') }"

    it.each(['kafka', 'direct'] as const)(
        'vm2021 %s path: every event is skipped without a record, setup retried 10 times, then the plugin disabled',
        async (path) => {
            const result = await runSource(FAILING, {
                count: 25,
                path,
                workers: 1,
                setupRetryScale: 0.00001,
                settleSetup: true,
            })
            expect([result.skipped, result.resolved, result.failed]).toEqual([25, 0, 0])
            expect(result.errorMessages).toEqual([])
            expect(result.logs.filter((l) => l === 'log: called')).toEqual([])
            expect(result.setup).toEqual([
                { state: 'disabled', attempts: 10, lastError: 'Error: bad config: no webhook', nextWaitMs: null },
            ])
        }
    )

    it('waits 3 s, 6 s, 12 s, … between attempts, about 25 minutes in all', () => {
        const waits = setupRetryWaits(vm2021.setup)
        expect(waits.slice(0, 3)).toEqual([3_000, 6_000, 12_000])
        expect(waits).toHaveLength(9)
        expect(waits.reduce((a, b) => a + b, 0) / 60_000).toBeCloseTo(25.55, 2)
    })

    it('skips the events that arrive while setup is retrying, and delivers those after it succeeds', async () => {
        const source = `
            export async function setupPlugin({ cache }) {
                if ((await cache.incr('attempts')) < 3) { throw new Error('not yet') }
            }
            export function onEvent() {}
        `
        async function* slowEvents() {
            for (const event of sampleEvents(30)) {
                await new Promise((resolve) => setTimeout(resolve, 10))
                yield event
            }
        }
        const rx = await startReceiver({ dataDir, path: '/hook' })
        const result = await runJob({
            era: 'vm2021',
            path: 'direct',
            webhookUrl: rx.url,
            events: slowEvents(),
            pluginDir: PROJECT_PLUGIN_DIR,
            source,
            concurrency: 1,
            setupRetryScale: 0.01,
        })
        await rx.close()
        expect(result.skipped).toBeGreaterThan(0)
        expect(result.resolved).toBeGreaterThan(0)
        expect(result.skipped + result.resolved).toBe(30)
        expect(result.setup[0]).toMatchObject({ state: 'ready', attempts: 3 })
    })

    it('vm2024: an error other than RetryError in setup disables the plugin at once', async () => {
        const result = await runSource(FAILING, { era: 'vm2024', count: 5, path: 'direct', settleSetup: true })
        expect(result.skipped).toBe(5)
        expect(result.setup[0]).toMatchObject({ state: 'disabled', attempts: 1 })
    })
})
