/**
 * `sync --follow` as a service, run as users run it: the CLI installed from `npm pack` (no TypeScript loader),
 * against the real PostHog stand-in and the real receiver, over loopback HTTP. An outage of the webhook is
 * waited out (longer than an explicit --retry-for that stops a second run), /metrics and /healthz answer while
 * it lasts, every log line is JSON, and SIGTERM stops the run within its 10 s grace with a checkpoint that a
 * resume continues from, losing nothing. The metrics stay true when the feed goes quiet after a burst and while
 * the first batch of a run waits out an outage; `replay --metrics-port` is served by the installed CLI too.
 */
import { ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { readSyncCheckpoint } from '../sync/checkpoint'
import { InstalledCli, installPackedCli } from '../tools/bench/installed'
import { Receiver, startReceiver } from '../tools/receiver/receiver'
import { StandInEvent } from '../tools/standin/events'
import { PostHogStandIn, startPostHogStandIn } from '../tools/standin/server'
import { waitFor } from './helpers/io'

const API_KEY = 'phx_Serv1ce_k3y_5e6f7a8b9c'
const PROJECT = 77
const TOKEN = 'svc_T0ken_31415926'
const HOUR = 3_600_000
/** The explicit budget the bounded run is given; the outage lasts well past it. */
const EXPLICIT_RETRY_FOR_S = 3
const OUTAGE_MS = 9_000
/** SIGTERM gives the requests in flight 10 s; the process must be gone by then (plus its start-up slack). */
const STOP_WITHIN_MS = 10_000

jest.setTimeout(240_000)

let cli: InstalledCli
let dir: string
let standin: PostHogStandIn
let receiver: Receiver

beforeAll(async () => {
    cli = installPackedCli()
    dir = mkdtempSync(join(tmpdir(), 'sync-service-'))
    standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT })
    receiver = await startReceiver({
        dataDir: join(dir, 'rx'),
        path: `/api/v1/webhooks/${TOKEN}`,
        seed: 3,
        // A webhook down for maintenance that says when to come back: retried every second while it lasts.
        faults: { retryAfterOn503Seconds: 1 },
    })
}, 180_000)

afterAll(async () => {
    await receiver?.close()
    await standin?.close()
    cli?.remove()
    rmSync(dir, { recursive: true, force: true })
})

function events(count: number, prefix: number): StandInEvent[] {
    const now = Date.now()
    return Array.from({ length: count }, (_, n) => ({
        uuid: `0190a1b2-${String(prefix).padStart(4, '0')}-7000-8000-${n.toString(16).padStart(12, '0')}`,
        event: '$pageview',
        distinct_id: `user-${n % 5}`,
        timestamp: new Date(now - HOUR + n).toISOString(),
        properties: { $current_url: `https://example.com/${n}`, n },
    }))
}

interface Running {
    child: ChildProcess
    exited: Promise<number | null>
    /** Every line printed so far, stdout and stderr. */
    lines: () => string[]
    metricsUrl: () => string | null
}

function run(args: string[], webhookUrl = receiver.url, command = 'sync'): Running {
    const child = spawn(process.execPath, [cli.bin, command, ...args], {
        cwd: dir,
        env: {
            PATH: process.env.PATH ?? '',
            NODE_OPTIONS: '',
            POSTHOG_API_KEY: API_KEY,
            PATTERNS_WEBHOOK_URL: webhookUrl,
        },
        stdio: [command === 'replay' ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    })
    let text = ''
    child.stdout?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    child.stderr?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
    const lines = (): string[] => text.split('\n').filter((line) => line.length > 0)
    const metricsUrl = (): string | null => /Serving metrics on (http:\/\/[^ ]+)\/metrics/.exec(text)?.[1] ?? null
    return { child, exited, lines, metricsUrl }
}

function followArgs(checkpoint: string, extra: string[] = [], since = new Date(Date.now() - 2 * HOUR)): string[] {
    return [
        '--posthog-url',
        standin.url,
        '--project-id',
        String(PROJECT),
        '--since',
        since.toISOString(),
        '--follow',
        '--lag',
        '0s',
        '--poll-interval',
        '500ms',
        '--page-size',
        '40',
        '--batch-events',
        '25',
        '--checkpoint',
        checkpoint,
        '--log-format',
        'json',
        ...extra,
    ]
}

/** A sample's value from Prometheus text, e.g. `patterns_connector_webhook_up`, or null when absent. */
async function metric(base: string, sample: string): Promise<number | null> {
    const text = await (await fetch(`${base}/metrics`)).text()
    for (const line of text.split('\n')) {
        if (line.startsWith(`${sample} `)) {
            return Number(line.slice(sample.length + 1))
        }
    }
    return null
}

async function eventually(check: () => Promise<boolean>, timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!(await check())) {
        if (Date.now() > deadline) {
            throw new Error(`condition not met within ${timeoutMs} ms`)
        }
        await new Promise((resolve) => setTimeout(resolve, 200))
    }
}

