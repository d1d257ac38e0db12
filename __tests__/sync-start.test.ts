/** `npm start -- --source posthog`: the stand-in, sync and the receiver on one machine, through tools/host/cli.ts. */
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { runStartCli } from '../tools/host/cli'
import { captureOutput } from './helpers/io'

let dir: string
beforeEach(() => (dir = mkdtempSync(join(tmpdir(), 'sync-start-'))))
afterEach(() => rmSync(dir, { recursive: true, force: true }))

describe('npm start -- --source posthog', () => {
    it('seeds the stand-in, syncs every event (late ones too) through 429s and 500s, and prints both summaries', async () => {
        const { stdout, stderr, text } = captureOutput()
        const code = await runStartCli(
            [
                '--source',
                'posthog',
                '--count',
                '800',
                '--page-size',
                '100',
                '--posthog-faults',
                'default',
                '--data-dir',
                dir,
            ],
            {},
            { stdout, stderr }
        )
        expect(code).toBe(0)
        expect(text.stdout).toMatch(/project 1, 808 events, faults: default/)
        expect(text.stdout).toMatch(/delivered\s+808/)
        expect(text.stdout).toMatch(/every event arrived\s+yes/)
        expect(text.stdout).toMatch(/PostHog requests\s+(9|1\d)\b/)
        // The stand-in's key is a secret like a real one: never printed.
        expect(text.stdout + text.stderr).not.toMatch(/phx_/)
    })

    it('answers a bad option with exit 2 and the fix', async () => {
        const { stdout, stderr, text } = captureOutput()
        const code = await runStartCli(['--source', 'posthog', '--count', 'lots'], {}, { stdout, stderr })
        expect(code).toBe(2)
        expect(text.stderr).toContain('--count: expected a whole number of at least 1, got "lots"')
    })
})
