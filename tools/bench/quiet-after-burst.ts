/**
 * `npx tsx tools/bench/quiet-after-burst.ts [--events N] [--watch-seconds S]`: the metrics of `sync --follow` once
 * the project goes quiet after a burst, as users run it: the CLI installed from `npm pack`, with its defaults
 * (`--lag 60s`, `--poll-interval 15s`), `--metrics-port` and `--log-format json`, against the PostHog stand-in
 * holding N events (default 3,000) stored an hour ago, and the receiver.
 *
 * It prints the delivered total against the rows the receiver holds, and, every 2 s for S seconds (default 30)
 * after the receiver has every event, `patterns_connector_lag_seconds` and the latest progress line. With
 * nothing waiting the lag should fall to the horizon (about --lag plus the time since the last poll) within two
 * polls, however old the events are.
 */
import { ChildProcess, spawn } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'

import { startReceiver } from '../receiver/receiver'
import { StandInEvent } from '../standin/events'
import { startPostHogStandIn } from '../standin/server'
import { installPackedCli } from './installed'

const API_KEY = 'phx_quiet_after_burst_key'
const PROJECT_ID = 1
const HOUR_MS = 3_600_000
const SAMPLE_EVERY_MS = 2_000
/** The CLI's defaults, for the verdict line (sync/source.ts). */
const DEFAULT_LAG_S = 60
const DEFAULT_POLL_S = 15

function burst(count: number): StandInEvent[] {
    const at = Date.now() - HOUR_MS
    return Array.from({ length: count }, (_, n) => {
        const time = new Date(at + n).toISOString()
        return {
            event: '$pageview',
            distinct_id: `user-${n % 50}`,
            timestamp: time,
            created_at: time,
            properties: { n },
        }
    })
}

/** A sample's value from Prometheus text, or null when it has none. */
async function sample(base: string, name: string): Promise<number | null> {
    const text = await (await fetch(`${base}/metrics`)).text()
    const line = text.split('\n').find((l) => l.startsWith(`${name} `))
    return line === undefined ? null : Number(line.slice(name.length + 1))
}

function lastProgress(text: string): Record<string, unknown> | null {
    const lines = text.split('\n').filter((line) => line.includes('"msg":"progress"'))
    const last = lines[lines.length - 1]
    return last ? (JSON.parse(last) as Record<string, unknown>) : null
}

async function until(condition: () => boolean, timeoutMs: number, what: string): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!condition()) {
        if (Date.now() > deadline) {
            throw new Error(`${what}: not within ${timeoutMs / 1000} s`)
        }
        await new Promise((resolve) => setTimeout(resolve, 100))
    }
}

function spawnSync(bin: string, args: string[], webhookUrl: string): { child: ChildProcess; text: () => string } {
    const child = spawn(process.execPath, [bin, 'sync', ...args], {
        env: { PATH: process.env.PATH ?? '', POSTHOG_API_KEY: API_KEY, PATTERNS_WEBHOOK_URL: webhookUrl },
        stdio: ['ignore', 'pipe', 'pipe'],
    })
    let text = ''
    child.stdout?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    child.stderr?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    return { child, text: () => text }
}

async function main(): Promise<void> {
    const { values } = parseArgs({ options: { events: { type: 'string' }, 'watch-seconds': { type: 'string' } } })
    const events = Number(values.events ?? 3_000)
    const watchMs = Number(values['watch-seconds'] ?? 30) * 1000
    const dir = mkdtempSync(join(tmpdir(), 'quiet-after-burst-'))
    const cli = installPackedCli()
    const standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT_ID })
    const receiver = await startReceiver({ dataDir: join(dir, 'rx'), path: '/api/v1/webhooks/quiet' })
    const since = new Date(Date.now() - 2 * HOUR_MS).toISOString()
    const args = ['--posthog-url', standin.url, '--project-id', String(PROJECT_ID), '--since', since, '--follow']
    const run = spawnSync(cli.bin, [...args, '--metrics-port', '0', '--log-format', 'json'], receiver.url)
    try {
        await standin.insertEvents(burst(events))
        console.log(`${events} events stored an hour ago; sync --follow --metrics-port 0 --log-format json (installed)`)
        await until(() => /Serving metrics on (http:\/\/\S+)\/metrics/.test(run.text()), 60_000, 'metrics served')
        const base = /Serving metrics on (http:\/\/\S+)\/metrics/.exec(run.text())?.[1] as string
        await until(() => receiver.summary().rows >= events, 300_000, 'every event received')
        const caughtUp = Date.now()
        const { requests, byOutcome } = receiver.summary()
        console.log(`receiver: ${receiver.summary().rows} rows in ${requests} POSTs (${JSON.stringify(byOutcome)})`)
        console.log(
            '  t (s)  rows received  delivered_total  lag_seconds  progress line: delivered, in_flight, caught_up, lag_seconds'
        )
        while (Date.now() - caughtUp <= watchMs) {
            const delivered = await sample(base, 'patterns_connector_events_delivered_total')
            const lag = await sample(base, 'patterns_connector_lag_seconds')
            const p = lastProgress(run.text())
            const line = p ? `${p.delivered}, ${p.in_flight}, ${p.caught_up}, ${p.lag_seconds}` : '(none yet)'
            const t = ((Date.now() - caughtUp) / 1000).toFixed(1).padStart(7)
            const cells = [receiver.summary().rows, delivered, lag].map((v) => String(v ?? 'absent').padStart(15))
            console.log(`${t}${cells.join('')}  ${line}`)
            await new Promise((resolve) => setTimeout(resolve, SAMPLE_EVERY_MS))
        }
        const delivered = await sample(base, 'patterns_connector_events_delivered_total')
        const lag = await sample(base, 'patterns_connector_lag_seconds')
        console.log(`delivered_total ${delivered} against ${receiver.summary().rows} rows received`)
        console.log(
            `lag_seconds ${lag} (horizon: --lag ${DEFAULT_LAG_S}s plus up to --poll-interval ${DEFAULT_POLL_S}s)`
        )
    } finally {
        run.child.kill('SIGTERM')
        await new Promise((resolve) => run.child.once('exit', resolve))
        await receiver.close()
        await standin.close()
        cli.remove()
        rmSync(dir, { recursive: true, force: true })
    }
}

main().catch((error: unknown) => {
    console.error(error)
    process.exit(1)
})