/** Every line is one JSON object with time, level and msg, and no line holds a secret in any field. */
function expectJsonLines(lines: string[]): Array<Record<string, unknown>> {
    expect(lines.length).toBeGreaterThanOrEqual(3)
    const parsed = lines.map((line) => JSON.parse(line) as Record<string, unknown>)
    for (const entry of parsed) {
        expect(typeof entry.time).toBe('string')
        expect(Number.isNaN(Date.parse(entry.time as string))).toBe(false)
        expect(['info', 'warn', 'error']).toContain(entry.level)
        expect(typeof entry.msg).toBe('string')
    }
    const all = lines.join('\n')
    for (const secret of [API_KEY, API_KEY.slice(4), TOKEN]) {
        expect(all).not.toContain(secret)
    }
    return parsed
}

async function stopWithSigterm(running: Running): Promise<{ code: number | null; ms: number }> {
    const started = Date.now()
    running.child.kill('SIGTERM')
    const code = await running.exited
    return { code, ms: Date.now() - started }
}

test('the installed CLI waits out a webhook outage longer than an explicit --retry-for, with metrics and JSON logs', async () => {
    const first = events(120, 1)
    await standin.insertEvents(first)
    receiver.setFaults({ p503: 1 })
    const outageStarted = Date.now()
    const service = run(followArgs(join(dir, 'service.ckpt'), ['--metrics-port', '0']))
    const bounded = run(followArgs(join(dir, 'bounded.ckpt'), ['--retry-for', String(EXPLICIT_RETRY_FOR_S)]))
    await waitFor(() => service.metricsUrl() !== null, 30_000)
    const base = service.metricsUrl() as string
    await eventually(async () => (await metric(base, 'patterns_connector_webhook_up')) === 0, 30_000)

    // The explicit budget still bounds a run: it stops, exit 1, while the default one keeps waiting.
    expect(await bounded.exited).toBe(1)
    expect(bounded.lines().join('\n')).toContain('the webhook kept failing for')
    const healthDuring = await fetch(`${base}/healthz`)
    expect(healthDuring.status).toBe(200)
    expect(await metric(base, 'patterns_connector_requests_total{status="503"}')).toBeGreaterThan(0)
    await new Promise((resolve) => setTimeout(resolve, Math.max(0, outageStarted + OUTAGE_MS - Date.now())))
    expect(service.child.exitCode).toBeNull()
    expect(await metric(base, 'patterns_connector_webhook_up')).toBe(0)
    expect(await metric(base, 'patterns_connector_events_delivered_total')).toBe(0)
    const duringOutage = expectJsonLines(service.lines())
    expect(duringOutage.some((e) => e.level === 'warn' && /webhook has been failing since/.test(String(e.msg)))).toBe(
        true
    )

    receiver.setFaults({ p503: 0 })
    await waitFor(() => receiver.uuidCounts().size === first.length, 60_000)
    await eventually(async () => (await metric(base, 'patterns_connector_events_delivered_total')) === 120, 10_000)
    expect(await metric(base, 'patterns_connector_webhook_up')).toBe(1)
    expect(await metric(base, 'patterns_connector_posthog_up')).toBe(1)
    const lag = await metric(base, 'patterns_connector_lag_seconds')
    expect(lag).not.toBeNull()
    expect(lag as number).toBeGreaterThanOrEqual(0)
    expect(lag as number).toBeLessThan(HOUR / 1000)
    expect(await metric(base, 'process_resident_memory_bytes')).toBeGreaterThan(0)

    const stopped = await stopWithSigterm(service)
    expect([0, 143]).toContain(stopped.code)
    expect(stopped.ms).toBeLessThan(STOP_WITHIN_MS)
    const parsed = expectJsonLines(service.lines())
    expect(parsed.some((e) => /answers again/.test(String(e.msg)))).toBe(true)
    expect(parsed.some((e) => e.msg === 'Sync stopped' && e.delivered === 120)).toBe(true)
    const saved = readSyncCheckpoint(join(dir, 'service.ckpt'))
    expect(saved?.cursor.uuid).toBe(first[first.length - 1]?.uuid)
})

