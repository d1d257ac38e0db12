/** The replay CLI against the embedded receiver: formats, filters, checkpoint and resume, dead letters, exit codes. */
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'

import { progressLine, runReplayCli } from '../replay/cli'
import { detectFormat } from '../replay/input'
import { readCheckpoint } from '../replay/replay'
import { sampleEvents } from '../tools/host/sample-events'
import { FAULT_PRESETS, Receiver, startReceiver } from '../tools/receiver/receiver'
import { captureOutput, waitFor } from './helpers/io'
import { startServer } from './helpers/server'

const TOKEN = 'rpl_T0ken_8b7a6c5d'
const HEADER_VALUE = 'Bearer rpl-Header-Secret-55'
const SIGNING_SECRET = 'whsec_cmVwbGF5LXNpZ25pbmcta2V5LTk5'
const BIN = join(__dirname, '..', 'bin', 'patterns-connector.js')

let dir: string
let receiver: Receiver | undefined

beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'replay-'))
})

afterEach(async () => {
    await receiver?.close()
    receiver = undefined
    rmSync(dir, { recursive: true, force: true })
})

function events(count: number, seed = 5) {
    return [...sampleEvents(count, seed)]
}

function writeInput(name: string, text: string): string {
    const path = join(dir, name)
    writeFileSync(path, text)
    return path
}

/** Uuids sorted: batches in flight together may reach the receiver in any order; none may be missing or twice. */
const inAnyOrder = (rows: ReadonlyArray<object>): string[] =>
    rows.map((row) => String((row as { uuid?: unknown }).uuid)).sort()

async function rx(faults: string = 'none', options: { latencyMs?: number } = {}): Promise<Receiver> {
    receiver = await startReceiver({
        dataDir: join(dir, 'rx'),
        path: `/api/v1/webhooks/${TOKEN}`,
        faults: { ...FAULT_PRESETS[faults], ...(options.latencyMs ? { latencyMs: options.latencyMs } : {}) },
        seed: 3,
    })
    return receiver
}

async function cli(args: string[], env: Record<string, string> = {}, stdin = '') {
    const { stdout, stderr, text } = captureOutput()
    const code = await runReplayCli(args, env, { stdout, stderr, stdin: Readable.from([stdin]) })
    return { code, ...text }
}

/** The replay CLI as a child process over 3,000 events, in batches of 50, with a checkpoint: start it, and again. */
function replayProcess(r: Receiver, concurrency: number) {
    const input = events(3_000)
    const path = writeInput('in.jsonl', input.map((e) => JSON.stringify(e)).join('\n'))
    const checkpoint = join(dir, 'ck.json')
    const args = [BIN, 'replay', path, '--batch-events', '50', '--concurrency', String(concurrency)]
    const env = { ...process.env, PATTERNS_WEBHOOK_URL: r.url }
    const start = () => {
        const child = spawn(process.execPath, [...args, '--checkpoint', checkpoint], { env, stdio: 'pipe' })
        let output = ''
        child.stdout.on('data', (c: Buffer) => (output += c.toString()))
        child.stderr.on('data', (c: Buffer) => (output += c.toString()))
        const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
        return { child, exited, output: () => output }
    }
    return { input, checkpoint, start }
}

