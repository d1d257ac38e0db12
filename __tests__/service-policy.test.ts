/**
 * The service's pure parts and its metrics server: outage waits and budgets, health states, the service flags,
 * JSON log lines (levels, fields, secrets), the lag, and /metrics and /healthz over real loopback HTTP.
 */
import { execFileSync, spawnSync } from 'node:child_process'
import { PassThrough } from 'node:stream'

import { nodeEnv } from '../pipeline/cli-options'
import { cliOutput, jsonLogLine, levelOf, summaryFields } from '../pipeline/cli-output'
import { healthOf, METRIC_PREFIX, UNHEALTHY_AFTER_FAILED_QUERIES } from '../pipeline/metrics'
import {
    HealthState,
    OUTAGE_BACKOFF_CAP_MS,
    OUTAGE_MIN_WAIT_MS,
    OUTAGE_RETRY_AFTER_MAX_MS,
    outageWaitMs,
    waitUnlessAborted,
    withinBudget,
} from '../pipeline/outage'
import { healthChangeLine, logFormatIn, serviceSettings, startService } from '../pipeline/service'
import { parseSyncArgs } from '../sync/cli'
import { syncLagMs, WaitingRows } from '../sync/service'

const NOW = Date.parse('2026-12-01T12:00:00Z')
const ENV = { POSTHOG_API_KEY: 'phx_policy_key_123456', PATTERNS_WEBHOOK_URL: 'https://hooks.example.com/t/s3cr3tpath' }
const SOURCE = ['--posthog-url', 'https://us.posthog.com', '--project-id', '1']

describe('outage waits', () => {
    test('backoff grows from a second and is capped at a minute', () => {
        expect(outageWaitMs(0, null, () => 0.999)).toBe(999)
        expect(outageWaitMs(3, null, () => 0.5)).toBe(4_000)
        expect(outageWaitMs(20, null, () => 0.999_999)).toBe(OUTAGE_BACKOFF_CAP_MS - 1)
        expect(OUTAGE_BACKOFF_CAP_MS).toBe(60_000)
    })

    test('Retry-After is honoured exactly, with a floor against tight loops and a ceiling against hostile servers', () => {
        expect(outageWaitMs(0, 7_000, () => 0)).toBe(7_000)
        expect(outageWaitMs(5, 90_000, () => 0)).toBe(90_000)
        expect(outageWaitMs(0, 0, () => 0)).toBe(OUTAGE_MIN_WAIT_MS)
        expect(outageWaitMs(0, 30 * 86_400_000, () => 0)).toBe(OUTAGE_RETRY_AFTER_MAX_MS)
        expect(outageWaitMs(0, null, () => 0)).toBe(OUTAGE_MIN_WAIT_MS)
    })

    test('an unlimited budget always fits; a finite one ends the outage once spent', () => {
        expect(withinBudget(NOW, NOW + 30 * 86_400_000, 60_000, Infinity)).toBe(true)
        expect(withinBudget(NOW, NOW + 2_000, 1_000, 3_000)).toBe(true)
        expect(withinBudget(NOW, NOW + 2_500, 1_000, 3_000)).toBe(false)
    })

    test('an abort ends a wait at once', async () => {
        const controller = new AbortController()
        const waiting = waitUnlessAborted(60_000, controller.signal)
        controller.abort()
        await expect(waiting).resolves.toBe(false)
        await expect(waitUnlessAborted(1)).resolves.toBe(true)
    })
})