test('SIGTERM during an outage stops within 10 s with the checkpoint held, and the same command loses nothing', async () => {
    const checkpoint = join(dir, 'term.ckpt')
    const before = receiver.uuidCounts().size
    const refusedBefore = receiver.summary().byOutcome['503'] ?? 0
    // Stored from now on: this run reads only these.
    const since = new Date(Date.now() - 1_000)
    const batch = events(90, 2)
    await standin.insertEvents(batch)
    // The webhook takes the first 40 rows of this run (two batches: a page of 40 is 25 + 15), then goes down.
    receiver.setFaults({ downAfterRows: receiver.summary().rows + 40 })
    const args = followArgs(checkpoint, ['--concurrency', '1'], since)
    const first = run(args)
    await waitFor(() => (receiver.summary().byOutcome['503'] ?? 0) > refusedBefore, 30_000)
    const stopped = await stopWithSigterm(first)
    expect(stopped.code).toBe(143)
    expect(stopped.ms).toBeLessThan(STOP_WITHIN_MS)
    const held = JSON.parse(readFileSync(checkpoint, 'utf8')) as { cursor: { uuid: string | null } }
    // The first 40 were taken, then the outage: the checkpoint is on event 40 of 90, and holds there.
    expect(held.cursor.uuid).toBe(batch[39]?.uuid)
    expectJsonLines(first.lines())

    receiver.setFaults({ downAfterRows: 0 })
    const second = run(args)
    await waitFor(() => receiver.uuidCounts().size === before + batch.length, 60_000)
    expect((await stopWithSigterm(second)).code).toBe(143)
    expectJsonLines(second.lines())
    for (const event of [...batch]) {
        expect(receiver.uuidCounts().get(event.uuid as string) ?? 0).toBeGreaterThanOrEqual(1)
    }
})

test('an outage of PostHog is waited out too: /healthz turns 503 and posthog_up 0, then back, and every event arrives', async () => {
    const since = new Date(Date.now() - 1_000)
    const before = receiver.uuidCounts().size
    const batch = events(30, 3)
    await standin.insertEvents(batch)
    standin.setFaults({ rate500: 1 })
    const service = run(followArgs(join(dir, 'posthog-down.ckpt'), ['--metrics-port', '0'], since))
    await waitFor(() => service.metricsUrl() !== null, 30_000)
    const base = service.metricsUrl() as string
    // Three failed queries in a row (retries with backoff) make the process unhealthy, not gone.
    await eventually(async () => (await fetch(`${base}/healthz`)).status === 503, 30_000)
    expect(await metric(base, 'patterns_connector_posthog_up')).toBe(0)
    expect(service.child.exitCode).toBeNull()

    standin.setFaults({})
    await waitFor(() => receiver.uuidCounts().size === before + batch.length, 90_000)
    expect((await fetch(`${base}/healthz`)).status).toBe(200)
    expect(await metric(base, 'patterns_connector_posthog_up')).toBe(1)
    expect((await stopWithSigterm(service)).code).toBe(143)
    const parsed = expectJsonLines(service.lines())
    expect(parsed.some((e) => e.level === 'warn' && /PostHog has been failing since/.test(String(e.msg)))).toBe(true)
    expect(parsed.some((e) => /PostHog answers again/.test(String(e.msg)))).toBe(true)
})

/** `count` events named `name`, stored (created_at) `ageMs` ago, a millisecond apart. */
function storedEvents(name: string, count: number, ageMs: number, prefix: number): StandInEvent[] {
    const at = Date.now() - ageMs
    return Array.from({ length: count }, (_, n) => {
        const time = new Date(at + n).toISOString()
        return {
            uuid: `0190a1b2-${String(prefix).padStart(4, '0')}-7000-8000-${n.toString(16).padStart(12, '0')}`,
            event: name,
            distinct_id: `user-${n % 7}`,
            timestamp: time,
            created_at: time,
            properties: { n },
        }
    })
}

/** A follow run of one event name only, so the other tests' events stay out of it, with metrics and JSON logs. */
function isolatedArgs(name: string, since: Date, checkpoint: string): string[] {
    return [
        '--posthog-url',
        standin.url,
        '--project-id',
        String(PROJECT),
        '--since',
        since.toISOString(),
        '--follow',
        '--lag',
        '2s',
        '--poll-interval',
        '1s',
        '--allowed-events',
        name,
        '--checkpoint',
        checkpoint,
        '--metrics-port',
        '0',
        '--log-format',
        'json',
    ]
}

/** The progress lines written so far, as JSON objects. */
function progressLines(running: Running): Array<Record<string, unknown>> {
    return expectJsonLines(running.lines()).filter((entry) => entry.msg === 'progress')
}

