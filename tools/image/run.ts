/**
 * The image run as users run it, checked against the PostHog stand-in and the receiver on this machine. Containers
 * share the host's network, so the CLI in the container reaches both on 127.0.0.1; the secrets go in as `-e NAME`
 * (from podman's environment), never on a command line.
 */
import { mkdtempSync, rmSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { Receiver, startReceiver } from '../receiver/receiver'
import { StandInEvent } from '../standin/events'
import { PostHogStandIn, startPostHogStandIn } from '../standin/server'
import { podman, podmanOk, runFlags } from './podman'

const API_KEY = 'phx_image_check_k3y'
const TOKEN = 'image_check_t0ken'
const PROJECT = 1
const FIRST_EVENTS = 2_000
const MORE_EVENTS = 500
const HOUR_MS = 3_600_000
/** `podman stop` must end the container within this (the CLI's grace for requests in flight is 10 s). */
const STOP_WITHIN_S = 20
/** podman stop's own wait before it kills: longer than the bound above, so a slow stop shows as a failure. */
const STOP_TIMEOUT_S = 30
const DELIVERY_TIMEOUT_MS = 120_000
const UNHEALTHY_TIMEOUT_MS = 90_000
const POLL_MS = 500
/** The containers' names: the first sync, a replay without metrics, and the sync resumed on the same volume. */
const SYNC_CONTAINER = 'patterns-connector-check-sync'
const REPLAY_CONTAINER = 'patterns-connector-check-replay'
const RESUME_CONTAINER = 'patterns-connector-check-resume'

export interface ImageRun {
    image: string
    log: (line: string) => void
}

interface Env {
    dir: string
    standin: PostHogStandIn
    standinPort: number
    receiver: Receiver
    metricsPort: number
    /** The first run's --since: the same command resumes, and a checkpoint refuses another start. */
    since: string
    volume: string
    containers: string[]
    podmanEnv: NodeJS.ProcessEnv
}

type Check = (run: ImageRun, env: Env) => Promise<string>

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))

async function until(what: string, timeoutMs: number, test: () => boolean | Promise<boolean>): Promise<number> {
    const started = Date.now()
    while (!(await test())) {
        if (Date.now() - started > timeoutMs) {
            throw new Error(`${what}: not within ${timeoutMs / 1000} s`)
        }
        await sleep(POLL_MS)
    }
    return Date.now() - started
}

function freePort(): Promise<number> {
    return new Promise((resolve, reject) => {
        const server = createServer().listen(0, '127.0.0.1', () => {
            const { port } = server.address() as { port: number }
            server.close(() => resolve(port))
        })
        server.on('error', reject)
    })
}

function events(count: number, batch: number): StandInEvent[] {
    const now = Date.now()
    return Array.from({ length: count }, (_, n) => ({
        uuid: `0190c0de-${String(batch).padStart(4, '0')}-7000-8000-${n.toString(16).padStart(12, '0')}`,
        event: '$pageview',
        distinct_id: `user-${n % 7}`,
        timestamp: new Date(now - HOUR_MS + n).toISOString(),
        properties: { $current_url: `https://example.com/${n}`, n },
    }))
}

/** The sync as docs/sync.md runs it as a service, quicker: no lag, a poll a second. */
function syncArgs(env: Env): string[] {
    return [
        'sync',
        '--follow',
        ...['--posthog-url', env.standin.url, '--project-id', String(PROJECT)],
        ...['--since', env.since, '--lag', '0s', '--poll-interval', '1s'],
        ...['--checkpoint', '/data/sync.ckpt', '--dead-letter', '/data/refused.jsonl'],
        ...['--metrics-port', String(env.metricsPort), '--log-format', 'json'],
    ]
}

function startContainer(run: ImageRun, env: Env, name: string, args: string[], extra: string[] = []): void {
    const secrets = ['-e', 'PATTERNS_WEBHOOK_URL', '-e', 'POSTHOG_API_KEY']
    // The checks run the health check themselves (`podman healthcheck run`): no timer, which needs systemd.
    const health = ['--health-interval', 'disable']
    const flags = ['--detach', '--name', name, '--network', 'host', ...runFlags(), ...health, ...secrets, ...extra]
    podmanOk(['run', ...flags, '--volume', `${env.volume}:/data`, run.image, ...args], { env: env.podmanEnv })
    env.containers.push(name)
}

