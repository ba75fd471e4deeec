-- A fresh database: the extension, nothing else.
CREATE EXTENSION pg_fence;
SELECT extversion FROM pg_extension WHERE extname = 'pg_fence';
