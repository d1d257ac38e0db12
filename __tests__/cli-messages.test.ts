/**
 * What the commands say: errors name the flag and the fix with exit code 2, a misspelled flag gets its
 * correction, a wrong --posthog-url is reported within seconds, sync never ends having silently done nothing,
 * every summary and progress line is true, and --retry-for means the same in replay and sync. Through the real
 * CLI functions, against real servers on 127.0.0.1.
 */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer, Server } from 'node:http'
import { AddressInfo } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PassThrough } from 'node:stream'

import { closestFlag, commandName, editDistance } from '../pipeline/usage'
import { progressLine, runReplayCli } from '../replay/cli'
import { parsePostHogUrl, runSyncCli, syncProgressLine } from '../sync/cli'
import { QueryClient } from '../sync/posthog'
import { StandInEvent } from '../tools/standin/events'
import { PostHogStandIn, startPostHogStandIn } from '../tools/standin/server'
import { captureOutput } from './helpers/io'
import { Responder, startServer, TestServer, WEBHOOK_TOKEN } from './helpers/server'

const API_KEY = 'phx_Me55ages_k3y_1a2b3c4d5e6f'
const PROJECT = 5151
const HOUR = 3_600_000
/** A wrong --posthog-url must be reported in under this long (jest fails the test past it). */
const UNREACHABLE_REPORTED_WITHIN_MS = 10_000

let dir: string
const servers: Array<{ close: () => Promise<void> }> = []

beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'cli-messages-'))
})

afterEach(async () => {
    await Promise.all(servers.splice(0).map((s) => s.close()))
    rmSync(dir, { recursive: true, force: true })
})

async function webhook(responder: Responder = () => ({ status: 200 })): Promise<TestServer> {
    const server = await startServer(responder)
    servers.push(server)
    return server
}

type RawReply = { status: number; contentType: string; body: string } | 'reset'

