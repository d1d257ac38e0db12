/** `npm start`: the whole job through the host emulator and the embedded receiver, and its friendly errors. */
import { spawnSync } from 'node:child_process'
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { parseCli, runStartCli, UsageError } from '../tools/host/cli'
import { sampleEvents } from '../tools/host/sample-events'
import { captureOutput } from './helpers/io'

let dir: string

beforeEach(() => {
    dir = mkdtempSync(join(tmpdir(), 'start-'))
})

afterEach(() => {
    rmSync(dir, { recursive: true, force: true })
})

async function start(args: string[], env: Record<string, string> = {}) {
    const { stdout, stderr, text } = captureOutput()
    const code = await runStartCli(['--data-dir', join(dir, 'rows'), ...args], env, { stdout, stderr })
    return { code, ...text }
}

function usageError(args: string[]): string {
    try {
        parseCli(args)
    } catch (error) {
        expect(error).toBeInstanceOf(UsageError)
        return (error as Error).message
    }
    throw new Error('expected a UsageError')
}

describe('npm start', () => {
    it('runs the sample events through the plugin on the Kafka path and prints the summary', async () => {
        const { code, stdout, stderr } = await start(['--count', '200'])
        expect(code).toBe(0)
        expect(stdout).toContain('Host era vm2024')
        expect(stdout).toMatch(/Kafka path: \d+ worker thread\(s\) × 10 tasks, processEvent before each onEvent/)
        expect(stdout).toMatch(/era\s+vm2024 \(kafka path\)/)
        expect(stdout).toMatch(/rows stored\s+200 \(0 duplicates\)/)
        expect(stdout).toMatch(/skipped \(setup failed\)\s+0\n/)
        // Batched, though the calls of a micro-batch arrive spread out on this path.
        expect(Number(/requests\s+(\d+)\n/.exec(stdout)?.[1])).toBeLessThanOrEqual(100)
        expect(stdout).toContain(join(dir, 'rows', 'rows.jsonl'))
        expect(stderr).toContain('[plugin] info: Sending events to http://127.0.0.1:')
    })

    it('runs as `npm start` runs it: the file as the entry point, with its exit code', () => {
        const cli = join(__dirname, '..', 'tools', 'host', 'cli.ts')
        const args = ['--require', 'tsx/cjs', cli, '--count', '20', '--quiet', '--data-dir', join(dir, 'entry')]
        const run = spawnSync(process.execPath, args, { encoding: 'utf8', timeout: 60_000 })
        expect(run.status).toBe(0)
        expect(run.stdout).toMatch(/rows stored\s+20 \(0 duplicates\)/)
        const bad = spawnSync(process.execPath, ['--require', 'tsx/cjs', cli, '--cuont', '5'], { encoding: 'utf8' })
        expect(bad.status).toBe(2)
        expect(bad.stderr).toContain('--count')
    })

    it('runs the direct path on request: one POST per micro-batch of 10', async () => {
        const { code, stdout } = await start(['--count', '200', '--path', 'direct', '--era', 'vm2024', '--quiet'])
        expect(code).toBe(0)
        expect(stdout).toMatch(/era\s+vm2024 \(direct path\)/)
        expect(stdout).toMatch(/requests\s+20\n/)
        expect(stdout).toMatch(/events per request\s+10\.0/)
    })

    it('--outage: in the 2021 era the outbox keeps what the webhook refused, and every event arrives once it is back', async () => {
        const args = ['--era', 'vm2021', '--outage', '3600', '--time-scale', '0.004', '--count', '200', '--quiet']
        const { code, stdout } = await start(args)
        expect(code).toBe(0)
        expect(stdout).toContain('Webhook down (503) for 3600 s')
        expect(stdout).toMatch(/rows stored\s+200 \(0 duplicates\)/)
        expect(stdout).toMatch(/handler\s+exportEvents \(the host's export path A; onEvent stands aside\)/)
        // The outbox, not the host's job queue, retried the batches.
        expect(stdout).toMatch(/retry jobs \(queued \/ ran \/ left\)\s+0 \/ 0 \/ 0\n/)
        expect(stdout).toMatch(/storage writes \/ deletes \/ reads\s+[1-9]\d* \/ [1-9]\d* \/ [1-9]/)
        expect(stdout).toMatch(/runEveryMinute \(runs \/ failed \/ debounced\)\s+[1-9]\d* \/ 0 \//)
    })

    it('--outage without an export path: onEvent keeps what it could not deliver, and every event arrives', async () => {
        const args = ['--era', 'vm2024', '--outage', '3600', '--time-scale', '0.004', '--count', '50', '--quiet']
        const { code, stdout } = await start(args)
        expect(code).toBe(0)
        expect(stdout).toMatch(/handler\s+onEvent/)
        expect(stdout).toMatch(/failed \(thrown to host\)\s+0\n/)
        expect(stdout).toMatch(/rows stored\s+50 \(0 duplicates\)/)
        expect(stdout).toMatch(/storage writes \/ deletes \/ reads\s+[1-9]\d* \/ [1-9]\d* \/ [1-9]/)
    })

    it(
        '--outage without scheduled tasks: the last events come after the outage, and a call drains the outbox',
        async () => {
            // 30 s of real outage: longer than any one call may retry, so only a later call can deliver.
            const args = ['--era', 'cdp2025', '--outage', '3000', '--time-scale', '0.01', '--count', '50', '--quiet']
            const { code, stdout } = await start(args)
            expect(code).toBe(0)
            expect(stdout).toContain(
                'No scheduled tasks in this era: the last 5 events are sent after the outage, as traffic goes on'
            )
            expect(stdout).toMatch(/events\s+50\n/)
            expect(stdout).toMatch(/rows stored\s+50 \(0 duplicates\)/)
        },
        // The plugin tries a webhook it knows to be down once a minute of real time, whatever the time scale.
        150_000
    )

    it('--outage needs the embedded receiver and a positive --time-scale', () => {
        expect(usageError(['--outage', '600', '--webhook-url', 'https://example.com/x'])).toContain(
            '--outage needs the embedded receiver'
        )
        expect(usageError(['--outage', 'ten'])).toContain('--outage: expected seconds ≥ 0, e.g. --outage 600')
        expect(usageError(['--time-scale', '0'])).toContain('--time-scale: expected a number > 0')
    })

    it('shows resilience under a fault preset in another era', async () => {
        const { code, stdout } = await start(['--era', 'cdp2025', '--faults', 'default', '--count', '1000', '--quiet'])
        expect(code).toBe(0)
        expect(stdout).toMatch(/delivered\s+1000/)
        expect(stdout).toMatch(/failed \(thrown to host\)\s+0/)
    })

    it.each([
        ['JSON Lines', (events: object[]) => events.map((e) => JSON.stringify(e)).join('\n') + '\n'],
        ['a JSON array', (events: object[]) => JSON.stringify(events)],
    ])('reads events from a file of %s', async (_format, render) => {
        const file = join(dir, 'events')
        writeFileSync(file, render([...sampleEvents(30)]))
        const { code, stdout } = await start(['--events', file, '--quiet'])
        expect(code).toBe(0)
        expect(stdout).toMatch(/events\s+30\n/)
        expect(stdout).toMatch(/rows stored\s+30 /)
    })

    it('exits non-zero when events fail, with the cause in the summary', async () => {
        const { code, stdout } = await start(['--faults', 'gone', '--count', '20', '--quiet'])
        expect(code).toBe(1)
        expect(stdout).toMatch(/failures by cause\s+Error: HTTP 404 ×20/)
    })

    it('prints the help', async () => {
        const { code, stdout } = await start(['--help'])
        expect(code).toBe(0)
        expect(stdout).toContain('--webhook-url URL')
        expect(stdout).toContain('--faults PRESET')
    })
})

describe('npm start errors', () => {
    it.each([
        [['--bogus'], "Unknown option '--bogus'"],
        [['--era', 'vm1999'], '--era: unknown era "vm1999"'],
        [['--faults', 'chaos'], '--faults: unknown preset "chaos"'],
        [['--count', '0'], '--count: expected a whole number of at least 1'],
        [['--count', '5', '--events', 'x.jsonl'], '--count and --events cannot be used together'],
        [['--webhook-url', 'https://example.com/x', '--faults', 'down'], '--faults needs the embedded receiver'],
        [['--path', 'pipe'], '--path: unknown path "pipe"'],
        [['--path', 'kafka', '--era', 'cdp2025'], 'cdp2025 has no classic Kafka path'],
        [['--workers', '0'], '--workers: expected a whole number of at least 1'],
        [['--setup-retry-scale', 'fast'], '--setup-retry-scale: expected a number'],
        [['--storage-faults', 'lots'], '--storage-faults: cannot read "lots"; use a rate (5%)'],
        [['--cache-faults', '5%,call:0'], '--cache-faults: cannot read "call:0"'],
    ])('%j is refused: %s', (args, message) => {
        expect(usageError(args)).toContain(message)
    })

    it('exits 2 on a bad flag, saying so on stderr', async () => {
        const { code, stderr } = await start(['--era', 'vm1999'])
        expect(code).toBe(2)
        expect(stderr).toMatch(/^error: --era: unknown era/)
    })

    it('explains an unreadable events file', async () => {
        const { code, stderr } = await start(['--events', join(dir, 'missing.jsonl')])
        expect(code).toBe(1)
        expect(stderr).toContain(`--events: cannot read ${join(dir, 'missing.jsonl')}: ENOENT`)
    })

    it('names the line of a malformed events file', async () => {
        const file = join(dir, 'bad.jsonl')
        writeFileSync(file, `${JSON.stringify([...sampleEvents(1)][0])}\n{oops\n`)
        const { code, stderr } = await start(['--events', file, '--quiet'])
        expect(code).toBe(1)
        expect(stderr).toContain(`--events: line 2 of ${file}: not valid JSON.`)
    })

    it('reports a plugin that fails to load, with PostHog’s text', async () => {
        const pluginDir = join(dir, 'broken')
        mkdirSync(pluginDir)
        writeFileSync(join(pluginDir, 'plugin.json'), JSON.stringify({ name: 'broken', main: 'index.ts' }))
        writeFileSync(join(pluginDir, 'index.ts'), "import { x } from './x'\nexport const onEvent = () => x\n")
        const { code, stderr } = await start(['--plugin-dir', pluginDir])
        expect(code).toBe(1)
        expect(stderr).toContain(
            "error: the plugin failed to load: Cannot import './x'! This package is not provided by PostHog in plugins."
        )
    })

    it('shows a failed setupPlugin loudly: the events the host skipped, and that PostHog would show nothing', async () => {
        const { code, stdout, stderr } = await start([
            '--webhook-url',
            'http://example.com/hooks/SECRET_T0KEN_1',
            '--count',
            '50',
            '--era',
            'vm2021',
        ])
        expect(code).toBe(1)
        expect(stdout).toMatch(/skipped \(setup failed\)\s+50\n/)
        expect(stderr).toContain(
            'SETUP FAILED: setupPlugin threw: ConfigError: Invalid config "webhookUrl": it uses http'
        )
        expect(stderr).toContain('50 of 50 events were SKIPPED: the host never called onEvent for them.')
        expect(stderr).toContain('PostHog would show nothing for them')
        expect(stderr).toContain('retries setup 10 times, waiting 3 s, 6 s, … (about 26 minutes in all)')
        expect(stderr).toMatch(/Setup now: retrying: attempt 1 of 10 failed, next in 3 s/)
        expect(stderr + stdout).not.toContain('SECRET_T0KEN_1')
    })

    it('says when the era disables the plugin at once instead', async () => {
        const { code, stderr } = await start(['--webhook-url', 'http://example.com/hooks/x', '--count', '5', '--quiet'])
        expect(code).toBe(1)
        expect(stderr).toContain('5 of 5 events were SKIPPED')
        expect(stderr).toMatch(/Setup now: disabled after 1 attempt\(s\)/)
    })
})
