/**
 * Reads a query API response body without turning all of it into one string and one object graph: the small
 * fields are parsed as usual, and each row of `results` is cut out of the bytes and parsed on its own when it is
 * read. A page's rows then die young, one by one, instead of surviving together into the old generation as
 * garbage that a whole-body `JSON.parse` leaves behind (the sync's memory ceiling). Pure: bytes in, rows out.
 */

const QUOTE = 0x22
const BACKSLASH = 0x5c
const OPEN_BRACKET = 0x5b
const CLOSE_BRACKET = 0x5d
const OPEN_BRACE = 0x7b
const CLOSE_BRACE = 0x7d
const COLON = 0x3a

/** Where the top-level `results` array lies in the body, and where each of its rows starts and ends. */
export interface ResultsLayout {
    /** Byte offsets of `[` and just past `]` of the results array. */
    start: number
    end: number
    /** [start, end) of each row, in order. */
    rows: Array<[number, number]>
}

function isSpace(byte: number | undefined): boolean {
    return byte === 0x20 || byte === 0x0a || byte === 0x0d || byte === 0x09
}

/**
 * One pass over the bytes, aware of strings and escapes: finds the array under the top-level key `results` and
 * its rows. Returns null if the body has none (the caller then parses it whole, and reports what is missing).
 */
export function findResults(body: Buffer): ResultsLayout | null {
    let depth = 0
    let keyStart = -1
    let layout: ResultsLayout | null = null
    let rowStart = -1
    for (let i = 0; i < body.length; i++) {
        const byte = body[i]
        if (byte === QUOTE) {
            const open = i
            for (i++; i < body.length && body[i] !== QUOTE; i++) {
                if (body[i] === BACKSLASH) {
                    i++
                }
            }
            keyStart = depth === 1 && !layout ? open : -1
            continue
        }
        if (byte === OPEN_BRACKET || byte === OPEN_BRACE) {
            depth++
            if (layout && layout.end < 0 && depth === 3 && byte === OPEN_BRACKET) {
                rowStart = i
            }
            if (depth === 2 && byte === OPEN_BRACKET && keyStart >= 0 && isResultsKey(body, keyStart, i)) {
                layout = { start: i, end: -1, rows: [] }
            }
        } else if (byte === CLOSE_BRACKET || byte === CLOSE_BRACE) {
            if (layout && layout.end < 0 && depth === 3 && byte === CLOSE_BRACKET && rowStart >= 0) {
                layout.rows.push([rowStart, i + 1])
                rowStart = -1
            }
            if (layout && layout.end < 0 && depth === 2) {
                layout.end = i + 1
            }
            depth--
        }
        if (byte !== COLON && !isSpace(byte)) {
            keyStart = -1
        }
    }
    return layout && layout.end > 0 ? layout : null
}

/** Whether the string at `keyStart` is `"results"`, followed by `:` and the `[` at `bracket`. */
function isResultsKey(body: Buffer, keyStart: number, bracket: number): boolean {
    return (
        body.toString('utf8', keyStart, keyStart + 9) === '"results"' &&
        /^\s*:\s*$/.test(body.toString('utf8', keyStart + 9, bracket))
    )
}

/** The body with an empty `results`, for the small fields; and the rows, parsed one at a time as they are read. */
export function splitBody(body: Buffer): { head: unknown; rowCount: number; rows: () => Generator<unknown> } | null {
    const layout = findResults(body)
    if (!layout) {
        return null
    }
    const head: unknown = JSON.parse(
        body.toString('utf8', 0, layout.start) + '[]' + body.toString('utf8', layout.end, body.length)
    )
    return {
        head,
        rowCount: layout.rows.length,
        rows: function* () {
            for (const [start, end] of layout.rows) {
                yield JSON.parse(body.toString('utf8', start, end)) as unknown
            }
        },
    }
}
