/**
 * The stand-in in a child process, behind the same interface as the in-process one. Use it where this process's
 * memory is being measured (the bench, the local job): chdb's engine and its data then live in the child.
 *
 *     const posthog = await spawnPostHogStandIn({ apiKey: 'phx_local', projectId: 1 })
 *     await posthog.seed({ count: 1_000_000 })
 *     …
 *     await posthog.close()   // stops the child
 */
import { ChildProcess, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { join } from 'node:path'

import type { SeedOptions, StandInEvent, StandInOverride, StandInPerson, StoredEvent } from './events'
import type {
    LateOptions,
    PostHogStandInClient,
    StandInFaults,
    StandInLimits,
    StandInOptions,
    StandInStats,
} from './server'

export interface SpawnOptions extends Pick<StandInOptions, 'apiKey' | 'projectId' | 'port' | 'host' | 'dataDir'> {
    limits?: Partial<StandInLimits>
    /** How long to wait for the child to be ready. Default 30 s. */
    startTimeoutMs?: number
}

export interface SpawnedPostHogStandIn extends PostHogStandInClient {
    pid: number
}

const CLI = join(__dirname, 'cli.ts')

function waitForReady(child: ChildProcess, timeoutMs: number): Promise<{ url: string; projectId: number }> {
    return new Promise((resolve, reject) => {
        let out = ''
        let err = ''
        const timer = setTimeout(() => fail(new Error(`the stand-in did not start within ${timeoutMs} ms`)), timeoutMs)
        const fail = (error: Error) => {
            clearTimeout(timer)
            child.kill('SIGKILL')
            reject(error)
        }
        child.stderr?.on('data', (chunk: Buffer) => {
            err += chunk.toString()
        })
        child.stdout?.on('data', (chunk: Buffer) => {
            out += chunk.toString()
            const newline = out.indexOf('\n')
            if (newline >= 0) {
                clearTimeout(timer)
                resolve(JSON.parse(out.slice(0, newline)) as { url: string; projectId: number })
            }
        })
        child.once('exit', (code) => fail(new Error(`the stand-in exited with ${String(code)}: ${err.trim()}`)))
    })
}

/** The stand-in's CLI as a child process, with the API key and the control token in its environment. */
function spawnCli(options: SpawnOptions, controlToken: string): ChildProcess {
    // tsx runs the TypeScript CLI without a build step, as bin/patterns-connector.js does.
    const args = ['--require', require.resolve('tsx/cjs'), CLI, '--project-id', String(options.projectId)]
    args.push('--port', String(options.port ?? 0), '--host', options.host ?? '127.0.0.1')
    if (options.dataDir) {
        args.push('--data-dir', options.dataDir)
    }
    if (options.limits) {
        args.push('--limits', JSON.stringify(options.limits))
    }
    return spawn(process.execPath, args, {
        env: {
            ...process.env,
            STANDIN_API_KEY: options.apiKey,
            STANDIN_CONTROL_TOKEN: controlToken,
            STANDIN_PARENT_PID: String(process.pid),
        },
        stdio: ['ignore', 'pipe', 'pipe'],
    })
}

/** One call to the stand-in's control API (POST /_standin/PATH with the control token); its JSON answer. */
function controlClient(url: string, controlToken: string) {
    return async <T>(path: string, body: unknown = {}): Promise<T> => {
        const response = await fetch(`${url}/_standin/${path}`, {
            method: 'POST',
            headers: { 'Content-Type': 'application/json', 'X-Standin-Control': controlToken },
            body: JSON.stringify(body),
        })
        const text = await response.text()
        if (!response.ok) {
            throw new Error(`stand-in control ${path} failed with ${response.status}: ${text}`)
        }
        return JSON.parse(text) as T
    }
}

/** Starts `standin/cli.ts` in a child process and returns a client for it. */
export async function spawnPostHogStandIn(options: SpawnOptions): Promise<SpawnedPostHogStandIn> {
    const controlToken = randomBytes(16).toString('hex')
    const child = spawnCli(options, controlToken)
    const ready = await waitForReady(child, options.startTimeoutMs ?? 30_000)
    const control = controlClient(ready.url, controlToken)
    child.removeAllListeners('exit')
    return {
        url: ready.url,
        projectId: ready.projectId,
        pid: child.pid as number,
        insertEvents: (events: StandInEvent[], opts: { createdAt?: string | Date } = {}) =>
            control<StoredEvent[]>('events', { events, ...opts }),
        insertLateEvents: (count: number, opts: LateOptions = {}) => control<StoredEvent[]>('late', { count, ...opts }),
        insertPersons: async (persons: StandInPerson[], overrides: StandInOverride[] = []) => {
            await control('persons', { persons, overrides })
        },
        seed: async (opts: SeedOptions) => {
            await control('seed', opts)
        },
        count: async () => (await control<{ count: number }>('count')).count,
        setFaults: async (faults: StandInFaults) => {
            await control('faults', faults)
        },
        setLimits: async (limits: Partial<StandInLimits>) => {
            await control('limits', limits)
        },
        stats: () => control<StandInStats>('stats'),
        close: async () => {
            if (child.exitCode !== null) {
                return
            }
            const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
            child.kill('SIGTERM')
            await exited
        },
    }
}