/** A bare node:http server on 127.0.0.1 for answers a webhook never gives: a web page, a JSON API, a query page. */
async function rawServer(reply: (index: number) => RawReply): Promise<{ url: string; hits: () => number }> {
    let hits = 0
    const server: Server = createServer((req, res) => {
        const answer = reply(hits++)
        req.resume()
        if (answer === 'reset') {
            req.socket.destroy()
            return
        }
        res.writeHead(answer.status, { 'Content-Type': answer.contentType })
        res.end(answer.body)
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    servers.push({ close: () => new Promise<void>((resolve) => server.close(() => resolve())) })
    return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, hits: () => hits }
}

async function otherServer(status: number, contentType: string, body: string) {
    return rawServer(() => ({ status, contentType, body }))
}

/** A loopback port with nothing listening on it. */
async function closedPort(): Promise<number> {
    const server = createServer()
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    const { port } = server.address() as AddressInfo
    await new Promise<void>((resolve) => server.close(() => resolve()))
    return port
}

async function replayCli(args: string[], env: Record<string, string> = {}) {
    const { stdout, stderr, text } = captureOutput()
    const code = await runReplayCli(args, env, { stdout, stderr, stdin: new PassThrough() })
    return { code, ...text }
}

async function syncCli(args: string[], env: Record<string, string> = {}) {
    const { stdout, stderr, text } = captureOutput()
    const code = await runSyncCli(args, { POSTHOG_API_KEY: API_KEY, ...env }, { stdout, stderr })
    return { code, ...text }
}

function eventLines(count: number): string {
    return Array.from({ length: count }, (_, n) =>
        JSON.stringify({ uuid: `0190a1b2-0000-7000-8000-${String(n).padStart(12, '0')}`, event: 'e', properties: {} })
    ).join('\n')
}

function inputFile(text: string): string {
    const path = join(dir, 'in.jsonl')
    writeFileSync(path, text)
    return path
}

describe('errors name the flag and the fix', () => {
    it('a plain-http webhook names --webhook-url and says to use https, exit 2, without the URL', async () => {
        const { code, stderr } = await replayCli(['x.jsonl', '--webhook-url', `http://example.com/${WEBHOOK_TOKEN}`])
        expect(code).toBe(2)
        expect(stderr).toBe(
            'error: --webhook-url: it uses http. Use https; plain http is allowed only for localhost.\n'
        )
        expect(stderr).not.toContain(WEBHOOK_TOKEN)
    })

    it('names PATTERNS_WEBHOOK_URL when the URL came from the environment', async () => {
        const env = { PATTERNS_WEBHOOK_URL: `ftp://example.com/${WEBHOOK_TOKEN}` }
        const { code, stderr } = await replayCli(['x.jsonl'], env)
        expect(code).toBe(2)
        expect(stderr).toBe('error: PATTERNS_WEBHOOK_URL: it uses ftp:. Use an https:// URL.\n')
    })

    it('names --custom-headers, in the lead and in the fix, for sync as for replay', async () => {
        const args = ['--posthog-url', 'https://us.posthog.com', '--project-id', '1', '--follow']
        const bad = await syncCli([...args, '--custom-headers', '{"Content-Type":"x"}'], {
            PATTERNS_WEBHOOK_URL: 'https://example.com/h',
        })
        expect(bad.code).toBe(2)
        expect(bad.stderr).toBe(
            'error: --custom-headers: "Content-Type" is set by the connector itself. Remove it from --custom-headers.\n'
        )
        const notJson = await replayCli(['x', '--dry-run', '--custom-headers', '{oops'])
        expect(notJson.code).toBe(2)
        expect(notJson.stderr).toContain('error: --custom-headers: it is not valid JSON.')
    })

    it('--posthog-url takes plain http on the same loopback hosts as the webhook, [::1] included', () => {
        expect(parsePostHogUrl('http://[::1]:8000')).toBe('http://[::1]:8000')
        expect(parsePostHogUrl('http://localhost:8000/')).toBe('http://localhost:8000')
        expect(() => parsePostHogUrl('http://posthog.example.com')).toThrow(
            '--posthog-url: plain http would send the API key in the clear; use https (http only for localhost)'
        )
    })

    it('a webhook that refuses the credentials: the warning and summary name the flags to check', async () => {
        const rx = await webhook(() => ({ status: 401 }))
        const { code, stdout, stderr } = await replayCli([inputFile(eventLines(2)), '--webhook-url', rx.url])
        expect(code).toBe(1)
        const fix = 'the receiver rejected the credentials or headers; check --custom-headers and --signing-secret'
        expect(stderr).toContain(fix)
        expect(stdout + stderr).not.toMatch(/customHeaders|signingSecret/)
        expect(rx.received).toHaveLength(1)
    })

    it('asks for the webhook in the same words in replay and sync', async () => {
        const replay = await replayCli(['x.jsonl'])
        const sync = await syncCli(['--posthog-url', 'https://us.posthog.com', '--project-id', '1', '--follow'])
        const expected =
            'error: --webhook-url is required: the URL of your webhook (or set PATTERNS_WEBHOOK_URL, which keeps it ' +
            'out of shell history)'
        expect(replay.stderr).toBe(`${expected}; or --dry-run to send nothing\n`)
        expect(sync.stderr).toBe(`${expected}\n`)
        expect([replay.code, sync.code]).toEqual([2, 2])
    })
})

describe('a misspelled flag', () => {
    it('gets "did you mean" with the flag it is closest to, exit 2', async () => {
        const replay = await replayCli(['x.jsonl', '--webhok-url', 'https://example.com/h'])
        expect(replay.code).toBe(2)
        expect(replay.stderr).toContain("Unknown option '--webhok-url'. Did you mean --webhook-url?")
        const sync = await syncCli(['--posthog-url', 'https://us.posthog.com', '--project-id', '1', '--sicne', 'x'])
        expect(sync.code).toBe(2)
        expect(sync.stderr).toContain("Unknown option '--sicne'. Did you mean --since?")
    })

    it('a flag written without its dashes gets its dashes suggested', async () => {
        const args = ['--posthog-url', 'https://us.posthog.com', '--project-id', '1', 'follow']
        const { code, stderr } = await syncCli(args, { PATTERNS_WEBHOOK_URL: 'https://example.com/h' })
        expect(code).toBe(2)
        expect(stderr).toBe(
            "error: Unexpected argument 'follow'. This command does not take positional arguments. Did you mean " +
                '--follow? Run with --help for the options.\n'
        )
    })

    it('suggests nothing when no flag is close', async () => {
        const { code, stderr } = await replayCli(['x.jsonl', '--zzz'])
        expect(code).toBe(2)
        expect(stderr).toContain("Unknown option '--zzz'.")
        expect(stderr).not.toContain('Did you mean')
    })

    it('measures typos by edits, swaps counting as one, and needs the flag to be near', () => {
        expect(editDistance('sicne', 'since')).toBe(1)
        expect(editDistance('kitten', 'sitting')).toBe(3)
        expect(closestFlag('--dead-leter', ['dead-letter', 'dry-run'])).toBe('dead-letter')
        expect(closestFlag('--batch', ['batch-events', 'batch-bytes'])).toBe('batch-events')
        expect(closestFlag('--x', ['h', 'since'])).toBeNull()
        expect(closestFlag('--follw=1', ['follow'])).toBe('follow')
    })
})

describe('hints print commands that run as shown', () => {
    it('names the command as this process was started: on the PATH, or node and the script in a checkout', () => {
        expect(commandName('/usr/local/bin/patterns-connector', '/usr/bin:/usr/local/bin', '/home/me')).toBe(
            'patterns-connector'
        )
        expect(commandName('/src/connector/bin/patterns-connector.js', '/usr/bin', '/src/connector')).toBe(
            'node bin/patterns-connector.js'
        )
        expect(commandName('/src/connector/bin/patterns-connector.js', '/usr/bin', '/tmp')).toBe(
            'node /src/connector/bin/patterns-connector.js'
        )
        expect(commandName('/repo/node_modules/.bin/jest', '/usr/bin', '/repo')).toBe('patterns-connector')
    })
})

describe('a PostHog that cannot be reached or is not PostHog', () => {
    const syncArgs = (url: string) => ['--posthog-url', url, '--project-id', '1', '--follow']
    const env = { PATTERNS_WEBHOOK_URL: 'https://example.com/h' }

    it(
        'nothing listening: exit 2 within seconds, naming --posthog-url and the host, not the key',
        async () => {
            const port = await closedPort()
            const { code, stderr } = await syncCli(syncArgs(`http://127.0.0.1:${port}`), env)
            expect(code).toBe(2)
            expect(stderr).toMatch(
                new RegExp(
                    `error: cannot reach PostHog at 127\\.0\\.0\\.1:${port} \\(\\d+ attempts? in \\ds, last: ` +
                        'network error ECONNREFUSED\\)\\. Check --posthog-url'
                )
            )
            expect(stderr).not.toContain(API_KEY.slice(4, 12))
        },
        UNREACHABLE_REPORTED_WITHIN_MS
    )

    it(
        'a web server that is not PostHog (an HTML page): exit 2 within seconds, naming --posthog-url',
        async () => {
            const site = await otherServer(200, 'text/html', '<html><body>Welcome</body></html>')
            const { code, stderr } = await syncCli(syncArgs(site.url), env)
            expect(code).toBe(2)
            expect(stderr).toContain(`error: ${new URL(site.url).host} does not answer as PostHog (`)
            expect(stderr).toContain('last: the response was not JSON). Check --posthog-url')
            expect(site.hits()).toBeGreaterThanOrEqual(1)
        },
        UNREACHABLE_REPORTED_WITHIN_MS
    )

    it('a JSON API that is not PostHog: exit 2 at the first answer, naming --posthog-url', async () => {
        const api = await otherServer(200, 'application/json', '{"ok":true}')
        const { code, stderr } = await syncCli(syncArgs(api.url), env)
        expect(code).toBe(2)
        expect(stderr).toContain(
            `error: ${new URL(api.url).host} does not answer as PostHog (the query API answered without "results" ` +
                'and "columns"). Check --posthog-url'
        )
        expect(api.hits()).toBe(1)
    })

    it('a web server’s 404 page is not read as an unknown project: exit 2 at once, naming --posthog-url', async () => {
        const site = await otherServer(404, 'text/html', '<html><h1>Not Found</h1></html>')
        const { code, stderr } = await syncCli(syncArgs(site.url), env)
        expect(code).toBe(2)
        expect(stderr).toContain(
            `error: ${new URL(site.url).host} does not answer as PostHog (HTTP 404: <html><h1>Not Found</h1></html>). ` +
                'Check --posthog-url'
        )
        expect(stderr).not.toContain('--project-id')
        expect(site.hits()).toBe(1)
    })

    it('once PostHog has answered, network errors are retried as before, not reported as a wrong URL', async () => {
        const page = JSON.stringify({ columns: ['n'], results: [[1]], hasMore: false })
        const posthog = await rawServer((index) =>
            index >= 1 && index <= 3 ? 'reset' : { status: 200, contentType: 'application/json', body: page }
        )
        // A clock moved by the client's own sleeps: the backoff is taken in full without waiting for it.
        let clock = 0
        const timing = { now: () => clock, sleep: async (ms: number) => void (clock += ms), random: () => 1 }
        const answered = new QueryClient({ origin: posthog.url, projectId: '1', apiKey: API_KEY, ...timing })
        expect((await answered.run('SELECT 1')).rowCount).toBe(1)
        expect((await answered.run('SELECT 1')).rowCount).toBe(1)
        expect(answered.retries).toBe(3)
        expect(posthog.hits()).toBe(5)

        const never = await rawServer(() => 'reset')
        const fresh = new QueryClient({ origin: never.url, projectId: '1', apiKey: API_KEY, ...timing })
        const error = await fresh.run('SELECT 1').catch((e: unknown) => e)
        expect(error).toMatchObject({ kind: 'unreachable', isConfig: true })
        // Backoff of 1 s then 2 s fits the first-contact budget of 3 s; the next wait of 4 s does not.
        expect(never.hits()).toBe(3)
    })
})

describe('sync never silently does nothing', () => {
    let standin: PostHogStandIn
    beforeEach(async () => {
        standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT })
        servers.push(standin)
    })

    const source = () => ['--posthog-url', standin.url, '--project-id', String(PROJECT), '--lag', '0s']

    function events(count: number): StandInEvent[] {
        const now = Date.now()
        return Array.from({ length: count }, (_, n) => ({
            uuid: `0190a1b2-0000-7000-8000-${String(n).padStart(12, '0')}`,
            event: '$pageview',
            distinct_id: 'user',
            timestamp: new Date(now - HOUR + n).toISOString(),
            properties: { n },
        }))
    }

    it('a first run without --since or --follow is refused with the fix, exit 2, and writes no checkpoint', async () => {
        const rx = await webhook()
        const checkpoint = join(dir, 'sync.ckpt')
        const { code, stderr } = await syncCli([...source(), '--checkpoint', checkpoint], {
            PATTERNS_WEBHOOK_URL: rx.url,
        })
        expect(code).toBe(2)
        expect(stderr).toBe(
            'error: a first sync needs --since ISO (send the events PostHog stored from then on, e.g. ' +
                '--since 2026-11-01T00:00:00Z), --follow (send new events as they arrive), or both; with ' +
                '--checkpoint FILE, later runs resume from it and need neither\n'
        )
        expect(existsSync(checkpoint)).toBe(false)
        expect(standin.queries).toBe(0)
    })

    it('--since later than now minus --lag is refused: there is nothing to read yet', async () => {
        const rx = await webhook()
        const later = new Date(Date.now() + HOUR).toISOString()
        const { code, stderr } = await syncCli([...source(), '--since', later], { PATTERNS_WEBHOOK_URL: rx.url })
        expect(code).toBe(2)
        expect(stderr).toContain(`error: --since ${later} is after now minus --lag (`)
        expect(stderr).toContain('give an earlier --since, or add --follow to wait for new events')
    })

    it('says what the checkpoint keeps, resumes without --since, and explains a different --since', async () => {
        const rx = await webhook()
        await standin.insertEvents(events(30))
        const checkpoint = join(dir, 'sync.ckpt')
        const since = new Date(Date.now() - 2 * HOUR).toISOString()
        const env = { PATTERNS_WEBHOOK_URL: rx.url }
        const first = await syncCli([...source(), '--since', since, '--checkpoint', checkpoint], env)
        expect(first.code).toBe(0)
        expect(first.stderr).toContain(
            `Saving progress in ${checkpoint}: the same command resumes from it. It keeps this run's start (${since}); ` +
                'to start elsewhere later, use a new --checkpoint file.'
        )
        expect(rx.accepted).toHaveLength(30)

        const resumed = await syncCli([...source(), '--checkpoint', checkpoint], env)
        expect(resumed.code).toBe(0)
        expect(resumed.stderr).toContain('resuming after')
        expect(resumed.stderr).not.toContain('Saving progress')

        const other = new Date(Date.now() - 3 * HOUR).toISOString()
        const moved = await syncCli([...source(), '--since', other, '--checkpoint', checkpoint], env)
        expect(moved.code).toBe(2)
        expect(moved.stderr).toBe(
            `error: --checkpoint: ${checkpoint} started from --since ${since}, and resumes from there; --since ` +
                `${other} would leave a gap or read twice. Leave --since out to resume, or use a new --checkpoint ` +
                'file to start from the new --since.\n'
        )
    })

    it('a range with no events says so, and the summary has no checkpoint row without --checkpoint', async () => {
        const rx = await webhook()
        const since = new Date(Date.now() - 2 * HOUR).toISOString()
        const { code, stderr, stdout } = await syncCli([...source(), '--since', since], {
            PATTERNS_WEBHOOK_URL: rx.url,
        })
        expect(code).toBe(0)
        expect(stderr).toContain(`PostHog has no events for project ${PROJECT} in that time: nothing to send`)
        expect(stdout).toMatch(/ {2}events read +0\n/)
        expect(stdout).not.toContain('checkpoint at')
        expect(stdout).not.toContain('dead-letter')
    })
})

