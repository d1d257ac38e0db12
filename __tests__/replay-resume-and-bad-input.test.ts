/**
 * Replay against hostile inputs and receivers: byte-exact Unicode across read boundaries, BOMs,
 * compressed and odd inputs, checkpoints bound to their input, the --retry-for budget, and honest retry counts.
 * Every test goes through a real HTTP server on 127.0.0.1.
 */
import { spawn } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'

import { advanced, isHandled } from '../replay/checkpoint'
import { nodeEnv, parseReplayArgs, runReplayCli } from '../replay/cli'
import { detectFormat, SNIFF_BYTES } from '../replay/input'
import { readCheckpoint, replay } from '../replay/replay'
import { readEventsFile } from '../tools/host/cli'
import { testEnv } from './helpers/env'
import { captureOutput } from './helpers/io'
import { startServer, TestServer } from './helpers/server'

const BIN = join(__dirname, '..', 'bin', 'patterns-connector.js')
/** The size of each read from a file (Node's default highWaterMark). */
const READ_BYTES = 64 * 1024

let dir: string
let server: TestServer | undefined

beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'replay-bad-input-'))
})

afterEach(async () => {
    await server?.close()
    server = undefined
    rmSync(dir, { recursive: true, force: true })
})

async function accepting(): Promise<TestServer> {
    server = await startServer(() => ({ status: 200 }))
    return server
}

/** Events whose text is mostly 2-, 3- and 4-byte UTF-8 characters, one JSON line each. */
function unicodeLines(count: number): string[] {
    const alphabet = ['é', 'ß', '中', '文', '😀', '🚀', 'ж', '∑', 'ğ', '한']
    return Array.from({ length: count }, (_, i) =>
        JSON.stringify({
            uuid: `0190a1b2-0000-7000-8000-${String(i).padStart(12, '0')}`,
            event: '$pageview',
            distinct_id: `ユーザー-${i}`,
            timestamp: '2026-11-27T03:00:00.000Z',
            properties: {
                text: Array.from({ length: 200 + (i % 97) }, (_, j) => alphabet[(i + j) % alphabet.length]).join(''),
            },
        })
    )
}

/**
 * The lines, with the first one padded so that every multiple of `every` bytes and more than a third of the
 * multiples of `some` bytes fall inside a multi-byte character: reads of either size then end mid-character.
 */
function padToSplit(lines: string[], every: number, some: number): Buffer {
    for (let pad = 0; pad < 5_000; pad++) {
        const first = JSON.parse(lines[0] as string) as { properties: Record<string, unknown> }
        first.properties.pad = 'p'.repeat(pad)
        const bytes = Buffer.from([JSON.stringify(first), ...lines.slice(1)].join('\n') + '\n')
        const multiples = (size: number) =>
            Array.from({ length: Math.floor(bytes.length / size) }, (_, k) => (k + 1) * size)
        const all = multiples(every)
        if (
            splitCharacters(bytes, all) === all.length &&
            splitCharacters(bytes, multiples(some)) > multiples(some).length / 3
        ) {
            return bytes
        }
    }
    throw new Error('no padding splits the reads')
}

/** How many of the given offsets fall inside a multi-byte character (on a continuation byte). */
function splitCharacters(bytes: Buffer, offsets: number[]): number {
    return offsets.filter((offset) => ((bytes[offset] ?? 0) & 0xc0) === 0x80).length
}

/** The request bodies the plugin would send for these lines, in batches of `size`. */
function expectedBodies(lines: string[], size: number): string[] {
    const bodies: string[] = []
    for (let i = 0; i < lines.length; i += size) {
        bodies.push(`[${lines.slice(i, i + size).join(',')}]`)
    }
    return bodies
}

/** The bodies the server got are byte for byte the expected ones (no U+FFFD where a character was split). */
function expectSameBytes(rx: TestServer, bodies: string[]): void {
    const got = rx.received.map((r) => r.body)
    expect(got.join('').split('\uFFFD').length - 1).toBe(0)
    expect(got).toHaveLength(bodies.length)
    expect(Buffer.from(got.join('\n')).equals(Buffer.from(bodies.join('\n')))).toBe(true)
}

function writeInput(name: string, data: string | Buffer): string {
    const path = join(dir, name)
    writeFileSync(path, data)
    return path
}

