// Database thread entry: registers the TypeScript loader, then serves host/storage-db.ts.
require('tsx/cjs')
require('./storage-db.ts').serveDb()