describe('input formats', () => {
    it('detects each format from the first bytes', () => {
        expect(detectFormat('  [{"event":"a"}]')).toBe('json')
        expect(detectFormat('{"event":"a","uuid":"1"}\n{"event":"b"}')).toBe('jsonl')
        expect(detectFormat('{"next":null,"results":[{"event":"a"}]}')).toBe('pages')
        expect(detectFormat('{"results":[{"event":"a"}]}\n{"results":[]}')).toBe('pages')
        expect(detectFormat('{\n  "results": [\n')).toBe('pages')
    })

    it.each([
        ['JSON Lines', (e: object[]) => e.map((x) => JSON.stringify(x)).join('\n') + '\n', 'jsonl'],
        ['a JSON array', (e: object[]) => JSON.stringify(e, null, 2), 'json'],
        [
            'API pages, one per line',
            (e: object[]) =>
                [e.slice(0, 40), e.slice(40)].map((p) => JSON.stringify({ next: null, results: p })).join('\n'),
            'pages',
        ],
        [
            'API pages, concatenated and pretty-printed',
            (e: object[]) => [e.slice(0, 25), e.slice(25)].map((p) => JSON.stringify({ results: p }, null, 2)).join(''),
            'pages',
        ],
    ])('delivers every event from %s', async (_name, render, format) => {
        const r = await rx()
        const input = events(100)
        const path = writeInput('input', render(input))
        const { code, stdout } = await cli([path, '--webhook-url', r.url, '--batch-events', '30'])
        expect(code).toBe(0)
        expect(stdout).toContain(`input format              ${format}`)
        expect(inAnyOrder(r.rows())).toEqual(inAnyOrder(input))
        expect(r.summary().requests).toBe(4)
    })

    it('reads standard input given as -', async () => {
        const r = await rx()
        const input = events(10)
        const { code } = await cli(['-', '--webhook-url', r.url], {}, input.map((e) => JSON.stringify(e)).join('\n'))
        expect(code).toBe(0)
        expect(r.summary().rows).toBe(10)
    })
})

describe('faults', () => {
    it('delivers everything through the default fault mix, duplicating only what was accepted then reset', async () => {
        const r = await rx('default')
        const input = events(2_000)
        const path = writeInput('in.jsonl', input.map((e) => JSON.stringify(e)).join('\n'))
        const { code, stdout } = await cli([path, '--webhook-url', r.url, '--batch-events', '50'])
        expect(code).toBe(0)
        const counts = r.uuidCounts()
        expect(input.filter((e) => !counts.has(e.uuid))).toEqual([])
        expect(r.summary().duplicateRows).toBeLessThanOrEqual(r.summary().acceptResetRows)
        expect(Number(/retries\s+(\d+)/.exec(stdout)?.[1])).toBeGreaterThan(0)
    }, 60_000)

    it('stops on a broken JSON array with a clear reason and exit code 1', async () => {
        const path = writeInput('in.json', '[{"event":"a","uuid":"1"},{"event":"b",')
        const { code, stdout } = await cli([path, '--dry-run'])
        expect(code).toBe(1)
        expect(stdout).toContain('stopped early             the input is not valid JSON')
    })
})

describe('filters and removals', () => {
    it('applies the plugin filters and property removal, and exits 0 when the rest was delivered', async () => {
        const r = await rx()
        const input = events(200)
        const path = writeInput('in.jsonl', input.map((e) => JSON.stringify(e)).join('\n'))
        const { code, stdout } = await cli([
            path,
            '--webhook-url',
            r.url,
            '--allowed-events',
            ' $pageview, $identify ,purchase',
            '--excluded-events',
            'purchase',
            '--excluded-properties',
            '$ip, email',
        ])
        const expected = input.filter((e) => e.event === '$pageview' || e.event === '$identify')
        expect(code).toBe(0)
        expect(inAnyOrder(r.rows())).toEqual(inAnyOrder(expected))
        expect(JSON.stringify(r.rows())).not.toMatch(/"\$ip"|"email"/)
        expect(stdout).toContain(`filtered out              ${input.length - expected.length}`)
    })

    it('sends custom headers and a signature, from the environment', async () => {
        const server = await startServer(() => ({ status: 200 }))
        try {
            const path = writeInput('in.jsonl', JSON.stringify(events(1)[0]))
            const { code } = await cli([path], {
                PATTERNS_WEBHOOK_URL: server.url,
                PATTERNS_CUSTOM_HEADERS: JSON.stringify({ Authorization: HEADER_VALUE }),
                PATTERNS_SIGNING_SECRET: SIGNING_SECRET,
            })
            expect(code).toBe(0)
            expect(server.received).toHaveLength(1)
            expect(server.received[0]?.headers.authorization).toBe(HEADER_VALUE)
            expect(server.received[0]?.headers['webhook-signature']).toMatch(/^v1,/)
        } finally {
            await server.close()
        }
    })
})

