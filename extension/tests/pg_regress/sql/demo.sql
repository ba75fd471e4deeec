-- The README's story, as `make demo` tells it: its output is the golden.
\i scripts/demo.sql
