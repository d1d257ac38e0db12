/**
 * The image's HEALTHCHECK script (deploy/docker/healthcheck.js), run as the image runs it, against real processes:
 * a stand-in CLI process (a script named patterns-connector that serves /healthz with a chosen status) and the
 * script itself, each a node process, over loopback HTTP. It probes the port the CLI was given, finds a port-0 one
 * among the CLI's sockets, and passes a command run without --metrics-port.
 */
import { ChildProcess, spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const HEALTHCHECK = join(__dirname, '..', 'deploy', 'docker', 'healthcheck.js')

/** Listens where its flags say (unless NO_LISTEN) and answers /healthz with HEALTH_STATUS; says when it is ready. */
const FAKE_CLI = `
const http = require('node:http')
const args = process.argv.slice(2)
const at = args.findIndex((a) => a === '--metrics-port' || a.startsWith('--metrics-port='))
if (at < 0 || process.env.NO_LISTEN) { setInterval(() => {}, 1000); process.stdout.write('listening\\n') } else {
    const port = Number(args[at].includes('=') ? args[at].split('=')[1] : args[at + 1])
    http.createServer((req, res) => res.writeHead(req.url === '/healthz' ? Number(process.env.HEALTH_STATUS) : 404).end())
        .listen(port, '127.0.0.1', () => process.stdout.write('listening\\n'))
}
`

let dir: string
const children: ChildProcess[] = []

beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), 'healthcheck-'))
    writeFileSync(join(dir, 'patterns-connector'), FAKE_CLI)
})

afterAll(() => {
    for (const child of children) {
        child.kill('SIGKILL')
    }
    rmSync(dir, { recursive: true, force: true })
})

function freePort(): Promise<number> {
    return new Promise((resolve) => {
        const server = createServer().listen(0, '127.0.0.1', () => {
            const { port } = server.address() as { port: number }
            server.close(() => resolve(port))
        })
    })
}

/** Starts the fake CLI with these arguments; resolves once it listens. */
function startCli(args: string[], status = 200, listen = true): Promise<ChildProcess> {
    const child = spawn(process.execPath, [join(dir, 'patterns-connector'), ...args], {
        env: { PATH: process.env.PATH ?? '', HEALTH_STATUS: String(status), ...(listen ? {} : { NO_LISTEN: '1' }) },
        stdio: ['ignore', 'pipe', 'inherit'],
    })
    children.push(child)
    return new Promise((resolve, reject) => {
        child.stdout?.on('data', (chunk: Buffer) => chunk.toString().includes('listening') && resolve(child))
        child.on('exit', (code) => reject(new Error(`the fake CLI exited ${code}`)))
    })
}

function healthcheck(pid: number | undefined): { code: number | null; line: string } {
    const result = spawnSync(process.execPath, [HEALTHCHECK], {
        env: { PATH: process.env.PATH ?? '', PATTERNS_CONNECTOR_PID: String(pid) },
        encoding: 'utf8',
        timeout: 15_000,
    })
    return { code: result.status, line: `${result.stdout}${result.stderr}`.trim() }
}

test('sync with --metrics-port: healthy on 200, unhealthy on 503, and the line names the URL', async () => {
    const port = await freePort()
    const healthy = await startCli(['sync', '--follow', '--metrics-port', String(port)])
    expect(healthcheck(healthy.pid)).toEqual({ code: 0, line: `http://127.0.0.1:${port}/healthz: 200` })

    const other = await freePort()
    const failing = await startCli(['sync', `--metrics-port=${other}`, '--metrics-host', '0.0.0.0'], 503)
    expect(healthcheck(failing.pid)).toEqual({ code: 1, line: `http://127.0.0.1:${other}/healthz: 503` })
})

test('a metrics port nobody answers on is unhealthy', async () => {
    const port = await freePort()
    const silent = await startCli(['sync', '--follow', '--metrics-port', String(port)], 200, false)
    const result = healthcheck(silent.pid)
    expect(result.code).toBe(1)
    expect(result.line).toBe(`http://127.0.0.1:${port}/healthz: connect ECONNREFUSED 127.0.0.1:${port}`)
})

test('arguments after -- are not flags', async () => {
    const port = await freePort()
    const cli = await startCli(['replay', '--', '--metrics-port', String(port)], 200, false)
    expect(healthcheck(cli.pid)).toEqual({
        code: 0,
        line: 'patterns-connector replay runs without --metrics-port: nothing to probe',
    })
})

test('without --metrics-port (replay, or sync without metrics) a running CLI is healthy', async () => {
    const replay = await startCli(['replay', '-'])
    expect(healthcheck(replay.pid)).toEqual({
        code: 0,
        line: 'patterns-connector replay runs without --metrics-port: nothing to probe',
    })
    const sync = await startCli(['sync', '--follow'])
    expect(healthcheck(sync.pid).line).toBe('patterns-connector sync runs without --metrics-port: nothing to probe')
})

test('--metrics-port 0: the port the CLI picked is found among its sockets', async () => {
    const cli = await startCli(['sync', '--metrics-port', '0'], 503)
    const result = healthcheck(cli.pid)
    expect(result.code).toBe(1)
    expect(result.line).toMatch(/^http:\/\/127\.0\.0\.1:\d+\/healthz: 503$/)
    expect(result.line).not.toContain(':0/')
})

test('no CLI process: unhealthy', () => {
    const ended = spawnSync(process.execPath, ['-e', ''])
    expect(healthcheck(ended.pid)).toEqual({ code: 1, line: 'no patterns-connector process is running' })
})
