/**
 * `npm run image:check`: the Dockerfile built and run for real, on a machine with no Docker daemon and no Docker Hub.
 * It installs podman, runc and debootstrap from Debian's packages when they are missing, makes the Dockerfile's base
 * locally (tools/image/base.ts), builds the Dockerfile unchanged with podman, prints the build time and the image
 * size, then runs the image against the PostHog stand-in and the receiver on this machine (host network) and checks:
 * --help; not root; sync --follow delivers; the health check healthy, unhealthy once PostHog stops, and healthy for
 * a command without --metrics-port; `podman stop` exits 143 within 20 s; the same volume resumes with nothing lost.
 * Behind a TLS-intercepting proxy, the CA certificates this machine's npm trusts (NPM_CA_FILE, NODE_EXTRA_CA_CERTS
 * or npm's `cafile`) go in as the `npm_ca` build secret.
 */
import { spawnSync } from 'node:child_process'
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

import { ensureDebianTools } from '../debian'
import { ensureBaseImage, externalBases, fullImageName } from './base'
import { BUILD_FLAGS, DEBIAN_PACKAGES, podman, podmanLogged, podmanOk, runFlags } from './podman'
import { ImageRun, runChecks } from './run'

const ROOT = join(__dirname, '..', '..')
const IMAGE = 'localhost/patterns-connector:check'
const CACHE_DIR = process.env.PATTERNS_IMAGE_CACHE ?? '/var/cache/patterns-connector-image'
const MB = 1_000_000

function seconds(since: number): string {
    return `${((Date.now() - since) / 1000).toFixed(1)} s`
}

/** The CA file npm is configured with here (`npm config get cafile`), or null. */
function npmCafile(): string | null {
    const result = spawnSync('npm', ['config', 'get', 'cafile'], { encoding: 'utf8' })
    const file = result.status === 0 ? result.stdout.trim() : ''
    return file && file !== 'null' && file !== 'undefined' ? file : null
}

/**
 * The build secret that carries CA certificates to the build's npm, when this machine's npm needs some (behind a
 * TLS-intercepting proxy): NPM_CA_FILE, else NODE_EXTRA_CA_CERTS, else npm's own `cafile` setting.
 */
export function caSecretFlags(env: NodeJS.ProcessEnv, cafile: () => string | null = npmCafile): string[] {
    const file = env.NPM_CA_FILE ?? env.NODE_EXTRA_CA_CERTS ?? cafile()
    return file && existsSync(file) ? ['--secret', `id=npm_ca,src=${file}`] : []
}

async function build(log: (line: string) => void): Promise<void> {
    const dir = mkdtempSync(join(tmpdir(), 'image-build-'))
    const logFile = join(dir, 'build.log')
    const secret = caSecretFlags(process.env)
    log(`build: podman build ${[...BUILD_FLAGS, ...secret].join(' ')} --tag ${IMAGE} . (log: ${logFile})`)
    const started = Date.now()
    const code = await podmanLogged(['build', ...BUILD_FLAGS, ...secret, '--tag', IMAGE, ROOT], logFile)
    const text = readFileSync(logFile, 'utf8')
    if (code !== 0) {
        throw new Error(`podman build exited ${code}:\n${text.trim().split('\n').slice(-25).join('\n')}`)
    }
    const cached = (text.match(/^--> Using cache/gm) ?? []).length
    log(`build: ${seconds(started)} (${cached} steps from podman's layer cache)`)
    rmSync(dir, { recursive: true, force: true })
}

/** Files .dockerignore must keep out of the build: event data, coverage, logs, packs, checkpoints, git. */
const KEPT_OUT = ['.data/SENTINEL.jsonl', 'coverage/SENTINEL.json', 'SENTINEL.log', 'SENTINEL.tgz', 'SENTINEL.ckpt']

/**
 * Builds the first stage (from the layer cache: files left out do not change the context) with a marked file of
 * each kind .dockerignore leaves out, and lists what of them, and of .git, reached /src.
 */
/** Marked files a killed run left behind (their names start with `image-check-`). */
function removeOldMarks(): void {
    for (const dir of [ROOT, join(ROOT, '.data'), join(ROOT, 'coverage')].filter((path) => existsSync(path))) {
        readdirSync(dir)
            .filter((name) => name.startsWith('image-check-'))
            .forEach((name) => rmSync(join(dir, name), { force: true }))
    }
}

