/**
 * The CLI as a user installs it: `npm pack` (which builds dist/), the tarball installed with `--omit=dev` into an
 * empty prefix, then `patterns-connector --help` and a replay of 1,000 events into a local receiver, run from outside
 * the checkout. Prints the installed size and fails above INSTALLED_MAX_BYTES or if a TypeScript loader got in.
 *
 *     npx tsx .ci/pack-check.ts
 */
import { spawn, spawnSync } from 'node:child_process'
import { existsSync, lstatSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { packAndInstall } from '../tools/bench/installed'
import { sampleEvents } from '../tools/host/sample-events'
import { startReceiver } from '../tools/receiver/receiver'

const EVENTS = 1000
/**
 * The installed package, dependencies included, must stay small enough to install anywhere in seconds. prom-client
 * (--metrics-port) brings bintrees (2.4 MB on disk, its sources shipped several times over) and @opentelemetry/api
 * (2.0 MB), which no option of npm leaves out: about 4.6 MB of the total.
 */
const INSTALLED_MAX_BYTES = 10 * 1024 * 1024
/** Packages that only build or test the connector; none may reach an installed CLI. */
const DEV_ONLY = ['tsx', 'typescript', 'vm2', 'chdb', 'node-fetch-2021', '@babel/standalone', '@posthog/hogql-parser']

/** Bytes of every file under `dir`, and the disk blocks they take as `du` counts them (symlinks not followed). */
export function treeBytes(dir: string): { bytes: number; onDisk: number } {
    const total = { bytes: 0, onDisk: 0 }
    for (const entry of readdirSync(dir, { withFileTypes: true })) {
        const path = join(dir, entry.name)
        const stat = lstatSync(path)
        const inner = entry.isDirectory() ? treeBytes(path) : { bytes: 0, onDisk: 0 }
        total.bytes += inner.bytes + (entry.isDirectory() ? 0 : stat.size)
        total.onDisk += inner.onDisk + stat.blocks * 512
    }
    return total
}

function megabytes(bytes: number): string {
    return `${(bytes / 1024 / 1024).toFixed(1)} MB`
}

/** Packs the checkout into `dir` and installs the tarball there with --omit=dev; returns the prefix. */
function installedBin(prefix: string): string {
    return join(prefix, 'node_modules', '.bin', 'patterns-connector')
}

/** The installed bin runs from `cwd`, outside the checkout, with no loader options inherited. */
const BIN_ENV = { ...process.env, NODE_OPTIONS: '' }

/** Replays EVENTS sample events into a local receiver with the installed CLI; returns the problems found. */
async function checkReplay(prefix: string, dir: string): Promise<{ stored: number; problems: string[] }> {
    const input = join(dir, 'events.jsonl')
    writeFileSync(input, [...sampleEvents(EVENTS)].map((event) => JSON.stringify(event) + '\n').join(''))
    const receiver = await startReceiver({ dataDir: join(dir, 'receiver') })
    try {
        // Not spawnSync: the receiver answers from this process, so its event loop must keep running.
        const result = await new Promise<{ status: number | null; stderr: string }>((resolve) => {
            const args = ['replay', input, '--webhook-url', receiver.url]
            const child = spawn(installedBin(prefix), args, {
                cwd: dir,
                env: BIN_ENV,
                stdio: ['ignore', 'ignore', 'pipe'],
            })
            let stderr = ''
            child.stderr.on('data', (chunk: Buffer) => (stderr += chunk.toString()))
            child.on('close', (status) => resolve({ status, stderr }))
        })
        const summary = receiver.summary()
        const problems: string[] = []
        if (result.status !== 0) {
            problems.push(`replay exited ${result.status}:\n${result.stderr}`)
        }
        if (summary.uniqueUuids !== EVENTS) {
            problems.push(`the receiver stored ${summary.uniqueUuids} distinct events of ${EVENTS}`)
        }
        return { stored: summary.uniqueUuids, problems }
    } finally {
        await receiver.close()
    }
}

async function main(): Promise<number> {
    const dir = mkdtempSync(join(tmpdir(), 'pack-check-'))
    try {
        const { prefix, tarballBytes } = packAndInstall(dir)
        const modules = join(prefix, 'node_modules')
        const installed = treeBytes(modules)
        const problems: string[] = []
        const leaked = DEV_ONLY.filter((name) => existsSync(join(modules, name)))
        if (leaked.length > 0) {
            problems.push(`devDependencies installed with --omit=dev: ${leaked.join(', ')}`)
        }
        if (installed.onDisk > INSTALLED_MAX_BYTES) {
            problems.push(`installed size ${megabytes(installed.onDisk)} is over ${megabytes(INSTALLED_MAX_BYTES)}`)
        }
        const help = spawnSync(installedBin(prefix), ['--help'], { cwd: dir, env: BIN_ENV, encoding: 'utf8' })
        if (help.status !== 0 || !help.stdout.includes('replay') || !help.stdout.includes('sync')) {
            problems.push(`patterns-connector --help exited ${help.status}:\n${help.stdout}${help.stderr}`)
        }
        const replayed = await checkReplay(prefix, dir)
        problems.push(...replayed.problems)
        const size =
            `tarball ${(tarballBytes / 1024).toFixed(0)} kB, installed size ${megabytes(installed.onDisk)} on disk ` +
            `(${megabytes(installed.bytes)} of files; limit ${megabytes(INSTALLED_MAX_BYTES)})`
        process.stdout.write(`pack check: ${size}, --help ${help.status === 0 ? 'ok' : 'failed'}, `)
        process.stdout.write(`replay ${replayed.stored}/${EVENTS} events stored by the receiver\n`)
        for (const problem of problems) {
            process.stderr.write(`pack check: ${problem}\n`)
        }
        process.stdout.write(`pack check: ${problems.length === 0 ? 'passed' : 'FAILED'}\n`)
        return problems.length === 0 ? 0 : 1
    } finally {
        rmSync(dir, { recursive: true, force: true })
    }
}

void main().then(
    (code) => process.exit(code),
    (error: unknown) => {
        process.stderr.write(`pack check: ${error instanceof Error ? error.message : String(error)}\n`)
        process.exit(1)
    }
)