/** `podman healthcheck run`, and what the check printed (podman keeps it in the container's health log). */
function healthcheck(name: string): { healthy: boolean; said: string } {
    const result = podman(['healthcheck', 'run', name])
    const record = podman(['inspect', '--format', '{{json .State.Health.Log}}', name])
    const entries = record.code === 0 ? (JSON.parse(record.stdout || 'null') as Array<{ Output: string }> | null) : null
    const output = entries?.[entries.length - 1]?.Output.trim()
    const verdict = result.code === 0 ? 'healthy' : `${result.stdout}${result.stderr}`.trim() || `exit ${result.code}`
    return { healthy: result.code === 0, said: output ? `${verdict}: ${output}` : verdict }
}

/** The container's last log lines, to show with a failure. */
function lastLogs(name: string): string {
    const result = podman(['logs', '--tail', '5', name])
    return `${result.stdout}${result.stderr}`.trim()
}

/** Stops a container as a deploy does; returns the seconds it took and its exit code. */
function stop(name: string): { seconds: number; code: number } {
    const started = Date.now()
    podmanOk(['stop', '--time', String(STOP_TIMEOUT_S), name], { timeoutMs: (STOP_TIMEOUT_S + 30) * 1000 })
    const seconds = (Date.now() - started) / 1000
    return { seconds, code: Number(podmanOk(['inspect', '--format', '{{.State.ExitCode}}', name])) }
}

function missing(receiver: Receiver, sent: StandInEvent[]): number {
    const counts = receiver.uuidCounts()
    return sent.filter((event) => !counts.has(event.uuid as string)).length
}

const help: Check = async (run) => {
    const result = podman(['run', '--rm', ...runFlags(), run.image, '--help'])
    if (result.code !== 0 || !result.stdout.includes('Usage: patterns-connector')) {
        throw new Error(`exit ${result.code}: ${result.stdout}${result.stderr}`)
    }
    return `exit 0, "${result.stdout.split('\n')[0]}"`
}

const delivers: Check = async (run, env) => {
    const first = events(FIRST_EVENTS, 1)
    await env.standin.insertEvents(first)
    startContainer(run, env, SYNC_CONTAINER, syncArgs(env))
    const ms = await until(
        'every event at the receiver',
        DELIVERY_TIMEOUT_MS,
        () => missing(env.receiver, first) === 0
    ).catch((error: Error) => {
        throw new Error(`${error.message}; its last lines:\n${lastLogs(SYNC_CONTAINER)}`)
    })
    const summary = env.receiver.summary()
    return `${summary.uniqueUuids} of ${FIRST_EVENTS} events at the receiver in ${(ms / 1000).toFixed(1)} s (${summary.requests} POSTs)`
}

const notRoot: Check = async (run) => {
    const uid = podmanOk(['exec', SYNC_CONTAINER, 'id', '-u'])
    const user = podmanOk(['image', 'inspect', '--format', '{{.Config.User}}', run.image])
    if (uid === '0') {
        throw new Error(`the sync runs as uid 0 (USER ${user})`)
    }
    return `the running sync is uid ${uid} (USER ${user})`
}

const healthyThenUnhealthy: Check = async (_run, env) => {
    const name = SYNC_CONTAINER
    const before = healthcheck(name)
    if (!before.healthy) {
        throw new Error(`unhealthy while PostHog answers: ${before.said}`)
    }
    await env.standin.close()
    let after = before
    const ms = await until('unhealthy after PostHog stopped', UNHEALTHY_TIMEOUT_MS, () => {
        after = healthcheck(name)
        return !after.healthy
    })
    env.standin = await startPostHogStandIn({
        apiKey: API_KEY,
        projectId: PROJECT,
        port: env.standinPort,
        dataDir: join(env.dir, 'standin'),
    })
    const back = await until('healthy once PostHog is back', UNHEALTHY_TIMEOUT_MS, () => healthcheck(name).healthy)
    return `healthy ("${before.said}"), unhealthy ${(ms / 1000).toFixed(1)} s after PostHog stopped ("${after.said}"), healthy again ${(back / 1000).toFixed(1)} s after it came back`
}

const healthyWithoutMetrics: Check = async (run, env) => {
    const name = REPLAY_CONTAINER
    // replay reading standard input, kept open: a command that serves no metrics, running.
    startContainer(run, env, name, ['replay', '-'], ['--interactive'])
    const result = healthcheck(name)
    podman(['rm', '--force', '--volumes', '--time', '0', name])
    if (!result.healthy) {
        throw new Error(`replay without --metrics-port is unhealthy: ${result.said}`)
    }
    return `replay - (no --metrics-port): healthy ("${result.said}")`
}