describe('summary and progress lines are true', () => {
    it('replay without --dead-letter or --checkpoint: no "(dead-letter)", no checkpoint rows', async () => {
        const rx = await webhook()
        const path = inputFile(`${eventLines(3)}\nnot json\n`)
        const { code, stdout } = await replayCli([path, '--webhook-url', rx.url])
        expect(code).toBe(1)
        expect(stdout).toMatch(/ {2}unreadable +1\n/)
        expect(stdout).not.toContain('dead-letter')
        expect(stdout).not.toContain('checkpoint')
    })

    it('replay with both: the rows say where refused records and the checkpoint are', async () => {
        const rx = await webhook()
        const path = inputFile(`${eventLines(3)}\nnot json\n`)
        const deadLetter = join(dir, 'dead.jsonl')
        const checkpoint = join(dir, 'replay.ckpt')
        const args = [path, '--webhook-url', rx.url, '--dead-letter', deadLetter, '--checkpoint', checkpoint]
        const { stdout } = await replayCli(args)
        expect(stdout).toMatch(/ {2}unreadable \(dead-letter\) +1\n/)
        expect(stdout).toMatch(new RegExp(` {2}dead letters in +${deadLetter}\\n`))
        expect(stdout).toMatch(/ {2}skipped \(checkpoint\) +0\n/)
        expect(stdout).toMatch(/ {2}checkpoint at record +4\n/)
    })

    it('replay shows no ETA while nothing is sent, however much is read', () => {
        const p = { read: 1_000, delivered: 0, filtered: 0, deadLettered: 0, retries: 0, requests: 4, inFlight: 4 }
        expect(progressLine(p, 500, 1)).toBe('read 1000, sent 0, 0 events/s, retries 0, failures 0, in flight 4')
    })

    it('sync leaves out what is not known yet instead of printing it empty', () => {
        const p = {
            read: 0,
            delivered: 0,
            filtered: 0,
            deadLettered: 0,
            retries: 0,
            requests: 0,
            inFlight: 0,
            cursorMs: null,
            caughtUp: false,
            horizonMs: null,
            queries: 1,
            queryRetries: 0,
        }
        expect(syncProgressLine(p, 1_000, Date.now())).toBe(
            'read 0, sent 0, 0 events/s, no events yet, queries 1, retries 0, failures 0, in flight 0'
        )
    })
})

