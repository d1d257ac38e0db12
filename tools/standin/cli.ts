/**
 * Runs the PostHog stand-in as its own process:
 *
 *     STANDIN_API_KEY=phx_local npx tsx standin/cli.ts --project-id 1 [--port 8010] [--seed 1000000] [--data-dir d]
 *
 * Prints one JSON line when ready, `{"url": …, "projectId": …}`, then serves until SIGINT/SIGTERM. The key is read
 * from the environment (STANDIN_API_KEY, else POSTHOG_API_KEY) so it never shows in the process list.
 * STANDIN_CONTROL_TOKEN enables the `/_standin/*` control API that spawnPostHogStandIn uses.
 */
import { StandInLimits, startPostHogStandIn } from './server'

export interface StandInCliArgs {
    projectId: number
    port: number
    host: string
    dataDir?: string
    seed?: number
    limits?: Partial<StandInLimits>
}

const USAGE = 'Usage: STANDIN_API_KEY=phx_… tsx standin/cli.ts --project-id N [--port N] [--seed N] [--data-dir DIR]'

/** Parses the flags; throws naming the flag on a bad value. */
export function parseStandInArgs(argv: string[]): StandInCliArgs {
    const args: StandInCliArgs = { projectId: 1, port: 0, host: '127.0.0.1' }
    for (let i = 0; i < argv.length; i += 2) {
        const flag = argv[i]
        const value = argv[i + 1]
        if (value === undefined) {
            throw new Error(`${flag} needs a value\n${USAGE}`)
        }
        const whole = (): number => {
            const n = Number(value)
            if (!Number.isSafeInteger(n) || n < 0) {
                throw new Error(`${flag} expects a whole number, got "${value}"`)
            }
            return n
        }
        switch (flag) {
            case '--project-id':
                args.projectId = whole()
                break
            case '--port':
                args.port = whole()
                break
            case '--host':
                args.host = value
                break
            case '--data-dir':
                args.dataDir = value
                break
            case '--seed':
                args.seed = whole()
                break
            case '--limits':
                args.limits = JSON.parse(value) as Partial<StandInLimits>
                break
            default:
                throw new Error(`unknown flag ${String(flag)}\n${USAGE}`)
        }
    }
    return args
}

export async function runStandInCli(argv: string[], env: NodeJS.ProcessEnv): Promise<void> {
    const args = parseStandInArgs(argv)
    const apiKey = env.STANDIN_API_KEY ?? env.POSTHOG_API_KEY
    if (!apiKey) {
        throw new Error(`set STANDIN_API_KEY (or POSTHOG_API_KEY) to the key the stand-in accepts\n${USAGE}`)
    }
    const standIn = await startPostHogStandIn({
        apiKey,
        projectId: args.projectId,
        port: args.port,
        host: args.host,
        dataDir: args.dataDir,
        limits: args.limits,
        controlToken: env.STANDIN_CONTROL_TOKEN,
    })
    if (args.seed) {
        await standIn.seed({ count: args.seed })
    }
    process.stdout.write(`${JSON.stringify({ url: standIn.url, projectId: standIn.projectId })}\n`)
    const stop = () => {
        void standIn.close().then(() => process.exit(0))
    }
    process.once('SIGINT', stop)
    process.once('SIGTERM', stop)
    // Started by spawnPostHogStandIn: never outlive the parent (a crashed test run must not leave chdb running).
    const parent = Number(env.STANDIN_PARENT_PID)
    if (parent > 0) {
        setInterval(() => {
            try {
                process.kill(parent, 0)
            } catch {
                stop()
            }
        }, 1000).unref()
    }
}

if (require.main === module) {
    runStandInCli(process.argv.slice(2), process.env).catch((error: unknown) => {
        process.stderr.write(`error: ${error instanceof Error ? error.message : String(error)}\n`)
        process.exit(1)
    })
}
