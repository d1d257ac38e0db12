/**
 * The Dockerfile's base image, made here instead of pulled: Debian bookworm from debootstrap (Debian's own packages)
 * plus this machine's Node 20 and npm, tagged with the name the Dockerfile's FROM gives, so the Dockerfile builds
 * unchanged. The debootstrapped tree is kept as a tarball, and the image is kept in podman's store with a label naming
 * what it holds, so a second run makes nothing.
 */
import { execFileSync } from 'node:child_process'
import {
    copyFileSync,
    cpSync,
    existsSync,
    mkdirSync,
    mkdtempSync,
    readFileSync,
    realpathSync,
    renameSync,
    rmSync,
    writeFileSync,
} from 'node:fs'
import { tmpdir } from 'node:os'
import { dirname, join } from 'node:path'

import { BUILD_FLAGS, podman, podmanOk } from './podman'

const SUITE = 'bookworm'
const BASE_LABEL = 'org.patterns-connector.base'
/** Unused in a container that only runs node, and a third of the tree: the official slim image leaves them out too. */
const TRIMMED = ['var/cache/apt/archives', 'var/lib/apt/lists', 'usr/share/doc', 'usr/share/man', 'usr/share/locale']
/** The official Node images' user: uid and gid 1000, named node. */
const NODE_UID = 1000

/** The images the Dockerfile builds FROM that are not its own stages, e.g. `node:20-bookworm-slim`. */
export function externalBases(dockerfile: string): string[] {
    const stages = new Set<string>()
    const bases: string[] = []
    for (const line of dockerfile.split('\n')) {
        const match = /^\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?/i.exec(line)
        if (match) {
            const [, image, stage] = match as unknown as [string, string, string | undefined]
            if (!stages.has(image) && !bases.includes(image)) {
                bases.push(image)
            }
            if (stage) {
                stages.add(stage)
            }
        }
    }
    return bases
}

/** A short name as podman stores it: `node:20-bookworm-slim` → `docker.io/library/node:20-bookworm-slim`. */
export function fullImageName(image: string): string {
    const first = image.split('/')[0] as string
    const hasRegistry = image.includes('/') && (first.includes('.') || first.includes(':') || first === 'localhost')
    if (hasRegistry) {
        return image
    }
    return image.includes('/') ? `docker.io/${image}` : `docker.io/library/${image}`
}

/** The Debian mirror apt uses here (deb822 `URIs:` or a one-line `deb URL SUITE`), for a suite. */
export function debianMirror(sources: string, suite: string = SUITE): string | null {
    for (const stanza of sources.split(/\n\s*\n/)) {
        const uri = /^URIs:\s*(\S+)/m.exec(stanza)?.[1]
        const suites = /^Suites:\s*(.+)$/m.exec(stanza)?.[1]?.split(/\s+/) ?? []
        if (uri && suites.includes(suite)) {
            return uri
        }
    }
    const line = new RegExp(`^deb\\s+(?:\\[[^\\]]*\\]\\s+)?(\\S+)\\s+${suite}\\s`, 'm').exec(sources)
    return line?.[1] ?? null
}

function aptSources(): string {
    const files = ['/etc/apt/sources.list', '/etc/apt/sources.list.d/debian.sources']
    return files.map((file) => (existsSync(file) ? readFileSync(file, 'utf8') : '')).join('\n\n')
}

export interface LocalNode {
    binary: string
    npmDir: string
    version: string
    npmVersion: string
}

/** This machine's node (what `node` runs) and npm's package folder. */
export function localNode(): LocalNode {
    const binary = realpathSync(execFileSync('sh', ['-c', 'command -v node'], { encoding: 'utf8' }).trim())
    const npmCli = realpathSync(execFileSync('sh', ['-c', 'command -v npm'], { encoding: 'utf8' }).trim())
    const npmDir = dirname(dirname(npmCli))
    const version = execFileSync(binary, ['--version'], { encoding: 'utf8' }).trim()
    const npmVersion = (JSON.parse(readFileSync(join(npmDir, 'package.json'), 'utf8')) as { version: string }).version
    return { binary, npmDir, version, npmVersion }
}

