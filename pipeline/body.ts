/**
 * Request bodies as bytes, for the tools (replay, sync) that run the plugin's sender outside the sandbox. The
 * plugin joins its events' JSON into one string; a batch of a few hundred events makes that string hundreds of KB,
 * which V8 allocates straight into its old generation, where it stays until a full collection, and the fetch
 * then copies it again into bytes. Writing each event's JSON straight into one buffer skips both.
 */
import { batchBody } from '../index'

const OPEN = 0x5b
const COMMA = 0x2c
const CLOSE = 0x5d

/** `batchBody(items)` as UTF-8 bytes. `bytes`, where given, must be each JSON's UTF-8 size (checked). */
export function batchBodyBytes(items: readonly { json: string; bytes?: number }[]): Buffer {
    const sizes = items.map((item) => item.bytes ?? Buffer.byteLength(item.json))
    const out = Buffer.allocUnsafe(sizes.reduce((sum, size) => sum + size, 2 + Math.max(items.length - 1, 0)))
    out[0] = OPEN
    let at = 1
    for (let i = 0; i < items.length; i++) {
        if (i > 0) {
            out[at++] = COMMA
        }
        const written = out.write((items[i] as { json: string }).json, at)
        if (written !== sizes[i]) {
            // A size that was not the JSON's own: never send a cut or padded body; the plugin's join is exact.
            return Buffer.from(batchBody(items))
        }
        at += written
    }
    out[at] = CLOSE
    return out
}