describe('dead letters and exit codes', () => {
    it('sends malformed lines to the dead-letter file with their line number, and goes on', async () => {
        const r = await rx()
        const [a, b] = events(2)
        const path = writeInput(
            'in.jsonl',
            `${JSON.stringify(a)}\n{broken json\n\n{"no_event":1}\n${JSON.stringify(b)}\n`
        )
        const deadLetter = join(dir, 'dead.jsonl')
        const { code, stdout, stderr } = await cli([path, '--webhook-url', r.url, '--dead-letter', deadLetter])
        expect(code).toBe(1)
        expect(stderr).toContain(`warning: line 2: not valid JSON (kept in ${deadLetter})`)
        expect(r.rows().map((row) => row.uuid)).toEqual([a?.uuid, b?.uuid])
        const dead = readFileSync(deadLetter, 'utf8')
            .trim()
            .split('\n')
            .map((l) => JSON.parse(l) as { reason: string })
        expect(dead.map((d) => d.reason)).toEqual([
            'line 2: not valid JSON',
            'line 4: not a PostHog event (no "event" name)',
        ])
        expect(stdout).toContain('unreadable (dead-letter)  2')
    })

    it('dead-letters events the webhook refuses, with the reason, and exits 1', async () => {
        const r = await rx('small')
        const input = events(3)
        input[1]!.properties.blob = 'x'.repeat(20_000)
        const path = writeInput('in.jsonl', input.map((e) => JSON.stringify(e)).join('\n'))
        const deadLetter = join(dir, 'dead.jsonl')
        const { code } = await cli([path, '--webhook-url', r.url, '--dead-letter', deadLetter])
        expect(code).toBe(1)
        expect(r.rows().map((row) => row.uuid)).toEqual([input[0]?.uuid, input[2]?.uuid])
        const [dead] = readFileSync(deadLetter, 'utf8')
            .trim()
            .split('\n')
            .map((l) => JSON.parse(l) as { reason: string; event: { uuid: string } })
        expect(dead?.event.uuid).toBe(input[1]?.uuid)
        expect(dead?.reason).toContain('HTTP 413')
    })

    it('exits 2 with a clear message on bad usage', async () => {
        expect((await cli([])).stderr).toContain('give an input')
        const bad = await cli(['x.jsonl', '--webhook-url', `http://example.com/${TOKEN}`])
        expect(bad.code).toBe(2)
        expect(bad.stderr).toContain('--webhook-url: it uses http. Use https')
        expect(bad.stderr).not.toContain(TOKEN)
        expect((await cli(['x', '--concurrency', '0', '--dry-run'])).stderr).toContain('--concurrency')
        expect((await cli(['/no/such/file', '--dry-run'])).stderr).toContain('cannot read /no/such/file')
    })

    it('reports what would be sent on a dry run, and sends nothing', async () => {
        const r = await rx()
        const path = writeInput(
            'in.jsonl',
            events(100)
                .map((e) => JSON.stringify(e))
                .join('\n')
        )
        const { code, stdout } = await cli([path, '--webhook-url', r.url, '--dry-run', '--batch-events', '25'])
        expect(code).toBe(0)
        expect(stdout).toContain('would send                100')
        expect(stdout).toContain('requests needed           4')
        expect(r.summary().requests).toBe(0)
    })
})

