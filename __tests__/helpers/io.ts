import { PassThrough } from 'node:stream'

/** Two writable streams that collect what a CLI prints, for CLIs whose output streams are injectable. */
export function captureOutput() {
    const stdout = new PassThrough()
    const stderr = new PassThrough()
    const text = { stdout: '', stderr: '' }
    stdout.on('data', (c: Buffer) => (text.stdout += c.toString()))
    stderr.on('data', (c: Buffer) => (text.stderr += c.toString()))
    return { stdout, stderr, text }
}

/** Polls until the condition holds, or fails after `timeoutMs`. */
export async function waitFor(condition: () => boolean, timeoutMs = 6_000): Promise<void> {
    const deadline = Date.now() + timeoutMs
    while (!condition()) {
        if (Date.now() > deadline) {
            throw new Error(`condition not met within ${timeoutMs} ms`)
        }
        await new Promise((resolve) => setTimeout(resolve, 5))
    }
}
