/**
 * JSON in and out without losing big numbers. Exports carry integers past 2^53 (and past 64 bits) that
 * `JSON.parse` would round; they must reach the webhook as written. Text with no run of 16 digits cannot hold such
 * a number and takes plain `JSON.parse` (nearly every line). Otherwise every number of 16 digits or more is parsed
 * as a marked string holding its text, and written back as that text.
 */

/** Marks a number kept as its text. NUL cannot appear unescaped in JSON text, so no real string starts with it. */
const MARK = '\u0000number:'
/** How the mark reads once `JSON.stringify` has escaped it. */
const MARK_ESCAPED = '\\u0000number:'
/** A number in JSON text can only lose precision with this many digits or more. */
const LONG_DIGITS = /\d{16}/
/** A JSON string (skipped) or a JSON number, in JSON text. */
const TOKEN = /"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?/g
const MARKED = /"\\u0000number:(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)"/g

export interface Parsed {
    value: unknown
    /** Whether the value holds marked numbers: its JSON must then go through `stringify(…, true)`. */
    marked: boolean
}

const digitCount = (number: string): number => number.replace(/[-.]|[eE].*$/g, '').length

/** Parses JSON text, keeping numbers of 16 digits or more as they are written. */
export function parse(text: string): Parsed {
    // Text already holding the escaped mark would be read back as a number: it is parsed plainly instead.
    if (!LONG_DIGITS.test(text) || text.includes(MARK_ESCAPED)) {
        return { value: JSON.parse(text) as unknown, marked: false }
    }
    let marked = false
    const kept = text.replace(TOKEN, (token) => {
        if (token.charCodeAt(0) === 0x22 || digitCount(token) < 16) {
            return token
        }
        marked = true
        return `"${MARK_ESCAPED}${token}"`
    })
    return { value: JSON.parse(kept) as unknown, marked }
}

/** A bigint as a JSON number: a plain number when it is exact, else marked, to be written as its digits. */
export function fromBigInt(value: bigint): number | string {
    const number = Number(value)
    return Number.isSafeInteger(number) ? number : `${MARK}${value.toString()}`
}

/** `JSON.stringify`, writing marked numbers back as the numbers they were. */
export function stringify(value: unknown, marked: boolean): string {
    const text = JSON.stringify(value)
    return marked ? text.replace(MARKED, '$1') : text
}