/** A text cut into pieces of `size` bytes, as a pipe delivers it. */
function pieces(text: string, size: number): Buffer[] {
    const bytes = Buffer.from(text)
    return Array.from({ length: Math.ceil(bytes.length / size) }, (_, i) => bytes.subarray(i * size, (i + 1) * size))
}

async function cli(args: string[], env: Record<string, string> = {}, stdin: string | Buffer | Buffer[] = '') {
    const { stdout, stderr, text } = captureOutput()
    const chunks = Array.isArray(stdin) ? stdin : [stdin]
    const code = await runReplayCli(args, env, { stdout, stderr, stdin: Readable.from(chunks) })
    return { code, ...text }
}

/** The replay CLI as a child process, fed `input` on standard input in pieces of `piece` bytes. */
async function spawnReplay(args: string[], env: Record<string, string>, input: Buffer, piece: number) {
    const child = spawn(process.execPath, [BIN, 'replay', ...args], {
        env: { ...process.env, ...env },
        stdio: 'pipe',
    })
    let output = ''
    child.stdout.on('data', (c: Buffer) => (output += c.toString()))
    child.stderr.on('data', (c: Buffer) => (output += c.toString()))
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
    for (let offset = 0; offset < input.length; offset += piece) {
        await new Promise<void>((resolve, reject) =>
            child.stdin.write(input.subarray(offset, offset + piece), (error) => (error ? reject(error) : resolve()))
        )
    }
    child.stdin.end()
    return { code: await exited, output }
}

describe('byte-exact input', () => {
    it('delivers every multi-byte character split across file reads byte for byte', async () => {
        const rx = await accepting()
        const lines = unicodeLines(3_000)
        // Reads of 64 KB (Node's default) and of 1 MB both end inside characters.
        const bytes = padToSplit(lines, 1 << 20, READ_BYTES)
        lines[0] = bytes.subarray(0, bytes.indexOf(10)).toString()
        const path = writeInput('in.jsonl', bytes)
        const { code, stdout } = await cli([
            path,
            '--webhook-url',
            rx.url,
            '--batch-events',
            '100',
            '--concurrency',
            '1',
        ])
        expect(code).toBe(0)
        expect(stdout).toMatch(/ {2}unreadable +0\n/)
        expectSameBytes(rx, expectedBodies(lines, 100))
    })

    it('delivers multi-byte characters split across standard input reads byte for byte (spawned CLI)', async () => {
        const rx = await accepting()
        const lines = unicodeLines(1_500)
        const bytes = Buffer.from(lines.join('\n'))
        // Pieces of an odd size end inside characters again and again.
        const piece = 4_093
        const ends = Array.from({ length: Math.floor(bytes.length / piece) }, (_, k) => (k + 1) * piece)
        expect(splitCharacters(bytes, ends)).toBeGreaterThan(50)
        const run = await spawnReplay(
            ['-', '--batch-events', '100', '--concurrency', '1'],
            { PATTERNS_WEBHOOK_URL: rx.url },
            bytes,
            piece
        )
        expect(run.output).toMatch(/ {2}unreadable +0\n/)
        expect(run.code).toBe(0)
        expectSameBytes(rx, expectedBodies(lines, 100))
    }, 30_000)

    it('drops a leading UTF-8 byte order mark instead of calling the first event invalid', async () => {
        const rx = await accepting()
        const lines = unicodeLines(3)
        const path = writeInput(
            'bom.jsonl',
            Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(lines.join('\n'))])
        )
        const { code } = await cli([path, '--webhook-url', rx.url])
        expect(code).toBe(0)
        expect(rx.received.map((r) => r.body)).toEqual([`[${lines.join(',')}]`])
    })

    it('drops a BOM before a JSON array too', async () => {
        const rx = await accepting()
        const lines = unicodeLines(2)
        const path = writeInput('bom.json', `\uFEFF[${lines.join(',\n')}]`)
        const { code, stdout } = await cli([path, '--webhook-url', rx.url])
        expect(code).toBe(0)
        expect(stdout).toContain('input format              json')
        expect(rx.accepted.map((e) => e.uuid)).toEqual(lines.map((l) => (JSON.parse(l) as { uuid: string }).uuid))
    })

    it('npm start --events reads split characters whole, with the same reader', async () => {
        const lines = unicodeLines(2_000)
        const path = writeInput('events.jsonl', lines.join('\n'))
        const read: unknown[] = []
        for await (const event of readEventsFile(path)) {
            read.push(event)
        }
        expect(read).toEqual(lines.map((l) => JSON.parse(l) as unknown))
    })
})

