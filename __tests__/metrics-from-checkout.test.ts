/**
 * `--metrics-port` from a checkout, as the README runs the CLI there (`npm exec --no -- patterns-connector`): the
 * entry script runs the TypeScript sources through tsx, where the metrics module is loaded another way than in
 * the compiled package (sync-service.test.ts runs that one). Both commands serve /metrics and /healthz.
 */
import { ChildProcess, spawn } from 'node:child_process'
import { join } from 'node:path'

import { waitFor } from './helpers/io'
import { perTestServers } from './helpers/server'

const BIN = join(__dirname, '..', 'bin', 'patterns-connector.js')
const ROOT = join(__dirname, '..')

jest.setTimeout(120_000)

const servers = perTestServers()

interface Started {
    child: ChildProcess
    exited: Promise<number | null>
    text: () => string
}

function start(args: string[], env: Record<string, string>): Started {
    const child = spawn(process.execPath, [BIN, ...args], {
        cwd: ROOT,
        env: { PATH: process.env.PATH ?? '', NODE_OPTIONS: '', ...env },
        stdio: ['pipe', 'pipe', 'pipe'],
    })
    let text = ''
    child.stdout?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    child.stderr?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
    return { child, exited, text: () => text }
}

/** Waits for the line that says where the metrics are served (or for the process to end), and returns the base. */
async function metricsBase(started: Started): Promise<string> {
    let ended = false
    void started.exited.then(() => (ended = true))
    await waitFor(() => ended || /Serving metrics on http:\/\/\S+\/metrics/.test(started.text()), 60_000)
    const base = /Serving metrics on (http:\/\/\S+)\/metrics/.exec(started.text())?.[1]
    if (!base) {
        throw new Error(`no metrics server; the command printed:\n${started.text()}`)
    }
    return base
}

test('replay --metrics-port serves /metrics and /healthz from the sources', async () => {
    const webhook = await servers.serve([])
    const replay = start(['replay', '-', '--metrics-port', '0'], { PATTERNS_WEBHOOK_URL: webhook.url })
    const base = await metricsBase(replay)
    const metrics = await (await fetch(`${base}/metrics`)).text()
    expect(metrics).toContain('patterns_connector_events_delivered_total 0')
    expect(metrics).toContain('process_resident_memory_bytes')
    expect((await fetch(`${base}/healthz`)).status).toBe(200)
    replay.child.stdin?.end('{"event":"a","uuid":"0190a1b2-0000-7000-8000-000000000001","distinct_id":"d"}\n')
    expect(await replay.exited).toBe(0)
    expect(webhook.accepted).toHaveLength(1)
})

test('sync --metrics-port serves /metrics and /healthz from the sources', async () => {
    // PostHog that never answers: the run waits on its first query while the metrics are served.
    const posthog = await servers.start(() => 'hang')
    const webhook = await servers.serve([])
    const origin = new URL(posthog.url).origin
    const args = ['sync', '--posthog-url', origin, '--project-id', '1', '--follow', '--metrics-port', '0']
    const sync = start(args, { PATTERNS_WEBHOOK_URL: webhook.url, POSTHOG_API_KEY: 'phx_checkout_key_1234' })
    const base = await metricsBase(sync)
    const metrics = await (await fetch(`${base}/metrics`)).text()
    expect(metrics).toContain('patterns_connector_posthog_up 1')
    expect(metrics).toContain('patterns_connector_events_delivered_total 0')
    expect((await fetch(`${base}/healthz`)).status).toBe(200)
    sync.child.kill('SIGTERM')
    expect(await sync.exited).toBe(143)
})
