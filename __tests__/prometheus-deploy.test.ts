/**
 * deploy/prometheus and deploy/grafana, checked with Prometheus's own tools (Debian's `prometheus` package, installed
 * here when promtool is missing): `promtool check rules` and `promtool test rules` on the alert rules; then a real
 * Prometheus scrapes a running `sync --follow --metrics-port` (the installed CLI, against the PostHog stand-in and the
 * receiver) with the rules loaded. Every metric the rules name is in /metrics, `promtool check metrics` passes on it,
 * every rule evaluates, and every query of the dashboard returns a series from that Prometheus.
 */
import { ChildProcess, spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { InstalledCli, installPackedCli } from '../tools/bench/installed'
import { ensureDebianTools } from '../tools/debian'
import { Receiver, startReceiver } from '../tools/receiver/receiver'
import { PostHogStandIn, startPostHogStandIn } from '../tools/standin/server'
import { waitFor } from './helpers/io'

const ROOT = join(__dirname, '..')
const RULES_DIR = join(ROOT, 'deploy', 'prometheus')
const RULES = join(RULES_DIR, 'patterns-connector.rules.yml')
const RULES_TESTS = join(RULES_DIR, 'patterns-connector.rules.test.yml')
const DASHBOARD = join(ROOT, 'deploy', 'grafana', 'patterns-connector.json')
const API_KEY = 'phx_Prom3theus_k3y_4a5b'
const PROJECT = 5
const TOKEN = 'prom_T0ken_2718'
const EVENTS = 300
const HOUR = 3_600_000
/** Scrapes and evaluations a second, so rate() has samples within seconds. */
const SCRAPE_INTERVAL = '1s'
/** What Grafana's $__rate_interval becomes here: several 1 s scrapes. */
const RATE_INTERVAL = '15s'
/** Enough scrapes for every rate() in the dashboard to have two samples. */
const MIN_SCRAPES = 5

jest.setTimeout(120_000)

let dir: string
let cli: InstalledCli
let standin: PostHogStandIn
let receiver: Receiver
let sync: ChildProcess
let prometheus: ChildProcess
let metricsUrl: string
let prometheusUrl: string

function promtool(args: string[], input?: string): { code: number | null; output: string } {
    const result = spawnSync('promtool', args, { input, encoding: 'utf8', timeout: 60_000 })
    return { code: result.status, output: `${result.stdout}${result.stderr}`.trim() }
}

function freePort(): Promise<number> {
    return new Promise((resolve) => {
        const server = createServer().listen(0, '127.0.0.1', () => {
            const { port } = server.address() as { port: number }
            server.close(() => resolve(port))
        })
    })
}

async function query(expr: string): Promise<Array<{ metric: Record<string, string>; value: [number, string] }>> {
    const response = await fetch(`${prometheusUrl}/api/v1/query?query=${encodeURIComponent(expr)}`)
    const body = (await response.json()) as { status: string; error?: string; data: { result: [] } }
    if (body.status !== 'success') {
        throw new Error(`${expr}: ${body.error}`)
    }
    return body.data.result
}

async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 60_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!(await check().catch(() => false))) {
        if (Date.now() > deadline) {
            throw new Error(`${what}: not within ${timeoutMs} ms`)
        }
        await new Promise((resolve) => setTimeout(resolve, 250))
    }
}

async function startSync(): Promise<void> {
    const now = Date.now()
    await standin.insertEvents(
        Array.from({ length: EVENTS }, (_, n) => ({
            event: '$pageview',
            distinct_id: `user-${n % 3}`,
            timestamp: new Date(now - HOUR + n).toISOString(),
        }))
    )
    const args = ['sync', '--follow', '--posthog-url', standin.url, '--project-id', String(PROJECT)]
    args.push('--since', new Date(now - 2 * HOUR).toISOString(), '--lag', '0s', '--poll-interval', '1s')
    args.push('--checkpoint', join(dir, 'sync.ckpt'), '--metrics-port', '0', '--log-format', 'json')
    sync = spawn(process.execPath, [cli.bin, ...args], {
        cwd: dir,
        env: { PATH: process.env.PATH ?? '', POSTHOG_API_KEY: API_KEY, PATTERNS_WEBHOOK_URL: receiver.url },
        stdio: ['ignore', 'pipe', 'pipe'],
    })
    let text = ''
    sync.stdout?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    sync.stderr?.on('data', (chunk: Buffer) => (text += chunk.toString()))
    await waitFor(() => /Serving metrics on (http:\/\/[^ ]+)\/metrics/.test(text), 30_000)
    metricsUrl = `${(/Serving metrics on (http:\/\/[^ ]+)\/metrics/.exec(text) as RegExpExecArray)[1]}/metrics`
    await waitFor(() => receiver.summary().uniqueUuids === EVENTS, 60_000)
}

async function startPrometheus(): Promise<void> {
    const port = await freePort()
    const target = new URL(metricsUrl).host
    const config = [
        'global:',
        `    scrape_interval: ${SCRAPE_INTERVAL}`,
        `    evaluation_interval: ${SCRAPE_INTERVAL}`,
        'rule_files:',
        `    - ${RULES}`,
        'scrape_configs:',
        '    - job_name: patterns-connector',
        `      static_configs: [{ targets: ['${target}'] }]`,
        '',
    ].join('\n')
    writeFileSync(join(dir, 'prometheus.yml'), config)
    prometheus = spawn(
        'prometheus',
        [
            `--config.file=${join(dir, 'prometheus.yml')}`,
            `--storage.tsdb.path=${join(dir, 'tsdb')}`,
            `--web.listen-address=127.0.0.1:${port}`,
        ],
        { stdio: 'ignore' }
    )
    prometheusUrl = `http://127.0.0.1:${port}`
    await eventually('Prometheus ready', async () => (await fetch(`${prometheusUrl}/-/ready`)).ok)
    await eventually(`${MIN_SCRAPES} scrapes of the sync`, async () => {
        const scrapes = await query('count_over_time(up{job="patterns-connector"}[1m])')
        return Number(scrapes[0]?.value[1] ?? 0) >= MIN_SCRAPES
    })
}