describe('--retry-for means the same in replay and sync', () => {
    /** More failures than the plugin's 12 attempts allow, each with Retry-After: 0 so the test does not wait. */
    const FAILURES = 13
    const failing: Responder = (_request, index) =>
        index < FAILURES ? { status: 503, headers: { 'Retry-After': '0' } } : { status: 200 }

    it('replay: a batch keeps retrying past 12 attempts while its budget lasts, then is delivered', async () => {
        const rx = await webhook(failing)
        const path = inputFile(eventLines(5))
        const { code } = await replayCli([path, '--webhook-url', rx.url, '--retry-for', '60'])
        expect(code).toBe(0)
        expect(rx.received).toHaveLength(FAILURES + 1)
        expect(rx.accepted).toHaveLength(5)
    })

    it('sync: the same batch budget, not the plugin’s count of attempts', async () => {
        const standin = await startPostHogStandIn({ apiKey: API_KEY, projectId: PROJECT })
        servers.push(standin)
        await standin.insertEvents(
            Array.from({ length: 5 }, (_, n) => ({
                uuid: `0190a1b2-0000-7000-8000-${String(n).padStart(12, '0')}`,
                event: '$pageview',
                distinct_id: 'user',
                timestamp: new Date(Date.now() - HOUR).toISOString(),
                properties: {},
            }))
        )
        const rx = await webhook(failing)
        const since = new Date(Date.now() - 2 * HOUR).toISOString()
        const args = ['--posthog-url', standin.url, '--project-id', String(PROJECT), '--since', since, '--lag', '0s']
        const { code, stdout } = await syncCli([...args, '--retry-for', '60'], { PATTERNS_WEBHOOK_URL: rx.url })
        expect(code).toBe(0)
        expect(rx.received).toHaveLength(FAILURES + 1)
        expect(rx.accepted).toHaveLength(5)
        expect(stdout).toMatch(new RegExp(` {2}webhook retries +${FAILURES}\\n`))
    })
})

describe('the command name', () => {
    it('a misspelled command gets "did you mean", the usage and exit code 2', () => {
        const bin = join(__dirname, '..', 'bin', 'patterns-connector.js')
        const typo = spawnSync(process.execPath, [bin, 'replya'], { encoding: 'utf8' })
        expect(typo.status).toBe(2)
        expect(typo.stderr).toContain('error: unknown command "replya". Did you mean "replay"?')
        expect(typo.stderr).toContain('Usage: patterns-connector <command> [options]')
        const unknown = spawnSync(process.execPath, [bin, 'frobnicate'], { encoding: 'utf8' })
        expect(unknown.status).toBe(2)
        expect(unknown.stderr).not.toContain('Did you mean')
    })
})
