/**
 * Debian tools the scripts and tests need (podman, debootstrap, prometheus), installed from Debian's packages when their
 * command is missing, so a fresh machine (CI's) runs what a developer's does. We are root.
 */
import { execFileSync, spawnSync } from 'node:child_process'

/** Installs the Debian packages whose commands are missing (we are root; apt waits for another apt's lock). */
export function ensureDebianTools(commands: Record<string, string>): string[] {
    const missing = [
        ...new Set(
            Object.entries(commands)
                .filter(([command]) => spawnSync('sh', ['-c', `command -v ${command}`]).status !== 0)
                .map(([, pkg]) => pkg)
        ),
    ]
    if (missing.length === 0) {
        return []
    }
    const apt = (args: string[]) =>
        execFileSync('apt-get', ['-o', 'DPkg::Lock::Timeout=600', ...args], {
            stdio: ['ignore', 'ignore', 'inherit'],
            env: { ...process.env, DEBIAN_FRONTEND: 'noninteractive' },
        })
    apt(['update'])
    apt(['install', '-y', '--no-install-recommends', ...missing])
    return missing
}