const stopsWith143: Check = async () => {
    const { seconds, code } = stop(SYNC_CONTAINER)
    if (code !== 143 || seconds > STOP_WITHIN_S) {
        throw new Error(`exit ${code} after ${seconds.toFixed(1)} s (want 143 within ${STOP_WITHIN_S} s)`)
    }
    return `exit ${code} in ${seconds.toFixed(1)} s`
}

const resumes: Check = async (run, env) => {
    const all = [...events(FIRST_EVENTS, 1), ...events(MORE_EVENTS, 2)]
    await env.standin.insertEvents(all.slice(FIRST_EVENTS))
    const rowsBefore = env.receiver.summary().rows
    startContainer(run, env, RESUME_CONTAINER, syncArgs(env))
    const ms = await until(
        'every event after the resume',
        DELIVERY_TIMEOUT_MS,
        () => missing(env.receiver, all) === 0
    ).catch((error: Error) => {
        throw new Error(`${error.message}; its last lines:\n${lastLogs(RESUME_CONTAINER)}`)
    })
    await sleep(2_000)
    const { seconds, code } = stop(RESUME_CONTAINER)
    const summary = env.receiver.summary()
    if (code !== 143) {
        throw new Error(`the resumed sync exited ${code} on podman stop`)
    }
    const sentAgain = summary.rows - rowsBefore - MORE_EVENTS
    return `same volume, same command: ${MORE_EVENTS} new events in ${(ms / 1000).toFixed(1)} s, 0 of ${all.length} missing, ${sentAgain} sent again; stopped: exit ${code} in ${seconds.toFixed(1)} s`
}

const CHECKS: Array<[string, Check]> = [
    ['--help works', help],
    ['sync --follow delivers to the receiver', delivers],
    ['not root', notRoot],
    ['health check: healthy, then unhealthy when PostHog stops', healthyThenUnhealthy],
    ['health check fits a command without --metrics-port', healthyWithoutMetrics],
    ['podman stop: exit 143 within 20 s', stopsWith143],
    ['the same volume resumes with nothing lost', resumes],
]

/** Every container a check starts; a run that was killed may have left them behind. */
const CONTAINERS = [SYNC_CONTAINER, REPLAY_CONTAINER, RESUME_CONTAINER]
const VOLUME_LABEL = 'org.patterns-connector.check'

/** What a killed run left: its containers (their names would clash) and its volumes. */
function removeLeftovers(): void {
    for (const name of CONTAINERS) {
        podman(['rm', '--force', '--volumes', '--time', '0', name])
    }
    const volumes = podman(['volume', 'ls', '--quiet', '--filter', `label=${VOLUME_LABEL}`]).stdout.trim()
    for (const volume of volumes ? volumes.split('\n') : []) {
        podman(['volume', 'rm', '--force', volume])
    }
}

async function setUp(): Promise<Env> {
    removeLeftovers()
    const dir = mkdtempSync(join(tmpdir(), 'image-check-'))
    const standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT, dataDir: join(dir, 'standin') })
    const receiver = await startReceiver({ dataDir: join(dir, 'rx'), path: `/api/v1/webhooks/${TOKEN}` })
    const volume = `patterns-connector-check-${process.pid}`
    podmanOk(['volume', 'create', '--label', VOLUME_LABEL, volume])
    return {
        dir,
        standin,
        standinPort: Number(new URL(standin.url).port),
        receiver,
        metricsPort: await freePort(),
        since: new Date(Date.now() - 2 * HOUR_MS).toISOString(),
        volume,
        containers: [],
        podmanEnv: { ...process.env, PATTERNS_WEBHOOK_URL: receiver.url, POSTHOG_API_KEY: API_KEY },
    }
}

async function tearDown(env: Env): Promise<void> {
    for (const name of env.containers) {
        podman(['rm', '--force', '--volumes', '--time', '0', name])
    }
    podman(['volume', 'rm', '--force', env.volume])
    await env.receiver.close()
    await env.standin.close().catch(() => undefined)
    rmSync(env.dir, { recursive: true, force: true })
}

/** Runs every check in order (each builds on the one before), printing one line each; stops at the first failure. */
export async function runChecks(run: ImageRun): Promise<{ passed: number; failed: number }> {
    const env = await setUp()
    let passed = 0
    try {
        for (const [name, check] of CHECKS) {
            const started = Date.now()
            try {
                const detail = await check(run, env)
                run.log(`ok    ${name}: ${detail} [${((Date.now() - started) / 1000).toFixed(1)} s]`)
                passed++
            } catch (error) {
                run.log(`FAIL  ${name}: ${error instanceof Error ? error.message : String(error)}`)
                return { passed, failed: CHECKS.length - passed }
            }
        }
    } finally {
        await tearDown(env)
    }
    return { passed, failed: 0 }
}