beforeAll(async () => {
    ensureDebianTools({ promtool: 'prometheus', prometheus: 'prometheus' })
    dir = mkdtempSync(join(tmpdir(), 'prometheus-deploy-'))
    cli = installPackedCli()
    standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT })
    receiver = await startReceiver({ dataDir: join(dir, 'rx'), path: `/api/v1/webhooks/${TOKEN}` })
    await startSync()
    await startPrometheus()
}, 600_000)

afterAll(async () => {
    prometheus?.kill('SIGTERM')
    sync?.kill('SIGTERM')
    await Promise.all(
        [prometheus, sync].map((child) =>
            child && child.exitCode === null ? new Promise((resolve) => child.once('exit', resolve)) : null
        )
    )
    await receiver?.close()
    await standin?.close()
    cli?.remove()
    rmSync(dir, { recursive: true, force: true })
})

/** The alert names in the rules file, in order. */
function alertNames(): string[] {
    return [...readFileSync(RULES, 'utf8').matchAll(/^\s*- alert: (\S+)/gm)].map((match) => match[1] as string)
}

/** Every metric an alert's expression names: ours, and the process metrics prom-client adds. */
function metricsInRules(): string[] {
    const exprs = [...readFileSync(RULES, 'utf8').matchAll(/^\s*expr: (.+)$/gm)].map((match) => match[1]).join('\n')
    return [...new Set(exprs.match(/\b(?:patterns_connector|process|nodejs)_[a-z0-9_]+\b/g) ?? [])]
}

/** The dashboard's queries, with Grafana's variables as this Prometheus needs them: every instance, 15 s rates. */
function dashboardQueries(): string[] {
    const dashboard = JSON.parse(readFileSync(DASHBOARD, 'utf8')) as {
        panels: Array<{ targets: Array<{ expr: string }> }>
    }
    return dashboard.panels.flatMap((panel) => panel.targets.map((target) => target.expr))
}

test('promtool check rules: every alert rule is valid', () => {
    const result = promtool(['check', 'rules', RULES])
    console.log(`promtool check rules\n${result.output}`)
    expect(result.code).toBe(0)
    expect(alertNames().length).toBeGreaterThanOrEqual(5)
    expect(result.output).toContain(`SUCCESS: ${alertNames().length} rules found`)
})

test('promtool test rules: each alert fires on its failure and not on the look-alike', () => {
    const result = promtool(['test', 'rules', RULES_TESTS])
    console.log(`promtool test rules\n${result.output}`)
    expect(result.code).toBe(0)
    expect(result.output).toContain('SUCCESS')
    const tested = readFileSync(RULES_TESTS, 'utf8')
    for (const alert of alertNames()) {
        expect(tested).toContain(`alertname: ${alert}`)
    }
})

test("the sync's /metrics passes promtool check metrics, and holds every metric the rules name", async () => {
    const text = await (await fetch(metricsUrl)).text()
    const result = promtool(['check', 'metrics'], text)
    console.log(`promtool check metrics (exit ${result.code})\n${result.output || '(no problems)'}`)
    expect(result.code).toBe(0)
    const names = metricsInRules()
    expect(names).toContain('patterns_connector_webhook_up')
    for (const name of names) {
        expect(text).toMatch(new RegExp(`^${name}(\\{[^}]*\\})? `, 'm'))
    }
})

test('Prometheus loaded every rule and evaluates each without error', async () => {
    await eventually('every rule evaluated', async () => {
        const response = await fetch(`${prometheusUrl}/api/v1/rules`)
        const body = (await response.json()) as {
            data: { groups: Array<{ rules: Array<{ name: string; health: string; lastError?: string }> }> }
        }
        const rules = body.data.groups.flatMap((group) => group.rules)
        const unhealthy = rules.filter((rule) => rule.health !== 'ok')
        if (unhealthy.length > 0 && unhealthy.some((rule) => rule.health === 'err')) {
            throw new Error(`rules in error: ${JSON.stringify(unhealthy)}`)
        }
        return rules.length === alertNames().length && unhealthy.length === 0
    })
})

test('every query of the Grafana dashboard returns a series from that Prometheus', async () => {
    const instances = await (
        await fetch(`${prometheusUrl}/api/v1/label/instance/values?match[]=patterns_connector_webhook_up`)
    ).json()
    expect((instances as { data: string[] }).data).toEqual([new URL(metricsUrl).host])
    const queries = dashboardQueries()
    expect(queries.length).toBeGreaterThanOrEqual(10)
    const lines: string[] = []
    for (const expr of queries) {
        const sent = expr.replaceAll('$instance', '.+').replaceAll('$__rate_interval', RATE_INTERVAL)
        const result = await query(sent)
        lines.push(`${result.length} series  ${sent}`)
        expect({ expr, returnsASeries: result.length > 0 }).toEqual({ expr, returnsASeries: true })
    }
    console.log(`dashboard queries checked\n${lines.join('\n')}`)
})
