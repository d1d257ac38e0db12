/** "Did you mean": the closest known flag to a misspelled one, so a typo gets its fix and not only a refusal. */
import { basename, delimiter, dirname, isAbsolute, relative, resolve } from 'node:path'

/** The most edits (insertions, deletions, substitutions, swaps of neighbours) a typo may be from its flag. */
export const MAX_TYPO_EDITS = 2

/** Edit distance with adjacent swaps (optimal string alignment): "--sicne" is one edit from "--since". */
export function editDistance(a: string, b: string): number {
    const rows = Array.from({ length: a.length + 1 }, (_, i) => [i, ...Array<number>(b.length).fill(0)])
    for (let j = 1; j <= b.length; j++) {
        ;(rows[0] as number[])[j] = j
    }
    for (let i = 1; i <= a.length; i++) {
        const row = rows[i] as number[]
        const above = rows[i - 1] as number[]
        for (let j = 1; j <= b.length; j++) {
            const cost = a[i - 1] === b[j - 1] ? 0 : 1
            let best = Math.min((above[j] as number) + 1, (row[j - 1] as number) + 1, (above[j - 1] as number) + cost)
            if (i > 1 && j > 1 && a[i - 1] === b[j - 2] && a[i - 2] === b[j - 1]) {
                best = Math.min(best, ((rows[i - 2] as number[])[j - 2] as number) + 1)
            }
            row[j] = best
        }
    }
    return (rows[a.length] as number[])[b.length] as number
}

/**
 * The known flag closest to `typed` (both without their dashes), or null when none is near enough: within
 * MAX_TYPO_EDITS, and within a third of the flag's length so short flags do not match anything. A flag that
 * starts with what was typed (an abbreviation, "--webhook") counts as near too.
 */
export function closestFlag(typed: string, known: readonly string[]): string | null {
    const name = typed.replace(/^-+/, '').replace(/=.*$/, '').toLowerCase()
    if (!name) {
        return null
    }
    let best: { flag: string; distance: number } | null = null
    for (const flag of known) {
        const distance = flag.startsWith(name) && name.length >= 3 ? 1 : editDistance(name, flag)
        const near = distance <= Math.min(MAX_TYPO_EDITS, Math.floor(flag.length / 3))
        if (near && (best === null || distance < best.distance)) {
            best = { flag, distance }
        }
    }
    return best?.flag ?? null
}

/**
 * " Did you mean --x?" for the unknown option in Node's parseArgs message, or for an argument that is a flag's
 * name without its dashes ("follow" for --follow); '' when nothing is close.
 */
export function didYouMean(message: string, known: readonly string[]): string {
    const unknown = /^Unknown option '(-[^']+)'/.exec(message)?.[1]
    const bare = /^Unexpected argument '([^-'][^']*)'/.exec(message)?.[1]
    const flag = unknown ? closestFlag(unknown, known) : bare ? closestFlag(bare, known) : null
    return flag ? ` Did you mean --${flag}?` : ''
}

/** The names the command's own entry point has: the installed link, or the script in bin/. */
const ENTRY_NAMES = ['patterns-connector', 'patterns-connector.js']

/**
 * How to run this command again, for hints that print a command line: `patterns-connector` when that is what
 * runs it from the PATH, else `node` and the entry script's path (a checkout, where it is not on the PATH).
 * `script` is process.argv[1]; anything but the entry point (a test runner) gets the installed name.
 */
export function commandName(
    script: string | undefined = process.argv[1],
    pathEnv: string = process.env.PATH ?? '',
    cwd: string = process.cwd()
): string {
    const name = ENTRY_NAMES.find((entry) => script !== undefined && basename(script) === entry)
    if (!script || !name) {
        return ENTRY_NAMES[0] as string
    }
    const onPath =
        name === ENTRY_NAMES[0] && pathEnv.split(delimiter).some((dir) => dir && resolve(dir) === dirname(script))
    if (onPath) {
        return name
    }
    const path = relative(cwd, script)
    return `node ${path.startsWith('..') || isAbsolute(path) ? script : path}`
}

/** The plugin's config keys, as the command line spells them. */
export const FLAG_OF_CONFIG_KEY: Readonly<Record<string, string>> = {
    webhookUrl: 'webhook-url',
    customHeaders: 'custom-headers',
    signingSecret: 'signing-secret',
    allowedEventTypes: 'allowed-events',
    excludedEventTypes: 'excluded-events',
    excludedProperties: 'excluded-properties',
}

const CONFIG_KEY = new RegExp(`\\b(${Object.keys(FLAG_OF_CONFIG_KEY).join('|')})\\b`, 'g')

/**
 * A message of the plugin's in the command line's words: its config keys become flags ("check customHeaders"
 * becomes "check --custom-headers"). The plugin's sender words its reasons for the plugin's settings page.
 */
export function inFlagWords(text: string): string {
    return text.replace(CONFIG_KEY, (key) => `--${FLAG_OF_CONFIG_KEY[key] ?? key}`)
}
