/**
 * Finds the export files to replay under the inputs (folders, searched recursively; files; manifests), in interval
 * order, with manifests taking precedence over the numbered files of their interval. Every file it does not read
 * is listed with the reason, so nothing is dropped silently.
 */
import { createHash } from 'node:crypto'
import { Dirent } from 'node:fs'
import { open, readdir, readFile, stat } from 'node:fs/promises'
import { basename, dirname, join, relative, resolve, sep } from 'node:path'

import { InputError } from '../input'
import { detectExportFormat, ExportFormat, HEAD_BYTES } from './formats'
import { compareExportFiles, ExportName, intervalKey, isDataName, parseExportName } from './names'

export interface ExportFile {
    path: string
    /** The file's path relative to the inputs' common folder: what the checkpoint and messages call it. */
    name: string
    size: number
    /** sha256 of the file's first HEAD_BYTES bytes. */
    head: string
    format: ExportFormat
    interval: ExportName | null
}

export interface SkippedFile {
    name: string
    reason: string
}

export interface ExportListing {
    root: string
    files: ExportFile[]
    skipped: SkippedFile[]
    manifests: number
}

interface Candidate {
    path: string
    explicit: boolean
}

interface Manifest {
    path: string
    interval: ExportName
    files: Set<string>
}

const sha256 = (data: Uint8Array): string => createHash('sha256').update(data).digest('hex')

async function readHead(path: string): Promise<Buffer> {
    const handle = await open(path, 'r')
    try {
        const buffer = Buffer.alloc(HEAD_BYTES)
        const { bytesRead } = await handle.read(buffer, 0, HEAD_BYTES, 0)
        return buffer.subarray(0, bytesRead)
    } finally {
        await handle.close()
    }
}

/** Every file under a folder, depth first. */
async function walk(folder: string, found: string[]): Promise<void> {
    const entries: Dirent[] = await readdir(folder, { withFileTypes: true })
    for (const entry of entries) {
        const path = join(folder, entry.name)
        if (entry.isDirectory()) {
            await walk(path, found)
        } else if (entry.isFile() || entry.isSymbolicLink()) {
            found.push(path)
        }
    }
}

/** The deepest folder holding every input. */
export function commonRoot(paths: string[], folders: Set<string>): string {
    const dirs = paths.map((p) => (folders.has(p) ? p : dirname(p)).split(sep))
    const first = dirs[0] ?? []
    let length = first.length
    for (const parts of dirs) {
        length = Math.min(length, parts.length)
        while (length > 0 && parts.slice(0, length).join(sep) !== first.slice(0, length).join(sep)) {
            length--
        }
    }
    return first.slice(0, length).join(sep) || sep
}

async function readManifest(path: string, interval: ExportName): Promise<Manifest> {
    let files: unknown
    try {
        files = (JSON.parse(await readFile(path, 'utf8')) as { files?: unknown } | null)?.files
    } catch (error) {
        throw new InputError(`cannot read the manifest ${path}: ${(error as Error).message}`)
    }
    if (!Array.isArray(files) || !files.every((key) => typeof key === 'string')) {
        throw new InputError(`the manifest ${path} has no "files" list of keys: download it again, or remove it`)
    }
    // Keys are S3 keys; the files sit next to their manifest, as `aws s3 sync` lays them out.
    return { path, interval, files: new Set(files.map((key: string) => basename(key))) }
}

/** The paths the inputs name: folders searched recursively, files as given. Missing paths are bad usage. */
async function candidates(inputs: string[]): Promise<{ found: Candidate[]; folders: Set<string> }> {
    const found: Candidate[] = []
    const folders = new Set<string>()
    for (const input of inputs) {
        const path = resolve(input)
        const stats = await stat(path).catch((error: NodeJS.ErrnoException) => {
            throw new InputError(`cannot read ${input}: ${error.code ?? 'error'}; give export files or folders`)
        })
        if (stats.isDirectory()) {
            folders.add(path)
            const inside: string[] = []
            await walk(path, inside)
            found.push(...inside.map((p) => ({ path: p, explicit: false })))
        } else {
            found.push({ path, explicit: true })
        }
    }
    return { found, folders }
}

/** Manifests among the candidates, and the files each lists (those given only by a manifest are added). */
async function manifestsOf(found: Candidate[]): Promise<Manifest[]> {
    const manifests: Manifest[] = []
    for (const candidate of found) {
        const interval = parseExportName(basename(candidate.path))
        if (interval?.manifest) {
            manifests.push(await readManifest(candidate.path, interval))
        }
    }
    const known = new Set(found.map((c) => c.path))
    for (const manifest of manifests) {
        for (const file of manifest.files) {
            const path = join(dirname(manifest.path), file)
            const exists = await stat(path).then(
                (s) => s.isFile(),
                () => false
            )
            if (!exists) {
                throw new InputError(
                    `the manifest ${manifest.path} lists ${file}, which is not next to it: download it ` +
                        `(aws s3 sync copies the whole prefix), or move the manifest away to replay what is there`
                )
            }
            if (!known.has(path)) {
                known.add(path)
                found.push({ path, explicit: true })
            }
        }
    }
    return manifests
}

/** Why a candidate is not read, or null when it is. */
function skipReason(candidate: Candidate, interval: ExportName | null, manifests: Manifest[]): string | null {
    const base = basename(candidate.path)
    if (interval?.manifest) {
        return null
    }
    if (!candidate.explicit && !interval && !isDataName(base)) {
        return 'not an export file (JSON Lines or Parquet, named for its interval)'
    }
    const own = interval
        ? manifests.find(
              (m) => dirname(m.path) === dirname(candidate.path) && intervalKey(m.interval) === intervalKey(interval)
          )
        : undefined
    if (own && !own.files.has(base)) {
        return `not in its interval's manifest ${basename(own.path)}: a leftover of an earlier attempt`
    }
    return null
}

/** Lists the export files under `inputs`, in interval order. `exclude` names files replay writes itself. */
export async function discoverExports(inputs: string[], exclude: Map<string, string>): Promise<ExportListing> {
    const { found: given, folders } = await candidates(inputs)
    // A file named twice (given, and inside a folder given) is read once.
    const found = [...new Map(given.map((candidate) => [candidate.path, candidate])).values()]
    const manifests = await manifestsOf(found)
    const root = commonRoot(
        inputs.map((i) => resolve(i)),
        folders
    )
    const files: ExportFile[] = []
    const skipped: SkippedFile[] = []
    for (const candidate of found) {
        const name = relative(root, candidate.path) || basename(candidate.path)
        const interval = parseExportName(basename(candidate.path))
        const reason = exclude.get(candidate.path) ?? skipReason(candidate, interval, manifests)
        if (reason !== null) {
            skipped.push({ name, reason })
            continue
        }
        if (interval?.manifest) {
            continue
        }
        const [stats, head] = await Promise.all([stat(candidate.path), readHead(candidate.path)])
        const format = detectExportFormat(head)
        if (typeof format !== 'string') {
            skipped.push({ name, reason: format.unreadable })
            continue
        }
        files.push({ path: candidate.path, name, size: stats.size, head: sha256(head), format, interval })
    }
    files.sort(compareExportFiles)
    skipped.sort((a, b) => (a.name < b.name ? -1 : 1))
    return { root, files, skipped, manifests: manifests.length }
}