describe('health states', () => {
    test('a side goes down at its first failure and reports how long it was down when it answers again', () => {
        const health = new HealthState()
        expect(health.up).toBe(true)
        expect(health.failed(NOW, 'HTTP 503')).toEqual({ kind: 'down', sinceMs: NOW, reason: 'HTTP 503' })
        expect(health.failed(NOW + 1_000, 'HTTP 503')).toBeNull()
        expect(health.consecutiveFailures).toBe(2)
        expect(health.ok(NOW + 125_000)).toEqual({ kind: 'up', downMs: 125_000 })
        expect(health.ok(NOW + 126_000)).toBeNull()
        expect(healthChangeLine('the webhook', { kind: 'down', sinceMs: NOW, reason: 'HTTP 503' })).toBe(
            'warning: the webhook has been failing since 2026-12-01T12:00:00.000Z (HTTP 503); retrying, the checkpoint holds'
        )
        expect(healthChangeLine('PostHog', { kind: 'up', downMs: 125_000 })).toBe(
            'PostHog answers again, after 2m05s of failures'
        )
    })

    test('/healthz turns unhealthy once PostHog has failed a few queries in a row, not at the first', () => {
        const posthog = new HealthState()
        for (let n = 1; n < UNHEALTHY_AFTER_FAILED_QUERIES; n++) {
            posthog.failed(NOW + n, 'HTTP 500')
        }
        expect(healthOf({ posthog }).healthy).toBe(true)
        posthog.failed(NOW + 10, 'HTTP 500')
        expect(healthOf({ posthog })).toEqual({
            healthy: false,
            detail: `PostHog failed the last ${UNHEALTHY_AFTER_FAILED_QUERIES} queries since 2026-12-01T12:00:00.001Z`,
        })
        posthog.ok(NOW + 20)
        expect(healthOf({ posthog }).healthy).toBe(true)
        expect(healthOf({}).healthy).toBe(true)
    })

    test('the lag runs from the oldest event waiting, to the horizon once caught up with none waiting', () => {
        const page = { caughtUp: true, horizonMs: NOW - 60_000 }
        const behind = { caughtUp: false, horizonMs: NOW - 60_000 }
        // Caught up, every row read delivered: to the horizon, however old the last event is.
        expect(syncLagMs({ committedMs: NOW - 3_600_000, page, oldestWaitingMs: null }, NOW)).toBe(60_000)
        // Rows waiting (an outage, or a batch out): to the oldest of them, caught up or not.
        expect(syncLagMs({ committedMs: NOW - 600_000, page, oldestWaitingMs: NOW - 500_000 }, NOW)).toBe(500_000)
        // The first batch of a run waits out an outage: nothing committed, and the lag is that of its first event.
        const threeDays = 3 * 86_400_000
        expect(syncLagMs({ committedMs: null, page, oldestWaitingMs: NOW - threeDays }, NOW)).toBe(threeDays)
        // Between pages of a backfill: to the checkpoint's event.
        expect(syncLagMs({ committedMs: NOW - 600_000, page: behind, oldestWaitingMs: null }, NOW)).toBe(600_000)
        // Nothing committed, nothing read, no poll yet: unknown, not 0.
        expect(syncLagMs({ committedMs: null, page: null, oldestWaitingMs: null }, NOW)).toBeNull()
        expect(syncLagMs({ committedMs: null, page: behind, oldestWaitingMs: null }, NOW)).toBeNull()
    })

    test('the rows waiting are those read and not yet committed, oldest first, whatever the chunks', () => {
        const key = (n: number) => ({ ms: NOW + n, uuid: `u${n}` })
        const waiting = new WaitingRows()
        expect(waiting.oldest).toBeNull()
        waiting.read([key(1), key(2), key(3)])
        waiting.read([])
        waiting.read([key(4), key(5)])
        expect(waiting.oldest).toEqual(key(1))
        waiting.committed(key(2))
        expect(waiting.oldest).toEqual(key(3))
        waiting.committed(key(3))
        expect(waiting.oldest).toEqual(key(4))
        waiting.read([key(6)])
        // A commit in a later chunk passes every row before it.
        waiting.committed(key(6))
        expect(waiting.oldest).toBeNull()
        waiting.read([key(7), key(8)])
        waiting.read([key(9)])
        waiting.committed(key(8))
        expect(waiting.oldest).toEqual(key(9))
    })
})

describe('service flags', () => {
    test('--follow waits out any outage by default; an explicit --retry-for bounds it; without --follow, 120 s', () => {
        const follow = parseSyncArgs([...SOURCE, '--follow'], ENV, NOW)
        expect(follow?.retryForMs).toBe(Infinity)
        expect(follow?.config.deadlineMs).toBe(Infinity)
        expect(parseSyncArgs([...SOURCE, '--follow', '--retry-for', '30'], ENV, NOW)?.retryForMs).toBe(30_000)
        const once = parseSyncArgs([...SOURCE, '--since', '2026-11-01'], ENV, NOW)
        expect(once?.retryForMs).toBe(120_000)
        expect(once?.config.deadlineMs).toBe(120_000)
    })

    test('--metrics-port, --metrics-host and --log-format are checked, each error naming its flag', () => {
        expect(serviceSettings({})).toEqual({ metricsPort: null, metricsHost: '127.0.0.1', logFormat: 'human' })
        expect(serviceSettings({ 'metrics-port': '9464', 'metrics-host': '0.0.0.0', 'log-format': 'json' })).toEqual({
            metricsPort: 9464,
            metricsHost: '0.0.0.0',
            logFormat: 'json',
        })
        expect(() => serviceSettings({ 'metrics-port': 'http' })).toThrow(
            '--metrics-port: expected a port from 0 to 65535, got "http"'
        )
        expect(() => serviceSettings({ 'metrics-port': '70000' })).toThrow('--metrics-port')
        expect(() => serviceSettings({ 'metrics-host': '::' })).toThrow('--metrics-host needs --metrics-port')
        expect(() => serviceSettings({ 'log-format': 'xml' })).toThrow(
            '--log-format: expected human or json, got "xml"'
        )
        expect(() => parseSyncArgs([...SOURCE, '--follow', '--metrics-port', '-1'], ENV, NOW)).toThrow('--metrics-port')
    })

    test('the log format is found before the flags are checked, so a usage error is JSON too', () => {
        expect(logFormatIn(['--log-format', 'json'])).toBe('json')
        expect(logFormatIn(['--x', '--log-format=json'])).toBe('json')
        expect(logFormatIn(['--log-format', 'human'])).toBe('human')
        expect(logFormatIn([])).toBe('human')
    })
})

