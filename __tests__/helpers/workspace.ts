import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Readable } from 'node:stream'

import { runReplayCli } from '../../replay/cli'
import { captureOutput } from './io'
import { TestServer } from './server'

/**
 * Per test: a new temporary folder (handed to `use` before the test) and the servers the test starts, all closed
 * and removed after it.
 */
export function perTestFolder(prefix: string, use: (dir: string) => void) {
    let dir = ''
    const servers: TestServer[] = []
    beforeEach(() => {
        dir = mkdtempSync(join(tmpdir(), prefix))
        use(dir)
    })
    afterEach(async () => {
        await Promise.all(servers.splice(0).map((server) => server.close()))
        rmSync(dir, { recursive: true, force: true })
    })
    return {
        /** Closes the server after the test. */
        track: async (starting: Promise<TestServer>): Promise<TestServer> => {
            const server = await starting
            servers.push(server)
            return server
        },
    }
}

/** `patterns-connector replay ARGS` in this process, with nothing on standard input; its exit code and output. */
export async function runReplay(args: string[], env: Record<string, string> = {}) {
    const { stdout, stderr, text } = captureOutput()
    const code = await runReplayCli(args, env, { stdout, stderr, stdin: Readable.from([]) })
    return { code, ...text }
}