/** Debian bookworm's minimal tree as a tarball, made once with debootstrap and kept in the cache folder. */
function bookwormTarball(cacheDir: string, log: (line: string) => void): string {
    const tarball = join(cacheDir, `${SUITE}-minbase.tar`)
    if (existsSync(tarball)) {
        log(`debootstrap: cached ${tarball}`)
        return tarball
    }
    const mirror = process.env.DEBIAN_MIRROR ?? debianMirror(aptSources())
    if (!mirror) {
        throw new Error(`no Debian ${SUITE} mirror in apt's sources: set DEBIAN_MIRROR`)
    }
    mkdirSync(cacheDir, { recursive: true })
    const root = mkdtempSync(join(cacheDir, 'rootfs-'))
    try {
        const started = Date.now()
        execFileSync('debootstrap', ['--variant=minbase', SUITE, root, mirror], {
            stdio: ['ignore', 'ignore', 'inherit'],
        })
        for (const path of TRIMMED) {
            rmSync(join(root, path), { recursive: true, force: true })
            mkdirSync(join(root, path), { recursive: true })
        }
        execFileSync('tar', ['-C', root, '-cf', `${tarball}.part`, '.'])
        renameSync(`${tarball}.part`, tarball)
        log(`debootstrap: ${SUITE} minbase in ${((Date.now() - started) / 1000).toFixed(0)} s, kept in ${tarball}`)
    } finally {
        rmSync(root, { recursive: true, force: true })
    }
    return tarball
}

function baseContainerfile(node: LocalNode, label: string): string {
    return [
        'FROM scratch',
        `ADD ${SUITE}.tar /`,
        'COPY node /usr/local/bin/node',
        'COPY npm /usr/local/lib/node_modules/npm',
        'RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\',
        '    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\',
        `    && groupadd --gid ${NODE_UID} node \\`,
        `    && useradd --uid ${NODE_UID} --gid node --shell /bin/bash --create-home node`,
        `ENV NODE_VERSION=${node.version.replace(/^v/, '')}`,
        `LABEL ${BASE_LABEL}="${label}"`,
        'CMD ["node"]',
        '',
    ].join('\n')
}

/** Makes (or finds, already made) the base image `tag`; returns what it did, for the report. */
export function ensureBaseImage(tag: string, cacheDir: string, log: (line: string) => void): string {
    const node = localNode()
    const wanted = /:(\d+)/.exec(tag)?.[1]
    if (wanted && !node.version.startsWith(`v${wanted}.`)) {
        throw new Error(
            `the Dockerfile's base is ${tag}, but this machine's node is ${node.version}: install Node ${wanted}`
        )
    }
    const label = `debian ${SUITE}, node ${node.version}, npm ${node.npmVersion}`
    const found = podman(['image', 'inspect', '--format', `{{ index .Config.Labels "${BASE_LABEL}" }}`, tag])
    if (found.code === 0 && found.stdout.trim() === label) {
        return `${tag}: cached (${label})`
    }
    const tarball = bookwormTarball(cacheDir, log)
    const context = mkdtempSync(join(tmpdir(), 'image-base-'))
    try {
        copyFileSync(tarball, join(context, `${SUITE}.tar`))
        copyFileSync(node.binary, join(context, 'node'))
        cpSync(node.npmDir, join(context, 'npm'), { recursive: true })
        writeFileSync(join(context, 'Containerfile'), baseContainerfile(node, label))
        podmanOk(['build', ...BUILD_FLAGS, '--tag', tag, '--file', join(context, 'Containerfile'), context], {
            timeoutMs: 600_000,
        })
    } finally {
        rmSync(context, { recursive: true, force: true })
    }
    return `${tag}: made (${label})`
}