async function contextLeavesOut(): Promise<string> {
    removeOldMarks()
    const mark = `image-check-${process.pid}`
    const files = KEPT_OUT.map((path) => join(ROOT, path.replace('SENTINEL', mark)))
    const madeDirs = ['.data', 'coverage'].map((dir) => join(ROOT, dir)).filter((dir) => !existsSync(dir))
    const tag = `${IMAGE}-pack`
    try {
        for (const file of files) {
            mkdirSync(join(file, '..'), { recursive: true })
            writeFileSync(file, '{"uuid":"event data that must not reach an image"}\n')
        }
        const logFile = join(tmpdir(), `${mark}-pack.log`)
        const secret = caSecretFlags(process.env)
        const code = await podmanLogged(
            ['build', ...BUILD_FLAGS, ...secret, '--target', 'pack', '--tag', tag, ROOT],
            logFile
        )
        if (code !== 0) {
            throw new Error(`podman build --target pack exited ${code} (log: ${logFile})`)
        }
        rmSync(logFile, { force: true })
        const script = `cd /src && for f in .git ${KEPT_OUT.map((p) => p.replace('SENTINEL', mark)).join(' ')}; do [ -e "$f" ] && echo "$f"; done; true`
        const found = podmanOk(['run', '--rm', ...runFlags(), '--entrypoint', 'sh', tag, '-c', script])
        if (found) {
            throw new Error(`in the build context: ${found.split('\n').join(', ')}`)
        }
        return `none of .git, ${KEPT_OUT.map((p) => p.replace('SENTINEL', '…')).join(', ')} reached the build`
    } finally {
        files.forEach((file) => rmSync(file, { force: true }))
        madeDirs.forEach((dir) => rmSync(dir, { recursive: true, force: true }))
        podman(['rmi', '--force', tag])
    }
}

function imageSizes(base: string, log: (line: string) => void): void {
    const size = (image: string) => Number(podmanOk(['image', 'inspect', '--format', '{{.Size}}', image]))
    const image = size(IMAGE)
    const from = size(base)
    log(`size: ${(image / MB).toFixed(1)} MB, of which ${((image - from) / MB).toFixed(1)} MB over the base ${base}`)
}

async function main(): Promise<number> {
    const started = Date.now()
    const log = (line: string) => process.stdout.write(`${line}\n`)
    const toolsStarted = Date.now()
    const installed = ensureDebianTools(Object.fromEntries(DEBIAN_PACKAGES.map((pkg) => [pkg, pkg])))
    const tools = installed.length
        ? `installed ${installed.join(', ')} (apt-get)`
        : `${DEBIAN_PACKAGES.join(', ')} present`
    log(`tools: ${tools} in ${seconds(toolsStarted)}`)
    const bases = externalBases(readFileSync(join(ROOT, 'Dockerfile'), 'utf8'))
    if (bases.length !== 1) {
        throw new Error(`expected one base image in the Dockerfile, found: ${bases.join(', ')}`)
    }
    const base = fullImageName(bases[0] as string)
    const baseStarted = Date.now()
    log(`base: ${ensureBaseImage(base, CACHE_DIR, log)} in ${seconds(baseStarted)}`)
    await build(log)
    imageSizes(base, log)
    const run: ImageRun = { image: IMAGE, log }
    const context = await contextLeavesOut().then(
        (detail) => ({ ok: true, line: `ok    .dockerignore: ${detail}` }),
        (error: Error) => ({ ok: false, line: `FAIL  .dockerignore: ${error.message}` })
    )
    log(context.line)
    const checks = await runChecks(run)
    const passed = checks.passed + (context.ok ? 1 : 0)
    const failed = checks.failed + (context.ok ? 0 : 1)
    log(`image check: ${passed} passed, ${failed} failed, ${seconds(started)} in all`)
    return failed === 0 ? 0 : 1
}

if (require.main === module) {
    main().then(
        (code) => process.exit(code),
        (error: unknown) => {
            process.stderr.write(`image check: ${error instanceof Error ? error.message : String(error)}\n`)
            process.exit(1)
        }
    )
}
