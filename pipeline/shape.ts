/**
 * Stage 2, filter and shape: the plugin's own `shouldSend` and `shapeEvent` turn each record into an item with its
 * JSON and byte size. Unreadable records are counted and handed to `onMalformed`; nothing here sends anything.
 */
import { ParsedConfig, shapeEvent, shouldSend } from '../index'
import { Item, PipelineReport, ShapedChunk, Source, SourceRecord } from './types'

type Counts = Pick<PipelineReport<unknown>, 'read' | 'filtered' | 'malformed'>

export function shapeRecord<P>(
    record: Extract<SourceRecord<P>, { kind: 'event' }>,
    config: Pick<ParsedConfig, 'excludedProperties'>
): Item<P> {
    const { event, text } = record
    // With nothing to remove the event goes as read: its text is already valid JSON, and byte for byte the input.
    if (text !== undefined && config.excludedProperties.length === 0) {
        const bytes = record.bytes ?? Buffer.byteLength(text)
        return { position: record.position, uuid: String(event.uuid ?? ''), json: text, bytes }
    }
    const json = JSON.stringify(shapeEvent(event, config.excludedProperties))
    return { position: record.position, uuid: String(event.uuid ?? ''), json, bytes: Buffer.byteLength(json) }
}

export async function* shapeRecords<P>(
    source: Source<P>,
    config: Pick<ParsedConfig, 'allowedEvents' | 'excludedEvents' | 'excludedProperties'>,
    counts: Counts,
    onMalformed: (record: Extract<SourceRecord<P>, { kind: 'malformed' }>) => void
): AsyncGenerator<ShapedChunk<P>> {
    for await (const chunk of source) {
        const last = chunk[chunk.length - 1]
        if (!last) {
            continue
        }
        const items: Item<P>[] = []
        for (const record of chunk) {
            counts.read++
            if (record.kind === 'malformed') {
                counts.malformed++
                onMalformed(record)
            } else if (!shouldSend(String(record.event.event), config)) {
                counts.filtered++
            } else {
                items.push(shapeRecord(record, config))
            }
        }
        yield { items, last: last.position }
    }
}
