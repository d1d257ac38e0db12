/** The two errors every command treats as bad usage: it stops before sending anything, with exit code 2. */

/** A flag, its value, or a missing setting. The message names the flag and the fix. */
export class UsageError extends Error {
    constructor(message: string) {
        super(message)
        this.name = 'UsageError'
    }
}

/** A checkpoint file that cannot be used here: unreadable, damaged, or written for another input or source. */
export class CheckpointError extends Error {
    constructor(message: string) {
        super(message)
        this.name = 'CheckpointError'
    }
}