describe('checkpoints bound to their input', () => {
    const lines = unicodeLines(300)

    async function firstRun(checkpoint: string) {
        const rx = await accepting()
        const path = writeInput('a.jsonl', lines.join('\n'))
        const run = await cli([path, '--webhook-url', rx.url, '--checkpoint', checkpoint])
        expect(run.code).toBe(0)
        return { rx, path }
    }

    it('refuses a checkpoint from another input, naming the file and the fix, and sends nothing', async () => {
        const checkpoint = join(dir, 'ck.json')
        const { rx } = await firstRun(checkpoint)
        const requests = rx.received.length
        const other = writeInput('b.jsonl', unicodeLines(400).reverse().join('\n'))
        const { code, stderr } = await cli([other, '--webhook-url', rx.url, '--checkpoint', checkpoint])
        expect(code).toBe(2)
        expect(stderr).toContain(`--checkpoint ${checkpoint} belongs to another input`)
        expect(stderr).toContain('use a new --checkpoint file')
        expect(rx.received).toHaveLength(requests)
    })

    it('resumes the same input that has grown since, and sends only the new records', async () => {
        const checkpoint = join(dir, 'ck.json')
        const { rx, path } = await firstRun(checkpoint)
        const more = unicodeLines(320).slice(300)
        writeFileSync(path, [...lines, ...more].join('\n'))
        const { code, stdout } = await cli([path, '--webhook-url', rx.url, '--checkpoint', checkpoint])
        expect(code).toBe(0)
        expect(stdout).toContain('skipped (checkpoint)      300')
        expect(rx.accepted).toHaveLength(320)
    })

    it.each([
        ['other filters', ['--excluded-events', '$pageview'], 'was written with another --format, --allowed-events'],
        ['another format', ['--format', 'json'], 'was written with another --format, --allowed-events'],
        ['another webhook', ['--webhook-url', 'http://127.0.0.1:9/other/hook'], 'was written for another webhook URL'],
    ])('refuses to resume with %s', async (_name, extra, message) => {
        const checkpoint = join(dir, 'ck.json')
        const { rx, path } = await firstRun(checkpoint)
        const requests = rx.received.length
        const { code, stderr } = await cli([path, '--webhook-url', rx.url, '--checkpoint', checkpoint, ...extra])
        expect(code).toBe(2)
        expect(rx.received).toHaveLength(requests)
        expect(stderr).toContain(message)
        expect(stderr).not.toContain('/other/hook')
    })

    it.each([
        ['damaged', '{"version":2,"ne', 'is damaged (not valid JSON)'],
        ['null', 'null', 'is not a checkpoint written by this version of replay'],
        ['an older version', '{"version":1,"next":5000,"done":[]}', 'is not a checkpoint written by this version'],
    ])('stops with exit code 2 on a %s checkpoint, naming the file and the fix', async (_name, content, message) => {
        const rx = await accepting()
        const path = writeInput('a.jsonl', lines.join('\n'))
        const checkpoint = writeInput('ck.json', content)
        const { code, stderr } = await cli([path, '--webhook-url', rx.url, '--checkpoint', checkpoint])
        expect(code).toBe(2)
        expect(stderr).toContain(`--checkpoint ${checkpoint} ${message}`)
        expect(stderr).toContain('remove it to start over')
        expect(rx.received).toHaveLength(0)
    })

    it('stops with exit code 2 on an unreadable checkpoint', async () => {
        const rx = await accepting()
        const path = writeInput('a.jsonl', lines.join('\n'))
        const checkpoint = join(dir, 'ck-dir')
        mkdirSync(checkpoint)
        const { code, stderr } = await cli([path, '--webhook-url', rx.url, '--checkpoint', checkpoint])
        expect(code).toBe(2)
        expect(stderr).toContain(`--checkpoint ${checkpoint}: cannot read it (EISDIR)`)
        expect(rx.received).toHaveLength(0)
    })

    it('keeps batches acknowledged out of order, and folds them in once the gap before them is acknowledged', () => {
        const saved = { version: 2, input: { bytes: 0, sha256: '' }, options: '', destination: '', next: 0, done: [] }
        // Batches 0-9, 10-19, 20-29: the third is acknowledged first, while the first two are out.
        const ahead = advanced(saved, -1, [{ after: 19, last: 29 }])
        expect(ahead).toMatchObject({ next: 0, done: [[20, 30]] })
        expect([isHandled(ahead, 5), isHandled(ahead, 25), isHandled(ahead, 30)]).toEqual([false, true, false])
        const folded = advanced(ahead, 19, [])
        expect(folded).toMatchObject({ next: 30, done: [] })
    })

    it('writes the checkpoint by rename, leaving no temporary file, and never the webhook URL', async () => {
        const checkpoint = join(dir, 'ck.json')
        const { rx } = await firstRun(checkpoint)
        expect(existsSync(`${checkpoint}.tmp`)).toBe(false)
        expect(readCheckpoint(checkpoint)?.next).toBe(300)
        const text = readFileSync(checkpoint, 'utf8')
        expect(text).not.toContain(new URL(rx.url).pathname)
    })
})

