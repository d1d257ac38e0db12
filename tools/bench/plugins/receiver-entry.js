// Worker thread entry for the bench's receiver: registers the TypeScript loader, then runs receiver-thread.ts.
require('tsx/cjs')
require('./receiver-thread.ts')