async function ownReceiver(name: string, faults: Record<string, number> = {}): Promise<Receiver> {
    return startReceiver({ dataDir: join(dir, name), path: `/api/v1/webhooks/${TOKEN}`, seed: 5, faults })
}

test('after a burst, then quiet: delivered_total is what the receiver holds, and the lag falls to the horizon', async () => {
    const rx = await ownReceiver('rx-burst')
    try {
        const burst = storedEvents('burst_then_quiet', 3_000, HOUR, 4)
        await standin.insertEvents(burst)
        const args = isolatedArgs('burst_then_quiet', new Date(Date.now() - 2 * HOUR), join(dir, 'burst.ckpt'))
        const service = run(args, rx.url)
        await waitFor(() => service.metricsUrl() !== null, 30_000)
        const base = service.metricsUrl() as string
        await waitFor(() => rx.summary().rows === burst.length, 120_000)

        // Nothing more comes: the counts and the lag must still reach the truth, not stay where the burst left them.
        await eventually(
            async () => (await metric(base, 'patterns_connector_events_delivered_total')) === rx.summary().rows,
            60_000
        )
        await eventually(async () => ((await metric(base, 'patterns_connector_lag_seconds')) ?? HOUR) < 600, 60_000)
        await eventually(async () => {
            const last = progressLines(service).pop()
            return last?.delivered === burst.length && last.in_flight === 0 && last.caught_up === true
        }, 60_000)
        const lastProgress = progressLines(service).pop()
        expect(lastProgress?.lag_seconds as number).toBeLessThan(600)
        expect(rx.summary().rows).toBe(burst.length)
        expect(rx.summary().uniqueUuids).toBe(burst.length)
        expect((await stopWithSigterm(service)).code).toBe(143)
    } finally {
        await rx.close()
    }
})

test('while the first batch waits out an outage, the lag counts from the oldest waiting event, and progress says since when', async () => {
    const threeDays = 3 * 86_400_000
    const rx = await ownReceiver('rx-first-outage', { p503: 1, retryAfterOn503Seconds: 1 })
    try {
        const waiting = storedEvents('first_batch_outage', 50, threeDays, 5)
        await standin.insertEvents(waiting)
        const args = isolatedArgs('first_batch_outage', new Date(Date.now() - 4 * 86_400_000), join(dir, 'first.ckpt'))
        const service = run(args, rx.url)
        await waitFor(() => service.metricsUrl() !== null, 30_000)
        const base = service.metricsUrl() as string
        await waitFor(() => (rx.summary().byOutcome['503'] ?? 0) >= 4, 60_000)
        expect(await metric(base, 'patterns_connector_webhook_up')).toBe(0)
        expect(await metric(base, 'patterns_connector_events_delivered_total')).toBe(0)

        // Three days behind, from the oldest event waiting: not 0, and not from --since (four days).
        const lag = (await metric(base, 'patterns_connector_lag_seconds')) as number
        expect(lag).toBeGreaterThanOrEqual(threeDays / 1000)
        expect(lag).toBeLessThan(threeDays / 1000 + HOUR / 1000)
        await eventually(async () => {
            const last = progressLines(service).pop()
            return typeof last?.webhook_failing_since === 'string' && (last.lag_seconds as number) >= threeDays / 1000
        }, 60_000)
        const failing = progressLines(service).pop()
        expect(Date.parse(failing?.webhook_failing_since as string)).toBeLessThanOrEqual(Date.now())
        expect(failing?.delivered).toBe(0)

        rx.setFaults({ p503: 0 })
        await waitFor(() => rx.summary().rows === waiting.length, 60_000)
        await eventually(async () => ((await metric(base, 'patterns_connector_lag_seconds')) ?? HOUR) < 600, 60_000)
        await eventually(async () => (await metric(base, 'patterns_connector_events_delivered_total')) === 50, 60_000)
        expect((await stopWithSigterm(service)).code).toBe(143)
    } finally {
        await rx.close()
    }
})

test('the installed replay serves /metrics too', async () => {
    const rx = await ownReceiver('rx-replay')
    try {
        const replay = run(['-', '--metrics-port', '0', '--log-format', 'json'], rx.url, 'replay')
        await waitFor(() => replay.metricsUrl() !== null, 30_000)
        const base = replay.metricsUrl() as string
        expect(await metric(base, 'patterns_connector_events_delivered_total')).toBe(0)
        const lines = storedEvents('replayed', 3, HOUR, 6).map((event) => JSON.stringify(event))
        replay.child.stdin?.end(lines.join('\n') + '\n')
        expect(await replay.exited).toBe(0)
        expect(rx.summary().rows).toBe(3)
    } finally {
        await rx.close()
    }
})