describe('odd inputs and flags', () => {
    it('reads a first JSON Lines event over 64 KB that contains "results":[ as an event, not as API pages', async () => {
        const rx = await accepting()
        const big = JSON.stringify({
            uuid: 'big-1',
            event: 'report',
            properties: { nested: { results: [1, 2, 3] }, pad: 'x'.repeat(2 * SNIFF_BYTES) },
        })
        const lines = [big, ...unicodeLines(3)]
        expect(big.length).toBeGreaterThan(SNIFF_BYTES)
        expect(detectFormat(big.slice(0, SNIFF_BYTES))).toBe('jsonl')
        // From standard input, in pipe-sized pieces: the first read holds only the start of the first line.
        const { code, stdout } = await cli(['-', '--webhook-url', rx.url], {}, pieces(lines.join('\n'), 16_384))
        expect(code).toBe(0)
        expect(stdout).toContain('input format              jsonl')
        expect(rx.received.map((r) => r.body)).toEqual([`[${lines.join(',')}]`])
    })

    it('still reads a pretty-printed API page as pages', () => {
        expect(detectFormat('{\n  "next": null,\n  "results": [\n')).toBe('pages')
        expect(detectFormat('{"results":[{"event":"a"}]}\n')).toBe('pages')
    })

    it('exits 2 with a clear message for a missing file and for a directory', async () => {
        const missing = await cli([join(dir, 'nope.jsonl'), '--dry-run'])
        expect(missing.code).toBe(2)
        expect(missing.stderr).toContain(`cannot read ${join(dir, 'nope.jsonl')}: ENOENT`)
        const directory = await cli([dir, '--dry-run'])
        expect(directory.code).toBe(2)
        expect(directory.stderr).toContain(`cannot read ${dir}: it is a directory`)
    })

    it('reads a gzip file as it is, and says to pipe gzip on standard input through gunzip', async () => {
        const rx = await accepting()
        const path = writeInput('events.jsonl.gz', gzipSync(unicodeLines(500).join('\n')))
        const deadLetter = join(dir, 'dead.jsonl')
        const { code } = await cli([path, '--webhook-url', rx.url, '--dead-letter', deadLetter])
        expect(code).toBe(0)
        expect(rx.accepted).toHaveLength(500)
        expect(existsSync(deadLetter)).toBe(false)
        const piped = await cli(['-', '--webhook-url', rx.url], {}, gzipSync('{"event":"a"}\n'))
        expect(piped.code).toBe(2)
        expect(piped.stderr).toContain('this input is gzip: pipe it through gunzip (gunzip -c FILE |')
    })

    it.each([
        ['concurrency', 'a whole number of at least 1, got'],
        ['batch-events', 'a whole number of at least 1, got'],
        ['batch-bytes', 'a whole number of at least 1, got'],
        ['timeout', 'a duration such as 500ms, 30s, 2m, 1h or 7d (a bare number is seconds); got'],
        ['retry-for', 'a duration such as 500ms, 30s, 2m, 1h or 7d (a bare number is seconds); got'],
    ])('names --%s when its value is negative, instead of Node\'s "argument is ambiguous"', async (flag, expected) => {
        for (const value of ['-1', '-0.5']) {
            const { code, stderr } = await cli(['in.jsonl', '--dry-run', `--${flag}`, value])
            expect(code).toBe(2)
            expect(stderr).toContain(`--${flag}: expected ${expected} "${value}"`)
            expect(stderr).not.toContain('ambiguous')
        }
    })

    it('names the flag whose value is missing', async () => {
        const { code, stderr } = await cli(['in.jsonl', '--dead-letter', '--dry-run'])
        expect(code).toBe(2)
        expect(stderr).toContain('--dead-letter: its value starts with "-"; write --dead-letter=VALUE')
    })

    it('counts retries as attempts beyond the first, not as failed attempts', async () => {
        server = await startServer(() => ({ status: 503 }))
        const path = writeInput('in.jsonl', unicodeLines(5).join('\n'))
        const { code, stdout } = await cli([path, '--webhook-url', server.url, '--retry-for', '2'])
        expect(code).toBe(1)
        const requests = server.received.length
        expect(requests).toBeGreaterThan(1)
        expect(stdout).toContain(`requests                  ${requests}\n`)
        expect(stdout).toContain(`retries                   ${requests - 1}\n`)
    })
})

