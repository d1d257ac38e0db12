#!/usr/bin/env node
/**
 * The image's HEALTHCHECK, for whatever command the container runs. It reads the running CLI's own arguments from
 * /proc: with `--metrics-port` it asks that port's /healthz (on 127.0.0.1 when the CLI listens on every address),
 * and passes only on 200; without one (replay, or sync run without metrics) there is nothing to ask, and a running
 * CLI is healthy. Port 0 (a free port the CLI picked) is found among the CLI's listening sockets.
 * PATTERNS_CONNECTOR_PID names the process to check; by default it is the first one running the CLI.
 */
'use strict'
const { readdirSync, readFileSync, readlinkSync } = require('node:fs')
const { request } = require('node:http')

/** The entry script's name, as the global install links it (`/usr/local/bin/patterns-connector`). */
const CLI_NAME = 'patterns-connector'
/** Well inside the HEALTHCHECK's own --timeout (5 s). */
const PROBE_TIMEOUT_MS = 4000
/** /proc/net/tcp's state for a listening socket. */
const TCP_LISTEN = '0A'
const ANY_ADDRESS = new Set(['0.0.0.0', '::', '[::]', ''])

/** The value of a flag given as `--flag value` or `--flag=value`, before any `--`; undefined when absent. */
function flagValue(args, flag) {
    for (let i = 0; i < args.length; i++) {
        if (args[i] === '--') {
            return undefined
        }
        if (args[i] === flag) {
            return args[i + 1]
        }
        if (args[i].startsWith(`${flag}=`)) {
            return args[i].slice(flag.length + 1)
        }
    }
    return undefined
}

/** Where to ask for /healthz, from the CLI's arguments: null when it serves no metrics. */
function metricsTarget(args) {
    const port = flagValue(args, '--metrics-port')
    if (port === undefined) {
        return null
    }
    const host = flagValue(args, '--metrics-host') ?? '127.0.0.1'
    const bare = host.replace(/^\[(.*)\]$/, '$1')
    return { host: ANY_ADDRESS.has(host) ? '127.0.0.1' : bare, port: Number(port) }
}

/** Whether a command line (argv as /proc shows it) runs the CLI: its script is the first argument after node. */
function runsCli(argv) {
    return argv
        .slice(0, 2)
        .some((arg) => arg === CLI_NAME || arg.endsWith(`/${CLI_NAME}`) || arg.endsWith(`/${CLI_NAME}.js`))
}

function readArgv(pid) {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8')
        .split('\0')
        .filter((arg, n, all) => n < all.length - 1 || arg)
}

/** The CLI's process id and arguments, or null when no process runs it. */
function findCli(env) {
    const pids = env.PATTERNS_CONNECTOR_PID
        ? [env.PATTERNS_CONNECTOR_PID]
        : readdirSync('/proc')
              .filter((name) => /^\d+$/.test(name))
              .sort((a, b) => Number(a) - Number(b))
    for (const pid of pids) {
        try {
            const argv = readArgv(pid)
            if (runsCli(argv)) {
                return { pid, args: argv.slice(2) }
            }
        } catch {
            // The process ended while it was read.
        }
    }
    return null
}

/** The ports a process listens on over TCP: its sockets' inodes, looked up in its network namespace's tables. */
function listeningPorts(pid) {
    const inodes = new Set()
    for (const fd of readdirSync(`/proc/${pid}/fd`)) {
        const match = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`))
        if (match) {
            inodes.add(match[1])
        }
    }
    const ports = []
    for (const table of ['tcp', 'tcp6']) {
        const lines = readFileSync(`/proc/${pid}/net/${table}`, 'utf8').trim().split('\n').slice(1)
        for (const columns of lines.map((line) => line.trim().split(/\s+/))) {
            if (columns[3] === TCP_LISTEN && inodes.has(columns[9])) {
                ports.push(parseInt(columns[1].split(':')[1], 16))
            }
        }
    }
    return ports
}

/** Resolves to the HTTP status of GET /healthz, or to a reason when there was no answer. */
function probe(host, port) {
    return new Promise((resolve) => {
        const req = request({ host, port, path: '/healthz', timeout: PROBE_TIMEOUT_MS }, (res) => {
            res.resume()
            resolve({ status: res.statusCode })
        })
        req.on('timeout', () => req.destroy(new Error(`no answer within ${PROBE_TIMEOUT_MS} ms`)))
        req.on('error', (error) => resolve({ error: error.message }))
        req.end()
    })
}

/** Exit 0 healthy, 1 unhealthy, as HEALTHCHECK reads it; one line says why. */
async function main(env) {
    const cli = findCli(env)
    if (!cli) {
        return { code: 1, line: `no ${CLI_NAME} process is running` }
    }
    const target = metricsTarget(cli.args)
    if (!target) {
        return { code: 0, line: `${CLI_NAME} ${cli.args[0] ?? ''} runs without --metrics-port: nothing to probe` }
    }
    const port = target.port === 0 ? listeningPorts(cli.pid)[0] : target.port
    if (port === undefined) {
        return { code: 1, line: '--metrics-port 0: the metrics server is not listening yet' }
    }
    const answer = await probe(target.host, port)
    const url = `http://${target.host.includes(':') ? `[${target.host}]` : target.host}:${port}/healthz`
    if (answer.status === 200) {
        return { code: 0, line: `${url}: 200` }
    }
    return { code: 1, line: `${url}: ${answer.status ?? answer.error}` }
}

module.exports = { flagValue, metricsTarget, runsCli, main }

if (require.main === module) {
    main(process.env).then(({ code, line }) => {
        process.stdout.write(`${line}\n`)
        process.exitCode = code
    })
}