describe('JSON log lines', () => {
    test('each has time, level and msg; the level comes from the wording; summary rows become fields', () => {
        expect(levelOf('error: the query failed')).toEqual({ level: 'error', msg: 'the query failed' })
        expect(levelOf('warning: 2 event(s) refused')).toEqual({ level: 'warn', msg: '2 event(s) refused' })
        expect(levelOf('Syncing project 1')).toEqual({ level: 'info', msg: 'Syncing project 1' })
        const line = jsonLogLine('info', 'progress', { read: 5, cursor: null }, (t) => t, NOW)
        expect(JSON.parse(line)).toEqual({
            time: '2026-12-01T12:00:00.000Z',
            level: 'info',
            msg: 'progress',
            read: 5,
            cursor: null,
        })
        expect(summaryFields([['events read', 3], null, ['refused (dead-letter)', 0], ['events/s', 9]])).toEqual({
            events_read: 3,
            refused_dead_letter: 0,
            events_per_second: 9,
        })
    })

    test('no secret reaches a line, in the message, in a field, or as JSON escapes it', () => {
        const stderr = new PassThrough()
        let text = ''
        stderr.on('data', (chunk: Buffer) => (text += chunk.toString()))
        const secret = 'Bearer "quoted\\token"'
        const output = cliOutput({ stdout: new PassThrough(), stderr }, [ENV.PATTERNS_WEBHOOK_URL, secret], 'json')
        output.line(`error: refused by ${ENV.PATTERNS_WEBHOOK_URL}`, { header: secret, url: ENV.PATTERNS_WEBHOOK_URL })
        output.line(`warning: echo ${JSON.stringify(secret)}`)
        const lines = text.trim().split('\n')
        expect(lines).toHaveLength(2)
        expect(JSON.parse(lines[0] as string)).toMatchObject({ level: 'error' })
        expect(JSON.parse(lines[1] as string)).toMatchObject({ level: 'warn' })
        expect(text).not.toContain('s3cr3tpath')
        expect(text).not.toContain('quoted')
    })
})