describe('--retry-for is the per-batch budget', () => {
    it('sets the deadline, the Retry-After cap and an attempt limit that never binds from --retry-for', () => {
        const parsed = parseReplayArgs(['in.jsonl', '--retry-for', '600', '--dry-run'], {})
        expect(parsed?.config.deadlineMs).toBe(600_000)
        expect(parsed?.config.retryAfterCapMs).toBe(600_000)
        expect(parsed?.config.maxAttempts).toBeGreaterThanOrEqual(1_000_000)
    })

    it('keeps retrying an always-503 webhook until --retry-for runs out, past 12 attempts', async () => {
        server = await startServer(() => ({ status: 503 }))
        const parsed = parseReplayArgs(['-', '--webhook-url', server.url, '--retry-for', '6'], {})
        // Small backoff delays, so many attempts fit in the budget.
        const env = { ...nodeEnv(), random: () => 0.02 }
        const started = Date.now()
        const report = await replay({ ...parsed!, input: Readable.from([unicodeLines(3).join('\n')]), env })
        const elapsed = Date.now() - started
        expect(report.stopped).toContain('the webhook kept failing')
        expect(server.received.length).toBeGreaterThan(12)
        // The budget is 6 s; the last attempt is not started with less than a second left.
        expect(elapsed).toBeGreaterThanOrEqual(4_500)
        expect(report.retries).toBe(server.received.length - 1)
    }, 30_000)

    it('retries an always-503 webhook for the whole --retry-for 600, not 12 attempts (sleeps captured)', async () => {
        server = await startServer(() => ({ status: 503 }))
        const parsed = parseReplayArgs(['-', '--webhook-url', server.url, '--retry-for', '600'], {})
        const env = testEnv({ fakeClock: true })
        const report = await replay({ ...parsed!, input: Readable.from([unicodeLines(3).join('\n')]), env })
        expect(report.stopped).toContain('the webhook kept failing')
        expect(server.received.length).toBeGreaterThan(100)
        const waited = env.delays.reduce((sum, ms) => sum + ms, 0)
        expect(waited).toBeGreaterThan(590_000)
        expect(waited).toBeLessThanOrEqual(600_000)
    })

    it('waits out "429 Retry-After: 30" within --retry-for 600, then delivers (sleeps captured)', async () => {
        server = await startServer((_request, index) =>
            index === 0 ? { status: 429, headers: { 'Retry-After': '30' } } : { status: 200 }
        )
        const parsed = parseReplayArgs(['-', '--webhook-url', server.url, '--retry-for', '600'], {})
        const env = testEnv({ fakeClock: true })
        const report = await replay({ ...parsed!, input: Readable.from([unicodeLines(3).join('\n')]), env })
        expect(report.stopped).toBeNull()
        expect(env.delays).toEqual([30_000])
        expect(server.accepted).toHaveLength(3)
    })

    it('waits out "429 Retry-After: 3" within --retry-for 10, then delivers', async () => {
        server = await startServer((_request, index) =>
            index === 0 ? { status: 429, headers: { 'Retry-After': '3' } } : { status: 200 }
        )
        const path = writeInput('in.jsonl', unicodeLines(4).join('\n'))
        const started = Date.now()
        const { code, stdout } = await cli([path, '--webhook-url', server.url, '--retry-for', '10'])
        expect(code).toBe(0)
        expect(Date.now() - started).toBeGreaterThanOrEqual(2_900)
        expect(server.received).toHaveLength(2)
        expect(server.accepted).toHaveLength(4)
        expect(stdout).toContain('retries                   1\n')
    }, 30_000)
})
