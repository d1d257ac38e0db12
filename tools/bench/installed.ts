/**
 * The CLI as a user installs it, for benchmarks that measure what users run: `npm pack` (which builds dist/), the
 * tarball installed with `--omit=dev` into an empty prefix. No TypeScript loader is in that process, so its memory is
 * the product's own.
 */
import { execFileSync } from 'node:child_process'
import { lstatSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'

const ROOT = join(__dirname, '..', '..')

export interface InstalledCli {
    /** The installed entry script, run with `node` (the bin link points at it). */
    bin: string
    remove: () => void
}

/** `npm pack` into `dir`, then the tarball installed with `--omit=dev` into `dir/prefix`, as a user installs it. */
export function packAndInstall(dir: string): { prefix: string; tarballBytes: number } {
    const packed = execFileSync('npm', ['pack', '--silent', '--pack-destination', dir], { cwd: ROOT, encoding: 'utf8' })
    const tarball = packed.trim().split('\n').pop()
    if (!tarball) {
        throw new Error('npm pack printed no tarball name')
    }
    const prefix = join(dir, 'prefix')
    mkdirSync(prefix)
    const args = ['install', '--omit=dev', '--prefer-offline', '--no-audit', '--no-fund', '--prefix', prefix]
    execFileSync('npm', [...args, join(dir, tarball)], { cwd: dir, stdio: ['ignore', 'ignore', 'inherit'] })
    return { prefix, tarballBytes: lstatSync(join(dir, tarball)).size }
}

export function installPackedCli(): InstalledCli {
    const dir = mkdtempSync(join(tmpdir(), 'bench-installed-'))
    const { prefix } = packAndInstall(dir)
    return {
        bin: join(prefix, 'node_modules', 'patterns-connector', 'bin', 'patterns-connector.js'),
        remove: () => rmSync(dir, { recursive: true, force: true }),
    }
}