describe('the metrics server', () => {
    test('serves the feed metrics and the process metrics, and /healthz from PostHog health', async () => {
        const stderr = new PassThrough()
        let text = ''
        stderr.on('data', (chunk: Buffer) => (text += chunk.toString()))
        const output = cliOutput({ stdout: new PassThrough(), stderr }, [])
        const posthog = new HealthState()
        const service = await startService({
            settings: { metricsPort: 0, metricsHost: '127.0.0.1', logFormat: 'human' },
            output,
            env: nodeEnv(),
            posthog,
            lagSeconds: () => 42,
        })
        try {
            const base = /Serving metrics on (http:\/\/[^ ]+)\/metrics/.exec(text)?.[1] as string
            expect(base).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/)
            service.onProgress({
                read: 9,
                delivered: 7,
                filtered: 0,
                deadLettered: 1,
                malformed: 1,
                retries: 0,
                requests: 3,
                inFlight: 0,
            })
            service.onOutcome({ kind: 'retry', reason: 'HTTP 503', throttled: false, retryAfterMs: null })
            const metrics = await (await fetch(`${base}/metrics`)).text()
            for (const sample of [
                `${METRIC_PREFIX}events_delivered_total 7`,
                `${METRIC_PREFIX}events_failed_total{cause="refused"} 1`,
                `${METRIC_PREFIX}events_failed_total{cause="unreadable"} 1`,
                `${METRIC_PREFIX}lag_seconds 42`,
                `${METRIC_PREFIX}webhook_up 0`,
                `${METRIC_PREFIX}posthog_up 1`,
                'process_cpu_user_seconds_total',
                'nodejs_heap_size_used_bytes',
            ]) {
                expect(metrics).toContain(sample)
            }
            expect(text).toContain('the webhook has been failing since')
            expect((await fetch(`${base}/healthz`)).status).toBe(200)
            for (let n = 0; n < UNHEALTHY_AFTER_FAILED_QUERIES; n++) {
                posthog.failed(Date.now(), 'HTTP 500')
            }
            expect((await fetch(`${base}/healthz`)).status).toBe(503)
            expect((await fetch(`${base}/other`)).status).toBe(404)
        } finally {
            await service.close()
        }
    })

    test('an unknown lag is left out of /metrics, not served as 0; a known one is served', async () => {
        const stderr = new PassThrough()
        let text = ''
        stderr.on('data', (chunk: Buffer) => (text += chunk.toString()))
        let lag: number | null = null
        const service = await startService({
            settings: { metricsPort: 0, metricsHost: '127.0.0.1', logFormat: 'human' },
            output: cliOutput({ stdout: new PassThrough(), stderr }, []),
            env: nodeEnv(),
            posthog: new HealthState(),
            lagSeconds: () => lag,
        })
        try {
            const base = /Serving metrics on (http:\/\/[^ ]+)\/metrics/.exec(text)?.[1] as string
            const samples = async () =>
                (await (await fetch(`${base}/metrics`)).text())
                    .split('\n')
                    .filter((line) => line.startsWith(`${METRIC_PREFIX}lag_seconds`))
            expect(await samples()).toEqual([])
            lag = 259_200.5
            expect(await samples()).toEqual([`${METRIC_PREFIX}lag_seconds 259200.5`])
            lag = null
            expect(await samples()).toEqual([])
        } finally {
            await service.close()
        }
    })

    test('a port in use is named with its flag', async () => {
        const output = cliOutput({ stdout: new PassThrough(), stderr: new PassThrough() }, [])
        const settings = { metricsPort: 0, metricsHost: '127.0.0.1', logFormat: 'human' as const }
        const stderr = new PassThrough()
        let text = ''
        stderr.on('data', (chunk: Buffer) => (text += chunk.toString()))
        const first = await startService({
            settings,
            output: cliOutput({ stdout: new PassThrough(), stderr }, []),
            env: nodeEnv(),
        })
        try {
            const port = Number(/:(\d+)\/metrics/.exec(text)?.[1])
            await expect(
                startService({ settings: { ...settings, metricsPort: port }, output, env: nodeEnv() })
            ).rejects.toThrow(`--metrics-port ${port} on --metrics-host 127.0.0.1: cannot listen (the port is in use)`)
        } finally {
            await first.close()
        }
    })
})

describe('shipping as a service', () => {
    const hasSystemd = spawnSync('systemd-analyze', ['--version']).status === 0
    ;(hasSystemd ? test : test.skip)('the systemd unit passes systemd-analyze verify', () => {
        const unit = `${__dirname}/../deploy/systemd/patterns-connector-sync.service`
        const result = spawnSync('systemd-analyze', ['verify', unit], { encoding: 'utf8' })
        expect(result.stderr).toBe('')
        expect(result.status).toBe(0)
    })

    const docker = spawnSync('docker', ['info'], { encoding: 'utf8', timeout: 10_000 })
    const dockerAnswers = docker.status === 0
    if (!dockerAnswers) {
        // Said once per run, so a skipped image build is never mistaken for a passed one.
        process.stderr.write('Skipping the image build test: no Docker daemon answers `docker info` here.\n')
    }
    ;(dockerAnswers ? test : test.skip)(
        'the image builds, runs as a non-root user, and stops on SIGTERM',
        () => {
            const root = `${__dirname}/..`
            execFileSync('docker', ['build', '-t', 'patterns-connector:test', root], { stdio: 'ignore' })
            const inspect = execFileSync(
                'docker',
                [
                    'image',
                    'inspect',
                    '--format',
                    '{{.Config.User}} {{.Config.StopSignal}} {{json .Config.Healthcheck.Test}}',
                    'patterns-connector:test',
                ],
                { encoding: 'utf8' }
            )
            expect(inspect).toMatch(/^node SIGTERM .*healthz/)
            const help = execFileSync('docker', ['run', '--rm', 'patterns-connector:test', 'sync', '--help'], {
                encoding: 'utf8',
            })
            expect(help).toContain('--metrics-port')
        },
        900_000
    )
})