describe('checkpoint and resume', () => {
    it('stops when the webhook stays down, then resumes without resending or skipping', async () => {
        const r = await rx()
        const input = events(300)
        const path = writeInput('in.jsonl', input.map((e) => JSON.stringify(e)).join('\n'))
        const checkpoint = join(dir, 'ck.json')
        // The webhook goes down after 100 rows, for longer than a batch may keep retrying.
        r.setFaults({ downAfterRows: 100 })
        const first = await cli([
            path,
            '--webhook-url',
            r.url,
            '--batch-events',
            '50',
            '--concurrency',
            '1',
            '--checkpoint',
            checkpoint,
            '--retry-for',
            '2',
        ])
        r.setFaults({})
        expect(first.code).toBe(1)
        expect(first.stdout).toContain('the webhook kept failing')
        expect(readCheckpoint(checkpoint)?.next).toBe(100)
        const second = await cli([path, '--webhook-url', r.url, '--batch-events', '50', '--checkpoint', checkpoint])
        expect(second.code).toBe(0)
        expect(second.stdout).toContain('skipped (checkpoint)      100')
        expect(inAnyOrder(r.rows())).toEqual(inAnyOrder(input))
        expect(r.summary().duplicateRows).toBe(0)
    }, 180_000)

    it('survives a kill midway: resuming delivers everything, duplicating only batches in flight', async () => {
        const r = await rx('none', { latencyMs: 30 })
        const job = replayProcess(r, 3)
        const first = job.start()
        await waitFor(() => r.summary().rows >= 1_000)
        first.child.kill('SIGKILL')
        expect(await first.exited).toBeNull()
        const rowsAtKill = r.summary().rows
        expect(rowsAtKill).toBeGreaterThanOrEqual(1_000)
        expect(rowsAtKill).toBeLessThan(3_000)
        expect(await job.start().exited).toBe(0)
        const counts = r.uuidCounts()
        expect(job.input.filter((e) => !counts.has(e.uuid))).toEqual([])
        // At most the 3 batches of 50 that were out when the process died are sent twice.
        expect(r.summary().duplicateRows).toBeLessThanOrEqual(3 * 50)
    }, 120_000)
})

describe('interrupting', () => {
    it('on Ctrl-C finishes the requests in flight, writes the checkpoint, and the same command resumes', async () => {
        const r = await rx('none', { latencyMs: 30 })
        const job = replayProcess(r, 2)
        const first = job.start()
        await waitFor(() => r.summary().rows >= 500)
        first.child.kill('SIGINT')
        expect(await first.exited).toBe(130)
        expect(first.output()).toContain('Interrupted: finishing the requests in flight')
        expect(first.output()).toContain('stopped early             interrupted')
        // Everything sent was acknowledged before exit, so the checkpoint covers every stored row.
        const saved = readCheckpoint(job.checkpoint)
        expect(saved?.next).toBe(r.summary().rows)
        expect(saved?.next).toBeLessThan(3_000)
        expect(await job.start().exited).toBe(0)
        // Two requests in flight may land in either order; what matters is every event, once.
        const stored = r.rows().map((row) => String(row.uuid))
        expect(stored.sort()).toEqual(job.input.map((e) => e.uuid).sort())
        expect(r.summary().duplicateRows).toBe(0)
    }, 60_000)
})

describe('progress', () => {
    it('shows read, sent, rate, retries, failures and an ETA when the input size is known', () => {
        const p = { read: 5_000, delivered: 4_000, filtered: 0, deadLettered: 3, retries: 7, requests: 9, inFlight: 2 }
        // A quarter of the input read gives 20,000 records in all; 4,003 handled in 2 s leaves 15,997, about 8 s.
        expect(progressLine(p, 2_000, 0.25)).toBe(
            'read 5000, sent 4000, 2000 events/s, retries 7, failures 3, in flight 2, ETA 8s'
        )
        expect(progressLine(p, 2_000, null)).not.toContain('ETA')
    })
})

describe('secrets', () => {
    it('never prints the URL token, a header value or the signing secret', async () => {
        const r = await rx('gone')
        const path = writeInput(
            'in.jsonl',
            events(20)
                .map((e) => JSON.stringify(e))
                .join('\n') + '\n{bad'
        )
        const env = {
            PATTERNS_WEBHOOK_URL: r.url,
            PATTERNS_CUSTOM_HEADERS: JSON.stringify({ Authorization: HEADER_VALUE }),
            PATTERNS_SIGNING_SECRET: SIGNING_SECRET,
        }
        const deadLetter = join(dir, 'dead.jsonl')
        const { code, stdout, stderr } = await cli([path, '--dead-letter', deadLetter], env)
        expect(code).toBe(1)
        const everything = stdout + stderr + readFileSync(deadLetter, 'utf8')
        expect(everything).toContain('HTTP 404')
        for (const secret of [TOKEN, HEADER_VALUE, SIGNING_SECRET, 'cmVwbGF5LXNpZ25pbmc']) {
            expect(everything).not.toContain(secret)
        }
    })
})
