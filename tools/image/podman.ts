/**
 * Podman as it runs on a machine like CI's: root, no Docker daemon, no systemd, cgroups v1 and v2 side by side (hybrid),
 * and a sandbox that may not raise resource limits. Each flag below is what made it work there, and why.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { createWriteStream } from 'node:fs'

/** Debian packages the image check needs: podman, runc (see below) and debootstrap for the base. */
export const DEBIAN_PACKAGES = ['podman', 'runc', 'debootstrap']

/**
 * runc, not crun (podman's default): crun refuses hybrid cgroups ("cgroups in hybrid mode not supported").
 * cgroupfs and a file for events: there is no systemd to ask.
 */
const GLOBAL_FLAGS = ['--runtime', 'runc', '--cgroup-manager', 'cgroupfs', '--events-backend', 'file']

/**
 * Builds: chroot isolation, so a RUN step needs no OCI container; the docker format, since the OCI one drops
 * HEALTHCHECK; never pull (there is no Docker Hub here: the base is made locally).
 */
export const BUILD_FLAGS = ['--isolation', 'chroot', '--format', 'docker', '--pull=never']

/** Podman asks for 1,048,576 open files by default; a process without CAP_SYS_RESOURCE cannot raise its limits. */
const MAX_NOFILE = 65_536
/** Podman itself runs with at most 32,768 processes, so its containers may ask no more. */
const NPROC = 4_096

/** Resource limits a container may have here: no more than this process has. */
export function ulimitFlags(openFilesLimit: number): string[] {
    const nofile = Math.min(openFilesLimit, MAX_NOFILE)
    return ['--ulimit', `nofile=${nofile}:${nofile}`, '--ulimit', `nproc=${NPROC}:${NPROC}`]
}

function hardOpenFilesLimit(): number {
    const text = execFileSync('sh', ['-c', 'ulimit -Hn'], { encoding: 'utf8' }).trim()
    return text === 'unlimited' ? MAX_NOFILE : Number(text)
}

/** `podman run` flags for this machine. */
export function runFlags(): string[] {
    return ulimitFlags(hardOpenFilesLimit())
}

export interface Result {
    code: number | null
    stdout: string
    stderr: string
}

/** Runs podman and waits; never throws on a non-zero exit (the caller checks the code). */
export function podman(args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Result {
    const result = spawnSync('podman', [...GLOBAL_FLAGS, ...args], {
        encoding: 'utf8',
        env: options.env ?? process.env,
        timeout: options.timeoutMs ?? 120_000,
        maxBuffer: 64 * 1024 * 1024,
    })
    return { code: result.status, stdout: result.stdout ?? '', stderr: result.stderr ?? '' }
}

/** Like podman(), but throws with the command's last output lines when it fails. */
export function podmanOk(args: string[], options: { env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): string {
    const result = podman(args, options)
    if (result.code !== 0) {
        const tail = `${result.stdout}\n${result.stderr}`.trim().split('\n').slice(-15).join('\n')
        throw new Error(`podman ${args.slice(0, 2).join(' ')} exited ${result.code}:\n${tail}`)
    }
    return result.stdout.trim()
}

/** A long podman command (a build) with its output in a log file; resolves to its exit code. */
export function podmanLogged(args: string[], logFile: string): Promise<number | null> {
    return new Promise((resolve, reject) => {
        const log = createWriteStream(logFile)
        const child = spawn('podman', [...GLOBAL_FLAGS, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
        child.stdout.pipe(log, { end: false })
        child.stderr.pipe(log, { end: false })
        child.on('error', reject)
        child.on('close', (code) => log.end(() => resolve(code)))
    })
}
